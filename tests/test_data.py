"""OGBench data layer: loader on the shipped fixtures, chunk sampler vs a per-row reference, layouts, errors,
per-rank streams, shards and the replay buffer."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("MUJOCO_GL", "disable")

import lightning as L
import numpy as np
import pytest
import torch

from trqam_lit.data import (
    BATCH_KEYS,
    ChunkTable,
    DatasetFormatError,
    DatasetNotFoundError,
    OGBenchDataModule,
    ReplayBuffer,
    fixture_dir,
    fixture_path,
    load_table,
    sample_chunks,
)
from trqam_lit.data.paths import dataset_name_for, resolve_dataset_dir

# single-task env -> (obs_dim, number of sub-tasks, whether the fixture holds rows that solve the task)
FIXTURES = {
    "cube-single-play-singletask-task5-v0": (28, 1, True),
    "cube-double-play-singletask-task2-v0": (37, 2, False),
    "puzzle-3x3-play-singletask-task2-v0": (55, 9, True),
    "scene-play-singletask-task1-v0": (40, 5, True),
}
CUBE = "cube-single-play-singletask-task5-v0"


# ---------------------------------------------------------------- per-row reference (data.md section 4)


def reference_batch(data: dict[str, np.ndarray], idx: np.ndarray, horizon: int, discount: float) -> dict:
    """Straightforward per-row transcription of data.md section 4 over the regular layout."""
    out = {k: [] for k in BATCH_KEYS}
    for i in idx:
        valid, reward, mask, next_obs = 1.0, 0.0, 1.0, None
        actions = []
        for j in range(horizon):
            cur = i + j
            if j > 0:
                valid = valid * (1.0 - data["terminals"][cur - 1])
            reward = reward + discount**j * float(data["rewards"][cur]) * valid
            if valid:
                mask = min(mask, float(data["masks"][cur]))
                next_obs = data["next_observations"][cur]
            actions.append(data["actions"][cur])
        out["observations"].append(data["observations"][i])
        out["actions"].append(np.concatenate(actions))
        out["rewards"].append(reward)
        out["masks"].append(mask)
        out["valid"].append(valid)
        out["next_observations"].append(next_obs)
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def regular_arrays(table: ChunkTable) -> dict[str, np.ndarray]:
    assert not table.compact
    return {k: getattr(table, k) for k in ("observations", "actions", "rewards", "masks", "terminals")} | {
        "next_observations": table.next_observations
    }


def assert_batches_equal(a: dict, b: dict, exact: bool = True) -> None:
    assert set(a) == set(b) == set(BATCH_KEYS)
    for k in BATCH_KEYS:
        assert a[k].shape == b[k].shape, k
        if exact and k != "rewards":
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6, err_msg=k)


def episode_end_starts(terminals: np.ndarray, horizon: int, n: int) -> np.ndarray:
    """Every start index whose chunk contains a trajectory end (and so crosses into the next one)."""
    ends = np.flatnonzero(terminals > 0)
    starts = (ends[:, None] - np.arange(horizon)[None, :]).ravel()
    return np.unique(starts[(starts >= 0) & (starts <= n - horizon)])


@pytest.fixture(scope="module")
def cube_table() -> ChunkTable:
    return load_table(fixture_path(CUBE), CUBE)


@pytest.fixture(scope="module")
def cube_table_compact() -> ChunkTable:
    return load_table(fixture_path(CUBE), CUBE, compact=True)


# ---------------------------------------------------------------- fixtures through the real loader


@pytest.mark.parametrize("env_name", list(FIXTURES))
def test_fixture_loads_through_ogbench(env_name: str) -> None:
    import ogbench

    obs_dim, n_subtasks, solved = FIXTURES[env_name]
    path = fixture_path(env_name)
    meta = json.loads(path.with_suffix(".json").read_text())
    episodes, steps = meta["episodes"], meta["config"]["max_episode_steps"]
    with np.load(path) as raw:
        keys = set(raw.files)
        assert {"observations", "actions", "terminals", "qpos", "qvel"} <= keys
        assert ("button_states" in keys) == ("puzzle" in env_name or "scene" in env_name)
        assert raw["observations"].dtype == np.float32 and raw["actions"].dtype == np.float32
        assert raw["terminals"].dtype == bool and raw["qpos"].dtype == np.float32
        if "button_states" in keys:
            assert raw["button_states"].dtype == np.int64
        assert raw["observations"].shape == (episodes * steps, obs_dim)
        assert raw["actions"].shape == (episodes * steps, 5)
        assert raw["terminals"].sum() == episodes
        assert np.flatnonzero(raw["terminals"]).tolist() == [steps * (e + 1) - 1 for e in range(episodes)]

    ds = ogbench.load_dataset(str(path), add_info=True)
    assert ds["observations"].shape == ds["next_observations"].shape == (episodes * (steps - 1), obs_dim)

    table = load_table(path, env_name)
    n = episodes * (steps - 1)
    assert len(table) == n and table.terminals.sum() == episodes
    for k in ("observations", "actions", "rewards", "masks", "terminals", "next_observations"):
        assert getattr(table, k).dtype == np.float32, k
    assert np.abs(table.actions).max() <= 1 - 1e-5
    assert table.rewards.min() >= -n_subtasks and table.rewards.max() <= 0
    assert np.all(table.rewards == np.round(table.rewards))
    # Manipulation: reward 0 exactly when every sub-task is done, which is exactly where masks are 0.
    np.testing.assert_array_equal(table.masks == 0, table.rewards == 0)
    assert (table.masks == 0).any() == solved

    sparse = load_table(path, env_name, sparse=True)
    assert set(np.unique(sparse.rewards)) <= {-1.0, 0.0}
    np.testing.assert_array_equal(sparse.rewards == 0, table.rewards == 0)


def test_fixture_helpers_and_sentinel(tmp_path, monkeypatch) -> None:
    assert fixture_path("cube-single-play-v0") == fixture_dir() / "cube-single-play-v0.npz"
    assert fixture_path(CUBE).is_file() and fixture_path(CUBE).with_name("cube-single-play-v0-val.npz").is_file()
    with pytest.raises(DatasetNotFoundError, match="ships"):
        fixture_path("cube-triple-play-v0")
    assert resolve_dataset_dir("fixture") == fixture_dir()
    monkeypatch.setenv("TRQAM_DATA_DIR", str(tmp_path))
    assert resolve_dataset_dir(None) == tmp_path
    monkeypatch.delenv("TRQAM_DATA_DIR")
    assert str(resolve_dataset_dir(None)).endswith(os.path.join(".ogbench", "data"))
    assert dataset_name_for("cube-double-play-singletask-task3-v0") == "cube-double-play-v0"
    assert dataset_name_for("scene-play-singletask-v0") == "scene-play-v0"


# ---------------------------------------------------------------- sampler


@pytest.mark.parametrize("horizon", [1, 5, 8])
def test_sampler_matches_per_row_reference(cube_table: ChunkTable, horizon: int) -> None:
    n = len(cube_table)
    crossing = episode_end_starts(cube_table.terminals, horizon, n)
    idx = np.concatenate([crossing, np.random.default_rng(0).integers(0, n - horizon + 1, 300), [0, n - horizon]])
    got = sample_chunks(cube_table, idx, horizon, 0.995)
    want = reference_batch(regular_arrays(cube_table), idx, horizon, 0.995)
    assert_batches_equal(got, want, exact=False)
    if horizon > 1:
        assert (got["valid"] == 0).any() and (got["valid"] == 1).any()
    assert (got["masks"] == 0).any()


def _synthetic_npz(path, lengths: list[int], seed: int = 0) -> None:
    """Raw OGBench-style file with short trajectories; qpos/qvel carry a per-row reward/mask to compare layouts."""
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    terminals = np.zeros(n, dtype=bool)
    terminals[np.cumsum(lengths) - 1] = True
    np.savez_compressed(
        path,
        observations=rng.normal(size=(n, 3)).astype(np.float32),
        actions=rng.uniform(-1, 1, size=(n, 2)).astype(np.float32),
        terminals=terminals,
        qpos=rng.integers(-3, 1, size=(n, 1)).astype(np.float32),
        qvel=(rng.uniform(size=(n, 1)) > 0.3).astype(np.float32),
    )


def _tables_from_raw(path) -> tuple[ChunkTable, ChunkTable]:
    import ogbench

    tables = []
    for compact in (False, True):
        ds = ogbench.load_dataset(str(path), compact_dataset=compact, add_info=True)
        kw = dict(
            observations=ds["observations"],
            actions=ds["actions"],
            rewards=ds["qpos"][:, 0].copy(),
            masks=ds["qvel"][:, 0].copy(),
            terminals=ds["terminals"],
        )
        if compact:
            tables.append(ChunkTable(**kw, rows=np.flatnonzero(ds["valids"] > 0)))
        else:
            tables.append(ChunkTable(**kw, next_observations=ds["next_observations"]))
    return tables[0], tables[1]


def test_sampler_short_trajectories_and_layouts(tmp_path) -> None:
    """Trajectories shorter than the chunk: several ends inside one chunk; compact == regular == reference."""
    path = tmp_path / "synthetic.npz"
    _synthetic_npz(path, [2, 3, 2, 7, 2, 4, 9, 2, 3])
    regular, compact = _tables_from_raw(path)
    horizon = 5
    idx = np.arange(len(regular) - horizon + 1)
    want = reference_batch(regular_arrays(regular), idx, horizon, 0.9)
    assert_batches_equal(sample_chunks(regular, idx, horizon, 0.9), want, exact=False)
    assert_batches_equal(sample_chunks(compact, idx, horizon, 0.9), sample_chunks(regular, idx, horizon, 0.9))


def test_compact_layout_gives_identical_batches(cube_table, cube_table_compact) -> None:
    assert len(cube_table_compact) == len(cube_table)
    # The compact layout keeps every raw row: one more per trajectory.
    assert len(cube_table_compact.observations) == len(cube_table) + int(cube_table.terminals.sum())
    for horizon in (1, 5):
        n = len(cube_table)
        idx = np.concatenate(
            [episode_end_starts(cube_table.terminals, horizon, n), np.random.default_rng(1).integers(0, n - 4, 500)]
        )
        assert_batches_equal(
            sample_chunks(cube_table_compact, idx, horizon, 0.995), sample_chunks(cube_table, idx, horizon, 0.995)
        )


# ---------------------------------------------------------------- DataModule


def _batches(dm: OGBenchDataModule, n: int) -> list[dict[str, torch.Tensor]]:
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def test_datamodule_dims_batches_and_determinism() -> None:
    dm = OGBenchDataModule(env_name=CUBE, dataset_dir="fixture", horizon=5, batch_size=32, seed=3)
    assert (dm.obs_dim, dm.action_dim, dm.chunk_dim) == (28, 5, 25)  # known before any data is loaded
    dm.setup("fit")
    (batch,) = _batches(dm, 1)
    shapes = {
        "observations": (32, 28),
        "actions": (32, 25),
        "rewards": (32,),
        "masks": (32,),
        "valid": (32,),
        "next_observations": (32, 28),
    }
    assert {k: tuple(v.shape) for k, v in batch.items()} == shapes
    assert all(v.dtype == torch.float32 for v in batch.values())
    again = OGBenchDataModule(env_name=CUBE, dataset_dir="fixture", horizon=5, batch_size=32, seed=3)
    again.setup("fit")
    for a, b in zip(_batches(dm, 3), _batches(again, 3), strict=True):
        for k in BATCH_KEYS:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    other = OGBenchDataModule(env_name=CUBE, dataset_dir="fixture", horizon=5, batch_size=32, seed=4)
    other.setup("fit")
    assert not torch.equal(_batches(other, 1)[0]["observations"], batch["observations"])


def test_per_rank_streams_differ_and_are_reproducible() -> None:
    firsts = {}
    for rank in (0, 1, 0):
        dm = OGBenchDataModule(env_name=CUBE, dataset_dir="fixture", batch_size=64, seed=0)
        dm.trainer = SimpleNamespace(global_rank=rank, global_step=0)
        dm.setup("fit")
        obs = torch.cat([b["observations"] for b in _batches(dm, 2)])
        if rank in firsts:
            assert torch.equal(firsts[rank], obs)
        firsts[rank] = obs
    assert not torch.equal(firsts[0], firsts[1])
    # A resumed run (global step > 0) draws fresh batches instead of replaying the start of the stream.
    dm = OGBenchDataModule(env_name=CUBE, dataset_dir="fixture", batch_size=64, seed=0)
    dm.trainer = SimpleNamespace(global_rank=0, global_step=5)
    dm.setup("fit")
    assert not torch.equal(torch.cat([b["observations"] for b in _batches(dm, 2)]), firsts[0])


def test_missing_file_error_names_files_and_never_downloads(tmp_path, monkeypatch) -> None:
    import urllib.request

    import ogbench
    import ogbench.utils

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(ogbench, "download_datasets", no_network)
    monkeypatch.setattr(ogbench.utils, "download_datasets", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    dm = OGBenchDataModule(env_name="cube-double-play-singletask-task3-v0", dataset_dir=str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as err:
        dm.setup("fit")
    assert isinstance(err.value, FileNotFoundError)
    msg = str(err.value)
    assert str(tmp_path / "cube-double-play-v0.npz") in msg and str(tmp_path / "cube-double-play-v0-val.npz") in msg
    assert "ogbench.download_datasets(['cube-double-play-v0']" in msg
    assert "trqam-lit-data generate --env cube-double-play-v0 --num-episodes 1000 --workers 2 --seed 0 " in msg
    assert f"--dataset-dir {tmp_path}" in msg

    # The environment variable moves the default directory; the generator then needs no --dataset-dir.
    monkeypatch.setenv("TRQAM_DATA_DIR", str(tmp_path / "elsewhere"))
    dm = OGBenchDataModule(env_name="cube-double-play-singletask-task3-v0")
    with pytest.raises(DatasetNotFoundError, match="elsewhere") as err:
        dm.setup("fit")
    assert "--dataset-dir" not in str(err.value)

    dm = OGBenchDataModule(env_name="antmaze-large-navigate-singletask-v0", dataset_dir=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="locomotion data needs the official files"):
        dm.setup("fit")


def _copy_fixture(tmp_path, name: str = "cube-single-play-v0", **override) -> None:
    with np.load(fixture_dir() / f"{name}.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez_compressed(tmp_path / "cube-single-play-v0.npz", **arrays)


def test_corrupt_and_mismatched_files_give_format_errors(tmp_path) -> None:
    target = tmp_path / "cube-single-play-v0.npz"
    good = (fixture_dir() / "cube-single-play-v0.npz").read_bytes()

    def setup_error() -> str:
        dm = OGBenchDataModule(env_name=CUBE, dataset_dir=str(tmp_path))
        with pytest.raises(DatasetFormatError) as err:
            dm.setup("fit")
        return str(err.value)

    target.write_bytes(good[: len(good) // 2])  # an interrupted copy
    assert "truncated or damaged" in setup_error()
    target.write_bytes(b"<html>404 not found</html>")
    assert "truncated or damaged" in setup_error()
    damaged = bytearray(good)
    damaged[len(good) // 3 : len(good) // 3 + 64] = bytes(64)  # bytes flipped inside the compressed data
    target.write_bytes(bytes(damaged))
    assert str(target) in setup_error()

    _copy_fixture(tmp_path, qpos=None)
    assert "lacks ['qpos']" in setup_error()
    with np.load(fixture_dir() / "cube-single-play-v0.npz") as f:
        actions = f["actions"]
    _copy_fixture(tmp_path, actions=actions[:, :4])
    assert "another environment" in setup_error()
    _copy_fixture(tmp_path, actions=actions[:-7])
    assert "same >= 2 rows" in setup_error()
    _copy_fixture(tmp_path, "puzzle-3x3-play-v0")  # another domain's file under this name
    assert "another environment" in setup_error()
    with np.load(fixture_dir() / "cube-single-play-v0.npz") as f:
        terminals = f["terminals"].copy()
    terminals[-1] = False
    _copy_fixture(tmp_path, terminals=terminals)
    assert "last row is not a trajectory end" in setup_error()


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`:UserWarning")  # evaluation is the agents' job
def test_trainer_fits_from_fixture(tmp_path) -> None:
    class Probe(L.LightningModule):
        def __init__(self, obs_dim: int, chunk_dim: int) -> None:
            super().__init__()
            self.net = torch.nn.Linear(obs_dim + chunk_dim, 1)
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append({k: tuple(v.shape) for k, v in batch.items()})
            x = torch.cat([batch["observations"], batch["actions"]], dim=-1)
            return ((self.net(x).squeeze(-1) - batch["rewards"]) ** 2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    dm = OGBenchDataModule(env_name="puzzle-3x3-play-singletask-task2-v0", dataset_dir="fixture", batch_size=16)
    model = Probe(dm.obs_dim, dm.chunk_dim)
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert len(model.seen) == 3 and model.seen[0]["actions"] == (16, 25)


def test_a_shard_that_vanished_before_its_prefetch_is_reported_missing(tmp_path) -> None:
    from trqam_lit.data.loading import decompress_npz

    with pytest.raises(DatasetNotFoundError, match="not found"):
        decompress_npz(tmp_path / "shard-007.npz")
    (tmp_path / "shard-008.npz").write_bytes(b"PK\x03\x04 half a file")
    with pytest.raises(DatasetFormatError, match="truncated or damaged"):
        decompress_npz(tmp_path / "shard-008.npz")


def test_shard_directory_cycles_every_n_steps(tmp_path) -> None:
    shard_dir, sizes = _write_shards(tmp_path)

    for rank in (0, 1):
        dm = OGBenchDataModule(env_name=CUBE, dataset_path=str(shard_dir), batch_size=8, shard_steps=2)
        dm.trainer = SimpleNamespace(global_rank=rank, global_step=0)
        dm.setup("fit")
        assert dm.dataset_files() == sorted(shard_dir.glob("shard-00?.npz"))
        stream = dm.train_dataloader().dataset
        it = iter(stream)
        for step in range(8):
            batch = next(it)
            shard = (rank + step // 2) % 3
            assert len(stream._source_at(step)) == sizes[shard], (rank, step)
            table = stream._source_at(step)
            # every observation of the batch comes from that shard
            rows = (batch["observations"].numpy()[:, None, :] == table.observations[None]).all(-1).any(-1)
            assert rows.all(), (rank, step)


def _write_shards(tmp_path) -> tuple[Path, list[int]]:
    """Three shards of 1, 2 and 3 cube-single episodes (and a val file the directory loader ignores)."""
    with np.load(fixture_dir() / "cube-single-play-v0.npz") as f:
        raw = {k: f[k] for k in f.files}
    ends = np.flatnonzero(raw["terminals"]) + 1
    bounds = [(0, ends[0]), (ends[0], ends[2]), (ends[2], ends[5])]  # 1, 2 and 3 episodes
    shard_dir = tmp_path / "cube-single-play-100m-v0"
    shard_dir.mkdir()
    for i, (a, b) in enumerate(bounds):
        np.savez_compressed(shard_dir / f"shard-{i:03d}.npz", **{k: v[a:b] for k, v in raw.items()})
    np.savez_compressed(shard_dir / "shard-000-val.npz", **{k: v[:250] for k, v in raw.items()})  # ignored
    return shard_dir, [(b - a) - (b - a) // 250 for a, b in bounds]


def test_shard_prefetch_thread_parses_no_ast(tmp_path, monkeypatch) -> None:
    """np.load parses every .npy header with ast.literal_eval, and on CPython 3.11.0-3.11.7 / 3.12.0-3.12.1 two
    threads building ASTs at once can make one raise SystemError (gh-106905; it failed this file's shard test under
    -n auto). The prefetch thread therefore only decompresses: every AST is built in the sampling thread, and the
    prefetched shard equals the one read directly."""
    import ast
    import threading

    from trqam_lit.data.datamodule import ShardCycler

    shard_dir, sizes = _write_shards(tmp_path)
    paths = sorted(shard_dir.glob("shard-00?.npz"))
    direct = [load_table(p, CUBE) for p in paths]
    parsing_threads: set[str] = set()
    real_parse = ast.parse

    def recording_parse(*args, **kwargs):
        parsing_threads.add(threading.current_thread().name)
        return real_parse(*args, **kwargs)

    monkeypatch.setattr(ast, "parse", recording_parse)
    cycler = ShardCycler(paths, CUBE, compact=False, sparse=False, prefetch=True)
    for i in (0, 1, 2, 0):
        table = cycler.get(i)
        assert len(table) == sizes[i]
        for k in ("observations", "actions", "rewards", "masks", "terminals", "next_observations"):
            np.testing.assert_array_equal(getattr(table, k), getattr(direct[i], k), err_msg=k)
        assert list(cycler._pending) == [(i + 1) % 3]  # the next shard was handed to the prefetch thread
        cycler._pending[(i + 1) % 3].result()
    assert parsing_threads == {threading.current_thread().name}


# ---------------------------------------------------------------- replay buffer


def _online_episode(rng: np.random.Generator, length: int, obs_dim: int = 28) -> list[tuple]:
    out = []
    for t in range(length):
        done = t == length - 1
        success = done and rng.uniform() < 0.5
        out.append(
            (
                rng.normal(size=obs_dim).astype(np.float32),
                rng.uniform(-1, 1, size=5).astype(np.float32),
                0.0 if success else -1.0,
                done,
                0.0 if success else 1.0,
                rng.normal(size=obs_dim).astype(np.float32),
            )
        )
    return out


def _buffer_reference_arrays(table: ChunkTable, online: list[tuple]) -> dict[str, np.ndarray]:
    base = regular_arrays(table)
    cols = list(zip(*online, strict=True))
    extra = {
        "observations": np.stack(cols[0]),
        "actions": np.clip(np.stack(cols[1]), -1 + 1e-5, 1 - 1e-5),
        "rewards": np.asarray(cols[2], np.float32),
        "terminals": np.asarray(cols[3], np.float32),
        "masks": np.asarray(cols[4], np.float32),
        "next_observations": np.stack(cols[5]),
    }
    return {k: np.concatenate([base[k], extra[k]]) for k in base}


@pytest.mark.parametrize("compact", [False, True])
def test_replay_buffer_add_sample_and_state(cube_table, cube_table_compact, compact: bool) -> None:
    rng = np.random.default_rng(0)
    offline = cube_table_compact if compact else cube_table
    buf = ReplayBuffer(offline, capacity_extra=100)
    n_off = len(cube_table)
    assert len(buf) == n_off and buf.online_size == 0
    idx = rng.integers(0, n_off - 4, 200)
    assert_batches_equal(buf.sample(idx, 5, 0.99), sample_chunks(cube_table, idx, 5, 0.99))

    online = _online_episode(rng, 7) + _online_episode(rng, 11) + _online_episode(rng, 3)
    for tr in online:
        buf.add(*tr)
    assert len(buf) == n_off + 21 and buf.online_size == 21
    ref = _buffer_reference_arrays(cube_table, online)
    idx = np.concatenate([np.arange(n_off - 6, len(buf) - 4), rng.integers(0, len(buf) - 4, 100)])
    got = buf.sample(idx, 5, 0.99)
    assert_batches_equal(got, reference_batch(ref, idx, 5, 0.99), exact=False)

    state = buf.state_dict()
    assert all(len(v) == 21 for v in state["online"].values())  # online part only
    restored = ReplayBuffer(offline, capacity_extra=50)
    restored.load_state_dict(state)
    assert_batches_equal(restored.sample(idx, 5, 0.99), got)


def test_replay_buffer_keeps_offline_rows_when_full(cube_table, tmp_path) -> None:
    rng = np.random.default_rng(1)
    buf = ReplayBuffer(cube_table, capacity_extra=6)
    n_off = len(cube_table)
    online = _online_episode(rng, 10)  # 4 more transitions than there is room for
    for tr in online:
        buf.add(*tr)
    assert len(buf) == n_off + 6
    idx = np.arange(n_off - 10, n_off - 4)
    assert_batches_equal(buf.sample(idx, 5, 0.99), sample_chunks(cube_table, idx, 5, 0.99))
    # Storage now holds transitions 6..9 then 4..5 (head at 4): chronological order is 4..9.
    chrono = ReplayBuffer(cube_table, capacity_extra=6)
    for tr in online[4:]:
        chrono.add(*tr)
    ref = _buffer_reference_arrays(cube_table, online[4:])
    # A chunk from the newest row (storage slot 3) must not continue into the oldest one (slot 4).
    got = buf.sample(np.array([n_off + 3, n_off + 1]), 2, 0.99)
    assert got["valid"].tolist() == [0.0, 1.0]
    np.testing.assert_array_equal(got["observations"][0], ref["observations"][n_off + 5])

    path = tmp_path / "buffer.pt"
    torch.save(buf.state_dict(), path)
    state = torch.load(path, weights_only=True)
    np.testing.assert_array_equal(state["online"]["observations"].numpy(), ref["observations"][n_off:])
    restored = ReplayBuffer(cube_table, capacity_extra=6)
    restored.load_state_dict(state)
    idx = np.arange(0, len(chrono) - 2)
    assert_batches_equal(restored.sample(idx, 3, 0.9), chrono.sample(idx, 3, 0.9))
    other = load_table(fixture_path("cube-double-play-v0"), "cube-double-play-singletask-task2-v0")
    with pytest.raises(ValueError, match="offline transitions"):
        ReplayBuffer(other, capacity_extra=6).load_state_dict(state)


def test_datamodule_replay_buffer_feeds_the_stream_and_checkpoints() -> None:
    rng = np.random.default_rng(2)
    dm = OGBenchDataModule(env_name=CUBE, dataset_dir="fixture", batch_size=32, sparse=True)
    dm.setup("fit")
    n_off = len(dm.table)
    it = iter(dm.train_dataloader())
    next(it)
    buf = dm.make_replay_buffer(capacity_extra=1000)
    assert dm.table is None and dm.make_replay_buffer(5) is buf
    online = _online_episode(rng, 400)
    for tr in online:
        buf.add(*tr)
    online_obs = torch.from_numpy(np.stack([tr[0] for tr in online]))
    hits = 0
    for _ in range(10):  # the running stream now samples the buffer, online rows included
        obs = next(it)["observations"]
        hits += int((obs[:, None, :] == online_obs[None]).all(-1).any(-1).sum())
    assert len(buf) == n_off + 400 and hits > 0
    assert set(np.unique(buf._table.rewards[: len(buf)])) <= {-1.0, 0.0}  # sparse applies online too

    state = dm.state_dict()
    fresh = OGBenchDataModule(env_name=CUBE, dataset_dir="fixture", batch_size=32, sparse=True)
    fresh.load_state_dict(state)  # before the buffer exists (Lightning restores after setup)
    fresh.setup("fit")
    restored = fresh.make_replay_buffer(capacity_extra=1000)
    assert len(restored) == len(buf)
    idx = np.arange(n_off - 10, len(buf) - 5)
    assert_batches_equal(restored.sample(idx, 5, 0.995), buf.sample(idx, 5, 0.995))
    assert OGBenchDataModule(env_name=CUBE, dataset_dir="fixture").state_dict() == {}


def test_npz_inspection_reads_headers_only(tmp_path) -> None:
    from trqam_lit.data.loading import inspect_npz

    shapes = inspect_npz(fixture_path("scene-play-v0"))
    assert shapes["button_states"][1] == np.int64 and shapes["observations"][0][1] == 40
    with zipfile.ZipFile(fixture_path("scene-play-v0")) as zf:
        assert "observations.npy" in zf.namelist()


def test_replay_buffer_edges_write_head_resume_and_stored_values(cube_table) -> None:
    """The online part's edge cases: the write head in the middle of an episode, appending after a resume, and what
    ``add`` stores (the action clip, the sparse reward, the mask of an unsolved episode end)."""
    rng = np.random.default_rng(2)
    n_off = len(cube_table)
    # Wrapped mid-episode: 8 steps of a 10-step episode into 6 slots; the newest row (slot 1) is not a terminal,
    # yet a chunk from it must stop at the write head instead of running into the oldest row (slot 2).
    buf = ReplayBuffer(cube_table, capacity_extra=6)
    episode = _online_episode(rng, 10)
    for tr in episode[:8]:
        buf.add(*tr)
    got = buf.sample(np.array([n_off + 1, n_off + 2]), 2, 0.99)
    assert got["valid"].tolist() == [0.0, 1.0]

    # Resumed with room left: the next transition is appended after the restored ones, as in the original buffer.
    partial = ReplayBuffer(cube_table, capacity_extra=6)
    for tr in episode[:3]:
        partial.add(*tr)
    restored = ReplayBuffer(cube_table, capacity_extra=6)
    restored.load_state_dict(partial.state_dict())
    for b in (partial, restored):
        b.add(*episode[3])
    for key, value in partial.state_dict()["online"].items():
        torch.testing.assert_close(restored.state_dict()["online"][key], value, rtol=0, atol=0, msg=key)

    # Stored values: actions clipped as the offline data's; sparse rewards -1 * (r != 0); a time-limit end without
    # success is a terminal with mask 1 (it bootstraps).
    sparse = ReplayBuffer(cube_table, capacity_extra=4, sparse=True)
    obs, nxt = np.zeros(28, np.float32), np.ones(28, np.float32)
    action = np.array([1.0, -1.0, 0.5, 2.0, -3.0], np.float32)
    sparse.add(obs, action, 0.0, False, 1.0, nxt)
    sparse.add(obs, action, 5.0, True, 1.0, nxt)
    online = sparse.state_dict()["online"]
    limit = 1.0 - 1e-5
    np.testing.assert_array_equal(online["actions"][0].numpy(), np.float32([limit, -limit, 0.5, limit, -limit]))
    assert online["rewards"].tolist() == [0.0, -1.0]
    assert online["terminals"].tolist() == [0.0, 1.0] and online["masks"].tolist() == [1.0, 1.0]


def test_chunk_streams_with_loader_workers_and_the_smallest_source(cube_table) -> None:
    """With DataLoader workers the stream still yields the batch of global step k at position k (worker w of W takes
    steps w, w + W, ...); and a source of exactly H transitions holds one chunk, every start in [0, N - H] drawn."""
    from torch.utils.data import DataLoader

    from trqam_lit.data.datamodule import ChunkStream, _SourceRef
    from trqam_lit.data.replay import batch_rng, draw_batch

    ref = _SourceRef()
    ref.source = cube_table
    stream = ChunkStream(ref, batch_size=4, horizon=5, discount=0.99, seed=3, start_step=10)
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    got = [batch for _, batch in zip(range(4), loader, strict=False)]
    for k, batch in enumerate(got):
        want = draw_batch(cube_table, batch_rng(3, 0, 10 + k), 4, 5, 0.99)
        for key, value in want.items():
            torch.testing.assert_close(batch[key], value, rtol=0, atol=0, msg=f"step {10 + k} {key}")

    class Starts:  # a source of N transitions that records the chunk starts asked for
        def __init__(self, n: int) -> None:
            self.n, self.starts = n, []

        def __len__(self) -> int:
            return self.n

        def sample(self, idx, horizon, discount):
            self.starts.extend(idx.tolist())
            return {"idx": idx}

    rng = np.random.default_rng(0)
    exact = Starts(5)
    draw_batch(exact, rng, 8, 5, 0.99)
    assert exact.starts == [0] * 8
    wider = Starts(7)
    draw_batch(wider, rng, 200, 5, 0.99)
    assert set(wider.starts) == {0, 1, 2}
    with pytest.raises(ValueError, match="cannot hold a chunk"):
        draw_batch(Starts(4), rng, 1, 5, 0.99)
