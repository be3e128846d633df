"""The probe protocol: what a callback may ask of any module (DESIGN.md section 4).

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

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lit_qlearn.data.types import Transitions

__all__ = [
    "QProbe",
    "ProbeDataSource",
    "ProbeProtocolError",
    "check_probe_module",
    "check_probe_datamodule",
    "PROBE_MEMBERS",
    "critic_members",
    "bootstrap_target",
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


def check_probe_module(module: Any, who: str = "this callback") -> None:
    """Raise :class:`ProbeProtocolError` naming every probe member ``module`` lacks."""
    missing = []
    for name, what in PROBE_MEMBERS.items():
        value = getattr(module, name, None)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if name == "gamma" else callable(value)
        if not ok:
            missing.append(f"{name} ({what})")
    if missing:
        raise ProbeProtocolError(
            f"{type(module).__name__} does not implement the probe protocol needed by {who}: "
            f"missing {', '.join(missing)}; see lit_qlearn.probe"
        )


def critic_members(module: Any) -> list[nn.Module]:
    """Every critic member of a probe-protocol module: ``q_networks()`` when the module
    has it (e.g. TD3's twin critics), else ``[q_network()]``."""
    lister = getattr(module, "q_networks", None)
    return list(lister()) if callable(lister) else [module.q_network()]


def bootstrap_target(module: Any, batch: Transitions, next_act: Tensor | None = None) -> Tensor:
    """The protocol's TD target ``r + gamma (1 - done) Q(s', a*)`` of ``batch``, shape
    ``(B,)``, with ``a* = greedy_action(s')`` unless given (no gradient)."""
    with torch.no_grad():
        if next_act is None:
            next_act = module.greedy_action(batch.next_obs)
        return batch.rew + module.gamma * (1.0 - batch.done) * module.q_value(batch.next_obs, next_act)


def check_probe_datamodule(datamodule: Any, who: str = "this callback") -> None:
    """Raise :class:`ProbeProtocolError` unless ``datamodule`` serves ``probe_batch(n, seed)``."""
    if datamodule is None or not callable(getattr(datamodule, "probe_batch", None)):
        name = "no DataModule" if datamodule is None else type(datamodule).__name__
        raise ProbeProtocolError(
            f"{who} needs a DataModule with probe_batch(n, seed) -> Transitions to draw the fixed "
            f"probe set; the Trainer has {name}"
        )
