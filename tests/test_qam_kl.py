"""QAM-KL (agents/qam_kl.py; docs/method.md, "Loss-level KL penalty: QAM-KL"): no official record exists (the paper's
form is not public), so the loss is checked against the written formula and its autograd gradient, the dual step
against hand-computed values, and the penalty with the dual against a problem whose multiplier is known."""

from __future__ import annotations

import math

import pytest
import torch

from golden import random_batch
from helpers import one_torch_thread  # noqa: F401  (autouse)
from trqam_lit.agents import QAM, QAMKL
from trqam_lit.agents.qam_kl import kl_penalty
from trqam_lit.math.dual import DualDescent

SMALL = dict(obs_dim=4, action_dim=6, horizon=2, actor_hidden_dims=[16, 16], critic_hidden_dims=[16, 16], num_critics=2)


def written_penalty(v_ft, v_base, s, xs, K: int, H: int) -> torch.Tensor:
    """D_hat = mean_b sum_i (2h / g_i^2) |v_ft(s, x_i, t_i) - v_base(s, x_i, t_i)|^2 / H, t_i = i h,
    g_i = sqrt(2 (1 - t_i + h) / (t_i + h)), written out step by step."""
    h = 1.0 / K
    total = 0.0
    for i in range(K):
        t = torch.full((1, 1), i * h)
        g2 = 2.0 * (1.0 - i * h + h) / (i * h + h)
        diff = v_ft(s, xs[i], t.expand(s.shape[0], 1)) - v_base(s, xs[i], t.expand(s.shape[0], 1)).detach()
        total = total + (2.0 * h / g2) * diff.pow(2).sum(dim=-1)
    return total.mean() / H


