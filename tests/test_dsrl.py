"""DSRL: equality with one recorded update of the official code (pure functions, and the LightningModule + Trainer),
gradient isolation of each loss, and acting with the noise policy through the base flow's ODE.

The record (tests/fixtures/golden/dsrl-update, README there) is agents/dsrl.py of the official TRQAM repository, which
carries the QAM repository's DSRL: noise_scale 1.4, no gradient clip, 4 critics, K 10, H 3, alpha started at
exp(-0.9). As for TRQAM, QAM and FQL, every recorded quantity must come out within 1e-4 relative, and the update is
compared as a change against the recorded change (golden.update_tolerance).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import golden
from golden import assert_params_and_adam_match, assert_reference_adam, capture_calls, close
from helpers import one_torch_thread  # noqa: F401  (autouse)
from trqam_lit.agents import DSRL
from trqam_lit.agents.dsrl import latent_actor_loss, latent_distillation_loss, steered_actions
from trqam_lit.math.critic import critic_loss, ensemble_pessimistic_value, td_target
from trqam_lit.math.flow import bc_flow_loss, sample_actions
from trqam_lit.math.nets import LogParam, TanhGaussianPolicy
from trqam_lit.math.tanh_gaussian import tanh_gaussian_log_prob, tanh_gaussian_sample, temperature_loss

NETS, ONLINE = golden.AGENT_NETS["dsrl"], golden.AGENT_ONLINE["dsrl"]
TARGETS = tuple(name for name in NETS if name not in ONLINE)
POLYAK = (("target_critic", "critic"), ("target_actor_bc_flow", "actor_bc_flow"))  # (target, online), flax names


# ---------------------------------------------------------------- the pure functions, in the reference's order


class Update:
    """The recorded DSRL update with the project's pure functions, keeping every intermediate."""

    def __init__(self) -> None:
        self.arrays, self.meta, self.cfg = a, meta, cfg = golden.load_checked("dsrl")
        shapes = golden.record_shapes(a, meta)
        self.nets, self.maps = golden.recorded_networks(
            "dsrl",
            a,
            v_bc=golden.velocity_field(a, meta),
            v_base=golden.velocity_field(a, meta),
            actor=TanhGaussianPolicy(shapes["obs_dim"], shapes["action_dim"], shapes["hidden_dims"]),
            z_critic=golden.critic_ensemble(a, meta),
            alpha=LogParam(),
            critic=golden.critic_ensemble(a, meta),
            target_critic=golden.critic_ensemble(a, meta),
        )
        n = self.nets
        self.K, self.H, self.scale = K, H, scale = cfg["flow_steps"], cfg["horizon_length"], cfg["noise_scale"]
        d = golden.recorded_draws(a, cfg)
        batch = golden.recorded_batch(a)
        self.s, self.next_s = s, next_s = batch["observations"], batch["next_observations"]
        self.base_calls, self.critic_calls = capture_calls(n.v_base), capture_calls(n.critic)
        self.bc_calls, self.z_calls = capture_calls(n.v_bc), capture_calls(n.z_critic)

        # critic: a' = clip(ODE_base(s', clip(w') * noise_scale)), w' ~ pi(. | s')
        with torch.no_grad():
            self.next_mean, next_log_std = n.actor(next_s)
            self.next_std = next_log_std.exp()
            self.next_w, _ = tanh_gaussian_sample(self.next_mean, next_log_std, d["critic/next_noise"])
            self.next_actions = steered_actions(n.v_base, next_s, self.next_w, scale, K)
            self.next_qs = n.target_critic(next_s, self.next_actions)
            self.next_q = ensemble_pessimistic_value(self.next_qs, cfg["rho"])
            self.target_q = td_target(batch["rewards"], batch["masks"], self.next_q, cfg["discount"], H)
        self.q = n.critic(s, batch["actions"])
        self.critic_loss = critic_loss(self.q, self.target_q, batch["valid"])
        # latent distillation: Q_z,j(s, z) -> Q_j(s, clip(ODE_base(s, z))), z unscaled
        self.z = d["distill/noise"]
        self.distill_loss, self.distill_target = latent_distillation_loss(n.z_critic, n.critic, n.v_base, s, self.z, K)
        self.bc_loss = bc_flow_loss(n.v_bc, s, batch["actions"], d["bc/x0"], d["bc/t"], batch["valid"])
        # noise policy and temperature, from one eps
        self.mean, log_std = n.actor(s)
        self.std = log_std.exp()
        self.w, x = tanh_gaussian_sample(self.mean, log_std, d["actor/eps"])
        self.log_prob = tanh_gaussian_log_prob(self.mean, log_std, x)
        self.alpha = n.alpha()
        self.actor_loss = latent_actor_loss(n.z_critic, s, self.w, self.log_prob, self.alpha, scale)
        target_entropy = -cfg["target_entropy_multiplier"] * cfg["action_dim"] * H
        self.alpha_loss = temperature_loss(self.alpha, self.log_prob, target_entropy)
        self.total = self.critic_loss + self.distill_loss + self.bc_loss + self.actor_loss + self.alpha_loss

    def step(self) -> None:
        """Backward, NO clip (plain optax.adam), polyak of the critic and the BC flow (pre-step weights), Adam."""
        golden.step_by_hand(self, "dsrl", POLYAK)


