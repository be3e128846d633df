"""Evaluation episodes: one function for any policy, one callback for a fit.

:func:`evaluate_policy` rolls a batched policy for a number of episodes in an
environment (:func:`lit_qlearn.data.rollout.run_episodes`) and returns the mean return,
length and D4RL normalised score, and given a start-state value and a discount, the
overestimation gap of Fujimoto et al. (2018). :class:`Evaluation` does that for a
fitting module's ``act`` on a schedule (every ``every`` updates, or whenever its
:meth:`Evaluation.due` says), on rank zero, shares the result with every rank and
publishes ``eval/return``, ``eval/length``, ``eval/normalized_score`` and, for a module
with the probe protocol, ``eval/q_overestimation``, ``eval/q_start_mean`` and
``eval/discounted_return_mean`` at the update count. A
:class:`~lit_qlearn.algorithms.base.QLearningModule` with ``eval_every > 0`` attaches
one itself; benchmarks and behaviour-policy training attach their own.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lit_qlearn.data.names import normalized_score
from lit_qlearn.data.online import OnlineDataModule
from lit_qlearn.data.rollout import make_vector_env, run_episodes
from lit_qlearn.probe import Cadence, publish

__all__ = ["evaluate_policy", "evaluate_module", "Evaluation", "EnvStepEvaluation"]

Policy = Callable[[np.ndarray], np.ndarray]

#: The module members the overestimation gap reads (the probe protocol's, and the discount).
PROBE_MEMBERS = ("q_value", "greedy_action", "gamma")
#: The overestimation gap's result keys, published as ``eval/<key>``.
OVERESTIMATION = ("q_overestimation", "q_start_mean", "discounted_return_mean")


def evaluate_policy(act: Policy, env_id: str | gym.vector.VectorEnv, episodes: int, seed: int = 10_000,
                    env_wrapper: str | None = None, ref_scores: tuple[float, float] | None = None,
                    start_value: Callable[[np.ndarray], np.ndarray] | None = None,
                    gamma: float | None = None) -> dict[str, float]:
    """Mean ``return``, ``length`` and ``normalized_score`` of ``episodes`` episodes of ``act``.

    With ``start_value`` and ``gamma``, also the overestimation gap of Fujimoto et al.
    (2018): ``q_start_mean`` (the mean of ``start_value`` over the episodes' first
    observations), ``discounted_return_mean`` (of ``sum_t gamma^t r_t``) and
    ``q_overestimation``, the mean over episodes of the first minus the second. An
    episode cut by a time limit counts its return up to the cut only, so on short limits
    the gap of a value that looks past them is biased up.

    Args:
        act: batched policy, observations ``(E, *obs_shape) -> actions (E, ...)``.
        env_id: a gymnasium id (one environment is made, rolled and closed) or a vector
            environment to roll (left open, so a caller evaluating often makes it once).
        episodes: number of episodes, an integer >= 1.
        seed: seed of the reset the episodes start from (the same seed, the same start states).
        env_wrapper: the wrapper :func:`~lit_qlearn.data.rollout.make_env` applies (e.g. ``"atari"``).
        ref_scores: ``(ref_min, ref_max)`` of D4RL's ``100 (return - ref_min) / (ref_max - ref_min)``;
            None gives a NaN score (:func:`lit_qlearn.data.reference_scores` looks them up by name).
        start_value: the value estimate at raw first observations, ``(K, *obs_shape) -> (K,)``
            (a module's ``Q(s_0, greedy(s_0))``); needs ``gamma``.
        gamma: the discount of the Monte-Carlo return ``start_value`` is compared with, in [0, 1].
    """
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"evaluate_policy: episodes must be an integer >= 1, got {episodes!r}")
    if (start_value is None) != (gamma is None):
        raise ValueError("evaluate_policy: start_value and gamma go together (the overestimation gap needs both), "
                         f"got start_value={start_value!r} and gamma={gamma!r}")
    if gamma is not None and not 0.0 <= gamma <= 1.0:
        raise ValueError(f"evaluate_policy: gamma must be in [0, 1], got {gamma!r}")
    env = make_vector_env(env_id, 1, env_wrapper) if isinstance(env_id, str) else env_id
    try:
        if gamma is None:
            returns, lengths = run_episodes(env, act, episodes, seed=seed)
        else:
            returns, lengths, starts, discounted = run_episodes(env, act, episodes, seed=seed, gamma=gamma)
    finally:
        if env is not env_id:
            env.close()
    mean_return = float(np.mean(returns))
    score = math.nan if ref_scores is None else float(normalized_score(mean_return, ref_scores))
    result = {"return": mean_return, "length": float(np.mean(lengths)), "normalized_score": score}
    if gamma is not None:
        q_start = np.asarray(start_value(starts), dtype=np.float64).reshape(-1)
        mc = np.asarray(discounted, dtype=np.float64)
        result.update(q_start_mean=float(q_start.mean()), discounted_return_mean=float(mc.mean()),
                      q_overestimation=float((q_start - mc).mean()))
    return result


@torch.no_grad()
def evaluate_module(module: torch.nn.Module, env: str | gym.vector.VectorEnv, episodes: int, seed: int = 10_000,
                    env_wrapper: str | None = None,
                    ref_scores: tuple[float, float] | None = None) -> dict[str, float]:
    """:func:`evaluate_policy` of ``module.act`` in eval mode (dropout off, normalisation
    statistics frozen) without gradients; the module's train / eval mode is restored.
    A module with the probe protocol and a discount (:data:`PROBE_MEMBERS`) also gets the
    overestimation gap, its start value ``q_value(s_0, greedy_action(s_0))`` on the states
    as ``act`` sees them (``module.normalize``, where it has one)."""
    was_training = module.training
    module.eval()
    start_value, gamma = None, None
    if all(hasattr(module, name) for name in PROBE_MEMBERS):
        start_value, gamma = partial(_start_value, module), float(module.gamma)
    try:
        return evaluate_policy(module.act, env, episodes, seed=seed, env_wrapper=env_wrapper, ref_scores=ref_scores,
                               start_value=start_value, gamma=gamma)
    finally:
        module.train(was_training)


def _start_value(module: torch.nn.Module, obs: np.ndarray) -> np.ndarray:
    """``Q(s, greedy(s))`` ``(K,)`` of raw observations ``(K, *obs_shape)``, normalised as ``act`` does."""
    normalize = getattr(module, "normalize", None)
    x = normalize(obs) if normalize is not None else torch.as_tensor(obs, dtype=torch.float32)
    return module.q_value(x, module.greedy_action(x)).float().cpu().numpy()


class Evaluation(Callback):
    """Evaluate the fitting module's ``act`` every ``every`` updates.

    Rank zero runs the episodes; the result is broadcast, so every rank publishes the
    same ``eval/return``, ``eval/length`` and ``eval/normalized_score`` (NaN scores are
    not written), and for a module with the probe protocol the overestimation gap
    (:func:`evaluate_module`: ``eval/q_overestimation``, ``eval/q_start_mean``,
    ``eval/discounted_return_mean``), at ``trainer.global_step`` (for lit_qlearn's modules the update count)
    to the loggers and ``trainer.callback_metrics``: a ``ModelCheckpoint`` or
    ``EarlyStopping`` monitoring ``eval/return`` agrees across ranks.

    The environment, its wrapper and the reference scores are the module's (its data's
    ``env_id``, ``spec.env_wrapper``, ``ref_scores``) unless given. To evaluate on another
    schedule (e.g. every k environment steps), override :meth:`due`; :meth:`run`
    evaluates at once.

    Args:
        every: updates between evaluations: whenever ``global_step`` reaches or passes the
            next multiple (:class:`~lit_qlearn.probe.Cadence`); 0 leaves it to :meth:`due`.
        episodes: episodes per evaluation.
        seed: seed of every evaluation's reset (each evaluation starts from the same states).
        env_id: gymnasium id to evaluate in (None: the module's ``env_id``).
        env_wrapper: wrapper of that environment (None: the module's data's).
        ref_scores: ``(ref_min, ref_max)`` of the normalised score (None: the module's).
        on_result: called on every rank after each evaluation as ``on_result(trainer,
            module, result)``, with the :attr:`history` entry.
        required: raise at fit start when no environment id is known; False evaluates
            nothing then (a module's own ``eval_every`` on data without an environment).

    Attributes:
        history: one entry per evaluation: ``step``, ``return``, ``length``,
            ``normalized_score``, the gap's keys (:data:`OVERESTIMATION`) for a module with
            the probe protocol, and the evaluation's wall time ``seconds``.
    """

    def __init__(self, every: int = 0, episodes: int = 10, seed: int = 10_000, env_id: str | None = None,
                 env_wrapper: str | None = None, ref_scores: tuple[float, float] | None = None,
                 on_result: Callable[[Trainer, LightningModule, dict[str, float]], None] | None = None,
                 required: bool = True) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"Evaluation: every must be an integer >= 0, got {every!r}")
        if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
            raise ValueError(f"Evaluation: episodes must be an integer >= 1, got {episodes!r}")
        self.every, self.episodes, self.seed = every, episodes, int(seed)
        self.env_id, self.env_wrapper, self.ref_scores = env_id, env_wrapper, ref_scores
        self.on_result, self.required = on_result, required
        self.history: list[dict[str, float]] = []
        self._cadence = Cadence(every) if every else None
        self._env: gym.vector.VectorEnv | None = None
        self._target: tuple[str | None, str | None, tuple[float, float] | None] = (None, None, None)

    # ----------------------------------------------------------------- schedule
    def due(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Whether to evaluate after this training batch (default: ``global_step`` reached
        the next multiple of ``every``)."""
        return self._cadence is not None and self._cadence.due(trainer.global_step)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        spec = getattr(pl_module, "spec", None)
        env_id = self.env_id or getattr(pl_module, "env_id", None)
        wrapper = self.env_wrapper if self.env_wrapper is not None else getattr(spec, "env_wrapper", None)
        ref = self.ref_scores if self.ref_scores is not None else getattr(pl_module, "ref_scores", None)
        if env_id is None and self.required:
            raise ValueError(f"Evaluation: no environment to evaluate {type(pl_module).__name__} in: the data has no "
                             "env_id; pass Evaluation(env_id=...) or env_id= to the DataModule")
        self._target = (env_id, wrapper, ref)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._cadence is not None:
            self._cadence.start(trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self.due(trainer, pl_module):
            self.run(trainer, pl_module)

    # --------------------------------------------------------------- evaluating
    def run(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float] | None:
        """Evaluate now on rank zero, share the result with every rank, publish it at
        ``global_step``, append it to :attr:`history`, call ``on_result``; returns the
        entry (None without an environment)."""
        env_id, wrapper, ref = self._target
        if env_id is None:
            return None
        result = None
        if trainer.global_rank == 0:
            if self._env is None:
                self._env = make_vector_env(env_id, 1, wrapper)
            start = time.perf_counter()
            result = evaluate_module(pl_module, self._env, self.episodes, seed=self.seed, ref_scores=ref)
            result["seconds"] = time.perf_counter() - start
        result = trainer.strategy.broadcast(result, src=0)
        entry = self.make_entry(trainer, {"step": trainer.global_step, **result})
        metrics = {"eval/return": entry["return"], "eval/length": entry["length"],
                   "eval/normalized_score": entry["normalized_score"]}
        metrics.update({f"eval/{k}": entry[k] for k in OVERESTIMATION if k in entry})
        publish(trainer, metrics, trainer.global_step)
        self.history.append(entry)
        if self.on_result is not None:
            self.on_result(trainer, pl_module, entry)
        return entry

    def make_entry(self, trainer: Trainer, entry: dict[str, float]) -> dict[str, float]:
        """The :attr:`history` entry of an evaluation (``step`` and the result); a subclass
        adds its own axis (e.g. environment steps) before ``on_result`` sees it."""
        return entry

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


class EnvStepEvaluation(Evaluation):
    """:class:`Evaluation` of an online run on its environment-step axis: ``episodes``
    greedy episodes at the end of the first training phase
    (:attr:`~lit_qlearn.data.OnlineDataModule.phase_complete`: after every update when
    ``train_freq = gradient_steps = 1``) at or past each multiple of ``every``
    environment steps counted from ``origin`` (e.g. ``learning_starts``, to count from the
    end of the random steps), from the reset seed ``seed`` (with ``vary_seed``,
    ``seed + k`` at the k-th evaluation).

    Each :attr:`history` entry (what ``on_result`` receives, e.g. to stop a fit once
    solved) also has ``env_steps``, ``elapsed_seconds`` (wall time since training
    started) and ``train_seconds`` (the same without the evaluations' own time);
    :attr:`curve` keeps ``env_steps``, ``return``, ``seconds`` (elapsed) and
    ``train_seconds`` of each."""

    def __init__(self, dm: OnlineDataModule, every: int, episodes: int, seed: int = 10_000, vary_seed: bool = False,
                 on_result: Callable[[Trainer, LightningModule, dict[str, float]], None] | None = None,
                 origin: int = 0) -> None:
        super().__init__(episodes=episodes, seed=seed, env_id=dm.env_id, on_result=on_result)
        self.dm, self.first_seed, self.vary_seed, self.origin = dm, seed, vary_seed, int(origin)
        self.cadence = Cadence(every)
        self.curve: list[dict[str, float]] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.cadence.start(max(0, self.dm.rollout.env_steps - self.origin))
        self.start = time.perf_counter()

    def due(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        return self.dm.phase_complete and self.cadence.due(self.dm.rollout.env_steps - self.origin)

    def run(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float] | None:
        if self.vary_seed:
            self.seed = self.first_seed + len(self.history)
        return super().run(trainer, pl_module)

    def make_entry(self, trainer: Trainer, entry: dict[str, float]) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        evaluating = entry["seconds"] + sum(h["seconds"] for h in self.history)  # this one's and the earlier ones'
        entry.update(env_steps=self.dm.rollout.env_steps, elapsed_seconds=elapsed, train_seconds=elapsed - evaluating)
        self.curve.append({"env_steps": entry["env_steps"], "return": entry["return"], "seconds": elapsed,
                           "train_seconds": entry["train_seconds"]})
        return entry
