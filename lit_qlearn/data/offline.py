"""``OfflineDataModule``: a fixed dataset of transitions, sampled in random minibatches."""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Iterator

import gymnasium as gym
import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lit_qlearn.data.d4rl import DatasetError, read_d4rl, read_d4rl_metadata
from lit_qlearn.data.minari import read_minari, read_minari_metadata
from lit_qlearn.data.names import D4RL_ENV_IDS, env_family, reference_scores, resolve
from lit_qlearn.data.rollout import make_env
from lit_qlearn.data.types import DataSpec, Transitions

__all__ = ["OfflineDataModule", "REWARD_TRANSFORMS", "subset_indices", "trajectory_returns", "transform_rewards"]

REWARD_TRANSFORMS = (None, "locomotion", "antmaze", "antmaze_cql")
# attributes that exist once setup() has run
_AFTER_SETUP = frozenset({
    "obs_mean", "obs_std", "env_id", "ref_scores", "discrete", "subset_indices", "num_transitions",
    "observation_dim", "action_dim", "action_low", "action_high",
})
STD_EPS = 1e-3  # TD3+BC: std + 1e-3 keeps constant state dimensions finite


def subset_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """The X% subset (docs/design.md section 6): ``max(1, round(fraction * n))`` distinct
    transition indices drawn uniformly with ``numpy.random.default_rng(seed)``, sorted so
    the kept rows keep their file order. Same ``(n, fraction, seed)``, same subset, for
    every algorithm."""
    k = max(1, round(fraction * n))
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def trajectory_returns(rewards: np.ndarray, episode_ends: np.ndarray) -> np.ndarray:
    """Undiscounted return of every trajectory, split after each ``episode_ends`` row
    (a trailing segment without an end counts too). ``(K,)`` float64."""
    stops = np.flatnonzero(episode_ends) + 1
    starts = np.concatenate([[0], stops[stops < len(rewards)]])
    return np.add.reduceat(rewards.astype(np.float64), starts)


def transform_rewards(
    rewards: np.ndarray, episode_ends: np.ndarray, transform: str | None, source: str = "dataset"
) -> np.ndarray:
    """Reward transforms of the published offline baselines, ``(N,)`` float32:

    * ``None``: unchanged.
    * ``"locomotion"`` (IQL, MuJoCo): ``r * 1000 / (max_return - min_return)`` over the
      dataset's trajectories, so the return spread is 1000 whatever the task.
    * ``"antmaze"`` (IQL): ``r - 1``, i.e. 0 on success and -1 otherwise.
    * ``"antmaze_cql"`` (CQL): ``(r - 0.5) * 4``, i.e. +2 on success and -2 otherwise.
    """
    r = rewards.astype(np.float64)
    if transform is None:
        out = r
    elif transform == "locomotion":
        returns = trajectory_returns(rewards, episode_ends)
        spread = returns.max() - returns.min()
        if not spread > 0:
            raise DatasetError(
                f"{source}: reward_transform='locomotion' needs trajectories with different returns "
                f"(got {len(returns)} trajectories, return spread {spread})"
            )
        out = r * 1000.0 / spread
    elif transform == "antmaze":
        out = r - 1.0
    elif transform == "antmaze_cql":
        out = (r - 0.5) * 4.0
    else:
        raise DatasetError(f"reward_transform must be one of {REWARD_TRANSFORMS}, got {transform!r}")
    return out.astype(np.float32)


def _sampler_seed(seed: int, rank: int, epoch: int) -> int:
    # SeedSequence mixes the three so nearby (rank, epoch) give unrelated streams
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1, np.uint64)[0])


def _identity(batch: Transitions) -> Transitions:
    return batch  # batches are built whole; the default_convert walk would only cost time


