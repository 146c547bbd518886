"""Training throughput (steps/s, peak memory) of every agent of trqam_lit.agents.AGENTS, and evaluation environment
steps/s.

    python benchmarks/throughput.py                       # every setting and agent, CPU, each agent's default path
    python benchmarks/throughput.py --settings cpu-small-b64 --agents trqam --solvers fused torchsde
    python benchmarks/throughput.py --device cuda --precision bf16-mixed --settings paper
    python benchmarks/throughput.py --eval-env cube-single-play-singletask-task1-v0

Each (setting, agent, solver) runs in its own subprocess (so peak RSS is its own) through the real Lightning
Trainer on synthetic batches of the right shapes; after `--warmup` steps the timer covers `--repeats` windows of
`--steps` optimizer steps each and reports the median window's steps/s (and every window's in `rates`), as the
JAX harness does. `--compile` sets `compile_step` for the AM agents. One JSON line per measurement. Compare
figures only as ratios from one run on one machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

T_PROCESS = time.perf_counter()  # torch and Lightning are imported later: their import counts towards the first step

SETTINGS = {
    # name: (batch, obs_dim, action chunk A, horizon, width, critics, K)
    "paper": (256, 37, 25, 5, 512, 10, 10),
    "cpu-small-b256": (256, 37, 25, 5, 256, 2, 10),
    "cpu-small-b64": (64, 37, 25, 5, 256, 2, 10),
}


def synthetic_batch(setting: str, gen):
    """A random batch of ``setting``'s shapes (observations, chunk actions in [-1, 1], rewards, masks, validity)."""
    import torch

    batch, obs, act = SETTINGS[setting][:3]
    return {
        "observations": torch.randn(batch, obs, generator=gen),
        "actions": torch.rand(batch, act, generator=gen) * 2 - 1,
        "rewards": -torch.rand(batch, generator=gen),
        "masks": torch.ones(batch),
        "valid": torch.ones(batch),
        "next_observations": torch.randn(batch, obs, generator=gen),
    }


def registry() -> tuple[dict, set[str]]:
    """(trqam_lit.agents.AGENTS, the names of the agents that have an SDE solver to choose); imported when asked,
    so a measurement's import of torch and Lightning counts towards its first step."""
    from trqam_lit.agents import AGENTS, AdjointMatchingAgent

    return AGENTS, {name for name, cls in AGENTS.items() if issubclass(cls, AdjointMatchingAgent)}


