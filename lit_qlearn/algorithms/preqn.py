"""PreQN (Achiam, Knight & Abbeel 2019): a DDPG-style actor-critic without target
networks whose critic takes NTK-preconditioned steps (DESIGN.md 5.5)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lit_qlearn.algorithms.td3 import TD3
from lit_qlearn.data.types import Transitions
from lit_qlearn.ntk import METHODS, check_choice, check_preconditioner_args, preconditioned_step

__all__ = ["PreQN"]

# What makes TD3 DDPG-style: one critic, no target smoothing, an actor step per update.
_FIXED = {"num_q": 1, "policy_noise": 0.0, "policy_freq": 1}


class PreQN(TD3):
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

    Defaults (no official values exist; chosen here and documented):
    ``critic_activation="sin"`` (the paper's choice: the lowest NTK row ratio, so
    the most diagonal kernel), ``preqn_lr=0.1`` (a tabular step size),
    ``cos_threshold=0.9``, ``shrink=0.5``, ``max_shrinks=20`` (smallest step
    ``preqn_lr * 2^-20``; when even that misses the criterion it is kept, and
    ``preqn/accepted`` is 0), ``rcond=1e-6`` (eigenvalues of K below ``rcond``
    times the largest count as zero in ``K^+``: the only regularisation, see
    :func:`~lit_qlearn.ntk.preconditioned_step`).

    Logs ``preqn/cos``, ``preqn/shrink_steps``, ``preqn/step_norm`` and
    ``preqn/accepted`` besides TD3's scalars. Under DDP the ranks' minibatches are
    gathered, so every rank takes the identical critic step on the union batch.

    Works offline (:class:`~lit_qlearn.data.OfflineDataModule`) and with any
    DataModule serving :class:`~lit_qlearn.data.Transitions` batches.

    Args:
        preqn_lr / cos_threshold / shrink / max_shrinks / rcond: the critic step, see above.
        ntk_method: NTK engine, see :func:`lit_qlearn.ntk.ntk_gram`.
        critic_activation / critic_hidden / actor_*: as :class:`TD3`; the other
            :class:`TD3` arguments pass through, except ``num_q``, ``policy_noise``
            and ``policy_freq``, which PreQN fixes to 1, 0 and 1.
    """

    def __init__(self, obs_dim: int | None = None, act_dim: int | None = None, *,
                 critic_activation: str = "sin", critic_hidden: Sequence[int] = (256, 256),
                 preqn_lr: float = 0.1, cos_threshold: float = 0.9, shrink: float = 0.5, max_shrinks: int = 20,
                 rcond: float = 1e-6, ntk_method: str = "auto", **kwargs: Any) -> None:
        for name, value in _FIXED.items():
            if kwargs.get(name, value) != value:
                raise ValueError(f"PreQN: {name} is fixed to {value} (DDPG-style actor-critic), got {kwargs[name]!r}")
        kwargs.update(_FIXED)
        check_choice("PreQN", "ntk_method", ntk_method, METHODS)
        check_preconditioner_args("PreQN", lr=preqn_lr, cos_threshold=cos_threshold, shrink=shrink,
                                  max_shrinks=max_shrinks, rcond=rcond, lr_name="preqn_lr")
        super().__init__(obs_dim, act_dim, critic_activation=critic_activation, critic_hidden=critic_hidden, **kwargs)

    def _add_targets(self) -> None:
        """No target networks: the TD target uses the current critic and actor."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The critic has no optimiser; the actor's step is the one Lightning counts.
        return self.adam(self.actor.parameters(), lr=self.hparams.actor_lr)

    def td_target(self, batch: Transitions) -> Tensor:
        """``y = r + gamma (1 - done) Q(s', mu(s'))`` from the current networks, shape ``(B,)``."""
        with torch.no_grad():
            next_q = self.q_value(batch.next_obs, self.actor(batch.next_obs))
        return batch.rew + self.gamma * (1.0 - batch.done) * next_q

    def training_step(self, batch: Transitions, batch_idx: int) -> None:
        self.updates += 1
        hp = self.hparams
        y = self.td_target(batch)
        obs, act = batch.obs, batch.act
        if self.trainer.world_size > 1:  # one step on the union batch, identical on every rank
            obs, act, y = (self.trainer.strategy.all_gather(t).flatten(0, 1) for t in (obs, act, y))
        with torch.no_grad():
            q = self.q_value(obs, act)
        step = preconditioned_step(self.q_network(), (obs, act), y - q, lr=hp.preqn_lr,
                                   cos_threshold=hp.cos_threshold, shrink=hp.shrink, max_shrinks=hp.max_shrinks,
                                   rcond=hp.rcond, method=hp.ntk_method)
        self.actor_update(batch, self.optimizers(), count_step=True)
        if self.logging_now():
            extra = {"preqn/cos": step.cos, "preqn/shrink_steps": float(step.shrink_steps),
                     "preqn/step_norm": step.step_norm, "preqn/accepted": float(step.accepted)}
            self.log_update(batch, (q - y).pow(2).mean(), q, extra)
