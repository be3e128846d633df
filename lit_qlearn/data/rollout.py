"""The one environment loop: evaluation, :func:`lit_qlearn.datasets.collect` and
:class:`~lit_qlearn.data.OnlineDataModule` all step environments through :class:`Rollout`.

It keeps ``terminated`` (the bootstrap is cut) apart from ``truncated`` (a time
limit: the transition bootstraps from its final state), and handles gymnasium 1.x
vector autoreset once, in both modes:

* ``SAME_STEP`` (what :class:`Rollout` asks for when it makes the environments):
  a finished sub-environment is reset inside the same ``step``; the true final
  observation is ``info["final_obs"]``, so every step yields a transition;
* ``NEXT_STEP`` (gymnasium's default, for vector environments the user brings):
  the step after an episode ends only resets that sub-environment; it is not a
  transition and is marked invalid.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from lit_qlearn.data.d4rl import DatasetError, one_line

__all__ = ["make_env", "make_vector_env", "Rollout", "Step", "run_episodes"]

BatchPolicy = Callable[[np.ndarray], np.ndarray]


WRAPPERS = (None, "atari")


def make_env(env_id: str, wrapper: str | None = None, **kwargs: Any) -> gym.Env:
    """``gymnasium.make`` with a :class:`DatasetError` naming ``env_id`` on failure.

    ``wrapper="atari"``: gymnasium's Atari preprocessing as in the Nature DQN (no-op
    starts, frame skip 4 with max-pooling, 84x84 grey frames, terminal on life loss
    off) and a stack of the last 4 frames, giving uint8 observations ``(4, 84, 84)``;
    ALE environments need ``ale-py`` (the ``atari`` extra), which ships the games.
    """
    if wrapper not in WRAPPERS:
        raise DatasetError(f"env wrapper must be one of {WRAPPERS}, got {wrapper!r}")
    if wrapper == "atari":
        try:
            import ale_py
        except ImportError as e:
            raise DatasetError(f"env_id {env_id!r} with wrapper='atari' needs ale-py: pip install 'lit-qlearn[atari]'") from e
        gym.register_envs(ale_py)
        kwargs = {"frameskip": 1, "repeat_action_probability": 0.0, **kwargs}
    try:
        env = gym.make(env_id, **kwargs)
    except Exception as e:  # gymnasium raises several error types for unknown / broken ids
        raise DatasetError(f"env_id {env_id!r} cannot be made: {type(e).__name__}: {one_line(e)}") from e
    if wrapper == "atari":
        env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84)
        env = gym.wrappers.FrameStackObservation(env, 4)
    return env


def make_vector_env(env_id: str, num_envs: int = 1, wrapper: str | None = None, **kwargs: Any) -> gym.vector.VectorEnv:
    """``num_envs`` copies of :func:`make_env` stepped in this process, autoreset in the same step."""
    # a bad id fails in make_env, as a DatasetError naming it
    return gym.vector.SyncVectorEnv([lambda: make_env(env_id, wrapper, **kwargs) for _ in range(num_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


@dataclass
class Step:
    """One vector step: rows are sub-environments ``(E, ...)``; ``valid`` marks the
    rows that are transitions (False only for NEXT_STEP reset steps)."""

    obs: np.ndarray
    act: np.ndarray
    rew: np.ndarray
    next_obs: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    valid: np.ndarray


class Rollout:
    """Steps a vector environment with a batched policy ``obs (E, *obs_shape) -> act (E, ...)``.

    Keeps the current observations, counts ``env_steps`` (transitions, over all
    sub-environments) and records finished episodes' returns and lengths in
    ``episodes`` (a list of ``(return, length)``, drained by the caller).

    Args:
        envs: the vector environment (SAME_STEP or NEXT_STEP autoreset).
        seed: seed of the first reset and of the action space's sampler (None: unseeded).
    """

    def __init__(self, envs: gym.vector.VectorEnv, seed: int | None = None) -> None:
        self.envs = envs
        self.num_envs = envs.num_envs
        mode = envs.metadata.get("autoreset_mode", gym.vector.AutoresetMode.NEXT_STEP)
        if mode == gym.vector.AutoresetMode.DISABLED:
            raise ValueError("Rollout: the vector environment has autoreset disabled; use SAME_STEP or NEXT_STEP")
        self.same_step = mode == gym.vector.AutoresetMode.SAME_STEP
        self.seed = seed
        self.env_steps = 0
        self.episodes: list[tuple[float, int]] = []
        self.obs: np.ndarray | None = None
        self._resetting = np.zeros(self.num_envs, dtype=bool)
        self._return = np.zeros(self.num_envs)
        self._length = np.zeros(self.num_envs, dtype=np.int64)

    def reset(self, seed: int | None = None) -> np.ndarray:
        seed = self.seed if seed is None else seed
        self.obs, _ = self.envs.reset(seed=seed)
        if seed is not None:
            self.envs.action_space.seed(seed)
        self._resetting[:] = False
        self._return[:] = 0.0
        self._length[:] = 0
        return self.obs

    def step(self, policy: BatchPolicy | None = None, actions: np.ndarray | None = None) -> Step:
        """One step of every sub-environment with ``policy(obs)`` (or the given ``actions``;
        neither: the action space's random sample)."""
        if self.obs is None:
            self.reset()
        obs = self.obs
        if actions is None:
            actions = policy(obs) if policy is not None else self.envs.action_space.sample()
        actions = _clip(np.asarray(actions), self.envs.single_action_space).reshape(self.envs.action_space.shape)
        next_obs, rew, terminated, truncated, info = self.envs.step(actions)
        valid = ~self._resetting
        final = next_obs
        done = terminated | truncated
        if self.same_step and done.any():
            final = next_obs.copy()
            final_obs = info["final_obs"]
            for i in np.flatnonzero(done):
                final[i] = final_obs[i]
        step = Step(obs, actions, np.asarray(rew, dtype=np.float32), final, terminated.astype(bool),
                    truncated.astype(bool), valid)
        if self.same_step:  # every row is a transition (the common case, kept cheap: it runs every step)
            self._return += rew
            self._length += 1
            self.env_steps += self.num_envs
        else:
            self._return += np.where(valid, rew, 0.0)
            self._length += valid
            self.env_steps += int(valid.sum())
            self._resetting = done  # NEXT_STEP: the next step of these only resets
        if done.any():
            for i in np.flatnonzero(done & valid):
                self.episodes.append((float(self._return[i]), int(self._length[i])))
                self._return[i], self._length[i] = 0.0, 0
        self.obs = next_obs
        return step

    def close(self) -> None:
        self.envs.close()


def _clip(actions: np.ndarray, space: gym.Space) -> np.ndarray:
    # Clip like the env's actuators do, so a stored action is the one applied.
    if isinstance(space, gym.spaces.Box):
        return np.clip(actions.astype(space.dtype), space.low, space.high)
    return actions


def run_episodes(env: gym.vector.VectorEnv, policy: BatchPolicy, episodes: int, seed: int = 0,
                 gamma: float | None = None) -> tuple:
    """Roll ``policy`` until ``episodes`` episodes have finished (the first ones to finish
    over the sub-environments, from a reset seeded with ``seed``); ``(returns, lengths)``.

    With ``gamma``, also each episode's first observation and discounted return
    ``sum_t gamma^t r_t``: ``(returns, lengths, starts (episodes, *obs_shape), discounted)``."""
    rollout = Rollout(env, seed=seed)
    obs = rollout.reset()
    if gamma is None:
        while len(rollout.episodes) < episodes:
            rollout.step(policy)
        done = rollout.episodes[:episodes]
        return [r for r, _ in done], [n for _, n in done]
    first = np.array(obs, copy=True)  # each sub-environment's current episode's first observation
    discounted, power = np.zeros(rollout.num_envs), np.ones(rollout.num_envs)
    starts, totals = [], []
    while len(rollout.episodes) < episodes:
        step = rollout.step(policy)
        discounted += np.where(step.valid, power * step.rew, 0.0)
        power = np.where(step.valid, power * gamma, power)
        ended = (step.terminated | step.truncated) & step.valid
        for i in np.flatnonzero(ended):  # the order in which Rollout records them
            starts.append(first[i].copy())
            totals.append(float(discounted[i]))
        discounted[ended], power[ended] = 0.0, 1.0
        # the next episode's first observation: after this step (SAME_STEP), or after the
        # reset-only step that follows (NEXT_STEP, an invalid row)
        restarted = ended if rollout.same_step else ~step.valid
        first[restarted] = rollout.obs[restarted]
    done = rollout.episodes[:episodes]
    return [r for r, _ in done], [n for _, n in done], np.stack(starts[:episodes]), totals[:episodes]
