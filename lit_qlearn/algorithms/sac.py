"""SAC (Haarnoja et al. 2018, with the learned temperature of the second paper), on the
maximum-entropy actor-critic shape (:class:`SoftActorCritic`) that CrossQ shares."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lit_qlearn.algorithms.actor_critic import ActorCritic, CriticLoss, frozen
from lit_qlearn.data.types import DataSpec, Transitions
from lit_qlearn.networks import SquashedGaussianActor

__all__ = ["SAC", "SoftActorCritic"]


class SoftActorCritic(ActorCritic):
    """The maximum-entropy shape shared by :class:`SAC` (and CQL) and
    :class:`~lit_qlearn.algorithms.CrossQ`: a tanh-squashed Gaussian actor, the soft value
    ``min_i Q_i(s', a') - alpha log pi(a' | s')`` (:meth:`soft_value`), actor steps on
    ``alpha log pi(a | s) - min_i Q_i(s, a)`` (:meth:`actor_step`) and the temperature
    alpha learned towards the target entropy with its own optimiser (``"alpha"``,
    :meth:`temperature_loss`). The other arguments are :class:`ActorCritic`'s.

    Args:
        alpha_lr: Adam learning rate of log alpha.
        init_alpha: initial temperature.
        learn_alpha: learn alpha (False: keep init_alpha fixed).
        target_entropy: entropy target (None: -act_dim).
        log_std_min: lower bound of the actor's log standard deviation.
        log_std_max: upper bound of the actor's log standard deviation.
    """

    def __init__(self, *args: Any, alpha_lr: float = 3e-4, init_alpha: float = 1.0, learn_alpha: bool = True,
                 target_entropy: float | None = None, log_std_min: float = -5.0, log_std_max: float = 2.0,
                 **kwargs: Any) -> None:
        if not init_alpha > 0:
            raise ValueError(f"{type(self).__name__}: init_alpha must be > 0, got {init_alpha!r}")
        super().__init__(*args, **kwargs)
        self.alpha_lr, self.learn_alpha, self.target_entropy = alpha_lr, bool(learn_alpha), target_entropy
        self.actor_options.update(log_std_min=log_std_min, log_std_max=log_std_max)
        self.log_alpha = nn.Parameter(torch.tensor(float(np.log(init_alpha))), requires_grad=self.learn_alpha)

    # ---------------------------------------------------------------- networks
    def make_actor(self, spec: DataSpec) -> SquashedGaussianActor:
        if self.target_entropy is None:
            self.target_entropy = -float(spec.action_dim)  # the paper's heuristic -|A|
        return SquashedGaussianActor(spec.obs_dim, spec.action_dim, spec.action_low, spec.action_high,
                                     **self.actor_options)

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        optimizers = super().build_optimizers()
        if self.learn_alpha:
            optimizers["alpha"] = self.adam([self.log_alpha], lr=self.alpha_lr)
        return optimizers

    @property
    def alpha(self) -> Tensor:
        return self.log_alpha.detach().exp()

    # ---------------------------------------------------------------- policies
    @torch.no_grad()
    def explore(self, obs: np.ndarray, env_step: int) -> np.ndarray:
        """An action sampled from the policy."""
        return self.actor.sample(self.normalize(obs))[0].cpu().numpy()

    # ------------------------------------------------------------------ losses
    def soft_value(self, next_q: Tensor, next_logp: Tensor) -> Tensor:
        """``min_i Q_i(s', a') - alpha log pi(a' | s')`` ``(B,)`` from the critics' ``Q(s', a')``
        ``(num_q, B)`` and ``log pi(a' | s')`` ``(B,)``."""
        return next_q.min(dim=0).values - self.alpha * next_logp

    def temperature_loss(self, logp: Tensor) -> Tensor:
        """``-log_alpha (log pi + target_entropy)`` averaged over the batch: its gradient in
        log alpha is ``-(E[log pi] + H*) = entropy - H*``, so descent raises alpha while the
        policy's entropy is below the target; the fixed point is entropy = target."""
        return -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()

    def actor_step(self, obs: Tensor, noise: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """One actor step on ``mean(alpha log pi(a|s) - min_i Q_i(s, a))``, ``a ~ pi(s)``
        reparameterised (``noise`` ``(B, da)``: its standard normal draw, None: a fresh one),
        the critic frozen (it gets no gradient). Returns ``log pi(a|s)`` ``(B,)`` (for the
        temperature) and the step's ``train/actor_loss``, ``q/policy_mean``, ``train/entropy``."""
        with frozen(self.critic):
            pi, logp = self.actor.sample(obs, noise)
            q_pi = self.critic(obs, pi).min(dim=0).values
            actor_loss = (self.alpha * logp - q_pi).mean()
            self.step("actor", actor_loss)
        return logp, {"train/actor_loss": actor_loss.detach(), "q/policy_mean": q_pi.detach().mean(),
                      "train/entropy": -logp.detach().mean()}

    def extra_losses(self, critic: CriticLoss, logp: Tensor) -> dict[str, Tensor]:
        """The losses of the optimisers other than the critic's and the actor's, by optimiser
        name, from this update's critic loss and ``log pi(a|s)`` ``(B,)``: the temperature's
        (:meth:`temperature_loss`) when alpha is learned."""
        return {"alpha": self.temperature_loss(logp)} if self.learn_alpha else {}


class SAC(SoftActorCritic):
    """Soft actor-critic: twin critics in one batched pass with Polyak targets, a
    tanh-squashed Gaussian actor, and the temperature alpha learned towards the target
    entropy with its own optimiser (``"alpha"``). The arguments (sizes, critic options,
    learning rates, targets, evaluation, temperature) are :class:`SoftActorCritic`'s and
    :class:`ActorCritic`'s; the defaults are the paper's (Adam 3e-4, tau 0.005, targets
    every update, 256x256).

    ``V(s') = min_i Q'_i(s', a') - alpha log pi(a' | s')`` with ``a' ~ pi(s')``; the actor
    minimises ``alpha log pi(a | s) - min_i Q_i(s, a)``; alpha minimises
    ``-alpha (log pi + target_entropy)``, so it grows while the policy's entropy is below
    the target and shrinks above it. For the probe protocol, ``greedy_action`` is the
    deterministic action ``tanh(mean)`` (scaled to the bounds), and SEEM's bootstrap
    uses it (the authors' convention for a stochastic actor: its mode).
    """

    def build_targets(self) -> None:
        """The critics' target copy, the ``Q'`` of the soft bootstrap."""
        self.critic_target = self.add_target(self.critic)

    # --------------------------------------------------------------- the update
    def next_value(self, batch: Transitions) -> Tensor:
        """``V(s') = min_i Q'_i(s', a') - alpha log pi(a' | s')``, ``a' ~ pi(s')``, shape ``(B,)``."""
        next_act, next_logp = self.actor.sample(batch.next_obs)
        return self.soft_value(self.critic_target(batch.next_obs, next_act), next_logp)

    def update(self, batch: Transitions) -> Tensor:
        logging = self.logging_now()
        # critic: the twin TD loss against the soft y = r + discount (1 - d) V(s') (next_value)
        y = self.td_target(batch)
        critic = self.critic_loss(batch, y)
        grad_norm = self.step("critic", critic.loss, measure_norm=logging)
        # actor: alpha log pi(a|s) - min_i Q_i(s, a), a ~ pi(s) reparameterised; the critic gets no gradient
        logp, actor = self.actor_step(batch.obs)
        # the other optimisers: the temperature's (and a variant's, see extra_losses)
        for name, loss in self.extra_losses(critic, logp).items():
            self.step(name, loss)
        if logging:
            self.log_update(batch, critic.q[0], {**critic.scalars, **actor, "train/alpha": self.alpha},
                            y=y, critic_grad_norm=grad_norm)
        return critic.td_abs
