"""Online replay: :class:`OnlineDataModule` steps gymnasium environments with the
module's behaviour policy into a replay buffer and serves minibatches from it.
:class:`EnvironmentDataModule` is what it shares with the on-policy
:class:`~lit_qlearn.data.onpolicy.OnPolicyDataModule`: the spec read from the environment,
the per-rank :class:`~lit_qlearn.data.rollout.Rollout`, the behaviour policy, the stream of
batches, the episode statistics and the environments' part of a checkpoint."""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import gymnasium as gym
import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lit_qlearn.data.checkpoint import check_before_loading
from lit_qlearn.data.d4rl import DatasetError
from lit_qlearn.data.names import reference_scores
from lit_qlearn.data.replay import PrioritizedReplayBuffer, ReplayBuffer
from lit_qlearn.data.rollout import Rollout, make_env, make_vector_env
from lit_qlearn.data.types import DataSpec, Transitions

__all__ = ["EnvironmentDataModule", "OnlineDataModule"]


class _Stream(IterableDataset):
    """``steps_per_epoch`` batches per epoch from the DataModule's one continuing stream."""

    def __init__(self, dm: EnvironmentDataModule) -> None:
        self.dm = dm

    def __len__(self) -> int:
        return self.dm.hparams.steps_per_epoch

    def __iter__(self) -> Iterator[Transitions]:
        for _ in range(len(self)):
            yield self.dm.next_batch()


def _identity(batch: Transitions) -> Transitions:
    return batch