@pytest.fixture(scope="module")
def update() -> Update:
    up = Update()
    up.step()
    return up


def assert_ode_calls(calls, s: torch.Tensor, xs: np.ndarray, K: int, what: str) -> None:
    """K Euler steps of the base flow at t_i = i / K from xs[0], none with a graph, ending at xs[K]."""
    assert len(calls) == K, (what, len(calls))
    for i, (s_in, x, t_in, _, has_graph) in enumerate(calls):
        assert not has_graph, f"{what}: ODE step {i} carries a graph into the base flow"
        assert torch.equal(s_in, s) and np.float32(t_in) == np.float32(i / K), (what, i, t_in)
        close(x, xs[i], f"{what}: ODE state x_{i}")
    close(calls[-1][1] + calls[-1][3] / K, xs[K], f"{what}: ODE state x_K")


def test_critic_side_matches_with_the_target_bc_flow_steered(update):
    a, K = update.arrays, update.K
    close(update.next_s, a["critic/next_obs"], "s'", rtol=0, atol=0)
    close(update.next_mean, a["critic/next_latent_loc"][:, 0], "noise policy mean at s'")
    close(update.next_std, a["critic/next_latent_std"][:, 0], "noise policy std at s'")
    close(update.next_w, a["critic/next_latent"][:, 0], "w' = tanh(mean + std eps')")
    close(update.next_w.clamp(-1, 1) * update.scale, a["critic/next_latent_scaled"][:, 0], "clip(w') * noise_scale")
    # the first K calls of v_base (the TARGET BC flow, the reference's use_target_latent): a''s ODE from the latent
    assert_ode_calls(update.base_calls[:K], update.next_s, a["critic/next_flow_xs"][:, :, 0], K, "next action")
    close(update.next_actions, a["critic/next_actions"], "a'")
    close(update.next_qs, a["critic/next_qs"], "next qs (target critic)")
    close(update.next_q, a["critic/next_q"], "next q")
    close(update.target_q, a["critic/target_q"], "TD target")
    close(update.q, a["critic/q"], "q")
    close(update.critic_loss, a["critic/critic_loss"], "critic loss")
    close(update.critic_loss, a["info/critic/critic_loss"], "critic loss (info)")
    close(update.q.mean(), a["info/critic/q_mean"], "q mean (info)")


def test_latent_distillation_matches_with_unscaled_noise_and_the_online_critic(update):
    a, K = update.arrays, update.K
    close(update.z, a["distill/noise"], "z", rtol=0, atol=0)
    assert_ode_calls(update.base_calls[K:], update.s, a["distill/flow_xs"], K, "distillation")
    # the online critic's calls: Q(s, a) of the TD loss, then the distillation target at clip(ODE(s, z))
    (_, q_actions, target_qs, has_graph) = update.critic_calls[1]
    assert not has_graph
    close(q_actions, a["distill/actions"], "clip(ODE_base(s, z))")
    close(target_qs, a["distill/target_qs"], "Q_j(s, a_z) of the online critic")
    close(update.distill_target, a["distill/target_qs"], "distillation target")
    (_, z_in, z_qs, z_graph) = update.z_calls[0]
    assert z_graph and torch.equal(z_in, update.z)  # the raw z, not z * noise_scale
    close(z_qs, a["distill/z_qs"], "Q_z,j(s, z)")
    close(update.distill_loss, a["distill/distill_loss"], "distillation loss")
    close(update.distill_loss, a["info/critic/distill_loss"], "distillation loss (info)")
    close(update.critic_loss + update.distill_loss, a["critic/total_loss"], "critic total")


