"""CGQL-L: equality with one recorded update of the official code (pure functions, and the LightningModule + Trainer),
gradient isolation of each loss and of the guidance score, and acting with the guided sampler.

The record (tests/fixtures/golden/cgql-linex-update, README there) is agents/cgql.py of the official TRQAM repository,
which carries the QAM repository's CGQL, in its linex mode: inv_temp 10, guidance_coef 0.1, noisy_coef 0.1, isd_clip
5, no gradient clip, 4 critics, K 10, H 3. As for FQL (test_fql.py), every recorded quantity must come out within 1e-4
relative, and the update is compared as a change against the recorded change (golden.update_tolerance).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import golden
from golden import OPTAX_ADAM, RTOL, assert_params_and_adam_match, assert_reference_adam, capture_calls, close
from helpers import one_torch_thread  # noqa: F401  (autouse)
from trqam_lit.agents import CGQL
from trqam_lit.agents.cgql import (
    guidance_score,
    guided_euler_actions,
    guided_velocity,
    linex_exp_bias,
    linex_loss,
    noisy_critic_loss,
)
from trqam_lit.math.critic import critic_loss, ensemble_pessimistic_value, td_target
from trqam_lit.math.flow import bc_flow_loss, sample_actions
from trqam_lit.math.nets import CriticEnsemble

RECORD = "cgql-linex"
NETS, ONLINE = golden.AGENT_NETS["cgql"], golden.AGENT_ONLINE["cgql"]
TARGETS = tuple(name for name in NETS if name not in ONLINE)
CGQL_UNIFORM = golden.UNIFORM_DRAWS | {"noisy/t"}  # the noisy critic's t is jax.random.uniform too


def hyper(cfg: dict) -> dict:
    return {"inv_temp": cfg["inv_temp"], "guidance_coef": cfg["guidance_coef"]}


# ---------------------------------------------------------------- the pure functions, in the reference's order


class Update:
    """The recorded CGQL update with the project's pure functions, keeping every intermediate."""

    def __init__(self) -> None:
        self.arrays, self.meta, self.cfg = a, meta, cfg = golden.load_checked(RECORD, "cgql")
        self.nets, self.maps = golden.recorded_networks(
            "cgql",
            a,
            v_bc=golden.velocity_field(a, meta),
            v_base=golden.velocity_field(a, meta),
            critic=golden.critic_ensemble(a, meta, time_input=True),
            target_critic=golden.critic_ensemble(a, meta, time_input=True),
        )
        n = self.nets
        self.K, self.H = cfg["flow_steps"], cfg["horizon_length"]
        self.draws = draws = golden.recorded_draws(a, cfg)
        batch = golden.recorded_batch(a)
        self.s, self.next_s, actions = batch["observations"], batch["next_observations"], batch["actions"]
        self.base_calls, self.bc_calls = capture_calls(n.v_base), capture_calls(n.v_bc)
        self.critic_calls = capture_calls(n.critic)
        self.score_inputs = []

        def recording_critic(s, x, t):
            self.score_inputs.append((x.detach().clone(), t))
            return n.critic(s, x, t)

        # TD target: a' from the guided sampler (target actor, online critic's score), Q_targ at t = 1
        with torch.no_grad():
            self.next_actions = guided_euler_actions(
                n.v_base, recording_critic, self.next_s, draws["critic/next_noise"], self.K, **hyper(cfg)
            )
            # the scores at the sampler's inputs, from the pre-update critic (the fixture then steps it)
            self.scores = [guidance_score(n.critic, self.next_s, x, t) for x, t in self.score_inputs]
            self.next_qs = n.target_critic(self.next_s, self.next_actions)
            self.next_q = ensemble_pessimistic_value(self.next_qs, cfg["rho"])
            self.target_q = td_target(batch["rewards"], batch["masks"], self.next_q, cfg["discount"], self.H)
        self.q = n.critic(self.s, actions)
        self.critic_loss = critic_loss(self.q, self.target_q, batch["valid"])
        # noisy critic: LINEX towards the target critic at the clean action
        self.noisy = noisy_critic_loss(n.critic, n.target_critic, self.s, actions, draws["noisy/noise"],
                                       draws["noisy/t"], batch["valid"], cfg["inv_temp"], cfg["isd_clip"])  # fmt: skip
        self.critic_total = self.critic_loss + cfg["noisy_coef"] * self.noisy.loss
        self.bc_loss = bc_flow_loss(n.v_bc, self.s, actions, draws["bc/x0"], draws["bc/t"], batch["valid"])
        self.total = self.critic_total + self.bc_loss

    def step(self) -> None:
        """Backward, NO clip (plain optax.adam), polyak of the critic and v_base with the pre-step weights, Adam."""
        golden.step_by_hand(self, "cgql", polyak=(("target_critic", "critic"), ("target_actor", "actor")))
        # leaf -> (gradient, transposed?), as test_gradients_match_and_the_norm_is_not_clipped reads them
        self.grads = {leaf: (g, self.maps[net][leaf][1]) for net, gs in self.grads.items() for leaf, g in gs.items()}


