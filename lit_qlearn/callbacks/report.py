"""HealthReport: an end-of-run summary of what the monitors measured, printed and written
as JSON beside the logs, and the critic's Q and ``crash/q_bound_ratio`` in the progress bar
while training (docs/design.md section 9).

It reads the monitors attached to the same Trainer (found by type): the scalars they
publish (:func:`lit_qlearn.probe.publish`) and the :class:`CrashPredictor`'s public state;
it measures nothing itself.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from lit_qlearn.callbacks.crash import CrashPredictor
from lit_qlearn.callbacks.monitors import SEEMMonitor
from lit_qlearn.callbacks.plasticity import PlasticityMonitor

__all__ = ["HealthReport", "carried_by", "forecast_text", "table"]

# What each monitor publishes that the report keeps, one row per measurement.
TRACKED: dict[str, tuple[type, tuple[str, ...]]] = {
    "crash": (CrashPredictor, ("crash/q_bound_ratio",)),
    "seem": (SEEMMonitor, ("seem/max_eig_normalized", "seem/participation", "seem/q_data_mean")),
    "plasticity": (PlasticityMonitor, ("plasticity/dormant_fraction", "plasticity/feature_rank")),
}
# The critic's mean Q in the bar: the module's own on its training batch (lit_qlearn's
# algorithms log it), else SEEMMonitor's on the probe set; the first present is shown.
BAR_Q = ("q/data_mean", "seem/q_data_mean")
BAR_RATIO = "crash/q_bound_ratio"
# Normalised SEEM above which a measurement counts as positive (self-exciting) when the
# participation of its top eigenvector is summarised.
SEEM_POSITIVE = 0.05


def carried_by(seem: list[float], participation: list[float], threshold: float = SEEM_POSITIVE) -> float | None:
    """Median participation (``seem/participation``, one per measurement) over the
    measurements whose normalised SEEM is above ``threshold``; None when there is none.
    ``seem`` and ``participation`` are aligned, one entry per measurement."""
    values = [p for s, p in zip(seem, participation) if s > threshold and math.isfinite(p)]
    return statistics.median(values) if values else None


def forecast_text(forecast: dict[str, float], threshold: float = 1e6) -> str:
    """One line for a :attr:`CrashPredictor.forecast` dict: the SGD law's crash step, else the
    Adam law's crossing of ``threshold`` (the predictor's), else ``"none"``."""
    def when(step: float) -> str:  # a far extrapolation is only an order of magnitude
        return f"{step:.0f}" if step < 1e7 else f"~{step:.1g}"

    if "crash/predicted_step" in forecast:
        return f"crash at update {when(forecast['crash/predicted_step'])}"
    if "crash/threshold_step" in forecast:
        return f"||u|| > {threshold:.3g} at update {when(forecast['crash/threshold_step'])}".replace("e+0", "e")
    return "none"


class HealthReport(Callback):
    """At the end of a fit (also one ended by an exception), on rank zero: a table of what
    the attached monitors measured, printed and written as JSON to ``path`` (default
    ``<trainer.log_dir>/health.json``). While training, the progress bar shows the
    critic's mean Q (``q/data_mean`` when the module logs it, else ``seem/q_data_mean``)
    and, with a :class:`CrashPredictor`, ``crash/q_bound_ratio``.

    Sections, each present only when its monitor is attached (a missing monitor's numbers
    are absent, never zero); values a monitor has not measured yet are absent too:

    * ``crash`` (:class:`CrashPredictor`): ``bound`` (``max|r|/(1-gamma)`` or ``q_bound``),
      ``peak_q_bound_ratio`` and ``peak_step`` (the largest max|Q|/bound measured and its
      update), ``last_q_bound_ratio``, ``forecast`` (the predictor's last forecast dict)
      and ``forecast_text``, ``action``, ``stopped_step`` (the update it acted at),
      ``healthy_step`` and ``checkpoint_path`` (the healthy checkpoint kept), and
      ``rollbacks`` when the predictor has that attribute;
    * ``seem`` (:class:`SEEMMonitor`): ``min`` / ``max`` / ``last`` of the normalised SEEM,
      ``positive`` (measurements above ``SEEM_POSITIVE``), ``carried_by`` (their median
      participation, :func:`carried_by`), ``q_probe_mean`` (the last mean Q on the probe);
    * ``plasticity`` (:class:`PlasticityMonitor`): the last ``dormant_fraction`` and
      ``feature_rank``, and the run's highest dormant fraction and lowest feature rank.

    Each section has ``measurements`` (how many) and the top level ``step`` (the update
    count at the end) and ``ended`` (``"finished"``, or the exception). The numbers are
    those ``trainer.callback_metrics`` holds (float32 tensors, as published); non-finite
    ones are written as null. Of two monitors of one type, the first is read (they publish
    under the same names). The report keeps one row per measurement of the numbers above
    (checkpointed, so a resumed fit reports the whole run; a state loaded while rows are
    already held, as a rollback in place would, does not erase them).

    Args:
        path: where the JSON goes (default ``<trainer.log_dir>/health.json``, or
            ``<default_root_dir>/health.json`` when the first logger has no directory).
        progress_bar: show the critic's Q and ``crash/q_bound_ratio`` in the bar.
        verbose: print the table at the end.
    """

    def __init__(self, path: str | os.PathLike | None = None, progress_bar: bool = True, verbose: bool = True) -> None:
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"HealthReport: path must be a str, an os.PathLike or None, got {type(path).__name__}")
        self.path = None if path is None else Path(path)
        self.progress_bar = bool(progress_bar)
        self.verbose = bool(verbose)
        # State: per section, one (step, {name: value}) row per measurement seen.
        self.rows: dict[str, list[tuple[int, dict[str, float]]]] = {}
        self.summary: dict[str, Any] | None = None  # the last report written
        self.written: Path | None = None
        self._seen: dict[str, Any] = {}  # the last published tensor of each name (identity marks a new one)
        self._shown: dict[str, tuple[Any, float]] = {}  # name -> (tensor last shown, its value)
        self._monitors: dict[str, Any] = {}
        self._target: Path | None = None

    # ---------------------------------------------------------------- set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # A fresh record per fit; a resumed fit's checkpoint loads the earlier rows after this.
        self.rows, self._seen, self.summary, self.written = {}, {}, None, None
        self._monitors = {}
        for section, (kind, _) in TRACKED.items():
            found = next((c for c in trainer.callbacks if isinstance(c, kind)), None)
            if found is not None:
                self._monitors[section] = found
                self.rows[section] = []
        # trainer.log_dir broadcasts (a collective): resolved here, where every rank runs,
        # not at an exception, which may reach one rank only.
        if self.path is not None:
            self._target = self.path
        else:
            log_dir = trainer.log_dir
            self._target = Path(log_dir if log_dir is not None else trainer.default_root_dir) / "health.json"

    # -------------------------------------------------------------- tracking
    def _collect(self, trainer: Trainer) -> None:
        """Keep the numbers each monitor published since the last look, at the current step.
        ``publish`` writes a new tensor per measurement, so a tensor not seen before is a new
        measurement (an unchanged value included); looking at every batch's start and end
        catches it at the step it was measured, whichever callback runs first."""
        metrics = trainer.callback_metrics
        step = trainer.global_step
        for section in self._monitors:
            new = {}
            for name in TRACKED[section][1]:
                value = metrics.get(name)
                if value is not None and value is not self._seen.get(name):
                    self._seen[name] = value
                    new[name] = float(value)
            if new:
                rows = self.rows[section]
                if rows and rows[-1][0] == step:  # the rest of the same measurement
                    rows[-1][1].update(new)
                else:
                    rows.append((step, new))

    def _show(self, trainer: Trainer) -> None:
        metrics = trainer.callback_metrics
        names = [name for name in (next((n for n in BAR_Q if n in metrics), None),
                                   BAR_RATIO if "crash" in self._monitors else None) if name in metrics]
        # float() of a device tensor waits for the device: only a newly published value is read
        for name in names:
            if name not in self._shown or metrics[name] is not self._shown[name][0]:
                self._shown[name] = (metrics[name], float(metrics[name]))
        shown = {name: self._shown[name][1] for name in names}
        # The bar shows trainer.progress_bar_metrics (TQDMProgressBar.get_metrics); the dict it
        # returns is the one the bar reads. Written directly, not with pl_module.log(prog_bar=True):
        # a logged name is copied back into callback_metrics at every read, which would put the
        # previous value over the monitors' newer one.
        trainer.progress_bar_metrics.update(shown)

    def _look(self, trainer: Trainer) -> None:
        self._collect(trainer)
        if self.progress_bar:
            self._show(trainer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._look(trainer)  # what a monitor after this callback published at the previous batch's end

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._look(trainer)

    # ------------------------------------------------------------- reporting
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._look(trainer)
        self._report(trainer, "finished")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._target is None:  # raised before setup: nothing was measured
            return
        self._look(trainer)
        self._report(trainer, f"{type(exception).__name__}: {exception}")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # no references to this fit's callbacks and tensors outlive it
            self._seen, self._shown, self._monitors, self._target = {}, {}, {}, None

    def _report(self, trainer: Trainer, ended: str) -> None:
        self.summary = self.summarize(trainer, ended)
        if not trainer.is_global_zero:
            return
        self._target.parent.mkdir(parents=True, exist_ok=True)
        self._target.write_text(json.dumps(_finite(self.summary), indent=2) + "\n")
        self.written = self._target
        if self.verbose:
            print(table(self.summary) + f"\nhealth report: {self._target}")

    def summarize(self, trainer: Trainer, ended: str = "finished") -> dict[str, Any]:
        """The report as a dict (the JSON's content, before non-finite numbers become null)."""
        report: dict[str, Any] = {"step": int(trainer.global_step), "ended": ended}
        if "crash" in self._monitors:
            report["crash"] = self._crash(self._monitors["crash"], self.rows["crash"])
        if "seem" in self._monitors:
            report["seem"] = self._seem(self.rows["seem"])
        if "plasticity" in self._monitors:
            report["plasticity"] = self._plasticity(self.rows["plasticity"])
        return report

    @staticmethod
    def _crash(crash: CrashPredictor, rows: list[tuple[int, dict[str, float]]]) -> dict[str, Any]:
        ratios = [(step, row[BAR_RATIO]) for step, row in rows if BAR_RATIO in row]
        out: dict[str, Any] = {"measurements": len(ratios), "action": crash.action}
        if crash.bound is not None:
            out["bound"] = crash.bound
        if ratios:
            peak_step, peak = max(ratios, key=lambda sv: sv[1])
            out.update(peak_q_bound_ratio=peak, peak_step=peak_step, last_q_bound_ratio=ratios[-1][1])
        out["forecast"] = dict(crash.forecast)
        out["forecast_text"] = forecast_text(crash.forecast, crash.threshold)
        for name in ("stopped_step", "healthy_step", "checkpoint_path"):
            if getattr(crash, name) is not None:
                out[name] = getattr(crash, name)
        rollbacks = getattr(crash, "rollbacks", None)  # a predictor that can roll back
        if rollbacks is not None:
            out["rollbacks"] = _plain(rollbacks)
        return out

    @staticmethod
    def _seem(rows: list[tuple[int, dict[str, float]]]) -> dict[str, Any]:
        name = "seem/max_eig_normalized"
        measured = [row for _, row in rows if name in row]
        out: dict[str, Any] = {"measurements": len(measured)}
        if measured:
            seem = [row[name] for row in measured]
            out.update(min=min(seem), max=max(seem), last=seem[-1],
                       positive=sum(s > SEEM_POSITIVE for s in seem))
            carriers = carried_by(seem, [row.get("seem/participation", math.nan) for row in measured])
            if carriers is not None:
                out["carried_by"] = carriers
        q = [row["seem/q_data_mean"] for _, row in rows if "seem/q_data_mean" in row]
        if q:
            out["q_probe_mean"] = q[-1]
        return out

    @staticmethod
    def _plasticity(rows: list[tuple[int, dict[str, float]]]) -> dict[str, Any]:
        out: dict[str, Any] = {"measurements": len(rows)}
        dormant = [row["plasticity/dormant_fraction"] for _, row in rows if "plasticity/dormant_fraction" in row]
        rank = [row["plasticity/feature_rank"] for _, row in rows if "plasticity/feature_rank" in row]
        if dormant:
            out.update(dormant_fraction=dormant[-1], dormant_fraction_max=max(dormant))
        if rank:
            out.update(feature_rank=rank[-1], feature_rank_min=min(rank))
        return out

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"rows": {k: [(s, dict(r)) for s, r in v] for k, v in self.rows.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if any(self.rows.values()):  # held rows are newer than any state loaded in place
            return
        for section, rows in state_dict.get("rows", {}).items():
            if section in self.rows:  # a section whose monitor is attached to this fit
                self.rows[section] = [(int(s), dict(r)) for s, r in rows]


def table(report: dict[str, Any]) -> str:
    """The report as a two-column text table; a missing section's rows are absent."""
    def fmt(value: Any, spec: str = ".4g") -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return format(value, spec)

    rows: list[tuple[str, str]] = [("updates", f"{report['step']} ({report['ended']})")]
    crash = report.get("crash")
    if crash is not None:
        rows.append(("Bellman bound max|r|/(1-gamma)", fmt(crash.get("bound"))))
        if "peak_q_bound_ratio" in crash:
            rows.append(("peak max|Q| / bound on the probe",
                         f"{fmt(crash['peak_q_bound_ratio'], '.3g')} (update {crash['peak_step']})"))
            rows.append(("last max|Q| / bound", fmt(crash["last_q_bound_ratio"], ".3g")))
        rows.append(("forecast at the end", crash["forecast_text"]))
        acted = f"update {crash['stopped_step']}" if "stopped_step" in crash else "no"
        rows.append(("CrashPredictor warned" if crash["action"] == "warn" else "stopped by CrashPredictor", acted))
        if "rollbacks" in crash:
            done = crash["rollbacks"]
            text = str(len(done)) if isinstance(done, list) else str(done)
            if isinstance(done, list) and done and all(isinstance(r, dict) for r in done):
                text += " (" + ", ".join(f"update {r.get('step')} to {r.get('restored_to')}" for r in done) + ")"
            rows.append(("rollbacks", text))
        if "checkpoint_path" in crash:
            rows.append(("healthy checkpoint kept", f"update {crash.get('healthy_step')}: {crash['checkpoint_path']}"))
    seem = report.get("seem")
    if seem is not None:
        rows.append(("normalised SEEM (min .. max)",
                     f"{fmt(seem['min'], '.2f')} .. {fmt(seem['max'], '.2f')}" if "min" in seem else "-"))
        if "positive" in seem:
            carried = f", carried by {seem['carried_by']:.0f} transitions (median)" if "carried_by" in seem else ""
            rows.append(("positive SEEM measurements", f"{seem['positive']} of {seem['measurements']}{carried}"))
        rows.append(("mean Q on the probe (last)", fmt(seem.get("q_probe_mean"))))
    plasticity = report.get("plasticity")
    if plasticity is not None:
        rows.append(("dormant fraction (last, max)",
                     f"{fmt(plasticity.get('dormant_fraction'), '.3f')}, "
                     f"{fmt(plasticity.get('dormant_fraction_max'), '.3f')}"))
        rows.append(("feature rank (last, min)",
                     f"{fmt(plasticity.get('feature_rank'), '.0f')}, {fmt(plasticity.get('feature_rank_min'), '.0f')}"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    """A predictor's record as JSON-ready data (numbers, strings, lists, dicts)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "_asdict"):
        return _plain(value._asdict())
    if hasattr(value, "item"):
        return value.item()
    return str(value)
