"""The probe protocol: what a callback may ask of any module (docs/design.md section 4).

A module is monitorable when it has

=====================================  =============================================
``gamma: float``                       discount factor
``q_value(obs, act) -> Tensor (N,)``   the Q-network under study
``greedy_action(obs) -> Tensor``       the action the bootstrap target uses
``q_network() -> nn.Module``           the module whose parameters define the NTK
=====================================  =============================================

``q_network()(obs, act)`` must compute the same values as ``q_value(obs, act)``
(one scalar per sample); for discrete actions wrap the network in
:class:`lit_qlearn.ntk.DiscreteQ`, which gathers the chosen action's output.

and the probe set, a fixed batch of transitions, comes from the DataModule's
``probe_batch(n, seed)``. Callbacks call :func:`check_probe_module` /
:func:`check_probe_datamodule` at ``setup`` so that a missing member is reported
before training starts.

Optional members some callbacks use when present: ``td_target(batch) -> Tensor (B,)``
(the module's own TD targets; :class:`~lit_qlearn.callbacks.PreQNLineSearch`) and
``q_networks() -> list[nn.Module]`` (every critic member, e.g. TD3's twins).
"""
from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lit_qlearn.data.types import Transitions
from lit_qlearn.td import check_gamma, td_target

__all__ = [
    "QProbe",
    "ProbeDataSource",
    "ProbeProtocolError",
    "check_probe_module",
    "check_probe_datamodule",
    "PROBE_MEMBERS",
    "critic_members",
    "bootstrap_target",
    "publish",
    "Cadence",
]


@runtime_checkable
class QProbe(Protocol):
    gamma: float

    def q_value(self, obs: Tensor, act: Tensor) -> Tensor: ...

    def greedy_action(self, obs: Tensor) -> Tensor: ...

    def q_network(self) -> nn.Module: ...


@runtime_checkable
class ProbeDataSource(Protocol):
    def probe_batch(self, n: int, seed: int = 0) -> Transitions: ...


PROBE_MEMBERS = {
    "gamma": "a float discount factor",
    "q_value": "a method q_value(obs, act) -> Tensor (N,)",
    "greedy_action": "a method greedy_action(obs) -> Tensor",
    "q_network": "a method q_network() -> nn.Module",
}


class ProbeProtocolError(TypeError):
    """A module or DataModule lacks a member of the probe protocol."""


def check_probe_module(module: Any, who: str = "this callback", probe: Transitions | None = None) -> None:
    """Raise :class:`ProbeProtocolError` naming every probe member ``module`` lacks or
    gets wrong: ``gamma`` must be a number in [0, 1) and the methods callable; with a
    ``probe`` batch, ``q_value`` and ``q_network()(obs, act)`` must return ``(N,)`` on
    its first rows and ``greedy_action`` one action per state."""
    problems = []
    gamma = getattr(module, "gamma", None)
    if gamma is None:
        problems.append(f"gamma is missing ({PROBE_MEMBERS['gamma']})")
    else:
        try:
            check_gamma("gamma", gamma)
        except ValueError as err:
            problems.append(str(err).removeprefix("gamma: "))
    for name, what in PROBE_MEMBERS.items():
        if name != "gamma" and not callable(getattr(module, name, None)):
            problems.append(f"{name} is missing ({what})")
    if not problems and probe is not None:
        problems = _check_on_probe(module, probe)
    if problems:
        raise ProbeProtocolError(
            f"{type(module).__name__} does not satisfy the probe protocol needed by {who}: "
            f"{'; '.join(problems)}; see lit_qlearn.probe"
        )


def _check_on_probe(module: Any, probe: Transitions, n: int = 4) -> list[str]:
    """Run the protocol's methods on ``n`` probe rows; describe what they got wrong."""
    obs, act = probe.obs[:n], probe.act[:n]
    n = obs.shape[0]
    problems = []
    with torch.no_grad():
        for name, call in (("q_value(obs, act)", lambda: module.q_value(obs, act)),
                           ("q_network()(obs, act)", lambda: module.q_network()(obs, act))):
            try:
                out = call()
            except Exception as exc:  # noqa: BLE001 - reported with the member's name
                problems.append(f"{name} failed on {n} probe transitions: {type(exc).__name__}: {exc}")
                continue
            if not isinstance(out, Tensor) or tuple(out.shape) != (n,):
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                problems.append(f"{name} must return a Tensor of shape (N,) = ({n},), got {shape}")
        try:
            greedy = module.greedy_action(obs)
            if not isinstance(greedy, Tensor) or greedy.shape[0] != n:
                problems.append(f"greedy_action(obs) must return one action per state ({n}), got "
                                f"{tuple(greedy.shape) if isinstance(greedy, Tensor) else type(greedy).__name__}")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"greedy_action(obs) failed on {n} probe states: {type(exc).__name__}: {exc}")
    return problems