@pytest.fixture(scope="module")
def update() -> Update:
    up = Update()
    up.step()
    return up


def test_the_guided_next_action_matches_step_by_step(update):
    """The target actor's ODE: step 0 plain, each step i >= 1 guided by the ONLINE critic's score at (s', x_i, t_i)."""
    a, K, cfg = update.arrays, update.K, update.cfg
    xs = a["critic/next_flow_xs"][:, :, 0]
    assert len(update.base_calls) == K and len(update.score_inputs) == K - 1  # no score at step 0
    for i, (s, x, t_in, vel, has_graph) in enumerate(update.base_calls):
        assert not has_graph, f"step {i}: the target actor carries a graph"
        assert np.float32(t_in) == np.float32(i / K), (i, t_in)
        close(s, a["critic/next_obs"], "s'", rtol=0, atol=0)
        close(x, xs[i], f"ODE state x_{i}")
        close(vel, a["critic/next_vels_base"][i, :, 0], f"target actor velocity v_{i}")
        if i == 0:
            continue
        x_score, t_score = update.score_inputs[i - 1]
        assert t_score == t_in  # the critic at the flow time t_i (linex), not at t = 1
        close(x_score, xs[i], f"score input x_{i}")
        score = update.scores[i - 1]
        close(score, a["critic/next_scores"][i - 1, :, 0], f"score_{i}")
        guided = guided_velocity(vel, score, x, t_in, cfg["inv_temp"], cfg["guidance_coef"])
        close(guided, a["critic/next_vels_guided"][i - 1, :, 0], f"guided velocity v_{i}")
        close(x + guided / K, xs[i + 1], f"ODE state x_{i + 1}")
    close(update.next_actions, a["critic/next_actions"], "a' = clip(x_K)")
    assert (np.abs(xs[K]) > 1).any()  # the final clip is exercised


def test_critic_side_matches(update):
    a = update.arrays
    close(update.next_qs, a["critic/next_qs"], "Q_targ_j(s', a', 1)")
    close(update.next_q, a["critic/next_q"], "next q")
    close(update.target_q, a["critic/target_q"], "TD target")
    close(update.q, a["critic/q"], "Q_j(s, a, 1)")
    close(update.critic_loss, a["critic/critic_loss"], "critic loss")
    for key, got in (("critic_loss", update.critic_loss), ("q_mean", update.q.mean()), ("q_min", update.q.min()),
                     ("q_max", update.q.max())):  # fmt: skip
        close(got, a[f"info/critic/{key}"], f"info critic/{key}")


