"""How far a regenerated fixture drifts from the shipped one when the floating-point kernels change.

    python benchmarks/fixture_drift.py [--fixtures cube-single-play-v0 ...] [--jobs 2] [--json out.json]

The shipped fixtures were simulated on one CPU. Another CPU runs the same generator through other SIMD
kernels: numpy picks its vector kernels at run time from the CPU's features, OpenBLAS its GEMM/GEMV kernels
from the core type, and the oracles feed what they compute back into the physics, where contacts amplify a
last-bit difference. This script reproduces those differences on one machine: it regenerates each shipped
fixture in a subprocess per *emulated CPU* (``NPY_DISABLE_CPU_FEATURES`` to drop numpy's AVX-512 or AVX2
kernels, ``OPENBLAS_CORETYPE`` to force an older or newer OpenBLAS kernel set) and prints, per array, the
largest absolute difference to the shipped file over all variants. ``tests/test_data_generate.py`` derives
its tolerances from these numbers (docs/data.md records a run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

FIXTURES = ("cube-single-play-v0", "cube-double-play-v0", "puzzle-3x3-play-v0", "scene-play-v0")
NUMPY_AVX2 = "X86_V4,AVX512_ICL,AVX512_SPR"
NUMPY_SSE4 = "X86_V3,X86_V4,AVX512_ICL,AVX512_SPR"
# name -> environment of the generating process
VARIANTS: dict[str, dict[str, str]] = {
    "this machine": {},
    "numpy without AVX-512": {"NPY_DISABLE_CPU_FEATURES": NUMPY_AVX2},
    "numpy without AVX2": {"NPY_DISABLE_CPU_FEATURES": NUMPY_SSE4},
    "OpenBLAS Prescott": {"OPENBLAS_CORETYPE": "Prescott"},
    "OpenBLAS Nehalem": {"OPENBLAS_CORETYPE": "Nehalem"},
    "OpenBLAS Sandybridge": {"OPENBLAS_CORETYPE": "Sandybridge"},
    "OpenBLAS Haswell": {"OPENBLAS_CORETYPE": "Haswell"},
    "OpenBLAS SkylakeX": {"OPENBLAS_CORETYPE": "SkylakeX"},
    "OpenBLAS Zen": {"OPENBLAS_CORETYPE": "Zen"},
    "AVX2 machine (numpy + OpenBLAS Haswell)": {"NPY_DISABLE_CPU_FEATURES": NUMPY_AVX2, "OPENBLAS_CORETYPE": "Haswell"},
}


def _generate_one(name: str, out: str) -> None:
    """Child process: regenerate fixture ``name`` (its shipped config) into ``out``."""
    os.environ.setdefault("MUJOCO_GL", "disable")
    from trqam_lit.data import GenerationConfig, fixture_dir, generate_dataset

    config = json.loads((fixture_dir() / f"{name}.json").read_text())["config"]
    generate_dataset(GenerationConfig(**config), out, workers=1, progress=False)


def regenerate(name: str, variant: str, out: str) -> None:
    """Regenerate fixture ``name`` into ``out`` in a subprocess with the variant's environment."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **VARIANTS[variant]}
    subprocess.run([sys.executable, __file__, "--_one", name, out], env=env, check=True, capture_output=True)


def drift(name: str, out: str) -> dict[str, float]:
    """Largest absolute difference per array (train and val files together) of one regeneration. Called in the
    main thread only: np.load parses headers with ast, which races between threads on some CPythons (gh-106905)."""
    from trqam_lit.data import fixture_dir

    result: dict[str, float] = {}
    for file in (f"{name}.npz", f"{name}-val.npz"):
        with np.load(Path(out) / file) as new, np.load(fixture_dir() / file) as shipped:
            for k in shipped.files:
                d = np.abs(new[k].astype(np.float64) - shipped[k].astype(np.float64)).max()
                result[k] = max(result.get(k, 0.0), float(d))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixtures", nargs="*", default=list(FIXTURES), choices=list(FIXTURES))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2, help="regenerations run side by side")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    parser.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        _generate_one(*args._one)
        return
    jobs = [(f, v) for f in args.fixtures for v in args.variants]
    with tempfile.TemporaryDirectory() as root:
        outs = {job: str(Path(root) / str(i)) for i, job in enumerate(jobs)}
        with ThreadPoolExecutor(args.jobs) as pool:  # the threads only wait for the generating subprocesses
            list(pool.map(lambda job: regenerate(*job, outs[job]), jobs))
        results = {job: drift(job[0], outs[job]) for job in jobs}
    table: dict[str, dict[str, dict[str, float]]] = {}
    for (f, v), r in results.items():
        table.setdefault(f, {})[v] = r
    for f, rows in table.items():
        keys = sorted({k for r in rows.values() for k in r})
        print(f"\n{f}: largest |regenerated - shipped| per array")
        print(f"{'variant':42s}" + "".join(f"{k:>15s}" for k in keys))
        for v, r in rows.items():
            print(f"{v:42s}" + "".join(f"{r.get(k, 0.0):15.3g}" for k in keys))
        print(f"{'max':42s}" + "".join(f"{max(r.get(k, 0.0) for r in rows.values()):15.3g}" for k in keys))
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
