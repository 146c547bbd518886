"""`trqam-lit-exp run`: a real grid of `trqam-lit fit` processes, killed mid-way and resumed."""

from __future__ import annotations

import csv
import fcntl
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import read_scalars
from trqam_lit.tools.experiment import LOCK, Grid, print_commands, threads_per_job

STEPS = 40
AGENT = """
seed_everything: 0
trainer: {{accelerator: cpu, devices: 1, max_steps: {steps}, val_check_interval: {steps}, log_every_n_steps: 5,
          enable_progress_bar: false, enable_model_summary: false}}
checkpoint: {{every_n_train_steps: 10}}
model:
  class_path: trqam_lit.agents.{cls}
  init_args: {{sde_solver: fused, actor_hidden_dims: [16, 16], critic_hidden_dims: [16, 16], num_critics: 2,
              bc_warmup_steps: 10, {extra}}}
data:
  class_path: trqam_lit.data.ToyBanditDataModule
  init_args: {{action_dim: 1, std: 0.3, reward: linear, c: 3.0, batch_size: 32, eval_samples: 16}}
"""


def write_grid(tmp_path: Path) -> Path:
    (tmp_path / "trqam.yaml").write_text(AGENT.format(steps=STEPS, cls="TRQAM", extra="eps_kl: 0.05"))
    (tmp_path / "qam.yaml").write_text(AGENT.format(steps=STEPS, cls="QAM", extra="inv_temp: 1.0"))
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "name: tiny\nruns_dir: runs\nseeds: [0, 1]\nagents:\n  trqam: {config: trqam.yaml}\n  qam: {config: qam.yaml}\n"
    )
    return grid


def exp(*args: str, cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "MUJOCO_GL": "disable", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "trqam_lit.tools.experiment", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)  # fmt: skip


def wait_until_unlocked(run_dir: Path, deadline: float) -> None:
    """Until no process holds the run's lock (the runner's flock, inherited by its training)."""
    with open(run_dir / LOCK, "a") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                assert time.monotonic() < deadline, f"{run_dir / LOCK} is still held"
                time.sleep(0.1)
            else:
                fcntl.flock(lock, fcntl.LOCK_UN)
                return


def test_grid_names_its_runs_and_prints_one_resumable_command_each(tmp_path, capsys, monkeypatch):
    grid_path = write_grid(tmp_path)
    monkeypatch.chdir(tmp_path)
    grid = Grid.load(grid_path)
    names = [r.name for r in grid.runs]
    assert names == ["trqam/default/seed0", "trqam/default/seed1", "qam/default/seed0", "qam/default/seed1"]
    assert grid.runs[3].run_dir == Path("runs/tiny/qam/default/seed1")
    assert "--seed_everything=1" in grid.runs[3].fit_args()
    print_commands(grid, "grid.yaml")
    lines = capsys.readouterr().out.splitlines()
    # --threads 1: the runner sets each training's OMP_NUM_THREADS itself, so an OMP_NUM_THREADS prefix would be lost
    assert lines[0] == "trqam-lit-exp run grid.yaml --only trqam/default/seed0 --threads 1"
    assert len(lines) == 4
    assert threads_per_job(2, cores=2) == 1 and threads_per_job(1, cores=2) == 2 and threads_per_job(4, cores=2) == 1
    assert (
        threads_per_job(2, cores=3) == 1 and threads_per_job(4, cores=6) == 1
    )  # rounded down: jobs x threads <= cores
    # the cores are the ones this process may use (a SLURM cpuset, taskset), not the machine's
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert threads_per_job(1) == 1