def test_noisy_critic_matches_with_both_linex_branches(update):
    a, cfg, noisy = update.arrays, update.cfg, update.noisy
    close(update.draws["noisy/t"], a["noisy/t"], "t", rtol=0, atol=0)
    close(update.draws["noisy/noise"], a["noisy/noise"], "noise", rtol=0, atol=0)
    _, a_t, t_in, _, has_graph = update.critic_calls[-1]  # the online critic's last call: the noisy actions
    assert has_graph
    close(a_t, a["noisy/noisy_actions"], "a_t = (1 - t) noise + t a")
    close(t_in, a["noisy/t"], "the noisy critic's time input", rtol=0, atol=0)
    close(noisy.target, a["noisy/target_q"], "Q_targ_j(s, a_data, 1)")
    close(noisy.q, a["noisy/q"], "Q_j(s, a_t, t)")
    close(noisy.delta, a["noisy/delta"], "delta")
    linear = noisy.delta > cfg["isd_clip"]
    close(linear.float(), a["noisy/mask"], "linear-branch mask", rtol=0, atol=0)
    assert 0 < int(linear.sum()) < linear.numel()  # both branches occur (8 of 28 linear)
    close(noisy.loss, a["noisy/noisy_critic_loss"], "noisy critic loss")
    close(noisy.loss, a["info/critic/noisy_critic_loss"], "noisy critic loss (info)")
    close(update.critic_total, a["critic/total_loss"], "critic_loss + noisy_coef * noisy loss")
    bias = linex_exp_bias(noisy.q, noisy.target, cfg["inv_temp"])
    close(bias, a["info/critic/exp_bias"], "exp_bias (relative: it is ~7e12)", rtol=1e-3, atol=0)


# Duplicate kept (~ test_ifql.py's, BC is v_bc's only call in both); golden assertions stay written out per agent
def test_bc_loss_and_total_match(update):
    a = update.arrays
    ((s, x_t, t_in, pred, has_graph),) = update.bc_calls  # the BC loss is v_bc's only call in the update
    assert has_graph
    close(t_in, a["bc/t"], "BC time t", rtol=0, atol=0)
    close(x_t, a["bc/x_t"], "BC x_t")
    close(pred, a["bc/pred"], "BC prediction")
    close(update.bc_loss, a["bc/flow_loss"], "bc loss")
    close(update.bc_loss, a["info/actor/flow_loss"], "actor loss (info): the BC loss alone")
    close(update.total, a["loss/total"], "total loss")


def test_gradients_match_and_the_norm_is_not_clipped(update):
    a = update.arrays
    close(update.grad_norm, a["grad_global_norm"], "global grad norm")
    assert float(a["grad_global_norm"]) > 10.0  # far above any clip: an applied clip could not go unseen
    for leaf, (g, tr) in update.grads.items():
        # 1e-4 relative to the leaf's largest entry as well: the critic's gradients pass through the LINEX exponential,
        # which multiplies float32 rounding of Q by inv_temp exp(delta) <= 10 e^5 (ours: 2e-5 of the leaf's scale, and a
        # float64 port is 7e-6 from the float32 record), so near-zero entries have no relative digits to compare
        recorded = a[f"grads/{leaf}"]
        close(g.T if tr else g, recorded, f"grad {leaf}", atol=max(1e-5, RTOL * float(np.abs(recorded).max())))
    assert all(g is None for g in update.target_grads)


def test_parameter_and_adam_changes_match(update):
    a = update.arrays
    assert_params_and_adam_match(
        a, update.opt, update.maps, TARGETS, moment_tolerance=lambda leaf, key, _: moment_tolerance(a, leaf, key)
    )


def moment_tolerance(a: dict[str, np.ndarray], leaf: str, key: str) -> dict[str, float]:
    """golden.update_tolerance, widened by what the gradient's own tolerance (above) moves an Adam moment: (1 - b1)
    times it for the first moment, (1 - b2) 2 |g| times it for the second."""
    tol = golden.update_tolerance(a[f"{'adam_mu' if key == 'exp_avg' else 'adam_nu'}_after/{leaf}"])
    g = float(np.abs(a[f"grads/{leaf}"]).max())
    b1, b2 = OPTAX_ADAM["betas"]
    slack = (1 - b1) * RTOL * g if key == "exp_avg" else (1 - b2) * 2 * g * RTOL * g
    return {"rtol": tol["rtol"], "atol": max(tol["atol"], slack)}


