"""The one target-network update mechanism.

A module declares its ``(online, target)`` pairs with ``target_pairs()``. A
:class:`TargetUpdate` rule moves every target toward its online network:

* Polyak averaging: ``target <- (1 - tau) * target + tau * online`` every ``every`` updates;
* a hard copy every k updates: ``tau = 1, every = k``;
* target = current network (the paper's "no EMA" setting): ``tau = 1, every = 1``.

Algorithms own a default rule (their hyperparameters); the
:class:`~lit_qlearn.callbacks.EMATarget` callback replaces it when attached.
"""
from __future__ import annotations

import copy
import weakref
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["TargetUpdate", "make_target"]

TargetPairs = Iterable[tuple[nn.Module, nn.Module]]


def make_target(online: nn.Module) -> nn.Module:
    """A frozen copy of ``online``: no gradients, so optimisers and DDP ignore it."""
    target = copy.deepcopy(online)
    target.requires_grad_(False)
    return target


class TargetUpdate:
    """Update rule ``target <- (1 - tau) * target + tau * online`` applied every ``every`` updates."""

    def __init__(self, tau: float = 0.005, every: int = 1) -> None:
        if not isinstance(tau, (int, float)) or not 0.0 < float(tau) <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {tau!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.tau = float(tau)
        self.every = every
        # online module -> (target, its tensor lists); weak, so a freed network's entry
        # goes with it and a new network can never be served stale lists.
        self._cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tau={self.tau}, every={self.every})"

    def due(self, update_index: int) -> bool:
        """Whether the rule fires after update number ``update_index`` (1-based)."""
        return update_index % self.every == 0

    def _tensors(self, online: nn.Module, target: nn.Module) -> tuple[list, list, list, list]:
        # Listing parameters walks the module tree (a cost paid on every update), so the
        # lists are kept per pair. Parameters keep their identity under load_state_dict,
        # .to() and torch.compile; a module whose parameters are replaced (e.g. a
        # parametrisation added later) needs clear_cache().
        cached = self._cache.get(online)
        if cached is None or cached[0] is not target:
            src = [p.detach() for p in online.parameters()]
            dst = list(target.parameters())
            if len(src) != len(dst):
                raise ValueError(
                    f"target_pairs(): online {type(online).__name__} has {len(src)} parameters, "
                    f"its target has {len(dst)}"
                )
            cached = self._cache[online] = (target, src, dst, list(online.buffers()), list(target.buffers()))
        return cached[1:]

    def clear_cache(self) -> None:
        """Forget the cached parameter lists (after replacing a network's parameters)."""
        self._cache.clear()

    @torch.no_grad()
    def apply(self, pairs: TargetPairs) -> None:
        """Move every target toward its online network once (unconditionally)."""
        for online, target in pairs:
            src, dst, buf_src, buf_dst = self._tensors(online, target)
            if self.tau == 1.0:
                torch._foreach_copy_(dst, src)
            else:
                # (1 - tau) * target + tau * online, in that order of rounding.
                torch._foreach_mul_(dst, 1.0 - self.tau)
                torch._foreach_add_(dst, src, alpha=self.tau)
            if buf_dst:  # BatchNorm statistics follow the online network exactly
                torch._foreach_copy_(buf_dst, buf_src)

    def step(self, pairs: TargetPairs, update_index: int) -> bool:
        """Apply the rule if it is due after update ``update_index``; return whether it fired."""
        if self.due(update_index):
            self.apply(pairs)
            return True
        return False
