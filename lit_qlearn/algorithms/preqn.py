"""PreQN (Achiam, Knight & Abbeel 2019): a DDPG-style actor-critic without target
networks whose critic takes NTK-preconditioned steps (docs/design.md 5.5)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lit_qlearn.algorithms.td3 import DeterministicActorCritic
from lit_qlearn.data.types import Transitions
from lit_qlearn.ntk import METHODS, check_choice, check_preconditioner_args, preconditioned_step

__all__ = ["PreQN"]


class PreQN(DeterministicActorCritic):
    """Preconditioned Q-networks: DDPG's actor, a critic updated by
    :func:`lit_qlearn.ntk.preconditioned_step` and **no target networks**: the TD
    target ``r + gamma (1 - d) Q(s', mu(s'))`` uses the current critic and actor.

    Each update, on the minibatch ``X = (s, a)`` with TD errors ``delta = y - Q(X)``:
    ``K = G(X, X)`` (the critic's NTK Gram, float64), ``Z = K^+ delta``,
    ``theta' = theta + preqn_lr * sum_i Z_i grad Q(x_i)`` (one VJP), shrunk toward
    ``theta`` by ``shrink`` until ``cos(Q_theta'(X) - Q_theta(X), delta) >=
    cos_threshold`` or ``max_shrinks`` shrinks; then one Adam step of the actor on
    ``-Q(s, mu(s))``. To first order the critic moves like tabular Q-learning with
    step ``preqn_lr`` on the batch, which is why no target network is needed.

    PreQN is DDPG's shape (:class:`~lit_qlearn.algorithms.td3.DeterministicActorCritic`:
    its actor, exploration and actor step) with its own critic step: one critic, no
    target networks (it builds none) and no critic optimiser, so the options of those
    are not PreQN's arguments. Defaults (no official values exist; chosen here and
    documented): ``critic_activation="sin"`` (the paper's choice: the lowest NTK row
    ratio, so the most diagonal kernel), ``preqn_lr=0.1`` (a tabular step size),
    ``cos_threshold=0.9``, ``shrink=0.5``, ``max_shrinks=20`` (smallest step
    ``preqn_lr * 2^-20``; when even that misses the criterion it is kept, and
    ``preqn/accepted`` is 0), ``rcond=1e-6`` (eigenvalues of K below ``rcond``
    times the largest count as zero in ``K^+``: the only regularisation, see
    :func:`~lit_qlearn.ntk.preconditioned_step`).

    Logs ``preqn/cos``, ``preqn/shrink_steps``, ``preqn/step_norm`` and
    ``preqn/accepted`` besides DDPG's scalars. Under DDP the ranks' minibatches are
    gathered, so every rank takes the identical critic step on the union batch.

    Args:
        obs_dim: observation size; None reads it from the DataModule.
        act_dim: action size; None reads it from the DataModule.
        action_low: lower action bound(s), used with ``obs_dim`` / ``act_dim``.
        action_high: upper action bound(s), used with ``obs_dim`` / ``act_dim``.
        gamma: discount factor in [0, 1).
        critic_hidden: hidden widths of the critic.
        critic_activation: critic activation (sin: PreQN's choice).
        critic_norm: None, "layer" or "batch" in the critic.
        actor_hidden: hidden widths of the actor.
        actor_activation: actor activation.
        actor_lr: actor Adam learning rate.
        exploration_noise: std of the Gaussian noise :meth:`explore` adds online, in half-ranges.
        preqn_lr: the critic's step size alpha (a tabular step size).
        cos_threshold: the line search's criterion eta on cos(dQ, delta).
        shrink: geometric factor of the line search.
        max_shrinks: most shrinks per update.
        rcond: relative eigenvalue cutoff of the pseudo-inverse of K.
        ntk_method: NTK engine, see :func:`lit_qlearn.ntk.ntk_gram`.
        eval_every: evaluation cadence in updates (0 disables).
        eval_episodes: episodes per evaluation.
        compile: ``torch.compile`` the critic's batched forward and the actor at fit start
            (the NTK of the preconditioned step stays eager).
    """

    def __init__(self, obs_dim: int | None = None, act_dim: int | None = None,
                 action_low: float | Sequence[float] = -1.0, action_high: float | Sequence[float] = 1.0,
                 gamma: float = 0.99, critic_hidden: Sequence[int] = (256, 256), critic_activation: str = "sin",
                 critic_norm: str | None = None, actor_hidden: Sequence[int] = (256, 256),
                 actor_activation: str = "relu", actor_lr: float = 3e-4, exploration_noise: float = 0.1,
                 preqn_lr: float = 0.1, cos_threshold: float = 0.9, shrink: float = 0.5, max_shrinks: int = 20,
                 rcond: float = 1e-6, ntk_method: str = "auto", eval_every: int = 5000,
                 eval_episodes: int = 10, compile: bool | str = False) -> None:
        check_choice("PreQN", "ntk_method", ntk_method, METHODS)
        check_preconditioner_args("PreQN", lr=preqn_lr, cos_threshold=cos_threshold, shrink=shrink,
                                  max_shrinks=max_shrinks, rcond=rcond, lr_name="preqn_lr")
        super().__init__(obs_dim, act_dim, action_low, action_high, gamma=gamma, critic_hidden=critic_hidden,
                         critic_activation=critic_activation, critic_norm=critic_norm, num_q=1,
                         actor_hidden=actor_hidden, actor_activation=actor_activation, actor_lr=actor_lr,
                         exploration_noise=exploration_noise, eval_every=eval_every, eval_episodes=eval_episodes,
                         compile=compile)
        self.preqn = dict(lr=preqn_lr, cos_threshold=cos_threshold, shrink=shrink, max_shrinks=max_shrinks,
                          rcond=rcond, method=ntk_method)

    supports_weights = False  # the preconditioned step solves K Z = delta for the unweighted batch

    def default_target_update(self) -> None:
        """No target rule: PreQN has no target networks."""
        return None

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        # The critic has no optimiser; the actor's step is the one Lightning counts.
        return {"actor": self.adam(self.actor.parameters(), lr=self.actor_lr)}

    def next_value(self, batch: Transitions) -> Tensor:
        """``V(s') = Q(s', mu(s'))`` from the current critic and actor, shape ``(B,)``."""
        return self.q_value(batch.next_obs, self.actor(batch.next_obs))

    def update(self, batch: Transitions) -> None:
        # targets: y = r + discount (1 - d) Q(s', mu(s')) from the current critic and actor
        y = self.td_target(batch)
        # critic: one NTK-preconditioned step towards y, no optimiser; under DDP on the union
        # of the ranks' batches, so every rank takes the identical step
        obs, act = batch.obs, batch.act
        if self.trainer.world_size > 1:
            obs, act, y = (self.trainer.strategy.all_gather(t).flatten(0, 1) for t in (obs, act, y))
        with torch.no_grad():
            q = self.q_value(obs, act)
        step = preconditioned_step(self.q_network(), (obs, act), y - q, **self.preqn)
        # actor: DDPG's -Q(s, mu(s)) against the stepped critic
        actor = self.actor_step(batch)
        if self.logging_now():  # no train/critic_grad_norm: the critic takes no gradient step
            self.log_update(batch, q, {"train/critic_loss": (q - y).pow(2).mean(), **actor,
                                       "preqn/cos": step.cos, "preqn/shrink_steps": float(step.shrink_steps),
                                       "preqn/step_norm": step.step_norm, "preqn/accepted": float(step.accepted)},
                            y=y)
        return None  # no |TD error| for a prioritised buffer (supports_weights is False)
