"""CrashPredictor: measure the crash laws' quantities on the probe set, publish the
forecasts as ``crash/*``, and act before the critic diverges (Yue et al. 2023,
Theorems 3-4; docs/design.md section 5.4).

The measurements, the fits and the verdict (healthy or not, and why) are
:class:`lit_qlearn.monitoring.CrashMeter`'s, the laws pure maths in :mod:`lit_qlearn.forecast`;
this callback adapts the meter to a Trainer and acts. Keeping the last healthy state is
:class:`~lit_qlearn.callbacks.healthy.HealthyCheckpoint`'s job.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.fabric import Fabric
from lightning.fabric.wrappers import is_wrapped
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lit_qlearn.callbacks.healthy import FabricHealthyState, Held, HealthyCheckpoint, all_finite
from lit_qlearn.callbacks.monitors import ProbeCallback, _core_attr, _unwrap
from lit_qlearn.callbacks.remedies import as_remedy, remedy_name
from lit_qlearn.monitoring import CrashMeter, _actions_moved  # noqa: F401 - _actions_moved: imported from here too
from lit_qlearn.ntk import check_choice
from lit_qlearn.probe import critic_members, publish

if TYPE_CHECKING:
    from lit_qlearn.data.types import Transitions

__all__ = ["CrashPredictor"]


ACTIONS = ("warn", "stop", "checkpoint_and_stop", "rollback")


class CrashPredictor(ProbeCallback):
    """Forecast the step at which the critic diverges, and act before it does (a Lightning
    adapter over :class:`lit_qlearn.monitoring.CrashMeter`, which measures and judges).

    Every ``every_n_steps`` steps the TD-error vector ``u = Q(X) - (r + gamma (1 - d)
    Q(X*))`` is computed on the fixed probe set (``X* = (s', greedy_action(s'))``, the
    probe protocol), and ``||u||`` is kept in a sliding window of ``window``
    measurements. Two laws of Yue et al. (2023, docs/design.md section 5.4) are fitted on it
    (:func:`lit_qlearn.forecast.forecast`):

    * **SGD**: ``||u||^(-(2L-2)/L)`` falls linearly and reaches zero at the crash step
      (:func:`~lit_qlearn.forecast.predict_crash_step`). Logged: ``crash/predicted_step``,
      ``crash/steps_left`` and ``crash/fit_r2``, when the line falls with R^2 >=
      ``min_r2``. Not under the Adam law, where this line keeps receding.
    * **Adam**: no finite crash time; ``||u|| = Theta(t^L)`` and ``||theta||`` grows by
      ``eta sqrt(P)`` per step. Logged (under both laws): ``crash/loglog_slope``
      (slope of log ||u|| against log t, compare with L), ``params/norm``,
      ``params/norm_slope`` (compare with ``params/adam_slope`` = eta sqrt(P) when the
      critic's optimiser has betas), and, extrapolating the log-log line,
      ``crash/threshold_step`` and ``crash/threshold_steps_left``: when ``||u||``
      will cross ``threshold``.

    ``law="auto"`` takes the Adam law when the optimiser holding the critic's
    parameters has ``betas`` (Adam, AdamW, ...), else the SGD law.

    **The Bellman bound.** No true Q-value exceeds ``max|r| / (1 - gamma)`` in absolute
    value, so a critic beyond it has diverged for certain, whatever the laws say.
    ``max|r|`` comes from the DataModule's rewards when it exposes them (``data.rew``,
    as :class:`~lit_qlearn.data.OfflineDataModule` does), else from the probe set's
    (a sample: the bound may then be too tight; pass ``q_bound=`` when you know
    better). Logged: ``crash/q_bound_ratio`` = the *largest* ``|Q|`` on the probe set,
    over its ``(s, a)`` and its bootstrap points ``(s', greedy_action(s'))``, divided
    by the bound: the maximum, not the mean, because a single Q-value beyond the bound
    is already impossible, and the bootstrap points are where an unconstrained critic
    blows up first. With zero rewards (bound 0) or ``gamma = 1`` there is no bound
    unless ``q_bound`` is given.

    ``crash/td_error_norm`` is logged at every measurement.

    The theorem holds after the *critical step*, when the greedy actions stop
    changing; with ``restart_on_action_change`` the window restarts after every
    measurement at which the greedy actions on the probe set moved by more than
    ``action_rtol`` (relative L2 change; any change of a discrete action counts),
    keeping at least ``min_points`` measurements.

    **Acting.** A measurement is *unhealthy* when the earliest forecast (crash step, or
    threshold crossing) is at most ``horizon`` steps away, when ``crash/q_bound_ratio``
    exceeds 1, or when the critic is non-finite on the probe set. At the first
    unhealthy measurement ``action`` happens, once:

    * ``"warn"``: a warning saying why;
    * ``"stop"``: the Trainer stops after this step;
    * ``"checkpoint_and_stop"``: the Trainer stops and the state of the *last healthy
      measurement* (the one before) is written to ``dirpath`` (default
      ``<log_dir>/checkpoints``) as ``last-healthy-step=<step>.ckpt``; its path is
      :attr:`checkpoint_path`, its step :attr:`healthy_step`. The file is the checkpoint
      ``Trainer.save_checkpoint`` would have written at that step, taken where a
      ``ModelCheckpoint`` takes it (after every other callback's ``on_train_batch_end``):
      weights, target networks, optimiser states, loop counters and ``global_step``, the
      module's update count and random states, the callbacks' and the DataModule's
      states, all of that step. So ``fit(ckpt_path=...)`` goes on from that step exactly
      as from an ordinary checkpoint of it. A :class:`~lit_qlearn.callbacks.HealthyCheckpoint`
      (:attr:`healthy`) takes that checkpoint at every healthy measurement, to a hidden
      file in ``dirpath`` named after :attr:`state_key`, and renames it at detection; a
      run without detection, or one that raises, leaves nothing behind. A healthy
      measurement whose weights or optimiser states are not all finite (a NaN the probe
      does not see) is not kept: the file is then that of the last healthy measurement
      before it whose state was finite. Nothing is written when no measurement was
      healthy with a finite state.
    * ``"rollback"``: the run goes back to a healthy state, in place, applies
      ``remedy`` and trains on (see below); after ``max_rollbacks`` rollbacks, or when no
      healthy state is held yet, it acts as ``"checkpoint_and_stop"``.

    **Rolling back.** With ``action="rollback"`` the checkpoints of the last ``keep``
    healthy measurements are held (``keep`` files), each with its ``max|Q| / bound``. At
    the end of the unhealthy step's batch, after every other callback saw the step (as a
    ``ModelCheckpoint`` would), one of them is loaded back: the module's weights (target
    networks and buffers included), the optimisers' states and the learning-rate
    schedulers' states (:meth:`HealthyCheckpoint.restore`). Which one
    (:meth:`rollback_point`): the newest whose ratio is at most ``rollback_ratio`` times
    the last healthy measurement's, else the oldest held. Why not simply the last healthy
    state: a diverging critic's Q grows geometrically, so the last healthy state sits one
    measurement from the bound, where a remedy that slows the growth has almost no room
    (benchmarks/results/rescue.json measures both); ``rollback_ratio=1`` restores the last
    healthy state. Then ``remedy`` (:mod:`lit_qlearn.callbacks.remedies`, a list is
    composed) changes that state, and the result is held, alone, as the checkpoint of the
    current step, so that a further rollback starts from it and applies the remedy again
    (the remedies compound: a learning rate halved twice is a quarter) and never goes back
    past it. What is *not* rolled back, and why:

    * the step axis: ``global_step`` and the module's update count keep counting (loggers
      need a monotonic step; the updates after the healthy step were spent). At the
      rollback's step ``crash/rollbacks`` (the count so far) and ``crash/rollback_to``
      (the step whose state was restored: a healthy measurement's, or an earlier
      rollback's remedied state) are published;
    * the random streams: they go on, so the run after the rollback draws fresh
      minibatches and exploration noise instead of replaying the ones that led to the
      divergence (the remedies draw from their own seeded generators);
    * the data: an online DataModule's replay buffer keeps the transitions gathered
      since the healthy step (they are valid experience, and the buffer is not in the
      module's state);
    * the other callbacks' states (an ``EMATarget``'s count, a monitor's history).

    This predictor's own window restarts: the measurements before the rollback
    describe a trajectory that was undone, and the remedied run follows laws of its own
    (another learning rate, another target rule). Each rollback is a warning and an entry
    ``{"step", "restored_to", "remedy"}`` (the remedy's description) in
    :attr:`rollbacks`, kept in the callback's checkpointed state. Under DDP every rank
    rolls back at the same step (the decision is reduced) from the one file rank zero
    wrote, and the remedies are deterministic, so the ranks stay identical.

    A NaN between measurements is seen at the next one; with ``guard=True`` the action
    happens at once (``"stop"``, ``"checkpoint_and_stop"``, ``"rollback"``): the critic's parameters
    (those of ``q_networks()``, else ``q_network()``: where a divergence starts) are
    then checked after every step with one fused norm (non-finite, or so large that
    the norm overflows). The kept checkpoint does not need it (its own finiteness check
    keeps a NaN out); it saves the updates a run would spend on NaN weights until the
    next measurement, which Lightning 2 does not stop by itself (``EarlyStopping``'s
    ``check_finite`` looks at a metric at epoch or validation ends only). It reads the
    critic's weights once per step, and synchronises once per step on a GPU, hence off
    by default; its cost is ``overhead.crash_predictor`` in
    benchmarks/results/crash_prediction.json.

    Under DDP every rank measures the same probe set with the same parameters; the
    decision is nevertheless reduced across ranks, one reduction per measurement (and
    per step with ``guard``), as Lightning's ``EarlyStopping`` reduces its stop, so that
    every rank acts at the same step and rank zero writes the checkpoint whichever rank
    saw the divergence.

    **In a Lightning Fabric loop** (``Fabric(callbacks=[...])``) the loop calls
    :meth:`on_fabric_setup`, :meth:`on_fabric_update` and :meth:`on_fabric_end` with
    ``fabric.call``; ``"warn"``, ``"stop"`` (the loop breaks on :attr:`should_stop`) and
    ``"checkpoint_and_stop"`` (of the loop's ``fabric.save`` dict) work there, ``"rollback"``
    needs the Trainer.

    Args:
        every_n_steps: measure at each multiple of it the step reaches or passes
            (:class:`~lit_qlearn.callbacks.ProbeCallback`).
        probe_size: number of probe transitions.
        probe_seed: seed of the probe draw.
        probe_source: ``"datamodule"`` or ``"batches"``, see :class:`ProbeCallback`.
        window: measurements the laws are fitted on (>= 2).
        min_points: fewest measurements a forecast is made from.
        num_layers: L of the crash law; ``None`` counts the ``nn.Linear`` layers of
            ``q_network()``.
        min_r2: fits with a lower R^2 make no forecast.
        threshold: the ``||u||`` that counts as diverged for the threshold forecast
            (1e6, the paper's divergence threshold).
        action: ``"warn"``, ``"stop"``, ``"checkpoint_and_stop"`` or ``"rollback"``.
        horizon: act when the forecast is at most this many steps away
            (default ``10 * every_n_steps``).
        restart_on_action_change: restart the window when the greedy actions move.
        action_rtol: the relative change of the greedy actions that counts as a move.
        dirpath: where ``"checkpoint_and_stop"`` writes.
        law: ``"auto"``, ``"sgd"`` or ``"adam"`` (see above).
        guard: also check the critic's parameters for finiteness after every step.
        q_bound: the largest ``|Q|`` that is possible (default: ``max|r| / (1 - gamma)``,
            see above); ``math.inf`` disables the bound.
        remedy: with ``action="rollback"``: what changes the restored state (an object
            with ``apply(trainer, pl_module) -> str``, a list of them, or None: a plain
            rollback), see :mod:`lit_qlearn.callbacks.remedies`.
        max_rollbacks: with ``action="rollback"``: rollbacks before acting as
            ``"checkpoint_and_stop"`` (>= 0).
        rollback_ratio: with ``action="rollback"``: how far back a rollback goes, in (0, 1]
            (see above; 1: the last healthy state).
        keep: with ``action="rollback"``: how many healthy measurements' checkpoints are
            held (>= 1); the others keep one.
    """

    def __init__(self, every_n_steps: int = 100, probe_size: int = 2560, probe_seed: int = 0,
                 probe_source: str = "datamodule", window: int = 20, min_points: int = 5,
                 num_layers: int | None = None, min_r2: float = 0.9, threshold: float = 1e6,
                 action: str = "warn", horizon: int | None = None, restart_on_action_change: bool = True,
                 action_rtol: float = 1e-2, dirpath: str | os.PathLike | None = None, law: str = "auto",
                 guard: bool = False, q_bound: float | None = None, remedy: Any = None,
                 max_rollbacks: int = 3, rollback_ratio: float = 0.5, keep: int = 8) -> None:
        check_choice("CrashPredictor", "action", action, ACTIONS)
        if horizon is None and isinstance(every_n_steps, int) and every_n_steps >= 1:  # else ProbeCallback says why
            horizon = 10 * every_n_steps  # ten measurements ahead
        core = CrashMeter(window=window, min_points=min_points, num_layers=num_layers, min_r2=min_r2,
                          threshold=threshold, horizon=horizon, restart_on_action_change=restart_on_action_change,
                          action_rtol=action_rtol, law=law, q_bound=q_bound, owner="CrashPredictor")
        super().__init__(every_n_steps, probe_size, probe_seed, probe_source, core=core)
        if isinstance(max_rollbacks, bool) or not isinstance(max_rollbacks, int) or max_rollbacks < 0:
            raise ValueError(f"CrashPredictor: max_rollbacks must be an integer >= 0, got {max_rollbacks!r}")
        if remedy is not None and action != "rollback":
            raise ValueError(f"CrashPredictor: remedy is applied after a rollback, it needs action='rollback', got "
                             f"action={action!r}")
        try:
            self.remedy = as_remedy(remedy)
        except (TypeError, ValueError) as err:
            raise ValueError(f"CrashPredictor: {err}") from None
        self.max_rollbacks = max_rollbacks
        if isinstance(rollback_ratio, bool) or not isinstance(rollback_ratio, (int, float)) \
                or not 0 < rollback_ratio <= 1:
            raise ValueError(f"CrashPredictor: rollback_ratio must be a number in (0, 1], got {rollback_ratio!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"CrashPredictor: keep must be an integer >= 1, got {keep!r}")
        self.rollback_ratio = float(rollback_ratio)
        self.keep = keep
        self.action = action
        self.dirpath = dirpath
        self.guard = bool(guard)
        # State (checkpointed, beside the meter's window, actions and forecast): what was done.
        self.fired = False
        self.checkpoint_path: str | None = None
        self.healthy_step: int | None = None
        self.stopped_step: int | None = None
        #: The rollbacks done: ``{"step", "restored_to", "remedy"}`` each (action "rollback").
        self.rollbacks: list[dict[str, Any]] = []
        # The keeper of the last healthy state, made at each fit's setup (not checkpointed: it is its own file).
        self.healthy: HealthyCheckpoint | None = None
        self._guarded: list[Tensor] = []
        self._ratio: float | None = None  # max|Q| / bound at the latest measurement

    # The meter's options and state, read and written there.
    window = _core_attr("window")
    min_points = _core_attr("min_points")
    num_layers = _core_attr("num_layers")
    min_r2 = _core_attr("min_r2")
    threshold = _core_attr("threshold")
    horizon = _core_attr("horizon")
    restart_on_action_change = _core_attr("restart_on_action_change")
    action_rtol = _core_attr("action_rtol")
    law = _core_attr("law")
    q_bound = _core_attr("q_bound")
    #: ``(step, ||u||, ||theta||)`` of the laws' current window.
    history = _core_attr("history")
    previous_actions = _core_attr("previous_actions")
    #: The latest forecast's ``crash/*`` scalars.
    forecast = _core_attr("forecast")
    #: The largest possible ``|Q|``, resolved at the first measurement of a fit (None: no bound).
    bound = _core_attr("bound")

    def options(self) -> dict[str, Any]:
        return {**super().options(), "window": self.window, "min_points": self.min_points,
                "num_layers": self.num_layers, "min_r2": self.min_r2, "threshold": self.threshold,
                "action": self.action, "horizon": self.horizon,
                "restart_on_action_change": self.restart_on_action_change, "action_rtol": self.action_rtol,
                "dirpath": None if self.dirpath is None else os.fspath(self.dirpath), "law": self.law,
                "guard": self.guard, "q_bound": self.q_bound,
                # Only with rollbacks, so that the other actions' keys are those of older checkpoints.
                **({"remedy": remedy_name(self.remedy), "max_rollbacks": self.max_rollbacks,
                    "rollback_ratio": self.rollback_ratio, "keep": self.keep}
                   if self.action == "rollback" else {})}

    # --------------------------------------------------------------- set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.action in ("checkpoint_and_stop", "rollback"):
            if isinstance(self.healthy, HealthyCheckpoint):  # one left attached by a fit that raised (no teardown)
                self.healthy.detach(trainer)
            # Placed after every other callback and before the checkpoint callbacks, the very
            # point where a ModelCheckpoint of that step dumps its state.
            # Rolling back may go further back than the last healthy step: keep that many.
            self.healthy = HealthyCheckpoint(self.state_key, self.dirpath,
                                             keep=self.keep if self.action == "rollback" else 1)
            self.healthy.attach(trainer)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.core.setup(pl_module, trainer.optimizers, rewards=_data_rewards(trainer))
        self._guarded = [p for net in critic_members(pl_module) for p in net.parameters()]
        check = getattr(self.remedy, "setup", None)
        if callable(check):  # here: the module is built and the optimisers exist
            check(trainer, pl_module)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._guarded = []  # no references to the module's parameters outlive the run
        undo = getattr(self.remedy, "teardown", None)
        if callable(undo):  # a remedy that attached something to the Trainer (PreQNStep)
            undo(trainer)
        if isinstance(self.healthy, HealthyCheckpoint):  # no detection (else kept already): nothing left behind
            self.healthy.detach(trainer)
        super().teardown(trainer, pl_module, stage)

    # ------------------------------------------------------- Lightning Fabric
    def on_fabric_setup(self, fabric: Fabric, module: Any, data: Transitions, step: int = 0,
                        optimizers: Sequence[Any] = (), state: dict[str, Any] | None = None) -> None:
        """Fabric's set-up point (:meth:`ProbeCallback.on_fabric_setup`), with two more keywords::

            fabric.call("on_fabric_setup", fabric=fabric, module=agent, data=transitions,
                        optimizers=[critic_optimizer], state=state)

        The Bellman bound's ``max|r|`` is that of ``data.rew``; ``optimizers`` (the critic's,
        ``fabric.setup`` wrappers or not) decide ``law="auto"`` and the Adam reference, as a
        Trainer's optimisers do; ``state`` is the dict the loop saves with ``fabric.save``,
        needed by ``action="checkpoint_and_stop"``: at each healthy measurement it is held
        (:class:`~lit_qlearn.callbacks.healthy.FabricHealthyState`), and at detection the
        last healthy one is kept as ``<dirpath>/last-healthy-step=<step>.ckpt`` (default
        dirpath: the Fabric logger's ``log_dir``/checkpoints), for ``fabric.load(path, state)``.
        ``"rollback"`` needs a Trainer (it restores schedulers and applies remedies through
        it) and is refused here. After an unhealthy measurement :attr:`should_stop` is true
        (actions other than ``"warn"``): the loop breaks on it."""
        if self.action == "rollback":
            raise ValueError("CrashPredictor: action='rollback' rolls a Trainer's run back (its checkpoints, "
                             "schedulers and remedies); in a Fabric loop use 'warn', 'stop' or 'checkpoint_and_stop' "
                             "and fabric.load the kept file")
        if self.action == "checkpoint_and_stop" and state is None:
            raise ValueError("CrashPredictor: action='checkpoint_and_stop' under Fabric needs state=, the dict the "
                             "loop saves with fabric.save (modules, optimisers), to keep its last healthy state")
        dirpath = self._fabric_dirpath(fabric) if self.action == "checkpoint_and_stop" else None
        super().on_fabric_setup(fabric, module, data, step)
        module = _unwrap(module)
        self.core.setup(module, [o.optimizer if is_wrapped(o) else o for o in optimizers], rewards=data.rew)
        self._guarded = [p for net in critic_members(module) for p in net.parameters()]
        if dirpath is not None:
            if isinstance(self.healthy, FabricHealthyState):
                self.healthy.discard()
            self.healthy = FabricHealthyState(fabric, state, self.state_key, dirpath)

    def on_fabric_update(self, fabric: Fabric, module: Any, step: int) -> None:
        """Fabric's per-update point (:meth:`ProbeCallback.on_fabric_update`); with ``guard``,
        the critic's parameters are checked after every update, as under a Trainer."""
        if self.guard and self.action != "warn" and not self.should_stop and self._guarded:
            if _any_rank(fabric, not all_finite(self._guarded)):
                self._act(fabric, module, step, ["the critic's parameters became non-finite"])
                return
        if not self.should_stop:
            super().on_fabric_update(fabric, module, step)

    def on_fabric_end(self, fabric: Fabric) -> None:
        """Fabric's end point, ``fabric.call("on_fabric_end", fabric=fabric)`` after the loop:
        the hidden files of the held healthy state are removed (a kept file stays)."""
        if isinstance(self.healthy, FabricHealthyState):
            self.healthy.discard()
        self._guarded = []

    def _fabric_dirpath(self, fabric: Fabric) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        log_dir = getattr(fabric.logger, "log_dir", None) if fabric.loggers else None
        if log_dir is None:
            raise ValueError("CrashPredictor: action='checkpoint_and_stop' under Fabric writes to dirpath=, and the "
                             "Fabric has no logger with a log_dir to default to: pass dirpath")
        return Path(log_dir) / "checkpoints"

    @property
    def should_stop(self) -> bool:
        """Whether an unhealthy measurement stopped the run (any action but ``"warn"``): a
        Trainer stops by itself, a Fabric loop breaks on it."""
        return self.fired and self.action != "warn"

    # ------------------------------------------------------------ measuring
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.guard and self.action != "warn" and not trainer.should_stop:
            broken = _any_rank(trainer, not all_finite(self._guarded))
            if broken:
                self._act(trainer, pl_module, trainer.global_step, ["the critic's parameters became non-finite"])
                return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def measure(self, trainer: Trainer, pl_module: LightningModule, probe: Transitions) -> dict[str, float]:
        metrics = super().measure(trainer, pl_module, probe)  # the meter's scalars and verdict
        self._ratio = metrics.get("crash/q_bound_ratio")  # kept beside a healthy checkpoint, read by a rollback
        self.decide(trainer, pl_module, self.last_step, self.core.reasons)
        return metrics

    # ------------------------------------------------------------ acting
    def decide(self, trainer: Trainer, pl_module: LightningModule, step: int, reasons: list[str]) -> None:
        """Act on this measurement: unhealthy on any rank (one reduction, as Lightning's
        ``EarlyStopping`` reduces its stop, so every rank acts the same at the same step)
        fires ``action`` once; healthy, the step's checkpoint is kept (``checkpoint_and_stop``)."""
        if not _any_rank(trainer, bool(reasons)):
            if self.healthy is not None and not self.fired:
                # taken at the end of the batch, once every other callback saw it; with its ratio
                # (the same on every rank: one probe, one set of parameters), which a rollback reads
                self.healthy.mark(step, self._ratio)
        elif not self.fired:
            self._act(trainer, pl_module, step, reasons)

    def _act(self, trainer: Trainer, pl_module: LightningModule, step: int, reasons: list[str]) -> None:
        why = "; ".join(reasons) or "another rank saw the critic diverge"
        message = f"CrashPredictor at step {step}: {why}"
        if self.action == "rollback":
            held = self.healthy is not None and self.healthy.path is not None  # the same on every rank
            if held and len(self.rollbacks) < self.max_rollbacks:
                # Done by the keeper at the end of this batch, after every other callback saw the step.
                self.healthy.roll_back(lambda t, m, restored: self._roll_back(t, m, step, restored, message),
                                       self.rollback_point)
                return
            message += (f"; {len(self.rollbacks)} rollback(s) done, max_rollbacks={self.max_rollbacks}" if held
                        else "; no healthy state is held to roll back to")
        self.fired = True
        self.stopped_step = step
        if self.action == "warn":
            rank_zero_warn(message)
            return
        if self.action in ("checkpoint_and_stop", "rollback"):
            message += "; " + self._write_healthy(trainer)
        rank_zero_warn(message + "; training stops")
        if isinstance(trainer, Trainer):  # a Fabric loop reads self.should_stop
            trainer.should_stop = True

    def rollback_point(self, held: list[Held]) -> int:
        """Which held healthy state a rollback restores (an index into ``held``, oldest
        first): the newest whose ``max|Q| / bound`` is at most ``rollback_ratio`` times the
        newest one's, else the oldest held. A state without a ratio (the remedied state of
        an earlier rollback, or a run without a bound) qualifies: a rollback never goes
        past an earlier remedy."""
        reference = held[-1].value
        if reference is None:
            return len(held) - 1
        return next((i for i in range(len(held) - 1, -1, -1)
                     if held[i].value is None or held[i].value <= self.rollback_ratio * reference), 0)

    def _roll_back(self, trainer: Trainer, pl_module: LightningModule, step: int, restored: int,
                   message: str) -> None:
        """Called by :attr:`healthy` once it restored the state of step ``restored``: apply
        the remedy, restart the window, record and publish."""
        done = "no remedy" if self.remedy is None else str(self.remedy.apply(trainer, pl_module))
        self.rollbacks.append({"step": step, "restored_to": restored, "remedy": done})
        self.core.restart()  # the laws' window: its measurements describe the trajectory undone
        publish(trainer, {"crash/rollbacks": len(self.rollbacks), "crash/rollback_to": restored}, step)
        rank_zero_warn(f"{message}; rolled back to the state of step {restored} ({done}); rollback "
                       f"{len(self.rollbacks)} of at most {self.max_rollbacks}, training goes on")

    def _write_healthy(self, trainer: Trainer) -> str:
        """Keep the last healthy checkpoint as ``last-healthy-step=<step>.ckpt``; return what
        was done, for the warning. The live run is untouched and ends in the state it reached."""
        path = self.healthy.keep(trainer) if self.healthy is not None else None
        if path is None:  # the same on every rank: captures are collective
            return "no measurement before was healthy with a finite state, no checkpoint is written"
        self.healthy_step, self.checkpoint_path = self.healthy.step, str(path)
        return f"the state of the last healthy measurement (step {self.healthy_step}) is written to {path}"

    # --------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "fired": self.fired, "checkpoint_path": self.checkpoint_path,
                "healthy_step": self.healthy_step, "stopped_step": self.stopped_step,
                "rollbacks": [dict(r) for r in self.rollbacks]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.fired = bool(state_dict.get("fired", False))
        self.checkpoint_path = state_dict.get("checkpoint_path")
        self.healthy_step = state_dict.get("healthy_step")
        self.stopped_step = state_dict.get("stopped_step")
        self.rollbacks = [dict(r) for r in state_dict.get("rollbacks", [])]


def _any_rank(trainer: Trainer, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (one device: ``flag``)."""
    return bool(trainer.strategy.reduce_boolean_decision(bool(flag), all=False))


def _data_rewards(trainer: Trainer) -> Tensor | None:
    """The DataModule's rewards when it exposes them (``data.rew``, as OfflineDataModule does)."""
    rewards = getattr(getattr(trainer.datamodule, "data", None), "rew", None)
    return rewards if isinstance(rewards, Tensor) and rewards.numel() > 0 else None