def test_bc_loss_matches(update):
    a = update.arrays
    ((_, x_t, t_in, pred, _),) = update.bc_calls  # v_bc is called once: the base ODEs run on v_base
    close(t_in, a["bc/t"], "BC time t", rtol=0, atol=0)
    close(x_t, a["bc/x_t"], "BC x_t")
    close(pred, a["bc/pred"], "BC prediction")
    close(update.bc_loss, a["bc/flow_loss"], "bc loss")


def test_noise_policy_and_temperature_match(update):
    a = update.arrays
    close(update.mean, a["actor/loc"], "noise policy mean")
    close(update.std, a["actor/std"], "noise policy std")
    close(update.w, a["actor/latent"], "w = tanh(mean + std eps)")
    close(update.log_prob, a["actor/log_probs"], "log pi(w | s) at the pre-tanh x")
    (_, w_in, z_qs, _) = update.z_calls[1]  # the actor's call of Q_z, after the distillation's
    close(w_in, a["actor/latent_scaled"], "w * noise_scale, unclipped")
    close(z_qs, a["actor/z_qs"], "Q_z,j(s, w * noise_scale)")
    close(z_qs.mean(0), a["actor/q"], "mean_j Q_z,j")
    close(update.actor_loss, a["actor/actor_loss"], "actor loss")
    close(update.alpha, a["actor/alpha"], "alpha")
    close(-update.log_prob.mean(), a["actor/entropy"], "entropy")
    close(update.alpha_loss, a["actor/alpha_loss"], "temperature loss")
    close(update.std.mean(), a["info/actor/action_std"], "mean pre-tanh std (info)")
    actor_total = update.bc_loss + update.actor_loss + update.alpha_loss
    close(actor_total, a["actor/total_loss"], "actor total")
    close(update.total, a["loss/total"], "total loss")


def test_gradients_match_and_the_norm_is_not_clipped(update):
    a = update.arrays
    close(update.grad_norm, a["grad_global_norm"], "global grad norm")
    assert float(a["grad_global_norm"]) > 10.0  # far above any clip: an applied clip could not go unseen
    for name, leaves in update.grads.items():
        for leaf, g in leaves.items():
            tr = update.maps[name][leaf][1]
            close(g.T if tr else g, a[f"grads/{leaf}"], f"grad {leaf}")
    assert all(g is None for g in update.target_grads)


def test_parameter_and_adam_changes_match(update):
    assert_params_and_adam_match(update.arrays, update.opt, update.maps, TARGETS)


# ---------------------------------------------------------------- the LightningModule and a real Trainer step


def recorded_dsrl():
    keep = {"bc_loss": "bc_out", "critic_loss": ("critic_out", 0), "distill_loss": "distill_out",
            "actor_losses": "actor_out"}  # fmt: skip
    return golden.recorded_agent_of(DSRL, "dsrl", keep)