# ---------------------------------------------------------------- the LightningModule and a real Trainer step


def recorded_cgql():
    keep = {"critic_loss": "critic_out", "noisy_critic_loss": "noisy_out", "bc_loss": "bc_out"}
    make_draw = lambda a, cfg: golden.recorded_draw(golden.recorded_draws(a, cfg), CGQL_UNIFORM)  # noqa: E731
    return golden.recorded_agent_of(CGQL, RECORD, keep, make_draw, agent="cgql")


def test_one_trainer_step_reproduces_the_recorded_update():
    model, maps, batch, a, meta = recorded_cgql()
    cfg = meta["config"]
    count = meta["state_set_by_harness"]["adam_count"]
    target_calls, base_calls = capture_calls(model.target_critic), capture_calls(model.v_base)
    trainer = golden.one_trainer_step(model, maps, batch, a, ONLINE, count)

    # every recorded draw asked for once, in the reference's order
    assert model.draw_calls == ["critic/next_noise", "noisy/t", "noisy/noise", "bc/x0", "bc/t"], model.draw_calls
    # the TD target's a' is the guided ODE of the target actor (v_base), then Q_targ at t = 1
    assert len(base_calls) == cfg["flow_steps"]
    for i, (_, x, _, vel, _) in enumerate(base_calls):
        close(x, a["critic/next_flow_xs"][i, :, 0], f"ODE state x_{i}")
        close(vel, a["critic/next_vels_base"][i, :, 0], f"target actor velocity v_{i}")
    (s_next, a_next, next_qs, _), (_, a_data, t_data, noisy_target, _) = target_calls  # t = 1 by default, then given
    close(s_next, a["critic/next_obs"], "s'", rtol=0, atol=0)
    close(a_next, a["critic/next_actions"], "a'")
    assert t_data == 1.0  # Q(s, a) is the critic at t = 1
    close(next_qs, a["critic/next_qs"], "next qs")
    close(a_data, a["batch/actions"].reshape(a_data.shape[0], -1), "the dataset chunk", rtol=0, atol=0)
    close(noisy_target, a["noisy/target_q"], "Q_targ_j(s, a_data, 1)")
    close(model.critic_out[0], a["critic/critic_loss"], "critic loss")
    close(model.noisy_out.loss, a["noisy/noisy_critic_loss"], "noisy critic loss")
    close(model.bc_out, a["bc/flow_loss"], "BC loss")
    total = model.critic_out[0] + cfg["noisy_coef"] * model.noisy_out.loss + model.bc_out
    close(total, a["loss/total"], "total loss")

    # the reference's optax.adam(lr) over exactly the two online networks
    (opt,) = trainer.optimizers
    assert_reference_adam(opt, cfg, maps, ONLINE)

    # the unclipped update: norm, every parameter and both targets, the Adam moments and count
    assert model.grad_norm.item() == pytest.approx(float(a["grad_global_norm"]), rel=1e-4)
    assert_params_and_adam_match(
        a,
        opt,
        maps,
        tuple(n for n in maps if n not in ONLINE),
        moment_tolerance=lambda leaf, key, _: moment_tolerance(a, leaf, key),
    )


# ---------------------------------------------------------------- the LINEX loss, gradient isolation and acting


def small_cgql(**kwargs) -> CGQL:
    torch.manual_seed(0)
    hp = dict(obs_dim=4, action_dim=6, horizon=2, actor_hidden_dims=(16, 16), critic_hidden_dims=(16, 16),
              num_critics=3, flow_steps=5, inv_temp=10.0, guidance_coef=0.1, noisy_coef=0.1)  # fmt: skip
    return CGQL(**{**hp, **kwargs})


