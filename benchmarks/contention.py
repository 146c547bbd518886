"""Training steps/s on a quiet machine and beside a competing CPU-bound process, per thread setting.

    python benchmarks/contention.py                                  # CPU-small B 64 TRQAM: default, 1 and all
    python benchmarks/contention.py --threads 1 2 --wait-policies default passive spin:10000 --setting paper

For each (threads, OpenMP wait policy) the same measurement (``throughput.py``'s, in a fresh process) runs twice:
alone, then while a competitor runs (by default another training of the same shape with the same settings, as
when two runs share a machine). Prints one JSON line per setting with both rates and their ratio ("kept"); a
run that keeps less than half of its quiet rate has collapsed. Compare figures only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _env(threads: int, policy: str) -> dict[str, str]:
    """``active`` / ``passive`` set OMP_WAIT_POLICY; ``spin:N`` sets GOMP_SPINCOUNT=N (libgomp, torch's OpenMP).
    threads 0: no thread setting at all, what a user gets by default (training.threads.ThreadBudget decides)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TRQAM_THREADS"):
        env.pop(key, None)
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    if policy.startswith("spin:"):
        env["GOMP_SPINCOUNT"] = policy.split(":", 1)[1]
    elif policy != "default":
        env["OMP_WAIT_POLICY"] = policy.upper()
    return env


def _measure(setting: str, agent: str, steps: int, env: dict[str, str]) -> float:
    cmd = [sys.executable, str(HERE / "throughput.py"), "--one", f"{setting},{agent},fused", "--steps", str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])["steps_per_sec"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="cpu-small-b64")
    parser.add_argument("--agent", default="trqam")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="*",
        default=[0, *sorted({1, os.cpu_count() or 1})],
        help="0: no thread setting (the default path: training.threads.ThreadBudget sizes them)",
    )
    parser.add_argument(
        "--wait-policies", nargs="*", default=["default", "passive"], help="default, active, passive or spin:N"
    )
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    for threads in args.threads:
        for policy in args.wait_policies:
            env = _env(threads, policy)
            quiet = _measure(args.setting, args.agent, args.steps, env)
            competitor = subprocess.Popen(
                [sys.executable, str(HERE / "throughput.py"), "--one", f"{args.setting},{args.agent},fused",
                 "--steps", "100000"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            )  # fmt: skip
            try:
                time.sleep(15)  # past the competitor's start-up, into its training loop
                busy = _measure(args.setting, args.agent, args.steps, env)
            finally:
                competitor.kill()
                competitor.wait()
            row = {"setting": args.setting, "agent": args.agent, "threads": threads, "omp_wait_policy": policy}
            row.update(quiet_steps_per_sec=quiet, busy_steps_per_sec=busy, kept=round(busy / quiet, 2))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