class _RandomBatches(IterableDataset):
    """``steps`` minibatches per pass, each one gather of ``batch_size`` uniformly drawn
    rows (with replacement, as TD3+BC's buffer samples). Each pass seeds its generator
    from (seed, rank, epoch): the Trainer's rank and epoch when ``trainer_fn()`` gives a
    Trainer, else (0, number of earlier passes)."""

    def __init__(self, gather: Callable[[Tensor], Transitions], n: int, batch_size: int, steps: int, seed: int,
                 trainer_fn: Callable[[], Any]) -> None:
        self.gather, self.n, self.batch_size, self.steps, self.seed = gather, n, batch_size, steps, seed
        self.trainer_fn = trainer_fn
        self.passes = 0  # __iter__ calls so far
        self.epoch = 0  # epoch of the current pass
        self.yielded = 0  # position in the current pass: batches handed out, skipped ones included
        self.resume: dict[str, int] | None = None  # position to fast-forward to, from a checkpoint

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Transitions]:
        trainer = self.trainer_fn()
        rank, self.epoch = (trainer.global_rank, trainer.current_epoch) if trainer is not None else (0, self.passes)
        self.passes += 1
        resume, self.resume = self.resume, None
        skip = resume["batches"] if resume is not None and resume["epoch"] == self.epoch else 0
        self.yielded = skip
        gen = torch.Generator().manual_seed(_sampler_seed(self.seed, rank, self.epoch))
        for step in range(self.steps):
            idx = torch.randint(self.n, (self.batch_size,), generator=gen)
            if step >= skip:  # skipped draws still advance the generator, as in the first run
                self.yielded = step + 1
                yield self.gather(idx)

    def position(self) -> dict[str, int]:
        """Epoch and batches trained on in it: the Trainer's count when there is one, as
        its loop fetches a batch ahead of training."""
        trainer = self.trainer_fn()
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else self.yielded
        return {"epoch": self.epoch, "batches": int(done)}


class _ResumableLoader(DataLoader):
    """Lightning stores ``state_dict()`` in checkpoints and restores it before iterating
    again, so a run resumed mid-epoch draws exactly the batches the first run would have."""

    def state_dict(self) -> dict[str, int]:
        return self.dataset.position()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.dataset.resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}


def _check_env(source: str, env_id: str, obs_dim: int, act: np.ndarray) -> gym.Space:
    """Make ``env_id`` once and compare its spaces with the data; return its action space."""
    env = make_env(env_id)
    obs_space, act_space = env.observation_space, env.action_space
    env.close()
    hint = "(pass a matching env_id or check_env=False)"
    if obs_space.shape != (obs_dim,):
        raise DatasetError(
            f"{source}: observations have shape ({obs_dim},) but env {env_id!r} has "
            f"observation_space shape {obs_space.shape} {hint}"
        )
    if isinstance(act_space, gym.spaces.Discrete):
        ok = act.dtype.kind in "iu" and act.ndim == 1 and 0 <= act.min() and act.max() < act_space.n
    else:
        ok = act.dtype.kind == "f" and isinstance(act_space, gym.spaces.Box) and act_space.shape == act.shape[1:]
    if not ok:
        data = f"{act.shape[1:]}" if act.dtype.kind == "f" else f"() with integers in [{act.min()}, {act.max()}]"
        raise DatasetError(
            f"{source}: actions have shape {data} but env {env_id!r} has action_space {act_space} {hint}"
        )
    return act_space


def _action_bounds(space: gym.Space | None, act: np.ndarray) -> tuple[int, np.ndarray | None, np.ndarray | None]:
    """(action_dim, low, high): the env's Box; else [-1, 1] when the data lies in it (as
    D4RL's); else the data's range. Discrete: (number of actions, None, None)."""
    if act.dtype.kind in "iu":
        return (int(space.n) if space is not None else int(act.max()) + 1), None, None
    da = act.shape[1]
    if isinstance(space, gym.spaces.Box):
        low, high = space.low, space.high
    elif act.min() >= -1.0 and act.max() <= 1.0:
        low, high = -np.ones(da), np.ones(da)
    else:
        low, high = act.min(axis=0), act.max(axis=0)
    return da, low.astype(np.float32), high.astype(np.float32)


