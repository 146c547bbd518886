"""float32 GEMM speed, MKL (ATen's addmm/mm/bmm) against oneDNN (``torch.ops.mkldnn._linear_pointwise``), at the
shapes of our networks: each distinct (rows, in, out) of a setting's linear layers (rows B and K x B) and (E, B, in,
out) of its critic ensemble, forward, input gradient and weight gradient in GFLOP/s; then what the calibration of a
TRQAM agent at that setting chooses (``FlowAgent.configure_gemm``, as at the Trainer's first batch).

    python benchmarks/gemm.py --settings cpu-small-b64 cpu-small-b256 paper
"""

from __future__ import annotations

import argparse
import time

import torch

from throughput import SETTINGS  # the benchmarks' shared shapes
from trqam_lit.agents import TRQAM
from trqam_lit.math import gemm
from trqam_lit.math.nets import gemm_shapes


def best_seconds(fn, repeats: int = 7, calls: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def linear_row(rows: int, d_in: int, d_out: int) -> str:
    x, w, b, g = torch.randn(rows, d_in), torch.randn(d_out, d_in), torch.randn(d_out), torch.randn(rows, d_out)
    lp = gemm._lp
    ops = {
        "fwd": (lambda: torch.addmm(b, x, w.t()), lambda: lp(x, w, b)),
        "d_in": (lambda: g @ w, lambda: lp(g, w.t(), None)),
        "d_w": (lambda: g.t() @ x, lambda: lp(g.t(), x.t(), None)),
    }
    gflop = 2 * rows * d_in * d_out / 1e9
    cells = [f"{name} {gflop / best_seconds(m):5.0f} / {gflop / best_seconds(o):5.0f}" for name, (m, o) in ops.items()]
    return f"linear {rows:5d} x {d_in:4d} x {d_out:4d}: " + " | ".join(cells)


def ensemble_row(members: int, rows: int, d_in: int, d_out: int) -> str:
    x, w, b = torch.randn(members, rows, d_in), torch.randn(members, d_in, d_out), torch.randn(members, d_out)
    g = torch.randn(members, rows, d_out)
    ops = {
        "fwd": (lambda: gemm.ensemble_linear(x, w, b, "mkl"), lambda: gemm.ensemble_linear(x, w, b, "onednn")),
        "d_in": (
            lambda: gemm.ensemble_matmul_weight_t(g, w, "mkl"),
            lambda: gemm.ensemble_matmul_weight_t(g, w, "onednn"),
        ),
    }
    gflop = 2 * members * rows * d_in * d_out / 1e9
    cells = [f"{name} {gflop / best_seconds(m):5.0f} / {gflop / best_seconds(o):5.0f}" for name, (m, o) in ops.items()]
    return f"ensemble {members:2d} x {rows:4d} x {d_in:4d} x {d_out:4d}: " + " | ".join(cells)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["cpu-small-b64", "cpu-small-b256", "paper"], choices=SETTINGS)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GFLOP/s as MKL / oneDNN")
    for setting in args.settings:
        B, obs, A, H, width, critics, _ = SETTINGS[setting]
        torch.manual_seed(0)
        model = TRQAM(obs_dim=obs, action_dim=A, horizon=H, actor_hidden_dims=[width] * 4,
                      critic_hidden_dims=[width] * 4, num_critics=critics, sde_solver="fused")  # fmt: skip
        linear, ensemble = gemm_shapes(model)
        print(f"== {setting} (B {B}, K {model.flow_steps})")
        for rows in sorted({B, model.flow_steps * B}):
            for d_in, d_out in sorted(linear):
                print(linear_row(rows, d_in, d_out))
        for members, d_in, d_out in sorted(ensemble):
            print(ensemble_row(members, B, d_in, d_out))
        t0 = time.perf_counter()
        choice = model.configure_gemm(B)
        took = time.perf_counter() - t0
        for kind, c in choice.items():
            timed = c.get("mkl_s") is not None
            timing = f" (MKL {c['mkl_s'] * 1e3:.2f} ms, oneDNN {c['onednn_s'] * 1e3:.2f} ms)" if timed else ""
            print(f"calibration, {kind} layers: {c['choice']}{timing}")
        print(f"calibration took {took:.2f} s")


if __name__ == "__main__":
    main()
