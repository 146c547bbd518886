"""IFQL: equality with one recorded update of the official code (pure functions, and the LightningModule + Trainer),
gradient isolation of each loss, and best-of-N acting.

The record (tests/fixtures/golden/ifql-update, README there) is agents/ifql.py of the official TRQAM repository, which
carries the QAM repository's IFQL: kappa 0.9, no gradient clip, 4 critics, K 10, H 3. As for FQL (test_fql.py), every
recorded quantity must come out within 1e-4 relative, and the update is compared as a change against the recorded
change (golden.update_tolerance).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import golden
from golden import assert_params_and_adam_match, assert_reference_adam, capture_calls, close
from helpers import one_torch_thread  # noqa: F401  (autouse)
from trqam_lit.agents import IFQL
from trqam_lit.math.critic import critic_loss, ensemble_pessimistic_value, expectile_loss, expectile_weight, td_target
from trqam_lit.math.flow import bc_flow_loss, best_of_n_actions, sample_actions

NETS, ONLINE = golden.AGENT_NETS["ifql"], golden.AGENT_ONLINE["ifql"]
TARGETS = tuple(name for name in NETS if name not in ONLINE)


# ---------------------------------------------------------------- the pure functions, in the reference's order


class Update:
    """The recorded IFQL update with the project's pure functions, keeping every intermediate."""

    def __init__(self) -> None:
        self.arrays, self.meta, self.cfg = a, meta, cfg = golden.load_checked("ifql")
        self.nets, self.maps = golden.recorded_networks(
            "ifql",
            a,
            v_bc=golden.velocity_field(a, meta),
            value=golden.state_value(a, meta),
            critic=golden.critic_ensemble(a, meta),
            target_critic=golden.critic_ensemble(a, meta),
        )
        n = self.nets
        self.kappa, self.H = cfg["kappa"], cfg["horizon_length"]
        draws = golden.recorded_draws(a, cfg)
        batch = golden.recorded_batch(a)
        self.s, self.next_s, actions = batch["observations"], batch["next_observations"], batch["actions"]
        self.bc_calls = capture_calls(n.v_bc)

        # value: V(s) onto mean - rho std of the TARGET ensemble at the dataset chunk
        with torch.no_grad():
            self.value_qs = n.target_critic(self.s, actions)
            self.value_q = ensemble_pessimistic_value(self.value_qs, cfg["rho"])
        self.v = n.value(self.s)
        self.weight = expectile_weight(self.value_q - self.v.detach(), self.kappa)
        self.value_loss = expectile_loss(self.value_q, self.v, self.kappa)
        # critic: every member onto y = R + gamma^H m V(s'), V held fixed
        with torch.no_grad():
            self.next_v = n.value(self.next_s)
            self.target_q = td_target(batch["rewards"], batch["masks"], self.next_v, cfg["discount"], self.H)
        self.q = n.critic(self.s, actions)
        self.critic_loss = critic_loss(self.q, self.target_q, batch["valid"])
        self.bc_loss = bc_flow_loss(n.v_bc, self.s, actions, draws["bc/x0"], draws["bc/t"], batch["valid"])
        self.total = self.value_loss + self.critic_loss + self.bc_loss

    def step(self) -> None:
        """Backward, NO clip (plain optax.adam), polyak of the critic with the pre-step weights, Adam."""
        golden.step_by_hand(self, "ifql", polyak=(("target_critic", "critic"),))


@pytest.fixture(scope="module")
def update() -> Update:
    up = Update()
    up.step()
    return up


def test_value_side_matches(update):
    a = update.arrays
    close(update.value_qs, a["value/qs"], "Q_targ_j(s, a_data) of the TARGET critic")
    close(update.value_q, a["value/q"], "mean - rho std")
    close(update.v, a["value/v"], "V(s)")
    close(update.weight, a["value/weight"], "expectile weights", rtol=0, atol=0)
    assert len(set(update.weight.tolist())) == 2  # both branches occur (kappa and 1 - kappa)
    close(update.value_loss, a["value/value_loss"], "value loss")
    for key, got in (("value_loss", update.value_loss), ("v_mean", update.v.mean()), ("v_min", update.v.min()),
                     ("v_max", update.v.max())):  # fmt: skip
        close(got, a[f"info/value/{key}"], f"info value/{key}")


