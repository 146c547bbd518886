"""Unit tests of the math core: networks, schedule, solvers, adjoints, losses, gradient isolation, dual step."""

from __future__ import annotations

import math

import pytest
import torch

from trqam_lit.math.adjoint import (
    adjoint_matching_loss,
    adjoint_matching_objective,
    adjoint_matching_terms,
    lean_adjoint,
    terminal_adjoint,
)
from trqam_lit.math.critic import critic_loss, ensemble_pessimistic_value, td_target
from trqam_lit.math.dual import DualDescent, dual_step
from trqam_lit.math.flow import bc_flow_loss, euler_ode, sample_actions
from trqam_lit.math.nets import CriticEnsemble, VelocityField
from trqam_lit.math.sde import (
    FlowSDE,
    flow_time_grid,
    memoryless_drift,
    memoryless_g,
    path_kl_terms,
    rollout_fused,
    rollout_fused_with_ode,
    rollout_torchsde,
)

OBS, ACT, B, K = 4, 6, 5, 10


@pytest.fixture
def nets():
    torch.manual_seed(0)
    v_ft = VelocityField(OBS, ACT, (16, 16))
    v_base = VelocityField(OBS, ACT, (16, 16))
    v_bc = VelocityField(OBS, ACT, (16, 16))
    critic = CriticEnsemble(OBS, ACT, num_members=3, hidden_dims=(16, 16))
    return v_ft, v_base, v_bc, critic


def test_schedule_endpoints_match_the_spec():
    g = memoryless_g(flow_time_grid(10), 0.1)
    assert g[0].item() == pytest.approx(math.sqrt(22), rel=1e-6)
    assert g[9].item() == pytest.approx(math.sqrt(0.4), rel=1e-6)
    assert memoryless_g(0.5, 0.1) == pytest.approx(math.sqrt(2 * 0.6 / 0.6))


def test_mlp_init_is_xavier_uniform_with_zero_bias_and_layer_norm_eps():
    net = VelocityField(10, 6, (32, 32, 32, 32), layer_norm=True)
    lin = net.mlp.hidden[1]
    bound = math.sqrt(6 / (32 + 32))
    assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.8 * bound
    assert torch.count_nonzero(lin.bias) == 0
    assert all(ln.eps == 1e-6 for ln in net.mlp.norms)


def test_critic_ensemble_equals_a_loop_over_members(nets):
    *_, critic = nets
    s, a = torch.randn(B, OBS), torch.randn(B, ACT)
    q = critic(s, a)
    assert q.shape == (3, B)
    for j in range(3):
        x = torch.cat([s, a], -1)
        for i, lin in enumerate(critic.hidden):
            x = torch.nn.functional.gelu(x @ lin.weight[j] + lin.bias[j], approximate="tanh")
            ln = critic.norms[i]
            x = torch.nn.functional.layer_norm(x, x.shape[-1:], ln.weight[j], ln.bias[j], eps=1e-6)
        ref = (x @ critic.out.weight[j] + critic.out.bias[j]).squeeze(-1)
        torch.testing.assert_close(q[j], ref, rtol=1e-5, atol=1e-6)


def test_ensemble_std_is_population_std():
    q = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    torch.testing.assert_close(ensemble_pessimistic_value(q, 0.5), torch.tensor([2.0 - 0.5, 2.0]))