def test_a_bad_grid_is_refused_with_a_message(tmp_path):
    (tmp_path / "grid.yaml").write_text("name: x\nseeds: [0]\nagents:\n  a: {config: missing.yaml}\n")
    proc = exp("run", "grid.yaml", cwd=tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "config of agent 'a' not found: missing.yaml" in out


def test_killed_grid_resumes_skipping_finished_runs_and_continuing_killed_ones(tmp_path):
    write_grid(tmp_path)
    runs = tmp_path / "runs" / "tiny"
    first, second = runs / "trqam/default/seed0", runs / "trqam/default/seed1"
    # One job at a time: kill the whole runner (and its training) once the second run has its first checkpoint.
    proc = exp("run", "grid.yaml", "--jobs", "1", cwd=tmp_path, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (second / "checkpoints" / "last.ckpt").is_file():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the second run never wrote a checkpoint"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The runner is reaped, but its killed training may still be exiting and holding the run's lock; a runner
    # started now would rightly skip the run as busy. A user restarts once the training is gone: so does the test.
    wait_until_unlocked(second, deadline)
    assert (first / "done.json").is_file() and not (second / "done.json").is_file()
    first_done = (first / "done.json").stat().st_mtime_ns

    proc = exp("run", "grid.yaml", "--jobs", "2", cwd=tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "4 runs, 1 already finished, 3 to run (2 at a time, 1 thread each)" in out
    assert "[4/4] " in out and "skipped" not in out, out
    assert (first / "done.json").stat().st_mtime_ns == first_done  # skipped, not rerun
    assert (first / "train.log").read_text().count("\n$ ") == 1
    second_log = (second / "train.log").read_text()
    assert second_log.count("\n$ ") == 2 and "--ckpt_path" in second_log.split("\n$ ")[-1], out  # resumed
    for agent in ("trqam", "qam"):
        for seed in (0, 1):
            scalars = read_scalars(runs / agent / "default" / f"seed{seed}")
            assert scalars["dual/kl"][-1][0] == STEPS - 1  # trained to the end, logged in the run's own directory
            assert [step for step, _ in scalars["eval/return"]] == [STEPS - 1]  # one evaluation, at the end
    assert "dual/lambda" in read_scalars(second) and "dual/lambda" not in read_scalars(runs / "qam/default/seed0")

    # The report's numbers are the event files' numbers, aggregated over the two seeds.
    proc = exp("report", "grid.yaml", cwd=tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    report = runs / "report"
    with open(report / "scalars.csv") as f:
        rows = {(r["agent"], r["task"], r["tag"], int(r["step"])): r for r in csv.DictReader(f)}
    for agent in ("trqam", "qam"):
        per_seed = [read_scalars(runs / agent / "default" / f"seed{seed}") for seed in (0, 1)]
        for tag in ("eval/return", "actor/am_loss", "dual/kl"):
            for step in (s for s, _ in per_seed[0][tag]):
                values = [dict(seed[tag])[step] for seed in per_seed]
                row = rows[(agent, "default", tag, step)]
                assert int(row["seeds"]) == 2
                assert float(row["mean"]) == pytest.approx(sum(values) / 2, rel=1e-5, abs=1e-7)
                assert float(row["std"]) == pytest.approx(statistics.stdev(values), rel=1e-5, abs=1e-7)
                assert float(row["min"]) == pytest.approx(min(values), rel=1e-5, abs=1e-7)
                assert float(row["max"]) == pytest.approx(max(values), rel=1e-5, abs=1e-7)
        final = [dict(seed["eval/return"])[STEPS - 1] for seed in per_seed]
        mean, std = statistics.mean(final), statistics.stdev(final)
        assert f"| {agent} | {mean:.3g} ± {std:.3g} (2) |" in (report / "table.md").read_text()
    with open(report / "seeds.csv") as f:  # every logged value of every run, as the event files hold it
        seeds = {(r["agent"], int(r["seed"]), r["tag"], int(r["step"])): float(r["value"]) for r in csv.DictReader(f)}
    for agent in ("trqam", "qam"):
        for seed in (0, 1):
            for tag, series in read_scalars(runs / agent / "default" / f"seed{seed}").items():
                # a step logged before the kill and again after the resume: the report keeps its last write
                for step, value in dict(series).items():
                    assert seeds[(agent, seed, tag, step)] == pytest.approx(value, rel=1e-7, abs=1e-9), (tag, step)
    for name in ("default_eval_return.png", "default_dual_kl_ema.png", "default_dual_lambda.png",
                 "default_actor_am_loss.png", "default_dual_kl.png", "default_critic_q_mean.png"):  # fmt: skip
        assert (report / name).stat().st_size > 10_000, name


@pytest.mark.parametrize("argv", [["run", "grid.yaml", "--only", "nope/default/seed0"]])
def test_an_unknown_run_name_is_refused(tmp_path, argv):
    write_grid(tmp_path)
    proc = exp(*argv, cwd=tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "no run named ['nope/default/seed0']" in out


def processes_mentioning(text: str, cwd: Path) -> list[int]:
    """PIDs running in ``cwd`` whose command line contains ``text`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if text in cmdline and (entry / "cwd").resolve() == cwd.resolve():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.mark.slow  # ~1 min: a real runner and training; the default run keeps the kill-and-resume test
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
def test_a_terminated_runner_stops_its_trainings_and_starts_no_more(tmp_path):
    grid = write_grid(tmp_path)
    (tmp_path / "trqam.yaml").write_text(AGENT.format(steps=100_000, cls="TRQAM", extra="eps_kl: 0.05"))
    run = tmp_path / "runs" / "tiny" / "trqam" / "default" / "seed0"
    proc = exp("run", grid.name, "--jobs", "1", cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "last.ckpt").is_file():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the run never wrote a checkpoint"
            time.sleep(0.2)
        assert processes_mentioning("trqam_lit.cli fit", tmp_path)  # the training process is running
        proc.send_signal(signal.SIGTERM)  # the runner only, as `kill <pid>` does
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None or processes_mentioning("trqam_lit.cli fit", tmp_path):
            os.killpg(proc.pid, signal.SIGKILL)  # a failing test leaves no 100000-step training behind
    assert proc.returncode == 130, out
    assert "interrupted; 1 running run(s) stopped" in out and "Rerun the same command" in out
    assert not processes_mentioning("trqam_lit.cli fit", tmp_path)  # no orphan left training
    assert not (run / "done.json").exists()
    assert not (tmp_path / "runs" / "tiny" / "trqam" / "default" / "seed1").exists()  # the queued runs never started


def test_the_report_takes_final_values_from_finished_runs_only(tmp_path, monkeypatch):
    # A report made while the grid still runs: an unfinished run's last evaluation (here at step 10 of 40) is not a
    # final value. Its curve points count (the CSV's seed count says how many runs reached a step); the table leaves
    # it out and names it.
    from torch.utils.tensorboard import SummaryWriter

    from trqam_lit.tools.report import report

    monkeypatch.chdir(tmp_path)
    grid = Grid.load(write_grid(tmp_path))
    by_name = {r.name: r for r in grid.runs}
    logged = {"trqam/default/seed0": ({10: 0.0, 39: 0.6}, True), "trqam/default/seed1": ({10: 0.2, 39: 0.8}, True),
              "qam/default/seed0": ({10: 0.5, 39: 0.3}, True), "qam/default/seed1": ({10: 0.9}, False)}  # fmt: skip
    for name, (values, finished) in logged.items():
        run_dir = by_name[name].run_dir
        run_dir.mkdir(parents=True)
        with SummaryWriter(str(run_dir)) as writer:
            for step, value in values.items():
                writer.add_scalar("eval/success", value, step)
        if finished:
            (run_dir / "done.json").write_text("{}\n")
    report(grid, tmp_path / "report")
    table = (tmp_path / "report" / "table.md").read_text()
    assert "| trqam | 70.0 ± 14.1 (2) |" in table
    assert "| qam | 30.0 ± 0.0 (1) |" in table  # not (30 + 90) / 2 from the unfinished seed's step-10 value
    assert "Not finished (left out of the final values): qam/default/seed1 (last step 10)" in table
    with open(tmp_path / "report" / "scalars.csv") as f:
        rows = {(r["agent"], int(r["step"])): r for r in csv.DictReader(f)}
    assert int(rows[("qam", 10)]["seeds"]) == 2 and float(rows[("qam", 10)]["mean"]) == pytest.approx(0.7)
    assert int(rows[("qam", 39)]["seeds"]) == 1


def test_a_finished_run_whose_config_or_overrides_changed_is_named_when_skipped(tmp_path, monkeypatch):
    # A finished run is skipped, not rerun; if the grid would now make a different run (its config file edited, or
    # its overrides), the runner says so instead of silently keeping the old result.
    import io
    import json

    from trqam_lit.tools.experiment import run_grid

    monkeypatch.chdir(tmp_path)
    grid = Grid.load(write_grid(tmp_path))
    run = grid.runs[0]
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "done.json").write_text(json.dumps({"run": run.name, **run.recipe()}))
    assert run.changed_since_finished() is None and grid.runs[1].changed_since_finished() is None

    out = io.StringIO()
    assert run_grid(grid, only=[run.name], out=out) == 0
    assert "warning" not in out.getvalue() and "1 runs, 1 already finished, 0 to run" in out.getvalue()

    (tmp_path / "trqam.yaml").write_text((tmp_path / "trqam.yaml").read_text().replace("eps_kl: 0.05", "eps_kl: 0.1"))
    assert run.changed_since_finished() == "trqam.yaml changed since it finished"
    out = io.StringIO()
    assert run_grid(grid, only=[run.name], out=out) == 0
    assert f"warning: {run.name} is finished and skipped, but trqam.yaml changed" in out.getvalue()

    # A record from before the recipe was kept (the command line only); a resumed run's --ckpt_path does not count.
    cmd = [sys.executable, "-m", "trqam_lit.cli", *run.fit_args(), "--ckpt_path", "x/last.ckpt"]
    (run.run_dir / "done.json").write_text(json.dumps({"run": run.name, "command": shlex.join(cmd)}))
    assert run.changed_since_finished() is None
    moved = Grid.load(write_grid(tmp_path)).runs[0]
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(
        grid_file.read_text().replace("seeds: [0, 1]", "overrides: [--trainer.max_steps=80]\nseeds: [0, 1]")
    )
    moved = Grid.load(grid_file).runs[0]
    assert moved.changed_since_finished().startswith("its overrides changed")


def test_threads_per_run_can_be_set_for_runners_side_by_side(tmp_path, monkeypatch):
    import io

    from trqam_lit.tools import experiment

    monkeypatch.chdir(tmp_path)
    grid = Grid.load(write_grid(tmp_path))
    seen = []

    def execute(run, threads):
        seen.append((run.name, threads))
        return run, 0, 1.0

    monkeypatch.setattr(experiment, "execute", execute)
    out = io.StringIO()
    assert experiment.run_grid(grid, jobs=1, only=["qam/default/seed1"], out=out, threads=3) == 0
    assert seen == [("qam/default/seed1", 3)] and "(1 at a time, 3 threads each)" in out.getvalue()
    seen.clear()
    assert experiment.run_grid(grid, jobs=2, only=["qam/default/seed0"], out=io.StringIO()) == 0
    assert seen == [("qam/default/seed0", experiment.threads_per_job(2))]
    with pytest.raises(ValueError, match="--threads must be >= 1"):
        experiment.run_grid(grid, threads=0, out=io.StringIO())


def test_a_run_that_another_runner_holds_is_left_alone(tmp_path, monkeypatch):
    # Two runners over the same grid (two lanes, or a scheduler task requeued while the first still trains): the
    # run's lock is held by the first, so the second starts no training there and says why.
    import fcntl
    import io

    from trqam_lit.tools import experiment

    monkeypatch.chdir(tmp_path)
    grid = Grid.load(write_grid(tmp_path))
    run = grid.runs[1]
    run.run_dir.mkdir(parents=True)
    started = []
    monkeypatch.setattr(experiment, "_train", lambda run, threads, fd: (started.append(run.name), (run, 0, 1.0))[1])
    with open(run.run_dir / "run.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        out = io.StringIO()
        assert experiment.run_grid(grid, only=[run.name], out=out) == 0
        assert started == [] and f"{run.name}: skipped: another runner is training it" in out.getvalue()
        closing = out.getvalue().splitlines()[-1]  # the closing line says what is left to do
        assert closing.startswith("trqam-lit-exp: 1 run(s) skipped, held by another runner") and run.name in closing
        (run.run_dir / "done.json").write_text("{}")  # the other runner finishes it before releasing the lock
    _, code, _ = experiment.execute(run, 1)
    assert code == experiment.FINISHED_ELSEWHERE and started == []
    (run.run_dir / "done.json").unlink()
    assert experiment.execute(run, 1)[1] == 0 and started == [run.name]  # released: this runner trains it


def test_a_failing_run_is_reported_failed_not_finished_and_gets_its_threads(tmp_path, monkeypatch):
    # A real training that fails at start (flow_steps 1 is refused): the runner returns 1, names the run as failed
    # with its log, writes no done.json (the next runner trains it again), and the training process got the
    # runner's thread count in OMP_NUM_THREADS / MKL_NUM_THREADS whatever this process has.
    import io

    from trqam_lit.tools import experiment

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    (tmp_path / "bad.yaml").write_text(AGENT.format(steps=STEPS, cls="TRQAM", extra="flow_steps: 1"))
    (tmp_path / "grid.yaml").write_text("name: bad\nruns_dir: runs\nseeds: [0]\nagents:\n  trqam: {config: bad.yaml}\n")
    grid = Grid.load(tmp_path / "grid.yaml")
    envs = []
    real_popen = subprocess.Popen

    def popen(cmd, **kwargs):
        envs.append(kwargs["env"])
        return real_popen(cmd, **kwargs)

    monkeypatch.setattr(experiment.subprocess, "Popen", popen)
    out = io.StringIO()
    assert experiment.run_grid(grid, out=out, threads=3) == 1
    run = grid.runs[0]
    assert f"{run.name}: FAILED (exit 1)" in out.getvalue() and "run(s) failed" in out.getvalue()
    assert not (run.run_dir / "done.json").exists() and not run.finished
    assert "flow_steps must be at least 2" in (run.run_dir / experiment.LOG).read_text()
    assert [(e["OMP_NUM_THREADS"], e["MKL_NUM_THREADS"]) for e in envs] == [("3", "3")]


def test_a_step_written_again_after_a_resume_reads_as_its_last_write(tmp_path):
    # A resumed run logs the steps after its checkpoint again, into a new event file: the later write is the value.
    from torch.utils.tensorboard import SummaryWriter

    from trqam_lit.tools.report import read_run

    for value, wall_time in ((0.1, 100.0), (0.5, 200.0)):
        with SummaryWriter(str(tmp_path), filename_suffix=f".{int(wall_time)}") as writer:
            writer.add_scalar("eval/success", value, 10, walltime=wall_time)
            writer.add_scalar("eval/success", value + 1, 20 if wall_time > 150 else 5, walltime=wall_time)
    assert read_run(tmp_path) == {"eval/success": pytest.approx({5: 1.1, 10: 0.5, 20: 1.5})}


def test_final_values_are_the_last_evaluation_and_the_mean_of_the_last_training_scalars():
    from trqam_lit.tools.report import FINAL_WINDOW, final_value

    series = {step: float(step) for step in range(0, 100, 10)}  # 0, 10, ..., 90
    assert final_value("eval/success", series) == 90.0
    assert FINAL_WINDOW == 5 and final_value("dual/kl", series) == 70.0  # mean of 50, 60, 70, 80, 90


def test_an_agent_composed_from_several_configs_passes_them_in_order_and_tracks_each(tmp_path, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    for name in ("model.yaml", "data.yaml"):
        (tmp_path / name).write_text(f"# {name}\n")
    (tmp_path / "grid.yaml").write_text(
        "name: composed\nseeds: [0]\nagents:\n  fql: {config: [model.yaml, data.yaml], overrides: [--x=1]}\n"
    )
    run = Grid.load(tmp_path / "grid.yaml").runs[0]
    assert run.config == ("model.yaml", "data.yaml")
    assert run.fit_args()[:6] == ["fit", "--config", "model.yaml", "--config", "data.yaml", "--x=1"]
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "done.json").write_text(json.dumps({"run": run.name, **run.recipe()}))
    assert run.changed_since_finished() is None
    (tmp_path / "data.yaml").write_text("# edited\n")  # the second file counts too
    assert run.changed_since_finished() == "model.yaml, data.yaml changed since it finished"
    (tmp_path / "grid.yaml").write_text("name: c\nseeds: [0]\nagents:\n  fql: {config: [model.yaml, missing.yaml]}\n")
    with pytest.raises(FileNotFoundError, match="config of agent 'fql' not found: missing.yaml"):
        Grid.load(tmp_path / "grid.yaml")


def _drawn(monkeypatch):
    """The axes the report would save, by file name (instead of PNGs)."""
    from trqam_lit.tools import report

    axes = {}
    monkeypatch.setattr(report, "_save", lambda fig, ax, title, xl, yl, path: axes.setdefault(path.name, ax) and path)
    return report, axes


def _rows(agent, tag, steps_values):
    from trqam_lit.tools.report import mean_std

    out = []
    for step, values in steps_values:
        mean, std = mean_std(values)
        out.append({"agent": agent, "task": "t", "tag": tag, "step": step, "mean": mean, "std": std,
                    "min": min(values), "max": max(values), "seeds": len(values)})  # fmt: skip
    return out


def test_report_bands_are_the_seeds_range_and_the_adjoint_plots_use_a_log_axis(monkeypatch, tmp_path):
    report, axes = _drawn(monkeypatch)
    # Success 0% and 40% on two seeds: a +-std band would reach -8%; the min-max band stays in [0, 40].
    rows = _rows("qam", "eval/success", [(10, [0.0, 0.4])]) + _rows("qam", "actor/am_loss", [(5, [1.0, 1e20])])
    rows += _rows("trqam", "dual/kl", [(5, [0.09, 0.11])]) + _rows("qam", "dual/kl", [(5, [2.0, 3.0])])
    rows += _rows("bc", "eval/success", [(10, [0.2, 0.3])])
    finals = {("bc", "t", "eval/success"): [0.2, 0.3]}
    report.plot(rows, {("trqam", "t"): 0.1}, tmp_path, "g", ("bc", "qam", "trqam"), finals)
    success = axes["t_eval_success.png"]
    band = success.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(0.0) and band.max() == pytest.approx(40.0)
    labels = [line.get_label() for line in success.lines]
    assert "BC, final (2 seeds)" in labels and not any(label.startswith("bc (") for label in labels)
    assert [line.get_ydata()[0] for line in success.lines if line.get_label().startswith("BC")] == [pytest.approx(25)]
    assert axes["t_actor_am_loss.png"].get_yscale() == "log" and success.get_yscale() == "linear"
    kl = axes["t_dual_kl.png"]  # every agent's KL, the budget of the one that has one
    assert {line.get_label() for line in kl.lines} == {"qam (2 seeds)", "trqam (2 seeds)", "budget eps_KL = 0.1"}


def test_report_table_aggregates_seeds_then_tasks_then_domains(tmp_path, monkeypatch):
    from trqam_lit.tools.grid import Grid
    from trqam_lit.tools.report import markdown_table

    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(
        "name: g\nruns_dir: runs\nagents:\n  a: {config: x.yaml}\n"
        "tasks:\n  d1/t1: []\n  d1/t2: []\n  d2/t1: []\nseeds: [0, 1]\n"
    )
    (tmp_path / "x.yaml").write_text("{}\n")
    monkeypatch.chdir(tmp_path)  # config paths are relative to where the runner starts
    grid = Grid.load(grid_file)
    finals = {("a", "d1/t1", "eval/success"): [0.2, 0.4], ("a", "d1/t2", "eval/success"): [0.6, 0.6],
              ("a", "d2/t1", "eval/success"): [1.0, 0.8]}  # fmt: skip
    table = markdown_table(grid, finals, {})
    assert "| agent | d1/t1 | d1/t2 | d2/t1 | d1 (mean) | d2 (mean) | all |" in table
    # d1 = mean(30, 60) = 45, d2 = 90, all = mean(45, 90) = 67.5 (not the mean of the three tasks, 60)
    assert "| 45.0 | 90.0 | 67.5 |" in table


def test_overrides_name_each_runs_own_seed_task_and_agent(tmp_path, monkeypatch):
    """A paired grid: every seed of every agent starts from that seed's BC checkpoint (``{seed}`` in an override)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.yaml").write_text("# a\n")
    (tmp_path / "grid.yaml").write_text(
        "name: paired\nseeds: [0, 3]\noverrides: ['--init_from=bc/{task}/seed{seed}/last.ckpt']\n"
        "agents:\n  qam: {config: a.yaml, overrides: ['--tag={agent}-{seed}', '--json={\"k\": 1}']}\n"
        "tasks:\n  t1: ['--name={task}']\n"
    )
    runs = Grid.load(tmp_path / "grid.yaml").runs
    assert [r.overrides for r in runs] == [
        ("--init_from=bc/t1/seed0/last.ckpt", "--tag=qam-0", '--json={"k": 1}', "--name=t1"),
        ("--init_from=bc/t1/seed3/last.ckpt", "--tag=qam-3", '--json={"k": 1}', "--name=t1"),
    ]
    assert "--init_from=bc/t1/seed3/last.ckpt" in runs[1].fit_args()
