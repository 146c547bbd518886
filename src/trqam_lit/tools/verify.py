"""Self-check against the exact answers of spec method.md section 7 (Gaussian base, analytic reward).

    python -m trqam_lit.tools.verify gaussian-linear --mu 0.2 --s 0.8 --c 1.5 --lam 2 --num-steps 400 --samples 200000
    python -m trqam_lit.tools.verify gaussian-quadratic --mu 0 --s 1 --k 2 --target 1 --lam 1 --num-steps 200 \
        --samples 50000

The base velocity is the exact one of the data N(mu, s^2 I) (no network, observation ignored) and every
number comes from the project's own code: ``sde.FlowSDE`` + ``sde.rollout``, ``adjoint.terminal_adjoint``
(no clip: the closed forms assume none), ``adjoint.lean_adjoint``, ``adjoint.adjoint_matching_objective``
(its path-KL estimate, with H = the action dimension so the KL is per action dimension) and
``flow.euler_ode``. Each prints ONE JSON line: the measured values, the closed forms (``*_exact``) and
relative errors (``*_rel_err``). The project's functions compute in float32 (they cast their inputs), so
states, adjoints and KL terms are float32; statistics are accumulated and closed forms evaluated in float64.
Draws come in antithetic pairs (z, -z) unless ``--no-antithetic``: every rollout here is affine in the draws,
so the reported means carry no Monte Carlo error and show the discretisation error alone.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from trqam_lit.math.adjoint import (
    adjoint_matching_loss,
    adjoint_matching_objective,
    am_sigmas,
    lean_adjoint,
    terminal_adjoint,
)
from trqam_lit.math.flow import VelocityFn, euler_ode
from trqam_lit.math.sde import FlowSDE, Solver, flow_time_grid, memoryless_g, rollout

# Elements per (K, chunk, D) tensor: bounds memory (a handful of such tensors live at once, ~16 MB each).
CHUNK_ELEMENTS = 4_000_000
DTYPE = "float32"  # what the project's rollout / adjoint / KL functions compute in


# --------------------------------------------------------------------------------------------------- closed forms
def gaussian_velocity(mu: float, s: float) -> VelocityFn:
    """Exact linear-path velocity of data N(mu, s^2 I): v(x, t) = mu + k(t) (x - t mu).

    k(t) = (t s^2 - (1 - t)) / var_t, var_t = (1 - t)^2 + t^2 s^2. The observation is ignored; ``t`` may be a
    float, a 0-dim tensor or a tensor broadcasting against ``x`` ((K, 1, 1), (B, 1)). The coefficients are
    evaluated in float64 and cast to ``x``'s dtype.
    """

    def v(obs: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
        t64 = t.detach().double() if torch.is_tensor(t) else torch.tensor(float(t), dtype=torch.float64)
        var_t = (1.0 - t64) ** 2 + (t64 * s) ** 2
        k = (t64 * s**2 - (1.0 - t64)) / var_t
        return mu + k.to(x.dtype) * (x - (t64 * mu).to(x.dtype))

    return v


def exact_lean_adjoint(c: float, s: float, t: Tensor) -> Tensor:
    """Continuous-time lean adjoint for Q(a) = c.a (per axis): adj(t) = -c s^2 t / var_t (float64)."""
    t = t.double()
    return -c * s**2 * t / ((1.0 - t) ** 2 + (t * s) ** 2)


def exact_tilt_control(c: float, s: float, lam: float, t: Tensor) -> Tensor:
    """v_tilt - v_base = (s^2 c / lambda) (1 - t) / var_t for Q(a) = c.a (per axis, float64)."""
    t = t.double()
    return (s**2 * c / lam) * (1.0 - t) / ((1.0 - t) ** 2 + (t * s) ** 2)


def gaussian_kl(m1: float, s1: float, m0: float, s0: float) -> float:
    """KL(N(m1, s1^2) || N(m0, s0^2)) per axis."""
    return math.log(s0 / s1) + (s1**2 + (m1 - m0) ** 2) / (2.0 * s0**2) - 0.5


def quadratic_tilt(mu: float, s: float, k: float, target: float, lam: float) -> tuple[float, float]:
    """Mean and std of N(mu, s^2) * exp(-k/2 (a - target)^2 / lambda), normalised (per axis)."""
    prec = 1.0 / s**2 + k / lam
    return (mu / s**2 + k * target / lam) / prec, 1.0 / math.sqrt(prec)


# ---------------------------------------------------------------------------------------------- project plumbing
def affine_control_field(v_base: VelocityFn, theta: Tensor) -> VelocityFn:
    """v_ft(s, x, t_i) = v_base(s, x, t_i) + [x, 1] theta_i, one affine control per grid time.

    ``theta`` is (K, D + 1, D): rows 0..D-1 the slope, row D the intercept. ``t`` is snapped to the grid index
    round(t K); the field is only defined on the grid (all the project's callers evaluate it there).
    """
    K, d = theta.shape[0], theta.shape[-1]

    def v(obs: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
        if torch.is_tensor(t):
            idx = torch.round(t.detach().double() * K).long().clamp(0, K - 1)
            if idx.dim() > 0:
                idx = idx.squeeze(-1)  # (K, 1, 1) -> (K, 1); (B, 1) -> (B,)
        else:
            idx = min(max(round(float(t) * K), 0), K - 1)
        th = theta[idx].to(x.dtype)
        return v_base(obs, x, t) + (x.unsqueeze(-2) @ th[..., :d, :]).squeeze(-2) + th[..., d, :]

    return v


def _chunks(samples: int, num_steps: int, dim: int) -> Iterator[int]:
    size = max(2, CHUNK_ELEMENTS // (num_steps * dim) // 2 * 2)  # even, so antithetic pairs stay in one chunk
    for start in range(0, samples, size):
        yield min(size, samples - start)


def _normal(gen: torch.Generator, shape: tuple[int, ...], antithetic: bool) -> Tensor:
    """Standard normals; with ``antithetic`` the second half of dim 0 is minus the first (z, -z pairs).

    The Gaussian-linear rollouts and ODE are affine in the draws, so antithetic pairs cancel the Monte Carlo
    error of every mean exactly and the check sees the discretisation error alone.
    """
    if not antithetic:
        return torch.randn(shape, generator=gen)
    z = torch.randn(((shape[0] + 1) // 2, *shape[1:]), generator=gen)
    return torch.cat([z, -z])[: shape[0]]


def _draw(gen: torch.Generator, b: int, num_steps: int, dim: int, antithetic: bool) -> tuple[Tensor, Tensor]:
    x0 = _normal(gen, (b, dim), antithetic)
    eps = _normal(gen, (b, num_steps - 1, dim), antithetic).transpose(0, 1).contiguous()
    return x0, eps


class _Moments:
    """Running float64 mean / std over all samples and axes."""

    def __init__(self) -> None:
        self.n, self.sum, self.sumsq = 0, 0.0, 0.0

    def add(self, x: Tensor) -> None:
        x = x.double()
        self.n += x.numel()
        self.sum += float(x.sum())
        self.sumsq += float(x.pow(2).sum())

    @property
    def mean(self) -> float:
        return self.sum / self.n

    @property
    def std(self) -> float:
        return math.sqrt(max(self.sumsq / self.n - self.mean**2, 0.0) * self.n / max(self.n - 1, 1))


def _am_pass(v_ft, v_base, q_fn, x0: Tensor, eps: Tensor, K: int, dim: int, lam: float, solver: str):
    """One pass of the project's adjoint-matching objective on the analytic reward (no clip, KL per dimension)."""
    s = torch.zeros(x0.shape[0], 1)
    return adjoint_matching_objective(
        v_ft, v_base, q_fn, s, x0, eps, K, horizon=dim, lam_eff=lam, solver=solver, clip_action=False
    )


def _rel(err: float, scale: float) -> float | None:
    return abs(err) / abs(scale) if scale != 0 else None


def _ode_moments(
    v: VelocityFn, gen: torch.Generator, samples: int, num_steps: int, dim: int, antithetic: bool
) -> _Moments:
    m = _Moments()
    for b in _chunks(samples, num_steps, dim):
        x0 = _normal(gen, (b, dim), antithetic)
        with torch.no_grad():
            m.add(euler_ode(v, torch.zeros(b, 1), x0, num_steps))
    return m


def _grid_and_g(num_steps: int) -> tuple[Tensor, Tensor]:
    t = flow_time_grid(num_steps)
    return t, memoryless_g(t, 1.0 / num_steps)


def _floats(x: Tensor | Sequence[float]) -> list[float]:
    return [float(f"{float(v):.7g}") for v in x]


# --------------------------------------------------------------------------------------------------- linear mode
def gaussian_linear(
    mu: float,
    s: float,
    c: float,
    lam: float,
    num_steps: int,
    samples: int,
    seed: int = 0,
    dim: int = 1,
    solver: Solver = "fused",
    antithetic: bool = True,
) -> dict:
    """Section 7 items 1-5 for Q(a) = c.a on data N(mu, s^2 I_dim); returns the JSON record as a dict.

    Errors: terminal mean / std and ODE std relative to s; the lean adjoint's max over the grid relative to
    |c|; the tilted means relative to the shift s^2 c / lambda; the path KL relative to its exact value.
    """
    t_start = time.perf_counter()
    K = num_steps
    gen = torch.Generator().manual_seed(seed)
    v_base = gaussian_velocity(mu, s)
    c_vec = torch.full((dim,), float(c))

    def q_fn(obs: Tensor, a: Tensor) -> Tensor:
        return a @ c_vec.to(a.dtype)

    grid, g = _grid_and_g(K)
    sig = am_sigmas(g, lam)

    # Pass 1: the memoryless SDE driven by v_base (v_ft = v_base), its lean adjoint and the AM loss at v_ft = v_base.
    base_end = _Moments()
    adj_sum = torch.zeros(K, dim, dtype=torch.float64)
    adj_min = torch.full((K, dim), math.inf, dtype=torch.float64)
    adj_max = torch.full((K, dim), -math.inf, dtype=torch.float64)
    loss_base = 0.0
    for b in _chunks(samples, K, dim):
        x0, eps = _draw(gen, b, K, dim, antithetic)
        obs = torch.zeros(b, 1)
        with torch.no_grad():
            xs = rollout(FlowSDE(v_base, v_base, obs, K), x0, eps, solver)
        adj_k = terminal_adjoint(q_fn, obs, xs[-1], clip=False)
        adjs = lean_adjoint(v_base, obs, xs, adj_k)
        base_end.add(xs[-1])
        adj_sum += adjs.double().sum(dim=1)
        adj_min = torch.minimum(adj_min, adjs.double().amin(dim=1))
        adj_max = torch.maximum(adj_max, adjs.double().amax(dim=1))
        vb = v_base(obs, xs[:K], grid.reshape(K, 1, 1))
        loss_base += float(adjoint_matching_loss(vb, vb, adjs, sig)) * b
    adj_mean = adj_sum / samples  # (K, dim)

    # The adjoint-matching optimum on the discrete grid: v_ft - v_base = -(g_i^2 / (2 lambda)) adj_i.
    theta = torch.zeros(K, dim + 1, dim, dtype=torch.float64)
    theta[:, dim, :] = -(g.double() ** 2 / (2.0 * lam))[:, None] * adj_mean
    v_opt = affine_control_field(v_base, theta.float())

    # Pass 2: the controlled SDE's own rollout, through the project's AM objective (its path KL, H = dim).
    kl_sum, loss_opt = 0.0, 0.0
    sde_end = _Moments()
    for b in _chunks(samples, K, dim):
        x0, eps = _draw(gen, b, K, dim, antithetic)
        out = _am_pass(v_opt, v_base, q_fn, x0, eps, K, dim, lam, solver)
        kl_sum += float(out.path_kl) * b
        loss_opt += float(out.loss) * b
        sde_end.add(out.xs[-1])

    # Pass 3: deterministic Euler ODE under the optimum field.
    ode = _ode_moments(v_opt, gen, samples, K, dim, antithetic)

    shift = s**2 * c / lam
    mean_tilt = mu + shift
    adj_exact = exact_lean_adjoint(c, s, grid)
    kl_exact = c**2 * s**2 / (2.0 * lam**2)
    path_kl = kl_sum / samples
    rec = {
        "mode": "gaussian-linear",
        "mu": mu,
        "s": s,
        "c": c,
        "lam": lam,
        "num_steps": K,
        "samples": samples,
        "seed": seed,
        "dim": dim,
        "solver": solver,
        "antithetic": antithetic,
        "dtype": DTYPE,
        "base_terminal_mean": base_end.mean,
        "base_terminal_mean_exact": mu,
        "base_terminal_mean_rel_err": _rel(base_end.mean - mu, s),
        "base_terminal_std": base_end.std,
        "base_terminal_std_exact": s,
        "base_terminal_std_rel_err": _rel(base_end.std - s, s),
        "adjoint_rel_err": _rel(float((adj_mean - adj_exact[:, None]).abs().max()), c),
        "adjoint_spread": _rel(float((adj_max - adj_min).max()), c),
        "path_kl": path_kl,
        "path_kl_exact": kl_exact,
        "path_kl_rel_err": _rel(path_kl - kl_exact, kl_exact),
        "tilted_mean": ode.mean,
        "tilted_mean_exact": mean_tilt,
        "tilted_mean_rel_err": _rel(ode.mean - mean_tilt, shift),
        "tilted_std": ode.std,
        "tilted_std_exact": s,
        "tilted_std_rel_err": _rel(ode.std - s, s),
        "tilted_sde_mean": sde_end.mean,
        "tilted_sde_mean_exact": mean_tilt,
        "tilted_sde_mean_rel_err": _rel(sde_end.mean - mean_tilt, shift),
        "tilted_sde_std": sde_end.std,
        "tilted_sde_std_exact": s,
        "tilted_sde_std_rel_err": _rel(sde_end.std - s, s),
        "shift": shift,
        "am_loss_at_optimum": loss_opt / samples,
        "am_loss_at_base": loss_base / samples,
        "grid": _floats(grid),
        "adjoint": _floats(adj_mean.mean(dim=1)),
        "adjoint_exact": _floats(adj_exact),
        "control": _floats(theta[:, dim, :].mean(dim=1)),
        "control_exact": _floats(exact_tilt_control(c, s, lam, grid)),
    }
    rec["runtime_s"] = round(time.perf_counter() - t_start, 3)
    return rec


# ------------------------------------------------------------------------------------------------ quadratic mode
# Its leading arguments are gaussian_linear's (a same-shape run for `duplicates`): both modes take the options that
# build_parser's `common` adds to each subcommand, as keyword arguments of public, separately documented functions.
def gaussian_quadratic(
    mu: float,
    s: float,
    k: float,
    target: float,
    lam: float,
    num_steps: int,
    samples: int,
    seed: int = 0,
    dim: int = 1,
    solver: Solver = "fused",
    antithetic: bool = True,
    max_iters: int = 50,
    tol: float = 1e-4,
) -> dict:
    """Q(a) = -k/2 |a - target|^2: solve adjoint matching by fixed-point iteration, then sample the ODE.

    Each iteration rolls out the current controlled SDE (the same draws every iteration, so the map is
    deterministic and its fixed point is reached, not blurred by fresh Monte Carlo noise), runs the lean
    adjoint, and fits v_ft - v_base = -(g_i^2 / (2 lambda)) adj_i per grid time by least squares on [x_i, 1]
    (exact here: the optimal control is affine in x). It stops when the largest parameter change, relative
    to the largest parameter, falls under ``tol``.
    """
    t_start = time.perf_counter()
    K = num_steps
    v_base = gaussian_velocity(mu, s)

    def q_fn(obs: Tensor, a: Tensor) -> Tensor:
        return -0.5 * k * (a - target).pow(2).sum(dim=-1)

    grid, g = _grid_and_g(K)
    coef = -(g.double() ** 2 / (2.0 * lam)).reshape(K, 1, 1)
    theta = torch.zeros(K, dim + 1, dim, dtype=torch.float64)
    changes: list[float] = []
    for _ in range(max_iters):
        v_cur = affine_control_field(v_base, theta.float())
        gen = torch.Generator().manual_seed(seed)
        xtx = torch.zeros(K, dim + 1, dim + 1, dtype=torch.float64)
        xty = torch.zeros(K, dim + 1, dim, dtype=torch.float64)
        kl_sum = 0.0
        sde_end = _Moments()
        for b in _chunks(samples, K, dim):
            x0, eps = _draw(gen, b, K, dim, antithetic)
            out = _am_pass(v_cur, v_base, q_fn, x0, eps, K, dim, lam, solver)
            feats = torch.cat([out.xs[:K].double(), torch.ones(K, b, 1, dtype=torch.float64)], dim=-1)
            xtx += feats.transpose(1, 2) @ feats
            xty += feats.transpose(1, 2) @ (coef * out.adjs.double())
            kl_sum += float(out.path_kl) * b
            sde_end.add(out.xs[-1])
        new = torch.linalg.solve(xtx, xty)
        changes.append(float((new - theta).abs().max() / new.abs().max().clamp_min(1e-300)))
        theta = new
        if changes[-1] < tol:
            break

    ode = _ode_moments(
        affine_control_field(v_base, theta.float()),
        torch.Generator().manual_seed(seed + 1),
        samples,
        K,
        dim,
        antithetic,
    )
    mean_exact, std_exact = quadratic_tilt(mu, s, k, target, lam)
    shift = mean_exact - mu
    basis = "shift" if shift != 0 else "std"
    scale = shift if shift != 0 else std_exact
    kl_exact = gaussian_kl(mean_exact, std_exact, mu, s)
    path_kl = kl_sum / samples
    rec = {
        "mode": "gaussian-quadratic",
        "mu": mu,
        "s": s,
        "k": k,
        "target": target,
        "lam": lam,
        "num_steps": K,
        "samples": samples,
        "seed": seed,
        "dim": dim,
        "solver": solver,
        "antithetic": antithetic,
        "dtype": DTYPE,
        "iterations": len(changes),
        "fixed_point_change": changes[-1],
        "fixed_point_changes": _floats(changes),
        "converged": changes[-1] < tol,
        "tilted_mean": ode.mean,
        "tilted_mean_exact": mean_exact,
        "tilted_mean_rel_err": _rel(ode.mean - mean_exact, scale),
        "tilted_mean_rel_err_basis": basis,
        "tilted_std": ode.std,
        "tilted_std_exact": std_exact,
        "tilted_std_rel_err": _rel(ode.std - std_exact, std_exact),
        "tilted_sde_mean": sde_end.mean,
        "tilted_sde_mean_rel_err": _rel(sde_end.mean - mean_exact, scale),
        "tilted_sde_std": sde_end.std,
        "tilted_sde_std_rel_err": _rel(sde_end.std - std_exact, std_exact),
        "path_kl": path_kl,
        "path_kl_exact": kl_exact,
        "path_kl_rel_err": _rel(path_kl - kl_exact, kl_exact),
        "shift": shift,
        "grid": _floats(grid),
        "control_slope": _floats(theta[:, :dim, :].diagonal(dim1=1, dim2=2).mean(dim=1)),
        "control_intercept": _floats(theta[:, dim, :].mean(dim=1)),
    }
    rec["runtime_s"] = round(time.perf_counter() - t_start, 3)
    return rec


# ------------------------------------------------------------------------------------------------------------ CLI
def _typed(kind: Callable[[str], float], ok: Callable[[float], bool], what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


_finite = _typed(float, lambda v: True, "a finite number")
_positive = _typed(float, lambda v: v > 0, "> 0")
_steps = _typed(int, lambda v: v >= 2, ">= 2 (one stochastic step plus the final base ODE step)")
_samples = _typed(int, lambda v: v >= 2, ">= 2")
_dim = _typed(int, lambda v: v >= 1, ">= 1")
_seed = _typed(int, lambda v: v >= 0, ">= 0")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trqam_lit.tools.verify",
        description="Check the project's rollout, lean adjoint, KL and AM optimum against the exact Gaussian "
        "answers of spec section 7; prints one JSON line.",
    )
    sub = parser.add_subparsers(dest="mode", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--mu", type=_finite, required=True, help="data mean (same on every axis)")
        p.add_argument("--s", type=_positive, required=True, help="data std, > 0")
        p.add_argument("--lam", type=_positive, required=True, help="temperature lambda (lambda_eff), > 0")
        p.add_argument("--num-steps", type=_steps, required=True, help="flow steps K, >= 2")
        p.add_argument("--samples", type=_samples, required=True, help="Monte Carlo samples N")
        p.add_argument("--seed", type=_seed, default=0)
        p.add_argument("--dim", type=_dim, default=1, help="action dimension (same values on every axis)")
        p.add_argument("--solver", choices=["fused", "torchsde"], default="fused", help="SDE solver")
        p.add_argument(
            "--no-antithetic",
            dest="antithetic",
            action="store_false",
            help="plain i.i.d. draws instead of antithetic (z, -z) pairs",
        )

    lin = sub.add_parser("gaussian-linear", help="Q(a) = c . a")
    lin.add_argument(
        "--c",
        type=_typed(float, lambda v: v != 0, "nonzero (errors are relative to |c|)"),
        required=True,
        help="reward slope (same on every axis), nonzero",
    )
    common(lin)
    quad = sub.add_parser("gaussian-quadratic", help="Q(a) = -k/2 |a - target|^2")
    quad.add_argument("--k", type=_positive, required=True, help="reward curvature, > 0")
    quad.add_argument("--target", type=_finite, required=True, help="reward maximiser (same on every axis)")
    common(quad)
    quad.add_argument("--max-iters", type=_dim, default=50, help="fixed-point iterations at most")
    quad.add_argument("--tol", type=_positive, default=1e-4, help="stop when the relative control change is below")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common = dict(
        lam=args.lam,
        num_steps=args.num_steps,
        samples=args.samples,
        seed=args.seed,
        dim=args.dim,
        solver=args.solver,
        antithetic=args.antithetic,
    )
    if args.mode == "gaussian-linear":
        rec = gaussian_linear(mu=args.mu, s=args.s, c=args.c, **common)
    else:
        rec = gaussian_quadratic(
            mu=args.mu, s=args.s, k=args.k, target=args.target, max_iters=args.max_iters, tol=args.tol, **common
        )
    sys.stdout.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