def test_linex_branches_by_hand_and_a_finite_gradient_where_the_exponential_would_overflow():
    q = torch.tensor([[0.0, 1.0, -20.0]], requires_grad=True)
    target = torch.tensor([[0.1, 1.0, 0.0]])  # delta = 1, 0, 200 (inv_temp 10): exp branch, exp branch, linear
    loss, delta = linex_loss(q, target, torch.ones(3), inv_temp=10.0, isd_clip=5.0)
    torch.testing.assert_close(delta, torch.tensor([[1.0, 0.0, 200.0]]))
    expected = (np.exp(1.0) + 0.0 + (np.exp(0.0) + 10.0) + 200.0) / 3
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float32))
    loss.backward()
    # d/dq: exp branch -inv_temp exp(delta) + inv_temp; linear branch -inv_temp (not NaN from exp(200) = inf)
    torch.testing.assert_close(q.grad, torch.tensor([[10 - 10 * np.exp(1.0), 0.0, -10.0]], dtype=torch.float32) / 3)
    # the valid mask zeroes a sample's every member
    masked, _ = linex_loss(q.detach(), target, torch.tensor([1.0, 1.0, 0.0]), 10.0, 5.0)
    torch.testing.assert_close(masked, torch.tensor((np.exp(1.0) + 11.0) / 3, dtype=torch.float32))


def test_the_time_conditioned_critic_is_the_critic_at_t_1_by_default():
    torch.manual_seed(0)
    critic = CriticEnsemble(4, 6, 3, (16, 16), time_input=True)
    s, a = torch.randn(5, 4), torch.randn(5, 6)
    torch.testing.assert_close(critic(s, a), critic(s, a, 1.0), rtol=0, atol=0)
    torch.testing.assert_close(critic(s, a), critic(s, a, torch.ones(5, 1)), rtol=0, atol=0)
    assert not torch.equal(critic(s, a), critic(s, a, 0.0))
    assert critic.hidden[0].weight.shape == (3, 4 + 6 + 1, 16)
    plain = CriticEnsemble(4, 6, 3, (16, 16))  # the other agents' critic keeps its layout and refuses a time
    assert plain.hidden[0].weight.shape == (3, 4 + 6, 16)
    with pytest.raises(ValueError, match="no time input"):
        plain(s, a, 1.0)


@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("time_input", [True, False])
def test_the_critics_written_out_action_gradient_equals_autograds(layer_norm, time_input):
    # guidance_score's CriticEnsemble path (no autograd graph, so torch.export traces the guided sampler) against
    # autograd through the critic's own forward, with weights moved off their initial values
    gen = torch.Generator().manual_seed(int(layer_norm) + 2 * int(time_input))
    critic = CriticEnsemble(5, 6, 3, (32, 32, 32), layer_norm, time_input)
    with torch.no_grad():
        for p in critic.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    s, a = torch.randn(7, 5, generator=gen), torch.randn(7, 6, generator=gen)
    t = 0.3 if time_input else None
    x = a.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(critic(s, x, t).mean(dim=0).sum(), x)
    got = critic.action_gradient(s, a, t)
    assert got.shape == (7, 6) and expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if time_input:
        torch.testing.assert_close(guidance_score(critic, s, a, t), expected, rtol=1e-5, atol=1e-6)


