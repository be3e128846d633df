"""PreQNLineSearch: PreQN's preconditioned critic step and line search in place of
another module's critic optimiser step (docs/design.md section 5.5)."""
from __future__ import annotations

import math
import types
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from lit_qlearn.data.types import Transitions
from lit_qlearn.ntk import METHODS, PreconditionedStep, check_choice, check_preconditioner_args, preconditioned_step
from lit_qlearn.probe import (Cadence, ProbeProtocolError, bootstrap_target, check_probe_module, critic_members,
                              publish)

__all__ = ["PreQNLineSearch"]


class PreQNLineSearch(Callback):
    """Replace the critic optimiser's step of any probe-protocol module by PreQN's
    preconditioned step (:func:`lit_qlearn.ntk.preconditioned_step`), without
    changing the module's code: ``Trainer(callbacks=[PreQNLineSearch()])``.

    At fit start the optimiser holding the critic's parameters (those of
    ``q_network()``, or of every module in ``q_networks()`` when the module lists
    several critics, as TD3's twin critic does) is found and its ``step`` wrapped;
    the wrapper is removed when fitting ends. When the module's training step calls
    that optimiser, the gradients are ignored and, on the current training batch,
    each critic member ``m`` takes the preconditioned step on its TD errors
    ``delta_m = y - Q_m(s, a)``, so the update satisfies the line-search criterion
    ``cos(Q_theta'(X) - Q_theta(X), delta_m) >= cos_threshold``.

    The TD targets ``y``:

    * ``pl_module.td_target(batch)`` when the module has it (TD3, TD3+BC, PreQN,
      the toys), evaluated under the random state the training step started with,
      so that a module whose step draws its target noise first (TD3's target policy
      smoothing) gets the very targets of its own loss;
    * otherwise the probe protocol's ``r + gamma (1 - d) Q(s', greedy_action(s'))``.

    This suits modules whose critic loss is a squared TD error; the module's other
    optimisers (the actor's) are untouched. Under DDP the ranks' batches and targets
    are gathered, so every rank takes the identical step on the union batch.

    Logs ``preqn/cos`` (the smallest over critic members), ``preqn/shrink_steps``
    (the largest), ``preqn/step_norm`` (over all members) and ``preqn/accepted``
    (fraction of members meeting the criterion) whenever ``global_step`` reaches or passes
    a multiple of the Trainer's ``log_every_n_steps`` (:class:`~lit_qlearn.probe.Cadence`),
    at that step (:func:`~lit_qlearn.probe.publish`);
    :attr:`last` holds the latest :class:`~lit_qlearn.ntk.PreconditionedStep` per member.

    Args:
        lr / cos_threshold / shrink / max_shrinks / rcond: of the preconditioned step;
            the defaults are :class:`~lit_qlearn.algorithms.PreQN`'s (0.1, 0.9, 0.5, 20, 1e-6).
        method: NTK engine, see :func:`lit_qlearn.ntk.ntk_gram`.
    """

    def __init__(self, lr: float = 0.1, cos_threshold: float = 0.9, shrink: float = 0.5, max_shrinks: int = 20,
                 rcond: float = 1e-6, method: str = "auto") -> None:
        check_choice("PreQNLineSearch", "method", method, METHODS)
        check_preconditioner_args("PreQNLineSearch", lr=lr, cos_threshold=cos_threshold, shrink=shrink,
                                  max_shrinks=max_shrinks, rcond=rcond)
        self.lr, self.cos_threshold, self.shrink, self.max_shrinks = float(lr), float(cos_threshold), shrink, max_shrinks
        self.rcond = float(rcond)
        self.method = method
        self.last: list[PreconditionedStep] = []
        self.last_targets: Tensor | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._batch: Transitions | None = None
        self._rng: tuple[Tensor, list[Tensor]] | None = None
        self._trainer: Trainer | None = None
        self._module: LightningModule | None = None
        self._log_cadence: Cadence | None = None

    # --------------------------------------------------------------- set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            check_probe_module(pl_module, "PreQNLineSearch")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        params = {id(p) for net in critic_members(pl_module) for p in net.parameters() if p.requires_grad}
        for optimizer in trainer.optimizers:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if params and params <= held:
                break
        else:
            raise ProbeProtocolError(
                f"PreQNLineSearch: no optimiser of {type(pl_module).__name__} holds all parameters of its critic "
                "(q_network() / q_networks()); the callback replaces that optimiser's step"
            )
        self._optimizer, self._trainer, self._module = optimizer, trainer, pl_module
        optimizer.step = types.MethodType(_step, self)  # the instance attribute shadows the class's step

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A resumed fit has restored global_step by now; next_due follows from it (Cadence's invariant).
        self._log_cadence = Cadence(max(1, int(trainer.log_every_n_steps)))
        self._log_cadence.start(trainer.global_step)

    def _unwrap(self) -> None:
        if self._optimizer is not None:
            self._optimizer.__dict__.pop("step", None)
        self._optimizer = self._trainer = self._module = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._unwrap()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._unwrap()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not isinstance(batch, Transitions):
            raise ProbeProtocolError(
                f"PreQNLineSearch needs training batches of type lit_qlearn.data.Transitions, got {type(batch).__name__}"
            )
        self._batch = batch
        cuda = [torch.cuda.get_rng_state(d) for d in range(torch.cuda.device_count())] if torch.cuda.is_initialized() else []
        self._rng = (torch.get_rng_state(), cuda)

    # ------------------------------------------------------------- the step
    def targets(self, pl_module: LightningModule, batch: Transitions) -> Tensor:
        """The TD targets ``y`` of ``batch`` (see the class docstring), shape ``(B,)``."""
        td_target = getattr(pl_module, "td_target", None)
        with torch.no_grad():
            if not callable(td_target):
                return bootstrap_target(pl_module, batch)
            cpu, cuda = self._rng
            with torch.random.fork_rng(devices=list(range(len(cuda)))):
                torch.set_rng_state(cpu)
                for device, state in enumerate(cuda):
                    torch.cuda.set_rng_state(state, device)
                return td_target(batch).reshape(-1)

    def precondition(self, trainer: Trainer, pl_module: LightningModule, batch: Transitions) -> list[PreconditionedStep]:
        """Take the preconditioned step of every critic member on ``batch``."""
        y = self.targets(pl_module, batch)
        obs, act = batch.obs, batch.act
        if trainer.world_size > 1:
            obs, act, y = (trainer.strategy.all_gather(t).flatten(0, 1) for t in (obs, act, y))
        self.last_targets = y.detach()
        steps = []
        for net in critic_members(pl_module):
            with torch.no_grad():
                delta = y - net(obs, act).reshape(-1)
            steps.append(preconditioned_step(net, (obs, act), delta, lr=self.lr, cos_threshold=self.cos_threshold,
                                             shrink=self.shrink, max_shrinks=self.max_shrinks, rcond=self.rcond,
                                             method=self.method))
        self.last = steps
        return steps

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        due = self._log_cadence is not None and self._log_cadence.due(step)  # consulted at every batch
        if not due or not self.last or trainer.logger is None:
            return
        metrics = {
            "preqn/cos": min(s.cos for s in self.last),
            "preqn/shrink_steps": float(max(s.shrink_steps for s in self.last)),
            "preqn/step_norm": math.sqrt(sum(s.step_norm**2 for s in self.last)),
            "preqn/accepted": sum(s.accepted for s in self.last) / len(self.last),
        }
        publish(trainer, metrics, step)


def _step(self: PreQNLineSearch, closure: Any = None, **kwargs: Any) -> Any:
    """The wrapped critic optimiser's ``step``: the closure (if any) runs as usual, the
    parameter update is the preconditioned step."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    if self._batch is None:
        raise RuntimeError("PreQNLineSearch: the critic optimiser stepped outside a training batch")
    self.precondition(self._trainer, self._module, self._batch)
    return loss
