"""Spec method.md section 7: the project's rollout, lean adjoint, KL, AM loss and dual descent against exact answers.

Data a ~ N(mu, s^2 I) with its exact base velocity, Q(a) = c.a (or -k/2 |a - a*|^2), temperature lambda.
Tolerances are stated next to each assertion with the reason. Two facts keep them tight:
- The Gaussian-linear rollouts and ODE are affine in the Gaussian draws and verify uses antithetic pairs, so
  every mean it reports carries no Monte Carlo error: what is left is the discretisation error, O(h) for the
  Euler schemes, O(h log K) for the tilted mean (the reference's shifted schedule g_i^2 = 2 (1 - t_i + h) /
  (t_i + h) leaves out a fraction h / (t_i + h) of the control at step i, in all sum_i h^2 / (t_i + h) ~ h ln K).
- Stds are Monte Carlo estimates: relative standard error 1/sqrt(N) (antithetic pairs repeat each squared
  deviation, so N/2 independent ones), and we allow 4 of them.
The full K = 400 / N = 200,000 sweep asserting the issue's 2% requirement is the ``slow`` test at the end.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from trqam_lit.math.adjoint import adjoint_matching_objective
from trqam_lit.math.dual import DualDescent
from trqam_lit.math.flow import euler_ode
from trqam_lit.math.nets import VelocityField
from trqam_lit.math.sde import FlowSDE, rollout
from trqam_lit.tools.verify import (
    exact_lean_adjoint,
    exact_tilt_control,
    gaussian_linear,
    gaussian_quadratic,
    gaussian_velocity,
)

LINEAR_CASES = {
    # (mu, s, c, lam, dim)
    "1d": (0.2, 0.8, 1.5, 2.0, 1),
    "3d-negative-c": (-0.4, 1.5, -0.7, 0.5, 3),
}
K_TIGHT, N_TIGHT = 200, 40_000


def log_bias(s: float, num_steps: int) -> float:
    """Tolerance for the tilted means relative to the shift: s h (ln K + 1).

    The shifted schedule leaves out a fraction h / (t_i + h) of the control at step i, in all
    sum_i h^2 / (t_i + h) ~ h (ln K + 0.58) of the shift, and the base flow carries an early displacement
    to t = 1 with gain d x_1 / d x_t ~ s near t = 0.
    """
    return s * (math.log(num_steps) + 1.0) / num_steps


@pytest.fixture(scope="module", params=list(LINEAR_CASES))
def linear_run(request):
    mu, s, c, lam, dim = LINEAR_CASES[request.param]
    return gaussian_linear(mu=mu, s=s, c=c, lam=lam, num_steps=K_TIGHT, samples=N_TIGHT, seed=0, dim=dim)


# ------------------------------------------------------------------------------ continuous-time identities (float64)
def test_item1_tilted_velocity_is_base_velocity_with_shifted_mean():
    # v_tilt = v_base with mu -> mu + s^2 c / lambda, and v_tilt - v_base = (s^2 c / lambda)(1 - t) / var_t for
    # every x. Exact algebra in float64: 1e-12.
    mu, s, c, lam = 0.3, 1.4, -0.9, 0.7
    gen = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(64, 1, generator=gen, dtype=torch.float64)
    t = torch.rand(64, 1, generator=gen, dtype=torch.float64)
    diff = gaussian_velocity(mu + s**2 * c / lam, s)(None, x, t) - gaussian_velocity(mu, s)(None, x, t)
    assert diff == pytest.approx(exact_tilt_control(c, s, lam, t), abs=1e-12)


def test_item2_exact_lean_adjoint_solves_the_adjoint_ode():
    # d adj/dt = -(d b/dx) adj with b = 2 v_base - x / t, i.e. d/dx b = 2 k(t) - 1/t, and adj(1) = -c.
    # Central differences with step 1e-5 in float64: truncation ~1e-10, rounding ~1e-11; tolerance 1e-7.
    c, s = 1.3, 0.7
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    d = 1e-5
    dadj = (exact_lean_adjoint(c, s, t + d) - exact_lean_adjoint(c, s, t - d)) / (2 * d)
    var_t = (1 - t) ** 2 + (t * s) ** 2
    k = (t * s**2 - (1 - t)) / var_t
    assert dadj == pytest.approx(-(2 * k - 1 / t) * exact_lean_adjoint(c, s, t), abs=1e-7)
    assert float(exact_lean_adjoint(c, s, torch.tensor(1.0))) == pytest.approx(-c, abs=1e-15)


def test_item3_am_optimum_equals_tilt_control_in_continuous_time():
    # -(g(t)^2 / (2 lambda)) adj(t) with the unshifted g^2 = 2 (1 - t) / t: exact algebra, 1e-12.
    c, s, lam = -0.8, 1.9, 3.0
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    g2 = 2 * (1 - t) / t
    assert -(g2 / (2 * lam)) * exact_lean_adjoint(c, s, t) == pytest.approx(exact_tilt_control(c, s, lam, t), abs=1e-12)


@pytest.mark.parametrize("s", [0.3, 1.0, 2.0])
def test_item4_path_kl_integral_equals_terminal_kl(s):
    # integral_0^1 2 |u|^2 / g^2 dt with u = v_tilt - v_base equals |c|^2 s^2 / (2 lambda^2). The integrand
    # (s^2 c / lambda)^2 t (1 - t) / var_t^2 is smooth: trapezoid on 200,001 points, error ~1e-11; tolerance 1e-8.
    c, lam = 1.7, 0.6
    t = torch.linspace(0.0, 1.0, 200_001, dtype=torch.float64)
    integrand = exact_tilt_control(c, s, lam, t) ** 2 * t / (1 - t).clamp_min(1e-300)  # 2 u^2 / g^2
    integrand[-1] = 0.0  # limit t -> 1: u ~ (1 - t), so u^2 t / (1 - t) -> 0
    assert float(torch.trapezoid(integrand, t)) == pytest.approx(c**2 * s**2 / (2 * lam**2), rel=1e-8)


# ------------------------------------------------------------------------ the project's discretised code, K = 200
def exact_discrete_moments(mu: float, s: float, num_steps: int) -> tuple[float, float, float]:
    """Mean, d x_K / d x_0 and std of x_K for the project's base rollout (v_ft = v_base), without sampling.

    x_K is affine in (x_0, eps_0..eps_{K-2}); one batched rollout on the zero draw and the K unit draws gives
    the offset and every coefficient, hence the exact law of the discretised chain.
    """
    v = gaussian_velocity(mu, s)
    b = num_steps + 1
    x0 = torch.zeros(b, 1)
    x0[1] = 1.0
    eps = torch.zeros(num_steps - 1, b, 1)
    eps[torch.arange(num_steps - 1), torch.arange(2, b)] = 1.0
    with torch.no_grad():
        x_k = rollout(FlowSDE(v, v, torch.zeros(b, 1), num_steps), x0, eps)[-1, :, 0].double()
    coef = x_k[1:] - x_k[0]
    return float(x_k[0]), float(coef[0]), float(coef.pow(2).sum().sqrt())


@pytest.mark.parametrize("mu, s", [(0.2, 0.3), (-1.0, 0.3), (0.2, 0.8), (-1.0, 2.0)])
def test_item5_base_sde_ends_at_data_law_whatever_x0(mu, s):
    # The exact law of the discretised chain: first-order Euler, errors measured ~0.3 (|mu| + s) h for the mean
    # and <= 2.8 h (relative) for the std over s in [0.3, 2]; allow 2 (|mu| + s) h and 4 h. Memorylessness:
    # d x_K / d x_0 is 0 in continuous time, measured <= 0.2 h at K = 200; allow h.
    h = 1.0 / K_TIGHT
    mean, dx0, std = exact_discrete_moments(mu, s, K_TIGHT)
    assert abs(mean - mu) <= 2 * (abs(mu) + s) * h
    assert abs(std - s) / s <= 4 * h
    assert abs(dx0) <= h


def test_item5_monte_carlo_terminal_moments(linear_run):
    # Same property from verify's sampled rollout: the mean has no MC error (antithetic, affine), the std
    # 1/sqrt(N) = 0.5% at N = 40k; allow the O(h) bias (4 h = 2%) plus 4 standard errors.
    r, h = linear_run, 1.0 / K_TIGHT
    assert r["base_terminal_mean_rel_err"] <= 2 * (abs(r["mu"]) + r["s"]) / r["s"] * h
    assert r["base_terminal_std_rel_err"] <= 4 * h + 4 / math.sqrt(N_TIGHT)


def test_item2_lean_adjoint_is_deterministic_and_matches(linear_run):
    # The lean adjoint only sees v_base's Jacobian, constant in x here: every sample gets the same adjoint
    # (spread 1e-5 of |c| allows float32 rounding over 200 steps). On the grid it is a first-order scheme
    # (Jacobian one step late); measured error <= 2.1 h |c| over s in [0.3, 2]; allow 3 h |c|.
    r = linear_run
    assert r["adjoint_spread"] <= 1e-5
    assert r["adjoint_rel_err"] <= 3.0 / K_TIGHT
    assert len(r["adjoint"]) == K_TIGHT


def test_item3_discrete_am_optimum(linear_run):
    # The discrete optimum -(g_i^2 / (2 lambda)) adj_i zeroes every AM residual (the adjoint is the same for
    # every sample), so L_AM there is float32 rounding (< 1e-10 of L_AM at v_ft = v_base). Against the
    # continuous v_tilt - v_base its pointwise error is O(h / t_i) (shifted schedule); integrated over the grid
    # it is measured <= 2.6 h ln K of the shift; allow 4 h ln K.
    r = linear_run
    assert r["am_loss_at_optimum"] <= 1e-10 * r["am_loss_at_base"]
    u = torch.tensor(r["control"], dtype=torch.float64)
    u_exact = torch.tensor(r["control_exact"], dtype=torch.float64)
    assert float((u - u_exact).abs().mean()) / abs(r["shift"]) <= 4 * math.log(K_TIGHT) / K_TIGHT


def test_item4_path_kl_estimate(linear_run):
    # The control is x-independent, so the KL estimate is deterministic; first-order in h, measured
    # 2.8 h (s = 0.8) to 6.8 h (s = 0.3); allow 5 h (s >= 0.8 here).
    r = linear_run
    assert r["path_kl_rel_err"] <= 5.0 / K_TIGHT


def test_item1_tilted_samples(linear_run):
    # ODE samples under the AM optimum: mean within log_bias (no MC error), std within 3 h (O(h) bias) plus
    # 4 standard errors. The controlled SDE's own terminal law too (first-order bias measured 3.4 h of the
    # shift at s = 0.8; allow 6 h).
    r, h = linear_run, 1.0 / K_TIGHT
    assert r["tilted_mean_rel_err"] <= log_bias(r["s"], K_TIGHT)
    assert r["tilted_std_rel_err"] <= 3 * h + 4 / math.sqrt(N_TIGHT)
    assert r["tilted_sde_mean_rel_err"] <= 6 * h
    assert r["tilted_sde_std_rel_err"] <= 4 * h + 4 / math.sqrt(N_TIGHT)


def test_errors_shrink_first_order_and_are_large_at_k10():
    # The deterministic errors (no MC error at all) must halve with h (ratio 0.5 +- 0.1), the tilted mean's
    # like h ln K (ratio ~0.6 per halving, allow 0.5-0.75); at K = 10 they are the 3-30% the spec describes,
    # within the same bounds as at K = 200.
    runs = {k: gaussian_linear(mu=0.2, s=0.8, c=1.5, lam=2.0, num_steps=k, samples=2000, seed=0) for k in (10, 50, 100)}
    for key in ["base_terminal_mean_rel_err", "adjoint_rel_err", "path_kl_rel_err"]:
        assert 0.4 <= runs[100][key] / runs[50][key] <= 0.6, key
    assert 0.5 <= runs[100]["tilted_mean_rel_err"] / runs[50]["tilted_mean_rel_err"] <= 0.75
    r10 = runs[10]
    assert 0.1 <= r10["adjoint_rel_err"] <= 3.0 / 10
    assert 0.2 <= r10["path_kl_rel_err"] <= 5.0 / 10
    assert 0.03 <= r10["tilted_mean_rel_err"] <= log_bias(0.8, 10)
    assert r10["base_terminal_std_rel_err"] >= 0.05


# ---------------------------------------------------------------------------------------------- quadratic reward
@pytest.mark.parametrize("dim", [1, 2])
def test_quadratic_reward_fixed_point_reaches_tilted_gaussian(dim):
    # Q(a) = -k/2 |a - a*|^2: the adjoint is state-dependent and the AM regression is solved by fixed-point
    # iteration (converges geometrically, measured 8 iterations to 1e-4 here). The ODE map is affine, so
    # the mean carries no MC error: allow log_bias (measured 1.7% at K = 200). The std: O(h) bias plus 4 SE.
    # The path KL against the Gaussian KL(tilted || base): first-order, allow 5 h.
    K, N = (200, 20_000) if dim == 1 else (100, 10_000)
    r = gaussian_quadratic(mu=0.2, s=0.8, k=2.0, target=0.5, lam=1.0, num_steps=K, samples=N, seed=0, dim=dim)
    assert r["converged"] and r["iterations"] <= 15 and r["fixed_point_change"] < 1e-4
    assert r["tilted_mean_rel_err_basis"] == "shift"
    assert r["tilted_mean_rel_err"] <= log_bias(0.8, K)
    assert r["tilted_std_rel_err"] <= 3 / K + 4 / math.sqrt(N)
    assert r["path_kl_rel_err"] <= 5 / K
    assert max(abs(v) for v in r["control_slope"]) > 0.1  # the optimal control really depends on x


# ------------------------------------------------------------------------------------------------- dual descent
def closed_form_kl(c: float, s: float):
    """KL of the tilt at lambda_eff: |c|^2 s^2 / (2 lambda_eff^2) (spec 7 item 4), the critic being fixed."""
    return lambda lam_eff: torch.as_tensor(c**2 * s**2 / 2) / lam_eff.clamp_min(1e-12) ** 2


@pytest.mark.parametrize("form, steps", [("reference", 20_000), ("paper", 40_000)])
def test_dual_descent_drives_kl_to_budget_and_lambda_settles(form, steps):
    # KL at lambda = 1 is 20x (reference, lambda_eff 3) or 180x (paper, lambda_eff 1) above eps_kl. The
    # dual dynamics relax on a time scale 1 / (eta |dKL/dlambda|) ~ 2.2k (reference) / 6.7k (paper) steps, so
    # after ~9 / 6 of them KL_ema and lambda sit within 1% of the equilibrium KL(lambda*) = eps_kl.
    c, s, eps_kl = 3.0, 2.0, 0.1
    kl = closed_form_kl(c, s)
    dual = DualDescent(eps_kl=eps_kl, form=form)
    assert float(kl(dual.lam_eff)) > 15 * eps_kl
    lams = []
    for _ in range(steps):
        dual.step(kl(dual.lam_eff))
        lams.append(float(dual.lam))
    lam_star = math.sqrt(c**2 * s**2 / (2 * eps_kl)) / dual.lam_scale
    assert float(dual.kl_ema) == pytest.approx(eps_kl, rel=0.01)
    assert lams[-1] == pytest.approx(lam_star, rel=0.01)
    assert abs(lams[-1] - lams[-1000]) <= 2e-3 * lam_star  # settled: drifting by < 0.2% over the last 1000 steps
    assert max(lams) <= 1.02 * lam_star  # approaches from below without a large overshoot


def test_dual_descent_lambda_falls_to_lower_bound_when_kl_is_below_budget():
    # A weak critic (c = 0.05, s = 0.5): even at lambda_min the KL (0.35) stays under eps_kl = 0.5, so lambda
    # falls at ~eta eps_kl per step and sticks at its bound (exactly: the projection).
    kl = closed_form_kl(0.05, 0.5)
    dual = DualDescent(eps_kl=0.5)
    assert float(kl(dual.lam_min * dual.lam_scale * torch.ones(()))) < 0.5
    for _ in range(2000):
        dual.step(kl(dual.lam_eff))
    assert float(dual.lam) == pytest.approx(dual.lam_min)
    # Paper form (lambda >= 0): a KL of the tilt blows up as lambda -> 0, so use a policy whose KL is capped
    # (a fixed critic whose optimum is already inside the budget): lambda falls to exactly 0.
    paper = DualDescent(eps_kl=0.5, form="paper")
    for _ in range(2000):
        paper.step(torch.tensor(0.2))
    assert float(paper.lam) == 0.0
    assert float(paper.kl_ema) == pytest.approx(0.2, rel=1e-4)


# -------------------------------------------------------------------------- a network trained with the AM loss
def test_network_trained_with_am_loss_reaches_tilted_mean():
    # A small residual MLP on top of the exact v_base (zero output layer: starts AT v_base) trained by the
    # project's adjoint_matching_objective (Q linear, no clip, lambda_eff = 3 lambda from DualDescent) for
    # 300 Adam steps. Its ODE mean must reach the discrete AM optimum that verify computes at the same K
    # (training error; allow 3% of the shift, measured < 1%) and so mu + s^2 c / lambda_eff within the
    # discretisation bias at K = 16 (log_bias = 19% bound, measured 5.6%) plus that 3%.
    train_am_network_and_check_tilted_mean()


def train_am_network_and_check_tilted_mean() -> None:
    """The body of the test above, reused by tests/test_matmul_precision.py under reduced-precision matmuls."""
    torch.manual_seed(0)
    mu, s, c, K, B = 0.2, 0.8, 1.5, 16, 128
    lam_eff = float(DualDescent().lam_eff)
    v_base = gaussian_velocity(mu, s)
    residual = VelocityField(obs_dim=1, action_dim=1, hidden_dims=(64, 64))
    nn.init.zeros_(residual.mlp.out.weight)

    def v_ft(obs, x, t):
        return v_base(obs, x, t) + residual(obs, x, t)

    def q_fn(obs, a):
        return c * a.sum(dim=-1)

    opt = torch.optim.Adam(residual.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        x0, eps = torch.randn(B, 1, generator=gen), torch.randn(K - 1, B, 1, generator=gen)
        out = adjoint_matching_objective(
            v_ft, v_base, q_fn, torch.zeros(B, 1), x0, eps, K, horizon=1, lam_eff=lam_eff, clip_action=False
        )
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    with torch.no_grad():
        x0 = torch.randn(20_000, 1, generator=gen)
        x0 = torch.cat([x0, -x0])  # antithetic: the mean's MC error vanishes to first order in the residual's curvature
        mean = float(euler_ode(v_ft, torch.zeros(len(x0), 1), x0, K).mean())
    shift = s**2 * c / lam_eff
    discrete = gaussian_linear(mu=mu, s=s, c=c, lam=lam_eff, num_steps=K, samples=2000, seed=0)
    assert abs(mean - discrete["tilted_mean"]) <= 0.03 * shift
    assert abs(mean - (mu + shift)) <= (log_bias(s, K) + 0.03) * shift


# ------------------------------------------------------------------------------------------ full sweep (slow)
SWEEP = [
    (mu, s, c, lam) for s in (0.3, 0.8, 1.5, 1.7, 2.0) for lam in (0.3, 5.0) for mu, c in ((0.2, 1.5), (-0.5, -0.4))
]
SWEEP_KEYS = [
    "base_terminal_mean_rel_err",
    "base_terminal_std_rel_err",
    "adjoint_rel_err",
    "path_kl_rel_err",
    "tilted_mean_rel_err",
    "tilted_std_rel_err",
]


def sweep_bound(key: str, s: float) -> float:
    """The issue's 2%, except the tilted mean for s > 1.6 (see test_verify_sweep_meets_two_percent_at_k400)."""
    return 0.03 if (key == "tilted_mean_rel_err" and s > 1.6) else 0.02


