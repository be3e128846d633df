"""DQN (Mnih et al. 2015) with double Q-learning (van Hasselt et al. 2016) and the
dueling head (Wang et al. 2016). n-step returns and prioritised replay are options of
the :class:`~lit_qlearn.data.OnlineDataModule`, not subclasses: a batch carries its
``discount`` and importance ``weight``, and :meth:`DQN.update` returns the |TD error|
that the prioritised buffer takes as new priorities."""
from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lit_qlearn.algorithms.base import QLearningModule, compile_mode
from lit_qlearn.data.checkpoint import read_checkpoint
from lit_qlearn.data.types import DataSpec, Transitions
from lit_qlearn.networks import DiscreteQNetwork
from lit_qlearn.ntk import DiscreteQ, parameter_norm
from lit_qlearn.targets import TargetUpdate
from lit_qlearn.td import TD_LOSSES, check_gamma, td_loss

__all__ = ["DQN", "EpsilonGreedyQ", "RENAMED"]

#: DQN's arguments that took the actor-critics' names (old -> new). The old names are
#: accepted, with a FutureWarning, until the next release; checkpoints whose
#: hyper-parameters hold them keep loading (:meth:`DQN.load_from_checkpoint`).
RENAMED = {"hidden": "critic_hidden", "activation": "critic_activation", "norm": "critic_norm",
           "norm_layers": "critic_norm_layers", "norm_affine": "critic_norm_affine",
           "weight_norm": "critic_weight_norm", "dropout": "critic_dropout", "lr": "critic_lr"}


