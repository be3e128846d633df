"""collect(): rollouts checked step by step against gymnasium; reference scores."""
from __future__ import annotations

import os

import gymnasium as gym
import lightning as L
import numpy as np
import pytest
import torch

from lit_qlearn.data import REF_SCORES, DatasetError, default_dataset_path, read_d4rl, reference_scores
from lit_qlearn.data.checkpoint import CheckpointError
from lit_qlearn.data.d4rl import load_d4rl_raw
from lit_qlearn.datasets import collect, ensure_default_dataset


def test_random_pendulum_rollout_matches_gymnasium(tmp_path):
    path = collect("Pendulum-v1", "random", steps=35, path=tmp_path / "p.hdf5", seed=3, max_episode_steps=10)
    raw, meta = load_d4rl_raw(path)

    # an independent rollout with the same seeds gives the same actions and rewards
    env = gym.make("Pendulum-v1", max_episode_steps=10)
    env.action_space.seed(3)
    obs, _ = env.reset(seed=3)
    returns, ret, flags = [], 0.0, []
    for t in range(35):
        np.testing.assert_allclose(raw["observations"][t], obs, rtol=1e-6, atol=1e-6)
        action = env.action_space.sample()
        np.testing.assert_array_equal(raw["actions"][t], action)
        obs, reward, terminated, truncated, _ = env.step(action)
        assert raw["rewards"][t] == np.float32(reward)
        flags.append((terminated, truncated))
        ret += reward
        if terminated or truncated:
            returns.append(ret)
            ret = 0.0
            obs, _ = env.reset()

    assert not raw["terminals"].any()  # Pendulum never terminates
    np.testing.assert_array_equal([tr for _, tr in flags][:34], raw["timeouts"][:34])
    # truncated at steps 10, 20, 30; the last row is cut by `steps`, hence a timeout too
    np.testing.assert_array_equal(np.flatnonzero(raw["timeouts"]), [9, 19, 29, 34])
    assert meta["num_episodes"] == 3 and meta["steps"] == 35 and meta["seed"] == 3
    assert meta["env_id"] == "Pendulum-v1" and meta["policy"] == "random" and meta["max_episode_steps"] == 10
    assert meta["policy_mean_return"] == pytest.approx(np.mean(returns))
    assert meta["ref_min_score"] == pytest.approx(np.mean(returns)) and "ref_max_score" not in meta

    d = read_d4rl(path)
    assert len(d["rewards"]) == 34 - 3
    # within an episode, the recorded next state is the next row's state
    keep = np.flatnonzero(~raw["timeouts"][:-1])
    np.testing.assert_array_equal(raw["next_observations"][keep], raw["observations"][keep + 1])
    np.testing.assert_array_equal(np.flatnonzero(d["episode_ends"]), [8, 17, 26, 30])


def test_hopper_terminals_are_what_gymnasium_reported(tmp_path):
    path = collect("Hopper-v5", "random", steps=300, path=tmp_path / "h.hdf5", seed=0)
    raw, meta = load_d4rl_raw(path)
    # replay the stored actions in a fresh env: same seed, same terminations
    env = gym.make("Hopper-v5")
    env.reset(seed=0)
    terminated_flags, episode_returns, ret = [], [], 0.0
    for t in range(300):
        _, reward, terminated, truncated, _ = env.step(raw["actions"][t])
        terminated_flags.append(terminated)
        ret += reward
        if terminated or truncated:
            episode_returns.append(ret)
            ret = 0.0
            env.reset()
    np.testing.assert_array_equal(raw["terminals"], terminated_flags)
    assert raw["terminals"].sum() == meta["num_episodes"] == len(episode_returns) >= 5  # random hopper falls fast
    np.testing.assert_array_equal(np.flatnonzero(raw["timeouts"]), [299])
    assert np.all(np.abs(raw["actions"]) <= 1.0) and raw["observations"].shape == (300, 11)
    assert meta["policy_mean_return"] == pytest.approx(np.mean(episode_returns))
    assert reference_scores("Hopper-v5", meta) == (pytest.approx(np.mean(episode_returns)), 3234.3)


def test_callable_policy_is_used_and_clipped(tmp_path):
    seen = []

    def policy(obs):
        seen.append(obs.copy())
        return np.array([5.0])  # outside Pendulum's [-2, 2]: stored as the clipped action

    path = collect("Pendulum-v1", policy, steps=12, path=tmp_path / "c.hdf5", max_episode_steps=5)
    raw, meta = load_d4rl_raw(path)
    np.testing.assert_array_equal(raw["actions"], np.full((12, 1), 2.0, np.float32))
    np.testing.assert_array_equal(np.stack(seen), raw["observations"])
    assert meta["policy"].startswith("callable:") and "ref_min_score" not in meta


