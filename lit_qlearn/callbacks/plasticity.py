"""PlasticityMonitor: dormant units, feature rank, weight norm and pre-activation
statistics of the critic on a fixed probe set while training.

A Lightning adapter over :class:`lit_qlearn.monitoring.PlasticityMeter`, which measures
with :mod:`lit_qlearn.plasticity`; it asks for the probe protocol only, so it works
with every module of the package and with a user's own module implementing
``gamma``, ``q_value``, ``greedy_action`` and ``q_network``.
"""
from __future__ import annotations

from typing import Any

from lit_qlearn.callbacks.monitors import ProbeCallback
from lit_qlearn.monitoring import PlasticityMeter

__all__ = ["PlasticityMonitor"]


class PlasticityMonitor(ProbeCallback):
    """Plasticity statistics of ``q_network()`` on the probe ``(obs, act)``, every
    ``every_n_steps`` steps (:func:`lit_qlearn.plasticity.plasticity_metrics`).

    Logs ``plasticity/dormant_fraction`` (share of tau-dormant hidden units, Sokar et
    al. 2023, and ``plasticity/dormant_fraction/<layer>`` per layer),
    ``plasticity/feature_rank`` (srank_delta of the penultimate features, Kumar et
    al. 2021), ``plasticity/weight_norm`` (``||theta||_2`` of the critic) and
    ``plasticity/preact_mean/<layer>`` / ``plasticity/preact_scale/<layer>`` (mean and
    std of each hidden layer's pre-activation); ``<layer>`` is the activation module's
    name in ``q_network()``. One forward pass of the probe per measurement, plus the
    singular values of the ``(probe_size, width)`` features; its cost on a TD3+BC run is in
    ``benchmarks/results/plasticity_cost.json``.

    Args:
        every_n_steps: measure at each multiple of it the step reaches or passes
            (:class:`~lit_qlearn.callbacks.ProbeCallback`).
        probe_size: number of probe transitions (at least the penultimate width, so
            that the feature rank can reach it).
        probe_seed: seed of the probe draw (the same on every rank).
        probe_source: ``"datamodule"`` (its ``probe_batch``) or ``"batches"`` (the first training batches).
        tau: dormancy threshold on the normalised score (0 counts only units that never fire).
        delta: the share of the singular value sum the effective rank may leave out.
    """

    def __init__(self, every_n_steps: int = 1000, probe_size: int = 2560, probe_seed: int = 0,
                 probe_source: str = "datamodule", tau: float = 0.025, delta: float = 0.01) -> None:
        core = PlasticityMeter(tau, delta, owner="PlasticityMonitor")
        super().__init__(every_n_steps, probe_size, probe_seed, probe_source, core=core)
        self.tau, self.delta = core.tau, core.delta

    def options(self) -> dict[str, Any]:
        return {**super().options(), "tau": self.tau, "delta": self.delta}  # state_key names them all
