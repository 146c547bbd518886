"""The memoryless SDE of adjoint matching and its discretised forward rollout (spec sections 2 and 3).

Discretisation of the reference implementation: grid t_i = i h (i = 0..K-1, h = 1/K), the schedule and the
``x / t`` term evaluated shifted by h so t = 0 is never hit, K-1 Euler-Maruyama steps of the fine-tuned SDE,
then one noiseless Euler step of the BASE flow ODE.

Two solvers integrate the same :class:`FlowSDE` object: a fused fixed-grid Euler-Maruyama loop (the fast
path) and ``torchsde.sdeint`` (method ``euler``) driven by the same Brownian increments. They give identical
states; ``torchsde``'s ``logqp`` accumulation equals the path-KL terms of the stochastic steps.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torchsde
from torch import Tensor, nn

from trqam_lit.math.flow import VelocityFn

Solver = Literal["fused", "torchsde"]


def flow_time_grid(num_steps: int, device: torch.device | str | None = None) -> Tensor:
    """The K flow times t_i = i / K, i = 0..K-1 (float32)."""
    return torch.arange(num_steps, device=device, dtype=torch.float32) / num_steps


def memoryless_g(t: Tensor | float, h: float) -> Tensor | float:
    """Shifted memoryless noise schedule g(t) = sqrt(2 (1 - t + h) / (t + h)) (g_0 = sqrt(22) at K = 10)."""
    if torch.is_tensor(t):
        t = t.float()
        return torch.sqrt(2.0 * (1.0 - t + h) / (t + h))
    return math.sqrt(2.0 * (1.0 - t + h) / (t + h))


def memoryless_drift(v: Tensor, x: Tensor, t_shift: Tensor | float) -> Tensor:
    """Drift of the memoryless SDE, 2 v - x / (t + h), from a velocity value ``v`` (computed in fp32)."""
    return 2.0 * v.float() - x.float() / t_shift


def path_kl_terms(v_ft: Tensor, v_base: Tensor, g: Tensor, h: float) -> Tensor:
    """Per-step, per-sample KL of the Euler transitions: (2 h / g_i^2) |v_ft - v_base|^2, shape (K, B).

    ``v_ft`` and ``v_base`` are (K, B, A); ``g`` holds g_i, shape (K,).
    """
    dv2 = (v_ft.float() - v_base.float()).pow(2).sum(dim=-1)
    return (2.0 * h / g.float().pow(2))[:, None] * dv2


def path_kl_estimate(v_ft: Tensor, v_base: Tensor, g: Tensor, h: float, horizon: int) -> Tensor:
    """KL_hat = mean_batch sum_{i=0..K-1} (2h / g_i^2) |v_ft - v_base|^2 / H (detached by the caller)."""
    return path_kl_terms(v_ft, v_base, g, h).sum(dim=0).mean() / horizon


class FlowSDE(nn.Module):
    """The fine-tuned memoryless SDE for one batch of observations, in ``torchsde``'s interface.

    f (drift) = 2 v_ft(s, x, t_i) - x / (t_i + h); h (prior drift) = the same with v_base; g = g(t_i),
    diagonal Ito noise. Times handed in by a solver are snapped to the grid index, so every solver
    evaluates the networks at exactly the same t_i.
    """

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, v_ft: VelocityFn, v_base: VelocityFn, s: Tensor, num_steps: int) -> None:
        super().__init__()
        self.v_ft, self.v_base, self.s, self.num_steps = v_ft, v_base, s, num_steps
        self.dt = 1.0 / num_steps
        self.grid = flow_time_grid(num_steps, device=s.device)
        self.g_grid = memoryless_g(self.grid, self.dt)

    def index(self, t: Tensor | float) -> int:
        return int(round(float(t) * self.num_steps))

    def f(self, t: Tensor | float, y: Tensor) -> Tensor:
        ti = self.grid[self.index(t)]
        return memoryless_drift(self.v_ft(self.s, y, ti), y, ti + self.dt)

    def h(self, t: Tensor | float, y: Tensor) -> Tensor:
        ti = self.grid[self.index(t)]
        return memoryless_drift(self.v_base(self.s, y, ti), y, ti + self.dt)

    def g(self, t: Tensor | float, y: Tensor) -> Tensor:
        return self.g_grid[self.index(t)].expand_as(y)

    def euler_maruyama_step(self, i: int, x: Tensor, v: Tensor, eps_i: Tensor) -> Tensor:
        """x_{i+1} from x_i, v_ft's value ``v`` there and the standard-normal draw ``eps_i`` (the fused loops; no host
        sync), in the operation order of torchsde's Euler step: y + f dt + g * dW with dW = sqrt(h) eps."""
        ti = self.grid[i]
        return x + memoryless_drift(v, x, ti + self.dt) * self.dt + self.g_grid[i] * (math.sqrt(self.dt) * eps_i)

    def base_ode_step(self, x: Tensor) -> Tensor:
        """The last forward step: x_K = x_{K-1} + h v_base(s, x_{K-1}, t_{K-1}), noiseless."""
        return x + self.dt * self.v_base(self.s, x, self.grid[self.num_steps - 1]).float()