class ConstantActor(L.LightningModule):
    """A stand-in for a lit_qlearn algorithm: a parameter, and act(obs) -> action."""

    def __init__(self, value: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.bias = torch.nn.Parameter(torch.zeros(1))

    def act(self, obs: np.ndarray) -> np.ndarray:
        return (self.bias + self.hparams.value).detach().numpy()


def _save_checkpoint(path, value, with_class=True):
    module = ConstantActor(value)
    with torch.no_grad():
        module.bias.fill_(0.25)  # comes back only if the state dict is loaded
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": L.__version__}
    if with_class:
        ckpt["lit_qlearn_class"] = f"{ConstantActor.__module__}.{ConstantActor.__qualname__}"
    torch.save(ckpt, path)
    return path


def test_checkpoint_policy(tmp_path):
    ckpt = _save_checkpoint(tmp_path / "actor.ckpt", value=-1.0)
    # a class outside lit_qlearn.algorithms is rebuilt only when the caller names it (a file
    # may not choose the code it is loaded with); lit_qlearn's own: tests/test_checkpoint_safety.py
    with pytest.raises(CheckpointError, match=r"'.*ConstantActor' is not one of lit_qlearn's algorithms.*"
                                              r"--policy-class .*:ConstantActor"):
        collect("Pendulum-v1", ckpt, steps=8, path=tmp_path / "k.hdf5", max_episode_steps=4)
    for named in (ConstantActor, f"{ConstantActor.__module__}:ConstantActor"):
        path = collect("Pendulum-v1", ckpt, steps=8, path=tmp_path / "k.hdf5", max_episode_steps=4,
                       policy_class=named)
        raw, meta = load_d4rl_raw(path)
        np.testing.assert_array_equal(raw["actions"], np.full((8, 1), -0.75, np.float32))
        assert meta["policy"] == f"checkpoint:{ckpt}"


def test_checkpoint_without_class_key(tmp_path):
    ckpt = _save_checkpoint(tmp_path / "plain.ckpt", value=0.0, with_class=False)
    with pytest.raises(DatasetError, match="no 'lit_qlearn_class' key") as e:
        collect("Pendulum-v1", ckpt, steps=4, path=tmp_path / "x.hdf5")
    assert str(e.value).startswith(str(ckpt))
    assert not (tmp_path / "x.hdf5").exists()


def test_bad_policy_and_env_arguments(tmp_path):
    with pytest.raises(DatasetError, match="policy 'greedy' is not 'random'"):
        collect("Pendulum-v1", "greedy", steps=4, path=tmp_path / "x.hdf5")
    with pytest.raises(DatasetError, match="policy checkpoint .*missing.ckpt not found"):
        collect("Pendulum-v1", tmp_path / "missing.ckpt", steps=4, path=tmp_path / "x.hdf5")
    with pytest.raises(DatasetError, match="env_id 'NoSuchEnv-v0' cannot be made"):
        collect("NoSuchEnv-v0", steps=4, path=tmp_path / "x.hdf5")
    assert not any(p.suffix == ".hdf5" for p in tmp_path.iterdir())


def test_default_dataset_is_generated_once(isolated_dirs):
    path = default_dataset_path()
    assert path == isolated_dirs / "lit" / "default-hopper-medium-v5-100k.hdf5" and not path.exists()
    assert ensure_default_dataset(steps=200, seed=1) == path
    raw, meta = load_d4rl_raw(path)
    assert len(raw["rewards"]) == 200 and meta["env_id"] == "Hopper-v5" and meta["seed"] == 1
    # rolled from the shipped medium SAC policy, with its reference scores
    import torch

    from lit_qlearn.data.names import policy_dir

    entry = torch.load(policy_dir() / "hopper-v5-sac.pt", weights_only=True)
    assert meta["dataset"] == "hopper-medium-v5" and meta["policy_return"] == entry["medium"]["return"]
    assert (meta["ref_min_score"], meta["ref_max_score"]) == (entry["random_return"], entry["expert"]["return"])
    stamp = os.stat(path).st_mtime_ns
    assert ensure_default_dataset(steps=500) == path and os.stat(path).st_mtime_ns == stamp


def test_reference_scores():
    assert REF_SCORES["hopper"] == (-20.272305, 3234.3)
    assert reference_scores("hopper-medium-v2") == (-20.272305, 3234.3)
    assert reference_scores("HalfCheetah-v5") == (-280.178953, 12135.0)
    assert reference_scores("walker2d_medium_replay-v2.hdf5") == (1.629008, 4592.3)
    assert reference_scores("mujoco/ant/expert-v0") == (-325.6, 3879.7)
    assert reference_scores("antmaze-umaze-v2") is None  # not the ant family
    assert reference_scores("Pendulum-v1") is None
    assert reference_scores("Hopper-v5", {"ref_min_score": 15.0}) == (15.0, 3234.3)
    assert reference_scores("Pendulum-v1", {"ref_min_score": -1200.0, "ref_max_score": 0.0}) == (-1200.0, 0.0)
