"""TD3 (Fujimoto et al. 2018) and TD3+BC (Fujimoto & Gu 2021) as LightningModules."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_qlearn.algorithms.base import QLearningModule
from lit_qlearn.data.types import Transitions
from lit_qlearn.networks import Actor, Critic
from lit_qlearn.ntk import parameter_norm
from lit_qlearn.targets import TargetUpdate

__all__ = ["TD3", "TD3BC"]


class TD3(QLearningModule):
    """Twin delayed DDPG. Offline, without a behaviour-cloning term, it is the
    divergence baseline of Yue et al. (2023); :class:`TD3BC` adds the BC term.

    Network sizes can be given, or left ``None`` to be read from the DataModule
    (``observation_dim``, ``action_dim``, ``action_low``, ``action_high``) at setup.

    Args:
        gamma: discount factor.
        critic_hidden / critic_activation / critic_norm / critic_norm_layers /
        critic_norm_affine / critic_weight_norm / critic_dropout: the critic's
            :func:`~lit_qlearn.networks.mlp` options; ``critic_norm="layer"`` is
            the LayerNorm remedy of DESIGN.md 5.6.
        num_q: number of critics (the target takes their minimum).
        actor_hidden / actor_activation: the actor's ``mlp`` options.
        actor_lr / critic_lr: Adam learning rates.
        critic_weight_decay: Adam (L2) weight decay of the critic.
        policy_noise / noise_clip: target policy smoothing, in units of the action half-range.
        policy_freq: actor updated every ``policy_freq`` critic updates.
        target_tau / target_every: default target rule, Polyak with ``tau`` every
            ``target_every`` updates (``None``: ``policy_freq``, as in TD3). An
            :class:`~lit_qlearn.callbacks.EMATarget` callback overrides it.
        bc_alpha: ``None`` for pure TD3; else TD3+BC's alpha: the actor minimises
            ``-lambda * Q(s, pi(s)) + (pi(s) - a)^2`` with ``lambda = alpha / mean|Q|``.
        eval_every / eval_episodes: evaluation cadence in updates (0 disables) and episodes.
    """

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
        bc_alpha: float | None = None,
        eval_every: int = 5000,
        eval_episodes: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"{type(self).__name__}: gamma must be in [0, 1), got {gamma}")
        if policy_freq < 1:
            raise ValueError(f"{type(self).__name__}: policy_freq must be >= 1, got {policy_freq}")
        self.gamma = float(gamma)
        self.eval_every = int(eval_every)
        self.eval_episodes = int(eval_episodes)
        self.target_update = TargetUpdate(target_tau, policy_freq if target_every is None else target_every)
        self.actor: Actor | None = None
        self.critic: Critic | None = None
        self._last: dict[str, Tensor] = {}
        if obs_dim is not None and act_dim is not None:
            self._build(obs_dim, act_dim, action_low, action_high)

    # ---------------------------------------------------------------- networks
    def _build(self, obs_dim: int, act_dim: int, low: Any, high: Any) -> None:
        hp = self.hparams
        self.critic = Critic(
            obs_dim,
            act_dim,
            num_q=hp.num_q,
            hidden=hp.critic_hidden,
            activation=hp.critic_activation,
            norm=hp.critic_norm,
            norm_layers=hp.critic_norm_layers,
            norm_affine=hp.critic_norm_affine,
            weight_norm_output=hp.critic_weight_norm,
            dropout=hp.critic_dropout,
        )
        self.actor = Actor(obs_dim, act_dim, low, high, hidden=hp.actor_hidden, activation=hp.actor_activation)
        self._target_pairs.clear()
        self._add_targets()
        # State normalisation of the data, applied by act() in evaluation and collection.
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))

    def _add_targets(self) -> None:
        self.critic_target = self.add_target(self.critic)
        self.actor_target = self.add_target(self.actor)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None:
            if self.critic is None:
                raise ValueError(
                    f"{type(self).__name__}: obs_dim and act_dim were not given and the Trainer has no "
                    "DataModule to read them from"
                )
            return
        dims = {name: getattr(dm, name, None) for name in ("observation_dim", "action_dim")}
        if any(v is None for v in dims.values()):
            raise ValueError(f"{type(dm).__name__} must provide observation_dim and action_dim, got {dims}")
        if self.critic is None:
            low = np.asarray(dm.action_low, dtype=np.float32).tolist()
            high = np.asarray(dm.action_high, dtype=np.float32).tolist()
            self.hparams.update(
                obs_dim=int(dims["observation_dim"]), act_dim=int(dims["action_dim"]), action_low=low, action_high=high
            )
            self._build(self.hparams.obs_dim, self.hparams.act_dim, low, high)
        elif (self.hparams.obs_dim, self.hparams.act_dim) != (dims["observation_dim"], dims["action_dim"]):
            raise ValueError(
                f"{type(self).__name__} was built for obs_dim={self.hparams.obs_dim}, act_dim={self.hparams.act_dim} "
                f"but {type(dm).__name__} serves observation_dim={dims['observation_dim']}, "
                f"action_dim={dims['action_dim']}"
            )
        if getattr(dm, "obs_mean", None) is not None:
            self.obs_mean.copy_(torch.as_tensor(np.asarray(dm.obs_mean), dtype=torch.float32))
            self.obs_std.copy_(torch.as_tensor(np.asarray(dm.obs_std), dtype=torch.float32))
        self.env_id = getattr(dm, "env_id", None)
        self.ref_scores = getattr(dm, "ref_scores", None)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        critic_opt = self.adam(self.critic.parameters(), lr=hp.critic_lr, weight_decay=hp.critic_weight_decay)
        actor_opt = self.adam(self.actor.parameters(), lr=hp.actor_lr)
        return [critic_opt, actor_opt]

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

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=self.device)
        return self.actor((x - self.obs_mean) / self.obs_std).cpu().numpy()

    # --------------------------------------------------------------- the update
    def td_target(self, batch: Transitions) -> Tensor:
        """``y = r + gamma (1 - done) min_i Q'_i(s', clip(mu'(s') + clipped noise))``, shape ``(B,)``."""
        hp = self.hparams
        actor = self.actor_target
        noise = (torch.randn_like(batch.act) * hp.policy_noise).clamp(-hp.noise_clip, hp.noise_clip)
        next_act = actor(batch.next_obs) + noise * actor.action_scale
        next_act = torch.clamp(next_act, actor.action_low, actor.action_high)
        target_q = self.critic_target(batch.next_obs, next_act).min(dim=0).values
        return batch.rew + self.gamma * (1.0 - batch.done) * target_q

    def actor_loss(self, batch: Transitions, pi: Tensor, q_pi: Tensor) -> Tensor:
        """``-Q(s, pi(s))``, plus TD3+BC's normalised BC term when ``bc_alpha`` is set."""
        alpha = self.hparams.bc_alpha
        if alpha is None:
            return -q_pi.mean()
        lmbda = alpha / q_pi.abs().mean().detach()
        return -lmbda * q_pi.mean() + F.mse_loss(pi, batch.act)

    def training_step(self, batch: Transitions, batch_idx: int) -> None:
        self.updates += 1
        critic_opt, actor_opt = self.optimizers()
        with torch.no_grad():
            y = self.td_target(batch)
        q = self.critic(batch.obs, batch.act)  # (num_q, B)
        critic_loss = (q - y).pow(2).mean(dim=1).sum()
        self.optimize(critic_opt, critic_loss)
        if self.updates % self.hparams.policy_freq == 0:
            self.actor_update(batch, actor_opt, count_step=False)
        if self.logging_now():
            self.log_update(batch, critic_loss.detach(), q[0].detach())

    def actor_update(self, batch: Transitions, actor_opt: Any, count_step: bool = False) -> None:
        """One actor step on :meth:`actor_loss` (the critic gets no gradients)."""
        self.critic.requires_grad_(False)
        try:
            pi = self.actor(batch.obs)
            q_pi = self.q_value(batch.obs, pi)
            actor_loss = self.actor_loss(batch, pi, q_pi)
            self.optimize(actor_opt, actor_loss, count_step=count_step)
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
        self.log_scalars(metrics, batch_size=batch.obs.shape[0])


class TD3BC(TD3):
    """TD3+BC (Fujimoto & Gu 2021): TD3 whose actor also clones the data's actions.

    Defaults are the paper's: alpha 2.5, policy noise 0.2, noise clip 0.5, actor
    every 2 updates, Adam 3e-4, gamma 0.99 (batch 256 is the DataModule's).
    """

    def __init__(self, *args: Any, bc_alpha: float = 2.5, **kwargs: Any) -> None:
        super().__init__(*args, bc_alpha=bc_alpha, **kwargs)
