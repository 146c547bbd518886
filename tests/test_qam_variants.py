"""QAM-F and QAM-E: equality with one recorded update of the official code each (pure functions, and the
LightningModule + Trainer), gradient isolation of each loss, and acting with the one-step / edited action.

The records (tests/fixtures/golden/qam-{f,e}-update, README there) are agents/qam.py of the official TRQAM repository
with fql_alpha 300 / inv_temp 10 (QAM-F) and edit_scale 0.1 / inv_temp 3 (QAM-E): QAM's update plus the variant's
terms, one Adam after a global-norm clip to 1 (active). As for TRQAM, QAM and FQL, every recorded quantity must come
out within 1e-4 relative, and the update is compared as a change against the recorded change.
"""

from __future__ import annotations

import pytest
import torch

import golden
from golden import GRAD_CLIP_NORM, assert_params_and_adam_match, assert_reference_adam, close, recorded_draws
from helpers import one_torch_thread  # noqa: F401  (autouse)
from trqam_lit.agents import QAME, QAMF
from trqam_lit.agents.qam_e import edited_actions
from trqam_lit.math.adjoint import adjoint_matching_objective
from trqam_lit.math.critic import actor_q_loss, critic_loss, ensemble_pessimistic_value, td_target
from trqam_lit.math.flow import bc_flow_loss, distillation_loss, onestep_actions, sample_actions
from trqam_lit.math.nets import LogParam, TanhGaussianPolicy
from trqam_lit.math.tanh_gaussian import tanh_gaussian_log_prob, tanh_gaussian_sample, temperature_loss

VARIANTS = ("qam-f", "qam-e")
AGENT_CLASS = {"qam-f": QAMF, "qam-e": QAME}
POLYAK = (("target_critic", "critic"), ("target_actor_slow", "actor_slow"))  # (target, online), flax names


def targets_of(variant: str) -> tuple[str, ...]:
    return tuple(name for name in golden.AGENT_NETS[variant] if name not in golden.AGENT_ONLINE[variant])


# ---------------------------------------------------------------- the pure functions, in the reference's order