@pytest.mark.slow
def test_verify_sweep_meets_two_percent_at_k400():
    # The requirement: at K = 400, N = 200,000 every quantity within 2% (means relative to the shift,
    # terminal mean / std relative to s, adjoint relative to |c|, KL relative) over s in [0.3, 2], lambda in
    # [0.3, 5]. Means carry no MC error (antithetic, affine), stds 1/sqrt(N) = 0.22%.
    # Known exception, also in spec 7 ("up to 5% at the corner s = 2"): the tilted mean's deterministic bias
    # from the reference's shifted schedule grows like s h ln K, independent of mu, c and lambda: 2.02% at
    # s = 1.7 and 2.36% at s = 2 (0.2% with the unshifted g). It is held to 3% for s > 1.6 here, and the 2%
    # claim at s = 2 is a strict xfail below so a change in either direction is noticed.
    worst = dict.fromkeys(SWEEP_KEYS, 0.0)
    failures = []
    for mu, s, c, lam in SWEEP:
        r = gaussian_linear(mu=mu, s=s, c=c, lam=lam, num_steps=400, samples=200_000, seed=0)
        for key in SWEEP_KEYS:
            worst[key] = max(worst[key], r[key])
            if r[key] > sweep_bound(key, s):
                failures.append((key, mu, s, c, lam, r[key]))
    print("worst relative errors over the sweep:", worst)
    assert not failures, failures


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="reference discretisation: tilted-mean bias ~ s h ln K, 2.4% at s = 2, K = 400")
def test_verify_tilted_mean_two_percent_at_s2():
    r = gaussian_linear(mu=0.2, s=2.0, c=1.5, lam=5.0, num_steps=400, samples=2000, seed=0)
    assert r["tilted_mean_rel_err"] <= 0.02
