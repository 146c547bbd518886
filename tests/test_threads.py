"""training.threads: the intra-op thread count follows the cores that other processes leave free."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time

import pytest
import torch

from helpers import toy_fit
from trqam_lit.training import threads
from trqam_lit.training.threads import CpuTimes, ThreadBudget, free_cores, read_cpu_times, threads_for

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_free_cores_subtract_what_other_processes_used():
    before = CpuTimes(busy=100.0, own=10.0, wall=0.0)
    # 2 s on 2 cores: the cores were busy for 4 CPU-seconds, 1 of them ours -> others used 1.5 cores
    assert free_cores(before, CpuTimes(104.0, 11.0, 2.0), cores=2) == pytest.approx(0.5)
    assert free_cores(before, CpuTimes(102.0, 12.0, 2.0), cores=2) == pytest.approx(2.0)  # all the busy time ours
    assert free_cores(before, CpuTimes(120.0, 10.0, 2.0), cores=2) == 0.0  # never negative
    assert free_cores(before, CpuTimes(100.0, 10.0, 0.0), cores=2) == 2.0  # no time elapsed: no evidence


@pytest.mark.parametrize(("free", "expected"), [(0.0, 1), (0.49, 1), (0.6, 1), (1.4, 1), (1.51, 2), (2.0, 2), (9, 2)])
def test_one_thread_per_free_core_at_least_one(free, expected):
    assert threads_for(free, cores=2) == expected


def test_the_counters_are_read_for_the_allowed_cores_only(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sysconf", lambda name: 100)
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  999 999 999 999 999 999 999 0 0 0\n"
        "cpu0 100 10 20 500 7 1 2 50 0 0\n"  # user nice system idle iowait irq softirq steal
        "cpu1 300 0 0 100 0 0 0 0 0 0\n"
        "cpu2 50 0 50 0 0 0 0 0 0 0\n"
        "intr 12345\n"
    )
    self_stat = tmp_path / "self"
    self_stat.write_text("4242 (python x) y) R 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0\n")  # utime 250, stime 50
    t = read_cpu_times([0, 2], stat=str(stat), self_stat=str(self_stat))
    assert t.busy == pytest.approx((100 + 10 + 20 + 1 + 2 + 50 + 50) / 100)  # cpu0 and cpu2, no idle/iowait/steal
    assert t.own == pytest.approx(3.0)


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@linux
def test_the_real_counters_see_this_process_and_its_neighbours():
    cores = threads.allowed_cores()
    a = read_cpu_times(cores)
    deadline = time.monotonic() + 30
    while (b := read_cpu_times(cores)).own - a.own < 0.3 and time.monotonic() < deadline:
        _spin(0.05)  # CPU time, not wall time: on a loaded machine this process gets a share of a core
    assert b.own - a.own >= 0.3  # our own spinning shows up in our counter ...
    assert b.busy - a.busy >= b.own - a.own - 0.05  # ... and in the cores' busy time
    # A busy process on every allowed core, this one asleep: nothing is free, one thread.
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_spin, args=(30.0,)) for _ in cores]
    for w in workers:
        w.start()
    try:
        time.sleep(1.0)  # past their start-up
        a = read_cpu_times(cores)
        time.sleep(1.5)
        b = read_cpu_times(cores)
    finally:
        for w in workers:
            w.kill()
            w.join()
    free = free_cores(a, b, len(cores))
    assert free <= 0.5 * len(cores), free
    assert threads_for(free, len(cores)) <= max(1, len(cores) // 2)


def test_a_training_gives_up_threads_while_others_are_busy_and_takes_them_back(monkeypatch):
    for var in threads.USER_THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv(threads.ENV_VAR, raising=False)
    monkeypatch.setattr(threads, "allowed_cores", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    # Scripted readings of a 4-core machine, 1 s apart: our process uses 1 core throughout; the others use 3 cores
    # (steps 1-3), then 1 core, then nothing.
    others = [3, 3, 3, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    readings, busy, own = [], 0.0, 0.0
    for i, o in enumerate([0, *others]):
        busy, own = busy + o + 1, own + 1
        readings.append(CpuTimes(busy, own, float(i)))
    readings.insert(0, CpuTimes(0.0, 0.0, 0.0))  # setup's check that the counters can be read
    monkeypatch.setattr(threads, "read_cpu_times", lambda cores: readings.pop(0))
    budget = ThreadBudget(interval=0.0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        toy_fit(len(others), [budget])
        seen, after = budget.history, torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert budget.enabled
    changes = [t for _, t in seen[1:]]
    assert changes == [1, 3, 4], seen  # free 1 -> 1 thread; free 3 -> 3; free 4 -> all
    assert after == 4  # torch's own count, not only the callback's record
    steps = [s for s, _ in seen[1:]]
    assert steps == sorted(steps) and steps[0] <= 2


def test_a_user_choice_of_threads_switches_it_off(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.user_chose_threads()
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setenv(threads.ENV_VAR, "fixed")
    assert threads.user_chose_threads()
    monkeypatch.setenv(threads.ENV_VAR, "auto")
    assert not threads.user_chose_threads()
    monkeypatch.setenv(threads.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match="TRQAM_THREADS"):
        threads.user_chose_threads()
    monkeypatch.setenv(threads.ENV_VAR, "fixed")
    budget = ThreadBudget(interval=0.0)
    toy_fit(3, [budget])
    assert budget.enabled is False and budget.history == []


def test_a_step_computes_the_same_numbers_with_one_and_two_threads():
    # Why changing threads mid-run is safe for reproducibility (exact resume): at our networks' shapes MKL's GEMMs
    # split rows and columns over threads, never the reduction, so the step is bitwise the same.
    from trqam_lit.agents import TRQAM

    def step(n: int) -> list[torch.Tensor]:
        torch.set_num_threads(n)
        torch.manual_seed(0)
        model = TRQAM(obs_dim=37, action_dim=25, horizon=5, actor_hidden_dims=[256] * 2, critic_hidden_dims=[256] * 2,
                      num_critics=2, sde_solver="fused")  # fmt: skip
        g = torch.Generator().manual_seed(1)
        batch = {"observations": torch.randn(64, 37, generator=g), "actions": torch.rand(64, 25, generator=g) * 2 - 1,
                 "rewards": -torch.rand(64, generator=g), "masks": torch.ones(64), "valid": torch.ones(64),
                 "next_observations": torch.randn(64, 37, generator=g)}  # fmt: skip
        torch.manual_seed(5)
        loss = model.fine_tune_loss(batch)[0]
        loss.backward()
        return [loss.detach(), *(p.grad for p in model.parameters() if p.grad is not None)]

    before = torch.get_num_threads()
    try:
        one, two = step(1), step(2)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)
