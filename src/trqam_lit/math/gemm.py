"""The networks' float32 GEMMs through MKL (ATen's default on x86: ``addmm``, ``mm``, ``bmm``) or through oneDNN
(``torch.ops.mkldnn._linear_pointwise``, in the same wheel), forward and backward, with the kernel chosen once.

Why two: on some AMD CPUs with AVX-512 the MKL of the torch wheel takes a slower code path than oneDNN (measured
~2x at our shapes on one machine), while on others (and on Intel CPUs) they run at the same speed; docs/performance.md,
"fp32 GEMM backend". Every module that multiplies (``nets.Linear``, ``nets.EnsembleLinear``, the lean adjoint's VJPs,
the critic's action gradient) carries a ``gemm`` attribute, "mkl" or "onednn"; the agent sets it on all its networks
once (:func:`calibrate` times both kernels at the networks' real shapes when its ``gemm_backend`` is "auto").

The oneDNN path is taken only where it computes the same thing: float32 CPU tensors, outside autocast (bf16-mixed keeps
ATen's autocast casts), and in eager mode (under ``torch.compile``/``torch.export`` the default ops are traced, so
inductor and exported programs see plain aten ops). CUDA tensors are never rerouted. The environment variable
``TRQAM_GEMM=mkl|onednn`` forces a kernel for every network built and every agent's choice in the process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "mkl", "onednn")
ENV_VAR = "TRQAM_GEMM"


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's fused linear op (CPU wheels for x86 and aarch64 do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def forced_backend() -> str | None:
    """The kernel forced by ``TRQAM_GEMM`` ("mkl" or "onednn"), None when unset or "auto"; raises on another value."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {BACKENDS}")
    if value == "onednn" and not onednn_available():
        raise RuntimeError(f"{ENV_VAR}=onednn, but this torch build has no oneDNN linear op")
    return value


def default_backend() -> str:
    """The kernel a newly built network starts with: the forced one, else MKL (ATen's default)."""
    return forced_backend() or "mkl"


def _lp(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    # x @ w.T + b in oneDNN; strided views of w and x are read in place (no transposed copies needed)
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def uses_onednn(backend: str, *tensors: Tensor) -> bool:
    """Whether a GEMM of these tensors goes through oneDNN: asked for, float32 CPU tensors, eager, no autocast."""
    if backend != "onednn":
        return False
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


class _OneDNNLinear(torch.autograd.Function):
    """y = x @ w.T + b with oneDNN, and its backward with oneDNN (forward/setup_context form: usable under torch.func,
    the terminal adjoint's grad)."""

    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return _lp(x, w, b)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Tensor, Tensor | None], output: Tensor) -> None:
        x, w, b = inputs
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, w = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _lp(grad, w.t(), None)  # grad @ w
        if ctx.needs_input_grad[1]:
            gw = _lp(g2.t(), x.reshape(-1, x.shape[-1]).t(), None)  # grad.T @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, backend: str) -> Tensor:
    """``F.linear(x, weight, bias)`` (weight (out, in)) through ``backend`` where :func:`uses_onednn` allows."""
    if uses_onednn(backend, x, weight):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def matmul_weight(g: Tensor, weight: Tensor, backend: str) -> Tensor:
    """``g @ weight`` for a linear layer's weight (out, in): the input side of a VJP, no autograd (the lean adjoint)."""
    if uses_onednn(backend, g, weight):
        # a column slice (the first layer's action columns) as a strided view sends oneDNN to its reference kernel
        # (~12 ms instead of ~40 us at 64 x 256 x 25): copy it, a few KB
        return _lp(g, (weight if weight.is_contiguous() else weight.contiguous()).t(), None)
    return g @ weight


class _OneDNNEnsemble(torch.autograd.Function):
    """y[e] = x[e] @ w[e] + b[e] for E members (x (E, B, in) or a shared (B, in); w (E, in, out); b (E, out)), one
    oneDNN call per member, forward and backward."""

    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        if x.dim() == 2:
            return torch.stack([_lp(x, w[e].t(), b[e]) for e in range(w.shape[0])])
        return torch.stack([_lp(x[e], w[e].t(), b[e]) for e in range(w.shape[0])])

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
        x, w, _ = inputs
        ctx.save_for_backward(x, w)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, w = ctx.saved_tensors
        members = range(w.shape[0])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.stack([_lp(grad[e], w[e], None) for e in members])  # grad[e] @ w[e].T
            if x.dim() == 2:
                gx = gx.sum(0)
        if ctx.needs_input_grad[1]:
            xs = [x] * len(members) if x.dim() == 2 else list(x)
            gw = torch.stack([_lp(xs[e].t(), grad[e].t(), None) for e in members])  # x[e].T @ grad[e]
        if ctx.needs_input_grad[2]:
            gb = grad.sum(1)
        return gx, gw, gb


