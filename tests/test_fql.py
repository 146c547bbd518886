"""FQL: equality with one recorded update of the official code (pure functions, and the LightningModule + Trainer),
gradient isolation of each loss, and acting with the one-step policy.

The record (tests/fixtures/golden/fql-update, README there) is agents/fql.py of the official TRQAM repository, which
carries the QAM repository's FQL: alpha 30, no gradient clip, 4 critics, K 10, H 3. As for TRQAM and QAM
(test_golden.py), every recorded quantity must come out within 1e-4 relative, and the update is compared as a
change against the recorded change (golden.update_tolerance).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import golden
from golden import assert_params_and_adam_match, assert_reference_adam, capture_calls, close
from helpers import one_torch_thread  # noqa: F401  (autouse)
from trqam_lit.agents import FQL
from trqam_lit.math.critic import actor_q_loss, critic_loss, ensemble_pessimistic_value, td_target
from trqam_lit.math.flow import bc_flow_loss, distillation_loss, euler_ode, onestep_actions, sample_actions

NETS, ONLINE = golden.AGENT_NETS["fql"], golden.AGENT_ONLINE["fql"]
TARGETS = tuple(name for name in NETS if name not in ONLINE)


class Update:
    """The recorded FQL update with the project's pure functions, keeping every intermediate."""

    def __init__(self) -> None:
        self.arrays, self.meta, self.cfg = a, meta, cfg = golden.load_checked("fql")
        self.nets, self.maps = golden.recorded_networks(
            "fql",
            a,
            v_bc=golden.velocity_field(a, meta),
            mu=golden.onestep_policy(a, meta),
            critic=golden.critic_ensemble(a, meta),
            target_critic=golden.critic_ensemble(a, meta),
        )
        n = self.nets
        self.K, self.H, self.alpha = cfg["flow_steps"], cfg["horizon_length"], cfg["alpha"]
        draws = golden.recorded_draws(a, cfg)
        batch = golden.recorded_batch(a)
        self.s, self.next_s = batch["observations"], batch["next_observations"]
        self.bc_calls, self.critic_calls = capture_calls(n.v_bc), capture_calls(n.critic)

        with torch.no_grad():
            self.next_raw = n.mu(self.next_s, draws["critic/next_noise"])
            self.next_actions = onestep_actions(n.mu, self.next_s, draws["critic/next_noise"])
            self.next_qs = n.target_critic(self.next_s, self.next_actions)
            self.next_q = ensemble_pessimistic_value(self.next_qs, cfg["rho"])
            self.target_q = td_target(batch["rewards"], batch["masks"], self.next_q, cfg["discount"], self.H)
        self.q = n.critic(self.s, batch["actions"])
        self.critic_loss = critic_loss(self.q, self.target_q, batch["valid"])
        self.bc_loss = bc_flow_loss(n.v_bc, self.s, batch["actions"], draws["bc/x0"], draws["bc/t"], batch["valid"])
        self.z = draws["actor/noise"]
        self.distill_loss, self.mu_out = distillation_loss(n.mu, n.v_bc, self.s, self.z, self.K)
        self.q_actions = self.mu_out.clamp(-1.0, 1.0)
        self.q_loss = actor_q_loss(n.critic, self.s, self.q_actions)
        self.total = self.critic_loss + self.bc_loss + self.alpha * self.distill_loss + self.q_loss

    def step(self) -> None:
        """Backward, NO clip (plain optax.adam), polyak of the critic with the pre-step weights, Adam."""
        golden.step_by_hand(self, "fql", polyak=(("target_critic", "critic"),))


@pytest.fixture(scope="module")
def update() -> Update:
    up = Update()
    up.step()
    return up


def test_critic_side_matches(update):
    a = update.arrays
    close(update.next_raw, a["critic/next_onestep_raw"][:, 0], "one-step next action before the clip")
    close(update.next_actions, a["critic/next_actions"], "next actions clip(mu(s', z'))")
    close(update.next_qs, a["critic/next_qs"], "next qs (target critic)")
    close(update.next_q, a["critic/next_q"], "next q")
    close(update.target_q, a["critic/target_q"], "TD target")
    close(update.q, a["critic/q"], "q")
    close(update.critic_loss, a["critic/critic_loss"], "critic loss")


def test_bc_loss_matches(update):
    a = update.arrays
    s, x_t, t_in, pred, _ = update.bc_calls[0]
    close(t_in, a["bc/t"], "BC time t", rtol=0, atol=0)
    close(x_t, a["bc/x_t"], "BC x_t")
    close(pred, a["bc/pred"], "BC prediction")
    close(update.bc_loss, a["bc/flow_loss"], "bc loss")


