"""Optimiser steps under manual optimisation, and gradient averaging across ranks.

A :class:`~lit_qlearn.algorithms.base.QLearningModule` steps several optimisers per
update (critic, actor, temperature, ...) but counts one update: only the counted
optimiser's step enters ``trainer.global_step``. :class:`Stepper` runs one step (zero,
backward, average across ranks, clip, step) on public Lightning and torch API only:

* a **counted** step is ``LightningOptimizer.step()``, which Lightning counts;
* an **uncounted** step is what ``LightningOptimizer.step()`` runs without the count:
  ``Strategy.optimizer_step(optimizer, closure)`` (precision plugin, the
  ``on_before_optimizer_step`` hooks), or the bare ``optimizer.step()`` when nothing
  listens;
* the **backward** is ``LightningModule.manual_backward`` (precision plugin, the
  ``on_before_backward`` / ``on_after_backward`` hooks), or ``loss.backward()`` when
  nothing listens.

"Nothing listens" (:func:`nothing_listens_to_steps`, decided at fit start): full
precision, one device or DDP, and no callback or module hook on those events; then
Lightning's wrappers would only dispatch to nobody, and the direct calls give the same
arithmetic without that cost (benchmarks/results/throughput.json measures the library
against a plain loop).

Under DDP the gradients are averaged by :func:`average_gradients` (one all-reduce per
step) instead of DDP's reducer, which expects every parameter to receive a gradient in
every backward pass: an actor step gives the critic none.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["Stepper", "average_gradients", "nothing_listens_to_steps"]

#: Hooks that Lightning's backward and optimiser-step wrappers exist to call.
STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


def average_gradients(params: Iterable[Tensor], world_size: int) -> None:
    """Replace each ``p.grad`` by its mean over the ``world_size`` ranks, in place: one
    ``all_reduce`` of the concatenated gradients (every rank must pass the same
    parameters with gradients, in the same order)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(mean.view_as(g))


def nothing_listens_to_steps(module: LightningModule) -> bool:
    """Whether Lightning's backward and step wrappers would do nothing but dispatch hooks
    nobody overrides: full precision, one device or DDP (whose gradients
    :func:`average_gradients` averages), and no callback or module hook on those events."""
    trainer = module.trainer
    strategy = trainer.strategy
    if type(strategy.precision_plugin) is not Precision or type(strategy) not in (SingleDeviceStrategy, DDPStrategy):
        return False
    if any(is_overridden(h, module, LightningModule) for h in (*STEP_HOOKS, "backward")):
        return False
    return not any(is_overridden(h, cb, Callback) for cb in trainer.callbacks for h in STEP_HOOKS)


def _global_norm(grads: list[Tensor]) -> Tensor:
    """``||concat(grads)||_2`` ``()``: the norm ``clip_grad_norm_`` clips (its own helper,
    ``nn.utils.get_total_norm``, needs torch >= 2.6)."""
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _no_closure() -> None:
    return None


class Stepper:
    """Runs the optimiser steps of ``module`` in the current fit (made at fit start)."""

    def __init__(self, module: LightningModule) -> None:
        self.module = module
        wrapper = module.trainer.strategy.model
        self.ddp = wrapper if isinstance(wrapper, DistributedDataParallel) else None
        self.direct = nothing_listens_to_steps(module)

    def step(self, optimizer: LightningOptimizer | torch.optim.Optimizer, loss: Tensor, count: bool = True,
             max_grad_norm: float | None = None, measure_norm: bool = False) -> Tensor | None:
        """Zero grads, backward ``loss``, average the gradients across ranks, clip their
        global norm to ``max_grad_norm`` (if given), step; ``count=False`` keeps the step
        out of ``global_step``. A bare ``torch.optim.Optimizer`` steps uncounted.

        Returns the global L2 norm ``()`` of the gradients after averaging and before the
        clip when it is known for free (``max_grad_norm`` given: the clip computes it) or
        asked for (``measure_norm``: one more pass over the gradients, so ask on logging
        steps only); else None."""
        lightning = isinstance(optimizer, LightningOptimizer)
        raw = optimizer.optimizer if lightning else optimizer
        raw.zero_grad(set_to_none=True)
        self._backward(loss)
        params = [p for group in raw.param_groups for p in group["params"]]
        if self.ddp is not None:
            average_gradients(params, dist.get_world_size())
        norm = None
        if max_grad_norm is not None:
            norm = nn.utils.clip_grad_norm_(params, max_grad_norm)  # the norm before the clip
        elif measure_norm:
            norm = _global_norm([p.grad for p in params if p.grad is not None])
        if lightning and count:
            optimizer.step()
        elif not lightning or self.direct:
            raw.step()
        else:  # what LightningOptimizer.step runs, without counting the step
            self.module.trainer.strategy.optimizer_step(raw, _no_closure)
        return norm

    def _backward(self, loss: Tensor) -> None:
        if self.direct:
            loss.backward()
            return
        # Lightning arms DDP's reducer before each manual backward unless the wrapper is in
        # no_sync(); average_gradients averages instead.
        with self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext():
            self.module.manual_backward(loss)