def ensemble_linear(x: Tensor, weight: Tensor, bias: Tensor, backend: str) -> Tensor:
    """E linear layers at once: weight (E, in, out), bias (E, out); x (E, B, in), or (B, in) shared by all members."""
    if uses_onednn(backend, x, weight):
        return _OneDNNEnsemble.apply(x, weight, bias)
    if x.dim() == 2:
        return torch.einsum("bi,eio->ebo", x, weight) + bias[:, None, :]
    return torch.baddbmm(bias[:, None, :], x, weight)


def ensemble_matmul_weight_t(g: Tensor, weight: Tensor, backend: str) -> Tensor:
    """``g @ weight.transpose(1, 2)`` per member (g (E, B, out), weight (E, in, out)): the input side of an ensemble
    layer's VJP, no autograd (the critic's action gradient)."""
    if uses_onednn(backend, g, weight):
        return torch.stack([_lp(g[e], weight[e], None) for e in range(weight.shape[0])])
    return torch.bmm(g, weight.transpose(1, 2))


# ---- calibration --------------------------------------------------------------------------------------------------
def _fwd_bwd(fn: Callable[..., Tensor], *args: Tensor) -> None:
    y = fn(*args)
    torch.autograd.grad(y, [a for a in args if a.requires_grad], torch.ones_like(y))


def _time_kinds(cases: Sequence[Callable[[str], None]], repeats: int, calls: int = 3) -> dict[str, float]:
    """Seconds for all ``cases`` (each runs one GEMM's forward and backward on the given backend) per backend: for
    each case the min over ``repeats`` timings of ``calls`` runs, the two backends taking turns (order alternating) so
    that a machine whose speed drifts slows both alike."""
    total = {"mkl": 0.0, "onednn": 0.0}
    for case in cases:
        best = {"mkl": float("inf"), "onednn": float("inf")}
        for backend in best:
            case(backend)  # warm-up: oneDNN creates its primitive at a shape's first call
        for r in range(repeats):
            for backend in ("mkl", "onednn") if r % 2 == 0 else ("onednn", "mkl"):
                t0 = time.perf_counter()
                for _ in range(calls):
                    case(backend)
                best[backend] = min(best[backend], time.perf_counter() - t0)
        for backend in total:
            total[backend] += best[backend] / calls
    return total


def calibrate(
    linear_shapes: Iterable[tuple[int, int, int]],
    ensemble_shapes: Iterable[tuple[int, int, int, int]] = (),
    repeats: int = 5,
    margin: float = 0.10,
) -> dict[str, dict]:
    """Time MKL against oneDNN at the given shapes (forward and backward of each GEMM) and choose, per kind, the faster.

    ``linear_shapes``: (rows, in, out) of the linear layers; ``ensemble_shapes``: (members, rows, in, out) of the
    batched ensemble layers. oneDNN is chosen only when it is more than ``margin`` faster in total (ties keep ATen's
    default; the margin also covers what GEMMs timed alone miss: the Python autograd Function around each oneDNN call
    costs a step ~10-20% at batch 64 on a CPU where both kernels run at the same speed), and never where it is
    unavailable. Returns ``{"linear": {"choice", "mkl_s", "onednn_s"}, "ensemble":
    ...}`` (an empty kind chooses MKL).
    """
    gen = torch.Generator().manual_seed(0)

    def tensors(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).requires_grad_(True)

    def linear_case(rows: int, d_in: int, d_out: int) -> Callable[[str], None]:
        x, w, b = tensors(rows, d_in), tensors(d_out, d_in), tensors(d_out)
        return lambda backend: _fwd_bwd(lambda *a: linear(*a, backend), x, w, b)

    def ensemble_case(members: int, rows: int, d_in: int, d_out: int) -> Callable[[str], None]:
        x, w, b = tensors(members, rows, d_in), tensors(members, d_in, d_out), tensors(members, d_out)
        return lambda backend: _fwd_bwd(lambda *a: ensemble_linear(*a, backend), x, w, b)

    kinds = {
        "linear": [linear_case(*s) for s in sorted(set(linear_shapes))],
        "ensemble": [ensemble_case(*s) for s in sorted(set(ensemble_shapes))],
    }
    out = {}
    with torch.enable_grad():
        for kind, cases in kinds.items():
            if not cases or not onednn_available():
                out[kind] = {"choice": "mkl", "mkl_s": None, "onednn_s": None}
                continue
            secs = _time_kinds(cases, repeats)
            choice = "onednn" if secs["onednn"] < (1.0 - margin) * secs["mkl"] else "mkl"
            out[kind] = {"choice": choice, "mkl_s": secs["mkl"], "onednn_s": secs["onednn"]}
    return out
