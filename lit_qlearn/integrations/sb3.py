"""The monitors in Stable-Baselines3: a ``BaseCallback`` over the meters of
:mod:`lit_qlearn.monitoring`, for SB3's SAC, TD3, DDPG and DQN and sb3-contrib's CrossQ
(``pip install lit-qlearn[sb3]``).

::

    from stable_baselines3 import SAC
    from lit_qlearn.integrations.sb3 import MonitorCallback

    model = SAC("MlpPolicy", "Pendulum-v1", tensorboard_log="runs")
    model.learn(50_000, callback=MonitorCallback(action="checkpoint_and_stop", dirpath="runs"))

The probe set is drawn once from the model's replay buffer when learning starts, the
scalars go through SB3's logger at SB3's step (``num_timesteps``, environment steps) and
appear in its TensorBoard runs, and on an unhealthy measurement (:class:`~lit_qlearn.monitoring.CrashMeter`'s
verdict) the callback warns, stops training, or stops and keeps the last healthy model
(``model.save``).
"""
from __future__ import annotations

import inspect
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from torch import Tensor, nn

from lit_qlearn.data.types import Transitions
from lit_qlearn.monitoring import CrashMeter, DiscreteQProbe, Meter, Monitor, NTKMeter, SEEMMeter
from lit_qlearn.ntk import check_choice
from lit_qlearn.probe import Cadence

__all__ = ["MonitorCallback", "SB3ActorCriticProbe", "probe_adapter", "probe_from_buffer"]

ACTIONS = ("warn", "stop", "checkpoint_and_stop")


class _CriticMember(nn.Module):
    """Member ``index`` of an SB3 ``ContinuousCritic`` as ``(obs, act) -> (N,)``; its
    parameters are that member's (and the features extractor's, unless shared with the
    actor: SB3 then trains it through the actor only)."""

    def __init__(self, critic: nn.Module, index: int) -> None:
        super().__init__()
        self.q = critic.q_networks[index]
        if not critic.share_features_extractor:
            self.features_extractor = critic.features_extractor
        self._critic = [critic]  # not a submodule: its other members are not this one's parameters

    def forward(self, obs: Tensor, act: Tensor) -> Tensor:
        critic = self._critic[0]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not critic.share_features_extractor):
            features = critic.extract_features(obs, critic.features_extractor)
        return self.q(torch.cat([features, act], dim=1)).squeeze(1)


class SB3ActorCriticProbe:
    """The probe protocol for SB3's SAC, TD3 and DDPG: the first critic member
    (``critic.q_networks[0]``), the actor's deterministic action (SAC: its mean action,
    squashed), the model's ``gamma``; ``q_networks()`` lists every member. Actions are in
    SB3's scaled space [-1, 1], the space its replay buffer stores.

    sb3-contrib's CrossQ fits as it is: its critic's members are BatchRenorm MLPs, measured
    (as every network, under :class:`~lit_qlearn.monitoring.no_trace`) in eval mode, with
    their running statistics: the function CrossQ's actor loss evaluates. Its TD target comes
    from a train-mode joint pass of ``(s, a)`` and ``(s', a')`` whose batch statistics couple
    the samples, a function of the whole batch that has no per-sample NTK."""

    def __init__(self, model: Any) -> None:
        self.policy = model.policy
        self.gamma = float(model.gamma)
        critic = self.policy.critic
        self._members = [_CriticMember(critic, i) for i in range(len(critic.q_networks))]
        self._deterministic = "deterministic" in inspect.signature(self.policy.actor.forward).parameters

    def q_network(self) -> nn.Module:
        return self._members[0]

    def q_networks(self) -> list[nn.Module]:
        return list(self._members)

    def q_value(self, obs: Tensor, act: Tensor) -> Tensor:
        return self._members[0](obs, act)

    def greedy_action(self, obs: Tensor) -> Tensor:
        actor = self.policy.actor
        return actor(obs, deterministic=True) if self._deterministic else actor(obs)


def probe_adapter(model: Any) -> Any:
    """The probe protocol for an SB3 model: :class:`SB3ActorCriticProbe` for a policy with
    ``actor`` and ``critic`` (SAC, TD3, DDPG), :class:`~lit_qlearn.monitoring.DiscreteQProbe`
    on ``policy.q_net`` for DQN."""
    policy = getattr(model, "policy", None)
    if isinstance(getattr(policy, "q_net", None), nn.Module):
        return DiscreteQProbe(policy.q_net, model.gamma)
    critic = getattr(policy, "critic", None)
    if isinstance(getattr(policy, "actor", None), nn.Module) and isinstance(getattr(critic, "q_networks", None),
                                                                           Sequence):
        return SB3ActorCriticProbe(model)
    raise TypeError(f"MonitorCallback: {type(model).__name__} has neither policy.q_net (DQN) nor policy.actor and "
                    "policy.critic.q_networks (SAC, TD3, DDPG); the monitors need one of them")


