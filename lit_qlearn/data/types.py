"""Batch types shared by data modules and algorithms."""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Transitions(NamedTuple):
    """A batch of transitions ``(s, a, r, s', done)``.

    ``done`` is 1.0 where the environment *terminated* after the step (the
    bootstrap is cut); time-limit truncations are not terminals.
    """

    obs: Tensor  # (B, ds) float32
    act: Tensor  # (B, da) float32 (or (B,) int64 for discrete actions)
    rew: Tensor  # (B,) float32
    next_obs: Tensor  # (B, ds) float32
    done: Tensor  # (B,) float32