def test_critic_side_matches(update):
    a = update.arrays
    close(update.next_s, a["critic/next_obs"], "s'", rtol=0, atol=0)
    close(update.next_v, a["critic/next_v"], "V(s')")
    close(update.target_q, a["critic/target_q"], "TD target y")
    close(update.q, a["critic/qs"], "Q_j(s, a_data)")
    close(update.critic_loss, a["critic/critic_loss"], "critic loss")
    y = update.target_q  # the reference's critic/q_* describe y, not Q
    for key, got in (("q_mean", y.mean()), ("q_min", y.min()), ("q_max", y.max())):
        close(got, a[f"info/critic/{key}"], f"info critic/{key}")


# Duplicate kept (~ test_cgql.py's, BC is v_bc's only call in both); golden assertions stay written out per agent
def test_bc_loss_and_total_match(update):
    a = update.arrays
    ((s, x_t, t_in, pred, has_graph),) = update.bc_calls  # the BC loss is v_bc's only call in the update
    assert has_graph
    close(t_in, a["bc/t"], "BC time t", rtol=0, atol=0)
    close(x_t, a["bc/x_t"], "BC x_t")
    close(pred, a["bc/pred"], "BC prediction")
    close(update.bc_loss, a["bc/flow_loss"], "bc loss")
    close(update.bc_loss, a["info/actor/actor_loss"], "actor loss (info): the BC loss alone")
    close(update.total, a["loss/total"], "total loss")


# Duplicate kept (= test_fql.py's, the same unclipped update); golden assertions stay written out per agent
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


def recorded_ifql():
    keep = {"value_loss": "value_out", "critic_loss": "critic_out", "bc_loss": "bc_out"}
    return golden.recorded_agent_of(IFQL, "ifql", keep)


def test_one_trainer_step_reproduces_the_recorded_update():
    model, maps, batch, a, meta = recorded_ifql()
    cfg = meta["config"]
    count = meta["state_set_by_harness"]["adam_count"]
    target_calls, value_calls = capture_calls(model.target_critic), capture_calls(model.value)
    trainer = golden.one_trainer_step(model, maps, batch, a, ONLINE, count)

    # the BC loss's x_0 and t are the only draws
    assert model.draw_calls == ["bc/x0", "bc/t"], model.draw_calls
    close(model.value_out[0], a["value/value_loss"], "value loss")
    close(model.critic_out[1], a["critic/target_q"], "TD target y")
    close(model.critic_out[0], a["critic/critic_loss"], "critic loss")
    close(model.bc_out, a["bc/flow_loss"], "BC loss")
    close(model.value_out[0] + model.critic_out[0] + model.bc_out, a["loss/total"], "total loss")
    # the value regresses onto the TARGET critic at the dataset chunk; the critic's y uses V(s') without a graph
    ((s, a_data, value_qs, _),) = target_calls
    close(a_data, a["batch/actions"].reshape(a_data.shape[0], -1), "the dataset chunk", rtol=0, atol=0)
    close(value_qs, a["value/qs"], "Q_targ_j(s, a_data)")
    (_, v, v_graph), (s_next, next_v, next_graph) = value_calls
    assert v_graph and not next_graph
    close(s_next, a["critic/next_obs"], "s'", rtol=0, atol=0)
    close(v, a["value/v"], "V(s)")
    close(next_v, a["critic/next_v"], "V(s')")

    # the reference's optax.adam(lr) over exactly the three online networks
    (opt,) = trainer.optimizers
    assert_reference_adam(opt, cfg, maps, ONLINE)

    # the unclipped update: norm, every parameter and target, the Adam moments and count
    assert model.grad_norm.item() == pytest.approx(float(a["grad_global_norm"]), rel=1e-4)
    assert_params_and_adam_match(a, opt, maps, tuple(n for n in maps if n not in ONLINE))


# ---------------------------------------------------------------- the expectile, gradient isolation and acting


def small_ifql(**kwargs) -> IFQL:
    torch.manual_seed(0)
    hp = dict(obs_dim=4, action_dim=6, horizon=2, actor_hidden_dims=(16, 16), critic_hidden_dims=(16, 16),
              num_critics=3, flow_steps=5, kappa=0.8, best_of_n=8)  # fmt: skip
    return IFQL(**{**hp, **kwargs})


def test_expectile_weights_ties_as_above_and_the_loss_by_hand():
    diff = torch.tensor([1.0, 0.0, -1.0, -0.0])
    torch.testing.assert_close(expectile_weight(diff, 0.9), torch.tensor([0.9, 0.9, 0.1, 0.9]), rtol=0, atol=1e-7)
    y, v = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 1.0, -1.0])  # y - v = 1, -1, 0
    torch.testing.assert_close(expectile_loss(y, v, 0.7), torch.tensor((0.7 * 1 + 0.3 * 1 + 0.0) / 3))
    with pytest.raises(ValueError, match="kappa"):
        small_ifql(kappa=1.5)


