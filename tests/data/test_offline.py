"""OfflineDataModule: subsets, normalisation, reward transforms, sampling, errors."""
from __future__ import annotations

import time
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_qlearn.data import REF_SCORES, DatasetError, OfflineDataModule, Transitions, read_d4rl, write_d4rl
from lit_qlearn.data.d4rl import read_d4rl_metadata
from lit_qlearn.data.offline import subset_indices, trajectory_returns, transform_rewards


@pytest.fixture
def toy(tmp_path, arrays):
    """A 400-row file (384 transitions) with no env: (path, qlearning dict)."""
    path = write_d4rl(tmp_path / "toy.hdf5", arrays(n=400, ds=3, da=2))
    return path, read_d4rl(path)


def _dm(path, **kw):
    dm = OfflineDataModule(str(path), **kw)
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------- subsets


def test_subset_size_order_and_determinism():
    n = 100_000
    a = subset_indices(n, 0.1, seed=0)
    assert len(a) == 10_000 and np.all(np.diff(a) > 0)  # distinct, in file order
    np.testing.assert_array_equal(a, subset_indices(n, 0.1, seed=0))
    b = subset_indices(n, 0.1, seed=1)
    overlap = len(np.intersect1d(a, b))
    assert 850 < overlap < 1150  # independent draws: fraction^2 * n = 1000 (sd ~ 30)
    assert len(subset_indices(n, 0.01, 0)) == 1000 and len(subset_indices(7, 0.01, 0)) == 1
    np.testing.assert_array_equal(subset_indices(n, 1.0, 5), np.arange(n))
    assert len(subset_indices(10, 0.25, 0)) == round(2.5) == 2


def test_fraction_in_the_datamodule(toy):
    path, d = toy
    n = len(d["rewards"])
    dm = _dm(path, fraction=0.25, seed=4, normalize_states=False)
    np.testing.assert_array_equal(dm.subset_indices, subset_indices(n, 0.25, 4))
    assert dm.num_transitions == round(0.25 * n) == 96
    idx = dm.subset_indices
    np.testing.assert_array_equal(dm.data.obs.numpy(), d["observations"][idx])
    np.testing.assert_array_equal(dm.data.act.numpy(), d["actions"][idx])
    np.testing.assert_array_equal(dm.data.rew.numpy(), d["rewards"][idx])
    np.testing.assert_array_equal(dm.data.next_obs.numpy(), d["next_observations"][idx])
    np.testing.assert_array_equal(dm.data.terminated.numpy(), d["terminals"][idx].astype(np.float32))
    assert all(t.dtype == torch.float32 for t in dm.data[:5]) and dm.data[5:] == (None, None, None, None)  # no discount, weight, index, target
    other = _dm(path, fraction=0.25, seed=5, normalize_states=False)
    assert not np.array_equal(other.subset_indices, idx)
    assert _dm(path, fraction=1.0).num_transitions == n


# --------------------------------------------------------- normalisation


