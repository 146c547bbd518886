"""Test-session settings. Under pytest-xdist (`-n auto`, the README's command) the workers share the machine's
cores: each worker, and every training or process it starts, runs one thread (workers x threads <= cores;
oversubscribed OpenMP threads spin and slow everything down, docs/performance.md)."""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
