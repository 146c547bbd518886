"""Forward SDE rollout: fused Euler-Maruyama loop vs torchsde.sdeint, at the paper's and the CPU-sized shapes.

    python benchmarks/rollout.py [--repeats 20] [--threads N] [--device cpu|cuda]

Prints one JSON line per setting with milliseconds per rollout for both solvers and their ratio. Only the
ratio is meaningful across machines: both are measured in the same process on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from trqam_lit.math.nets import VelocityField
from trqam_lit.math.sde import FlowSDE, rollout

SETTINGS = {
    # name: (batch, chunk dim A, obs dim, width, K)
    "paper": (256, 25, 37, 512, 10),
    "cpu-small-b256": (256, 25, 37, 256, 10),
    "cpu-small-b64": (64, 25, 37, 256, 10),
}


def time_solver(solver: str, sde: FlowSDE, x0: torch.Tensor, eps: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(3):  # warm-up
            rollout(sde, x0, eps, solver)
        if x0.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            rollout(sde, x0, eps, solver)
        if x0.is_cuda:
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for name in args.settings:
        batch, act, obs, width, K = SETTINGS[name]
        v_ft = VelocityField(obs, act, (width,) * 4).to(args.device)
        v_base = VelocityField(obs, act, (width,) * 4).to(args.device)
        s = torch.randn(batch, obs, device=args.device)
        x0 = torch.randn(batch, act, device=args.device)
        eps = torch.randn(K - 1, batch, act, device=args.device)
        sde = FlowSDE(v_ft, v_base, s, K)
        fused = time_solver("fused", sde, x0, eps, args.repeats)
        tsde = time_solver("torchsde", sde, x0, eps, args.repeats)
        print(
            json.dumps(
                {
                    "setting": name,
                    "batch": batch,
                    "action_dim": act,
                    "obs_dim": obs,
                    "width": width,
                    "K": K,
                    "device": args.device,
                    "threads": torch.get_num_threads(),
                    "fused_ms": round(fused, 3),
                    "torchsde_ms": round(tsde, 3),
                    "torchsde_over_fused": round(tsde / fused, 3),
                }
            )
        )


if __name__ == "__main__":
    main()
