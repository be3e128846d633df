"""Remedies: what :class:`~lit_qlearn.callbacks.CrashPredictor` (``action="rollback"``)
changes in the restored healthy state before training goes on.

A remedy is any object with ``apply(trainer, pl_module) -> str``: it changes the
running module or optimisers in place and returns a one-line description for the log
and the callback's record. An optional ``setup(trainer, pl_module)`` is called at fit
start (after the optimisers exist) to refuse a module the remedy cannot act on, before
the first update. :class:`Compose` (or a list given to the predictor) applies several
in order.

Every remedy here is deterministic and draws no number from the global random streams,
so that under DDP every rank, restoring the same file, ends in the same state.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn

from lit_qlearn.callbacks.preqn import PreQNLineSearch
from lit_qlearn.probe import ProbeProtocolError, critic_members
from lit_qlearn.targets import TargetUpdate

__all__ = ["Compose", "PreQNStep", "Remedy", "ScaleLearningRate", "ShrinkAndPerturb", "SlowTargets", "as_remedy",
           "remedy_name"]


class Remedy:
    """Base of the remedies (optional: any object with ``apply`` is one)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Raise a ``ValueError`` naming the problem if the remedy cannot act on ``pl_module``."""

    def apply(self, trainer: Trainer, pl_module: LightningModule) -> str:
        """Change the running state in place; return what was done (one line)."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply(trainer, pl_module) -> str")


