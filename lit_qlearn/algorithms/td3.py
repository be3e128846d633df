"""TD3 (Fujimoto et al. 2018), TD3+BC (Fujimoto & Gu 2021) and DDPG (Lillicrap et al. 2016), on DDPG's
shape (:class:`DeterministicActorCritic`), which PreQN shares."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lit_qlearn.algorithms.actor_critic import ActorCritic, frozen
from lit_qlearn.data.types import DataSpec, Transitions
from lit_qlearn.networks import Actor

__all__ = ["TD3", "TD3BC", "DDPG", "DeterministicActorCritic"]


class DeterministicActorCritic(ActorCritic):
    """DDPG's shape, shared by :class:`TD3` (and its variants) and
    :class:`~lit_qlearn.algorithms.PreQN`: a deterministic actor ``mu(s)`` (an
    :class:`~lit_qlearn.networks.Actor`, tanh-bounded to the action box), Gaussian
    exploration around it, and actor steps on ``-Q_1(s, mu(s))`` (the sum of
    :meth:`actor_loss_terms`, which a variant overrides). The other arguments are
    :class:`ActorCritic`'s.

    Args:
        exploration_noise: std of the Gaussian noise :meth:`explore` adds online, in half-ranges.
    """

    def __init__(self, *args: Any, exploration_noise: float = 0.1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.exploration_noise = float(exploration_noise)

    def make_actor(self, spec: DataSpec) -> Actor:
        return Actor(spec.obs_dim, spec.action_dim, spec.action_low, spec.action_high, **self.actor_options)

    @torch.no_grad()
    def explore(self, obs: np.ndarray, env_step: int) -> np.ndarray:
        """``mu(s)`` plus Gaussian noise of std ``exploration_noise`` half-ranges, clipped to the bounds."""
        actor = self.actor
        a = actor(self.normalize(obs))
        a = a + torch.randn_like(a) * self.exploration_noise * actor.action_scale
        return torch.clamp(a, actor.action_low, actor.action_high).cpu().numpy()

    def actor_loss_terms(self, batch: Transitions, pi: Tensor, q_pi: Tensor) -> dict[str, Tensor]:
        """The actor loss's terms ``()`` (with gradient) by the name each is logged under,
        from ``pi = mu(s)`` ``(B, da)`` and ``q_pi = Q_1(s, pi)`` ``(B,)``; the loss is their
        sum. DDPG's: ``train/actor_q_term = -Q_1(s, mu(s))``."""
        return {"train/actor_q_term": -q_pi.mean()}

    def actor_loss(self, batch: Transitions, pi: Tensor, q_pi: Tensor) -> Tensor:
        """The sum of :meth:`actor_loss_terms` (DDPG's ``-Q_1(s, mu(s))``)."""
        return sum(self.actor_loss_terms(batch, pi, q_pi).values())

    def actor_step(self, batch: Transitions) -> dict[str, Tensor]:
        """One actor step on the sum of :meth:`actor_loss_terms` (or on :meth:`actor_loss`
        where a subclass overrides that instead), the critic frozen (it gets no gradient);
        returns the step's ``train/actor_loss``, its terms and ``q/policy_mean`` to log."""
        with frozen(self.critic):
            pi = self.actor(batch.obs)
            q_pi = self.q_value(batch.obs, pi)
            if type(self).actor_loss is DeterministicActorCritic.actor_loss:
                terms = self.actor_loss_terms(batch, pi, q_pi)
                loss = sum(terms.values())
            else:  # a loss written before the terms existed: stepped as written, no terms to log
                terms, loss = {}, self.actor_loss(batch, pi, q_pi)
            self.step("actor", loss)
        return {"train/actor_loss": loss.detach(), **{k: v.detach() for k, v in terms.items()},
                "q/policy_mean": q_pi.detach().mean()}