def pair(lam: float = 0.7) -> tuple[QAMKL, QAM]:
    """A QAM-KL agent with v_ft moved off the prior, and a QAM agent with the same weights (and so the same draws)."""
    torch.manual_seed(0)
    agent = QAMKL(**SMALL, lam_init=lam, inv_temp=3.0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in agent.v_ft.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    qam = QAM(**SMALL, inv_temp=3.0)
    missing, unexpected = qam.load_state_dict(agent.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"dual.lam", "dual.kl_ema"}
    return agent, qam


def test_the_loss_is_qams_plus_lambda_times_the_written_penalty_and_so_is_its_gradient():
    agent, qam = pair(lam=0.7)
    batch = random_batch(obs=4, act=6)
    seen = {}
    original = qam.actor_objective

    def keep_states(*args, **kwargs):
        seen["am"] = out = original(*args, **kwargs)
        return out

    qam.actor_objective = keep_states
    loss_kl, info = agent.fine_tune_loss(batch)
    loss_qam, info_qam = qam.fine_tune_loss(batch)
    xs = seen["am"].xs
    K, H = agent.flow_steps, SMALL["horizon"]
    s = batch["observations"]
    written = written_penalty(agent.v_ft, agent.v_base, s, xs, K, H)
    assert float(written.detach()) > 1e-3  # v_ft is off the prior: a penalty to test
    torch.testing.assert_close(loss_kl, loss_qam + 0.7 * written, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(info["actor/kl_penalty"], written, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(info["kl"], written.detach(), rtol=1e-5, atol=1e-7)  # the dual's measured KL
    assert info["actor/am_loss"] == info_qam["actor/am_loss"]  # the AM loss itself is QAM's

    nets = {"v_ft": agent.v_ft, "v_bc": agent.v_bc, "critic": agent.critic}
    grads = {k: torch.autograd.grad(loss_kl, list(n.parameters()), retain_graph=True) for k, n in nets.items()}
    qam_nets = {"v_ft": qam.v_ft, "v_bc": qam.v_bc, "critic": qam.critic}
    qam_grads = {k: torch.autograd.grad(loss_qam, list(n.parameters()), retain_graph=True) for k, n in qam_nets.items()}
    penalty_grads = torch.autograd.grad(0.7 * written, list(agent.v_ft.parameters()))
    for g, gq, gp in zip(grads["v_ft"], qam_grads["v_ft"], penalty_grads, strict=True):
        torch.testing.assert_close(g - gq, gp, rtol=1e-4, atol=1e-6)
    for name in ("v_bc", "critic"):  # the penalty moves v_ft only
        for g, gq in zip(grads[name], qam_grads[name], strict=True):
            torch.testing.assert_close(g, gq, rtol=1e-5, atol=1e-7)


def test_kl_penalty_gradient_is_the_closed_form():
    # dD/dv_ft = (4h / (g_i^2 B H)) (v_ft - v_base) at each of the K x B points; v_base gets none.
    K, B, A, H = 4, 3, 2, 2
    gen = torch.Generator().manual_seed(0)
    vf = torch.randn(K, B, A, generator=gen, requires_grad=True)
    vb = torch.randn(K, B, A, generator=gen)
    (grad,) = torch.autograd.grad(kl_penalty(vf, vb, K, H), vf)
    h = 1.0 / K
    g2 = torch.tensor([2.0 * (1 - i * h + h) / (i * h + h) for i in range(K)]).reshape(K, 1, 1)
    torch.testing.assert_close(grad, 4 * h / (g2 * B * H) * (vf - vb).detach(), rtol=1e-6, atol=1e-7)


def test_the_dual_step_is_trqams_reference_form_projected_on_zero():
    agent = QAMKL(**SMALL)  # eps 1, eta 0.01, lambda 1
    out = agent.after_update(torch.tensor(3.0))
    # KL_c = min(3, 2 eps) = 2; KL_ema = 0.9 * 0 + 0.1 * 2 = 0.2; lambda = 1 + 0.01 (0.2 - 1) = 0.992
    assert float(out["dual/kl_clipped"]) == pytest.approx(2.0)
    assert float(agent.dual.kl_ema) == pytest.approx(0.2) and float(agent.dual.lam) == pytest.approx(0.992)
    low = QAMKL(**SMALL, lam_init=0.001)
    low.after_update(torch.tensor(0.0))
    assert float(low.dual.lam) == 0.0  # a penalty weight may vanish (TRQAM's lambda stops at 0.01)
    fixed = QAMKL(**SMALL, dual_update=False, lam_init=0.5)
    assert "dual/kl_clipped" not in fixed.after_update(torch.tensor(3.0)) and float(fixed.dual.lam) == 0.5


def test_penalty_and_dual_reach_the_known_multiplier():
    # min_u k (u - u*)^2 + lambda D(u), D(u) = c u^2 with c = 2h / (g_0^2 H) (K = 1: h = 1, g_0 = 2, H = 1: c = 0.5).
    # u(lambda) = k u* / (k + lambda c); the budget D(u) = eps binds at lambda* = k (|u*| sqrt(c / eps) - 1) / c.
    k, u_star, eps, c = 1.0, 2.0, 1.0, 0.5
    lam_star = k * (u_star * math.sqrt(c / eps) - 1.0) / c  # 0.828
    dual = DualDescent(eps, eta=0.02, lam_init=0.0, lam_min=0.0, lam_max=100.0, lam_scale=1.0)
    u = torch.zeros(1, 1, 1, requires_grad=True)
    opt = torch.optim.SGD([u], lr=0.2)
    base = torch.zeros(1, 1, 1)
    for _ in range(3000):
        for _ in range(5):  # the primal step(s) between dual steps, as fine-tuning steps between dual steps
            opt.zero_grad()
            penalty = kl_penalty(u, base, num_steps=1, horizon=1)
            (k * (u - u_star).pow(2).sum() + dual.lam * penalty).backward()
            opt.step()
        dual.step(kl_penalty(u, base, num_steps=1, horizon=1).detach())
    assert float(dual.lam) == pytest.approx(lam_star, rel=0.02)
    assert float(kl_penalty(u, base, 1, 1)) == pytest.approx(eps, rel=0.02)


def test_the_compiled_step_equals_the_eager_step():
    """``compile_step``: the penalty, set on the agent inside the compiled graph, and its gradient are the eager step's
    (the paired cube-single grid runs QAM-KL compiled)."""
    batch = random_batch(obs=4, act=6)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        agent = QAMKL(**SMALL, lam_init=0.7, inv_temp=3.0, compile_step=compiled)
        agent.copy_bc_into_policy()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in agent.v_ft.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        torch.manual_seed(3)
        loss, info = agent.fine_tune_loss(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in agent.named_parameters() if p.grad is not None}
        results.append((loss, info["actor/kl_penalty"], grads))
    (loss, penalty, grads), (c_loss, c_penalty, c_grads) = results
    assert float(penalty) > 1e-3
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_penalty, penalty, rtol=1e-5, atol=1e-7)
    assert grads.keys() == c_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(c_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