def test_td_target_and_masked_critic_loss():
    y = td_target(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]), torch.tensor([10.0, 10.0]), 0.9, 2)
    torch.testing.assert_close(y, torch.tensor([1.0 + 0.81 * 10, 2.0]))
    q = torch.tensor([[2.0, 3.0], [4.0, 5.0]])
    loss = critic_loss(q, torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx((1 + 9) / 4)


def test_euler_ode_integrates_a_constant_field_exactly(nets):
    s = torch.zeros(B, OBS)
    x0 = torch.randn(B, ACT)
    out = euler_ode(lambda s, x, t: torch.ones_like(x) * 0.3, s, x0, 7)
    torch.testing.assert_close(out, x0 + 0.3)
    assert sample_actions(lambda s, x, t: torch.ones_like(x) * 5.0, s, x0, 7).abs().max() <= 1.0


def test_bc_loss_is_zero_for_the_exact_target_field():
    a = torch.randn(B, ACT)
    x0, t = torch.randn(B, ACT), torch.rand(B, 1)

    def perfect(s, x, tt):  # knows a and x0: v = a - x0
        return a - x0

    assert bc_flow_loss(perfect, torch.zeros(B, OBS), a, x0, t, torch.ones(B)).item() == pytest.approx(0.0)
    bad = bc_flow_loss(lambda s, x, tt: torch.zeros_like(x), torch.zeros(B, OBS), a, x0, t, torch.ones(B))
    torch.testing.assert_close(bad, (a - x0).pow(2).mean())


def test_fused_and_torchsde_rollouts_give_identical_states_and_kl(nets):
    v_ft, v_base, *_ = nets
    s, x0, eps = torch.randn(B, OBS), torch.randn(B, ACT), torch.randn(K - 1, B, ACT)
    sde = FlowSDE(v_ft, v_base, s, K)
    with torch.no_grad():
        fused = rollout_fused(sde, x0, eps)
        tsde, log_ratio = rollout_torchsde(sde, x0, eps, logqp=True)
    assert fused.shape == (K + 1, B, ACT)
    # Same operations in the same order; torchsde's dt = t1 - t0 can differ from h by one float32 ulp.
    torch.testing.assert_close(tsde, fused, rtol=1e-6, atol=1e-6)
    # torchsde's logqp on the K-1 stochastic steps equals the first K-1 path-KL terms.
    t = flow_time_grid(K)
    with torch.no_grad():
        vf = v_ft(s, fused[:K], t.reshape(K, 1, 1))
        vb = v_base(s, fused[:K], t.reshape(K, 1, 1))
    terms = path_kl_terms(vf, vb, memoryless_g(t, 1 / K), 1 / K)
    torch.testing.assert_close(log_ratio, terms[: K - 1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rows", [B, 64])
def test_the_shared_rollout_gives_the_rollout_and_the_next_action_ode(nets, rows):
    """One v_ft call on both row sets per shared flow time: the same states and ODE end point as the two loops."""
    v_ft, v_base, *_ = nets
    s, s_next, x0, y0 = torch.randn(rows, OBS), torch.randn(rows, OBS), torch.randn(rows, ACT), torch.randn(rows, ACT)
    eps = torch.randn(K - 1, rows, ACT)
    sde = FlowSDE(v_ft, v_base, s, K)
    with torch.no_grad():
        xs, y = rollout_fused_with_ode(sde, x0, eps, s_next, y0)
        torch.testing.assert_close(xs, rollout_fused(sde, x0, eps), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(y, euler_ode(v_ft, s_next, y0, K), rtol=1e-6, atol=1e-6)
        # the states do not depend on the ODE's rows, nor the end point on the SDE's
        xs_other, y_other = rollout_fused_with_ode(sde, x0, eps, torch.randn(rows, OBS), torch.randn(rows, ACT))
        torch.testing.assert_close(xs_other, xs, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(y_other, y)


def test_rollout_last_step_is_the_noiseless_base_ode_step(nets):
    v_ft, v_base, *_ = nets
    s, x0 = torch.randn(B, OBS), torch.randn(B, ACT)
    eps_a, eps_b = torch.randn(K, B, ACT), torch.randn(K, B, ACT)
    eps_b[: K - 1] = eps_a[: K - 1]  # only the unused K-th draw differs
    sde = FlowSDE(v_ft, v_base, s, K)
    with torch.no_grad():
        xa, xb = rollout_fused(sde, x0, eps_a), rollout_fused(sde, x0, eps_b)
        last = xa[K - 1] + (1 / K) * v_base(s, xa[K - 1], (K - 1) / K)
    torch.testing.assert_close(xa, xb)
    torch.testing.assert_close(xa[K], last)


def test_lean_adjoint_equals_autograd_through_the_shifted_base_chain(nets):
    """adj_i = (dx_K/dx_i)^T adj_K for x_{j+1} = x_j + h f_j(x_j), f_j = 2 v_base(t_j + h) - x / (t_j + h)."""
    _, v_base, _, critic = nets
    s = torch.randn(B, OBS)
    h = 1 / K
    x = torch.randn(B, ACT).requires_grad_(True)
    chain = [x]
    for j in range(K):
        tj = j * h + h
        x = x + h * memoryless_drift(v_base(s, x, tj), x, tj)
        chain.append(x)
    q = critic(s, chain[-1].clamp(-1, 1)).mean(0).sum()
    grads = torch.autograd.grad(q, chain[:K])
    xs = torch.stack([c.detach() for c in chain])
    adjs = lean_adjoint(v_base, s, xs, terminal_adjoint(critic, s, xs[-1]))
    # Both are float32 products of the same K Jacobians, in a different association order.
    for i in range(K):
        torch.testing.assert_close(adjs[i], -grads[i], rtol=1e-4, atol=1e-6)


def test_gradient_isolation_of_each_loss(nets):
    """torchrl-style: each loss alone reaches exactly its own network's parameters."""
    v_ft, v_base, v_bc, critic = nets
    target_critic = CriticEnsemble(OBS, ACT, num_members=3, hidden_dims=(16, 16))
    s, a = torch.randn(B, OBS), torch.rand(B, ACT) * 2 - 1
    modules = {"v_ft": v_ft, "v_base": v_base, "v_bc": v_bc, "critic": critic, "target_critic": target_critic}

    def reached(loss):
        for m in modules.values():
            m.zero_grad(set_to_none=True)
        loss.backward()
        return {
            n for n, m in modules.items() if any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
        }

    am = adjoint_matching_objective(
        v_ft, v_base, target_critic, s, torch.randn(B, ACT), torch.randn(K, B, ACT), K, horizon=2, lam_eff=3.0
    )
    assert reached(am.loss) == {"v_ft"}
    assert reached(bc_flow_loss(v_bc, s, a, torch.randn(B, ACT), torch.rand(B, 1), torch.ones(B))) == {"v_bc"}
    with torch.no_grad():
        next_a = sample_actions(v_ft, s, torch.randn(B, ACT), K)
        y = td_target(torch.ones(B), torch.ones(B), ensemble_pessimistic_value(target_critic(s, next_a), 0.5), 0.99, 2)
    assert reached(critic_loss(critic(s, a), y, torch.ones(B))) == {"critic"}


def test_am_loss_vanishes_at_its_minimiser(nets):
    """v_ft = v_base - (sigma_i^2 / 2) adj_i zeroes every residual; any other field does not."""
    _, v_base, _, critic = nets
    s, x0, eps = torch.randn(B, OBS), torch.randn(B, ACT), torch.randn(K, B, ACT)
    out = adjoint_matching_objective(v_base, v_base, critic, s, x0, eps, K, 1, lam_eff=1.7)
    assert out.path_kl.item() == 0.0  # v_ft = v_base: no KL
    sig = out.sigmas.reshape(K, 1, 1)
    torch.testing.assert_close(out.sigmas, memoryless_g(flow_time_grid(K), 1 / K) / math.sqrt(1.7))
    optimum = out.v_base - sig**2 / 2 * out.adjs
    zero = adjoint_matching_terms(optimum, out.v_base, out.adjs, out.sigmas)
    assert zero.shape == (K, B) and zero.abs().max() < 1e-8
    off = adjoint_matching_terms(optimum + 0.1, out.v_base, out.adjs, out.sigmas)
    torch.testing.assert_close(off, (0.2 / sig[:, :, 0]) ** 2 * ACT * torch.ones(K, B))
    assert adjoint_matching_loss(optimum + 0.1, out.v_base, out.adjs, out.sigmas).item() == pytest.approx(
        off.sum(0).mean().item()
    )


def test_objective_stays_fp32_under_bf16_autocast(nets):
    v_ft, v_base, _, critic = nets
    s, x0, eps = torch.randn(B, OBS), torch.randn(B, ACT), torch.randn(K, B, ACT)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adjoint_matching_objective(v_ft, v_base, critic, s, x0, eps, K, 1, lam_eff=3.0)
    for name in ("loss", "path_kl", "xs", "adjs", "adj_final"):
        value = getattr(out, name)
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value).all(), name
    ref = adjoint_matching_objective(v_ft, v_base, critic, s, x0, eps, K, 1, lam_eff=3.0)
    torch.testing.assert_close(out.xs, ref.xs, rtol=0.1, atol=0.1)  # bf16 networks, fp32 arithmetic


def test_dual_step_reference_form_clips_kl_and_lambda():
    lam, ema = dual_step(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(10.0), eps_kl=1.0)
    assert ema.item() == pytest.approx(0.2)  # KL clipped to 2 eps_kl, rho 0.1
    assert lam.item() == pytest.approx(1.0 + 0.01 * (0.2 - 1.0))
    lam, _ = dual_step(torch.tensor(0.011), torch.tensor(0.0), torch.tensor(0.0), eps_kl=1.0)
    assert lam.item() == pytest.approx(0.01)
    lam, _ = dual_step(torch.tensor(99.999), torch.tensor(5.0), torch.tensor(2.0), eps_kl=1.0)
    assert lam.item() == pytest.approx(100.0)


def test_dual_descent_module_forms_and_state():
    ref = DualDescent(eps_kl=0.5)
    assert ref.lam.item() == 1.0 and ref.kl_ema.item() == 0.0 and ref.lam_eff.item() == pytest.approx(3.0)
    clipped = ref.step(torch.tensor(10.0))
    assert clipped.item() == pytest.approx(1.0)  # what the callback logs as dual/kl_clipped: 2 * 0.5
    assert ref.kl_ema.item() == pytest.approx(0.1)  # clipped at 2 * 0.5
    assert ref.step(torch.tensor(0.3)).item() == pytest.approx(0.3)  # below the clip: passed through
    paper = DualDescent(eps_kl=0.5, form="paper")
    paper.step(torch.tensor(10.0))
    assert paper.kl_ema.item() == pytest.approx(1.0)  # no clip
    assert paper.lam_eff.item() == pytest.approx(paper.lam.item())  # lam_scale 1
    low = DualDescent(eps_kl=5.0, form="paper", lam_init=0.01)
    low.step(torch.tensor(0.0))
    assert low.lam.item() == 0.0  # projected at 0
    assert set(dict(ref.named_buffers())) == {"lam", "kl_ema"}
    with pytest.raises(ValueError, match="dual form"):
        DualDescent(form="nope")


def test_the_trqam_agent_defaults_are_the_reference_dual_step():
    """An agent built without dual arguments runs spec method.md section 4's step: KL clipped at 2 eps, averaged
    with rho 0.1 from 0, eta 0.01, lambda in [0.01, 100] from 1, lambda_eff = 3 lambda."""
    from trqam_lit.agents import TRQAM

    dual = TRQAM(obs_dim=OBS, action_dim=ACT, horizon=1, actor_hidden_dims=(8,), critic_hidden_dims=(8,)).dual
    assert (dual.form, dual.eps_kl, dual.eta, dual.rho, dual.kl_clip) == ("reference", 1.0, 0.01, 0.1, 2.0)
    assert (dual.lam.item(), dual.kl_ema.item(), dual.lam_eff.item()) == (1.0, 0.0, pytest.approx(3.0))
    # the projection bounds: one step from just inside each (KL_ema at its clip 2, or at 0) stops at 100 / 0.01
    dual.lam.fill_(99.999), dual.kl_ema.fill_(2.0)
    dual.step(torch.tensor(1e3))  # KL_ema stays 2: lambda + 0.01 * (2 - 1) = 100.009
    assert dual.lam.item() == pytest.approx(100.0, abs=1e-4)
    dual.lam.fill_(0.015), dual.kl_ema.fill_(0.0)
    dual.step(torch.tensor(0.0))  # lambda - 0.01 = 0.005
    assert dual.lam.item() == pytest.approx(0.01)
