"""``lit-qlearn demo``: watch a critic diverge, see it predicted, and keep a healthy checkpoint.

The default demo trains :class:`~lit_qlearn.algorithms.TD3` offline with target =
current network (``EMATarget(tau=1.0, every=1)``: no target averaging, the setting in
which Yue et al. 2023 study divergence) on a small slice of the default Hopper-v5 data (100k steps
of the shipped medium SAC policy), three times: a plain ReLU critic and a LayerNorm critic, each
with :class:`~lit_qlearn.callbacks.CrashPredictor` ``(action="checkpoint_and_stop")``, and the
plain critic again with ``CrashPredictor(action="rollback", remedy=ScaleLearningRate(0.1))``. Every run
carries :class:`~lit_qlearn.callbacks.SEEMMonitor` and :class:`~lit_qlearn.callbacks.NTKGramCallback`.
The plain critic's Q leaves the Bellman bound ``max|r| / (1 - gamma)`` within a few
hundred updates, with a positive normalised SEEM from the start; the predictor stops
it and keeps the last healthy state. The LayerNorm critic stays within the bound with
SEEM near zero. The rolled-back critic goes back to an earlier healthy state, divides its
learning rate by ten (the remedy, :class:`~lit_qlearn.callbacks.ScaleLearningRate`: the
crash time grows as 1/lr; the remedy that kept most runs of benchmarks/results/rescue.json
within the bound) and trains on within the bound. A table, a figure and TensorBoard logs
show it.

``--algo td3bc`` runs the earlier demo instead: TD3+BC on the data, then evaluation
episodes in the environment.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from lit_qlearn.algorithms import TD3, TD3BC
from lit_qlearn.callbacks import CrashPredictor, EMATarget, NTKGramCallback, ScaleLearningRate, SEEMMonitor
from lit_qlearn.callbacks.report import SEEM_POSITIVE, forecast_text
from lit_qlearn.callbacks.report import carried_by as _carried_by
from lit_qlearn.data import OfflineDataModule
from lit_qlearn.data.names import parse_name
from lit_qlearn.datasets import ensure_dataset, ensure_default_dataset
from lit_qlearn.loggers import SeriesLogger

__all__ = ["CriticRun", "divergence_demo", "td3bc_demo", "main", "parser"]

CRITICS = {"plain": None, "layernorm": "layer", "rollback": None}  # run name -> TD3(critic_norm=...)
LABELS = {"plain": "plain critic", "layernorm": "LayerNorm critic", "rollback": "plain + rollback"}
COLORS = {"plain": "tab:red", "layernorm": "tab:blue", "rollback": "tab:green"}


@dataclass
class CriticRun:
    """What one demo run measured (every number in the table comes from here)."""

    name: str
    bound: float | None  # max|r| / (1 - gamma) on the data, from the CrashPredictor
    updates: int  # updates trained (the stop step when the predictor stopped the run)
    seconds: float
    q_data_mean: float  # mean Q over every transition of the data, at the end of the run
    q_data_max: float  # max |Q| over the same
    steps: list[int] = field(default_factory=list)  # the measurement steps
    q_probe_mean: list[float] = field(default_factory=list)  # seem/q_data_mean (mean Q on the probe set)
    seem: list[float] = field(default_factory=list)  # seem/max_eig_normalized
    participation: list[float] = field(default_factory=list)  # seem/participation, at the SEEM measurements
    q_bound_ratio: list[float] = field(default_factory=list)  # crash/q_bound_ratio
    stopped_step: int | None = None
    stop_reason: str | None = None
    forecast: dict[str, float] = field(default_factory=dict)
    checkpoint_path: str | None = None
    checkpoint_step: int | None = None
    checkpoint_q_mean: float | None = None
    checkpoint_q_max: float | None = None
    rollbacks: list[dict[str, Any]] = field(default_factory=list)  # CrashPredictor.rollbacks
    log_dir: str = ""


# ------------------------------------------------------------------------------ data


def ensure_data(dataset: str) -> None:
    """Make ``dataset`` first if it is ``"default"`` or a generated name (``hopper-medium-v5``)
    whose file is absent, with a progress bar: the demo makes what it reads (an
    OfflineDataModule never does), except a ``medium-replay`` dataset (a training run)."""
    if dataset == "default":
        ensure_default_dataset()
    elif parse_name(dataset) is not None and parse_name(dataset)[1] != "medium-replay":
        ensure_dataset(dataset)
    # medium-replay is a SAC run's own buffer: remaking it is a long rerun the demo never
    # starts; the DataModule's one-line error names the command when it is absent


# ------------------------------------------------------------------- the divergence demo


def _q_on(module: Any, data: Any, batch: int = 8192) -> tuple[float, float]:
    """(mean Q, max |Q|) of ``module.q_value`` over every transition of ``data``."""
    total, largest = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(data.obs), batch):
            q = module.q_value(data.obs[start:start + batch], data.act[start:start + batch]).double()
            total += q.sum().item()
            largest = max(largest, q.abs().max().item())
    return total / len(data.obs), largest


def _quiet() -> None:
    # The demo prints its own summary; Lightning's per-run banners and the known
    # harmless warnings would bury it.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for message in (".*does not have many workers.*", ".*IterableDataset.*", ".*LeafSpec.*",
                    ".*CrashPredictor at step.*", ".*TensorBoard support.*"):
        warnings.filterwarnings("ignore", message=message)


def _bar() -> Any:
    """Lightning's progress bar without the logger version (a run name here, cut to its
    last characters)."""

    class Bar(TQDMProgressBar):
        def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
            metrics = super().get_metrics(trainer, pl_module)
            metrics.pop("v_num", None)
            return metrics

    return Bar()


def _critic_run(name: str, dm: Any, root: Path, steps: int, every: int, probe_size: int, hidden: Sequence[int],
                progress: bool, seed: int) -> CriticRun:
    L.seed_everything(seed, verbose=False)
    model = TD3(critic_norm=CRITICS[name], critic_hidden=tuple(hidden), actor_hidden=tuple(hidden), eval_every=0)
    series = SeriesLogger()
    tensorboard = TensorBoardLogger(root, name="", version=name, default_hp_metric=False)
    # Measurements every `every` updates on a probe of `probe_size`: enough points to
    # see the trend in a short run, each measurement a fraction of a second.
    if name == "rollback":  # back to an earlier healthy state, then a tenth of the critic's learning rate
        crash = CrashPredictor(every_n_steps=every, probe_size=probe_size, action="rollback",
                               remedy=ScaleLearningRate(0.1))
    else:
        crash = CrashPredictor(every_n_steps=every, probe_size=probe_size, action="checkpoint_and_stop")
    callbacks = [EMATarget(tau=1.0, every=1), SEEMMonitor(every_n_steps=every, probe_size=probe_size),
                 NTKGramCallback(every_n_steps=every, probe_size=probe_size), crash]
    if progress:
        callbacks.append(_bar())
    trainer = L.Trainer(max_steps=steps, max_epochs=1, logger=[tensorboard, series], callbacks=callbacks,
                        log_every_n_steps=every, enable_checkpointing=False, enable_progress_bar=progress,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    start = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - start
    q_mean, q_max = _q_on(model, dm.data)
    measured, q_probe = series.series("seem/q_data_mean")
    seem_steps, seem = series.series("seem/max_eig_normalized")
    run = CriticRun(name=name, bound=crash.bound, updates=trainer.global_step, seconds=seconds, q_data_mean=q_mean,
                    q_data_max=q_max, steps=measured, q_probe_mean=q_probe,
                    seem=seem, participation=[series.rows[s].get("seem/participation", math.nan) for s in seem_steps],
                    q_bound_ratio=series.series("crash/q_bound_ratio")[1], stopped_step=crash.stopped_step,
                    forecast=dict(crash.forecast), rollbacks=[dict(r) for r in crash.rollbacks],
                    log_dir=str(tensorboard.log_dir))
    if crash.stopped_step is not None:
        ratio = series.rows.get(crash.stopped_step, {}).get("crash/q_bound_ratio")
        run.stop_reason = "Q beyond the bound" if ratio is not None and ratio > 1 else "crash forecast"
    if crash.checkpoint_path is not None:
        # Reloaded from disk, as a user would: its Q on the data shows the kept state is healthy.
        kept = TD3.load_from_checkpoint(crash.checkpoint_path, map_location="cpu")
        kept.eval()
        run.checkpoint_path, run.checkpoint_step = crash.checkpoint_path, crash.healthy_step
        run.checkpoint_q_mean, run.checkpoint_q_max = _q_on(kept, dm.data)
    return run


def divergence_demo(dataset: str = "default", fraction: float = 0.05, steps: int = 2000, every: int = 50,
                    probe_size: int = 512, hidden: Sequence[int] = (256, 256), logdir: str | os.PathLike = "lightning_logs",
                    seed: int = 0, progress: bool = True, figure: bool = True,
                    out: Callable[[str], None] = print) -> dict[str, CriticRun]:
    """Train the plain critic, the LayerNorm critic and the plain critic with rollback (see
    the module docstring), print the table, draw the figure; return the three runs by name
    (``"plain"``, ``"layernorm"``, ``"rollback"``).

    Args:
        dataset: the OfflineDataModule dataset (default: 100k generated hopper-medium-v5 steps).
        fraction: share of its transitions trained on (the paper's data-scarce setting).
        steps: the most updates of each run.
        every: updates between measurements of the three callbacks.
        probe_size: probe transitions of the three callbacks.
        hidden: hidden widths of the critics and the actor.
        logdir: the runs go to ``<logdir>/demo/version_<k>/{plain,layernorm}``.
        seed: seed of the subset, the sampler and the networks.
        progress: Lightning's progress bar.
        figure: write ``demo.png`` beside the runs.
        out: where the text goes.
    """
    _quiet()
    ensure_data(dataset)
    dm = OfflineDataModule(dataset, fraction=fraction, seed=seed, steps_per_epoch=steps)
    dm.setup("fit")
    root = Path(TensorBoardLogger(logdir, name="demo").log_dir)  # the next free version_<k>
    out(f"TD3 with target = current network (EMATarget(tau=1.0, every=1)) on {dm.num_transitions} transitions of "
        f"{dm.hparams.dataset} ({dm.env_id}); at most {steps} updates per critic, measured every {every} on a probe of "
        f"{probe_size} transitions")
    runs = {}
    for name in CRITICS:
        out(f"\n{LABELS[name]}:")
        runs[name] = _critic_run(name, dm, root, steps, every, probe_size, hidden, progress, seed)
    out("")
    out(table(runs))
    if figure:
        path = draw(runs, root / "demo.png")
        out(f"\nfigure: {path}")
    out(f"full curves (NTK, SEEM, crash forecasts, losses): tensorboard --logdir {root}")
    return runs


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _forecast(run: CriticRun) -> str:
    return forecast_text(run.forecast)  # the demo's predictors keep the default threshold


def carried_by(run: CriticRun, threshold: float = SEEM_POSITIVE) -> float | None:
    """Median participation of SEEM's top eigenvector (``seem/participation``) over the
    measurements with SEEM above ``threshold``; None when there is none (the rule of
    :class:`~lit_qlearn.callbacks.HealthReport`)."""
    return _carried_by(run.seem, run.participation, threshold)


def table(runs: dict[str, CriticRun]) -> str:
    """The side-by-side summary of the runs."""
    def seem_range(r: CriticRun) -> str:
        return f"{_fmt(min(r.seem), '.2f')} .. {_fmt(max(r.seem), '.2f')}" if r.seem else "-"

    def carried(r: CriticRun) -> str:
        carriers = carried_by(r)
        return "-" if carriers is None else f"{carriers:.0f} transitions"

    rows = [
        ("updates trained", lambda r: f"{r.updates} ({r.seconds:.0f} s)"),
        ("Q on the data: mean", lambda r: _fmt(r.q_data_mean)),
        ("Q on the data: max |Q|", lambda r: _fmt(r.q_data_max)),
        ("Bellman bound max|r|/(1-gamma)", lambda r: _fmt(r.bound)),
        ("peak max|Q| / bound on the probe", lambda r: _fmt(max(r.q_bound_ratio, default=None), ".3g")),
        ("normalised SEEM (min .. max)", seem_range),
        ("positive SEEM carried by (median)", carried),
        ("forecast at the end", _forecast),
        ("stopped by CrashPredictor", lambda r: "no" if r.stopped_step is None
         else f"update {r.stopped_step} ({r.stop_reason})"),
        ("rolled back: update -> state of", lambda r: ", ".join(f"{b['step']} -> {b['restored_to']}"
                                                                  for b in r.rollbacks) or "-"),
        ("checkpoint kept: update", lambda r: _fmt(r.checkpoint_step, "d")),
        ("  its Q on the data: mean", lambda r: _fmt(r.checkpoint_q_mean)),
        ("  its Q on the data: max |Q|", lambda r: _fmt(r.checkpoint_q_max)),
    ]
    names = list(runs)
    width = max(len(label) for label, _ in rows)
    cells = [[fn(runs[n]) for n in names] for _, fn in rows]
    col = [max(len(LABELS[n]), *(len(c[i]) for c in cells)) for i, n in enumerate(names)]
    lines = [" " * width + "  " + "  ".join(LABELS[n].rjust(w) for n, w in zip(names, col))]
    lines += [label.ljust(width) + "  " + "  ".join(c.rjust(w) for c, w in zip(row, col))
              for (label, _), row in zip(rows, cells)]
    lines += [f"checkpoint ({LABELS[n]}): {runs[n].checkpoint_path}" for n in names if runs[n].checkpoint_path]
    lines += [f"remedy ({LABELS[n]}, update {b['step']}): {b['remedy']}" for n in names for b in runs[n].rollbacks]
    return "\n".join(lines)


def draw(runs: dict[str, CriticRun], path: Path) -> Path:
    """Mean Q on the probe set and normalised SEEM against the update, every run; the
    bound, the stops, the kept checkpoints and the rollbacks marked."""
    import matplotlib  # here, not at the top: an optional dependency (the bench extra), for the figure only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_q, ax_s) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, run in runs.items():
        color = COLORS.get(name, "tab:gray")
        # the rolled-back run follows the plain one up to its stop: drawn beneath it, so both show
        z = 1 if name == "rollback" else 2
        ax_q.plot(run.steps, run.q_probe_mean, "o-", ms=3, color=color, label=f"{LABELS[name]}: mean Q", zorder=z)
        if run.bound is not None and len(run.q_bound_ratio) == len(run.steps):
            # max |Q| is what the bound is compared with (CrashPredictor's crash/q_bound_ratio)
            ax_q.plot(run.steps, [r * run.bound for r in run.q_bound_ratio], "--", lw=1, color=color,
                      label=f"{LABELS[name]}: max |Q|", zorder=z)
        ax_s.plot(run.steps, run.seem, "o-", ms=3, color=color, label=LABELS[name], zorder=z)  # same steps: one monitor
        if run.stopped_step is not None:
            for ax in (ax_q, ax_s):
                ax.axvline(run.stopped_step, color=color, ls=":", lw=1.2)
            ax_q.annotate(f"stopped at {run.stopped_step}", (run.stopped_step, run.q_probe_mean[-1]),
                          xytext=(5, 0), textcoords="offset points", color=color, fontsize=8)
        for i, b in enumerate(run.rollbacks):
            if b["step"] in run.steps:
                k = run.steps.index(b["step"])
                ax_q.plot([b["step"]], [run.q_probe_mean[k]], "x", ms=10, mew=2, color=color,
                          label=f"{LABELS[name]}: rolled back" if i == 0 else None)
                ax_q.annotate(f"-> {b['restored_to']}", (b["step"], run.q_probe_mean[k]), xytext=(5, 5),
                              textcoords="offset points", color=color, fontsize=8)
        if run.checkpoint_step in run.steps:
            k = run.steps.index(run.checkpoint_step)
            ax_q.plot([run.checkpoint_step], [run.q_probe_mean[k]], "*", ms=14, color=color,
                      label=f"kept checkpoint (update {run.checkpoint_step})")
    bounds = [r.bound for r in runs.values() if r.bound is not None]
    if bounds:
        ax_q.axhline(bounds[0], color="k", ls="--", lw=1, label=f"Bellman bound max|r|/(1-gamma) = {bounds[0]:.3g}")
    ax_q.set_yscale("symlog", linthresh=1.0)
    ax_q.set(xlabel="update", ylabel="Q on the probe set", title="Q-values (symlog scale)")
    ax_s.axhline(0, color="k", lw=0.5)
    ax_s.set(xlabel="update", ylabel="normalised SEEM", title="SEEM: > 0 means self-exciting TD error")
    for ax in (ax_q, ax_s):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------ TD3+BC demo


def td3bc_demo(dataset: str = "default", steps: int = 3000, layernorm: bool = False, episodes: int = 5,
               logdir: str | os.PathLike = "lightning_logs", seed: int = 0, progress: bool = True,
               out: Callable[[str], None] = print) -> dict[str, float]:
    """Train TD3+BC on ``dataset`` for ``steps`` updates and evaluate ``episodes`` episodes."""
    _quiet()
    ensure_data(dataset)
    L.seed_everything(seed, verbose=False)
    dm = OfflineDataModule(dataset, seed=seed, steps_per_epoch=steps)
    dm.setup("fit")
    model = TD3BC(critic_norm="layer" if layernorm else None, eval_every=0)
    logger = TensorBoardLogger(Path(logdir) / "demo", name="td3bc")
    trainer = L.Trainer(max_steps=steps, max_epochs=1, logger=logger, log_every_n_steps=50,
                        callbacks=[_bar()] if progress else [], enable_checkpointing=False,
                        enable_progress_bar=progress, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - start
    result = model.evaluate(episodes)
    out(f"TD3+BC on {dm.env_id} ({dm.num_transitions} transitions): {trainer.global_step} updates in {seconds:.1f} s "
        f"({trainer.global_step / seconds:.0f} updates/s)")
    out(f"evaluation over {episodes} episodes: return {result['return']:.1f}, "
        f"normalized score {result['normalized_score']:.1f}")
    out(f"TensorBoard: tensorboard --logdir {logger.log_dir}")
    return result


# ---------------------------------------------------------------------------- command


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    """The ``lit-qlearn demo`` argument parser."""
    p = _Parser(prog="lit-qlearn demo", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("--algo", choices=("td3", "td3bc"), default="td3",
                   help="td3: the divergence demo (default); td3bc: train TD3+BC and evaluate it")
    p.add_argument("--dataset", default="default",
                   help="dataset path or name (default: 100k generated hopper-medium-v5 steps)")
    p.add_argument("--fraction", type=_fraction, default=0.05, help="td3: share of the data's transitions used")
    p.add_argument("--steps", type=_positive, default=None, help="most updates per run (td3: 2000, td3bc: 3000)")
    p.add_argument("--every", type=_positive, default=50, help="td3: updates between measurements")
    p.add_argument("--probe-size", type=_positive, default=512, help="td3: probe transitions of the callbacks")
    p.add_argument("--hidden", type=_positive, nargs="+", default=[256, 256], help="td3: hidden widths of the networks")
    p.add_argument("--layernorm", action="store_true", help="td3bc: LayerNorm in the critic")
    p.add_argument("--episodes", type=_positive, default=5, help="td3bc: evaluation episodes")
    p.add_argument("--logdir", default="lightning_logs", help="log directory (runs go to <logdir>/demo/...)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data subset, the sampler and the networks")
    p.add_argument("--threads", type=_positive, default=1,
                   help="torch CPU threads (1: these small networks gain little from more, and on a busy machine "
                        "more threads make every update many times slower)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-figure", action="store_true", help="td3: no PNG")
    return p


def main(args: Sequence[str] = ()) -> Any:
    """``lit-qlearn demo [options]``; returns the runs (td3) or the evaluation (td3bc)."""
    ns = parser().parse_args(list(args))
    threads = torch.get_num_threads()
    torch.set_num_threads(ns.threads)
    try:
        if ns.algo == "td3bc":
            return td3bc_demo(ns.dataset, ns.steps or 3000, ns.layernorm, ns.episodes, ns.logdir, ns.seed,
                              not ns.no_progress)
        return divergence_demo(ns.dataset, ns.fraction, ns.steps or 2000, ns.every, ns.probe_size, ns.hidden,
                               ns.logdir, ns.seed, not ns.no_progress, not ns.no_figure)
    finally:
        torch.set_num_threads(threads)