def measure(
    setting: str,
    agent: str,
    solver: str,
    steps: int,
    warmup: int,
    device: str,
    precision: str,
    compiled: bool | None = None,
    repeats: int = 1,
    matmul_precision: str = "ieee",
) -> dict:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from trqam_lit.training.callbacks import MatmulPrecision
    from trqam_lit.training.threads import ThreadBudget

    batch, obs, act, horizon, width, critics, K = SETTINGS[setting]

    class Synthetic(IterableDataset):
        def __iter__(self):
            gen = torch.Generator().manual_seed(0)
            pool = [synthetic_batch(setting, gen) for _ in range(8)]
            i = 0
            while True:
                yield pool[i % 8]
                i += 1

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.first: float | None = None
            self.marks: list[float] = []  # times after warmup, warmup + steps, ..., warmup + repeats * steps

        def on_train_batch_end(self, trainer, *args) -> None:
            if self.first is None:
                self.first = time.perf_counter() - T_PROCESS
            done = trainer.global_step - warmup
            if done >= 0 and done % steps == 0:
                if device == "cuda":
                    torch.cuda.synchronize()
                self.marks.append(time.perf_counter())

    common = dict(obs_dim=obs, action_dim=act, horizon=horizon, actor_hidden_dims=[width] * 4, flow_steps=K)
    agents, sde_agents = registry()
    cls = agents[agent]  # every agent at its defaults
    rl = dict(critic_hidden_dims=[width] * 4, num_critics=critics) if cls.uses_critic else {}
    if agent in sde_agents:  # "default" / None: what the agent's defaults give (the path a config gets by default)
        rl.update({} if solver == "default" else {"sde_solver": solver})
        rl.update({} if compiled is None else {"compile_step": compiled})
    model = cls(**common, **rl)
    timer = Timer()
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_steps=warmup + steps * repeats,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, MatmulPrecision(matmul_precision), ThreadBudget()],  # ThreadBudget: as the CLI's default
    )
    trainer.fit(model, train_dataloaders=DataLoader(Synthetic(), batch_size=None))
    rates = [steps / (b - a) for a, b in zip(timer.marks[:-1], timer.marks[1:], strict=True)]
    out = {
        "setting": setting,
        "agent": agent,
        "solver": model.hparams.sde_solver if agent in sde_agents else None,
        "device": device,
        "precision": precision,
        "compiled": getattr(model, "compiles", False),
        "matmul_precision": matmul_precision,
        "threads": torch.get_num_threads(),
        "steps_per_sec": round(statistics.median(rates), 3),
        "rates": [round(r, 3) for r in rates],
        "start_to_first_step_s": round(timer.first, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if device == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["gpu"] = torch.cuda.get_device_name()
    return out


def measure_eval(env_name: str, num_envs: int, episodes: int, horizon: int, width: int, workers: int) -> dict:
    """Environment steps/s of the evaluator: in this process (``num_envs`` batched, and 1), with ``workers`` worker
    processes, and the physics limit (cores x one environment's stepping rate under a no-op policy)."""
    import numpy as np
    import torch

    from trqam_lit.data import OGBenchDataModule
    from trqam_lit.data.ogbench_env import make_ogbench_env
    from trqam_lit.math.flow import sample_actions
    from trqam_lit.math.nets import VelocityField
    from trqam_lit.training.evaluation import RolloutEvaluator

    dm = OGBenchDataModule(env_name=env_name, dataset_dir="fixture", horizon=horizon)
    net = VelocityField(dm.obs_dim, dm.chunk_dim, (width,) * 4)

    @torch.no_grad()
    def act(obs):
        return sample_actions(net, obs, torch.randn(obs.shape[0], dm.chunk_dim), 10)

    env = make_ogbench_env(env_name)  # the physics limit: one environment, no policy at all
    rng = np.random.default_rng(0)
    low, high = env.action_space.low.astype(np.float32), env.action_space.high.astype(np.float32)

    def one_env_rate(action) -> float:
        env.reset(seed=0)
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 5.0:
            _, _, terminated, truncated, _ = env.step(action())
            steps += 1
            if terminated or truncated:
                env.reset(seed=steps)
        return steps / (time.perf_counter() - t0)

    noop = np.zeros(dm.action_dim, dtype=np.float32)
    one_env = one_env_rate(lambda: noop)
    moving = one_env_rate(lambda: rng.uniform(low, high).astype(np.float32))  # the arm moves: more contacts to solve
    cores = len(os.sched_getaffinity(0))
    result = {"env": env_name, "episodes": episodes, "horizon": horizon, "policy_width": width, "cores": cores}
    result["one_env_noop_steps_per_sec"] = round(one_env, 1)
    result["one_env_random_actions_steps_per_sec"] = round(moving, 1)
    result["physics_limit_steps_per_sec"] = round(cores * one_env, 1)

    def free(obs):  # a policy that costs nothing: uniform random chunks (the work left is physics and transport)
        return torch.as_tensor(rng.uniform(-1, 1, (obs.shape[0], dm.chunk_dim)).astype(np.float32))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the evaluator runs the policy beside its workers
    obs = torch.randn(num_envs, dm.obs_dim)
    for _ in range(5):
        act(obs)
    t0 = time.perf_counter()
    for _ in range(20):
        act(obs)
    result["policy_ms_per_call"] = round((time.perf_counter() - t0) / 20 * 1e3, 2)
    torch.set_num_threads(threads)
    workers_name = f"{num_envs}env_{workers}workers"
    runs = [(f"{num_envs}env", num_envs, 0, act), ("1env", 1, 0, act), (workers_name, num_envs, workers, act),
            (f"{workers_name}_no_policy", num_envs, workers, free)]  # fmt: skip
    for name, n, w, fn in runs:
        make_env = functools.partial(make_ogbench_env, env_name)
        ev = RolloutEvaluator(make_env, horizon, dm.action_dim, num_episodes=episodes, num_envs=n, workers=w)
        ev.envs(n)  # environment construction (and worker start) is not stepping time
        t0 = time.perf_counter()
        out = ev.evaluate(fn)
        dt = time.perf_counter() - t0
        ev.close()
        result[f"env_steps_per_sec_{name}"] = round(float(out["length"].sum()) / dt, 1)
    result["batched_over_single"] = round(
        result[f"env_steps_per_sec_{num_envs}env"] / result["env_steps_per_sec_1env"], 2
    )
    limit = result["physics_limit_steps_per_sec"]
    result["workers_over_physics_limit"] = round(result[f"env_steps_per_sec_{workers_name}"] / limit, 2)
    no_policy = result[f"env_steps_per_sec_{workers_name}_no_policy"]
    result["no_policy_workers_over_physics_limit"] = round(no_policy / limit, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    agents, sde_agents = registry()
    parser.add_argument("--agents", nargs="*", default=list(agents), choices=list(agents))
    parser.add_argument(
        "--solvers", nargs="*", default=["default"], choices=["default", "fused", "torchsde"],
        help="default: the agent's own (no --solvers, --compile or --precision: the path a config gets by default)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="timed windows of --steps steps; the median is reported")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument(
        "--compile", action="store_true", default=None,
        help="compile_step=True for the AM agents (fused: one graph; torchsde: eager rollout, the rest compiled); "
        "without it, the agents' default (auto: eager for a benchmark's few steps)",
    )  # fmt: skip
    parser.add_argument(
        "--matmul-precision",
        default="ieee",
        choices=["ieee", "bf16", "tf32"],
        help="internal precision of float32 matmuls (training.callbacks.MatmulPrecision): bf16 on CPUs with native "
        "bf16, tf32 on CUDA",
    )
    parser.add_argument("--eval-env", default=None, help="also measure evaluation env steps/s on this env")
    parser.add_argument("--eval-envs", type=int, default=10)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--eval-horizons", type=int, nargs="*", default=[1, 5], help="action-chunk lengths H")
    parser.add_argument("--eval-width", type=int, default=512, help="policy width (paper: 512)")
    parser.add_argument("--eval-workers", type=int, default=len(os.sched_getaffinity(0)), help="worker processes")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one measurement
    args = parser.parse_args()
    if args.one:
        setting, agent, solver = args.one.split(",")
        out = measure(
            setting, agent, solver, args.steps, args.warmup, args.device, args.precision, args.compile, args.repeats,
            args.matmul_precision,
        )  # fmt: skip
        print(json.dumps(out))
        return
    for setting in args.settings:
        for agent in args.agents:
            for solver in args.solvers if agent in sde_agents else ["default"]:
                one = f"{setting},{agent},{solver}"
                cmd = [sys.executable, __file__, "--one", one, "--steps", str(args.steps), "--warmup", str(args.warmup)]
                cmd += ["--repeats", str(args.repeats)]
                cmd += ["--device", args.device, "--precision", args.precision]
                cmd += ["--matmul-precision", args.matmul_precision]
                cmd += ["--compile"] if args.compile else []
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
                )
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                error = {"setting": setting, "agent": agent, "error": proc.stderr[-500:]}
                print(lines[-1] if lines else json.dumps(error), flush=True)
    if args.eval_env:
        for horizon in args.eval_horizons:
            result = measure_eval(
                args.eval_env, args.eval_envs, args.eval_episodes, horizon, args.eval_width, args.eval_workers
            )
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