class RecordedBrownian(torchsde.BaseBrownian):
    """A Brownian motion on the flow grid whose increments W(t_{i+1}) - W(t_i) = sqrt(h) eps_i are given.

    Lets ``torchsde.sdeint`` consume exactly the draws the fused loop uses (or recorded ones in tests).
    ``extra_channels`` zero columns are appended for the log-ratio channel that ``logqp=True`` adds.
    """

    __slots__ = ("_increments", "_num_steps", "_extra")

    def __init__(self, eps: Tensor, num_steps: int, extra_channels: int = 0) -> None:
        self._increments = math.sqrt(1.0 / num_steps) * eps
        self._num_steps = num_steps
        self._extra = extra_channels

    def __call__(self, ta, tb=None, return_U=False, return_A=False):  # noqa: N803 (torchsde's names)
        if tb is None or return_U or return_A:
            raise NotImplementedError("RecordedBrownian only provides increments between grid points")
        i, j = int(round(float(ta) * self._num_steps)), int(round(float(tb) * self._num_steps))
        if j != i + 1:
            raise ValueError(f"increments are recorded per grid step only, asked for [{float(ta)}, {float(tb)}]")
        inc = self._increments[i]
        if self._extra:
            inc = torch.cat([inc, inc.new_zeros(inc.shape[0], self._extra)], dim=-1)
        return inc

    def __repr__(self) -> str:
        return f"RecordedBrownian(steps={self._num_steps}, shape={tuple(self.shape)})"

    @property
    def dtype(self):
        return self._increments.dtype

    @property
    def device(self):
        return self._increments.device

    @property
    def shape(self):
        b, a = self._increments.shape[1:]
        return torch.Size((b, a + self._extra))

    @property
    def levy_area_approximation(self):
        return "none"


def _check_noise(x0: Tensor, eps: Tensor, num_steps: int) -> Tensor:
    if eps.dim() != 3 or eps.shape[0] < num_steps - 1 or eps.shape[1:] != x0.shape:
        raise ValueError(
            f"eps must have shape (>= K-1, B, A) = ({num_steps - 1}, {tuple(x0.shape)}), got {tuple(eps.shape)}"
        )
    return eps[: num_steps - 1].float()


def rollout_fused(sde: FlowSDE, x0: Tensor, eps: Tensor) -> Tensor:
    """Forward rollout with a fixed-grid Euler-Maruyama loop; returns the states x_0..x_K, shape (K+1, B, A).

    ``eps`` (K-1 or K, B, A) are the standard-normal draws of the K-1 stochastic steps (a K-th is ignored).
    """
    K = sde.num_steps
    eps = _check_noise(x0, eps, K)
    xs = [x0.float()]
    x = xs[0]
    for i in range(K - 1):
        x = sde.euler_maruyama_step(i, x, sde.v_ft(sde.s, x, sde.grid[i]), eps[i])
        xs.append(x)
    xs.append(sde.base_ode_step(x))
    return torch.stack(xs)


def rollout_fused_with_ode(sde: FlowSDE, x0: Tensor, eps: Tensor, s_ode: Tensor, y0: Tensor) -> tuple[Tensor, Tensor]:
    """``rollout_fused``'s states and, beside them, the Euler ODE of v_ft at ``s_ode`` from ``y0`` (flow.euler_ode,
    unclipped: the TD target's next action): both evaluate v_ft at the same flow times t_0..t_{K-2}, so each of those
    is one v_ft call on 2B rows instead of two on B (the ODE's last step at t_{K-1} is its own call).

    Returns the states (K+1, B, A) and the ODE's end point (B', A); the same values as the two separate loops.
    """
    K, h = sde.num_steps, sde.dt
    eps = _check_noise(x0, eps, K)
    rows = x0.shape[0]
    s_both = torch.cat([sde.s.to(s_ode.dtype), s_ode])
    xs = [x0.float()]
    x, y = xs[0], y0
    for i in range(K - 1):
        v = sde.v_ft(s_both, torch.cat([x, y.to(x.dtype)]), sde.grid[i])
        x = sde.euler_maruyama_step(i, x, v[:rows], eps[i])
        y = y + h * v[rows:]
        xs.append(x)
    xs.append(sde.base_ode_step(x))
    y = y + h * sde.v_ft(s_ode, y, sde.grid[K - 1])
    return torch.stack(xs), y


def rollout_torchsde(sde: FlowSDE, x0: Tensor, eps: Tensor, logqp: bool = False):
    """The same rollout through ``torchsde.sdeint`` (Euler, dt = h) plus the final base ODE step.

    Returns the states (K+1, B, A), and with ``logqp=True`` also torchsde's per-step log-ratio (K-1, B).
    """
    K, h = sde.num_steps, sde.dt
    eps = _check_noise(x0, eps, K)
    # Build the output times by the solver's own accumulation (t + dt) so it never takes a sliver step.
    ts = [torch.zeros((), device=x0.device, dtype=torch.float32)]
    for _ in range(K - 1):
        ts.append(ts[-1] + h)
    ts = torch.stack(ts)
    bm = RecordedBrownian(eps, K, extra_channels=1 if logqp else 0)
    out = torchsde.sdeint(sde, x0.float(), ts, bm=bm, method="euler", dt=h, logqp=logqp)
    ys, log_ratio = out if logqp else (out, None)
    xs = torch.cat([ys, sde.base_ode_step(ys[-1])[None]], dim=0)
    return (xs, log_ratio) if logqp else xs


def rollout(sde: FlowSDE, x0: Tensor, eps: Tensor, solver: Solver = "fused") -> Tensor:
    """Forward rollout x_0..x_K with the chosen solver (both give identical states)."""
    if solver == "fused":
        return rollout_fused(sde, x0, eps)
    if solver == "torchsde":
        return rollout_torchsde(sde, x0, eps)
    raise ValueError(f"unknown SDE solver {solver!r}; choose 'fused' or 'torchsde'")