def test_gradient_isolation_of_each_loss_and_of_the_guidance_score():
    """torchrl-style, through the agent's own methods: L_Q and L_linex reach only the critic (a' and the noisy
    target carry no graph), L_BC only v_bc; the guidance score trains nothing, even with gradients enabled."""
    model, batch = small_cgql(), golden.random_batch()
    modules = {"v_bc": model.v_bc, "v_base": model.v_base, "critic": model.critic, "target_critic": model.target_critic}
    assert {n for n, m in model.named_children() if any(True for _ in m.parameters())} == set(modules)

    def reached(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n for n, m in modules.items() if any(p.grad is not None and p.grad.abs().sum() > 0
                                                     for p in m.parameters())}  # fmt: skip

    assert reached(model.critic_loss(batch)[0]) == {"critic"}
    noisy = model.noisy_critic_loss(batch)
    assert not noisy.target.requires_grad
    assert reached(noisy.loss) == {"critic"}
    assert reached(model.bc_loss(batch)) == {"v_bc"}
    # the sampler with gradients enabled: no parameter gets a gradient, and its action carries no graph
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        a = model.guided_actions(batch["observations"], torch.randn(5, 6))
        score = guidance_score(model.critic, batch["observations"], torch.randn(5, 6), 0.5)
    assert not a.requires_grad and not score.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_acting_and_the_td_target_use_the_guided_sampler_of_v_base():
    model, batch = small_cgql(), golden.random_batch()
    s, z = batch["observations"], torch.randn(5, 6)
    with torch.no_grad():  # make the actors and the critic differ, so that each one's role shows
        model.v_base.mlp.out.bias.add_(0.3)
        model.critic.out.bias.add_(torch.linspace(-1, 1, 3)[:, None])
    expected = guided_euler_actions(model.v_base, model.critic, s, z, 5, inv_temp=10.0, guidance_coef=0.1)
    torch.testing.assert_close(model.act(s, z), expected, rtol=0, atol=0)
    torch.testing.assert_close(model.next_actions(s, z), expected, rtol=0, atol=0)
    assert model.policy_net is model.v_base
    # the guidance changes the action (it is not v_base's plain ODE), and step 0 is unguided: a K = 1 sampler is plain
    assert not torch.allclose(expected, sample_actions(model.v_base, s, z, 5))
    torch.testing.assert_close(guided_euler_actions(model.v_base, model.critic, s, z, 1, 10.0, 0.1),
                               sample_actions(model.v_base, s, z, 1), rtol=0, atol=0)  # fmt: skip
    # acting under inference mode (Lightning's evaluation) still differentiates the critic
    with torch.inference_mode():
        torch.testing.assert_close(model.act(s.clone(), z.clone()), expected, rtol=0, atol=0)
    with torch.no_grad():  # changing v_bc does not change the action; the online critic and v_base do
        model.v_bc.mlp.out.bias.add_(1.0)
        torch.testing.assert_close(model.act(s, z), expected, rtol=0, atol=0)
        model.target_critic.out.bias.add_(1.0)  # a constant shift of the target has no action gradient either
        torch.testing.assert_close(model.act(s, z), expected, rtol=0, atol=0)
        model.critic.hidden[0].weight.mul_(1.5)
        assert not torch.equal(model.act(s, z), expected)
    # the polyak targets are the critic's and v_base (of v_bc); no clip by default
    assert model.target_pairs() == [(model.target_critic, model.critic), (model.v_base, model.v_bc)]
    assert model.hparams.grad_clip_norm is None


def test_during_a_bc_warmup_the_bc_flow_acts_and_the_copy_sets_v_base():
    model = small_cgql(bc_warmup_steps=10)
    s, z = torch.randn(3, 4), torch.randn(3, 6)
    assert model.policy_net is model.v_bc
    torch.testing.assert_close(model.act(s, z), sample_actions(model.v_bc, s, z, 5), rtol=0, atol=0)
    with torch.no_grad():
        model.v_bc.mlp.out.bias.add_(0.5)  # v_bc moved during the warm-up
    model.copy_bc_into_policy()  # the end of the warm-up: v_base starts at v_bc, the guided sampler acts
    assert model.policy_net is model.v_base
    for p, q in zip(model.v_base.parameters(), model.v_bc.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    torch.testing.assert_close(model.act(s, z), guided_euler_actions(model.v_base, model.critic, s, z, 5, 10.0, 0.1))


def test_state_and_options():
    model = small_cgql()
    state = model.state_dict()
    assert any(k.startswith("v_base.") for k in state) and any(k.startswith("target_critic.") for k in state)
    assert model.critic.time_input and model.target_critic.time_input
    assert not model.v_base.mlp.out.weight.requires_grad  # a polyak target, not trained by Adam
    with pytest.raises(ValueError, match="analytic_critic"):
        small_cgql(analytic_critic=True)
