"""TD3 (Fujimoto et al. 2018) and TD3+BC (Fujimoto & Gu 2021) as LightningModules."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_qlearn.algorithms.base import QLearningModule, check_gamma
from lit_qlearn.data.types import DataSpec, Transitions
from lit_qlearn.networks import Actor, Critic
from lit_qlearn.ntk import parameter_norm
from lit_qlearn.targets import TargetUpdate
from lit_qlearn.td import td_loss, td_target

__all__ = ["TD3", "TD3BC"]


class TD3(QLearningModule):
    """Twin delayed DDPG (Fujimoto et al. 2018). Offline, without a behaviour-cloning
    term, it is the divergence baseline of Yue et al. (2023); :class:`TD3BC` adds the
    BC term. The network sizes are read from the DataModule at setup unless
    ``obs_dim`` and ``act_dim`` are given.

    Args:
        obs_dim: observation size; None reads it from the DataModule.
        act_dim: action size; None reads it from the DataModule.
        action_low: lower action bound(s), used with ``obs_dim`` / ``act_dim``.
        action_high: upper action bound(s), used with ``obs_dim`` / ``act_dim``.
        gamma: discount factor in [0, 1).
        critic_hidden: hidden widths of each critic.
        critic_activation: critic activation, one of relu, tanh, sin, elu, mish.
        critic_norm: None, "layer" (the LayerNorm remedy of DESIGN.md 5.6) or "batch".
        critic_norm_layers: indices of the hidden layers that get the norm (None: all).
        critic_norm_affine: learnable gain and bias in the critic's norm layers.
        critic_weight_norm: weight-normalise the critic's output layer.
        critic_dropout: dropout rate after each hidden activation of the critic.
        num_q: number of critics; the target takes their minimum.
        actor_hidden: hidden widths of the actor.
        actor_activation: actor activation.
        actor_lr: actor Adam learning rate.
        critic_lr: critic Adam learning rate.
        critic_weight_decay: Adam (L2) weight decay of the critic.
        policy_noise: std of the target policy smoothing noise, in units of the action half-range.
        noise_clip: clip of that noise, in the same units.
        policy_freq: the actor (and, by default, the targets) update every ``policy_freq`` critic updates.
        target_tau: Polyak rate of the default target rule (an EMATarget callback overrides it).
        target_every: updates between target moves (None: ``policy_freq``, as in TD3).
        exploration_noise: std of the Gaussian noise :meth:`explore` adds online, in half-ranges.
        bc_alpha: None for pure TD3; else TD3+BC's alpha (actor loss -lambda Q + (pi - a)^2, lambda = alpha / mean|Q|).
        eval_every: evaluation cadence in updates (0 disables).
        eval_episodes: episodes per evaluation.
    """

    action_kinds = ("continuous",)

    def __init__(
        self,
        obs_dim: int | None = None,
        act_dim: int | None = None,
        action_low: float | Sequence[float] = -1.0,
        action_high: float | Sequence[float] = 1.0,
        gamma: float = 0.99,
        critic_hidden: Sequence[int] = (256, 256),
        critic_activation: str = "relu",
        critic_norm: str | None = None,
        critic_norm_layers: Sequence[int] | None = None,
        critic_norm_affine: bool = True,
        critic_weight_norm: bool = False,
        critic_dropout: float = 0.0,
        num_q: int = 2,
        actor_hidden: Sequence[int] = (256, 256),
        actor_activation: str = "relu",
        actor_lr: float = 3e-4,
        critic_lr: float = 3e-4,
        critic_weight_decay: float = 0.0,
        policy_noise: float = 0.2,
        noise_clip: float = 0.5,
        policy_freq: int = 2,
        target_tau: float = 0.005,
        target_every: int | None = None,
        exploration_noise: float = 0.1,
        bc_alpha: float | None = None,
        eval_every: int = 5000,
        eval_episodes: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        who = type(self).__name__
        if isinstance(policy_freq, bool) or not isinstance(policy_freq, int) or policy_freq < 1:
            raise ValueError(f"{who}: policy_freq must be an integer >= 1, got {policy_freq!r}")
        self.gamma = check_gamma(who, gamma)
        self.critic_options = dict(hidden=critic_hidden, activation=critic_activation, norm=critic_norm,
                                   norm_layers=critic_norm_layers, norm_affine=critic_norm_affine,
                                   weight_norm_output=critic_weight_norm, dropout=critic_dropout)
        self.actor_options = dict(hidden=actor_hidden, activation=actor_activation)
        self.num_q, self.policy_freq, self.bc_alpha = int(num_q), policy_freq, bc_alpha
        self.policy_noise, self.noise_clip = float(policy_noise), float(noise_clip)
        self.exploration_noise = float(exploration_noise)
        self.actor_lr, self.critic_lr, self.critic_weight_decay = actor_lr, critic_lr, critic_weight_decay
        self.eval_every, self.eval_episodes = int(eval_every), int(eval_episodes)
        self.target_update = TargetUpdate(target_tau, policy_freq if target_every is None else target_every)
        self.actor: Actor | None = None
        self.critic: Critic | None = None
        self._last: dict[str, Tensor] = {}
        if obs_dim is not None and act_dim is not None:
            self.build_for(DataSpec.continuous(obs_dim, act_dim, action_low, action_high))

    # ---------------------------------------------------------------- networks
    def build(self, spec: DataSpec) -> None:
        self.critic = Critic(spec.obs_dim, spec.action_dim, num_q=self.num_q, **self.critic_options)
        self.actor = Actor(spec.obs_dim, spec.action_dim, spec.action_low, spec.action_high, **self.actor_options)
        self.add_targets()

    def add_targets(self) -> None:
        """Target copies of the critic and the actor (TD3's ``Q'`` and ``mu'``)."""
        self.critic_target = self.add_target(self.critic)
        self.actor_target = self.add_target(self.actor)

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"critic": self.adam(self.critic.parameters(), lr=self.critic_lr, weight_decay=self.critic_weight_decay),
                "actor": self.adam(self.actor.parameters(), lr=self.actor_lr)}

    # ------------------------------------------------------------ probe protocol
    def q_value(self, obs: Tensor, act: Tensor) -> Tensor:
        """First critic's ``Q(s, a)``, shape ``(N,)``."""
        return self.critic.members[0](torch.cat([obs, act], dim=-1)).squeeze(-1)

    def greedy_action(self, obs: Tensor) -> Tensor:
        """The online actor's ``mu(s)``: the action the bootstrap target uses."""
        return self.actor(obs)

    def q_network(self) -> nn.Module:
        return self.critic.q_function(0)

    def q_networks(self) -> list[nn.Module]:
        """Every critic member as ``(obs, act) -> (N,)`` (optional protocol member used by
        :class:`~lit_qlearn.callbacks.PreQNLineSearch`)."""
        return [self.critic.q_function(i) for i in range(self.critic.num_q)]

    # ---------------------------------------------------------------- policies
    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.actor(self.normalize(obs)).cpu().numpy()

    @torch.no_grad()
    def explore(self, obs: np.ndarray, env_step: int) -> np.ndarray:
        """``mu(s)`` plus Gaussian noise of std ``exploration_noise`` half-ranges, clipped to the bounds."""
        actor = self.actor
        a = actor(self.normalize(obs))
        a = a + torch.randn_like(a) * self.exploration_noise * actor.action_scale
        return torch.clamp(a, actor.action_low, actor.action_high).cpu().numpy()

    # --------------------------------------------------------------- the update
    def next_value(self, batch: Transitions) -> Tensor:
        """TD3's ``V(s') = min_i Q'_i(s', clip(mu'(s') + clipped noise))``, shape ``(B,)``."""
        actor = self.actor_target
        noise = (torch.randn_like(batch.act) * self.policy_noise).clamp(-self.noise_clip, self.noise_clip)
        next_act = torch.clamp(actor(batch.next_obs) + noise * actor.action_scale, actor.action_low, actor.action_high)
        return self.critic_target(batch.next_obs, next_act).min(dim=0).values

    def td_target(self, batch: Transitions) -> Tensor:
        """The TD target :func:`~lit_qlearn.td.td_target` with :meth:`next_value`, shape ``(B,)``."""
        with torch.no_grad():
            return td_target(batch, self.next_value(batch), self.gamma)

    def actor_loss(self, batch: Transitions, pi: Tensor, q_pi: Tensor) -> Tensor:
        """``-Q(s, pi(s))``, plus TD3+BC's normalised BC term when ``bc_alpha`` is set."""
        if self.bc_alpha is None:
            return -q_pi.mean()
        lmbda = self.bc_alpha / q_pi.abs().mean().detach()
        return -lmbda * q_pi.mean() + F.mse_loss(pi, batch.act)

    def update(self, batch: Transitions) -> Tensor:
        y = self.td_target(batch)
        q = self.critic(batch.obs, batch.act)  # (num_q, B)
        critic = td_loss(q, y, batch.weight)
        self.step("critic", critic.loss)
        if self.updates % self.policy_freq == 0:
            self.actor_update(batch)
        if self.logging_now():
            self.log_update(batch, critic.loss.detach(), q[0].detach())
        return critic.td_abs

    def actor_update(self, batch: Transitions) -> None:
        """One actor step on :meth:`actor_loss` (the critic gets no gradients)."""
        self.critic.requires_grad_(False)
        try:
            pi = self.actor(batch.obs)
            q_pi = self.q_value(batch.obs, pi)
            actor_loss = self.actor_loss(batch, pi, q_pi)
            self.step("actor", actor_loss)
        finally:
            self.critic.requires_grad_(True)
        self._last = {"train/actor_loss": actor_loss.detach(), "q/policy_mean": q_pi.detach().mean()}

    def log_update(self, batch: Transitions, critic_loss: Tensor, q_data: Tensor,
                   extra: dict[str, Tensor | float] | None = None) -> None:
        """Log the update's scalars (called on logging steps only)."""
        metrics: dict[str, Tensor | float] = {"train/critic_loss": critic_loss, "q/data_mean": q_data.mean()}
        if not self._last:
            with torch.no_grad():
                self._last = {"q/policy_mean": self.q_value(batch.obs, self.actor(batch.obs)).mean()}
        metrics.update(self._last)
        with torch.no_grad():
            metrics["params/critic_norm"] = parameter_norm(self.critic.parameters())
        metrics.update(extra or {})
        self.log_scalars(metrics)


class TD3BC(TD3):
    """TD3+BC (Fujimoto & Gu 2021): TD3 whose actor also clones the data's actions.

    Defaults are the paper's: alpha 2.5, policy noise 0.2, noise clip 0.5, actor
    every 2 updates, Adam 3e-4, gamma 0.99 (batch 256 is the DataModule's); the
    other arguments are :class:`TD3`'s.

    Args:
        bc_alpha: alpha of the actor loss -lambda Q(s, pi(s)) + (pi(s) - a)^2, lambda = alpha / mean|Q|.
    """

    def __init__(self, *args: Any, bc_alpha: float = 2.5, **kwargs: Any) -> None:
        super().__init__(*args, bc_alpha=bc_alpha, **kwargs)