def critic_members(module: Any) -> list[nn.Module]:
    """Every critic member of a probe-protocol module: ``q_networks()`` when the module
    has it (e.g. TD3's twin critics), else ``[q_network()]``."""
    lister = getattr(module, "q_networks", None)
    return list(lister()) if callable(lister) else [module.q_network()]


def bootstrap_target(module: Any, batch: Transitions, next_act: Tensor | None = None) -> Tensor:
    """The protocol's TD target :func:`~lit_qlearn.td.td_target` with ``V(s') = Q(s', a*)``,
    ``a* = greedy_action(s')`` unless given, shape ``(B,)`` (no gradient)."""
    with torch.no_grad():
        if next_act is None:
            next_act = module.greedy_action(batch.next_obs)
        return td_target(batch, module.q_value(batch.next_obs, next_act), module.gamma)


def publish(trainer: Any, metrics: dict[str, float], step: int) -> None:
    """Write ``metrics`` at ``step`` (the update count, docs/design.md section 8) to every logger
    (loggers write on rank zero only) and expose them in ``trainer.callback_metrics``
    (for EarlyStopping, ModelCheckpoint(monitor=...) and friends). NaNs are skipped.
    ``trainer`` may be a Lightning ``Fabric``: its loggers, as ``fabric.log_dict`` writes."""
    metrics = {k: float(v) for k, v in metrics.items() if not math.isnan(float(v))}
    if not metrics:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    callback_metrics = getattr(trainer, "callback_metrics", None)  # a Trainer's; a Fabric has none
    if callback_metrics is not None:
        callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})


class Cadence:
    """When a measurement every ``every`` steps is due, for a step counter that may
    advance by more than one at a time.

    ``due(step)`` is true whenever ``step`` reaches or passes the next multiple of
    ``every``, then the next multiple is the first one after ``step``. A user's module
    that steps two optimisers per batch advances ``trainer.global_step`` by 2 per batch
    (by 1 and 2 in turn when its actor steps every other batch): ``step % every == 0``
    misses every multiple the counter jumps over, where the cadence measures at the
    first step at or past each one. With an increment of 1 both agree.

    Invariant: after ``start(s)`` or ``due(s)``, ``next_due`` is the smallest multiple
    of ``every`` above ``s``. A callback keeps ``next_due`` in its ``state_dict`` so a
    resumed run goes on with the same cadence.

    Args:
        every: the period, an integer >= 1.
    """

    def __init__(self, every: int) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Cadence: every must be an integer >= 1, got {every!r}")
        self.every = every
        self.next_due: int | None = None

    def _after(self, step: int) -> int:
        return (step // self.every + 1) * self.every

    def start(self, step: int) -> None:
        """Begin counting at ``step`` (the Trainer's step at train start; 0 for a fresh run).
        A ``next_due`` restored from a checkpoint of this very step is kept; one that does
        not fit ``step`` (the callback reused with a fresh Trainer) is recomputed."""
        if self.next_due is None or not step < self.next_due <= step + self.every:
            self.next_due = self._after(step)

    def due(self, step: int) -> bool:
        """Whether ``step`` reached or passed the next multiple of ``every``; if so the next
        one is the first multiple after ``step`` (one measurement however many were passed)."""
        if self.next_due is None:
            self.start(0)
        if step < self.next_due:
            return False
        self.next_due = self._after(step)
        return True


def check_probe_datamodule(datamodule: Any, who: str = "this callback") -> None:
    """Raise :class:`ProbeProtocolError` unless ``datamodule`` serves ``probe_batch(n, seed)``."""
    if datamodule is None or not callable(getattr(datamodule, "probe_batch", None)):
        name = "no DataModule" if datamodule is None else type(datamodule).__name__
        raise ProbeProtocolError(
            f"{who} needs a DataModule with probe_batch(n, seed) -> Transitions to draw the fixed "
            f"probe set; the Trainer has {name}"
        )
