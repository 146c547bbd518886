"""Robomimic files, normalisation and environment: the official layout read as the reference's get_dataset reads it."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from trqam_lit.data.errors import DatasetFormatError, DatasetNotFoundError
from trqam_lit.data.robomimic import (
    RobomimicDataModule,
    normalization_stats,
    parse_robomimic_name,
    process_robomimic,
    read_env_meta,
    read_robomimic,
    robomimic_file,
    write_robomimic,
)

DIMS = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2, "object": 10}
KEYS = list(DIMS)


def _official_file(path, lengths=(4, 3, 5, 2), names=("demo_0", "demo_1", "demo_10", "demo_2"), seed=0):
    """A lift file written with h5py alone (not our writer), in the layout of robomimic's low_dim_v15.hdf5: float64
    observations with an extra key the reader must ignore, demos stored out of numeric order, masks as bytes."""
    rng = np.random.default_rng(seed)
    demos = {}
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {"robots": ["Panda"]}})
        for name, steps in zip(names, lengths, strict=True):
            g = data.create_group(name)
            g.attrs["num_samples"] = steps
            demo = {
                "actions": rng.uniform(-1.2, 1.2, (steps, 7)),
                "rewards": np.r_[np.zeros(steps - 1), 1.0],
                "dones": np.r_[np.zeros(steps - 1, dtype=np.int64), 1],
                "states": rng.normal(size=(steps, 32)),
                "obs": {k: rng.normal(size=(steps, d)) * 3 for k, d in DIMS.items()},
                "next_obs": {k: rng.normal(size=(steps, d)) * 3 for k, d in DIMS.items()},
            }
            for key in ("actions", "rewards", "dones", "states"):
                g.create_dataset(key, data=demo[key])
            for part in ("obs", "next_obs"):
                for key, value in demo[part].items():
                    g.create_dataset(f"{part}/{key}", data=value)
                g.create_dataset(f"{part}/robot0_joint_pos", data=rng.normal(size=(steps, 7)))
            demos[name] = demo
        f.create_dataset("mask/train", data=np.array([n.encode() for n in names]))
    return demos


def _reference_get_dataset(demos, order):
    """The reference's get_dataset + main.py's reward shift + make_env_and_datasets' clip, written out by hand."""
    cat = {
        part: np.concatenate(
            [np.concatenate([demos[n][part][k] for k in KEYS], axis=-1).astype(np.float32) for n in order]
        )
        for part in ("obs", "next_obs")
    }
    lo = np.concatenate([cat["obs"], cat["next_obs"]]).min(0).astype(np.float32)
    hi = np.concatenate([cat["obs"], cat["next_obs"]]).max(0).astype(np.float32)

    def norm(x):
        return (2 * ((x - lo) / (hi - lo + 1e-6) - 0.5)).astype(np.float32)

    dones = np.concatenate([demos[n]["dones"] for n in order]).astype(np.float32)
    return {
        "observations": norm(cat["obs"]),
        "next_observations": norm(cat["next_obs"]),
        "actions": np.clip(
            np.concatenate([demos[n]["actions"] for n in order]).astype(np.float32), -1 + 1e-5, 1 - 1e-5
        ),
        "rewards": np.concatenate([demos[n]["rewards"] for n in order]).astype(np.float32) - 1.0,
        "terminals": dones,
        "masks": 1.0 - dones,
        "stats": (lo, hi),
    }


def test_an_official_layout_file_written_with_h5py_reads_as_the_reference_reads_it(tmp_path):
    path = tmp_path / "low_dim_v15.hdf5"
    demos = _official_file(path)
    table, stats = process_robomimic(read_robomimic(path, "lift-mh-low_dim"))
    expected = _reference_get_dataset(demos, ["demo_0", "demo_1", "demo_2", "demo_10"])  # numeric order
    for key in ("observations", "next_observations", "actions", "rewards", "terminals", "masks"):
        np.testing.assert_array_equal(getattr(table, key), expected[key], err_msg=key)
        assert getattr(table, key).dtype == np.float32, key
    np.testing.assert_array_equal(stats[0], expected["stats"][0])
    np.testing.assert_array_equal(stats[1], expected["stats"][1])
    assert np.abs(table.observations).max() <= 1.0 + 1e-6
    assert read_env_meta(path)["env_name"] == "Lift"


def test_our_writer_round_trips_through_the_reader(tmp_path):
    source = tmp_path / "a.hdf5"
    demos = _official_file(source, lengths=(3, 6), names=("demo_0", "demo_1"))
    written = tmp_path / "b.hdf5"
    meta = {"env_name": "Lift", "type": 1, "env_kwargs": {}}
    write_robomimic(written, meta, [demos["demo_0"], demos["demo_1"]], masks={"better": ["demo_1"]})
    a, b = read_robomimic(source, "lift-mh-low_dim"), read_robomimic(written, "lift-mh-low_dim")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert read_env_meta(written) == meta
    with h5py.File(written) as f:
        assert [x.decode() for x in f["mask/better"][()]] == ["demo_1"]
        assert f["data"].attrs["total"] == 9
        np.testing.assert_array_equal(f["data/demo_1/states"][()], demos["demo_1"]["states"])


