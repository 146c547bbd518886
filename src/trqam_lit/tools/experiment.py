"""`trqam-lit-exp`: run a grid of trainings (agents x tasks x seeds), resumably, and hand it to a scheduler.

    trqam-lit-exp run grid.yaml --jobs 2            # every run, 2 at a time, threads per job = cores // jobs
    trqam-lit-exp run grid.yaml --print-commands    # one shell command per run (a SLURM array, GNU parallel)
    trqam-lit-exp run grid.yaml --only qam/default/seed1
    trqam-lit-exp report grid.yaml                  # CSV, markdown table and plots over seeds (<runs>/<name>/report)

A grid file (YAML)::

    name: toy-trqam-vs-bc             # runs go to <runs_dir>/<name>/<agent>/<task>/seed<k>/
    runs_dir: runs                    # optional; relative paths are relative to the working directory
    overrides: [--trainer.max_steps=2000]                 # for every run
    agents:                                               # agent -> its config(s) and overrides
      trqam: {config: configs/toy/bandit.yaml}
      fql: {config: [configs/model/fql.yaml, configs/data/scene.yaml, configs/model/fql/scene.yaml]}  # composed
      bc: {config: configs/toy/bandit.yaml, overrides: [--model.class_path=trqam_lit.agents.BC]}
    tasks:                                                # task -> overrides (optional; default: one task)
      c3: [--data.init_args.c=3.0]
    seeds: [0, 1, 2]

In any override, ``{agent}``, ``{task}`` and ``{seed}`` become the run's own: a paired grid starts each seed from that
seed's checkpoint, ``--model.init_args.init_from=runs/bc/bc/task1/seed{seed}/checkpoints/last.ckpt``.

Each run is a real ``trqam-lit fit`` in its own process, with its TensorBoard events, checkpoints and output
(``train.log``) in its own directory. A finished run (``done.json``) is skipped; a killed one resumes from its
``checkpoints/last.ckpt``; a failed one is reported with its log path and does not stop the others.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from trqam_lit.tools.grid import DONE, Grid, Run

__all__ = ["DONE", "LOCK", "Grid", "Run", "main", "print_commands", "run_grid", "threads_per_job"]

LOG = "train.log"
LOCK = "run.lock"  # held (flock) while a runner trains the run: a second runner leaves it alone
STOPPED = 130  # exit code of a runner that was interrupted (and of a run it did not start)
BUSY = -1  # the run is being trained by another runner (another lane, a requeued scheduler task)
FINISHED_ELSEWHERE = -2  # another runner finished it while this one waited for its turn


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """Threads per process so that jobs x threads <= cores (oversubscribed OpenMP collapses, docs/performance.md)."""
    return max(1, (cores or usable_cores()) // max(1, jobs))


def usable_cores() -> int:
    """The CPUs this process may run on (a scheduler's cpuset or `taskset`), not every CPU of the machine."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity on this platform (macOS)
        return os.cpu_count() or 1


# The trainings running now: a runner that is stopped (Ctrl-C, SIGTERM from `kill` or a scheduler) stops them too,
# instead of leaving orphans that keep the cores busy; a stopped run resumes from its last checkpoint on the next call.
_children: set[subprocess.Popen] = set()
_children_lock = threading.Lock()
_stopping = threading.Event()


def execute(run: Run, threads: int) -> tuple[Run, int, float]:
    """One run to completion in its own process; returns (run, exit code, seconds). Output goes to its train.log.

    The run's lock is held meanwhile; if another runner holds it, nothing starts and the code is ``BUSY``.
    """
    run.run_dir.mkdir(parents=True, exist_ok=True)
    with open(run.run_dir / LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return run, BUSY, 0.0
        if run.finished:  # finished by the runner that held the lock until now
            return run, FINISHED_ELSEWHERE, 0.0
        return _train(run, threads, lock.fileno())


def _train(run: Run, threads: int, lock_fd: int) -> tuple[Run, int, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "trqam_lit.cli", *run.fit_args()]
    t0 = time.perf_counter()
    with open(run.run_dir / LOG, "a") as log:
        with _children_lock:
            if _stopping.is_set():
                return run, STOPPED, 0.0
            log.write(f"\n$ {shlex.join(cmd)}\n")
            log.flush()
            # the training inherits the lock: it stays held while the training lives, even if this runner is killed
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=(lock_fd,))
            _children.add(proc)
        try:
            code = proc.wait()
        finally:
            with _children_lock:
                _children.discard(proc)
    seconds = time.perf_counter() - t0
    if _stopping.is_set():
        code = STOPPED  # Lightning ends a SIGTERMed fit with exit 0: not finished
    if code == 0:
        record = {"run": run.name, "seconds": round(seconds, 1), "command": shlex.join(cmd), "threads": threads}
        record.update(run.recipe())
        (run.run_dir / DONE).write_text(json.dumps(record, indent=1) + "\n")
    return run, code, seconds


def stop_children(grace: float = 10.0) -> int:
    """Terminate every running training (SIGTERM, then SIGKILL after ``grace`` s); returns how many were running."""
    with _children_lock:
        _stopping.set()
        procs = list(_children)
    for proc in procs:
        proc.terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return len(procs)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _eta(done: int, total: int, seconds: list[float], jobs: int) -> str:
    if not seconds or done >= total:
        return ""
    left = (total - done) * (sum(seconds) / len(seconds)) / max(1, jobs)
    return f", ETA {int(left // 60)} min {int(left % 60)} s"


def run_grid(grid: Grid, jobs: int = 1, only: Sequence[str] = (), out=None, threads: int | None = None) -> int:
    """Run every unfinished run of the grid, ``jobs`` at a time with ``threads`` threads each (default: cores //
    jobs); returns the number of failed runs."""
    out = out or sys.stdout
    runs = [r for r in grid.runs if not only or r.name in only]
    missing = set(only) - {r.name for r in grid.runs}
    if missing:
        raise ValueError(f"no run named {sorted(missing)} in grid '{grid.name}' (names: agent/task/seed<k>)")
    todo = [r for r in runs if not r.finished]
    total, done = len(runs), len(runs) - len(todo)
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    threads = threads or threads_per_job(jobs)
    print(f"trqam-lit-exp: {grid.name}: {total} runs, {done} already finished, {len(todo)} to run "
          f"({jobs} at a time, {threads} thread{'s' if threads > 1 else ''} each)", file=out, flush=True)  # fmt: skip
    changed = [(r, why) for r in runs if (why := r.changed_since_finished())]
    for r, why in changed:
        print(f"trqam-lit-exp: warning: {r.name} is finished and skipped, but {why}; delete {r.run_dir} to rerun it",
              file=out, flush=True)  # fmt: skip
    failed, busy, seconds = [], [], []
    _stopping.clear()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        futures = [pool.submit(execute, run, threads) for run in todo]
        for future in as_completed(futures):
            run, code, secs = future.result()
            done += 1
            if code == 0:
                seconds.append(secs)
                status = f"finished in {secs:.0f} s"
            elif code == BUSY:
                busy.append(run)
                status = f"skipped: another runner is training it ({run.run_dir / LOCK} is held)"
            elif code == FINISHED_ELSEWHERE:
                status = "finished by another runner"
            else:
                failed.append(run)
                status = f"FAILED (exit {code}); log: {run.run_dir / LOG}"
            print(f"[{done}/{total}{_eta(done, total, seconds, jobs)}] {run.name}: {status}", file=out, flush=True)
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        stopped = stop_children()
        print(f"trqam-lit-exp: interrupted; {stopped} running run(s) stopped. Rerun the same command to resume them "
              "from their last checkpoints (finished runs are skipped)", file=out, flush=True)  # fmt: skip
        raise
    finally:
        pool.shutdown(wait=True)
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if busy:
        # not a failure (another runner owns them), but not finished here either: say so at the end, where one looks
        print(f"trqam-lit-exp: {len(busy)} run(s) skipped, held by another runner (or a training still exiting): "
              + ", ".join(r.name for r in busy) + "; rerun this command once it ends to train what is left",
              file=out)  # fmt: skip
    if failed:
        print(f"trqam-lit-exp: {len(failed)} run(s) failed: " + ", ".join(r.name for r in failed), file=out)
    return len(failed)


def print_commands(grid: Grid, grid_path: str, out=None) -> None:
    """One resumable shell command per run, for a scheduler (each line runs `trqam-lit-exp run --only <run>`)."""
    out = out or sys.stdout
    for run in grid.runs:
        print(f"trqam-lit-exp run {shlex.quote(grid_path)} --only {shlex.quote(run.name)} --threads 1", file=out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="trqam-lit-exp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a grid of trainings (skips finished runs, resumes killed ones)")
    run.add_argument("grid", help="grid YAML file")
    run.add_argument("--jobs", type=int, default=1, help="runs in parallel (threads per run = cores // jobs)")
    run.add_argument("--only", nargs="*", default=(), help="run only these runs (agent/task/seed<k>)")
    threads_help = "threads per run (default: cores // jobs; 1 for two runners side by side on 2 cores)"
    run.add_argument("--threads", type=int, default=None, help=threads_help)
    run.add_argument("--print-commands", action="store_true", help="print one command per run and exit")
    rep = sub.add_parser("report", help="the grid's scalars over seeds: a CSV, a markdown table and PNG plots")
    rep.add_argument("grid", help="grid YAML file")
    rep.add_argument("--out", default=None, help="output folder (default: <runs_dir>/<name>/report)")
    args = parser.parse_args(argv)
    try:
        grid = Grid.load(args.grid)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"trqam-lit-exp: error: {err}\n")
    if args.command == "report":
        from trqam_lit.tools.report import report

        try:
            written = report(grid, Path(args.out) if args.out else grid.root / "report")
        except ValueError as err:
            parser.exit(2, f"trqam-lit-exp: error: {err}\n")
        files = f"{written['csv']}, {written['seeds']}, {written['table']}"
        print(f"trqam-lit-exp: wrote {files} and {len(written['plots'])} plots")
        return
    if args.print_commands:
        print_commands(grid, args.grid)
        return
    try:
        failed = run_grid(grid, args.jobs, args.only, threads=args.threads)
    except ValueError as err:
        parser.exit(2, f"trqam-lit-exp: error: {err}\n")
    except KeyboardInterrupt:
        sys.exit(STOPPED)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
