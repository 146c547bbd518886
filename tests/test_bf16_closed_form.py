"""Spec method.md section 7 (Gaussian base, Q(a) = c.a) with the velocity NETWORK under bf16 autocast.

The networks may run in bf16 (``--trainer.precision=bf16-mixed``); the SDE states, the lean adjoint, the drift and
the KL terms must stay float32 (spec section 3). Here the exact base velocity of N(mu, s^2 I) is an ``nn.Module``
of ``nn.Linear`` layers (one per grid time, weight k(t_j) I, bias mu (1 - t_j k(t_j))), so under
``torch.autocast("cpu", dtype=torch.bfloat16)`` its input, weights, bias and output are rounded to bf16 exactly as
a real network's output layer is. ``verify.gaussian_linear`` (the project's own rollout, terminal and lean
adjoint, AM objective, path-KL estimate and Euler ODE; see tests/test_closed_forms.py) is run with this network as
v_base, once under autocast and once in float32, at K = 200 with antithetic draws.

Tolerance. bf16 keeps 8 significant bits (about 3 significant decimal digits): unit roundoff u = 2^-9 = 0.2%.
Every velocity evaluation carries a relative error of a few u, but the states and adjoints accumulate the
h-sized increments in float32, and the roundings of different numbers have no common sign, so they average out
over the K steps and N samples: bf16 moves each closed-form quantity by less than u (measured <= 1.4e-3 of its
scale for the lean adjoint, <= 7e-4 for the path KL, < 3e-4 for the rest). We allow BF16_TOL = 2u = 2^-8 = 0.39%
on top of the float32 bounds of tests/test_closed_forms.py, and the same 2^-8 between the bf16 and the float32 run.

What it catches (mutations of src/ tried in a scratch copy): the Euler ODE state kept in bf16 moves the tilted
mean by 8-9% of the shift (an increment h v ~ 0.005 v is below half a bf16 ulp of a state of size ~1, 2^-8, and
is rounded away); the lean adjoint accumulated in bf16 moves it by 3-4% of |c| and the path KL by 4-5%. SDE states
rounded to bf16 leave the moments alone (the Brownian increments dither the rounding, which then has no bias, and
the memoryless SDE forgets it), so a pathwise comparison of one rollout catches that (1-1.5% of max |x| against
u = 0.2% allowed, 0.02% measured; a drift rounded to bf16 gives 0.25-0.3%, caught narrowly). Deleting the
``.float()`` calls in sde.py / adjoint.py alone changes no number: CPU autocast lowers only matmul-class ops, and
a bf16 network output combined with a float32 state promotes to float32; the explicit upcast of the objective's
stored network outputs is checked by dtype.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import trqam_lit.tools.verify as verify
from helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from trqam_lit.math.adjoint import adjoint_matching_objective
from trqam_lit.tools.verify import gaussian_linear, gaussian_velocity

K, N = 200, 6000  # N: one chunk of verify at dim 3 (its CHUNK_ELEMENTS / (K dim) = 6666 samples)
CASES = {
    # (mu, s, c, lam, dim), as in tests/test_closed_forms.py
    "1d": (0.2, 0.8, 1.5, 2.0, 1),
    "3d-negative-c": (-0.4, 1.5, -0.7, 0.5, 3),
}
BF16_TOL = 2.0**-8  # two bf16 unit roundoffs (2^-9 each): "about 3 significant digits"
KEYS = [
    "base_terminal_mean_rel_err",
    "base_terminal_std_rel_err",
    "adjoint_rel_err",
    "path_kl_rel_err",
    "tilted_mean_rel_err",
    "tilted_std_rel_err",
    "tilted_sde_mean_rel_err",
    "tilted_sde_std_rel_err",
]


class GridLinearVelocity(nn.Module):
    """The exact base velocity of N(mu, s^2 I) on the flow grid t_j = j / K, j = 0..K, as nn.Linear layers.

    v(x, t_j) = k(t_j) x + mu (1 - t_j k(t_j)) is affine in x: layer j holds that weight and bias (coefficients
    computed in float64). Times are snapped to the grid index round(t K); every caller in the project evaluates
    the field on the grid (t_j, or t_j + h = t_{j+1} in the lean adjoint). ``t`` is a float, a 0-dim tensor, or
    (K', 1, 1) with one time per leading slice (the AM objective's batched call over the K x B stored points).
    """

    def __init__(self, mu: float, s: float, num_steps: int, dim: int) -> None:
        super().__init__()
        self.num_steps = num_steps
        t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        k = (t * s**2 - (1.0 - t)) / ((1.0 - t) ** 2 + (t * s) ** 2)
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_steps + 1))
        with torch.no_grad():
            for j, lin in enumerate(self.layers):
                lin.weight.copy_(float(k[j]) * torch.eye(dim))
                lin.bias.fill_(float(mu * (1.0 - t[j] * k[j])))
        self.requires_grad_(False)  # v_base is frozen; gradients still flow to the input x (lean adjoint)

    def forward(self, obs: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
        if torch.is_tensor(t) and t.dim() > 0:
            idx = torch.round(t.detach().double() * self.num_steps).long().reshape(-1).tolist()
            assert len(idx) == x.shape[0], "one time per leading slice"
            return torch.stack([self.layers[j](x[n]) for n, j in enumerate(idx)])
        return self.layers[round(float(t) * self.num_steps)](x)


def log_bias(s: float, num_steps: int) -> float:
    """The float32 bound of the tilted mean relative to the shift (tests/test_closed_forms.py): s h (ln K + 1)."""
    return s * (math.log(num_steps) + 1.0) / num_steps


def fp32_bounds(r: dict) -> dict[str, float]:
    """The float32 tolerances of tests/test_closed_forms.py at K = 200 (discretisation + 4 Monte Carlo SEs)."""
    h, se = 1.0 / K, 4.0 / math.sqrt(N)
    return {
        "base_terminal_mean_rel_err": 2 * (abs(r["mu"]) + r["s"]) / r["s"] * h,
        "base_terminal_std_rel_err": 4 * h + se,
        "adjoint_rel_err": 3 * h,
        "path_kl_rel_err": 5 * h,
        "tilted_mean_rel_err": log_bias(r["s"], K),
        "tilted_std_rel_err": 3 * h + se,
        "tilted_sde_mean_rel_err": 6 * h,
        "tilted_sde_std_rel_err": 4 * h + se,
    }


@pytest.fixture(scope="module", params=list(CASES))
def runs(request) -> tuple[dict, dict]:
    """verify.gaussian_linear with the Linear-layer v_base: (under bf16 autocast, in float32), same seed."""
    mu, s, c, lam, dim = CASES[request.param]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(verify, "gaussian_velocity", lambda mu_, s_: GridLinearVelocity(mu_, s_, K, dim))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = gaussian_linear(mu=mu, s=s, c=c, lam=lam, num_steps=K, samples=N, seed=0, dim=dim)
        fp32 = gaussian_linear(mu=mu, s=s, c=c, lam=lam, num_steps=K, samples=N, seed=0, dim=dim)
    return bf16, fp32


def test_linear_velocity_network_is_exact_and_really_runs_in_bf16():
    # Without autocast the network is the exact field to float32 rounding (1e-6); under autocast its output is
    # bf16 and off by bf16 rounding of input, weight, bias and output: nonzero, and at most a few u relative
    # (allow 4 u = 2^-7 of the field's scale).
    mu, s, dim = 0.2, 0.8, 3
    net, exact = GridLinearVelocity(mu, s, K, dim), gaussian_velocity(mu, s)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(K, 64, dim, generator=gen)
    t = (torch.arange(K, dtype=torch.float32) / K).reshape(K, 1, 1)
    ref = exact(None, x.double(), t.double())
    scale = float(ref.abs().max())
    torch.testing.assert_close(net(None, x, t).double(), ref, rtol=0, atol=1e-6 * scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(None, x, t)
        one = net(None, x[7], t[7, 0, 0])  # the 0-dim time of the SDE and lean-adjoint calls
    assert low.dtype == one.dtype == torch.bfloat16
    err = float((low.double() - ref).abs().max()) / scale
    assert 0 < err <= 2.0**-7
    assert torch.equal(one, low[7])


def test_sde_adjoint_and_kl_stay_float32_with_a_bf16_network():
    # The objective's states, adjoints, KL and loss come back float32 and finite although every v_base call
    # returns bf16. The rollout differs from the float32 one (bf16 was really used) only by the network's
    # rounding, which the float32 states do not compound: measured 2e-4 of max |x|, allow u = 2^-9 (states
    # rounded to bf16 every step give 1-1.5%). Same for the lean adjoint: measured 1.3e-4 |c|, allow u |c|.
    mu, s, c, dim, b = 0.2, 0.8, 1.5, 2, 256
    net = GridLinearVelocity(mu, s, K, dim)
    gen = torch.Generator().manual_seed(1)
    obs, x0, eps = torch.zeros(b, 1), torch.randn(b, dim, generator=gen), torch.randn(K - 1, b, dim, generator=gen)

    def q_fn(o: Tensor, a: Tensor) -> Tensor:
        return c * a.sum(dim=-1)

    def objective():
        return adjoint_matching_objective(net, net, q_fn, obs, x0, eps, K, horizon=dim, lam_eff=2.0, clip_action=False)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = objective()
    ref = objective()
    for name in ("loss", "path_kl", "xs", "adj_final", "adjs"):
        value = getattr(low, name)
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value).all(), name
    assert low.v_base.dtype == torch.float32  # upcast before the loss and KL arithmetic
    diff = float((low.xs - ref.xs).abs().max())
    assert 0 < diff <= 2.0**-9 * float(ref.xs.abs().max())
    assert float((low.adjs - ref.adjs).abs().max()) <= 2.0**-9 * c


def test_closed_forms_hold_with_bf16_network(runs):
    # Every item-1..5 quantity within its float32 bound (tests/test_closed_forms.py, K = 200) plus BF16_TOL.
    bf16, _ = runs
    assert bf16["dtype"] == "float32" and bf16["num_steps"] == K
    for key, bound in fp32_bounds(bf16).items():
        assert bf16[key] <= bound + BF16_TOL, (key, bf16[key], bound)
    # The lean adjoint is still deterministic (spread 1e-5 of |c| is float32 rounding over 200 steps) and the
    # discrete AM optimum still zeroes the AM residuals (L_AM there < 1e-10 of L_AM at v_ft = v_base).
    assert bf16["adjoint_spread"] <= 1e-5
    assert bf16["am_loss_at_optimum"] <= 1e-10 * bf16["am_loss_at_base"]


def test_bf16_moves_closed_form_quantities_by_less_than_its_precision(runs):
    # The same draws with and without autocast: the measured values differ only by bf16 rounding of the network,
    # averaged over K steps and N samples; allow BF16_TOL (2^-8) of each quantity's scale (s, |c|, the KL, the
    # shift). Relative errors are |measured - exact| / scale, so their difference bounds this from below.
    bf16, fp32 = runs
    shift = bf16["shift"]
    scaled = {
        "base_terminal_mean": bf16["s"],
        "base_terminal_std": bf16["s"],
        "path_kl": bf16["path_kl_exact"],
        "tilted_mean": shift,
        "tilted_std": bf16["s"],
        "tilted_sde_mean": shift,
        "tilted_sde_std": bf16["s"],
    }
    for key, scale in scaled.items():
        assert abs(bf16[key] - fp32[key]) <= BF16_TOL * abs(scale), (key, bf16[key], fp32[key])
    adj_bf16 = torch.tensor(bf16["adjoint"], dtype=torch.float64)
    adj_fp32 = torch.tensor(fp32["adjoint"], dtype=torch.float64)
    assert float((adj_bf16 - adj_fp32).abs().max()) <= BF16_TOL * abs(bf16["c"])
    ctl_bf16 = torch.tensor(bf16["control"], dtype=torch.float64)
    ctl_fp32 = torch.tensor(fp32["control"], dtype=torch.float64)
    assert float((ctl_bf16 - ctl_fp32).abs().max()) <= BF16_TOL * float(ctl_fp32.abs().max())
    # and bf16 was really in play: the runs are not bit-identical
    assert any(bf16[key] != fp32[key] for key in KEYS)