def test_distillation_matches_with_the_ode_target_under_stop_gradient(update):
    a, K = update.arrays, update.K
    close(update.z, a["distill/noise"], "z", rtol=0, atol=0)
    # After the BC call: the K Euler steps of v_bc from z at t_i = i / K, none of them with a graph.
    ode_calls = update.bc_calls[1:]
    assert len(ode_calls) == K
    for i, (_, x, t_in, _, has_graph) in enumerate(ode_calls):
        assert not has_graph, f"ODE step {i} of the distillation target carries a graph into v_bc"
        assert np.float32(t_in) == np.float32(i / K), (i, t_in)  # the time input as the network sees it
        close(x, a["distill/flow_xs"][i], f"distillation ODE state x_{i}")
    x_last, v_last = ode_calls[-1][1], ode_calls[-1][3]
    close(x_last + v_last / K, a["distill/flow_xs"][K], "distillation ODE state x_K")
    close((x_last + v_last / K).clamp(-1, 1), a["distill/flow_actions"], "target clip(x_K)")
    close(update.mu_out, a["distill/onestep_actions"], "mu(s, z), unclipped")
    close(update.distill_loss, a["distill/distill_loss"], "distillation loss")
    close(update.distill_loss, a["info/actor/distill_loss"], "distillation loss (info)")


def test_q_loss_matches(update):
    a = update.arrays
    close(update.q_actions, a["qloss/actions"], "clip(mu(s, z))")
    _, q_actions, qs = update.critic_calls[-1][:3]  # the Q term's critic call
    close(q_actions, a["qloss/actions"], "the Q term's critic input")
    close(qs, a["qloss/qs"], "Q_j(s, clip(mu)) of the online critic")
    close(qs.mean(0), a["qloss/q"], "mean_j Q_j")
    close(update.q_loss, a["qloss/q_loss"], "Q loss")
    close(update.bc_loss + update.alpha * update.distill_loss + update.q_loss, a["actor/actor_loss"], "actor loss")
    close(update.total, a["loss/total"], "total loss")


# Duplicate kept (= test_ifql.py's, the same unclipped update); golden assertions stay written out per agent
def test_gradients_match_and_the_norm_is_not_clipped(update):
    a = update.arrays
    close(update.grad_norm, a["grad_global_norm"], "global grad norm")
    assert float(a["grad_global_norm"]) > 10.0  # far above any clip: an applied clip could not go unseen
    for name, leaves in update.grads.items():
        for leaf, g in leaves.items():
            tr = "kernel" in leaf and name != "critic"
            close(g.T if tr else g, a[f"grads/{leaf}"], f"grad {leaf}")
    assert all(g is None for g in update.target_grads)


def test_parameter_and_adam_changes_match(update):
    assert_params_and_adam_match(update.arrays, update.opt, update.maps, TARGETS)


# ---------------------------------------------------------------- the LightningModule and a real Trainer step


def recorded_fql():
    keep = {"bc_loss": "bc_out", "critic_loss": ("critic_out", 0), "actor_losses": "actor_out"}
    return golden.recorded_agent_of(FQL, "fql", keep)


def test_one_trainer_step_reproduces_the_recorded_update():
    model, maps, batch, a, meta = recorded_fql()
    cfg = meta["config"]
    count = meta["state_set_by_harness"]["adam_count"]
    target_calls, mu_calls = capture_calls(model.target_critic), capture_calls(model.mu)
    trainer = golden.one_trainer_step(model, maps, batch, a, ONLINE, count)

    # every recorded draw asked for once, in the reference's order
    assert model.draw_calls == ["critic/next_noise", "bc/x0", "bc/t", "actor/noise"], model.draw_calls
    # the TD target's a' is the one-step policy's, clip(mu(s', z'))
    ((s_next, a_next, next_qs, _),) = target_calls
    close(s_next, a["critic/next_obs"], "s'", rtol=0, atol=0)
    close(a_next, a["critic/next_actions"], "next actions clip(mu(s', z'))")
    close(next_qs, a["critic/next_qs"], "next qs")
    close(mu_calls[0][2], a["critic/next_onestep_raw"][:, 0], "mu(s', z') before the clip")
    close(model.critic_out, a["critic/critic_loss"], "critic loss")
    close(model.bc_out, a["bc/flow_loss"], "BC loss")
    close(model.actor_out.distill, a["distill/distill_loss"], "distillation loss")
    close(model.actor_out.q, a["qloss/q_loss"], "Q loss")
    total = model.critic_out + model.bc_out + cfg["alpha"] * model.actor_out.distill + model.actor_out.q
    # Duplicate kept (~ test_dsrl.py's, the Trainer-step checks end alike); golden assertions stay written out per agent
    close(total, a["loss/total"], "total loss")

    # the reference's optax.adam(lr) over exactly the three online networks
    (opt,) = trainer.optimizers
    assert_reference_adam(opt, cfg, maps, ONLINE)

    # the unclipped update: norm, every parameter and target, the Adam moments and count
    assert model.grad_norm.item() == pytest.approx(float(a["grad_global_norm"]), rel=1e-4)
    assert_params_and_adam_match(a, opt, maps, tuple(n for n in maps if n not in ONLINE))


