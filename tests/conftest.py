"""Test-session settings. Under pytest-xdist (`-n auto`, the README's command) the workers share the machine's
cores: each worker, and every training or process it starts, runs one thread (workers x threads <= cores;
oversubscribed OpenMP threads spin and slow everything down, docs/performance.md)."""

from __future__ import annotations

import os

# Every training a test starts keeps its thread count (training.threads.ThreadBudget off): tests compare runs
# bitwise, and a thread count that follows the machine's load would make them depend on what else runs.
# tests/test_threads.py sets the variable itself.
os.environ["TRQAM_THREADS"] = "fixed"

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption(
        "--shuffle",
        type=int,
        default=None,
        metavar="SEED",
        help="run the test files in a shuffled order, and each file's tests in a shuffled order (seeded, so every "
        "xdist worker collects the same order); the suite must pass in any order",
    )


def pytest_collection_modifyitems(config, items):
    seed = config.getoption("--shuffle")
    if seed is None:
        return
    import random

    rng = random.Random(seed)
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)
    order = list(files)
    rng.shuffle(order)
    for name in order:
        rng.shuffle(files[name])
    items[:] = [item for name in order for item in files[name]]


def pytest_report_header(config):
    seed = config.getoption("--shuffle")
    return None if seed is None else f"test order shuffled with seed {seed} (--shuffle {seed})"
