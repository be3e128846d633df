"""The one TD target and the one TD loss, shared by every algorithm and the probe protocol."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_qlearn.data.types import Transitions

__all__ = ["td_target", "lambda_returns", "td_loss", "TDLoss", "TD_LOSSES", "check_gamma"]

TD_LOSSES = ("mse", "huber")


def check_gamma(who: str, gamma: object) -> float:
    """``gamma`` as a float, or a ValueError naming ``who`` unless it is a number in [0, 1)."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma < 1.0:
        raise ValueError(f"{who}: gamma must be a number in [0, 1), got {type(gamma).__name__} {gamma!r}")
    return float(gamma)


def td_target(batch: Transitions, next_value: Tensor, gamma: float) -> Tensor:
    """``y = r + discount * (1 - terminated) * V(s')``, shape ``(B,)``.

    ``discount`` is the batch's per-sample ``gamma^k`` (n-step returns) when present,
    else ``gamma``. ``next_value`` is the algorithm's ``V(s')`` ``(B,)``: max or
    double-Q for DQN, the min of target critics at ``mu'(s')`` for TD3, ``V_psi(s')``
    for IQL. Truncated transitions are not terminated, so they bootstrap.
    """
    discount = gamma if batch.discount is None else batch.discount
    return batch.rew + discount * (1.0 - batch.terminated) * next_value


def lambda_returns(rew: Tensor, next_value: Tensor, terminated: Tensor, truncated: Tensor, gamma: float,
                   lam: float) -> Tensor:
    """Q(lambda) returns over a rollout of T steps of E environments, all ``(T, E)``, computed backwards:

        G_t = r_t + gamma (1 - terminated_t) [V_t + lam c_t (G_{t+1} - V_t)],

    with ``V_t = next_value[t]`` the bootstrap value of the step's own next state (PQN:
    ``max_a Q(s'_t, a)``) and ``c_t = 0`` where the episode ended at step t (terminated or
    truncated) or t is the rollout's last step, else 1. So ``lam = 0`` gives :func:`td_target`'s
    one-step target, ``lam = 1`` the discounted return bootstrapped at the rollout's end; the
    trace never crosses into the next episode; a truncated step bootstraps from its final state
    (``V_t``) and a terminated one from nothing. PQN's target (Gallici et al. 2025, and their
    purejaxql code), with truncations kept apart from terminations (docs/design.md section 5.7).
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda_returns: lam must be in [0, 1], got {lam!r}")
    if not rew.shape == next_value.shape == terminated.shape == truncated.shape or rew.dim() != 2:
        raise ValueError("lambda_returns: rew, next_value, terminated and truncated must share one (T, E) shape, got "
                         f"{tuple(rew.shape)}, {tuple(next_value.shape)}, {tuple(terminated.shape)}, "
                         f"{tuple(truncated.shape)}")
    terminated, truncated = terminated.to(rew.dtype), truncated.to(rew.dtype)
    trace = 1.0 - torch.maximum(terminated, truncated)  # c_t: the trace goes on into step t + 1
    trace[-1] = 0.0  # the rollout's last step bootstraps
    # G_t = offset_t + slope_t G_{t+1}: all but the recursion computed for every t at once
    bootstrap = gamma * (1.0 - terminated)
    slope = bootstrap * lam * trace
    offset = rew + bootstrap * next_value * (1.0 - lam * trace)
    returns = torch.empty_like(rew)
    returns[-1] = offset[-1]
    for t in range(rew.shape[0] - 2, -1, -1):
        torch.addcmul(offset[t], slope[t], returns[t + 1], out=returns[t])
    return returns


class TDLoss(NamedTuple):
    loss: Tensor  # scalar: sum over critic members of the (weighted) batch mean
    td_abs: Tensor  # (B,) |y - Q| (mean over members), detached: new priorities for prioritised replay


def td_loss(q: Tensor, y: Tensor, weight: Tensor | None = None, kind: str = "mse") -> TDLoss:
    """Weighted TD loss of ``q`` ``(B,)`` or ``(E, B)`` (E critic members) against ``y`` ``(B,)``.

    ``kind="mse"``: ``(q - y)^2``; ``"huber"``: smooth L1 with threshold 1 (DQN's).
    Each member's loss is the mean over the batch of ``weight_i * l(q_i - y_i)``
    (importance weights from prioritised replay; 1 when ``weight`` is None), and the
    members' losses are summed, so twin critics get independent gradients.
    """
    y = y.detach()
    if kind == "mse":
        per_sample = (q - y).pow(2)
    elif kind == "huber":
        per_sample = F.smooth_l1_loss(q, y.expand_as(q), reduction="none", beta=1.0)
    else:
        raise ValueError(f"td_loss: kind must be one of {TD_LOSSES}, got {kind!r}")
    if weight is not None:
        per_sample = per_sample * weight
    loss = per_sample.mean(dim=-1).sum()
    with torch.no_grad():
        td_abs = (q - y).abs()
        if td_abs.dim() > 1:
            td_abs = td_abs.mean(dim=0)
    return TDLoss(loss, td_abs)
