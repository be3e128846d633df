"""Batch types shared by data modules and algorithms."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor


class Transitions(NamedTuple):
    """A batch of transitions ``(s, a, r, s', terminated)`` with optional per-sample fields.

    ``terminated`` is 1.0 where the environment *terminated* after the step (the
    bootstrap is cut); time-limit truncations are not terminals.

    Optional fields (``None`` when absent):

    * ``discount`` ``(B,)``: the bootstrap discount of each sample, ``gamma^k`` for
      an n-step return over k steps; absent means the algorithm's ``gamma``.
    * ``weight`` ``(B,)``: importance-sampling weights (prioritised replay) that
      scale each sample's TD loss.
    * ``index`` ``(B,)`` int64: the buffer slots the samples came from, so that
      their priorities can be updated after the step.
    * ``target`` ``(B,)``: a regression target computed over the whole rollout the samples
      came from (PQN's Q(lambda) return, :func:`lit_qlearn.td.lambda_returns`), which no
      single transition can give.
    """

    obs: Tensor  # (B, *obs_shape) float32 (uint8 for images)
    act: Tensor  # (B, da) float32, or (B,) int64 for discrete actions
    rew: Tensor  # (B,) float32
    next_obs: Tensor  # (B, *obs_shape)
    terminated: Tensor  # (B,) float32
    discount: Tensor | None = None  # (B,) float32
    weight: Tensor | None = None  # (B,) float32
    index: Tensor | None = None  # (B,) int64
    target: Tensor | None = None  # (B,) float32

    def map(self, fn: Callable[[Tensor], Tensor]) -> Transitions:
        """Apply ``fn`` to every present field (``None`` fields stay ``None``)."""
        return Transitions(*(None if t is None else fn(t) for t in self))

    @staticmethod
    def cat(batches: list[Transitions]) -> Transitions:
        """Concatenate batches along the sample axis (a field present in all of them)."""
        return Transitions(*(None if any(t is None for t in col) else torch.cat(col) for col in zip(*batches)))


@dataclass(frozen=True)
class DataSpec:
    """What a DataModule tells an algorithm about its data (read by ``QLearningModule.setup``).

    Exactly one of ``num_actions`` (discrete actions ``0 .. n-1``) and
    ``action_low`` / ``action_high`` (a continuous box) is set. ``obs_mean`` /
    ``obs_std`` are the state normalisation the data was served with (the policy
    applies it to raw environment states); ``None`` means none.
    """

    obs_shape: tuple[int, ...]
    num_actions: int | None = None
    action_low: tuple[float, ...] | None = None
    action_high: tuple[float, ...] | None = None
    obs_dtype: str = "float32"
    obs_mean: tuple[float, ...] | None = field(default=None, compare=False)
    obs_std: tuple[float, ...] | None = field(default=None, compare=False)
    env_id: str | None = field(default=None, compare=False)
    env_wrapper: str | None = field(default=None, compare=False)  # see lit_qlearn.data.rollout.make_env
    ref_scores: tuple[float, float] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if (self.num_actions is None) == (self.action_low is None or self.action_high is None):
            raise ValueError(
                "DataSpec: give either num_actions (discrete) or action_low and action_high (continuous), "
                f"got num_actions={self.num_actions}, action_low={self.action_low}, action_high={self.action_high}"
            )

    @property
    def discrete(self) -> bool:
        return self.num_actions is not None

    @property
    def obs_dim(self) -> int:
        """Flat observation size (the product of ``obs_shape``)."""
        return int(math.prod(self.obs_shape))

    @property
    def action_dim(self) -> int:
        """Continuous: the box's dimension; discrete: the number of actions."""
        return int(self.num_actions) if self.discrete else len(self.action_low)

    def describe_actions(self) -> str:
        """gymnasium-style name of the action space, for messages: ``Discrete(2)``, ``Box(-1.0, 1.0, (3,))``."""
        if self.discrete:
            return f"Discrete({self.num_actions})"
        lo, hi = set(self.action_low), set(self.action_high)
        bounds = f"{lo.pop()}, {hi.pop()}" if len(lo) == len(hi) == 1 else f"{list(self.action_low)}, {list(self.action_high)}"
        return f"Box({bounds}, ({self.action_dim},))"

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types, so checkpoints load with ``torch.load(weights_only=True)``."""
        return {f.name: (list(v) if isinstance(v, tuple) else v) for f in fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> DataSpec:
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in state.items()})

    @classmethod
    def continuous(cls, obs_dim: int, act_dim: int, low: Any = -1.0, high: Any = 1.0, **kwargs: Any) -> DataSpec:
        """Vector observations ``(obs_dim,)`` and a box of ``act_dim`` actions (bounds broadcast)."""
        low = np.broadcast_to(np.asarray(low, dtype=np.float32), (act_dim,))
        high = np.broadcast_to(np.asarray(high, dtype=np.float32), (act_dim,))
        return cls((int(obs_dim),), action_low=tuple(map(float, low)), action_high=tuple(map(float, high)), **kwargs)


def data_spec(datamodule: Any) -> DataSpec:
    """The :class:`DataSpec` of a DataModule: its ``spec`` attribute, else one built from
    the attributes ``observation_dim``, ``action_dim``, ``discrete``, ``action_low``,
    ``action_high`` (and optionally ``obs_mean``, ``obs_std``, ``env_id``, ``ref_scores``)."""
    spec = getattr(datamodule, "spec", None)
    if isinstance(spec, DataSpec):
        return spec
    name = type(datamodule).__name__
    dims = {k: getattr(datamodule, k, None) for k in ("observation_dim", "action_dim")}
    if any(v is None for v in dims.values()):
        raise ValueError(f"{name} must provide a DataSpec as .spec, or observation_dim and action_dim; got {dims}")
    extra = {}
    for key in ("obs_mean", "obs_std"):
        value = getattr(datamodule, key, None)
        extra[key] = None if value is None else tuple(map(float, np.ravel(value)))
    extra["env_id"] = getattr(datamodule, "env_id", None)
    ref = getattr(datamodule, "ref_scores", None)
    extra["ref_scores"] = None if ref is None else tuple(map(float, ref))
    if getattr(datamodule, "discrete", False):
        return DataSpec((int(dims["observation_dim"]),), num_actions=int(dims["action_dim"]), **extra)
    low, high = getattr(datamodule, "action_low", None), getattr(datamodule, "action_high", None)
    if low is None or high is None:
        raise ValueError(f"{name}: continuous actions need action_low and action_high, got {low} and {high}")
    return DataSpec.continuous(dims["observation_dim"], dims["action_dim"], low, high, **extra)