def test_one_trainer_step_reproduces_the_recorded_update():
    model, maps, batch, a, meta = recorded_dsrl()
    cfg = meta["config"]
    count = meta["state_set_by_harness"]["adam_count"]
    target_calls, z_calls = capture_calls(model.target_critic), capture_calls(model.z_critic)
    trainer = golden.one_trainer_step(model, maps, batch, a, ONLINE, count)

    # every recorded draw asked for once, in the reference's order
    assert model.draw_calls == ["critic/next_noise", "distill/noise", "bc/x0", "bc/t", "actor/eps"], model.draw_calls
    # the TD target's a' is the steered target BC flow's
    ((s_next, a_next, next_qs, _),) = target_calls
    close(s_next, a["critic/next_obs"], "s'", rtol=0, atol=0)
    close(a_next, a["critic/next_actions"], "a' = clip(ODE_base(s', clip(w') * noise_scale))")
    close(next_qs, a["critic/next_qs"], "next qs")
    close(model.critic_out, a["critic/critic_loss"], "critic loss")
    distill, target = model.distill_out
    close(target, a["distill/target_qs"], "distillation target")
    close(distill, a["distill/distill_loss"], "distillation loss")
    close(z_calls[1][1], a["actor/latent_scaled"], "the actor's latent w * noise_scale")
    close(model.bc_out, a["bc/flow_loss"], "BC loss")
    close(model.actor_out.actor, a["actor/actor_loss"], "actor loss")
    close(model.actor_out.alpha, a["actor/alpha_loss"], "temperature loss")
    close(model.actor_out.entropy, a["actor/entropy"], "entropy")
    close(model.actor_out.std, a["info/actor/action_std"], "mean pre-tanh std")
    total = model.critic_out + distill + model.bc_out + model.actor_out.actor + model.actor_out.alpha
    # Duplicate kept (~ test_fql.py's, the Trainer-step checks end alike); golden assertions stay written out per agent
    close(total, a["loss/total"], "total loss")

    # the reference's optax.adam(lr) over exactly the five online networks (the temperature included)
    (opt,) = trainer.optimizers
    assert_reference_adam(opt, cfg, maps, ONLINE)

    # the unclipped update: norm, every parameter and both targets, the Adam moments and count
    assert model.grad_norm.item() == pytest.approx(float(a["grad_global_norm"]), rel=1e-4)
    assert_params_and_adam_match(a, opt, maps, tuple(n for n in maps if n not in ONLINE))


# ---------------------------------------------------------------- gradient isolation and acting


def small_dsrl(**kwargs) -> DSRL:
    torch.manual_seed(0)
    hp = dict(obs_dim=4, action_dim=6, horizon=2, actor_hidden_dims=(16, 16), critic_hidden_dims=(16, 16),
              num_critics=3, flow_steps=5, noise_scale=0.7)  # fmt: skip
    return DSRL(**{**hp, **kwargs})


def test_gradient_isolation_of_each_loss():
    """torchrl-style, through the agent's own methods: L_Q reaches only the critic, L_z only Q_z (the critic and
    the base ODE of its target without graph), L_BC only v_bc, L_pi only the noise policy (Q_z and alpha held
    fixed), the temperature loss only alpha (log pi held fixed)."""
    model, batch = small_dsrl(), golden.random_batch()
    names = ("v_bc", "v_base", "actor", "z_critic", "alpha", "critic", "target_critic")
    modules = {n: getattr(model, n) for n in names}
    assert {n for n, m in model.named_children() if any(True for _ in m.parameters())} == set(modules)

    def reached(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n for n, m in modules.items() if any(p.grad is not None and p.grad.abs().sum() > 0
                                                     for p in m.parameters())}  # fmt: skip

    s = batch["observations"]
    assert reached(model.critic_loss(batch)[0]) == {"critic"}
    assert reached(model.distill_loss(s)[0]) == {"z_critic"}
    assert reached(model.critic_loss(batch)[0] + model.distill_loss(s)[0]) == {"critic", "z_critic"}  # the reference's
    assert reached(model.bc_loss(batch)) == {"v_bc"}
    assert reached(model.actor_losses(s).actor) == {"actor"}
    assert reached(model.actor_losses(s).alpha) == {"alpha"}
    assert reached(model.training_step(batch, 0)) == {"v_bc", "actor", "z_critic", "alpha", "critic"}
    # the warm-up touches every trained network but v_bc with a zero gradient (DDP), and trains v_bc only
    warm = small_dsrl(bc_warmup_steps=10)
    warm.training_step(batch, 0).backward()
    for n, m in warm.named_children():
        for p in m.parameters():
            if p.requires_grad:
                assert p.grad is not None, n
                assert (p.grad.abs().sum() > 0) == (n == "v_bc"), n


