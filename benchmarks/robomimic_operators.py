"""Scripted robosuite operators: success rate, episode length and simulation speed per task and style.

    python benchmarks/robomimic_operators.py [--episodes 20] [--tasks lift can square] [--styles ...] [--env-seed 0]

One environment per task (seeded with --env-seed, reset between episodes, so object placements differ per episode);
episode i's operator draws from ``np.random.default_rng(i)``. An episode ends at the first success or at MAX_STEPS,
as in the datasets built from these operators. Runs in one process: steps/s is the single-core rate of the operator
and the simulator together, the number that sizes dataset generation.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from trqam_lit.data.robomimic_operators import MAX_STEPS, STYLES, TASKS, ScriptedOperator, make_robosuite_env


def run(task: str, style: str, episodes: int, env_seed: int) -> dict[str, float]:
    env = make_robosuite_env(task, seed=env_seed)
    successes, lengths, steps, seconds = [], [], 0, 0.0
    for episode in range(episodes):
        env.reset()
        operator = ScriptedOperator(task, style, np.random.default_rng(episode))
        operator.reset(env)
        start = time.perf_counter()
        success, length = False, 0
        while not success and length < MAX_STEPS[task]:
            env.step(operator.act(env))
            length += 1
            success = bool(env._check_success())
        seconds += time.perf_counter() - start
        steps += length
        successes.append(success)
        lengths.append(length)
    ok = np.array(successes)
    length = np.array(lengths, dtype=np.float64)
    return {
        "success": float(ok.mean()),
        "length": float(length.mean()),
        "length_ok": float(length[ok].mean()) if ok.any() else float("nan"),
        "steps_per_s": steps / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--styles", nargs="+", default=list(STYLES), choices=STYLES)
    parser.add_argument("--env-seed", type=int, default=0)
    args = parser.parse_args()
    print(f"episodes per cell: {args.episodes}, env seed {args.env_seed}")
    print(f"{'task':8s} {'style':8s} {'success':>8s} {'mean len':>9s} {'len|succ':>9s} {'steps/s':>8s}")
    for task in args.tasks:
        for style in args.styles:
            r = run(task, style, args.episodes, args.env_seed)
            print(
                f"{task:8s} {style:8s} {r['success']:8.2f} {r['length']:9.1f} {r['length_ok']:9.1f} "
                f"{r['steps_per_s']:8.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