# ---------------------------------------------------------------- gradient isolation and acting


def small_fql(**kwargs) -> FQL:
    torch.manual_seed(0)
    hp = dict(obs_dim=4, action_dim=6, horizon=2, actor_hidden_dims=(16, 16), critic_hidden_dims=(16, 16),
              num_critics=3, flow_steps=5, alpha=3.0)  # fmt: skip
    return FQL(**{**hp, **kwargs})


def test_gradient_isolation_of_each_loss():
    """torchrl-style, through the agent's own methods: L_Q reaches only the critic, L_BC only v_bc, the distillation
    and the Q term only mu (the ODE target has no graph into v_bc; the Q term holds the critic fixed)."""
    model, batch = small_fql(), golden.random_batch()
    modules = {"v_bc": model.v_bc, "mu": model.mu, "critic": model.critic, "target_critic": model.target_critic}
    assert {n for n, m in model.named_children() if any(True for _ in m.parameters())} == set(modules)

    def reached(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n for n, m in modules.items() if any(p.grad is not None and p.grad.abs().sum() > 0
                                                     for p in m.parameters())}  # fmt: skip

    assert reached(model.critic_loss(batch)[0]) == {"critic"}
    assert reached(model.bc_loss(batch)) == {"v_bc"}
    assert reached(model.actor_losses(batch["observations"]).distill) == {"mu"}
    assert reached(model.actor_losses(batch["observations"]).q) == {"mu"}
    # the pure function: the distillation target is computed without a graph even when v_bc's input carries one
    s = batch["observations"].requires_grad_(True)
    loss, _ = distillation_loss(model.mu, model.v_bc, s, torch.randn(5, 6), 5)
    model.zero_grad(set_to_none=True)
    loss.backward()
    assert all(p.grad is None for p in model.v_bc.parameters())


def test_acting_and_the_td_target_use_the_one_step_policy():
    model, batch = small_fql(), golden.random_batch()
    s, z = batch["observations"], torch.randn(5, 6)
    expected = model.mu(s, z).clamp(-1, 1)
    torch.testing.assert_close(model.act(s, z), expected, rtol=0, atol=0)
    torch.testing.assert_close(model.next_actions(s, z), expected, rtol=0, atol=0)
    assert model.policy_net is model.mu
    with torch.no_grad():  # changing v_bc does not change the action; changing mu does
        model.v_bc.mlp.out.bias.add_(1.0)
        torch.testing.assert_close(model.act(s, z), expected, rtol=0, atol=0)
        model.mu.mlp.out.bias.add_(0.5)
        assert not torch.equal(model.act(s, z), expected)
    # no v_ft / v_base; the one polyak target is the critic's; no clip by default
    assert not hasattr(model, "v_ft") and not hasattr(model, "v_base")
    assert [(tgt, src) for tgt, src in model.target_pairs()] == [(model.target_critic, model.critic)]
    assert model.hparams.grad_clip_norm is None


def test_during_a_bc_warmup_the_bc_flow_acts():
    model = small_fql(bc_warmup_steps=10)
    s, z = torch.randn(3, 4), torch.randn(3, 6)
    assert model.policy_net is model.v_bc
    torch.testing.assert_close(model.act(s, z), sample_actions(model.v_bc, s, z, 5), rtol=0, atol=0)
    model.copy_bc_into_policy()  # the end of the warm-up: mu acts from then on
    assert model.policy_net is model.mu
    torch.testing.assert_close(model.act(s, z), model.mu(s, z).clamp(-1, 1), rtol=0, atol=0)


def test_distillation_compares_the_unclipped_mu_and_the_q_term_sees_it_clipped():
    """mu's outputs pushed beyond [-1, 1] (the record's stay inside, so it cannot tell): the distillation term
    compares the UNclipped mu(s, z) with the clipped ODE target; the Q term scores clip(mu(s, z))."""
    model, batch = small_fql(), golden.random_batch()
    s, z = batch["observations"], torch.randn(5, 6)
    model.draw = lambda name, *shape, uniform=False: z  # the one draw of actor_losses
    with torch.no_grad():
        model.mu.mlp.out.bias.copy_(torch.tensor([3.0, -3.0, 0.0, 2.0, -2.0, 0.5]))
        model.v_bc.mlp.out.bias.fill_(2.0)  # an ODE end point outside [-1, 1] too
        raw, ode = model.mu(s, z), euler_ode(model.v_bc, s, z, 5)
    assert (raw.abs() > 1).any() and (ode.abs() > 1).any()
    out = model.actor_losses(s)
    expected_distill = (raw - ode.clamp(-1, 1)).pow(2).mean()
    torch.testing.assert_close(out.distill, expected_distill, rtol=1e-6, atol=0)
    with torch.no_grad():
        expected_q = -model.critic(s, raw.clamp(-1, 1)).mean()
    torch.testing.assert_close(out.q, expected_q, rtol=1e-6, atol=0)
