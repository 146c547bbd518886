"""Paired A/B speed of one agent's fine-tuning step in two checkouts (e.g. before and after a change), robust to a
machine whose speed drifts: two worker processes, one per checkout (``PYTHONPATH=<checkout>/src``), take turns running
``--steps`` steps (the order alternates), and the result is the median of the paired ratios B/A.

    before=$(mktemp -d) && git worktree add "$before" <commit>
    python benchmarks/ab_step.py --a "$before" --b . --setting cpu-small-b64 --agent trqam --steps 20 --pairs 30
    python benchmarks/ab_step.py --a "$before" --b . --setting paper --agent trqam --steps 3 --pairs 16

A step is the agent's ``fine_tune_loss`` on a fixed random batch of the setting's shapes, its backward and an Adam step
(no Trainer: the step's compute, not Lightning's per-step overhead, which ``benchmarks/throughput.py`` includes).
Both checkouts must have ``trqam_lit.agents.AGENTS``. A checkout with ``configure_gemm`` chooses its GEMM kernel as
the Trainer's first batch would (``TRQAM_GEMM=mkl|onednn`` in the environment forces one; the other checkout
ignores it if it predates the switch).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from throughput import SETTINGS, synthetic_batch  # the benchmarks' shared shapes and batches


def worker(setting: str, agent: str) -> None:
    """Build the agent, answer each line ``N`` on stdin with the seconds N steps took."""
    import torch

    from trqam_lit.agents import AGENTS, AdjointMatchingAgent

    _, obs, A, H, width, critics, _ = SETTINGS[setting]
    torch.manual_seed(0)
    kwargs = dict(obs_dim=obs, action_dim=A, horizon=H, actor_hidden_dims=[width] * 4, critic_hidden_dims=[width] * 4,
                  num_critics=critics)  # fmt: skip
    cls = AGENTS[agent]
    if issubclass(cls, AdjointMatchingAgent):
        kwargs["sde_solver"] = "fused"  # at batch 64 the fused loop is the faster one (docs/performance.md)
    model = cls(**kwargs)
    batch = synthetic_batch(setting, torch.Generator().manual_seed(1))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    if hasattr(model, "configure_gemm"):  # what the Trainer's first batch does (checkouts that have the switch)
        choice = model.configure_gemm(batch["observations"].shape[0])
        print("gemm:", {kind: c["choice"] for kind, c in choice.items()}, file=sys.stderr, flush=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model.fine_tune_loss(batch)[0].backward()
        opt.step()

    for _ in range(3):
        step()
    print("ready", flush=True)
    for line in sys.stdin:
        t0 = time.perf_counter()
        for _ in range(int(line)):
            step()
        print(time.perf_counter() - t0, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, help="checkout A (the baseline)")
    p.add_argument("--b", required=True, help="checkout B")
    p.add_argument("--setting", default="cpu-small-b64", choices=list(SETTINGS))
    p.add_argument("--agent", default="trqam")
    p.add_argument("--steps", type=int, default=20, help="steps per turn")
    p.add_argument("--pairs", type=int, default=30)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.setting, args.agent)
        return
    procs = {}
    for name, root in (("a", args.a), ("b", args.b)):
        env = {**os.environ, "PYTHONPATH": str(Path(root).resolve() / "src")}
        cmd = [sys.executable, __file__, "--worker", "--a", args.a, "--b", args.b, "--setting", args.setting,
               "--agent", args.agent]  # fmt: skip
        procs[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        if procs[name].stdout.readline().strip() != "ready":
            raise SystemExit(f"checkout {name} ({root}) failed to build {args.agent}")
    rates: dict[str, list[float]] = {"a": [], "b": []}
    ratios = []
    for i in range(args.pairs):
        got = {}
        for name in ("a", "b") if i % 2 == 0 else ("b", "a"):
            procs[name].stdin.write(f"{args.steps}\n")
            procs[name].stdin.flush()
            got[name] = args.steps / float(procs[name].stdout.readline())
            rates[name].append(got[name])
        ratios.append(got["b"] / got["a"])
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    q1, med, q3 = statistics.quantiles(ratios, n=4)
    print(f"{args.setting} {args.agent}: A {statistics.median(rates['a']):.2f} steps/s, B "
          f"{statistics.median(rates['b']):.2f} steps/s; B/A median of {args.pairs} paired turns {med:.3f} "
          f"(quartiles {q1:.3f}, {q3:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