def probe_from_buffer(buffer: ReplayBuffer, n: int, seed: int = 0, env: Any = None) -> Transitions:
    """``n`` distinct transitions of an SB3 ``ReplayBuffer`` (fewer when it holds fewer), drawn
    with a generator of their own (SB3's random streams are left alone), as SB3's ``sample``
    serves them: observations normalised by ``env`` (a ``VecNormalize``) when given,
    ``terminated`` without time-limit truncations; ``act`` ``(n, da)`` float, or ``(n,)``
    int64 for discrete actions."""
    if not isinstance(buffer, ReplayBuffer) or isinstance(getattr(buffer, "observations", None), dict):
        raise TypeError(f"MonitorCallback: the probe set is drawn from a stable_baselines3 ReplayBuffer with array "
                        f"observations, got {type(buffer).__name__}")
    size = buffer.buffer_size if buffer.full else buffer.pos
    if buffer.optimize_memory_usage:  # the next observation is the next slot's: not yet written at pos - 1
        size -= 1
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.permutation(size * buffer.n_envs)[: min(n, size * buffer.n_envs)])
    idx, env_idx = rows // buffer.n_envs, rows % buffer.n_envs
    if buffer.optimize_memory_usage:
        next_obs = buffer.observations[(idx + 1) % buffer.buffer_size, env_idx]
    else:
        next_obs = buffer.next_observations[idx, env_idx]
    act = torch.as_tensor(buffer.actions[idx, env_idx])
    discrete = not np.issubdtype(buffer.actions.dtype, np.floating)
    return Transitions(
        obs=torch.as_tensor(buffer._normalize_obs(buffer.observations[idx, env_idx], env)).float(),
        act=act.reshape(-1).long() if discrete else act.float(),
        rew=torch.as_tensor(buffer._normalize_reward(buffer.rewards[idx, env_idx], env)).float(),
        next_obs=torch.as_tensor(buffer._normalize_obs(next_obs, env)).float(),
        terminated=torch.as_tensor(buffer.dones[idx, env_idx] * (1 - buffer.timeouts[idx, env_idx])).float(),
    )