class Compose(Remedy):
    """Apply ``remedies`` in the order given; the description joins theirs with ``"; "``."""

    def __init__(self, *remedies: Any) -> None:
        if len(remedies) == 1 and isinstance(remedies[0], (list, tuple)):
            remedies = tuple(remedies[0])
        if not remedies:
            raise ValueError("Compose: give at least one remedy")
        for remedy in remedies:
            if not callable(getattr(remedy, "apply", None)):
                raise TypeError(f"Compose: a remedy needs apply(trainer, pl_module) -> str, got {remedy!r}")
        self.remedies = list(remedies)

    def __repr__(self) -> str:
        return f"Compose({', '.join(map(remedy_name, self.remedies))})"

    def setup(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for remedy in self.remedies:
            check = getattr(remedy, "setup", None)
            if callable(check):
                check(trainer, pl_module)

    def apply(self, trainer: Trainer, pl_module: LightningModule) -> str:
        return "; ".join(str(remedy.apply(trainer, pl_module)) for remedy in self.remedies)

    def teardown(self, trainer: Trainer) -> None:
        for remedy in self.remedies:
            undo = getattr(remedy, "teardown", None)
            if callable(undo):
                undo(trainer)


def remedy_name(remedy: Any) -> str:
    """``repr(remedy)``, or its class's name where the repr is object's (an address, which
    would change the owner's ``state_key`` from one process to the next)."""
    return type(remedy).__qualname__ if type(remedy).__repr__ is object.__repr__ else repr(remedy)


def as_remedy(remedy: Any) -> Any:
    """None, a remedy, or a list / tuple of remedies (a :class:`Compose`)."""
    if remedy is None:
        return None
    if isinstance(remedy, (list, tuple)):
        return Compose(*remedy)
    if not callable(getattr(remedy, "apply", None)):
        raise TypeError(f"remedy must have apply(trainer, pl_module) -> str (or be a list of such), got {remedy!r}")
    return remedy


class ScaleLearningRate(Remedy):
    """Multiply the learning rate of one optimiser (every optimiser: ``optimizer=None``) by ``factor``.

    Why: in Yue et al. (2023, Theorem 3) the SGD crash step grows as ``1 / eta``; under
    Adam ``||theta||`` grows by ``eta sqrt(P)`` per step (docs/design.md section 5.4):
    halving ``eta`` halves the growth and doubles the time to a threshold. Each param
    group's ``lr`` (and ``initial_lr``, which schedulers start from) is scaled, and so
    are the ``base_lrs`` of the schedulers driving that optimiser, so that a closed-form
    schedule (``LambdaLR``, cosine) does not undo the change at its next step.

    Args:
        factor: in (0, 1] to slow down (any positive factor is accepted).
        optimizer: the name of the optimiser (``pl_module.optimizer(name)``, lit_qlearn's
            modules: ``"critic"``, ``"actor"``, ...); None: every optimiser of the Trainer.
    """

    def __init__(self, factor: float = 0.5, optimizer: str | None = "critic") -> None:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ValueError(f"ScaleLearningRate: factor must be a number > 0, got {factor!r}")
        if optimizer is not None and not isinstance(optimizer, str):
            raise ValueError(f"ScaleLearningRate: optimizer must be an optimiser's name or None, got {optimizer!r}")
        self.factor = float(factor)
        self.optimizer = optimizer

    def __repr__(self) -> str:
        return f"ScaleLearningRate(factor={self.factor}, optimizer={self.optimizer!r})"

    def _optimizers(self, trainer: Trainer, pl_module: LightningModule) -> list[torch.optim.Optimizer]:
        if self.optimizer is None:
            return list(trainer.optimizers)
        named = getattr(pl_module, "optimizer", None)
        if not callable(named):
            raise ValueError(f"ScaleLearningRate(optimizer={self.optimizer!r}): {type(pl_module).__name__} has no "
                             "optimizer(name) method to find it by name; pass optimizer=None (every optimiser)")
        try:
            wrapped = named(self.optimizer)
        except KeyError as err:
            raise ValueError(f"ScaleLearningRate(optimizer={self.optimizer!r}): {err.args[0]}") from None
        return [getattr(wrapped, "optimizer", wrapped)]  # the LightningOptimizer's torch optimiser

    def setup(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._optimizers(trainer, pl_module)

    def apply(self, trainer: Trainer, pl_module: LightningModule) -> str:
        optimizers = self._optimizers(trainer, pl_module)
        lrs = []
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                for key in ("lr", "initial_lr"):
                    if key in group:
                        group[key] = _scaled(group[key], self.factor)
                lrs.append(float(group["lr"]))
            for config in trainer.lr_scheduler_configs:
                scheduler = config.scheduler
                if getattr(scheduler, "optimizer", None) is optimizer and hasattr(scheduler, "base_lrs"):
                    scheduler.base_lrs = [_scaled(lr, self.factor) for lr in scheduler.base_lrs]
        name = "every optimiser" if self.optimizer is None else f"optimiser {self.optimizer!r}"
        return f"learning rate of {name} x {self.factor:g} (now {', '.join(f'{lr:.3g}' for lr in lrs)})"


def _scaled(value: Any, factor: float) -> Any:
    if isinstance(value, Tensor):  # a tensor lr (capturable optimisers): in place, as the optimiser holds it
        return value.mul_(factor)
    return value * factor


class SlowTargets(Remedy):
    """Turn on Polyak averaging of the target networks, or slow it down.

    Why: bootstrapping from a target that moves with the online network is the deadly
    triad's third leg; Yue et al. (2023) study divergence with target = current network
    and discuss an EMA target as what delays it (their EMA discussion; Polyak averaging
    is TD3's and SAC's default). The module's rule ``pl_module.target_update``
    (:class:`~lit_qlearn.targets.TargetUpdate`) becomes ``TargetUpdate(min(tau, factor
    * tau_now), every)``: from a copy (``tau_now = 1``, target = current network or a
    hard copy every k) it turns on Polyak averaging at ``tau`` after every update; from an
    average it multiplies its rate by ``factor`` (each rollback again). The target
    weights themselves are the restored healthy ones.

    The rule is an attribute of the module, not in its checkpoint: a fit resumed from a
    checkpoint starts from the rule the module was built with (the rollbacks recorded in
    :attr:`CrashPredictor.rollbacks` say which remedies ran).

    Args:
        tau: the Polyak rate turned on (the largest rate the remedy leaves), in (0, 1).
        factor: what an existing average's rate is multiplied by, in (0, 1).
    """

    def __init__(self, tau: float = 0.005, factor: float = 0.5) -> None:
        for arg, value in (("tau", tau), ("factor", factor)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"SlowTargets: {arg} must be a number in (0, 1), got {value!r}")
        self.tau = float(tau)
        self.factor = float(factor)

    def __repr__(self) -> str:
        return f"SlowTargets(tau={self.tau}, factor={self.factor})"

    def setup(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pairs = getattr(pl_module, "target_pairs", None)
        if not callable(pairs) or not pairs():
            raise ValueError(f"SlowTargets: {type(pl_module).__name__} has no target networks (target_pairs() is "
                             "absent or empty); choose another remedy")
        if not hasattr(pl_module, "target_update"):
            raise ValueError(f"SlowTargets: {type(pl_module).__name__} has no target_update rule to change (every "
                             "lit_qlearn algorithm has one)")

    def apply(self, trainer: Trainer, pl_module: LightningModule) -> str:
        rule = pl_module.target_update
        tau_now, every = (1.0, 1) if rule is None else (rule.tau, rule.every)
        if tau_now >= 1.0:  # a copy (every update or every k): Polyak averaging after every update
            every = 1
        new = TargetUpdate(min(self.tau, self.factor * tau_now), every)
        pl_module.target_update = new
        return f"target rule {rule!r} -> {new!r}"


class ShrinkAndPerturb(Remedy):
    """Shrink the critic's weights and add a little of a fresh initialisation (Ash & Adams, 2020):
    ``theta <- shrink * theta + noise * theta_fresh``.

    Why: Ash & Adams show that shrinking a trained network toward zero and perturbing it
    with fresh initial weights restores its ability to learn (warm-started networks
    generalise and train like fresh ones) while keeping most of what it knows; a shrunk
    critic has smaller features and a smaller NTK, the quantities Yue et al.'s divergence
    grows through. ``theta_fresh`` is a copy of each critic network (``q_networks()``,
    else ``q_network()``) whose layers are re-initialised with their ``reset_parameters``
    from a generator seeded with ``seed + global_step`` (the same on every rank and after
    a resume; the global random streams are untouched); a parameter shared by two
    members is changed once. Target networks and optimiser states are the
    restored healthy ones.

    Args:
        shrink: the factor on the current weights, in (0, 1].
        noise: the factor on the fresh weights, >= 0.
        seed: the seed of the fresh initialisations (at step t: ``seed + t``, member i: ``+ 1000003 i``).
    """

    def __init__(self, shrink: float = 0.8, noise: float = 0.01, seed: int = 0) -> None:
        if isinstance(shrink, bool) or not isinstance(shrink, (int, float)) or not 0 < shrink <= 1:
            raise ValueError(f"ShrinkAndPerturb: shrink must be a number in (0, 1], got {shrink!r}")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
            raise ValueError(f"ShrinkAndPerturb: noise must be a number >= 0, got {noise!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"ShrinkAndPerturb: seed must be an integer, got {seed!r}")
        self.shrink = float(shrink)
        self.noise = float(noise)
        self.seed = seed

    def __repr__(self) -> str:
        return f"ShrinkAndPerturb(shrink={self.shrink}, noise={self.noise}, seed={self.seed})"

    def setup(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for network in critic_members(pl_module):
            for module in network.modules():
                if any(True for _ in module.parameters(recurse=False)) and not callable(
                        getattr(module, "reset_parameters", None)):
                    raise ValueError(f"ShrinkAndPerturb: the critic's {type(module).__name__} holds parameters but "
                                     "has no reset_parameters() to draw a fresh initialisation from")

    def fresh(self, network: nn.Module, seed: int) -> nn.Module:
        """A copy of ``network`` on the CPU, every layer re-initialised from ``seed``."""
        copied = copy.deepcopy(network).cpu()
        with torch.random.fork_rng(devices=[]):  # reset_parameters draws from the CPU stream
            torch.random.default_generator.manual_seed(seed)
            for module in copied.modules():
                if any(True for _ in module.parameters(recurse=False)):
                    module.reset_parameters()
        return copied

    @torch.no_grad()
    def apply(self, trainer: Trainer, pl_module: LightningModule) -> str:
        seed = self.seed + trainer.global_step
        seen: set[int] = set()
        for index, network in enumerate(critic_members(pl_module)):
            fresh = self.fresh(network, seed + 1_000_003 * index)
            for p, f in zip(network.parameters(), fresh.parameters(), strict=True):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                p.mul_(self.shrink).add_(f.to(device=p.device, dtype=p.dtype), alpha=self.noise)
        return f"critic weights <- {self.shrink:g} * weights + {self.noise:g} * fresh(seed {seed})"



class PreQNStep(Remedy):
    """From the rollback on, the critic takes PreQN's preconditioned step with its line
    search instead of its optimiser's step (Achiam, Knight & Abbeel, 2019; docs/design.md
    section 5.5): a :class:`~lit_qlearn.callbacks.PreQNLineSearch` is attached to the
    running Trainer.

    Why: PreQN preconditions the step with the inverse NTK Gram of the batch, so the
    change of Q on the batch follows the TD errors (cosine >= ``cos_threshold``) and the
    generalisation across state-action pairs through which divergence grows (the NTK's
    off-diagonal, SEEM) is cancelled; Achiam et al. built it to prevent divergence.

    The callback is attached once (a later rollback leaves it) and removed from
    ``trainer.callbacks`` when the fit ends. Like :class:`SlowTargets` it is not in the
    checkpoint: a resumed fit takes the module's optimiser step again unless its Trainer
    is given a ``PreQNLineSearch``.

    Args:
        lr / cos_threshold / shrink / max_shrinks / rcond / method: of
            :class:`~lit_qlearn.callbacks.PreQNLineSearch` (checked at construction).
    """

    def __init__(self, lr: float = 0.1, cos_threshold: float = 0.9, shrink: float = 0.5, max_shrinks: int = 20,
                 rcond: float = 1e-6, method: str = "auto") -> None:
        self.options = dict(lr=lr, cos_threshold=cos_threshold, shrink=shrink, max_shrinks=max_shrinks, rcond=rcond,
                            method=method)
        try:
            PreQNLineSearch(**self.options)
        except ValueError as err:
            raise ValueError(str(err).replace("PreQNLineSearch", "PreQNStep", 1)) from None
        #: The attached callback (None: not attached).
        self.callback: PreQNLineSearch | None = None

    def __repr__(self) -> str:
        return f"PreQNStep({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"

    def setup(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if any(isinstance(cb, PreQNLineSearch) for cb in trainer.callbacks):
            raise ValueError("PreQNStep: the Trainer has a PreQNLineSearch already; the critic takes PreQN's step "
                             "from the start, choose another remedy")
        params = {id(p) for net in critic_members(pl_module) for p in net.parameters() if p.requires_grad}
        if not params or not any(params <= {id(p) for g in o.param_groups for p in g["params"]}
                                 for o in trainer.optimizers):
            raise ValueError(f"PreQNStep: no optimiser of {type(pl_module).__name__} holds all parameters of its "
                             "critic (q_network() / q_networks()), whose step PreQN's replaces")

    def apply(self, trainer: Trainer, pl_module: LightningModule) -> str:
        if self.callback is not None and self.callback in trainer.callbacks:
            return "PreQN's step already in use"
        callback = PreQNLineSearch(**self.options)
        # Appended (the Trainer may be iterating over its callbacks): it is stateless, so its
        # place before or after the checkpoint callbacks does not matter.
        trainer.callbacks.append(callback)
        try:
            callback.setup(trainer, pl_module, "fit")
            callback.on_fit_start(trainer, pl_module)  # wraps the critic optimiser's step
            callback.on_train_start(trainer, pl_module)
        except ProbeProtocolError:
            trainer.callbacks.remove(callback)
            raise
        self.callback = callback
        return f"critic steps with PreQN's line search from now on (lr={self.options['lr']})"

    def teardown(self, trainer: Trainer) -> None:
        """Leave ``trainer.callbacks`` (the callback's own ``on_fit_end`` unwrapped the step)."""
        if self.callback is not None and self.callback in trainer.callbacks:
            trainer.callbacks.remove(self.callback)
        self.callback = None
