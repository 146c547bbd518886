"""Local OGBench dataset generator: names, refusals, reproducibility against the shipped fixtures, atomic writes."""

from __future__ import annotations

import json
import os

os.environ.setdefault("MUJOCO_GL", "disable")

import numpy as np
import pytest

from trqam_lit.data import GenerationConfig, OGBenchDataModule, UnsupportedDomainError, fixture_dir, generate_dataset
from trqam_lit.data.generate import main, parse_dataset_name

KEYS = ("observations", "actions", "terminals", "qpos", "qvel")


def _arrays(path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _shipped_config(name: str) -> dict:
    return json.loads((fixture_dir() / f"{name}.json").read_text())["config"]


# How far a regenerated fixture may drift from the shipped one, per array. The shipped files were simulated on one
# CPU; another runs numpy's and OpenBLAS's kernels for its own vector width, and the oracles feed the difference back
# into contact-rich physics. benchmarks/fixture_drift.py regenerates the fixtures under ten emulated CPUs (numpy
# without AVX-512 or AVX2, six OpenBLAS core types, an AVX2 machine); the largest difference it measured over the
# cube-single, cube-double and puzzle fixtures (docs/data.md) is CPU_DRIFT, and the tolerance is ten times that, for
# CPUs and libm builds not emulated. (It reproduces the 1.6e-4 qvel difference of issue 23, a Zen OpenBLAS kernel,
# which the former atol 1e-4 failed.) A 1% change of the oracle noise moves the arrays 10x further than CPU_TOL.
CPU_DRIFT = {"observations": 5.5e-4, "actions": 9.7e-5, "qpos": 9.0e-5, "qvel": 5.6e-3}
CPU_TOL = {k: 10 * v for k, v in CPU_DRIFT.items()}


def assert_within_cpu_drift(new: dict[str, np.ndarray], shipped: dict[str, np.ndarray], rows: slice = slice(None)):
    """Float arrays within CPU_TOL, everything else (terminals, button states) equal."""
    assert set(new) == set(shipped)
    for k in sorted(shipped):
        assert new[k].dtype == shipped[k].dtype and new[k].shape == shipped[k].shape, k
        if k in CPU_TOL:
            np.testing.assert_allclose(new[k][rows], shipped[k][rows], atol=CPU_TOL[k], rtol=0, err_msg=k)
        else:
            np.testing.assert_array_equal(new[k][rows], shipped[k][rows], err_msg=k)


@pytest.mark.parametrize(
    ("name", "dataset_type", "expected"),
    [
        ("cube-double-play-v0", None, ("cube-double", "play", "v0")),
        ("cube-double-v0", "noisy", ("cube-double", "noisy", "v0")),
        ("cube-double-v0", None, ("cube-double", "play", "v0")),
        ("puzzle-4x4-noisy-singletask-task3-v0", None, ("puzzle-4x4", "noisy", "v0")),
        ("scene-play-singletask-v0", "play", ("scene", "play", "v0")),
        ("cube-quadruple-play-v0", None, ("cube-quadruple", "play", "v0")),
    ],
)
def test_parse_dataset_name(name: str, dataset_type: str | None, expected: tuple) -> None:
    assert parse_dataset_name(name, dataset_type) == expected


@pytest.mark.parametrize(
    "name",
    ["antmaze-large-navigate-v0", "humanoidmaze-medium-navigate-v0", "antsoccer-arena-stitch-v0", "antmaze-giant-v0"],
)
def test_locomotion_is_refused_with_a_clear_message(name: str, capsys, tmp_path) -> None:
    with pytest.raises(UnsupportedDomainError, match="official files"):
        parse_dataset_name(name)
    assert main(["generate", "--env", name, "--dataset-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot be generated locally" in err and "ogbench.download_datasets" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["visual-cube-single-play-v0", "powderworld-easy-play-v0", "cube-single-stitch-v0"])
def test_other_unsupported_datasets(name: str) -> None:
    with pytest.raises(UnsupportedDomainError):
        parse_dataset_name(name)


def test_conflicting_dataset_type() -> None:
    with pytest.raises(ValueError, match="--dataset-type"):
        parse_dataset_name("cube-double-play-v0", "noisy")


def test_regenerated_episodes_match_the_shipped_fixture(tmp_path) -> None:
    """Deterministic here (two generations, 1 and 2 workers, are byte-identical), and equal to the shipped fixture up
    to how far another CPU drifts (CPU_TOL). Episodes are seeded individually, so the first ones regenerate alone;
    then the DataModule trains from the output."""
    config = {**_shipped_config("cube-single-play-v0"), "num_episodes": 2}
    steps = config["max_episode_steps"]
    paths = generate_dataset(GenerationConfig(**config), tmp_path / "one", workers=1, progress=False)
    again = generate_dataset(GenerationConfig(**config), tmp_path / "two", workers=2, progress=False)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "cube-single-play-v0-val.json",
        "cube-single-play-v0-val.npz",
        "cube-single-play-v0.json",
        "cube-single-play-v0.npz",
    ]
    for split in ("train", "val"):
        assert paths[split].read_bytes() == again[split].read_bytes(), split
    shipped = _arrays(fixture_dir() / "cube-single-play-v0.npz")
    train, val = _arrays(paths["train"]), _arrays(paths["val"])
    assert set(train) == set(shipped) == set(KEYS)
    assert_within_cpu_drift(train, {k: v[: 2 * steps] for k, v in shipped.items()})
    # the single validation episode is episode 2, which the shipped fixture has in its training file
    assert_within_cpu_drift(val, {k: v[2 * steps : 3 * steps] for k, v in shipped.items()})

    meta = json.loads(paths["train_json"].read_text())
    assert meta["generated_locally"] is True and "NOT the released" in meta["note"]
    assert meta["config"]["seed"] == 0 and meta["config"]["dataset_type"] == "play"
    assert {"ogbench", "mujoco", "numpy"} <= set(meta["versions"]) and meta["rows"] == 2 * steps
    assert json.loads(paths["val_json"].read_text())["episode_indices"] == [2, 3]

    # The DataModule finds the generated files with nothing but the directory.
    dm = OGBenchDataModule(
        env_name="cube-single-play-singletask-task5-v0", dataset_dir=str(tmp_path / "one"), batch_size=8
    )
    dm.setup("fit")
    assert len(dm.table) == 2 * (steps - 1)
    assert next(iter(dm.train_dataloader()))["actions"].shape == (8, 25)


@pytest.mark.parametrize("change", [{"seed": 1}, {"noise": 0.101}, {"noise_smoothing": 0.55}])
def test_cpu_tolerance_still_sees_a_changed_generator(change: dict, tmp_path) -> None:
    """CPU_TOL is loose enough for another CPU and tight enough that a 1% change of the oracle noise fails."""
    config = {**_shipped_config("cube-single-play-v0"), "num_episodes": 1, **change}
    paths = generate_dataset(GenerationConfig(**config), tmp_path, workers=1, progress=False)
    shipped = _arrays(fixture_dir() / "cube-single-play-v0.npz")
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        assert_within_cpu_drift(_arrays(paths["train"]), {k: v[:250] for k, v in shipped.items()})


def test_two_workers_match_one_and_refuse_overwrite(tmp_path, capsys) -> None:
    """Noisy data (random actions and Gaussian noise) is bit-identical whatever the number of workers."""
    args = ["generate", "--env", "cube-double-v0", "--dataset-type", "noisy", "--num-episodes", "3"]
    args += ["--max-episode-steps", "40", "--seed", "7", "--quiet"]
    assert main([*args, "--workers", "2", "--dataset-dir", str(tmp_path / "two")]) == 0
    assert main([*args, "--workers", "1", "--dataset-dir", str(tmp_path / "one")]) == 0
    for name in ("cube-double-noisy-v0.npz", "cube-double-noisy-v0-val.npz"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    train = _arrays(tmp_path / "one" / "cube-double-noisy-v0.npz")
    assert train["terminals"].sum() == 3 and train["observations"].shape == (120, 37)
    assert np.abs(train["actions"]).max() <= 1.0
    assert main([*args, "--dataset-dir", str(tmp_path / "one")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_interrupt_leaves_no_partial_file(tmp_path, monkeypatch, capsys) -> None:
    real = np.savez_compressed

    def interrupted(file, **arrays):
        file.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", interrupted)
    args = ["generate", "--env", "puzzle-3x3-play-v0", "--num-episodes", "1", "--max-episode-steps", "20"]
    assert main([*args, "--dataset-dir", str(tmp_path), "--quiet"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

    calls = []

    def second_write_interrupted(file, **arrays):
        calls.append(1)
        if len(calls) == 2:  # the val file is complete, the train file is being written
            raise KeyboardInterrupt
        real(file, **arrays)

    monkeypatch.setattr(np, "savez_compressed", second_write_interrupted)
    assert main([*args, "--dataset-dir", str(tmp_path), "--quiet"]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["puzzle-3x3-play-v0-val.json", "puzzle-3x3-play-v0-val.npz"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cube-single-play-v0", "cube-double-play-v0", "puzzle-3x3-play-v0", "scene-play-v0"])
def test_full_fixture_regeneration(name: str, tmp_path) -> None:
    """Whole fixtures within CPU_TOL. Scene's 1001-step episodes are the exception: there a last-bit difference
    eventually changes a contact or an oracle's next sub-task, after which the episodes are different trajectories
    (regenerated here against the shipped file: first step beyond 1e-6 at 148, 554, 230, 163, 850, 281, never, then
    jumps past 1e-2 within a few steps). So scene's first 100 steps of each episode are compared, and its
    layout throughout."""
    config = _shipped_config(name)
    steps = config["max_episode_steps"]
    paths = generate_dataset(GenerationConfig(**config), tmp_path, workers=2, progress=False)
    for split in ("train", "val"):
        shipped, regenerated = _arrays(fixture_dir() / paths[split].name), _arrays(paths[split])
        if name != "scene-play-v0":
            assert_within_cpu_drift(regenerated, shipped)
            continue
        first = (np.arange(len(shipped["terminals"])) % steps) < 100
        assert_within_cpu_drift(regenerated, shipped, rows=first)
        np.testing.assert_array_equal(regenerated["terminals"], shipped["terminals"])