class OfflineDataModule(L.LightningDataModule):
    """Offline transitions from a D4RL-format file, a Minari dataset or the embedded default.

    Args:
        dataset: ``"default"`` (100k Hopper-v5 steps of the shipped medium SAC policy); a dataset
            lit_qlearn makes (``hopper-medium-v5``, ...: :func:`~lit_qlearn.data.names.dataset_names`);
            ``"minari:<dataset_id>"``; or a D4RL-format file path / D4RL name (``hopper-medium-v2``, looked up
            in ``~/.d4rl/datasets``). The file must be on disk: ``lit-qlearn datasets make NAME`` makes the
            first two (:mod:`lit_qlearn.datasets`), a missing one is a one-line :class:`DatasetError`
            saying so (:func:`~lit_qlearn.data.names.resolve`).
        env_id: gymnasium env for evaluation and the shape check; default: the file's
            ``metadata/env_id``, else the D4RL family in the name (``hopper`` ->
            ``Hopper-v5``), else None (no env).
        fraction: share of *transitions* kept, in (0, 1] (the paper's X% datasets).
        seed: seed of the subset, the minibatch sampler and nothing else.
        batch_size: transitions per training batch, at most the number of kept transitions.
        normalize_states: TD3+BC state normalisation, mean / (std + 1e-3) over the kept
            observations, applied to obs and next_obs.
        reward_transform: None, ``"locomotion"``, ``"antmaze"`` or ``"antmaze_cql"``
            (see :func:`transform_rewards`).
        steps_per_epoch: training batches per epoch.
        probe_size: default ``n`` of :meth:`probe_batch` (the paper's 2560).
        check_env: make the env once at setup and compare its spaces with the data.

    After ``setup``: ``data`` (a :class:`Transitions` of all kept transitions), ``obs_mean``,
    ``obs_std``, ``observation_dim``, ``action_dim``, ``action_low``, ``action_high``,
    ``env_id``, ``num_transitions``, ``ref_scores``, ``subset_indices``; reading any of them
    runs ``setup`` first. ``action_low`` / ``action_high`` come from the env's Box when the
    env is made (``check_env``), else [-1, 1] when the data lies in it (D4RL), else the
    data's per-dimension min / max; None for discrete actions (``action_dim`` is then the
    number of actions). The sampler's generator is a pure function of (seed, rank, epoch);
    its position within the epoch goes into checkpoints through the DataLoader's
    ``state_dict``, so a run resumed mid-epoch continues with the same batches.
    """

    def __init__(
        self,
        dataset: str | os.PathLike = "default",
        env_id: str | None = None,
        fraction: float = 1.0,
        seed: int = 0,
        batch_size: int = 256,
        normalize_states: bool = True,
        reward_transform: str | None = None,
        steps_per_epoch: int = 1000,
        probe_size: int = 2560,
        check_env: bool = True,
    ) -> None:
        super().__init__()
        # fail on bad configuration now, not after minutes of loading or training
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.number)) or not 0.0 < fraction <= 1.0:
            raise DatasetError(f"fraction must be in (0, 1], got {fraction!r}")
        for name, value, low in (("batch_size", batch_size, 1), ("steps_per_epoch", steps_per_epoch, 1),
                                 ("probe_size", probe_size, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise DatasetError(f"{name} must be an integer >= {low}, got {value!r}")
        if reward_transform not in REWARD_TRANSFORMS:
            raise DatasetError(f"reward_transform must be one of {REWARD_TRANSFORMS}, got {reward_transform!r}")
        if not os.fspath(dataset):
            raise DatasetError("dataset must be 'default', 'minari:<id>' or a D4RL file path / name, got ''")
        # plain Python types in hparams, so checkpoints load with torch.load(weights_only=True)
        dataset, fraction = os.fspath(dataset), float(fraction)
        seed, batch_size, probe_size = int(seed), int(batch_size), int(probe_size)
        steps_per_epoch = int(steps_per_epoch)
        normalize_states, check_env = bool(normalize_states), bool(check_env)
        self.save_hyperparameters()
        self._loaded = False
        self._batches: _RandomBatches | None = None

    # ------------------------------------------------------------------ loading

    def prepare_data(self) -> None:
        # Lightning calls this once per node, before setup: a dataset that is not on disk
        # fails here, before any work. Nothing is made here (no environment, no training):
        # the error names the command that makes it.
        spec = os.fspath(self.hparams.dataset)
        if not spec.startswith("minari:"):
            resolve(spec)

    def _read(self) -> tuple[dict[str, np.ndarray], dict[str, Any], str, str]:
        """(arrays, metadata, source for messages, name for env / score inference)."""
        spec = os.fspath(self.hparams.dataset)
        if spec.startswith("minari:"):
            dataset_id = spec[len("minari:"):]
            return read_minari(dataset_id), read_minari_metadata(dataset_id), spec, dataset_id
        path = resolve(spec)
        return read_d4rl(path), read_d4rl_metadata(path), str(path), path.name

    def setup(self, stage: str | None = None) -> None:
        """Read, check against the env, transform rewards, subset, normalise. Idempotent;
        nothing is kept from a setup that raised."""
        if self._loaded:
            return
        hp = self.hparams
        arrays, metadata, source, name = self._read()
        n = len(arrays["rewards"])
        if n == 0:
            raise DatasetError(f"{source}: holds no transitions")
        obs_dim, act = arrays["observations"].shape[1], arrays["actions"]
        env_id = hp.env_id or metadata.get("env_id") or D4RL_ENV_IDS.get(env_family(name) or "")
        space = _check_env(source, env_id, obs_dim, act) if env_id and hp.check_env else None
        # the return spread is a property of the dataset's trajectories, so it is taken
        # before subsetting (a random X% of transitions has no trajectories left)
        rewards = transform_rewards(arrays["rewards"], arrays["episode_ends"], hp.reward_transform, source)
        idx = subset_indices(n, hp.fraction, hp.seed)
        obs, next_obs, act = arrays["observations"][idx], arrays["next_observations"][idx], act[idx]
        if hp.normalize_states:
            mean = obs.mean(axis=0, dtype=np.float64)
            std = obs.std(axis=0, dtype=np.float64) + STD_EPS
        else:
            mean, std = np.zeros(obs_dim), np.ones(obs_dim)

        self.env_id = env_id
        self.ref_scores = reference_scores(name, metadata) or reference_scores(env_id, metadata)
        self.discrete = act.dtype.kind in "iu"
        self.action_dim, self.action_low, self.action_high = _action_bounds(space, arrays["actions"])
        self.observation_dim = obs_dim
        self.obs_mean, self.obs_std = mean.astype(np.float32), std.astype(np.float32)
        self.subset_indices = idx
        self.num_transitions = len(idx)
        # One contiguous (M, 2 ds + da + 2) float32 buffer: a minibatch is a single
        # index_select, then column views (discrete actions are exact in float32 < 2^24).
        columns = [self._normalize(obs), act.reshape(len(idx), -1).astype(np.float32),
                   rewards[idx, None], self._normalize(next_obs),
                   arrays["terminals"][idx, None].astype(np.float32)]
        self._split = [c.shape[1] for c in columns]
        self._buffer = torch.from_numpy(np.ascontiguousarray(np.concatenate(columns, axis=1), dtype=np.float32))
        self._loaded = True

    @property
    def spec(self) -> DataSpec:
        """What the algorithms read at setup: shapes, action space, normalisation, env, scores."""
        self._require()
        extra = dict(obs_mean=tuple(map(float, self.obs_mean)), obs_std=tuple(map(float, self.obs_std)),
                     env_id=self.env_id, ref_scores=self.ref_scores)
        if self.discrete:
            return DataSpec((self.observation_dim,), num_actions=self.action_dim, **extra)
        return DataSpec.continuous(self.observation_dim, self.action_dim, self.action_low, self.action_high, **extra)

    def _require(self) -> None:
        if not self._loaded:
            self.setup("fit")

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: reading a set-up attribute before
        # setup() (e.g. a CLI linking observation_dim into the model) loads the data.
        if name in _AFTER_SETUP and not self.__dict__.get("_loaded", True):
            self.setup("fit")
            return getattr(self, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ----------------------------------------------------------------- batches

    def _columns(self, rows: Tensor) -> Transitions:
        """Split buffer rows ``(B, 2 ds + da + 2)`` into a Transitions of column views."""
        obs, act, rew, next_obs, terminated = rows.split(self._split, dim=1)
        act = act.squeeze(1).long() if self.discrete else act
        return Transitions(obs, act, rew.squeeze(1), next_obs, terminated.squeeze(1))

    def _gather(self, idx: Tensor) -> Transitions:
        return self._columns(self._buffer.index_select(0, idx))

    @property
    def data(self) -> Transitions:
        """All kept transitions: obs, next_obs ``(M, ds)`` normalised, act ``(M, da)``
        (``(M,)`` int64 if discrete), rew, terminated ``(M,)``: float32 column views of the one
        contiguous buffer the batches are gathered from (no copy; do not write to them)."""
        self._require()
        return self._columns(self._buffer)

    def train_dataloader(self) -> DataLoader:
        """``steps_per_epoch`` random minibatches of ``batch_size`` per epoch; DDP ranks and
        epochs draw different ones, reproducibly. A batch is one ``index_select`` of the
        contiguous buffer (no per-row collation).
        """
        self._require()
        hp = self.hparams
        if hp.batch_size > self.num_transitions:
            # Sampling is with replacement, so it would run, but every batch would hold rows
            # twice or more: almost always a fraction or a file smaller than meant. Checked
            # here, before the first update, and not in setup, so that reading a small
            # dataset's data, spec or probe set needs no batch_size.
            kept = f"keeps {self.num_transitions} transitions at fraction={hp.fraction}" if hp.fraction < 1 \
                else f"holds {self.num_transitions} transitions"
            raise DatasetError(f"batch_size ({hp.batch_size}) is larger than the dataset: {hp.dataset!r} {kept}; "
                               f"expected batch_size <= {self.num_transitions}")
        # Lightning warns about any IterableDataset with __len__ because several workers
        # could duplicate data; with num_workers=0 they cannot, and the length gives the
        # progress bar and estimated_stepping_batches their totals.
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        if self._batches is None:  # one sampler per DataModule, so its epoch count persists
            self._batches = _RandomBatches(self._gather, self.num_transitions, hp.batch_size, hp.steps_per_epoch,
                                           hp.seed, lambda: self.trainer)
        # its own generator: making the iterator then draws nothing from the global RNG (exact resume)
        return _ResumableLoader(self._batches, batch_size=None, num_workers=0, collate_fn=_identity,
                                generator=torch.Generator())

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Batches are Transitions of five tensors: move them directly rather than walk
        # the collection generically (Lightning's default) on every update.
        if isinstance(batch, Transitions):
            if batch.obs.device == device:
                return batch
            return batch.map(lambda t: t.to(device, non_blocking=True))
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def probe_batch(self, n: int | None = None, seed: int = 0) -> Transitions:
        """The fixed probe set (docs/design.md section 4): ``min(n, M)`` distinct transitions
        (``n`` defaults to ``probe_size``) drawn with a generator seeded by ``seed`` only,
        so every rank and every algorithm gets the same batch."""
        self._require()
        n = self.hparams.probe_size if n is None else n
        if n < 1:
            raise DatasetError(f"probe_batch n must be >= 1, got {n}")
        perm = torch.randperm(self.num_transitions, generator=torch.Generator().manual_seed(seed))
        return self._gather(perm[:n])

    def normalize_obs(self, obs: np.ndarray | Tensor) -> np.ndarray | Tensor:
        """``(obs - obs_mean) / obs_std`` for numpy arrays or tensors ``(..., ds)``, e.g.
        environment states at evaluation."""
        self._require()
        if isinstance(obs, Tensor):
            mean = torch.as_tensor(self.obs_mean, device=obs.device)
            std = torch.as_tensor(self.obs_std, device=obs.device)
            return (obs - mean) / std
        return self._normalize(np.asarray(obs))

    def _normalize(self, obs: np.ndarray) -> np.ndarray:
        return ((obs.astype(np.float32) - self.obs_mean) / self.obs_std).astype(np.float32)
