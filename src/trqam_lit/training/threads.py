"""Intra-op threads sized to the cores nobody else is using (docs/performance.md, "Several trainings").

PyTorch's OpenMP threads spin-wait between parallel regions: with more busy threads than cores (two 2-thread trainings
on 2 cores) the spinning threads take the cores from the ones doing work and a run keeps ~8% of its quiet speed. A
fixed single thread avoids that but costs up to half the quiet speed at larger shapes. :class:`ThreadBudget` measures
instead: every few seconds it reads how much CPU time the allowed cores spent busy (``/proc/stat``) and how much of
that was this process's (``/proc/self/stat``); what the other processes used is not free, and the training keeps one
thread per free core (at least one). Two trainings started side by side each settle at half the cores; when one ends
the other takes the machine back.

Linux only (elsewhere, or when the counters cannot be read, it leaves torch's threads alone). Switched off when the
user chose the threads: ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` set, or ``TRQAM_THREADS=fixed``. A TRQAM step at
the CPU-small shapes is bitwise the same with 1 and 2 threads (tests/test_threads.py), but not every kernel at every
shape is (a GEMM may split its reduction over threads): for runs that must match bit for bit (a rerun, a resume on a
machine whose load changed), fix the thread count. Each change is announced on stderr.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch

ENV_VAR = "TRQAM_THREADS"
USER_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def allowed_cores() -> list[int]:
    """The CPUs this process may run on (its affinity mask)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def cgroup_cpu_limit(root: str | os.PathLike = "/sys/fs/cgroup") -> float | None:
    """The container's CPU quota in cores (cgroup v2 ``cpu.max``), None when unlimited or unknown."""
    try:
        quota, period = Path(root, "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative CPU seconds: busy on the allowed cores (every process), and this process's own."""

    busy: float
    own: float
    wall: float


def read_cpu_times(cores: list[int], stat: str = "/proc/stat", self_stat: str = "/proc/self/stat") -> CpuTimes:
    """Busy seconds of ``cores`` (user, nice, system, irq, softirq: not idle, iowait or steal) and this process's
    user + system seconds (all its threads), from the kernel's counters. Raises OSError where they are missing."""
    tick = os.sysconf("SC_CLK_TCK")
    wanted = {f"cpu{c}" for c in cores}
    busy = 0
    with open(stat) as f:
        for line in f:
            name, *fields = line.split()
            if name in wanted:
                user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
                busy += user + nice + system + irq + softirq
    with open(self_stat) as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may contain spaces
    own = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return CpuTimes(busy / tick, own / tick, time.monotonic())


def free_cores(before: CpuTimes, after: CpuTimes, cores: float) -> float:
    """Cores left over by the other processes between two readings: ``cores`` minus what the machine was busy with
    besides this process (never negative)."""
    elapsed = after.wall - before.wall
    if elapsed <= 0:
        return cores
    others = ((after.busy - before.busy) - (after.own - before.own)) / elapsed
    return max(0.0, cores - max(0.0, others))


def threads_for(free: float, cores: int) -> int:
    """One thread per free core, rounding a core that is more than half free up; at least 1, at most ``cores``."""
    return max(1, min(cores, math.floor(free + 0.5)))


def user_chose_threads() -> bool:
    """Whether the user fixed the thread count (``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``, ``TRQAM_THREADS=fixed``)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower()
    if value not in ("auto", "fixed"):
        raise ValueError(f"{ENV_VAR}={value!r}: expected 'auto' or 'fixed'")
    return value == "fixed" or any(os.environ.get(v) for v in USER_THREAD_VARS)


class ThreadBudget(pl.Callback):
    """Keeps torch's intra-op threads at the number of cores the other processes leave free (module docstring).

    Args:
        interval: seconds of training between two measurements.
        enabled: None decides from the environment (off when the user fixed the threads, on CPU runs otherwise).
    """

    def __init__(self, interval: float = 2.0, enabled: bool | None = None) -> None:
        self.interval = interval
        self.enabled = enabled
        self._cores: list[int] = []
        self._capacity = 0
        self._last: CpuTimes | None = None
        self.history: list[tuple[int, int]] = []  # (global step, threads) at each change

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.enabled is None:
            self.enabled = trainer.strategy.root_device.type == "cpu" and not user_chose_threads()
        if not self.enabled:
            return
        self._cores = allowed_cores()
        limit = cgroup_cpu_limit()
        self._capacity = len(self._cores) if limit is None else max(1, min(len(self._cores), math.floor(limit)))
        try:
            read_cpu_times(self._cores)
        except (OSError, ValueError, IndexError):
            self.enabled = False  # no /proc (not Linux): torch's own default stays

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.enabled and self._last is None:
            self._last = read_cpu_times(self._cores)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._last = None  # evaluation's own pattern (environment workers) says nothing about training's neighbours

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.enabled or self._last is None or time.monotonic() - self._last.wall < self.interval:
            return
        now = read_cpu_times(self._cores)
        threads = threads_for(free_cores(self._last, now, self._capacity), self._capacity)
        self._last = now
        if threads != torch.get_num_threads():
            if not self.history:
                self.history.append((trainer.global_step, torch.get_num_threads()))
            if trainer.is_global_zero:
                print(f"trqam-lit: {threads} intra-op thread(s) from step {trainer.global_step}: the other processes "
                      f"leave {threads} of {self._capacity} cores free (OMP_NUM_THREADS fixes the count)",
                      file=sys.stderr, flush=True)  # fmt: skip
            torch.set_num_threads(threads)
            self.history.append((trainer.global_step, threads))