def test_state_normalisation_matches_numpy(toy):
    path, d = toy
    dm = _dm(path, fraction=0.5, seed=2)
    kept = d["observations"][dm.subset_indices].astype(np.float64)
    mean, std = kept.mean(0), kept.std(0) + 1e-3
    np.testing.assert_allclose(dm.obs_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(dm.obs_std, std, rtol=1e-6)
    assert dm.obs_mean.dtype == dm.obs_std.dtype == np.float32
    np.testing.assert_allclose(dm.data.obs.numpy(), (kept - mean) / std, atol=1e-5)
    next_kept = d["next_observations"][dm.subset_indices]
    np.testing.assert_allclose(dm.data.next_obs.numpy(), (next_kept - mean) / std, atol=1e-5)
    np.testing.assert_allclose(dm.data.obs.numpy().mean(0), 0.0, atol=1e-5)
    # the evaluation helper applies the same statistics, to arrays and tensors
    np.testing.assert_allclose(dm.normalize_obs(d["observations"][:3]), (d["observations"][:3] - mean) / std, atol=1e-5)
    assert torch.allclose(dm.normalize_obs(torch.from_numpy(kept[:3]).float()), dm.data.obs[:3], atol=1e-5)
    off = _dm(path, normalize_states=False)
    np.testing.assert_array_equal(off.obs_mean, np.zeros(3, np.float32))
    np.testing.assert_array_equal(off.obs_std, np.ones(3, np.float32))


# -------------------------------------------------------- reward transforms


def test_reward_transforms_by_hand():
    rew = np.array([0.5, 1.5, 2.5, 4.5, 5.5, 6.5, 7.5], np.float32)
    ends = np.array([0, 0, 1, 0, 0, 1, 1], bool)
    np.testing.assert_array_equal(trajectory_returns(rew, ends), [4.5, 16.5, 7.5])
    # IQL: r * 1000 / (max return - min return) = r * 1000 / 12
    np.testing.assert_allclose(transform_rewards(rew, ends, "locomotion"), rew * 1000 / 12.0, rtol=1e-6)
    np.testing.assert_allclose(transform_rewards(rew, ends, "antmaze"), [-0.5, 0.5, 1.5, 3.5, 4.5, 5.5, 6.5])
    np.testing.assert_allclose(transform_rewards(np.float32([0, 1]), ends[:2], "antmaze_cql"), [-2.0, 2.0])
    np.testing.assert_array_equal(transform_rewards(rew, ends, None), rew)
    with pytest.raises(DatasetError, match="return spread 0"):
        transform_rewards(np.float32([1, 2]), np.array([0, 1], bool), "locomotion")


def test_locomotion_scale_uses_whole_dataset_trajectories(toy):
    path, d = toy
    returns = trajectory_returns(d["rewards"], d["episode_ends"])
    scale = 1000.0 / (returns.max() - returns.min())
    dm = _dm(path, fraction=0.5, reward_transform="locomotion")
    np.testing.assert_allclose(dm.data.rew.numpy(), d["rewards"][dm.subset_indices] * scale, rtol=1e-5)
    dm = _dm(path, reward_transform="antmaze_cql")
    np.testing.assert_allclose(dm.data.rew.numpy(), (d["rewards"] - 0.5) * 4, rtol=1e-6)


# ----------------------------------------------------------- sampling


def _epoch(dm):
    return list(dm.train_dataloader())


def test_train_dataloader_batches(toy):
    path, d = toy
    dm = _dm(path, batch_size=32, steps_per_epoch=7, seed=3)
    loader = dm.train_dataloader()
    assert len(loader) == 7
    first = list(loader)
    assert len(first) == 7
    b = first[0]
    assert isinstance(b, Transitions)
    assert [tuple(t.shape) for t in b[:5]] == [(32, 3), (32, 2), (32,), (32, 3), (32,)]
    assert all(t.dtype == torch.float32 for t in b[:5]) and b[5:] == (None, None, None, None)
    # every batch row is a stored transition
    rows = torch.cat([dm.data.obs, dm.data.act, dm.data.rew[:, None]], 1)
    batch_rows = torch.cat([b.obs, b.act, b.rew[:, None]], 1)
    assert (batch_rows[:, None, :] == rows[None]).all(-1).any(-1).all()
    # reproducible from the seed; the next epoch draws other batches
    again = _epoch(_dm(path, batch_size=32, steps_per_epoch=7, seed=3))
    assert all(torch.equal(x.obs, y.obs) for x, y in zip(first, again))
    second = list(loader)
    assert not torch.equal(first[0].obs, second[0].obs)
    other_seed = _epoch(_dm(path, batch_size=32, steps_per_epoch=7, seed=4))
    assert not torch.equal(first[0].obs, other_seed[0].obs)


def test_loader_state_dict_without_a_trainer(toy):
    path, _ = toy
    full = _epoch(_dm(path, batch_size=8, steps_per_epoch=5))
    loader = _dm(path, batch_size=8, steps_per_epoch=5).train_dataloader()
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches": 3}
    fresh = _dm(path, batch_size=8, steps_per_epoch=5).train_dataloader()
    fresh.load_state_dict(state)
    rest = list(fresh)
    assert len(rest) == 2 and all(torch.equal(x.obs, y.obs) for x, y in zip(full[3:], rest))
    assert fresh.state_dict() == {"epoch": 0, "batches": 5}


def test_ranks_draw_different_batches_but_the_same_probe(toy):
    path, _ = toy
    batches, probes = [], []
    for rank in (0, 1):
        dm = _dm(path, batch_size=16, steps_per_epoch=2)
        dm.trainer = SimpleNamespace(global_rank=rank, current_epoch=0)
        batches.append(_epoch(dm)[0])
        probes.append(dm.probe_batch(64, seed=9))
    assert not torch.equal(batches[0].obs, batches[1].obs)
    assert all(torch.equal(x, y) for x, y in zip(probes[0][:5], probes[1][:5]))


def test_probe_batch(toy):
    path, d = toy
    dm = _dm(path, probe_size=50)
    p = dm.probe_batch(100, seed=1)
    assert p.obs.shape == (100, 3)
    assert len(torch.unique(p.obs, dim=0)) == 100  # distinct transitions (rows are unique)
    assert all(torch.equal(x, y) for x, y in zip(p[:5], dm.probe_batch(100, seed=1)[:5]))
    assert not torch.equal(p.obs, dm.probe_batch(100, seed=2).obs)
    assert dm.probe_batch().obs.shape == (50, 3)  # probe_size by default
    everything = dm.probe_batch(10_000)
    assert everything.obs.shape == (384, 3)
    assert torch.equal(everything.obs[everything.obs[:, 0].argsort()], dm.data.obs[dm.data.obs[:, 0].argsort()])


class _Recorder(L.LightningModule):
    """Trains nothing (lr 0) but takes optimizer steps, so checkpoints can be saved by step."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch.obs.clone()))
        return (self.w**2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(path, ckpt_dir=None, ckpt_path=None):
    module = _Recorder()
    callbacks = [ModelCheckpoint(ckpt_dir, every_n_train_steps=4, save_top_k=-1)] if ckpt_dir else []
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=bool(ckpt_dir),
                        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False)
    dm = OfflineDataModule(str(path), batch_size=8, steps_per_epoch=6, seed=1)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module.seen


def test_with_a_trainer_and_mid_epoch_resume(toy, tmp_path):
    path, _ = toy
    seen = _fit(path, ckpt_dir=tmp_path / "ckpt")
    assert [epoch for epoch, _ in seen] == [0] * 6 + [1] * 6
    assert not torch.equal(seen[0][1], seen[6][1])  # epochs draw differently
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(seen, _fit(path)))  # and reproducibly
    # resumed from step 4 (mid epoch 0) and step 8 (mid epoch 1): the same batches follow
    for step in (4, 8):
        (ckpt,) = (tmp_path / "ckpt").glob(f"*step={step}.ckpt")
        resumed = _fit(path, ckpt_dir=tmp_path / f"resumed{step}", ckpt_path=ckpt)
        assert len(resumed) == 12 - step
        assert all(torch.equal(x, y) for (_, x), (_, y) in zip(seen[step:], resumed))


def test_batch_cost(tmp_path, arrays):
    path = write_d4rl(tmp_path / "big.hdf5", arrays(n=100_000, ds=17, da=6))
    dm = _dm(path, batch_size=256, steps_per_epoch=3000)
    loader = dm.train_dataloader()
    list(loader)  # warm up
    start = time.perf_counter()
    count = sum(1 for _ in loader)
    per_batch = (time.perf_counter() - start) / count
    print(f"batch of 256 through the DataLoader: {per_batch * 1e6:.1f} us")
    # ~40 us measured on 2 cores; generous bound against loaded CI machines, still far
    # below what per-transition collation costs (milliseconds)
    assert count == 3000 and per_batch < 300e-6


# ------------------------------------------------------------- bad input


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan")])
def test_fraction_outside_range_fails_at_construction(fraction):
    with pytest.raises(DatasetError, match=r"fraction must be in \(0, 1\], got") as e:
        OfflineDataModule("default", fraction=fraction)
    assert repr(fraction) in str(e.value)


@pytest.mark.parametrize("kwargs, name", [
    ({"batch_size": 0}, "batch_size"), ({"steps_per_epoch": -1}, "steps_per_epoch"),
    ({"reward_transform": "iql"}, "reward_transform"), ({"seed": -3}, "seed"),
])
def test_bad_arguments_fail_at_construction(kwargs, name):
    with pytest.raises(DatasetError, match=name):
        OfflineDataModule("default", **kwargs)


def test_missing_and_unknown_datasets(isolated_dirs):
    missing = isolated_dirs / "nope" / "x.hdf5"
    dm = OfflineDataModule(str(missing))  # nothing is read before setup
    with pytest.raises(DatasetError, match="dataset file not found") as e:
        dm.setup("fit")
    assert str(missing) in str(e.value)
    with pytest.raises(DatasetError) as e:
        OfflineDataModule("hopper-medium-v2").setup("fit")
    assert "'hopper-medium-v2'" in str(e.value) and str(isolated_dirs / "d4rl") in str(e.value)
    with pytest.raises(DatasetError, match="minari dataset 'a/b-v0' not found"):
        OfflineDataModule("minari:a/b-v0").setup("fit")


def test_bad_file_fails_at_setup_and_is_unchanged(tmp_path, arrays, h5_file, sha256):
    a = arrays(n=60)
    a["actions"][11, 1] = np.inf
    path = h5_file("bad.hdf5", a)
    digest = sha256(path)
    with pytest.raises(DatasetError, match=r"'actions' has a non-finite value \(inf\) at row 11"):
        OfflineDataModule(str(path), check_env=False).setup("fit")
    assert sha256(path) == digest


def test_env_inferred_from_d4rl_name_and_checked(isolated_dirs, arrays):
    ok = write_d4rl(isolated_dirs / "d4rl" / "hopper_medium-v2.hdf5", arrays(n=50, ds=11, da=3))
    dm = _dm("hopper-medium-v2")
    assert dm.env_id == "Hopper-v5" and dm.ref_scores == REF_SCORES["hopper"]
    assert dm.observation_dim == 11 and dm.action_dim == 3
    np.testing.assert_array_equal(dm.action_low, -np.ones(3)) and np.testing.assert_array_equal(dm.action_high, 1)
    assert ok.is_file()


@pytest.mark.parametrize("ds, da, expected", [
    (5, 3, "observations have shape (5,) but env 'Hopper-v5' has observation_space shape (11,)"),
    (11, 2, "actions have shape (2,) but env 'Hopper-v5' has action_space Box"),
])
def test_dims_not_matching_the_env(tmp_path, arrays, sha256, ds, da, expected):
    path = write_d4rl(tmp_path / "data.hdf5", arrays(n=40, ds=ds, da=da), {"env_id": "Hopper-v5"})
    digest = sha256(path)
    with pytest.raises(DatasetError) as e:
        OfflineDataModule(str(path)).setup("fit")
    msg = str(e.value)
    assert msg.startswith(str(path)) and expected in msg and "\n" not in msg
    assert sha256(path) == digest
    # check_env=False skips the env; the dims then come from the data
    dm = _dm(path, check_env=False)
    assert (dm.observation_dim, dm.action_dim, dm.env_id) == (ds, da, "Hopper-v5")


def test_explicit_env_id_overrides_metadata(tmp_path, arrays):
    path = write_d4rl(tmp_path / "data.hdf5", arrays(n=40, ds=3, da=1), {"env_id": "Hopper-v5"})
    dm = _dm(path, env_id="Pendulum-v1")
    assert dm.env_id == "Pendulum-v1" and dm.ref_scores is None
    np.testing.assert_array_equal(dm.action_low, [-2.0]) and np.testing.assert_array_equal(dm.action_high, [2.0])


def test_default_dataset_and_lazy_attributes(isolated_dirs):
    from lit_qlearn.datasets import ensure_default_dataset

    ensure_default_dataset(steps=300)  # what `lit-qlearn datasets make default` does, kept small here
    dm = OfflineDataModule()
    assert dm.observation_dim == 11  # reading an attribute runs setup
    assert dm.env_id == "Hopper-v5" and dm.num_transitions == 299
    meta = read_d4rl_metadata(isolated_dirs / "lit" / "default-hopper-medium-v5-100k.hdf5")
    assert dm.ref_scores == (meta["ref_min_score"], meta["ref_max_score"])  # the shipped policies' returns
    assert meta["dataset"] == "hopper-medium-v5" and meta["ref_max_score"] > 3000
    assert dm.hparams.dataset == "default" and dm.hparams.fraction == 1.0


def test_hyperparameters_are_plain_python(tmp_path):
    dm = OfflineDataModule(tmp_path / "x.hdf5", fraction=np.float64(0.5), seed=np.int64(3))
    assert dm.hparams.dataset == str(tmp_path / "x.hdf5")
    assert type(dm.hparams.fraction) is float and type(dm.hparams.seed) is int


def test_discrete_actions_end_to_end(tmp_path):
    from lit_qlearn.datasets import collect

    path = collect("CartPole-v1", "random", steps=120, path=tmp_path / "cp.hdf5", seed=0)
    d = read_d4rl(path)
    assert d["actions"].dtype == np.int64 and d["actions"].ndim == 1 and set(np.unique(d["actions"])) == {0, 1}
    dm = _dm(path, batch_size=16, steps_per_epoch=1)
    assert dm.env_id == "CartPole-v1" and dm.action_dim == 2 and dm.action_low is None and dm.discrete
    np.testing.assert_array_equal(dm.data.act.numpy(), d["actions"])
    batch = _epoch(dm)[0]
    assert batch.act.dtype == torch.int64 and batch.act.shape == (16,)
    np.testing.assert_array_equal(dm.data.terminated.numpy(), d["terminals"])


def test_a_batch_larger_than_the_dataset_is_an_error_before_training(toy):
    path, d = toy
    n = len(d["rewards"])
    kept = round(0.25 * n)  # subset_indices keeps max(1, round(fraction * n)) transitions
    dm = _dm(path, fraction=0.25, batch_size=kept + 1, normalize_states=False)
    with pytest.raises(DatasetError) as e:
        dm.train_dataloader()
    assert str(e.value) == (f"batch_size ({kept + 1}) is larger than the dataset: {str(path)!r} keeps {kept} "
                            f"transitions at fraction=0.25; expected batch_size <= {kept}")
    # reading the small dataset needs no batch_size: data, spec and probe set still work
    assert len(dm.data.rew) == kept and dm.spec.obs_dim == 3 and len(dm.probe_batch(10).rew) == 10
    with pytest.raises(DatasetError, match=rf"'.*toy.hdf5' holds {n} transitions; expected batch_size <= {n}"):
        _dm(path, batch_size=n + 1).train_dataloader()
    # a batch of exactly the dataset's size is allowed
    (batch,) = list(_dm(path, fraction=0.25, batch_size=kept, steps_per_epoch=1).train_dataloader())
    assert batch.obs.shape == (kept, 3)


def test_a_d4rl_name_found_nowhere_lists_the_datasets_lit_qlearn_makes(isolated_dirs):
    from lit_qlearn.data.names import dataset_names

    with pytest.raises(DatasetError) as e:
        OfflineDataModule("hopper-medium-v2").setup("fit")
    msg = str(e.value)
    assert msg.startswith("dataset 'hopper-medium-v2' not found: no file hopper-medium-v2.hdf5 or "
                          f"hopper_medium-v2.hdf5 in {isolated_dirs / 'd4rl'}")
    assert "('hopper-medium-v5' is lit_qlearn's own counterpart): default, hopper-random-v5, hopper-medium-v5" in msg
    assert len(dataset_names()) == 15 and all(name in msg for name in dataset_names()) and "\n" not in msg
    # no counterpart to offer for a name of no family; a path is not a name (its message stays short)
    with pytest.raises(DatasetError, match=r"not found: .*; or a dataset lit_qlearn makes .`lit-qlearn datasets make "
                                           r"NAME`.: defa"):
        OfflineDataModule("antmaze-umaze-v2").setup("fit")
    with pytest.raises(DatasetError) as e:
        OfflineDataModule(str(isolated_dirs / "nope.hdf5")).setup("fit")
    assert str(e.value) == f"{isolated_dirs / 'nope.hdf5'}: dataset file not found"
