"""Online-phase throughput: environment steps per second at UTD 1, and where the time goes.

    python benchmarks/online.py                                   # CPU-sized fixture config, 600 online steps
    python benchmarks/online.py --online-steps 2000 --utd 2
    python benchmarks/online.py --config configs/model/trqam.yaml --config configs/data/cube-double.yaml \\
        --config configs/online/paper.yaml --device cuda -- \\
        --data.init_args.dataset_dir /data/ogbench --trainer.precision bf16-mixed

Runs the real `trqam-lit fit` in-process: a few offline steps (so the agent is past its BC warm-up and trains the
full TRQAM update), then the online phase. After the ``--start-training`` burst it times every online update
(``training_step``, backward, optimizer step, dual step: "grad"), the environment (``env.step`` and resets:
"env"), the policy's action chunks (``pl_module.act``: "act"), and the rest (batch draws, buffer writes,
Lightning hooks, logging: "other"). Evaluation is off. One JSON line; compare figures only from one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config", action="append", help="a config; repeat to compose (default: configs/online/cpu-fixture.yaml)"
    )
    p.add_argument("--online-steps", type=int, default=600)
    p.add_argument("--start-training", type=int, default=100)
    p.add_argument("--utd", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("extra", nargs="*", help="more trqam-lit overrides (after --)")
    args = p.parse_args()
    os.environ.setdefault("MUJOCO_GL", "disable")

    import lightning.pytorch as pl
    import torch

    from trqam_lit.cli import build_cli
    from trqam_lit.training.online import OnlinePhase

    class GradTimer(pl.Callback):
        """Wall time between the start and the end of each online update (first in the callback list, so the
        environment steps that OnlinePhase runs in on_train_batch_end are outside it)."""

        def __init__(self) -> None:
            self.grad, self.updates, self.t0, self.start = 0.0, 0, None, None

        def _sync(self) -> None:
            if torch.cuda.is_available() and args.device == "cuda":
                torch.cuda.synchronize()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._sync()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._sync()
            if self.start is not None:
                self.grad += time.perf_counter() - self.t0
                self.updates += 1

    offline = 10
    configs = args.config or [str(REPO / "configs" / "online" / "cpu-fixture.yaml")]
    with tempfile.TemporaryDirectory() as root:
        cli = build_cli(
            [
                *(a for c in configs for a in ("--config", c)),
                f"--trainer.max_steps={offline}", "--model.init_args.bc_warmup_steps=5",
                f"--online.online_steps={args.online_steps}", f"--online.start_training={args.start_training}",
                f"--online.utd_ratio={args.utd}", "--trainer.limit_val_batches=0",
                "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                f"--trainer.logger.init_args.save_dir={root}", "--checkpoint.every_n_train_steps=0",
                f"--trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
                *args.extra,
            ],
            run=False,
        )  # fmt: skip
        timer = GradTimer()
        cli.trainer.callbacks.insert(0, timer)
        (online,) = [c for c in cli.trainer.callbacks if isinstance(c, OnlinePhase)]

        class Window(pl.Callback):
            """Opens the measured window after the burst, i.e. once the first online update is about to run."""

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                if timer.start is None and online.buffer is not None:
                    timer.start = time.perf_counter()
                    self.env0, self.timers0 = online.env_steps, dict(online.timers)

        window = Window()
        cli.trainer.callbacks.insert(0, window)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        wall = time.perf_counter() - timer.start
        env_steps = online.env_steps - window.env0
        spent = {k: online.timers[k] - window.timers0[k] for k in ("env", "act")}
        spent["grad"] = timer.grad
        spent["other"] = wall - sum(spent.values())
        dm = cli.datamodule
        print(
            json.dumps(
                {
                    "config": [os.path.relpath(c, REPO) for c in configs],
                    "env": getattr(dm, "env_name", type(dm).__name__),
                    "device": args.device,
                    "threads": torch.get_num_threads(),
                    "utd_ratio": args.utd,
                    "measured_env_steps": env_steps,
                    "measured_updates": timer.updates,
                    "env_steps_per_sec": round(env_steps / wall, 2),
                    "updates_per_sec": round(timer.updates / wall, 2),
                    "share": {k: round(v / wall, 3) for k, v in spent.items()},
                    "ms_per_env_step": {k: round(1000 * v / max(env_steps, 1), 3) for k, v in spent.items()},
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