def _critic_optimizers(model: Any) -> list[torch.optim.Optimizer]:
    """The optimiser of the critic (SAC, TD3, DDPG: ``policy.critic.optimizer``; DQN: ``policy.optimizer``)."""
    critic = getattr(model.policy, "critic", None)
    optimizer = getattr(critic if critic is not None else model.policy, "optimizer", None)
    return [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else []


class MonitorCallback(BaseCallback):
    """The meters of :mod:`lit_qlearn.monitoring` on an SB3 off-policy model.

    When learning starts (``num_timesteps > learning_starts``) the probe set is drawn once from
    the replay buffer (:func:`probe_from_buffer`), and :class:`~lit_qlearn.monitoring.CrashMeter`'s
    Bellman bound is ``max|r| / (1 - gamma)`` over the rewards the buffer holds then; from then on the meters measure at each
    multiple of ``every_n_steps`` that ``num_timesteps`` reaches or passes, and the scalars
    are recorded through SB3's logger and dumped at ``num_timesteps``, as SB3's ``EvalCallback``
    writes its own. An unhealthy measurement (the meters' :attr:`~lit_qlearn.monitoring.Monitor.reasons`)
    triggers ``action`` once:

    * ``"warn"``: a warning saying why;
    * ``"stop"``: training stops (``_on_step`` returns False);
    * ``"checkpoint_and_stop"``: training stops and the model of the last healthy measurement,
      saved with ``model.save`` at each healthy measurement whose parameters are finite, is
      kept as ``<dirpath>/last-healthy-step=<step>.zip`` (:attr:`checkpoint_path`; None when no
      measurement was healthy). A run without detection leaves no file.

    Args:
        meters: the meters (default ``SEEMMeter(), NTKMeter(), CrashMeter()``).
        every_n_steps: the cadence, in SB3's ``num_timesteps``.
        probe_size: probe transitions (fewer, with a warning, when the buffer holds fewer).
        probe_seed: seed of the probe draw.
        action: ``"warn"``, ``"stop"`` or ``"checkpoint_and_stop"``.
        dirpath: where ``"checkpoint_and_stop"`` writes (default: SB3's log directory).
        verbose: SB3's verbosity.
    """

    def __init__(self, meters: Sequence[Meter] | None = None, every_n_steps: int = 5000, probe_size: int = 512,
                 probe_seed: int = 0, action: str = "warn", dirpath: str | os.PathLike | None = None,
                 verbose: int = 0) -> None:
        super().__init__(verbose)
        for arg, value in (("every_n_steps", every_n_steps), ("probe_size", probe_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MonitorCallback: {arg} must be an integer >= 1, got {value!r}")
        check_choice("MonitorCallback", "action", action, ACTIONS)
        self.meters = list(meters) if meters is not None else [SEEMMeter(), NTKMeter(), CrashMeter()]
        if not self.meters or not all(isinstance(m, Meter) for m in self.meters):
            raise TypeError("MonitorCallback: meters must be a non-empty list of lit_qlearn.monitoring meters, got "
                            f"{[type(m).__name__ for m in self.meters]}")
        self.every_n_steps = every_n_steps
        self.probe_size = probe_size
        self.probe_seed = probe_seed
        self.action = action
        self.dirpath = dirpath
        self.cadence = Cadence(every_n_steps)
        self.monitor: Monitor | None = None  # made with the probe set
        self.agent: Any = None
        #: The latest measurement's scalars and step; what was done.
        self.scalars: dict[str, float] = {}
        self.last_step = -1
        self.fired = False
        self.stopped_step: int | None = None
        self.healthy_step: int | None = None
        self.checkpoint_path: str | None = None
        self._directory: Path | None = None
        self._held: Path | None = None

    def _init_callback(self) -> None:
        self.agent = probe_adapter(self.model)
        if not isinstance(getattr(self.model, "replay_buffer", None), ReplayBuffer):
            raise TypeError(f"MonitorCallback: {type(self.model).__name__} has no stable_baselines3 ReplayBuffer "
                            "(replay_buffer); the monitors need an off-policy model with one")
        if self.action == "checkpoint_and_stop":
            where = self.dirpath if self.dirpath is not None else self.logger.get_dir()
            if where is None:
                raise ValueError("MonitorCallback: action='checkpoint_and_stop' needs dirpath= (SB3's logger has no "
                                 "directory: no tensorboard_log and no configured logger)")
            self._directory = Path(where)
            self._directory.mkdir(parents=True, exist_ok=True)
        self._setup_crash()  # here, so that a critic the crash law cannot read is an error before training
        self.cadence.start(self.model.num_timesteps)

    def _setup_crash(self, rewards: Tensor | None = None) -> None:
        for meter in self.meters:
            if isinstance(meter, CrashMeter):  # the critic's optimiser says the law (Adam or SGD)
                meter.setup(self.agent, _critic_optimizers(self.model), rewards=rewards)

    def _on_step(self) -> bool:
        step = self.model.num_timesteps
        due = self.cadence.due(step)
        if self.monitor is None:
            if step <= self.model.learning_starts:
                return True
            self._draw_probe()
        if not due:
            return True
        self.scalars, self.last_step = self.monitor.measure(self.agent, step), step
        for name, value in self.scalars.items():
            if not math.isnan(value):
                self.logger.record(name, value)
        self.logger.dump(step)
        reasons = self.monitor.reasons
        if self.fired:  # the action happens once ("warn" goes on measuring)
            return True
        if not reasons:
            self._keep_healthy(step)
            return True
        return self._act(step, reasons)

    def _draw_probe(self) -> None:
        probe = probe_from_buffer(self.model.replay_buffer, self.probe_size, self.probe_seed,
                                  self.model._vec_normalize_env)
        if len(probe.obs) < self.probe_size:
            warnings.warn(f"MonitorCallback: probe_size={self.probe_size} transitions requested, but the replay "
                          f"buffer holds {len(probe.obs)} when learning starts; the probe set is cut to "
                          f"{len(probe.obs)} (raise learning_starts or lower probe_size)", UserWarning, stacklevel=2)
        self.monitor = Monitor(self.meters, probe)
        buffer = self.model.replay_buffer  # the Bellman bound from every reward stored so far, as SB3 serves them
        stored = buffer.rewards[: buffer.buffer_size if buffer.full else buffer.pos]
        self._setup_crash(torch.as_tensor(buffer._normalize_reward(stored, self.model._vec_normalize_env)))

    def _keep_healthy(self, step: int) -> None:
        if self._directory is None:
            return
        finite = all(bool(torch.isfinite(p).all()) for p in self.model.policy.parameters())
        if finite:  # a NaN the probe does not see is not kept
            held = self._directory / ".last-healthy.tmp.zip"
            self.model.save(held)
            self._held, self.healthy_step = held, step

    def _act(self, step: int, reasons: list[str]) -> bool:
        self.fired, self.stopped_step = True, step
        message = f"MonitorCallback at step {step}: {'; '.join(reasons)}"
        if self.action == "warn":
            warnings.warn(message, UserWarning, stacklevel=2)
            return True
        if self.action == "checkpoint_and_stop":
            if self._held is None:
                message += "; no measurement before was healthy with finite parameters, no model is written"
            else:
                path = self._directory / f"last-healthy-step={self.healthy_step}.zip"
                os.replace(self._held, path)
                self._held, self.checkpoint_path = None, str(path)
                message += f"; the model of the last healthy measurement (step {self.healthy_step}) is {path}"
        warnings.warn(message + "; training stops", UserWarning, stacklevel=2)
        return False

    def _on_training_end(self) -> None:
        if self._held is not None:  # no detection: nothing left behind
            self._held.unlink(missing_ok=True)
            self._held = None
