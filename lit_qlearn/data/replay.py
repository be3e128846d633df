"""Replay storage of the online half (docs/design.md section 6): a preallocated tensor ring
buffer with n-step assembly at insertion, and its prioritised (sum-tree) variant."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lit_qlearn.data.types import Transitions

__all__ = ["ReplayBuffer", "PrioritizedReplayBuffer"]

ArrayLike = Tensor | np.ndarray | Sequence[Any]
# stored columns, in the order of the Transitions fields
COLUMNS = ("obs", "act", "rew", "next_obs", "terminated", "discount")


def _shape(shape: int | Sequence[int], name: str) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(isinstance(d, int) and d >= 1 for d in shape):
        raise ValueError(f"{name} must be a tuple of positive ints, got {shape!r}")
    return shape


def _positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class ReplayBuffer:
    """Uniform replay over a preallocated ring of tensors on ``device``.

    Each call to :meth:`add` is one step of ``num_envs`` vectorised environments. n-step
    returns are assembled at insertion: every environment keeps its last ``n_step``
    steps pending, and a row ``(s_t, a_t, R, s_{t+m}, terminated, gamma^m)`` with
    ``R = sum_{k<m} gamma^k r_{t+k}`` is written once ``m = n_step`` steps are available,
    or for every pending start when the episode ends (``m`` = the steps actually
    summed; a truncation bootstraps from the truncated step's ``next_obs``).

    Args:
        capacity: number of stored transitions; the oldest rows are overwritten first.
        obs_shape: shape of one observation, e.g. ``(17,)`` or ``(4, 84, 84)``.
        act_shape: shape of one action; ``()`` with ``act_dtype=torch.int64`` for discrete.
        obs_dtype: storage dtype of observations (``torch.uint8`` keeps images as bytes).
        act_dtype: storage dtype of actions.
        device: where the storage lives and batches are returned.
        num_envs: number of environments stepped together (leading axis ``E`` of ``add``).
        n_step: number of rewards summed into one transition.
        gamma: discount factor of the n-step return and of the ``discount`` column.
    """

    def __init__(
        self,
        capacity: int,
        obs_shape: int | Sequence[int],
        act_shape: int | Sequence[int] = (),
        *,
        obs_dtype: torch.dtype = torch.float32,
        act_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        num_envs: int = 1,
        n_step: int = 1,
        gamma: float = 0.99,
    ) -> None:
        self._capacity = _positive_int(capacity, "capacity")
        self.num_envs = _positive_int(num_envs, "num_envs")
        self.n_step = _positive_int(n_step, "n_step")
        if not 0.0 <= float(gamma) <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
        self.gamma = float(gamma)
        self.obs_shape = _shape(obs_shape, "obs_shape")
        self.act_shape = _shape(act_shape, "act_shape")
        self.device = torch.device(device)
        E, n, dev = self.num_envs, self.n_step, self.device

        def zeros(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=dev)

        C = self._capacity
        self._data: dict[str, Tensor] = {
            "obs": zeros(C, *self.obs_shape, dtype=obs_dtype),
            "act": zeros(C, *self.act_shape, dtype=act_dtype),
            "rew": zeros(C),
            "next_obs": zeros(C, *self.obs_shape, dtype=obs_dtype),
            "terminated": zeros(C),
            "discount": zeros(C),
        }
        # per-env circular queue of pending steps: entry j of env e sits at (head[e] + j) % n
        self._pending: dict[str, Tensor] = {
            "obs": zeros(E, n, *self.obs_shape, dtype=obs_dtype),
            "act": zeros(E, n, *self.act_shape, dtype=act_dtype),
            "rew": zeros(E, n),
            "head": zeros(E, dtype=torch.int64),
            "length": zeros(E, dtype=torch.int64),
        }
        self._pos = 0  # next slot to write
        self._size = 0  # filled slots
        k = torch.arange(n + 1, device=dev, dtype=torch.float32)
        self._gamma_pow = self.gamma**k  # (n+1,) gamma^m
        # returns_matrix[k, j] = gamma^(k-j) for k >= j, so R_j = sum_k r_k gamma^(k-j) = (r @ M)_j
        lag = k[:n, None] - k[None, :n]
        self._returns_matrix = torch.where(lag >= 0, self.gamma ** lag.clamp(min=0), 0.0)

    # ------------------------------------------------------------------ sizes

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self._size}, capacity={self._capacity}, obs_shape={self.obs_shape}, "
                f"act_shape={self.act_shape}, num_envs={self.num_envs}, n_step={self.n_step}, gamma={self.gamma})")

    # ------------------------------------------------------------------ insertion

    def _as_step(self, value: ArrayLike, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """``value`` as a tensor of ``(num_envs, *shape)`` on the buffer's device."""
        if isinstance(value, np.ndarray) and not value.flags.writeable:
            value = value.copy()  # torch warns on read-only numpy memory (e.g. np.broadcast_to)
        t = torch.as_tensor(value)
        expected = (self.num_envs, *shape)
        if tuple(t.shape) != expected:
            raise ValueError(f"add: {name} has shape {tuple(t.shape)}, expected {expected} (num_envs, *shape)")
        return t.to(device=self.device, dtype=dtype)

    def add(
        self,
        obs: ArrayLike,
        act: ArrayLike,
        rew: ArrayLike,
        next_obs: ArrayLike,
        terminated: ArrayLike,
        truncated: ArrayLike,
    ) -> None:
        """Record one vectorised step of all ``E = num_envs`` environments.

        Args:
            obs: ``(E, *obs_shape)`` observations the actions were taken in.
            act: ``(E, *act_shape)`` actions.
            rew: ``(E,)`` rewards.
            next_obs: ``(E, *obs_shape)`` true next observations (the final one where an
                episode ended, not gymnasium's autoreset observation).
            terminated: ``(E,)`` bool, the episode terminated (no bootstrap).
            truncated: ``(E,)`` bool, the episode was cut by a time limit (bootstrap).
        """
        obs_dtype, act_dtype = self._data["obs"].dtype, self._data["act"].dtype
        obs = self._as_step(obs, "obs", self.obs_shape, obs_dtype)
        act = self._as_step(act, "act", self.act_shape, act_dtype)
        rew = self._as_step(rew, "rew", (), torch.float32)
        next_obs = self._as_step(next_obs, "next_obs", self.obs_shape, obs_dtype)
        terminated = self._as_step(terminated, "terminated", (), torch.bool)
        truncated = self._as_step(truncated, "truncated", (), torch.bool)
        if self.n_step == 1:  # one-step TD: every step is a row as it comes, nothing pending
            self._write({"obs": obs, "act": act, "rew": rew, "next_obs": next_obs,
                         "terminated": terminated.float(), "discount": self._gamma_pow[1].expand(len(rew))})
            return

        p, n = self._pending, self.n_step
        envs = torch.arange(self.num_envs, device=self.device)
        tail = (p["head"] + p["length"]) % n
        p["obs"][envs, tail] = obs
        p["act"][envs, tail] = act
        p["rew"][envs, tail] = rew
        p["length"] += 1

        # pending entry j (0 = oldest start) of each env, in time order
        j = torch.arange(n, device=self.device)
        valid = j[None] < p["length"][:, None]  # (E, n)
        queue_slot = (p["head"][:, None] + j[None]) % n  # (E, n)
        ended = terminated | truncated
        full = p["length"] == n
        # an ended episode flushes every pending start; a full queue emits its oldest start
        emit = valid & (ended[:, None] | (full[:, None] & (j[None] == 0)))
        rew_in_order = torch.where(valid, p["rew"].gather(1, queue_slot), 0.0)
        returns = rew_in_order @ self._returns_matrix  # (E, n): R_j = sum_{k>=j} gamma^(k-j) r_k
        e_idx, j_idx = emit.nonzero(as_tuple=True)  # env-major, oldest start first
        steps = p["length"][e_idx] - j_idx  # m: rewards summed into each emitted row
        self._write({
            "obs": p["obs"][e_idx, queue_slot[e_idx, j_idx]],
            "act": p["act"][e_idx, queue_slot[e_idx, j_idx]],
            "rew": returns[e_idx, j_idx],
            # every emitted row ends at this step, so it bootstraps from this step's next_obs
            "next_obs": next_obs[e_idx],
            "terminated": terminated[e_idx].float(),
            "discount": self._gamma_pow[steps],
        })

        pop = full & ~ended
        p["head"] = torch.where(pop, (p["head"] + 1) % n, p["head"])
        p["length"] = torch.where(ended, 0, p["length"] - pop.long())

    def drop_pending(self) -> None:
        """Forget every environment's pending n-step steps (after the environments were
        reset outside :meth:`add`, so that no row joins two episodes)."""
        self._pending["head"].zero_()
        self._pending["length"].zero_()

    def _write(self, rows: dict[str, Tensor]) -> Tensor:
        """Write ``K`` rows at the ring position; returns the ``(K',)`` slots written
        (``K' = min(K, capacity)``: rows that would be overwritten within the call are dropped)."""
        k = len(rows["rew"])
        if k > self._capacity:
            rows = {name: t[k - self._capacity:] for name, t in rows.items()}
            k = self._capacity
        slots = (self._pos + torch.arange(k, device=self.device)) % self._capacity
        for name, t in rows.items():
            self._data[name].index_copy_(0, slots, t)
        self._pos = (self._pos + k) % self._capacity
        self._size = min(self._size + k, self._capacity)
        return slots

    # ------------------------------------------------------------------ sampling

    def _check_batch_size(self, batch_size: int) -> None:
        _positive_int(batch_size, "batch_size")
        if self._size == 0:
            raise ValueError(f"sample: the {type(self).__name__} is empty; add transitions before sampling")

    def gather(self, index: Tensor) -> Transitions:
        """The rows at ``index`` ``(B,)``: one ``index_select`` per stored column."""
        return Transitions(**{name: t.index_select(0, index) for name, t in self._data.items()}, index=index)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Transitions:
        """``batch_size`` transitions drawn uniformly (with replacement) over the filled slots.

        Returns ``Transitions`` with ``discount`` ``(B,)`` and ``index`` ``(B,)`` int64 set
        and ``weight`` None. ``generator`` may live on the CPU or on the buffer's device.
        """
        self._check_batch_size(batch_size)
        device = self.device if generator is None else generator.device
        index = torch.randint(self._size, (batch_size,), generator=generator, device=device)
        return self.gather(index.to(self.device))

    # ------------------------------------------------------------------ checkpointing

    def _config(self) -> dict[str, Any]:
        """What must agree between a state_dict and the buffer it is loaded into."""
        return {
            "capacity": self._capacity, "obs_shape": self.obs_shape, "act_shape": self.act_shape,
            "obs_dtype": str(self._data["obs"].dtype), "act_dtype": str(self._data["act"].dtype),
            "num_envs": self.num_envs, "n_step": self.n_step, "gamma": self.gamma,
        }

    def state_dict(self) -> dict[str, Any]:
        """The filled rows (copies of ``[:len(self)]``), the ring position and the pending
        n-step queues."""
        return {
            "config": self._config(),
            "data": {name: t[: self._size].clone() for name, t in self._data.items()},
            "pending": {name: t.clone() for name, t in self._pending.items()},
            "pos": self._pos,
            "size": self._size,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` of a buffer with the same configuration."""
        config, saved = self._config(), state_dict["config"]
        for key in [*config, *(k for k in saved if k not in config)]:
            value, here = saved.get(key), config.get(key)
            if here != (tuple(value) if isinstance(value, list) else value):
                raise ValueError(f"load_state_dict: {key} is {value!r} in the state_dict but {here!r} here")
        size = int(state_dict["size"])
        for name, t in state_dict["data"].items():
            self._data[name][:size] = t.to(self.device)
        for name, t in state_dict["pending"].items():
            self._pending[name] = t.to(self.device).clone()
        self._pos, self._size = int(state_dict["pos"]), size


class _SumMinTree:
    """Sum-tree and min-tree over ``L`` leaves (``L`` = capacity rounded up to a power of
    two), held as ``(2L,)`` float64 tensors: node ``i`` has children ``2i`` and ``2i + 1``,
    the root is node 1 and leaf ``s`` is node ``L + s``. Empty leaves are 0 in the
    sum-tree and +inf in the min-tree."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.depth = max(capacity - 1, 0).bit_length()  # log2(L)
        self.leaves = 1 << self.depth
        self.sum = torch.zeros(2 * self.leaves, dtype=torch.float64, device=device)
        self.min = torch.full((2 * self.leaves,), torch.inf, dtype=torch.float64, device=device)
        # row i of the (L, 2) views holds the children (2i, 2i + 1) of node i: one gather per level
        self._sum_children, self._min_children = self.sum.view(-1, 2), self.min.view(-1, 2)

    @property
    def total(self) -> Tensor:
        return self.sum[1]

    @property
    def smallest(self) -> Tensor:
        return self.min[1]

    def _recompute(self, nodes: Tensor) -> None:
        # duplicates in nodes write the same value, so the result does not depend on order
        self.sum.index_copy_(0, nodes, self._sum_children.index_select(0, nodes).sum(1))
        self.min.index_copy_(0, nodes, self._min_children.index_select(0, nodes).amin(1))

    def set(self, slots: Tensor, values: Tensor) -> None:
        """Set leaves ``slots`` ``(K,)`` to ``values`` ``(K,)`` (last write wins among
        duplicates), then recompute their ancestors one level at a time."""
        # a stable sort puts each slot's writes in call order; keep the last of each run
        sorted_slots, order = torch.sort(slots, stable=True)
        is_last = torch.ones_like(sorted_slots, dtype=torch.bool)
        is_last[:-1] = sorted_slots[1:] != sorted_slots[:-1]
        keep = order[is_last]
        nodes = slots[keep] + self.leaves
        values = values[keep].to(torch.float64)
        self.sum.index_copy_(0, nodes, values)
        self.min.index_copy_(0, nodes, values)
        for _ in range(self.depth):
            nodes = nodes // 2
            self._recompute(nodes)

    def rebuild(self) -> None:
        """Recompute every internal node from the leaves, deepest level first."""
        for level in reversed(range(self.depth)):
            self._recompute(torch.arange(1 << level, 2 << level, device=self.sum.device))

    def find(self, mass: Tensor) -> Tensor:
        """Leaf of each prefix ``mass`` ``(B,)`` in ``[0, total)``: the smallest ``s`` with
        ``sum(leaves[:s+1]) > mass``. One vectorised step per tree level."""
        node = torch.ones_like(mass, dtype=torch.int64)
        for _ in range(self.depth):
            children = self._sum_children.index_select(0, node)  # (B, 2)
            # never descend into an empty right subtree: guards against float rounding
            right = (mass >= children[:, 0]) & (children[:, 1] > 0)
            mass = torch.where(right, mass - children[:, 0], mass)
            node = 2 * node + right
        return node - self.leaves


class PrioritizedReplayBuffer(ReplayBuffer):
    """Proportional prioritised replay (Schaul et al. 2016) over :class:`ReplayBuffer`'s
    storage: slot ``i`` is drawn with probability ``P(i) = p_i / sum_j p_j`` where
    ``p_i = (|delta_i| + eps)^alpha``; new rows get the largest priority seen so far
    (1.0 at start).

    Args:
        capacity: number of stored transitions; the oldest rows are overwritten first.
        obs_shape: shape of one observation.
        act_shape: shape of one action; ``()`` with ``act_dtype=torch.int64`` for discrete.
        alpha: priority exponent (0 is uniform replay).
        eps: added to ``|delta|`` so that no transition gets probability 0.
        **kwargs: the keyword arguments of :class:`ReplayBuffer`.
    """

    def __init__(
        self,
        capacity: int,
        obs_shape: int | Sequence[int],
        act_shape: int | Sequence[int] = (),
        *,
        alpha: float = 0.6,
        eps: float = 1e-6,
        **kwargs: Any,
    ) -> None:
        if not float(alpha) >= 0.0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}")
        if not float(eps) > 0.0:
            # a zero priority would make the weights' normaliser (p_i / p_min)^(-beta) infinite
            raise ValueError(f"eps must be > 0, got {eps!r}")
        super().__init__(capacity, obs_shape, act_shape, **kwargs)
        self.alpha, self.eps = float(alpha), float(eps)
        self._tree = _SumMinTree(self.capacity, self.device)
        # a tensor, not a float, so that update_priorities needs no device sync for it
        self._max_priority = torch.ones((), dtype=torch.float64, device=self.device)

    def _write(self, rows: dict[str, Tensor]) -> Tensor:
        slots = super()._write(rows)
        self._tree.set(slots, self._max_priority.expand(len(slots)))
        return slots

    def sample(  # type: ignore[override]
        self, batch_size: int, beta: float, generator: torch.Generator | None = None
    ) -> Transitions:
        """``batch_size`` transitions by stratified proportional sampling: one uniform draw
        in each of ``batch_size`` equal segments of the total priority mass.

        Returns ``Transitions`` with ``weight`` ``(B,)`` float32, the importance weight
        ``(N P(i))^(-beta) / max_j (N P(j))^(-beta) = (p_i / p_min)^(-beta)`` (N = ``len(self)``),
        and ``index`` ``(B,)``; ``beta`` (usually annealed to 1) is the caller's schedule.
        """
        self._check_batch_size(batch_size)
        try:
            exponent = float(beta)
        except (TypeError, ValueError):
            exponent = float("nan")
        if not exponent >= 0.0:
            raise ValueError(f"beta must be a float >= 0 (the importance-sampling exponent), got {beta!r}")
        device = self.device if generator is None else generator.device
        u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64).to(self.device)
        total = self._tree.total
        segment = torch.arange(batch_size, device=self.device, dtype=torch.float64)
        index = self._tree.find((segment + u) * (total / batch_size))
        priority = self._tree.sum[index + self._tree.leaves]
        # N and total cancel between (N P(i))^(-beta) and its maximum (N p_min / total)^(-beta)
        weight = (priority / self._tree.smallest) ** (-exponent)
        return self.gather(index)._replace(weight=weight.float())

    def update_priorities(self, index: ArrayLike, td_abs: ArrayLike) -> None:
        """Set the priorities of slots ``index`` ``(B,)`` to ``(|td_abs| + eps)^alpha``
        (``td_abs`` ``(B,)``, e.g. the per-sample |TD error| of the last update)."""
        index = torch.as_tensor(index, device=self.device).long()
        td_abs = torch.as_tensor(td_abs).detach().to(device=self.device, dtype=torch.float64)
        if index.ndim != 1 or td_abs.shape != index.shape:
            raise ValueError(
                f"update_priorities: index and td_abs must both have shape (B,), got {tuple(index.shape)} "
                f"and {tuple(td_abs.shape)}"
            )
        bad_index = (index < 0) | (index >= self._size)
        bad_td = ~torch.isfinite(td_abs)
        if bool(bad_index.any() | bad_td.any()):  # one device sync for both checks
            if bad_index.any():
                raise ValueError(
                    f"update_priorities: index must lie in [0, {self._size}), got {index[bad_index][:5].tolist()}"
                )
            raise ValueError(f"update_priorities: td_abs must be finite, got {td_abs[bad_td][:5].tolist()}")
        priority = (td_abs.abs() + self.eps) ** self.alpha
        if len(priority):
            self._max_priority = torch.maximum(self._max_priority, priority.max())
        self._tree.set(index, priority)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "alpha": self.alpha, "eps": self.eps}

    def state_dict(self) -> dict[str, Any]:
        """:meth:`ReplayBuffer.state_dict` plus the tree's filled leaves and the max priority."""
        leaves = self._tree.sum[self._tree.leaves: self._tree.leaves + len(self)]
        return {**super().state_dict(), "priorities": leaves.clone(), "max_priority": self._max_priority.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._tree = _SumMinTree(self.capacity, self.device)
        priorities = state_dict["priorities"].to(self.device)
        leaves = slice(self._tree.leaves, self._tree.leaves + len(priorities))
        self._tree.sum[leaves] = priorities
        self._tree.min[leaves] = priorities
        self._tree.rebuild()  # parents are a function of the leaves, so sampling is restored exactly
        self._max_priority = state_dict["max_priority"].to(self.device).clone()