class EpsilonGreedyQ(QLearningModule):
    """A Q-network over discrete actions, ``self.q_net: obs (N, *obs_shape) -> Q (N, A)``,
    with the probe protocol (docs/design.md section 4), the greedy policy for evaluation and
    epsilon-greedy exploration with epsilon falling linearly from ``epsilon_start`` to
    ``epsilon_end`` over ``epsilon_steps`` environment steps. :class:`DQN` and
    :class:`~lit_qlearn.algorithms.PQN` are built on it; a subclass builds ``q_net`` and sets
    the three epsilon attributes (:meth:`set_epsilon_schedule`)."""

    action_kinds = ("discrete",)
    q_net: nn.Module  # built by the subclass

    def set_epsilon_schedule(self, start: float, end: float, steps: int) -> None:
        """Check and keep the schedule (a ValueError naming the bad argument)."""
        who = type(self).__name__
        for name, value in (("epsilon_start", start), ("epsilon_end", end)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{who}: {name} must be in [0, 1], got {value!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{who}: epsilon_steps must be an integer >= 1, got {steps!r}")
        self.epsilon_start, self.epsilon_end, self.epsilon_steps = float(start), float(end), steps

    # ------------------------------------------------------------ probe protocol
    def q_value(self, obs: Tensor, act: Tensor) -> Tensor:
        """``Q(s, a)`` of the chosen actions ``(N,)`` (int64), shape ``(N,)``."""
        return self.q_net(obs).gather(1, act.long().reshape(-1, 1)).squeeze(1)

    def greedy_action(self, obs: Tensor) -> Tensor:
        """``argmax_a Q(s, a)`` ``(N,)``: the action the bootstrap target uses."""
        return self.q_net(obs).argmax(dim=1)

    def q_network(self) -> nn.Module:
        return DiscreteQ(self.q_net)

    # ---------------------------------------------------------------- policies
    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.greedy_action(self._batched(obs)).cpu().numpy().reshape(np.shape(obs)[:-len(self.spec.obs_shape)])

    def _batched(self, obs: np.ndarray) -> Tensor:
        x = self.normalize(obs)
        return x.reshape(-1, *self.spec.obs_shape)

    def epsilon(self, env_step: int) -> float:
        """Linear schedule from ``epsilon_start`` to ``epsilon_end`` over ``epsilon_steps`` env steps."""
        fraction = min(1.0, env_step / self.epsilon_steps)
        return self.epsilon_start + fraction * (self.epsilon_end - self.epsilon_start)

    @torch.no_grad()
    def explore(self, obs: np.ndarray, env_step: int) -> np.ndarray:
        """Epsilon-greedy on a batch of states ``(E, *obs_shape) -> (E,)``."""
        x = self._batched(obs)
        epsilon = self.epsilon(env_step)
        explore = torch.rand(x.shape[0], device=x.device) < epsilon
        random_actions = torch.randint(self.spec.num_actions, (x.shape[0],), device=x.device)
        if epsilon >= 1.0:  # no greedy action needed (every step before epsilon falls; no device sync to know it)
            return random_actions.cpu().numpy()
        return torch.where(explore, random_actions, self.greedy_action(x)).cpu().numpy()


class DQN(EpsilonGreedyQ):
    """Deep Q-network for discrete actions, on vector or image observations.

    ``V(s') = Q'(s', argmax_a Q(s', a))`` with ``double=True``, else
    ``max_a Q'(s', a)``; the target network follows the one
    :class:`~lit_qlearn.targets.TargetUpdate` rule (a hard copy every
    ``target_every`` updates by default, Polyak with ``target_tau < 1``). Exploration
    is epsilon-greedy with epsilon falling linearly from ``epsilon_start`` to
    ``epsilon_end`` over ``epsilon_steps`` environment steps. Defaults: Huber loss,
    Adam 1e-4, gradient norm clipped at 10 and epsilon 1 -> 0.05 as Stable-Baselines3's
    DQN; double Q-learning on; a hard target copy every 1000 updates and epsilon over
    the first 10,000 environment steps (SB3 counts both in environment steps and
    fractions of the run: ``configs/dqn_cartpole.yaml`` translates its zoo settings).

    Args:
        obs_shape: observation shape; None reads it from the DataModule.
        num_actions: number of actions; None reads it from the DataModule.
        obs_dtype: dtype of the observations given with ``obs_shape`` ("uint8" for Atari frames).
        gamma: discount factor in [0, 1).
        critic_hidden: hidden widths of the Q-head (after the convolutional encoder for images).
        critic_activation: activation of the head, one of relu, tanh, sin, elu, mish.
        critic_norm: None, "layer" (LayerNorm, docs/design.md 5.6) or "batch" in the head.
        critic_norm_layers: indices of the hidden layers that get the norm (None: all).
        critic_norm_affine: learnable gain and bias in the norm layers.
        critic_weight_norm: weight-normalise the head's output layer.
        critic_dropout: dropout rate after each hidden activation.
        dueling: the dueling head Q = V + A - mean A.
        double: double Q-learning: the online network picks the next action, the target network values it.
        loss: "huber" (smooth L1, threshold 1) or "mse".
        critic_lr: Adam learning rate.
        adam_eps: Adam epsilon.
        max_grad_norm: clip the gradient's global norm (None: no clipping).
        target_tau: 1 for hard copies, < 1 for Polyak averaging.
        target_every: updates between target moves.
        epsilon_start: exploration epsilon at the first environment step.
        epsilon_end: exploration epsilon after ``epsilon_steps``.
        epsilon_steps: environment steps over which epsilon falls linearly.
        eval_every: evaluation cadence in updates (0 disables).
        eval_episodes: episodes per evaluation.
        compile: ``torch.compile`` the Q-network and its target at fit start: True, or a
            ``torch.compile`` mode ("reduce-overhead": CUDA graphs on a GPU).
        hidden, activation, norm, norm_layers, norm_affine, weight_norm, dropout, lr: the
            names of ``critic_hidden`` ... ``critic_lr`` before they took the actor-critics'
            names; accepted with a FutureWarning until the next release (:data:`RENAMED`).
    """

    def __init__(
        self,
        obs_shape: Sequence[int] | None = None,
        num_actions: int | None = None,
        obs_dtype: str = "float32",
        gamma: float = 0.99,
        critic_hidden: Sequence[int] = (256, 256),
        critic_activation: str = "relu",
        critic_norm: str | None = None,
        critic_norm_layers: Sequence[int] | None = None,
        critic_norm_affine: bool = True,
        critic_weight_norm: bool = False,
        critic_dropout: float = 0.0,
        dueling: bool = False,
        double: bool = True,
        loss: str = "huber",
        critic_lr: float = 1e-4,
        adam_eps: float = 1e-8,
        max_grad_norm: float | None = 10.0,
        target_tau: float = 1.0,
        target_every: int = 1000,
        epsilon_start: float = 1.0,
        epsilon_end: float = 0.05,
        epsilon_steps: int = 10_000,
        eval_every: int = 0,
        eval_episodes: int = 10,
        compile: bool | str = False,
        hidden: Sequence[int] | None = None,
        activation: str | None = None,
        norm: str | None = None,
        norm_layers: Sequence[int] | None = None,
        norm_affine: bool | None = None,
        weight_norm: bool | None = None,
        dropout: float | None = None,
        lr: float | None = None,
    ) -> None:
        old = dict(hidden=hidden, activation=activation, norm=norm, norm_layers=norm_layers, norm_affine=norm_affine,
                   weight_norm=weight_norm, dropout=dropout, lr=lr)
        (critic_hidden, critic_activation, critic_norm, critic_norm_layers, critic_norm_affine, critic_weight_norm,
         critic_dropout, critic_lr) = _renamed(old, dict(
             critic_hidden=critic_hidden, critic_activation=critic_activation, critic_norm=critic_norm,
             critic_norm_layers=critic_norm_layers, critic_norm_affine=critic_norm_affine,
             critic_weight_norm=critic_weight_norm, critic_dropout=critic_dropout, critic_lr=critic_lr))
        super().__init__()
        # (the old names stay in the hyper-parameters where given: a LightningCLI config keeps them as written)
        self.save_hyperparameters(ignore=[name for name, value in old.items() if value is None])
        if loss not in TD_LOSSES:
            raise ValueError(f"DQN: loss must be one of {TD_LOSSES}, got {loss!r}")
        self.set_epsilon_schedule(epsilon_start, epsilon_end, epsilon_steps)
        self.gamma = check_gamma("DQN", gamma)
        self.critic_options = dict(hidden=critic_hidden, activation=critic_activation, norm=critic_norm,
                                   norm_layers=critic_norm_layers, norm_affine=critic_norm_affine,
                                   weight_norm_output=critic_weight_norm, dropout=critic_dropout)
        self.dueling, self.double, self.loss = bool(dueling), bool(double), loss
        self.critic_lr, self.adam_eps, self.max_grad_norm = critic_lr, adam_eps, max_grad_norm
        self.eval_every, self.eval_episodes = int(eval_every), int(eval_episodes)
        self.compile_networks = compile_mode("DQN", compile)
        self.target_update = TargetUpdate(target_tau, target_every)
        self.q_net: DiscreteQNetwork | None = None
        if obs_shape is not None and num_actions is not None:
            self.given_spec = DataSpec(tuple(obs_shape), num_actions=int(num_actions), obs_dtype=obs_dtype)

    # ---------------------------------------------------------------- networks
    def build(self, spec: DataSpec) -> None:
        self.q_net = DiscreteQNetwork(spec.obs_shape, spec.num_actions, dueling=self.dueling, **self.critic_options)
        self.q_target = self.add_target(self.q_net)

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"critic": self.adam(self.q_net.parameters(), lr=self.critic_lr, eps=self.adam_eps)}

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """:meth:`QLearningModule.load_from_checkpoint`, with hyper-parameters saved under
        DQN's old argument names (:data:`RENAMED`) passed under the new ones, silently: the
        file cannot be changed by heeding a warning. (Read from local files loaded as
        data; others go through the constructor's FutureWarning.)"""
        path = checkpoint_path
        if isinstance(path, (str, os.PathLike)) and "://" not in str(path) and kwargs.get("weights_only") is not False:
            hparams = read_checkpoint(path, mmap=True).get(cls.CHECKPOINT_HYPER_PARAMS_KEY) or {}
            for old, new in RENAMED.items():
                if hparams.get(old) is not None and old not in kwargs and new not in kwargs:
                    kwargs.update({new: hparams[old], old: None})
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    # --------------------------------------------------------------- the update
    def next_value(self, batch: Transitions) -> Tensor:
        """``V(s')``: the target network at the online argmax (double) or its max, ``(B,)``."""
        target_q = self.q_target(batch.next_obs)
        if self.double:
            return target_q.gather(1, self.greedy_action(batch.next_obs).unsqueeze(1)).squeeze(1)
        return target_q.max(dim=1).values

    def update(self, batch: Transitions) -> Tensor:
        logging = self.logging_now()
        y = self.td_target(batch)
        q = self.q_value(batch.obs, batch.act)
        critic = td_loss(q, y, batch.weight, kind=self.loss)
        # the gradient norm before the clip (free when clipping, measured on logging steps otherwise)
        grad_norm = self.step("critic", critic.loss, max_grad_norm=self.max_grad_norm, measure_norm=logging)
        if logging:
            with torch.no_grad():
                self.log_scalars({"train/critic_loss": critic.loss.detach(), "q/data_mean": q.detach().mean(),
                                  "q/target_mean": y.mean(), "train/td_abs_mean": critic.td_abs.mean(),
                                  "train/critic_grad_norm": grad_norm,
                                  "params/critic_norm": parameter_norm(self.q_net.parameters())})
        return critic.td_abs


def _renamed(old: dict[str, Any], new: dict[str, Any]) -> list[Any]:
    """The values of ``new``'s arguments, in its order, each taken from its old name
    (:data:`RENAMED`) where that was given (not None), with a FutureWarning. Giving both is
    a TypeError; a new name at its default counts as not given (LightningCLI passes every
    default explicitly)."""
    parameters = inspect.signature(DQN.__init__).parameters
    values = dict(new)
    for old_name, value in old.items():
        if value is None:
            continue
        new_name = RENAMED[old_name]
        if not _same(values[new_name], parameters[new_name].default):
            raise TypeError(f"DQN: got both {old_name}={value!r} and {new_name}={values[new_name]!r}; {old_name} is "
                            f"the old name of {new_name}: give {new_name} only")
        # stacklevel: the DQN(...) call (this function, DQN.__init__, the metaclass's __call__, the caller)
        warnings.warn(f"DQN: the argument {old_name!r} is now called {new_name!r} (the actor-critics' name); "
                      f"{old_name!r} will be removed in the next release", FutureWarning, stacklevel=4)
        values[new_name] = value
    return list(values.values())


def _same(a: Any, b: Any) -> bool:
    """``a == b``, sequences compared as tuples (a config gives lists where defaults are tuples)."""
    if isinstance(a, Sequence) and not isinstance(a, str) and isinstance(b, Sequence) and not isinstance(b, str):
        return tuple(a) == tuple(b)
    return a == b
