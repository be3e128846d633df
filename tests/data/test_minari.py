"""Minari reader: files laid out by hand, and files written by the real minari package."""
from __future__ import annotations

import json

import gymnasium as gym
import h5py
import numpy as np
import pytest

from lit_qlearn.data import DatasetError, OfflineDataModule, read_minari
from lit_qlearn.data.minari import read_minari_metadata


def _write_by_hand(root, dataset_id, episodes, metadata=None):
    data = root / dataset_id / "data"
    data.mkdir(parents=True)
    with h5py.File(data / "main_data.hdf5", "w") as f:
        for k, ep in enumerate(episodes):
            for key, value in ep.items():
                f.create_dataset(f"episode_{k}/{key}", data=value)
    if metadata is not None:
        (data / "metadata.json").write_text(json.dumps(metadata))
    return data / "main_data.hdf5"


def _episode(t, ds=2, da=1, start=0.0, terminated=False):
    obs = start + np.arange((t + 1) * ds, dtype=np.float32).reshape(t + 1, ds)
    return {
        "observations": obs,
        "actions": np.full((t, da), start, np.float32),
        "rewards": start + np.arange(t, dtype=np.float64),
        "terminations": np.array([False] * (t - 1) + [terminated]),
        "truncations": np.array([False] * (t - 1) + [not terminated]),
    }


@pytest.mark.parametrize("dataset_id", ["toy/walk/mixed-v1", "walk-mixed-v1"])
def test_read_minari_by_hand(isolated_dirs, dataset_id):
    root = isolated_dirs / "minari"
    # 11 episodes so that a lexical sort (episode_10 before episode_2) would be caught
    episodes = [_episode(3, start=100.0 * k, terminated=(k % 2 == 0)) for k in range(11)]
    _write_by_hand(root, dataset_id, episodes, {"env_spec": json.dumps({"id": "Walk-v3"}), "ref_min_score": -1.0})
    d = read_minari(dataset_id)
    assert len(d["rewards"]) == 33  # every step is a transition, truncated ones included
    ep2 = slice(6, 9)
    np.testing.assert_array_equal(d["observations"][ep2], episodes[2]["observations"][:-1])
    np.testing.assert_array_equal(d["next_observations"][ep2], episodes[2]["observations"][1:])
    np.testing.assert_array_equal(d["rewards"][:6], [0, 1, 2, 100, 101, 102])
    np.testing.assert_array_equal(np.flatnonzero(d["terminals"]), [2, 8, 14, 20, 26, 32])
    np.testing.assert_array_equal(np.flatnonzero(d["episode_ends"]), np.arange(2, 33, 3))
    assert d["observations"].dtype == np.float32 and d["rewards"].dtype == np.float32
    # id without version -> the highest local version; root given explicitly
    assert len(read_minari(dataset_id[:-3], root=root)["rewards"]) == 33
    assert read_minari_metadata(dataset_id)["env_id"] == "Walk-v3"


def test_minari_in_the_datamodule(isolated_dirs):
    episodes = [_episode(4, start=10.0 * k) for k in range(3)]
    _write_by_hand(isolated_dirs / "minari", "toy/walk/mixed-v0", episodes,
                   {"ref_min_score": -1.0, "ref_max_score": 3.0})
    dm = OfflineDataModule("minari:toy/walk/mixed-v0", normalize_states=False, check_env=False)
    dm.setup("fit")
    assert dm.num_transitions == 12 and dm.env_id is None and dm.ref_scores == (-1.0, 3.0)
    np.testing.assert_array_equal(dm.data.next_obs[4:8].numpy(), episodes[1]["observations"][1:])


def test_minari_not_found_names_the_path(isolated_dirs):
    with pytest.raises(DatasetError) as e:
        read_minari("nowhere/thing-v0")
    path = isolated_dirs / "minari" / "nowhere" / "thing-v0" / "data" / "main_data.hdf5"
    assert "'nowhere/thing-v0'" in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_minari_dict_observations_are_rejected(isolated_dirs):
    ep = _episode(3)
    ep["observations"] = {"position": ep["observations"], "goal": ep["observations"][:, :1]}
    flat = {k: v for k, v in ep.items() if k != "observations"}
    flat.update({f"observations/{k}": v for k, v in ep["observations"].items()})
    path = _write_by_hand(isolated_dirs / "minari", "maze/dict-v0", [flat])
    with pytest.raises(DatasetError) as e:
        read_minari("maze/dict-v0")
    msg = str(e.value)
    assert str(path) in msg and "'observations'" in msg and "['goal', 'position']" in msg and "unsupported" in msg


def test_minari_episode_with_wrong_observation_count(isolated_dirs):
    ep = _episode(3)
    ep["observations"] = ep["observations"][:-1]
    _write_by_hand(isolated_dirs / "minari", "bad-v0", [ep])
    with pytest.raises(DatasetError, match=r"\[episode_0\]: key 'observations' has 3 rows \(expected T\+1=4"):
        read_minari("bad-v0")


def test_minari_nan_names_the_episode_and_row(isolated_dirs):
    eps = [_episode(3), _episode(3)]
    eps[1]["rewards"][1] = np.nan
    _write_by_hand(isolated_dirs / "minari", "nan-v0", eps)
    with pytest.raises(DatasetError, match=r"\[episode_1\]: key 'rewards' has a non-finite value \(nan\) at row 1"):
        read_minari("nan-v0")


@pytest.mark.parametrize("dataset_id", ["test/pendulum/random-v0", "pendulum-random-v0"])
def test_read_dataset_written_by_minari(isolated_dirs, dataset_id):
    minari = pytest.importorskip("minari")
    from minari.data_collector import EpisodeBuffer

    # minari.DataCollector needs jax to buffer steps; build the episode buffers directly
    # and let minari's own HDF5 storage write them.
    env = gym.make("Pendulum-v1", max_episode_steps=15)
    env.action_space.seed(0)
    buffers, lengths = [], [15, 9, 15]
    for k, length in enumerate(lengths):
        obs, _ = env.reset(seed=k)
        ep = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}
        for t in range(length):
            action = env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            for key, value in zip(ep, (obs, action, reward, terminated, truncated or t == length - 1)):
                ep[key].append(value)
        buffers.append(EpisodeBuffer(id=k, **ep))
    with pytest.warns(UserWarning):
        minari.create_dataset_from_buffers(dataset_id, buffers, env=env, algorithm_name="random")

    d = read_minari(dataset_id)
    theirs = list(minari.load_dataset(dataset_id).iterate_episodes())
    assert len(d["rewards"]) == sum(lengths) == 39
    np.testing.assert_array_equal(d["observations"], np.concatenate([e.observations[:-1] for e in theirs]))
    np.testing.assert_array_equal(d["next_observations"], np.concatenate([e.observations[1:] for e in theirs]))
    np.testing.assert_array_equal(d["actions"], np.concatenate([e.actions for e in theirs]))
    np.testing.assert_allclose(d["rewards"], np.concatenate([e.rewards for e in theirs]), rtol=1e-6)
    np.testing.assert_array_equal(np.flatnonzero(d["episode_ends"]), [14, 23, 38])
    assert not d["terminals"].any()  # Pendulum never terminates
    assert read_minari_metadata(dataset_id)["env_id"] == "Pendulum-v1"