class Update:
    """The recorded update with the project's pure functions, keeping every intermediate."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.arrays, self.meta, self.cfg = a, meta, cfg = golden.load_checked(variant)
        shapes = golden.record_shapes(a, meta)
        nets = {name: golden.velocity_field(a, meta) for name in ("v_bc", "v_ft", "v_base")}
        nets.update(critic=golden.critic_ensemble(a, meta), target_critic=golden.critic_ensemble(a, meta))
        if variant == "qam-f":
            nets["mu"] = golden.onestep_policy(a, meta)
        else:
            A = shapes["action_dim"]
            nets["edit_policy"] = TanhGaussianPolicy(shapes["obs_dim"] + A, A, shapes["hidden_dims"])
            nets["edit_alpha"] = LogParam()
        self.nets, self.maps = golden.recorded_networks(variant, a, **nets)
        n = self.nets
        self.K, self.H = K, H = cfg["flow_steps"], cfg["horizon_length"]
        self.draws = d = recorded_draws(a, cfg)
        batch = golden.recorded_batch(a)
        s, s_next = self.s, self.next_s = batch["observations"], batch["next_observations"]

        # critic: a' from the variant's acting policy, the target ensemble's pessimistic value
        with torch.no_grad():
            if variant == "qam-f":
                self.next_raw = n.mu(s_next, d["critic/next_noise"])
                self.next_actions = onestep_actions(n.mu, s_next, d["critic/next_noise"])
            else:
                self.next_flow = sample_actions(n.v_ft, s_next, d["critic/next_noise"], K)
                self.next_mean, self.next_log_std = n.edit_policy(torch.cat([s_next, self.next_flow], -1))
                e, _ = tanh_gaussian_sample(self.next_mean, self.next_log_std, d["critic/next_edit_eps"])
                self.next_raw = self.next_flow + cfg["edit_scale"] * e
                self.next_actions = edited_actions(self.next_flow, e, cfg["edit_scale"])
            self.next_qs = n.target_critic(s_next, self.next_actions)
            self.next_q = ensemble_pessimistic_value(self.next_qs, cfg["rho"])
            self.target_q = td_target(batch["rewards"], batch["masks"], self.next_q, cfg["discount"], H)
        self.q = n.critic(s, batch["actions"])
        self.critic_loss = critic_loss(self.q, self.target_q, batch["valid"])
        self.bc_loss = bc_flow_loss(n.v_bc, s, batch["actions"], d["bc/x0"], d["bc/t"], batch["valid"])
        self.am = adjoint_matching_objective(
            n.v_ft, n.v_base, n.target_critic, s, d["am/x0"], d["am/eps"], K, H, lam_eff=1.0,
            adj_scale=cfg["inv_temp"], solver="fused", clip_action=cfg["clip_adj"],
        )  # fmt: skip
        self.total = self.critic_loss + self.bc_loss + self.am.loss + self.variant_terms()

    def variant_terms(self) -> torch.Tensor:
        n, d, cfg, s, K = self.nets, self.draws, self.cfg, self.s, self.K
        if self.variant == "qam-f":
            with torch.no_grad():
                self.flow_actions = sample_actions(n.v_ft, s, d["actor/noise"], K)  # the distillation target
            self.distill, self.mu_out = distillation_loss(n.mu, n.v_ft, s, d["actor/noise"], K)
            self.q_actions = self.mu_out.clamp(-1.0, 1.0)
            self.q_loss = actor_q_loss(n.critic, s, self.q_actions)
            return cfg["fql_alpha"] * self.distill + self.q_loss
        with torch.no_grad():
            self.flow_actions = sample_actions(n.v_ft, s, d["edit/noise"], K)
        self.mean, self.log_std = n.edit_policy(torch.cat([s, self.flow_actions], -1))
        self.edit, x = tanh_gaussian_sample(self.mean, self.log_std, d["edit/eps"])
        self.log_prob = tanh_gaussian_log_prob(self.mean, self.log_std, x)
        self.edited = edited_actions(self.flow_actions, self.edit, cfg["edit_scale"])
        self.q_loss = actor_q_loss(n.critic, s, self.edited)
        self.alpha = n.edit_alpha()
        self.entropy_loss = (self.log_prob * self.alpha.detach()).mean()
        target_entropy = -cfg["edit_target_entropy_multiplier"] * cfg["action_dim"] * self.H
        self.alpha_loss = temperature_loss(self.alpha, self.log_prob, target_entropy)
        return self.q_loss + self.entropy_loss + self.alpha_loss

    def step(self) -> None:
        """Backward, the global clip to norm 1, polyak with the pre-step weights, Adam from the recorded state."""
        golden.step_by_hand(self, self.variant, POLYAK, clip=GRAD_CLIP_NORM)


@pytest.fixture(scope="module", params=VARIANTS)
def update(request) -> Update:
    up = Update(request.param)
    up.step()
    return up


def test_critic_side_matches(update):
    a = update.arrays
    if update.variant == "qam-f":  # a' = clip(mu(s', z')): the one-step policy
        close(update.next_raw, a["critic/next_onestep_raw"][:, 0], "mu(s', z') before the clip")
    else:  # a' = clip(a_flow + edit_scale * tanh(x)), the edit conditioned on (s', a_flow)
        close(update.next_flow, a["critic/next_flow_actions"][:, 0], "a_flow of the next action")
        close(update.next_mean, a["critic/next_edit_loc"][:, 0], "edit mean at s'")
        close(update.next_log_std.exp(), a["critic/next_edit_std"][:, 0], "edit std at s'")
        close(update.next_raw, a["critic/next_edited_raw"][:, 0], "edited next action before the clip")
    close(update.next_actions, a["critic/next_actions"], "next actions")
    close(update.next_qs, a["critic/next_qs"], "next qs (target critic)")
    close(update.target_q, a["critic/target_q"], "TD target")
    close(update.q, a["critic/q"], "q")
    close(update.critic_loss, a["critic/critic_loss"], "critic loss")


def test_bc_and_adjoint_matching_match(update):
    a, am = update.arrays, update.am
    close(update.bc_loss, a["bc/flow_loss"], "BC loss")
    close(am.xs, a["am/xs"], "SDE states")
    close(am.adj_final, a["am/adj_K"], "terminal adjoint")
    close(am.adjs, a["am/adjs"], "lean adjoints")
    close(am.loss, a["am/adj_loss"], "AM loss")


def test_variant_terms_match(update):
    a, cfg = update.arrays, update.cfg
    if update.variant == "qam-f":
        close(update.flow_actions, a["fql/flow_actions"], "distillation target clip(ODE of v_ft)")
        close(update.mu_out, a["fql/os_actions"], "mu(s, z), unclipped")
        close(update.distill, a["fql/distill_loss"], "distillation loss")
        close(update.q_actions, a["fql/os_actions_clipped"], "clip(mu(s, z))")
        close(update.q_loss, a["fql/q_loss"], "Q loss")
        actor = update.bc_loss + update.am.loss + update.q_loss + cfg["fql_alpha"] * update.distill
    else:
        close(update.flow_actions, a["edit/flow_actions"], "a_flow = clip(ODE of v_ft)")
        close(update.mean, a["edit/loc"], "edit mean")
        close(update.log_std.exp(), a["edit/std"], "edit std")
        close(update.edit, a["edit/edit"], "edit tanh(x)")
        close(update.log_prob, a["edit/log_probs"], "log pi_e at the pre-tanh x")
        close(update.edited, a["edit/edited_actions"], "edited action")
        close(update.q_loss, a["edit/q_loss"], "edit Q loss")
        close(update.entropy_loss, a["edit/entropy_loss"], "entropy loss")
        close(update.alpha, a["edit/alpha"], "alpha")
        close(-update.log_prob.mean(), a["edit/entropy"], "entropy")
        close(update.alpha_loss, a["edit/alpha_loss"], "temperature loss")
        actor = update.bc_loss + update.am.loss + update.q_loss + update.entropy_loss + update.alpha_loss
    close(actor, a["actor/actor_loss"], "actor loss")
    close(update.total, a["loss/total"], "total loss")


def test_gradients_match_and_the_clip_is_active(update):
    a = update.arrays
    close(update.grad_norm, a["grad_global_norm"], "global grad norm before the clip")
    assert float(a["grad_global_norm"]) > 10 * GRAD_CLIP_NORM
    for name, leaves in update.grads.items():
        for leaf, g in leaves.items():
            tr = update.maps[name][leaf][1]
            close(g.T if tr else g, a[f"grads/{leaf}"], f"grad {leaf}")
    assert all(g is None for g in update.target_grads)


def test_parameter_and_adam_changes_match(update):
    targets = targets_of(update.variant)
    assert_params_and_adam_match(update.arrays, update.opt, update.maps, targets, check_count=False)


# ---------------------------------------------------------------- the LightningModule and a real Trainer step


def recorded_agent(variant: str):
    keep = {"bc_loss": "bc_out", "critic_loss": ("critic_out", 0), "actor_objective": "am_out",
            "policy_loss": "policy_out"}  # fmt: skip
    return golden.recorded_agent_of(AGENT_CLASS[variant], variant, keep)


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_trainer_step_reproduces_the_recorded_update(variant):
    model, maps, batch, a, meta = recorded_agent(variant)
    cfg, online = meta["config"], golden.AGENT_ONLINE[variant]
    count = meta["state_set_by_harness"]["adam_count"]
    target_calls = golden.capture_calls(model.target_critic)
    trainer = golden.one_trainer_step(model, maps, batch, a, online, count)

    # every recorded draw asked for once
    assert sorted(model.draw_calls) == sorted(recorded_draws(a, cfg)), model.draw_calls
    next_calls = [c for c in target_calls if torch.equal(c[0], batch["next_observations"])]
    assert len(next_calls) == 1, len(next_calls)
    close(next_calls[0][1], a["critic/next_actions"], "next actions")
    close(next_calls[0][2], a["critic/next_qs"], "next qs")
    close(model.critic_out, a["critic/critic_loss"], "critic loss")
    close(model.bc_out, a["bc/flow_loss"], "BC loss")
    close(model.am_out.loss, a["am/adj_loss"], "AM loss")
    extra, terms = model.policy_out
    if variant == "qam-f":
        close(terms["actor/distill_loss"], a["fql/distill_loss"], "distillation loss")
        close(terms["actor/q_loss"], a["fql/q_loss"], "Q loss")
    else:
        names = {"edit_q_loss": "q_loss", "edit_entropy_loss": "entropy_loss", "edit_alpha_loss": "alpha_loss",
                 "edit_entropy": "entropy"}  # fmt: skip
        for name, rec in names.items():
            close(terms[f"actor/{name}"], a[f"edit/{rec}"], name)
    close(model.critic_out + model.bc_out + model.am_out.loss + extra, a["loss/total"], "total loss")

    # the reference's clip(1) + optax.adam(lr) over exactly the online networks (the temperature included)
    (opt,) = trainer.optimizers
    assert_reference_adam(opt, cfg, maps, online)

    assert model.grad_norm.item() == pytest.approx(float(a["grad_global_norm"]), rel=1e-4)
    targets = targets_of(variant)
    assert_params_and_adam_match(a, opt, maps, targets)


# ---------------------------------------------------------------- gradient isolation, acting, the tanh-Gaussian

SMALL = dict(obs_dim=4, action_dim=6, horizon=2, actor_hidden_dims=(16, 16), critic_hidden_dims=(16, 16),
             num_critics=3, flow_steps=5, sde_solver="fused")  # fmt: skip


def small(variant: str, **kwargs):
    torch.manual_seed(0)
    return AGENT_CLASS[variant](**{**SMALL, **kwargs})


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_isolation_of_each_loss(variant):
    """Through the agent's own methods: L_Q reaches only the critic, L_BC only v_bc, L_AM only v_ft; QAM-F's
    distillation and Q terms only mu (v_ft's ODE target without graph, the critic fixed); QAM-E's Q and entropy terms
    only the edit policy (a_flow without graph, the critic and alpha fixed), the temperature loss only alpha."""
    model, batch = small(variant), golden.random_batch()
    own = {"qam-f": ("mu",), "qam-e": ("edit_policy", "edit_alpha")}[variant]
    names = ("v_bc", "v_ft", "v_base", "critic", "target_critic", *own)
    modules = {n: getattr(model, n) for n in names}
    assert {n for n, m in model.named_children() if any(True for _ in m.parameters())} == set(modules)

    def reached(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n for n, m in modules.items() if any(p.grad is not None and p.grad.abs().sum() > 0
                                                     for p in m.parameters())}  # fmt: skip

    s = batch["observations"]
    assert reached(model.critic_loss(batch)[0]) == {"critic"}
    assert reached(model.bc_loss(batch)) == {"v_bc"}
    noise = model.draw_step_noise(batch)
    assert reached(model.actor_objective(s, noise["am_x0"], noise["am_eps"]).loss) == {"v_ft"}
    expected = {"qam-f": {"actor/distill_loss": {"mu"}, "actor/q_loss": {"mu"}},
                "qam-e": {"actor/edit_q_loss": {"edit_policy"}, "actor/edit_entropy_loss": {"edit_policy"},
                          "actor/edit_alpha_loss": {"edit_alpha"}}}[variant]  # fmt: skip
    for name, nets in expected.items():
        assert reached(model.policy_loss(s)[1][name]) == nets, name
    assert reached(model.policy_loss(s)[0]) == set(own)
    # the warm-up touches every trained network but v_bc with a zero gradient (DDP), and trains v_bc only
    warm = small(variant, bc_warmup_steps=10)
    loss = warm.training_step(batch, 0)
    loss.backward()
    for n, m in warm.named_children():
        for p in m.parameters():
            if p.requires_grad:
                assert p.grad is not None, n
                assert (p.grad.abs().sum() > 0) == (n == "v_bc"), n


def test_qam_f_acts_and_bootstraps_with_the_one_step_policy():
    model, batch = small("qam-f"), golden.random_batch()
    s, z = batch["observations"], torch.randn(5, 6)
    expected = model.mu(s, z).clamp(-1, 1)
    torch.testing.assert_close(model.act(s, z), expected, rtol=0, atol=0)
    torch.testing.assert_close(model.next_actions(s, z), expected, rtol=0, atol=0)
    assert model.policy_net is model.mu
    with torch.no_grad():  # v_ft teaches mu but does not act
        model.v_ft.mlp.out.bias.add_(1.0)
        torch.testing.assert_close(model.act(s, z), expected, rtol=0, atol=0)
    warm = small("qam-f", bc_warmup_steps=10)
    assert warm.policy_net is warm.v_bc
    torch.testing.assert_close(warm.act(s, z), sample_actions(warm.v_bc, s, z, 5), rtol=0, atol=0)
    assert model.hparams.grad_clip_norm == 1.0  # QAM's clip, as the reference
    assert [t for t, _ in model.target_pairs()] == [model.target_critic, model.v_base]


def test_qam_e_acts_and_bootstraps_with_the_edited_flow_action():
    model, batch = small("qam-e", edit_scale=0.3), golden.random_batch()
    s, z = batch["observations"], torch.randn(5, 6)
    with torch.no_grad():
        model.edit_policy.mean.bias.fill_(1.0)  # an edit that shows
        a_flow = sample_actions(model.v_ft, s, z, 5)
    torch.manual_seed(3)
    acted = model.act(s, z)
    torch.manual_seed(3)
    eps = torch.randn_like(z)
    with torch.no_grad():
        expected = model.edit(s, a_flow, eps).action
        mean, log_std = model.edit_policy(torch.cat([s, a_flow], -1))
        by_hand = (a_flow + 0.3 * (mean + log_std.exp() * eps).tanh()).clamp(-1, 1)
    torch.testing.assert_close(acted, expected, rtol=0, atol=0)
    torch.testing.assert_close(acted, by_hand, rtol=1e-6, atol=1e-6)
    assert not torch.equal(acted, a_flow) and ((acted - a_flow).abs() <= 0.3 + 1e-6).all()
    # the TD target's a': the same map with the training stream's draw "critic/next_edit_eps"
    model.draw = lambda name, *shape, uniform=False: eps if name == "critic/next_edit_eps" else None
    with torch.no_grad():
        torch.testing.assert_close(model.next_actions(s, z), expected, rtol=0, atol=0)
    warm = small("qam-e", bc_warmup_steps=10)
    torch.testing.assert_close(warm.act(s, z), sample_actions(warm.v_bc, s, z, 5), rtol=0, atol=0)


def test_the_temperature_is_a_trained_checkpointed_parameter():
    model = small("qam-e")
    assert "edit_alpha.log_value" in model.state_dict() and model.edit_alpha.log_value.requires_grad
    assert model.edit_alpha().item() == 1.0  # log_value 0, the reference's LogParam init
    assert model.target_entropy == -0.5 * 6
    with pytest.raises(ValueError, match="plain QAM"):
        small("qam-e", edit_scale=0.0)
    with pytest.raises(ValueError, match="plain QAM"):
        small("qam-f", fql_alpha=0.0)


def test_tanh_gaussian_log_prob_is_the_change_of_variables_and_finite_where_atanh_is_not():
    gen = torch.Generator().manual_seed(0)
    mean, log_std, eps = (torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    e, x = tanh_gaussian_sample(mean, log_std, eps)  # in float64, where torch's atanh(e) still recovers x
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.exp()), [torch.distributions.TanhTransform()]
    )
    torch.testing.assert_close(tanh_gaussian_log_prob(mean, log_std, x), dist.log_prob(e).sum(-1))
    # a sample far in the tail: tanh(x) rounds to 1, atanh gives inf; the pre-tanh form stays finite
    big = torch.full((1, 3), 12.0)
    e, x = tanh_gaussian_sample(big, torch.zeros(1, 3), torch.zeros(1, 3))
    assert (e == 1.0).all() and torch.isinf(torch.atanh(e)).all()
    assert torch.isfinite(tanh_gaussian_log_prob(big, torch.zeros(1, 3), x)).all()
    # the temperature loss: gradient alpha-only, d/d alpha = entropy - target
    alpha, log_prob = torch.tensor(0.5, requires_grad=True), torch.randn(5, requires_grad=True)
    temperature_loss(alpha, log_prob, -2.0).backward()
    assert log_prob.grad is None
    torch.testing.assert_close(alpha.grad, -log_prob.detach().mean() + 2.0)


def test_qam_e_loss_stays_finite_when_the_edit_saturates():
    """Edits deep in tanh's tail (tanh(x) rounds to +-1 in float32): the log-prob is taken at the sampled pre-tanh x,
    as tfp's cached value, so every term and gradient stays finite (atanh(tanh(x)) would give inf)."""
    model, s = small("qam-e"), golden.random_batch()["observations"]
    with torch.no_grad():
        model.edit_policy.mean.bias.fill_(12.0)
    loss, terms = model.policy_loss(s)
    assert all(torch.isfinite(v).all() for v in terms.values()), terms
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.edit_policy.parameters() if p.grad is not None)


# QAM-F's compile (~40 s) with -m slow: QAM-E's is the one whose draws needed care
@pytest.mark.parametrize("variant", [v if v == "qam-e" else pytest.param(v, marks=pytest.mark.slow) for v in VARIANTS])
def test_the_compiled_step_equals_the_eager_step(variant):
    """``compile_step``: the same draws, losses and gradients as the eager step (QAM-E's TD target draws its edit
    eps; the compiled losses take it from ``draw_step_noise``, where the eager step used to draw it inside them)."""
    batch = golden.random_batch()
    results = []
    for compiled in (False, True):
        model = small(variant, compile_step=compiled)
        model.copy_bc_into_policy()
        torch.manual_seed(3)
        bc, q_loss, _, am = model.step_losses()(batch, model.draw_step_noise(batch))
        (bc + q_loss + am.loss).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(((bc, q_loss, am.loss, am.path_kl), grads))
    (eager, eager_grads), (fast, fast_grads) = results
    for a, b in zip(eager, fast, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert eager_grads.keys() == fast_grads.keys() and eager_grads
    for name, grad in eager_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