def test_acting_and_the_td_target_steer_the_base_flow_with_a_noise_policy_sample():
    model, batch = small_dsrl(), golden.random_batch()
    s, eps = batch["observations"], torch.randn(5, 6)
    with torch.no_grad():
        model.actor.mean.bias.fill_(0.3)  # a latent away from 0
        model.v_bc.mlp.out.bias.fill_(0.2)  # v_bc and v_base differ
        mean, log_std = model.actor(s)
        w = torch.tanh(mean + log_std.exp() * eps)  # a SAMPLE (the reference acts with one), not tanh(mean)
        expected = sample_actions(model.v_base, s, w * 0.7, 5)
    assert model.policy_net is model.actor
    torch.testing.assert_close(model.act(s, eps), expected, rtol=0, atol=0)
    torch.testing.assert_close(model.next_actions(s, eps), expected, rtol=0, atol=0)
    assert not torch.equal(model.act(s, eps), model.act(s, torch.zeros_like(eps)))  # the eps matters
    assert not torch.equal(expected, sample_actions(model.v_bc, s, w * 0.7, 5))  # the online BC flow would differ
    with torch.no_grad():  # v_bc does not act (it only trains v_base through the polyak step); v_base does
        model.v_bc.mlp.out.bias.add_(1.0)
        torch.testing.assert_close(model.act(s, eps), expected, rtol=0, atol=0)
        model.v_base.mlp.out.bias.add_(0.5)
        assert not torch.equal(model.act(s, eps), expected)
    # the polyak targets are the critic's and the base flow's; no clip by default; the temperature is a parameter
    assert [(tgt, src) for tgt, src in model.target_pairs()] == [(model.target_critic, model.critic),
                                                                  (model.v_base, model.v_bc)]  # fmt: skip
    assert model.hparams.grad_clip_norm is None
    assert "alpha.log_value" in model.state_dict() and model.alpha.log_value.requires_grad
    assert model.alpha().item() == 1.0 and model.target_entropy == -0.5 * 6
    with pytest.raises(ValueError, match="noise_scale"):
        small_dsrl(noise_scale=0.0)


def test_during_a_bc_warmup_the_bc_flow_acts_and_its_end_sets_the_base_flow():
    model = small_dsrl(bc_warmup_steps=10)
    s, eps = torch.randn(3, 4), torch.randn(3, 6)
    assert model.policy_net is model.v_bc
    torch.testing.assert_close(model.act(s, eps), sample_actions(model.v_bc, s, eps, 5), rtol=0, atol=0)
    with torch.no_grad():
        model.v_bc.mlp.out.bias.fill_(0.4)
    model.copy_bc_into_policy()  # the end of the warm-up: v_base = v_bc, the noise policy acts from then on
    assert model.policy_net is model.actor
    for p, q in zip(model.v_base.parameters(), model.v_bc.parameters(), strict=True):
        assert torch.equal(p, q)
    w = torch.tanh(model.actor(s)[0] + model.actor(s)[1].exp() * eps)
    torch.testing.assert_close(model.act(s, eps), sample_actions(model.v_base, s, w * 0.7, 5), rtol=0, atol=0)


def test_the_actor_scores_the_scaled_latent_and_the_distillation_the_raw_noise():
    """noise_scale multiplies the latent the noise policy proposes (to Q_z and to the base ODE), never the
    distillation's z: Q_z is learned on N(0, I) inputs and queried at noise_scale * w."""
    model, batch = small_dsrl(noise_scale=1.5), golden.random_batch()
    s, eps, z = batch["observations"], torch.randn(5, 6), torch.randn(5, 6)
    model.draw = lambda name, *shape, uniform=False: {"actor/eps": eps, "distill/noise": z}[name]
    calls = capture_calls(model.z_critic)
    out = model.actor_losses(s)
    latent = model.latent(s, eps)
    torch.testing.assert_close(calls[0][1], latent.w.detach() * 1.5, rtol=0, atol=0)
    with torch.no_grad():
        expected = (latent.log_prob * model.alpha()).mean() - model.z_critic(s, latent.w * 1.5).mean()
    torch.testing.assert_close(out.actor, expected, rtol=1e-6, atol=1e-7)
    loss, target = model.distill_loss(s)
    torch.testing.assert_close(calls[-1][1], z, rtol=0, atol=0)
    with torch.no_grad():
        expected_target = model.critic(s, sample_actions(model.v_base, s, z, 5))
    torch.testing.assert_close(target, expected_target, rtol=0, atol=0)
    torch.testing.assert_close(loss, (model.z_critic(s, z) - expected_target).pow(2).mean(), rtol=1e-6, atol=0)
