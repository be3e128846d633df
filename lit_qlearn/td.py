"""The one TD target and the one TD loss, shared by every algorithm and the probe protocol."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_qlearn.data.types import Transitions

__all__ = ["td_target", "td_loss", "TDLoss", "TD_LOSSES", "check_gamma"]

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
