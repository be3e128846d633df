"""NTKGramCallback and SEEMMonitor: measure the critic's empirical NTK and the SEEM
divergence indicator on a fixed probe set while training (docs/design.md sections 4, 5).

They are Lightning adapters over the meters of :mod:`lit_qlearn.monitoring` (which hold
the probe set, measure and keep the state): here are the probe's draw, the cadence, the
publishing and the TensorBoard images. They ask a module for the probe protocol only, so
they work with every module of the package and with a user's own module implementing
``gamma``, ``q_value``, ``greedy_action`` and ``q_network``.
"""
from __future__ import annotations

from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.wrappers import is_wrapped
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lit_qlearn.data.types import Transitions
from lit_qlearn.monitoring import Meter, NTKMeter, SEEMMeter, no_trace
from lit_qlearn.ntk import check_choice
from lit_qlearn.probe import Cadence, ProbeProtocolError, check_probe_datamodule, check_probe_module, publish

__all__ = ["ProbeCallback", "NTKGramCallback", "SEEMMonitor", "draw_probe"]


def _core_attr(name: str) -> property:
    """An attribute that is the core meter's (``self.core``): read and written there."""
    return property(lambda self: getattr(self.core, name), lambda self, value: setattr(self.core, name, value),
                    doc=f"The core meter's ``{name}``.")