class TD3(DeterministicActorCritic):
    """Twin delayed DDPG (Fujimoto et al. 2018). Offline, without a behaviour-cloning
    term, it is the divergence baseline of Yue et al. (2023); :class:`TD3BC` adds the
    BC term, :class:`DDPG` is TD3 with DDPG's defaults. The other arguments (sizes,
    critic options, learning rates, targets, evaluation, exploration) are
    :class:`DeterministicActorCritic`'s and :class:`ActorCritic`'s.

    Args:
        policy_noise: std of the target policy smoothing noise, in units of the action half-range.
        noise_clip: clip of that noise, in the same units.
        policy_freq: the actor (and, by default, the targets) update every ``policy_freq`` critic updates.
        bc_alpha: None for pure TD3; else TD3+BC's alpha (actor loss -lambda Q + (pi - a)^2, lambda = alpha / mean|Q|).
    """

    def __init__(self, *args: Any, policy_noise: float = 0.2, noise_clip: float = 0.5, policy_freq: int = 2,
                 bc_alpha: float | None = None, **kwargs: Any) -> None:
        if isinstance(policy_freq, bool) or not isinstance(policy_freq, int) or policy_freq < 1:
            raise ValueError(f"{type(self).__name__}: policy_freq must be an integer >= 1, got {policy_freq!r}")
        super().__init__(*args, **kwargs)
        self.policy_freq = policy_freq
        self.policy_noise, self.noise_clip = float(policy_noise), float(noise_clip)
        self.bc_alpha = bc_alpha

    def default_target_every(self) -> int:
        return self.policy_freq  # TD3 moves its targets with the delayed actor

    def build_targets(self) -> None:
        """Target copies of the critic and the actor (TD3's ``Q'`` and ``mu'``)."""
        self.critic_target = self.add_target(self.critic)
        self.actor_target = self.add_target(self.actor)

    # --------------------------------------------------------------- the update
    def next_value(self, batch: Transitions) -> Tensor:
        """TD3's ``V(s') = min_i Q'_i(s', clip(mu'(s') + clipped noise))``, shape ``(B,)``."""
        actor = self.actor_target
        next_act = actor(batch.next_obs)
        if self.policy_noise > 0:
            noise = (torch.randn_like(batch.act) * self.policy_noise).clamp(-self.noise_clip, self.noise_clip)
            next_act = torch.clamp(next_act + noise * actor.action_scale, actor.action_low, actor.action_high)
        return self.critic_target(batch.next_obs, next_act).min(dim=0).values

    def actor_loss_terms(self, batch: Transitions, pi: Tensor, q_pi: Tensor) -> dict[str, Tensor]:
        """``train/actor_q_term = -Q(s, pi(s))``; with ``bc_alpha``, TD3+BC's
        ``train/actor_q_term = -lambda Q(s, pi(s))`` (``lambda = alpha / mean|Q|``, detached)
        and ``train/bc_loss = mean (pi(s) - a)^2``."""
        if self.bc_alpha is None:
            return super().actor_loss_terms(batch, pi, q_pi)
        lmbda = self.bc_alpha / q_pi.abs().mean().detach()
        return {"train/actor_q_term": -lmbda * q_pi.mean(), "train/bc_loss": F.mse_loss(pi, batch.act)}

    def update(self, batch: Transitions) -> Tensor:
        logging = self.logging_now()
        # critic: the twin TD loss against y = r + discount (1 - d) min_i Q'_i(s', smoothed mu'(s'))
        y = self.td_target(batch)
        critic = self.critic_loss(batch, y)
        grad_norm = self.step("critic", critic.loss, measure_norm=logging)
        # actor, every policy_freq updates (the targets move with it after the update, by the base's
        # rule); on the other updates no actor_loss is logged and q/policy_mean is measured at the log
        actor = self.actor_step(batch) if self.updates % self.policy_freq == 0 else {}
        if logging:
            self.log_update(batch, critic.q[0], {**critic.scalars, **actor}, y=y, critic_grad_norm=grad_norm)
        return critic.td_abs


class DDPG(TD3):
    """DDPG (Lillicrap et al. 2016) as TD3 with DDPG's defaults: one critic, no target
    policy smoothing, an actor step and a Polyak target move after every critic update.
    Every :class:`TD3` argument stays an argument (e.g. ``num_q=2`` gives it twin critics).

    Args:
        num_q: number of critics (DDPG: 1).
        policy_noise: target policy smoothing noise (DDPG: none).
        policy_freq: critic updates per actor update (DDPG: 1).
    """

    def __init__(self, *args: Any, num_q: int = 1, policy_noise: float = 0.0, policy_freq: int = 1,
                 **kwargs: Any) -> None:
        super().__init__(*args, num_q=num_q, policy_noise=policy_noise, policy_freq=policy_freq, **kwargs)


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