class EnvironmentDataModule(L.LightningDataModule):
    """The part of a DataModule that steps gymnasium environments (per rank) with the module's
    ``explore(obs, env_step)``. A subclass saves its hyper-parameters (``env_id``,
    ``num_envs``, ``max_episode_steps``, ``env_wrapper``, ``seed``, ``steps_per_epoch``) and
    calls :meth:`init_environment`, and implements ``next_batch()``."""

    def init_environment(self, env_id: str, trust_checkpoint: bool) -> None:
        """Check ``trust_checkpoint`` and read the spec from a throwaway environment
        (algorithms build their networks from it at setup; the environments themselves live
        from setup on, across fits, so a second fit continues)."""
        if not isinstance(trust_checkpoint, bool):  # "false" would be truthy: only a real yes unpickles
            raise DatasetError(f"{type(self).__name__}: trust_checkpoint must be True or False, "
                               f"got {trust_checkpoint!r}")
        self.trust_checkpoint = trust_checkpoint
        self.env_id = env_id
        self.rollout: Rollout | None = None
        self._episodes: list[tuple[float, int]] = []
        self._pending_state: dict[str, Any] | None = None  # a checkpoint's, loaded before setup
        self._spec = self._read_spec()

    def check_integers(self, items: tuple[tuple[str, Any, int], ...]) -> None:
        """A DatasetError naming the first ``(name, value, low)`` whose value is not an integer >= low."""
        for name, value, low in items:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise DatasetError(f"{type(self).__name__}: {name} must be an integer >= {low}, got {value!r}")

    # ----------------------------------------------------------------- the spec
    def _read_spec(self) -> DataSpec:
        who = type(self).__name__
        env = make_env(self.env_id, self.hparams.env_wrapper)
        obs_space, act_space = env.observation_space, env.action_space
        env.close()
        if not isinstance(obs_space, gym.spaces.Box):
            raise DatasetError(f"{who}: env {self.env_id!r} has observation space {obs_space}; a Box is supported")
        extra = dict(obs_dtype=str(obs_space.dtype), env_id=self.env_id, env_wrapper=self.hparams.env_wrapper,
                     ref_scores=reference_scores(self.env_id))
        if isinstance(act_space, gym.spaces.Discrete):
            if act_space.start != 0:
                raise DatasetError(f"{who}: env {self.env_id!r} has {act_space}; actions must start at 0")
            return DataSpec(tuple(obs_space.shape), num_actions=int(act_space.n), **extra)
        if isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1:
            return DataSpec(tuple(obs_space.shape), action_low=tuple(map(float, act_space.low)),
                            action_high=tuple(map(float, act_space.high)), **extra)
        raise DatasetError(f"{who}: env {self.env_id!r} has action space {act_space}; "
                           "Discrete or a 1-D Box is supported")

    @property
    def spec(self) -> DataSpec:
        return self._spec

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: Any,
        map_location: Any = None,
        hparams_file: Any = None,
        weights_only: bool | None = True,
        trust_checkpoint: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Lightning's, with ``trust_checkpoint`` the caller's word: the file's
        hyper-parameters fill the other constructor arguments, and a file that claimed
        trust would otherwise grant it to itself."""
        check_before_loading(checkpoint_path, cls, weights_only)
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                            weights_only=weights_only, trust_checkpoint=trust_checkpoint, **kwargs)

    # ------------------------------------------------------------------ set-up
    def _rank(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.global_rank if trainer is not None else 0

    def _module(self) -> Any:
        trainer = getattr(self, "trainer", None)
        return trainer.lightning_module if trainer is not None else None

    def make_rollout(self, seed: int) -> Rollout:
        """This rank's ``num_envs`` environments (SAME_STEP autoreset), seeded with ``seed``."""
        hp = self.hparams
        kwargs = {"max_episode_steps": hp.max_episode_steps} if hp.max_episode_steps else {}
        return Rollout(make_vector_env(self.env_id, hp.num_envs, hp.env_wrapper, **kwargs), seed=seed)

    def take_episodes(self) -> None:
        """Move the episodes the rollout finished into this rank's counts (:meth:`rollout_metrics`)."""
        self._episodes.extend(self.rollout.episodes)
        self.rollout.episodes.clear()

    @contextmanager
    def behaviour_policy(self) -> Iterator[Callable[[np.ndarray], np.ndarray]]:
        """The module's ``explore`` as a batched policy of observations, at the rollout's
        environment step count, with the module in eval mode (the behaviour policy acts like
        the evaluated one: BatchNorm statistics, dropout) until the block ends."""
        module = self._module()
        explore = getattr(module, "explore", None)
        if not callable(explore):
            raise TypeError(f"{type(self).__name__} needs the module's explore(obs, env_step) -> actions; "
                            f"{type(module).__name__} has none")
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        try:
            with torch.no_grad():
                yield lambda obs: explore(obs, self.rollout.env_steps)
        finally:
            for m, mode in modes:
                m.training = mode

    def rollout_metrics(self) -> dict[str, float]:
        """This rank's counts since the last call, the same keys on every rank: ``env_steps``
        (in all), ``episodes`` finished, their ``return_sum`` and ``length_sum``; the module
        sums them over the ranks and logs ``rollout/env_steps``, ``rollout/episode_return``
        and ``rollout/episode_length``."""
        counts = {"env_steps": float(self.rollout.env_steps), "episodes": float(len(self._episodes)),
                  "return_sum": float(sum(r for r, _ in self._episodes)),
                  "length_sum": float(sum(n for _, n in self._episodes))}
        self._episodes = []
        return counts

    # ----------------------------------------------------------------- batches
    def train_dataloader(self) -> DataLoader:
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        # its own generator: making the iterator then draws nothing from the global RNG (exact resume)
        return DataLoader(_Stream(self), batch_size=None, num_workers=0, collate_fn=_identity,
                          generator=torch.Generator())

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, Transitions):
            return batch if batch.obs.device == device else batch.map(lambda t: t.to(device, non_blocking=True))
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def broadcast_probe(self, probe: Transitions) -> Transitions:
        """Rank zero's probe set on every rank (the probe protocol measures one set)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            probe = trainer.strategy.broadcast(probe, src=0)
        return probe

    # -------------------------------------------------------------- checkpoints
    def environment_state(self) -> dict[str, Any]:
        """The pickled environments, current observations and episode counters, where the
        environments' state survives pickling (not MuJoCo's), as ``{"envs": uint8 tensor}``."""
        if not _envs_pickle(self.rollout.envs):
            return {}
        import cloudpickle

        blob = cloudpickle.dumps((self.rollout.envs, self.rollout.obs, self.rollout._return, self.rollout._length))
        return {"envs": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}

    def gather_ranks(self, state: dict[str, Any]) -> dict[str, Any]:
        """``{"ranks": [every rank's state]}`` (under DDP gathered: rank zero writes the one file)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            import torch.distributed as dist

            ranks: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(ranks, state)
            return {"ranks": ranks}
        return {"ranks": [state]}

    def rank_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """This rank's entry of :meth:`gather_ranks`' dict, or a DatasetError naming the mismatch."""
        ranks = state_dict["ranks"]
        if self._rank() >= len(ranks) or ranks[self._rank()] is None:
            raise DatasetError(f"{type(self).__name__}: the checkpoint holds the state of {len(ranks)} rank(s); "
                               f"rank {self._rank()} has none (resume with the same number of devices)")
        return ranks[self._rank()]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """This rank's state (:meth:`rank_state`) to the subclass's ``_restore``, or kept until
        ``setup`` made the environments (Lightning restores a resumed fit's data before that)."""
        if not state_dict:
            return
        state = self.rank_state(state_dict)
        if self.rollout is None:
            self._pending_state = state
        else:
            self._restore(state)

    def _restore(self, state: dict[str, Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _restore(state)")

    def restore_environments(self, state: dict[str, Any]) -> bool:
        """Continue the checkpoint's environments exactly where ``trust_checkpoint`` allows;
        return whether it did (else, with a warning when the file held them, the caller resets)."""
        if "envs" in state and self.trust_checkpoint:
            import pickle  # the user trusts this file by name (trust_checkpoint=True): its bytes may run code

            envs, obs, ret, length = pickle.loads(state["envs"].numpy().tobytes())
            self.rollout.envs.close()
            self.rollout.envs, self.rollout.obs, self.rollout._return, self.rollout._length = envs, obs, ret, length
            return True
        if "envs" in state:
            # a pickle passes torch.load(weights_only=True) as a uint8 tensor; unpickling it
            # could run any code, so without the user's word its bytes are never read
            rank_zero_warn(f"{type(self).__name__}: the checkpoint's environments were not unpickled (that could "
                           "run code hidden in the file); they restart from a reset, the data's other state is "
                           "restored. Pass trust_checkpoint=True (lit-qlearn fit: --data.trust_checkpoint "
                           "true) to continue them exactly from a checkpoint you trust", stacklevel=2)
        return False


class OnlineDataModule(EnvironmentDataModule):
    """Replay over gymnasium environments, for DQN, DDPG, TD3, SAC and any module with
    ``explore(obs, env_step)``.

    Before every training phase the environments are stepped ``train_freq`` times
    (counted over all sub-environments) with the module's ``explore`` policy, then
    ``gradient_steps`` batches are served: ``train_freq=1, gradient_steps=1`` is one
    environment step per update; ``train_freq=256, gradient_steps=128`` is the
    rl-baselines3-zoo CartPole schedule. The first ``learning_starts`` environment
    steps are taken with uniformly random actions on first use (the first batch, or
    :meth:`probe_batch` at fit start, so every monitor works from the first update; a
    resumed fit takes its buffer from the checkpoint instead).

    ``terminated`` and ``truncated`` are kept apart (a truncated step bootstraps
    from its final state), gymnasium's autoreset is handled by
    :class:`~lit_qlearn.data.rollout.Rollout`, and n-step returns are assembled at
    insertion (``n_step``; each batch carries its ``discount`` gamma^k). Under DDP
    each rank steps its own environments (seeds ``seed + 1000 * rank``) into its own
    buffer; :meth:`probe_batch` serves rank zero's probe set to every rank.

    A resumed fit restores the buffer, the sampler, the phase and the environment step
    count. Its environments restart from a reset (one warning), since the checkpoint
    stores them pickled and unpickling runs whatever code the file holds; with
    ``trust_checkpoint=True``, for checkpoints you trust, they continue their episodes
    exactly, and the run ends as an uninterrupted one would.

    Args:
        env_id: gymnasium environment id.
        num_envs: sub-environments stepped together (per rank).
        capacity: replay buffer size in transitions (per rank).
        learning_starts: random-action environment steps before the first update (and at least
            until the buffer holds a transition: n-step ones need n steps). Batches are drawn with
            replacement, so fewer than ``batch_size`` is allowed, as in Stable-Baselines3 (whose
            off-policy defaults are 100 random steps and batches of 256).
        batch_size: transitions per batch.
        n_step: n of the n-step returns (1: one-step TD).
        prioritized: proportional prioritised replay (Schaul et al. 2016).
        alpha: priority exponent of prioritised replay.
        beta: initial importance-sampling exponent, annealed linearly to 1.
        beta_steps: updates over which beta reaches 1 (None: the Trainer's max_steps, or 100k without one).
        train_freq: environment steps (over all sub-environments) per training phase.
        gradient_steps: updates per training phase.
        buffer_device: where the buffer lives: "cpu" or "module" (the training device).
        save_buffer: put the buffer and the pickled environments (not MuJoCo's) into checkpoints (can be large).
        max_episode_steps: override of the environment's time limit.
        env_wrapper: None, or "atari" (Nature-DQN preprocessing and a 4-frame stack, see make_env).
        seed: seed of the environments, the random prefill and the batch sampler.
        steps_per_epoch: batches per Lightning epoch (use Trainer(max_steps=...) to stop).
        probe_size: default n of :meth:`probe_batch`.
        trust_checkpoint: unpickle a resumed checkpoint's environments (runs its code; default: reset them).
    """

    def __init__(
        self,
        env_id: str = "CartPole-v1",
        num_envs: int = 1,
        capacity: int = 100_000,
        learning_starts: int = 1000,
        batch_size: int = 256,
        n_step: int = 1,
        prioritized: bool = False,
        alpha: float = 0.6,
        beta: float = 0.4,
        beta_steps: int | None = None,
        train_freq: int = 1,
        gradient_steps: int = 1,
        buffer_device: str = "cpu",
        save_buffer: bool = True,
        max_episode_steps: int | None = None,
        env_wrapper: str | None = None,
        seed: int = 0,
        steps_per_epoch: int = 1000,
        probe_size: int = 2560,
        trust_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.check_integers((("num_envs", num_envs, 1), ("capacity", capacity, 1),
                             ("learning_starts", learning_starts, 1), ("batch_size", batch_size, 1),
                             ("n_step", n_step, 1), ("train_freq", train_freq, 1),
                             ("gradient_steps", gradient_steps, 1), ("steps_per_epoch", steps_per_epoch, 1),
                             ("probe_size", probe_size, 1), ("seed", seed, 0)))
        if capacity < batch_size:  # a full buffer smaller than a batch: every batch repeats rows
            raise DatasetError(f"OnlineDataModule: capacity ({capacity}) must be at least batch_size ({batch_size}), "
                               "the transitions one batch draws from the replay buffer")
        if not 0.0 <= beta <= 1.0:
            raise DatasetError(f"OnlineDataModule: beta must be in [0, 1], got {beta!r}")
        if buffer_device not in ("cpu", "module"):
            raise DatasetError(f"OnlineDataModule: buffer_device must be 'cpu' or 'module', got {buffer_device!r}")
        # trust is the user's word, never the file's: kept out of the hyper-parameters a
        # checkpoint stores (load_from_checkpoint would otherwise hand it back from the file)
        self.save_hyperparameters(ignore=["trust_checkpoint"])
        self.init_environment(env_id, trust_checkpoint)
        self.buffer: ReplayBuffer | None = None
        self._since_phase = 0  # batches served since the last collection phase
        self._generator: torch.Generator | None = None
        self._ready = False  # the buffer holds learning_starts steps or a checkpoint's

    def setup(self, stage: str | None = None) -> None:
        if self.buffer is not None or stage not in (None, "fit"):
            return
        hp = self.hparams
        module = self._module()
        # n-step returns discount with the algorithm's own gamma
        gamma = getattr(module, "gamma", None)
        if gamma is None:
            raise DatasetError("OnlineDataModule needs the module's gamma for its n-step returns; "
                               f"{type(module).__name__} has none")
        rank_seed = hp.seed + 1000 * self._rank()
        self.rollout = self.make_rollout(rank_seed)
        spec = self._spec
        obs_dtype = torch.uint8 if spec.obs_dtype == "uint8" else torch.float32
        act = dict(act_shape=(), act_dtype=torch.int64) if spec.discrete else dict(act_shape=(spec.action_dim,))
        device = self.trainer.strategy.root_device if hp.buffer_device == "module" else torch.device("cpu")
        options = dict(obs_dtype=obs_dtype, device=device, num_envs=hp.num_envs, n_step=hp.n_step, gamma=gamma, **act)
        if hp.prioritized:
            self.buffer = PrioritizedReplayBuffer(hp.capacity, spec.obs_shape, alpha=hp.alpha, **options)
        else:
            self.buffer = ReplayBuffer(hp.capacity, spec.obs_shape, **options)
        self._generator = torch.Generator(device=device).manual_seed(rank_seed)
        self._seed = rank_seed
        self.rollout.reset()
        if self._pending_state is not None:  # a checkpoint was loaded before setup
            self._restore(self._pending_state)
            self._pending_state = None

    def prefill(self) -> None:
        """Uniformly random actions until ``learning_starts`` environment steps are taken.
        Runs on first use (a batch or the probe), so that a fit resumed from a checkpoint,
        which Lightning restores after ``setup``, refills nothing."""
        while self.rollout.env_steps < self.hparams.learning_starts or len(self.buffer) == 0:
            self._add(self.rollout.step())
        self._ready = True

    @property
    def weighted(self) -> bool:
        """Whether batches carry importance weights (prioritised replay)."""
        return bool(self.hparams.prioritized)

    @property
    def phase_complete(self) -> bool:
        """Whether the batch served last was the last of its training phase (the next batch
        collects ``train_freq`` environment steps first): where Stable-Baselines3 would be
        between ``train()`` and its next rollout."""
        return self._since_phase == self.hparams.gradient_steps

    # ---------------------------------------------------------------- stepping
    def _add(self, step: Any) -> None:
        if not step.valid.all():  # only NEXT_STEP autoreset makes invalid rows; our envs reset in the step
            raise RuntimeError("OnlineDataModule: a vector environment with NEXT_STEP autoreset is not supported")
        self.buffer.add(step.obs, step.act, step.rew, step.next_obs, step.terminated, step.truncated)
        self.take_episodes()

    def collect(self, env_steps: int) -> None:
        """Step the environments ``env_steps`` times (rounded up to whole vector steps)
        with the module's ``explore(obs, env_step)``."""
        with self.behaviour_policy() as policy:
            for _ in range(math.ceil(env_steps / self.hparams.num_envs)):
                self._add(self.rollout.step(policy))

    def next_batch(self) -> Transitions:
        """The next minibatch; a collection phase first when one is due."""
        hp = self.hparams
        if not self._ready:
            self.prefill()
        if self._since_phase % hp.gradient_steps == 0:
            self.collect(hp.train_freq)
            self._since_phase = 0
        self._since_phase += 1
        if isinstance(self.buffer, PrioritizedReplayBuffer):
            return self.buffer.sample(hp.batch_size, beta=self.beta, generator=self._generator)
        return self.buffer.sample(hp.batch_size, generator=self._generator)

    @property
    def beta(self) -> float:
        """The importance-sampling exponent now: ``beta`` annealed linearly to 1 over ``beta_steps`` updates."""
        hp = self.hparams
        trainer = getattr(self, "trainer", None)
        steps = hp.beta_steps or (trainer.max_steps if trainer is not None and trainer.max_steps > 0 else 100_000)
        done = trainer.global_step if trainer is not None else 0
        return hp.beta + (1.0 - hp.beta) * min(1.0, done / steps)

    def update_priorities(self, index: Tensor, td_abs: Tensor) -> None:
        """New priorities ``(|TD error| + eps)^alpha`` of the sampled slots (prioritised replay only)."""
        if isinstance(self.buffer, PrioritizedReplayBuffer):
            self.buffer.update_priorities(index, td_abs)

    def probe_batch(self, n: int | None = None, seed: int = 0) -> Transitions:
        """A fixed probe set of ``min(n, len(buffer))`` distinct buffered transitions drawn
        with a generator seeded by ``seed``; under DDP every rank gets rank zero's."""
        if self.buffer is None:
            raise DatasetError("OnlineDataModule.probe_batch: the buffer is empty (call setup('fit') first)")
        if not self._ready:
            self.prefill()
        n = self.hparams.probe_size if n is None else n
        perm = torch.randperm(len(self.buffer), generator=torch.Generator().manual_seed(seed))[:n]
        probe = self.buffer.gather(perm.to(self.buffer.device)).map(lambda t: t.cpu())
        return self.broadcast_probe(probe._replace(index=None, weight=None))

    # -------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Every rank's state (under DDP gathered, since rank zero writes the one file):
        the sampler, the phase, the environment step count and, with ``save_buffer``, the
        buffer and the pickled environments (where their state survives pickling), saved
        so that a resume with ``trust_checkpoint=True`` can continue them exactly."""
        if self.buffer is None:
            return {}
        state: dict[str, Any] = {"since_phase": self._since_phase, "generator": self._generator.get_state(),
                                 "env_steps": self.rollout.env_steps}
        if self.hparams.save_buffer:
            state["buffer"] = self.buffer.state_dict()
            state.update(self.environment_state())
        return self.gather_ranks(state)

    def _restore(self, state: dict[str, Any]) -> None:
        self._since_phase = int(state["since_phase"])
        self._generator.set_state(state["generator"])
        self._ready = True
        if "buffer" in state:
            self.buffer.load_state_dict(state["buffer"])
        if not self.restore_environments(state):
            # a fresh episode in every environment, seeded apart from the run's start: no
            # pending n-step row may join the old episode to the new one
            self.rollout.reset(seed=self._seed + int(state["env_steps"]))
            self.buffer.drop_pending()
            if "buffer" not in state:
                warnings.warn("OnlineDataModule: the checkpoint holds no replay buffer (save_buffer=False); "
                              "refilling it with random actions", stacklevel=2)
                self.rollout.env_steps = 0
                self.prefill()
        self.rollout.env_steps = int(state["env_steps"])


def _envs_pickle(envs: gym.vector.VectorEnv) -> bool:
    """Whether the environments' state survives pickling (MuJoCo's physics does not:
    gymnasium rebuilds the simulator when a MujocoEnv is unpickled)."""
    try:
        from gymnasium.envs.mujoco.mujoco_env import MujocoEnv
    except ImportError:  # mujoco not installed
        return True
    return not any(isinstance(getattr(env, "unwrapped", env), MujocoEnv) for env in getattr(envs, "envs", []))