def draw_probe(data: Transitions, n: int, seed: int = 0, who: str = "draw_probe") -> Transitions:
    """``min(n, len(data))`` distinct rows of ``data``, in their order, chosen with a
    generator of their own seeded ``seed`` (the global random streams are left alone)."""
    if not isinstance(data, Transitions):
        raise TypeError(f"{who}: data must be a lit_qlearn.data.Transitions batch to draw the probe set from, got "
                        f"{type(data).__name__}")
    if len(data.obs) == 0:
        raise ValueError(f"{who}: data holds no transitions to draw the probe set from")
    rows = torch.randperm(len(data.obs), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return data.map(lambda t: t.detach()[rows.to(t.device)].cpu())


def _unwrap(module: Any) -> Any:
    """The user's module inside a ``fabric.setup`` wrapper (its methods called on the wrapper
    would go through the wrapper's forward tracking)."""
    return module.module if is_wrapped(module) and isinstance(module, torch.nn.Module) else module


class ProbeCallback(Callback):
    """Shared machinery over a core meter (:attr:`core`, :class:`lit_qlearn.monitoring.Meter`):
    protocol checks at setup, the probe set's draw, the cadence, logging at the exact step
    and the checkpointed state (the meter's, and the cadence's).

    Under a Trainer the hooks are Lightning's; in a Lightning Fabric loop
    (``Fabric(callbacks=[...])``) the loop calls :meth:`on_fabric_setup` once and
    :meth:`on_fabric_update` after each update through ``fabric.call``, and the scalars go
    to the Fabric's loggers.

    Args:
        every_n_steps: measure whenever ``trainer.global_step`` (for lit_qlearn's modules
            the update count) reaches or passes the next multiple of ``every_n_steps``,
            whatever its increment per batch (:class:`~lit_qlearn.probe.Cadence`); the
            scalars are written at that step.
        probe_size: number of probe transitions (when the DataModule has fewer, one
            warning, and the probe set is what it has).
        probe_seed: seed of the probe draw (the same on every rank).
        probe_source: ``"datamodule"`` (its ``probe_batch(n, seed)``, docs/design.md section 4) or
            ``"batches"`` (the first training batches, for online training; under DDP
            rank zero's are broadcast).
        method: NTK engine, see :func:`lit_qlearn.ntk.ntk_gram`.
        dtype: dtype of the NTK computation (None: the parameters').
        core: the meter that measures (default: a plain :class:`~lit_qlearn.monitoring.Meter`,
            for a subclass that overrides :meth:`measure`).
    """

    probe = _core_attr("probe")
    last_step = _core_attr("last_step")  # the step of the latest measurement

    def __init__(self, every_n_steps: int, probe_size: int, probe_seed: int = 0, probe_source: str = "datamodule",
                 method: str = "auto", dtype: torch.dtype | None = None, core: Meter | None = None) -> None:
        for arg, value in (("every_n_steps", every_n_steps), ("probe_size", probe_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}: {arg} must be an integer >= 1, got {value!r}")
        check_choice(type(self).__name__, "probe_source", probe_source, ("datamodule", "batches"))
        self.core = core if core is not None else Meter(method, dtype, owner=type(self).__name__)
        self.every_n_steps = every_n_steps
        self.probe_size = probe_size
        self.probe_seed = probe_seed
        self.probe_source = probe_source
        self.method = method
        self.dtype = dtype
        self.cadence = Cadence(every_n_steps)
        self._pending: list[Transitions] = []

    def options(self) -> dict[str, Any]:
        """Every constructor option: two instances that differ in one of them measure
        different things, so each keeps its own slot in a checkpoint (:attr:`state_key`)."""
        return {"every_n_steps": self.every_n_steps, "probe_size": self.probe_size, "probe_seed": self.probe_seed,
                "probe_source": self.probe_source, "method": self.method, "dtype": str(self.dtype)}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self.options())

    # --------------------------------------------------------------- set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        who = type(self).__name__
        check_probe_module(pl_module, who)
        if self.probe_source == "datamodule" and self.probe is None:
            check_probe_datamodule(trainer.datamodule, who)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.probe is None and self.probe_source == "datamodule":
            self.core.set_probe(trainer.datamodule.probe_batch(self.probe_size, seed=self.probe_seed))
            if len(self.probe.obs) < self.probe_size:  # a DataModule serves min(n, what it holds)
                rank_zero_warn(
                    f"{type(self).__name__}: probe_size={self.probe_size} transitions requested, but "
                    f"{type(trainer.datamodule).__name__} has only {len(self.probe.obs)}; the probe set is cut to "
                    f"{len(self.probe.obs)} (lower probe_size; an online DataModule draws it from the learning_starts "
                    "transitions it gathers before the first update: raise learning_starts)",
                    category=UserWarning)
        if self.probe is not None:  # the protocol run on real rows: shapes, q_network()(obs, act)
            self._check_on_probe(pl_module)

    def _check_on_probe(self, pl_module: LightningModule) -> None:
        self.core.check(pl_module)

    def _collect_from_batch(self, trainer: Trainer, batch: Any) -> None:
        if not isinstance(batch, Transitions):
            raise ProbeProtocolError(
                f"{type(self).__name__}(probe_source='batches') needs training batches of type "
                f"lit_qlearn.data.Transitions, got {type(batch).__name__}"
            )
        self._pending.append(batch.map(lambda t: t.detach().cpu()))
        if sum(len(b.obs) for b in self._pending) >= self.probe_size:
            probe = Transitions.cat(self._pending).map(lambda t: t[: self.probe_size].clone())
            self.probe = trainer.strategy.broadcast(probe, src=0)  # every rank probes rank zero's batches
            self._pending = []
            self._check_on_probe(trainer.lightning_module)

    # ----------------------------------------------------------- measuring
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Here, not at fit start: a resumed fit has restored global_step by now.
        self.cadence.start(trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        # Consulted at every batch, so a multiple passed while the probe set is still being
        # collected is skipped, not measured late.
        due = self.cadence.due(step)
        if self.probe is None:
            if self.probe_source == "batches":
                self._collect_from_batch(trainer, batch)
            return
        if due:
            self._measure_at(trainer, pl_module, step, pl_module.device)

    def _measure_at(self, trainer: Trainer | Fabric, module: Any, step: int, device: torch.device) -> None:
        """Measure ``module`` at ``step`` on the probe set (moved to ``device``) and publish."""
        self.last_step = step
        probe = self.probe.map(lambda t: t.to(device))
        with no_trace(module):
            metrics = self.measure(trainer, module, probe)
        self.publish(trainer, module, metrics, step)

    def measure(self, trainer: Trainer | Fabric, pl_module: Any, probe: Transitions) -> dict[str, float]:
        """The core meter's scalars on ``probe`` (on the module's device) at :attr:`last_step`
        (``trainer``: the Trainer, or the Fabric of a Fabric loop)."""
        return self.core.compute(pl_module, probe, self.last_step)

    def publish(self, trainer: Trainer | Fabric, pl_module: Any, metrics: dict[str, float], step: int) -> None:
        """Write ``metrics`` at ``step`` to every logger (the Trainer's or the Fabric's) and the
        Trainer's ``callback_metrics`` (:func:`lit_qlearn.probe.publish`). Every rank holds the
        same numbers: same probe set, same parameters."""
        publish(trainer, metrics, step)

    def _tensorboard(self, trainer: Trainer | Fabric) -> Any:
        """The SummaryWriter of the Trainer's (or Fabric's) TensorBoard logger, on rank zero; else None."""
        from lightning.fabric.loggers import TensorBoardLogger  # Lightning's own derives from Fabric's

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                return logger.experiment
        return None

    # ------------------------------------------------------- Lightning Fabric
    def on_fabric_setup(self, fabric: Fabric, module: Any, data: Transitions, step: int = 0) -> None:
        """Fabric's set-up point, once before the updates (and again after a resume)::

            fabric.call("on_fabric_setup", fabric=fabric, module=agent, data=transitions)

        ``module`` implements the probe protocol (a ``fabric.setup`` wrapper is unwrapped;
        :class:`lit_qlearn.monitoring.ActorCriticProbe` gives it to a critic and an actor);
        ``data`` (a :class:`~lit_qlearn.data.Transitions` batch, e.g. what the replay buffer
        holds) is what the probe set is drawn from: ``probe_size`` distinct rows chosen with
        a generator seeded ``probe_seed``, rank zero's draw broadcast to every rank. A probe
        set restored from a checkpoint (``fabric.load`` of this callback's ``state_dict``) is
        kept. ``step`` is the update count the loop starts from (the resumed step). The
        keyword names are the hook's: ``fabric.call`` gives each callback those it takes."""
        module = _unwrap(module)
        who = type(self).__name__
        check_probe_module(module, who)
        if self.probe is None:
            self.core.set_probe(fabric.broadcast(draw_probe(data, self.probe_size, self.probe_seed, who), src=0))
            if len(self.probe.obs) < self.probe_size:
                rank_zero_warn(f"{who}: probe_size={self.probe_size} transitions requested, but data holds only "
                               f"{len(self.probe.obs)}; the probe set is cut to {len(self.probe.obs)}",
                               category=UserWarning)
        self._check_on_probe(module)
        self.cadence.start(step)

    def on_fabric_update(self, fabric: Fabric, module: Any, step: int) -> None:
        """Fabric's per-update point, after each update with the update count::

            fabric.call("on_fabric_update", fabric=fabric, module=agent, step=step)

        Measures whenever ``step`` reaches or passes the next multiple of ``every_n_steps``
        and writes the scalars at ``step`` to the Fabric's loggers (``fabric.log_dict``'s
        route), the same scalars as under a Trainer."""
        if self.probe is None:
            raise RuntimeError(f"{type(self).__name__}: on_fabric_update before on_fabric_setup; call "
                               "fabric.call('on_fabric_setup', fabric=fabric, module=..., data=...) once before "
                               "the first update")
        if self.cadence.due(step):
            self._measure_at(fabric, _unwrap(module), step, fabric.device)

    # --------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {**self.core.state_dict(), "next_due": self.cadence.next_due}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.core.load_state_dict(state_dict)
        self.cadence.next_due = state_dict.get("next_due")  # None (older checkpoints): from the step at train start


class NTKGramCallback(ProbeCallback):
    """The critic's empirical NTK Gram on the fixed probe set, every ``every_n_steps`` steps
    (a Lightning adapter over :class:`lit_qlearn.monitoring.NTKMeter`).

    Logs ``ntk/diag_mean``, ``ntk/offdiag_abs_mean``, ``ntk/row_ratio_mean`` (PreQN's
    row ratio), ``ntk/cos_prev`` (kernel direction against the previous evaluation: 1
    when the kernel stops changing, the "critical step" of docs/design.md section 5.4) and
    ``ntk/cos_first`` (against the first evaluation); with ``log_heatmap=True`` also
    an image ``ntk/gram`` of the Gram to TensorBoard.

    Args:
        every_n_steps: measure at each multiple of it the step reaches or passes (:class:`ProbeCallback`).
        probe_size: number of probe transitions.
        probe_seed: seed of the probe draw (the same on every rank).
        probe_source: "datamodule" (its probe_batch) or "batches" (the first training batches).
        method: NTK engine, see :func:`lit_qlearn.ntk.ntk_gram`.
        dtype: dtype of the NTK computation (None: the parameters').
        log_heatmap: also write the Gram as an image to TensorBoard.
    """

    def __init__(self, every_n_steps: int = 1000, probe_size: int = 512, probe_seed: int = 0,
                 probe_source: str = "datamodule", method: str = "auto", dtype: torch.dtype | None = None,
                 log_heatmap: bool = False) -> None:
        core = NTKMeter(method, dtype, owner=type(self).__name__)
        super().__init__(every_n_steps, probe_size, probe_seed, probe_source, method, dtype, core=core)
        self.log_heatmap = log_heatmap

    previous = _core_attr("previous")  # the latest Gram, (N, N) on the CPU
    first = _core_attr("first")

    def options(self) -> dict[str, Any]:
        return {**super().options(), "log_heatmap": self.log_heatmap}

    def measure(self, trainer: Trainer | Fabric, pl_module: Any, probe: Transitions) -> dict[str, float]:
        metrics = super().measure(trainer, pl_module, probe)
        if self.log_heatmap:
            writer = self._tensorboard(trainer)
            if writer is not None:
                writer.add_image("ntk/gram", _heatmap(self.previous), global_step=self.last_step,
                                 dataformats="HWC")
        return metrics


class SEEMMonitor(ProbeCallback):
    """SEEM (Yue et al. 2023) on the fixed probe set, every ``every_n_steps`` steps (a
    Lightning adapter over :class:`lit_qlearn.monitoring.SEEMMeter`).

    With X = (s, a) and X* = (s', greedy_action(s')) from the probe set, A = gamma
    G(X*, X) - G(X, X). Logs ``seem/max_eig`` (largest real eigenvalue of A, with
    the authors' 1/P scaling by default), ``seem/max_eig_normalized`` (divided by
    ||A||_F, scale-free), ``seem/q_data_mean`` (Q on X), ``seem/q_policy_mean`` (Q on
    X*) and ``seem/action_cos_prev`` (cosine of the policy's actions on the probe
    states against the previous evaluation; for discrete actions the share that
    agree), ``seem/participation`` (how many probe transitions carry the top
    eigenvector, 1 to N, see :func:`lit_qlearn.ntk.participation`; the last
    eigenvector is kept as ``self.eigenvector``, one entry per probe transition); with
    ``log_spectrum=True`` also a histogram ``seem/spectrum_real`` of all eigenvalues'
    real parts (dense solver, slower).

    Reading the participation: a positive SEEM spread over many transitions (tens or
    more) is the critic's self-excitation; one carried by one or two is a few
    transitions' local one — e.g. a LayerNorm critic on medium-replay data, whose SEEM
    comes and goes, carried by one or two transitions, while Q stays bounded, where the
    diverging critics' is spread over tens (benchmarks/results/r3_norms.json,
    benchmarks/results/r3_layernorm_seem.json). Near SEEM = 0 (a stable critic) the top
    eigenvector is one of a cluster and its participation means little.

    Defaults follow the authors' code: first critic, online actor for pi(s'),
    terminal flags ignored in A, 2560 probe transitions, every 10,000 steps. The
    eigenvalue comes from restarted Arnoldi accepted at a residual below
    ``tol * ||A||_F`` (see :func:`lit_qlearn.ntk.max_real_eigenvalue`): the
    normalised SEEM is accurate to about ``tol`` (default 1e-4, well below the values
    at which the paper reads divergence). ``solver="dense"`` gives every digit, an
    order of magnitude slower at N = 2560 (timings: benchmarks/results/ntk_speed.json).

    Args:
        every_n_steps: measure at each multiple of it the step reaches or passes (:class:`ProbeCallback`).
        probe_size: number of probe transitions.
        probe_seed: seed of the probe draw (the same on every rank).
        probe_source: "datamodule" (its probe_batch) or "batches" (the first training batches).
        method: NTK engine, see :func:`lit_qlearn.ntk.ntk_gram`.
        dtype: dtype of the NTK computation (None: the parameters').
        scale_by_params: divide the Gram by the parameter count P, as the authors do.
        solver: eigen-solver, "auto", "arnoldi" or "dense".
        tol: relative residual at which the Arnoldi eigenvalue is accepted.
        log_spectrum: also write a histogram of all eigenvalues' real parts (dense, slower).
        participation: compute the top eigenvector and log ``seem/participation``
            (free with Arnoldi; where the dense solver runs, it takes longer).
    """

    def __init__(self, every_n_steps: int = 10_000, probe_size: int = 2560, probe_seed: int = 0,
                 probe_source: str = "datamodule", method: str = "auto", dtype: torch.dtype | None = None,
                 scale_by_params: bool = True, solver: str = "auto", tol: float = 1e-4,
                 log_spectrum: bool = False, participation: bool = True) -> None:
        core = SEEMMeter(method, dtype, scale_by_params=scale_by_params, solver=solver, tol=tol,
                         spectrum=log_spectrum, participation=participation, owner="SEEMMonitor")
        super().__init__(every_n_steps, probe_size, probe_seed, probe_source, method, dtype, core=core)
        self.scale_by_params = scale_by_params
        self.solver = solver
        self.tol = tol
        self.log_spectrum = log_spectrum
        self.participation = participation

    previous_actions = _core_attr("previous_actions")
    eigenvector = _core_attr("eigenvector")  # (N,), the latest top eigenvector

    def options(self) -> dict[str, Any]:
        return {**super().options(), "scale_by_params": self.scale_by_params, "solver": self.solver, "tol": self.tol,
                "log_spectrum": self.log_spectrum, "participation": self.participation}

    def measure(self, trainer: Trainer | Fabric, pl_module: Any, probe: Transitions) -> dict[str, float]:
        metrics = super().measure(trainer, pl_module, probe)
        if self.log_spectrum and self.core.eigenvalues is not None:
            writer = self._tensorboard(trainer)
            if writer is not None:
                writer.add_histogram("seem/spectrum_real", self.core.eigenvalues.real, global_step=self.last_step)
        return metrics


def _heatmap(gram: Tensor) -> Tensor:
    """``(N, N, 3)`` uint8 image of a Gram, blue (negative) - white (0) - red (positive)."""
    g = gram.double()
    g = g / g.abs().max().clamp_min(1e-30)
    pos, neg = g.clamp(min=0), (-g).clamp(min=0)
    rgb = torch.stack([1 - neg, 1 - pos - neg, 1 - pos], dim=-1).clamp(0, 1)
    return (rgb * 255).to(torch.uint8)