def test_gradient_isolation_of_each_loss():
    """torchrl-style, through the agent's own methods: L_V reaches only V (the target critic is fixed), L_Q only the
    critic (V(s') in y without a graph), L_BC only v_bc."""
    model, batch = small_ifql(), golden.random_batch()
    modules = {"v_bc": model.v_bc, "value": model.value, "critic": model.critic, "target_critic": model.target_critic}
    assert {n for n, m in model.named_children() if any(True for _ in m.parameters())} == set(modules)

    def reached(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n for n, m in modules.items() if any(p.grad is not None and p.grad.abs().sum() > 0
                                                     for p in m.parameters())}  # fmt: skip

    assert reached(model.value_loss(batch)[0]) == {"value"}
    loss, y = model.critic_loss(batch)
    assert not y.requires_grad  # the TD target's V(s') carries no graph
    assert reached(loss) == {"critic"}
    assert reached(model.bc_loss(batch)) == {"v_bc"}
    # the pure function: a target that carries a graph is still held fixed
    target, v = model.value(batch["next_observations"]), torch.zeros(5, requires_grad=True)
    model.zero_grad(set_to_none=True)
    expectile_loss(target, v, 0.9).backward()
    assert v.grad is not None and all(p.grad is None for p in model.value.parameters())


def test_the_value_regresses_onto_the_target_critic_and_the_critic_onto_v():
    model, batch = small_ifql(), golden.random_batch()
    with torch.no_grad():
        before = model.value_loss(batch)[0]
        model.critic.out.bias.add_(1.0)  # the online critic does not enter L_V
        torch.testing.assert_close(model.value_loss(batch)[0], before, rtol=0, atol=0)
        model.target_critic.out.bias.add_(1.0)
        assert not torch.equal(model.value_loss(batch)[0], before)
        # y = R + gamma^H m V(s'), from the value net alone: no target critic, no pessimism
        y = batch["rewards"] + model.hparams.discount**2 * batch["masks"] * model.value(batch["next_observations"])
        torch.testing.assert_close(model.critic_loss(batch)[1], y, rtol=1e-6, atol=1e-6)


class HandCritic(nn.Module):
    """Two members with opposite preferences: Q_1 = sum(a), Q_2 = -2 a_0; the min disagrees with the mean's choice."""

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return torch.stack([a.sum(-1), -2.0 * a[:, 0]])


def test_acting_is_the_argmax_of_the_ensemble_min_over_n_samples():
    model = small_ifql()
    N, B, A = model.hparams.best_of_n, 5, 6
    s, noise = torch.randn(B, 4), torch.randn(N, B, A)
    model.critic = HandCritic()  # the online critic scores; the target critic is not read
    model.target_critic = None
    samples = torch.stack([sample_actions(model.v_bc, s, noise[i], 5) for i in range(N)])  # (N, B, A)
    qs = torch.stack([HandCritic()(s, samples[i]) for i in range(N)], dim=1)  # (E, N, B)
    best = qs.min(0).values.argmax(0)
    expected = samples[best, torch.arange(B)]
    assert not torch.equal(best, qs.mean(0).argmax(0))  # the reduction matters on this data
    torch.testing.assert_close(model.act(s, noise), expected, rtol=0, atol=0)
    torch.testing.assert_close(best_of_n_actions(model.v_bc, model.critic, s, noise, 5), expected, rtol=0, atol=0)
    # without noise, act draws best_of_n of them per state
    torch.manual_seed(3)
    got = model.act(s)
    torch.manual_seed(3)
    torch.testing.assert_close(got, model.act(s, torch.randn(N, B, A)), rtol=0, atol=0)


def test_during_a_bc_warmup_the_bc_flow_acts_alone():
    model = small_ifql(bc_warmup_steps=10)
    s, z = torch.randn(3, 4), torch.randn(3, 6)
    torch.testing.assert_close(model.act(s, z), sample_actions(model.v_bc, s, z, 5), rtol=0, atol=0)
    model.copy_bc_into_policy()  # the end of the warm-up: best-of-N from then on
    torch.testing.assert_close(model.act(s, z[None]), best_of_n_actions(model.v_bc, model.critic, s, z[None], 5))


def test_state_targets_and_clip():
    model = small_ifql()
    assert any(k.startswith("value.") for k in model.state_dict())  # the value net is checkpointed
    assert [(tgt, src) for tgt, src in model.target_pairs()] == [(model.target_critic, model.critic)]
    assert not hasattr(model, "target_value") and not hasattr(model, "v_ft") and not hasattr(model, "mu")
    assert model.hparams.grad_clip_norm is None and model.policy_net is model.v_bc
