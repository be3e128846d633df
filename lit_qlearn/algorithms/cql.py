"""CQL (Kumar et al. 2020): SAC whose critic loss carries the conservative CQL(H) regulariser."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lit_qlearn.algorithms.actor_critic import CriticLoss
from lit_qlearn.algorithms.sac import SAC
from lit_qlearn.data.types import Transitions
from lit_qlearn.td import td_loss

__all__ = ["CQL"]

#: Upper clamp of the Lagrange multiplier alpha' (CORL's).
MAX_LAGRANGE = 1e6


class CQL(SAC):
    """Conservative Q-learning, CQL(H) with importance sampling, on top of :class:`SAC`.

    Each critic ``i`` minimises SAC's TD loss plus ``w * gap_i`` (:meth:`cql_penalty`)::

        gap_i = E_s[ T log sum_j exp((Q_i(s, a_j) - log mu(a_j)) / T) - Q_i(s, a_data) ]

    where the ``a_j`` are ``num_samples`` actions uniform in the action box (density
    ``mu = prod 1 / (high - low)``, i.e. ``0.5^|A|`` on [-1, 1]^|A|), ``num_samples`` from
    ``pi(.|s)`` and ``num_samples`` from ``pi(.|s')`` (their ``mu`` is the policy's density,
    and all of them are evaluated at ``s``: the authors' and CORL's choice), and ``T`` is
    ``cql_temp``. The sum over the 3N importance-weighted terms estimates
    ``log integral exp Q(s, a) da``, so the penalty pushes Q down where the Boltzmann
    distribution of Q puts more mass than the data, and up on the data's actions. For a
    Q constant in the action the gap does not depend on its level (the logsumexp and
    ``Q(s, a_data)`` move together), so on data whose actions are uniform in the box the
    penalty leaves the level of the TD fixed point in place and only reshapes Q across
    actions (tests/algorithms/test_cql.py measures this, and the push-down off the
    data). The weight ``w`` is ``cql_alpha``, or with ``lagrange=True`` (CQL's Lagrange
    version) ``alpha' * cql_alpha``, where ``log alpha'`` (starting at 1.0, as in CORL)
    has its own optimiser ``"cql_alpha"`` minimising
    ``-alpha' cql_alpha (mean_i gap_i - target_action_gap)`` (:meth:`lagrange_loss`), so
    alpha' grows while the gap exceeds ``target_action_gap`` and shrinks below it.

    The bootstrap is ``min_i Q'_i(s', a')``, ``a' ~ pi(s')``, without SAC's entropy term
    (CORL's ``backup_entropy=False``); with ``backup_entropy=True`` and ``cql_alpha=0`` (no
    Lagrange) the update is SAC's, step for step. The actor, temperature, targets and
    the probe protocol are SAC's: ``greedy_action`` is ``tanh(mean)``.

    Defaults are CORL's ``algorithms/offline/cql.py`` D4RL configuration: ``cql_alpha``
    10, 10 sampled actions, temperature 1, no Lagrange (action gap -1), no entropy
    backup, Adam 3e-5 for the actor and the temperature (CORL's ``policy_lr``), 3e-4 for
    the critics and alpha', Polyak 5e-3 every update, three hidden layers of 256 in the
    critics and the actor, gamma 0.99, initial temperature 1. Not taken from CORL:
    orthogonal initialisation (the networks are :func:`~lit_qlearn.networks.mlp`'s, with
    PyTorch's default initialisation), the max-target backup and the clipping of the
    gap (both off in CORL's configuration), behaviour-cloning warm-up steps (0 in
    CORL's locomotion configuration) and CORL's policy parametrisation (SAC's
    tanh-squashed log-std in [-5, 2] instead of a clamp to [-20, 2]). The other
    arguments are :class:`SAC`'s and :class:`~lit_qlearn.algorithms.ActorCritic`'s.

    Args:
        num_samples: actions drawn per state from each of the three proposals (uniform, pi(.|s), pi(.|s')).
        cql_alpha: weight of the regulariser (with ``lagrange``, the multiplier alpha' scales it further).
        cql_temp: temperature T of the logsumexp.
        lagrange: learn the multiplier alpha' towards ``target_action_gap`` (CQL's Lagrange version).
        target_action_gap: the gap alpha' aims at when ``lagrange`` is set.
        cql_alpha_lr: Adam learning rate of log alpha' (optimiser ``"cql_alpha"``).
        backup_entropy: subtract ``alpha log pi(a'|s')`` in the bootstrap, as SAC does.
        actor_lr: actor Adam learning rate.
        alpha_lr: Adam learning rate of SAC's log temperature.
        critic_hidden: hidden widths of each critic.
        actor_hidden: hidden widths of the actor.
    """

    def __init__(self, *args: Any, num_samples: int = 10, cql_alpha: float = 10.0, cql_temp: float = 1.0,
                 lagrange: bool = False, target_action_gap: float = -1.0, cql_alpha_lr: float = 3e-4,
                 backup_entropy: bool = False, actor_lr: float = 3e-5, alpha_lr: float = 3e-5,
                 critic_hidden: Sequence[int] = (256, 256, 256), actor_hidden: Sequence[int] = (256, 256, 256),
                 **kwargs: Any) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"CQL: num_samples must be an integer >= 1, got {num_samples!r}")
        if not _is_number(cql_alpha) or cql_alpha < 0:
            raise ValueError(f"CQL: cql_alpha must be a number >= 0, got {cql_alpha!r}")
        for name, value in (("cql_temp", cql_temp), ("cql_alpha_lr", cql_alpha_lr)):
            if not _is_number(value) or not value > 0:
                raise ValueError(f"CQL: {name} must be a number > 0, got {value!r}")
        if not _is_number(target_action_gap):
            raise ValueError(f"CQL: target_action_gap must be a number, got {target_action_gap!r}")
        super().__init__(*args, actor_lr=actor_lr, alpha_lr=alpha_lr, critic_hidden=critic_hidden,
                         actor_hidden=actor_hidden, **kwargs)
        self.num_samples, self.cql_alpha, self.cql_temp = num_samples, float(cql_alpha), float(cql_temp)
        self.lagrange, self.target_action_gap = bool(lagrange), float(target_action_gap)
        self.cql_alpha_lr, self.backup_entropy = cql_alpha_lr, bool(backup_entropy)
        self.log_cql_alpha = nn.Parameter(torch.tensor(1.0), requires_grad=self.lagrange)

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        optimizers = super().build_optimizers()
        if self.lagrange:
            optimizers["cql_alpha"] = self.adam([self.log_cql_alpha], lr=self.cql_alpha_lr)
        return optimizers

    # --------------------------------------------------------------- the update
    def next_value(self, batch: Transitions) -> Tensor:
        """``min_i Q'_i(s', a')``, ``a' ~ pi(s')``, shape ``(B,)``; SAC's soft value with ``backup_entropy``."""
        if self.backup_entropy:
            return super().next_value(batch)
        next_act, _ = self.actor.sample(batch.next_obs)
        return self.critic_target(batch.next_obs, next_act).min(dim=0).values

    def cql_actions(self, batch: Transitions) -> tuple[Tensor, Tensor]:
        """The actions the regulariser's logsumexp runs over at each state and their
        log-densities, no gradient: ``num_samples`` uniform in the action box, then as many
        from ``pi(.|s)`` and from ``pi(.|s')``; shapes ``(B, 3N, da)`` and ``(B, 3N)``."""
        actor, n = self.actor, self.num_samples
        b, da = batch.act.shape
        with torch.no_grad():
            width = actor.action_high - actor.action_low
            uniform = actor.action_low + width * torch.rand(b, n, da, device=width.device)
            log_uniform = (-torch.log(width).sum()).expand(b, n)
            pi, logp = actor.sample(torch.cat([batch.obs, batch.next_obs]).repeat_interleave(n, dim=0))
            # rows: every s repeated n times, then every s'; to (B, 2N): pi(.|s_b) first, pi(.|s'_b) after
            pi = pi.view(2, b, n, da).transpose(0, 1).reshape(b, 2 * n, da)
            logp = logp.view(2, b, n).transpose(0, 1).reshape(b, 2 * n)
        return torch.cat([uniform, pi], dim=1), torch.cat([log_uniform, logp], dim=1)

    def cql_penalty(self, batch: Transitions, q_data: Tensor | None = None, actions: Tensor | None = None,
                    log_density: Tensor | None = None) -> Tensor:
        """The CQL(H) gap of every critic, ``(num_q,)``, before its weight:
        ``mean_b [T logsumexp_j((Q_i(s_b, a_bj) - log mu(a_bj)) / T) - Q_i(s_b, a_b)]``
        (weighted by ``batch.weight`` when present). ``q_data`` ``(num_q, B)`` is
        ``critic(s, a_data)`` if already computed; ``actions`` / ``log_density`` default to
        :meth:`cql_actions`'s draw."""
        if actions is None:
            actions, log_density = self.cql_actions(batch)
        if q_data is None:
            q_data = self.critic(batch.obs, batch.act)
        b, m, da = actions.shape
        q = self.critic(batch.obs.repeat_interleave(m, dim=0), actions.reshape(b * m, da)).view(-1, b, m)
        soft_max = self.cql_temp * torch.logsumexp((q - log_density) / self.cql_temp, dim=-1)  # (num_q, B)
        gap = soft_max - q_data
        if batch.weight is not None:
            gap = gap * batch.weight
        return gap.mean(dim=-1)

    @property
    def cql_weight(self) -> Tensor:
        """The regulariser's weight ``w``: ``cql_alpha``, times alpha' with ``lagrange`` (no gradient)."""
        if not self.lagrange:
            return torch.tensor(self.cql_alpha, device=self.log_cql_alpha.device)
        return self.cql_alpha * self.log_cql_alpha.detach().exp().clamp(max=MAX_LAGRANGE)

    def lagrange_loss(self, gap: Tensor) -> Tensor:
        """``-alpha' cql_alpha (mean_i gap_i - target_action_gap)`` for the critics' gaps
        ``(num_q,)`` or their mean ``()`` (detached): its gradient in log alpha' is minus
        that product, so descent raises alpha' while the gap exceeds the target and lowers
        it below."""
        alpha_prime = self.log_cql_alpha.exp().clamp(max=MAX_LAGRANGE)
        return -alpha_prime * self.cql_alpha * (gap.detach().mean() - self.target_action_gap)

    def critic_loss(self, batch: Transitions, y: Tensor) -> CriticLoss:
        """SAC's TD loss plus ``w * sum_i gap_i``; logs ``train/cql_gap`` (the members' mean
        gap, which alpha' reads in :meth:`extra_losses`) and ``train/cql_weight``. Without a
        penalty (``cql_alpha=0``, no Lagrange) it is SAC's, and draws no proposals."""
        if self.cql_alpha == 0 and not self.lagrange:
            return super().critic_loss(batch, y)
        q = self.critic(batch.obs, batch.act)
        td = td_loss(q, y, batch.weight)
        gap = self.cql_penalty(batch, q)
        weight = self.cql_weight
        scalars = {"train/critic_loss": td.loss.detach(), "train/cql_gap": gap.detach().mean(),
                   "train/cql_weight": weight}
        return CriticLoss(td.loss + weight * gap.sum(), q.detach(), td.td_abs, scalars)

    def extra_losses(self, critic: CriticLoss, logp: Tensor) -> dict[str, Tensor]:
        """SAC's, and with ``lagrange`` the multiplier's :meth:`lagrange_loss` on this update's gap."""
        losses = super().extra_losses(critic, logp)
        if self.lagrange:
            losses["cql_alpha"] = self.lagrange_loss(critic.scalars["train/cql_gap"])
        return losses


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
