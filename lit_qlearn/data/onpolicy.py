"""On-policy rollouts without a replay buffer: :class:`OnPolicyDataModule` steps vectorised
gymnasium environments with the module's behaviour policy, lets the module compute targets
over the whole rollout, and serves the rollout in shuffled minibatches for a few epochs
(PQN, Gallici et al. 2025; the loop of CleanRL's ``pqn.py``)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from lit_qlearn.data.d4rl import DatasetError
from lit_qlearn.data.online import EnvironmentDataModule
from lit_qlearn.data.types import Transitions

__all__ = ["OnPolicyDataModule"]


class OnPolicyDataModule(EnvironmentDataModule):
    """Rollouts of ``num_envs`` environments (per rank), each used for ``update_epochs``
    epochs of ``num_minibatches`` shuffled minibatches, then thrown away.

    An *iteration* steps every environment ``num_steps`` times with the module's
    ``explore(obs, env_step)`` (the module in eval mode, without gradient), hands the
    rollout, ``(T, E, ...)`` tensors with ``T = num_steps`` and ``E = num_envs``, to the
    module's ``rollout_targets(rollout, truncated, env_step) -> (T, E)`` (PQN: Q(lambda)
    returns, :func:`lit_qlearn.td.lambda_returns`; ``env_step`` is the count before the
    rollout), and then serves its ``T * E`` transitions: each epoch a fresh permutation,
    cut into ``num_minibatches`` minibatches of ``T * E / num_minibatches`` rows, each
    a :class:`~lit_qlearn.data.Transitions` with its ``target``. One batch is one update, so
    an iteration is ``update_epochs * num_minibatches`` updates and
    ``Trainer(max_steps=n)`` counts them (docs/design.md section 8).

    ``terminated`` and ``truncated`` stay apart (the module receives both), the
    environments' autoreset is :class:`~lit_qlearn.data.rollout.Rollout`'s, and under DDP
    each rank steps its own environments (seeds ``seed + 1000 * rank``);
    :meth:`probe_batch` serves rank zero's probe set to every rank. A checkpoint holds the
    current rollout, its targets, the permutation and the position in it, so a run resumed
    mid-iteration goes on with the same minibatches; its environments continue exactly with
    ``trust_checkpoint=True`` and restart from a reset otherwise (one warning), as in
    :class:`~lit_qlearn.data.OnlineDataModule`. The defaults (4 environments, 128 steps, 4
    minibatches, 4 epochs) are CleanRL's ``pqn.py`` for CartPole-v1.

    Args:
        env_id: gymnasium environment id.
        num_envs: sub-environments stepped together (per rank).
        num_steps: steps of every sub-environment per rollout.
        num_minibatches: minibatches per epoch; must divide ``num_envs * num_steps``.
        update_epochs: passes over each rollout.
        max_episode_steps: override of the environment's time limit.
        env_wrapper: None, or "atari" (Nature-DQN preprocessing and a 4-frame stack, see make_env).
        seed: seed of the environments and of the minibatch permutations.
        steps_per_epoch: batches per Lightning epoch (use Trainer(max_steps=...) to stop).
        probe_size: default n of :meth:`probe_batch`.
        trust_checkpoint: unpickle a resumed checkpoint's environments (runs its code; default: reset them).
    """

    def __init__(
        self,
        env_id: str = "CartPole-v1",
        num_envs: int = 4,
        num_steps: int = 128,
        num_minibatches: int = 4,
        update_epochs: int = 4,
        max_episode_steps: int | None = None,
        env_wrapper: str | None = None,
        seed: int = 0,
        steps_per_epoch: int = 1000,
        probe_size: int = 2560,
        trust_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.check_integers((("num_envs", num_envs, 1), ("num_steps", num_steps, 1),
                             ("num_minibatches", num_minibatches, 1), ("update_epochs", update_epochs, 1),
                             ("steps_per_epoch", steps_per_epoch, 1), ("probe_size", probe_size, 1),
                             ("seed", seed, 0)))
        if (num_envs * num_steps) % num_minibatches:
            raise DatasetError(f"OnPolicyDataModule: num_minibatches ({num_minibatches}) must divide the rollout's "
                               f"num_envs * num_steps = {num_envs * num_steps} transitions")
        # trust is the user's word, never the file's (see OnlineDataModule)
        self.save_hyperparameters(ignore=["trust_checkpoint"])
        self.init_environment(env_id, trust_checkpoint)
        self.data: Transitions | None = None  # the current rollout, flat (T * E rows), with its targets
        self._served = 0  # minibatches served from the current rollout
        self._order: Tensor | None = None  # this epoch's permutation of the rollout's rows
        self._generator: torch.Generator | None = None

    @property
    def minibatch_size(self) -> int:
        hp = self.hparams
        return hp.num_envs * hp.num_steps // hp.num_minibatches

    @property
    def updates_per_rollout(self) -> int:
        return self.hparams.update_epochs * self.hparams.num_minibatches

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str | None = None) -> None:
        if self.rollout is not None or stage not in (None, "fit"):
            return
        self._seed = self.hparams.seed + 1000 * self._rank()
        self.rollout = self.make_rollout(self._seed)
        self._generator = torch.Generator().manual_seed(self._seed)
        self.rollout.reset()
        if self._pending_state is not None:  # a checkpoint was loaded before setup
            self._restore(self._pending_state)
            self._pending_state = None

    # ---------------------------------------------------------------- stepping
    def collect(self) -> None:
        """One rollout of ``num_steps`` vector steps, its targets from the module, kept flat."""
        module = self._module()
        targets = getattr(module, "rollout_targets", None)
        if not callable(targets):
            raise TypeError(f"OnPolicyDataModule needs the module's rollout_targets(rollout, truncated, env_step) "
                            f"-> (T, E) targets; {type(module).__name__} has none")
        env_step = self.rollout.env_steps
        with self.behaviour_policy() as policy:
            steps = [self.rollout.step(policy) for _ in range(self.hparams.num_steps)]
        self.take_episodes()
        if not all(step.valid.all() for step in steps):  # only NEXT_STEP autoreset makes invalid rows
            raise RuntimeError("OnPolicyDataModule: a vector environment with NEXT_STEP autoreset is not supported")

        def stacked(name: str, dtype: torch.dtype | None = None) -> Tensor:
            return torch.as_tensor(np.stack([getattr(step, name) for step in steps]), dtype=dtype,
                                   device=module.device)

        obs_dtype = torch.uint8 if self.spec.obs_dtype == "uint8" else torch.float32
        rollout = Transitions(stacked("obs", obs_dtype), stacked("act", torch.int64 if self.spec.discrete else None),
                              stacked("rew", torch.float32), stacked("next_obs", obs_dtype),
                              stacked("terminated", torch.float32))
        with torch.no_grad():
            target = targets(rollout, stacked("truncated", torch.float32), env_step)
        rows = self.hparams.num_envs * self.hparams.num_steps
        self.data = rollout._replace(target=target).map(lambda t: t.reshape(rows, *t.shape[2:]))
        self._served = 0

    def next_batch(self) -> Transitions:
        """The next minibatch: a new rollout first when the last one is used up, a new
        permutation at each epoch's start."""
        hp = self.hparams
        if self.data is None or self._served == self.updates_per_rollout:
            self.collect()
        if self._served % hp.num_minibatches == 0:
            self._order = torch.randperm(len(self.data.obs), generator=self._generator)
        k = self._served % hp.num_minibatches
        rows = self._order[k * self.minibatch_size:(k + 1) * self.minibatch_size].to(self.data.obs.device)
        self._served += 1
        return self.data.map(lambda t: t.index_select(0, rows))

    def probe_batch(self, n: int | None = None, seed: int = 0) -> Transitions:
        """A fixed probe set of ``min(n, T * E)`` distinct transitions of the current rollout
        (the first one is collected if there is none yet) drawn with a generator seeded by
        ``seed``; under DDP every rank gets rank zero's."""
        if self.rollout is None:
            raise DatasetError("OnPolicyDataModule.probe_batch: no environments yet (call setup('fit') first)")
        if self.data is None:
            self.collect()
        n = self.hparams.probe_size if n is None else n
        rows = torch.randperm(len(self.data.obs), generator=torch.Generator().manual_seed(seed))[:n]
        probe = self.data.map(lambda t: t.index_select(0, rows.to(t.device)).cpu())
        return self.broadcast_probe(probe._replace(target=None))

    # -------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Every rank's state (under DDP gathered, since rank zero writes the one file): the
        current rollout and its targets, the permutation, the position in the iteration, the
        sampler, the environment step count and the pickled environments (where their state
        survives pickling), so that a resume with ``trust_checkpoint=True`` continues them exactly."""
        if self.rollout is None:
            return {}
        state: dict[str, Any] = {"served": self._served, "generator": self._generator.get_state(),
                                 "env_steps": self.rollout.env_steps, **self.environment_state()}
        if self.data is not None:
            state["data"] = {k: v.cpu() for k, v in self.data._asdict().items() if v is not None}
        if self._order is not None:
            state["order"] = self._order
        return self.gather_ranks(state)

    def _restore(self, state: dict[str, Any]) -> None:
        self._served = int(state["served"])
        self._generator.set_state(state["generator"])
        device = self._module().device if self._module() is not None else torch.device("cpu")
        self.data = Transitions(**state["data"]).map(lambda t: t.to(device)) if "data" in state else None
        self._order = state.get("order")
        if not self.restore_environments(state):
            # a fresh episode in every environment, seeded apart from the run's start
            self.rollout.reset(seed=self._seed + int(state["env_steps"]))
        self.rollout.env_steps = int(state["env_steps"])