def test_the_default_path_is_robomimics_download_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("TRQAM_ROBOMIMIC_DIR", str(tmp_path))
    assert robomimic_file("square-mh-low_dim") == tmp_path / "square" / "mh" / "low_dim_v15.hdf5"
    assert robomimic_file("can-ph-low_dim", tmp_path / "x") == tmp_path / "x" / "can" / "ph" / "low_dim_v15.hdf5"
    assert parse_robomimic_name("square-mh-low_dim").obs_dim == 23
    assert parse_robomimic_name("lift-mh-low_dim").max_episode_steps == 300
    with pytest.raises(ValueError, match="lift-mh-low_dim"):
        parse_robomimic_name("transport-mh-low_dim")


def test_a_missing_file_says_where_it_looked_and_how_to_generate_data(tmp_path):
    dm = RobomimicDataModule("can-mh-low_dim", dataset_dir=str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as err:
        dm.setup("fit")
    text = str(err.value)
    assert str(tmp_path / "can" / "mh" / "low_dim_v15.hdf5") in text
    assert "trqam-lit-data generate --env can-mh-low_dim" in text


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: f["data/demo_1"].__delitem__("dones"), "data/demo_1 lacks 'dones'"),
        (lambda f: f["data/demo_0/obs"].__delitem__("object"), "data/demo_0/obs lacks 'object'"),
        (lambda f: f["data/demo_1/next_obs"].__delitem__("robot0_eef_quat"), "demo_1/next_obs lacks 'robot0_eef_quat'"),
        (lambda f: f["data"].create_group("extra"), "not demo_<i>"),
        (lambda f: _reshape(f, "demo_0/rewards", 2), "demo_0/rewards has shape"),
    ],
)
def test_a_file_missing_a_key_or_with_a_wrong_shape_names_what_and_where(tmp_path, damage, message):
    path = tmp_path / "low_dim_v15.hdf5"
    _official_file(path, lengths=(3, 4), names=("demo_0", "demo_1"))
    with h5py.File(path, "a") as f:
        damage(f)
    with pytest.raises(DatasetFormatError, match=message):
        read_robomimic(path, "lift-mh-low_dim")


def _reshape(f, key, rows):
    value = f[f"data/{key}"][()][:rows]
    del f[f"data/{key}"]
    f.create_dataset(f"data/{key}", data=value)


def test_a_file_of_another_task_is_refused_with_the_dimension_it_expected(tmp_path):
    path = tmp_path / "low_dim_v15.hdf5"
    _official_file(path, lengths=(3,), names=("demo_0",))  # lift: object has 10 dims
    with pytest.raises(DatasetFormatError, match=r"can needs \(3, 14\)"):
        read_robomimic(path, "can-mh-low_dim")
    (tmp_path / "bad.hdf5").write_bytes(b"not hdf5 at all")
    with pytest.raises(DatasetFormatError, match="not a readable HDF5"):
        read_robomimic(tmp_path / "bad.hdf5", "lift-mh-low_dim")


def test_stats_over_observations_and_next_observations():
    obs = np.array([[0.0, 5.0], [1.0, 2.0]], dtype=np.float32)
    nxt = np.array([[-1.0, 3.0], [0.5, 7.0]], dtype=np.float32)
    lo, hi = normalization_stats(obs, nxt)
    np.testing.assert_array_equal(lo, [-1.0, 2.0])
    np.testing.assert_array_equal(hi, [1.0, 7.0])


@pytest.fixture(scope="module")
def lift_env():
    from trqam_lit.data.robomimic_env import RobomimicLowDimEnv, env_meta_for

    lo, hi = np.full(19, -2.0, dtype=np.float32), np.full(19, 3.0, dtype=np.float32)
    env = RobomimicLowDimEnv(env_meta_for("lift"), lo, hi, max_episode_steps=4)
    yield env
    env.close()


def test_the_environment_normalises_the_four_keys_with_the_dataset_statistics(lift_env):
    obs, _ = lift_env.reset(seed=5)
    raw = lift_env.env._get_observations(force_update=True)
    cat = np.concatenate(
        [raw["robot0_eef_pos"], raw["robot0_eef_quat"], raw["robot0_gripper_qpos"], raw["object-state"]]
    )
    np.testing.assert_allclose(obs, 2 * ((cat - -2.0) / (5.0 + 1e-6) - 0.5), rtol=1e-6, atol=1e-7)
    assert obs.dtype == np.float32 and obs.shape == (19,)
    assert np.any(cat[9:12] != 0), "object state read after the reset, not robosuite's stale zeros"


def test_a_seeded_reset_places_the_object_reproducibly_and_the_step_limit_truncates(lift_env):
    a, _ = lift_env.reset(seed=11)
    b, _ = lift_env.reset(seed=12)
    c, _ = lift_env.reset(seed=11)
    np.testing.assert_array_equal(a, c)
    assert np.abs(a - b).max() > 1e-3
    ends = [lift_env.step(np.zeros(7))[2:4] for _ in range(4)]
    assert ends == [(False, False)] * 3 + [(False, True)]
