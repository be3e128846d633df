"""One offline divergence run, shared by r2_seem_gamma, r3_norms, r3_layernorm_seem, r8_adam
and demo_plasticity: TD3 without target averaging (target = current network,
``EMATarget(tau=1, every=1)``), Adam 3e-4, batch 256, with ``SEEMMonitor`` and
``CrashPredictor(action="warn")`` measuring on the same fixed probe set every ``every``
updates, and the run's series kept in memory (``SeriesLogger``).

A run *diverges* when the largest |Q| on the probe set (at its (s, a) and its bootstrap
points) is beyond the Bellman bound max|r| / (1 - gamma) over the whole dataset
(``crash/q_bound_ratio`` > 1) at the end of the run and stays beyond it from
``diverged_at`` on, or Q turns non-finite: an overshoot of the bound that comes back is
not divergence. ``stop_on_divergence`` ends a run once the ratio passes ``STOP_RATIO``
(10: far beyond any transient seen) or Q is non-finite (r2, r3); r8 keeps going to see
the growth laws.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np

from harness import SeriesLogger, parse_args, quiet_trainer, save_figure

STOP_RATIO = 10.0
SERIES = ("seem/max_eig_normalized", "seem/participation", "seem/q_data_mean", "crash/q_bound_ratio",
          "crash/td_error_norm", "params/norm", "params/norm_slope", "params/adam_slope", "crash/loglog_slope")


def td3_run(dataset: str, gamma: float, seed: int, updates: int, every: int, probe_size: int,
            critic: dict[str, Any] | None = None, stop_on_divergence: bool = True, accelerator: str = "cpu",
            fraction: float = 1.0, callbacks: Sequence[L.Callback] = (), monitors: Sequence[L.Callback] = (),
            series: Sequence[str] = ()) -> dict[str, Any]:
    """One run; returns its settings, series (by measurement: ``SERIES`` and ``series``),
    whether and when it diverged. ``monitors`` measure beside SEEMMonitor and the
    CrashPredictor (e.g. a PlasticityMonitor); ``callbacks`` run after them all (they see
    each measurement's scalars)."""
    from lit_qlearn.algorithms import TD3
    from lit_qlearn.callbacks import CrashPredictor, EMATarget, SEEMMonitor
    from lit_qlearn.data import OfflineDataModule

    L.seed_everything(seed, verbose=False)
    dm = OfflineDataModule(dataset, seed=seed, fraction=fraction, steps_per_epoch=updates)
    model = TD3(gamma=gamma, eval_every=0, **(critic or {}))
    logged = SeriesLogger()
    crash = CrashPredictor(every_n_steps=every, probe_size=probe_size, action="warn")

    class StopWhenDiverged(L.Callback):
        """Ends the run once far beyond the bound (after this step's measurements)."""

        def on_train_batch_end(self, trainer, pl_module, *args):
            ratio = logged.rows.get(trainer.global_step, {}).get("crash/q_bound_ratio")
            if stop_on_divergence and ratio is not None and (not math.isfinite(ratio) or ratio > STOP_RATIO):
                trainer.should_stop = True

    stop = StopWhenDiverged()
    # the monitors first, so that the stop callback reads this step's scalars
    measuring = [EMATarget(tau=1.0, every=1), *monitors, SEEMMonitor(every_n_steps=every, probe_size=probe_size),
                 crash, stop]
    trainer = quiet_trainer(max_steps=updates, max_epochs=1, logger=logged, callbacks=measuring + list(callbacks),
                            log_every_n_steps=every, accelerator=accelerator, devices=1)
    start = time.perf_counter()
    trainer.fit(model, dm)
    out: dict[str, Any] = {"dataset": dataset, "gamma": gamma, "seed": seed, "critic": critic or {},
                           "transitions": dm.num_transitions, "bound": crash.bound, "updates": trainer.global_step,
                           "seconds": time.perf_counter() - start}
    steps, _ = logged.series("seem/max_eig_normalized")
    out["steps"] = steps
    for key in dict.fromkeys((*SERIES, *series)):
        table = dict(zip(*logged.series(key)))
        out[key] = [table.get(t) for t in steps]
    beyond = [r is None or not math.isfinite(r) or r > 1 for r in out["crash/q_bound_ratio"]]
    within = [t for t, b in zip(steps, beyond) if not b]
    out["diverged"] = bool(beyond) and beyond[-1]
    out["diverged_at"] = next(t for t in steps if not within or t > within[-1]) if out["diverged"] else None
    return out


def seem_before(run: dict[str, Any]) -> float:
    """The largest finite normalised SEEM measured before the run diverged (over the
    whole run if it did not): what a user watching SEEM had seen in time."""
    end = run["diverged_at"] if run["diverged"] else math.inf
    values = [v for t, v in zip(run["steps"], run["seem/max_eig_normalized"])
              if t < end and v is not None and math.isfinite(v)]
    return max(values) if values else float("nan")


def first_above(run: dict[str, Any], threshold: float) -> int | None:
    """The first measurement at which normalised SEEM exceeds ``threshold``."""
    return next((t for t, v in zip(run["steps"], run["seem/max_eig_normalized"])
                 if v is not None and math.isfinite(v) and v > threshold), None)


def early_max(run: dict[str, Any], key: str, until: int) -> float:
    """The largest finite value of ``key`` at measurements up to update ``until``."""
    values = [v for t, v in zip(run["steps"], run[key]) if t <= until and v is not None and math.isfinite(v)]
    return max(values) if values else float("nan")


def peak(run: dict[str, Any], key: str) -> float:
    values = [v for v in run[key] if v is not None]
    return float(np.nanmax(values)) if values and not all(np.isnan(values)) else float("nan")


DATASETS = ("hopper-medium-replay-v5", "default")


def add_run_arguments(parser: Any, every: int) -> None:
    """The options r2 and r3 share: the run's size, the measurements, the sweep's extent."""
    parser.add_argument("--updates", type=int, default=4000)
    parser.add_argument("--every", type=int, default=every)
    parser.add_argument("--probe", type=int, default=512)
    parser.add_argument("--threshold", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--full", action="store_true", help="100k updates, probe 2560")
    parser.add_argument("--accelerator", default="cpu")


#: --smoke: one seed of a few updates per configuration, in this process's one worker
SMOKE = {"updates": 10, "every": 5, "probe": 64, "seeds": 1, "workers": 1, "datasets": ["default"]}


def parse_run_arguments(parser: Any) -> Any:
    """Parse the options of :func:`add_run_arguments` (``--full``, ``--smoke``: their sizes)."""
    args = parse_args(parser, SMOKE, data=lambda a: a.datasets)
    if args.full:
        args.updates, args.probe = 100_000, 2560
    return args


def _worker(job: tuple[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    extra, options = job
    return td3_run(**options) | extra


def sweep(args: Any, jobs: list[tuple[dict[str, Any], dict[str, Any]]]) -> Any:
    """Run ``(extra fields, td3_run keywords)`` jobs on ``args.workers`` processes (the
    run's size and measurements from ``args``), yielding each run with its extra fields,
    in order."""
    from concurrent.futures import ProcessPoolExecutor

    common = {"updates": args.updates, "every": args.every, "probe_size": args.probe, "accelerator": args.accelerator}
    with ProcessPoolExecutor(args.workers) as pool:
        yield from pool.map(_worker, [(extra, common | options) for extra, options in jobs])


def plot_runs(runs: list[dict[str, Any]], group: str, colors: dict[Any, str], path: Any, title: str,
              threshold: float | None = None) -> None:
    """SEEM (top) and max|Q| / bound (bottom) against the update, one column per dataset,
    one colour per value of ``run[group]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in runs})
    fig, axes = plt.subplots(2, len(datasets), figsize=(6 * len(datasets), 8), squeeze=False)
    for col, dataset in enumerate(datasets):
        top, bottom = axes[0, col], axes[1, col]
        for r in (r for r in runs if r["dataset"] == dataset):
            label = f"{group} {r[group]}" if r["seed"] == 0 else None
            for ax, key in ((top, "seem/max_eig_normalized"), (bottom, "crash/q_bound_ratio")):
                values = [math.nan if v is None else v for v in r[key]]
                (ax.semilogy if ax is bottom else ax.plot)(r["steps"], values, color=colors[r[group]], alpha=0.8,
                                                           label=label)
        if threshold is not None:
            top.axhline(threshold, color="gray", ls="--", lw=1)
        bottom.axhline(1.0, color="black", ls="--", lw=1, label="Bellman bound")
        top.set_title(dataset)
        top.set_ylabel("normalised SEEM")
        bottom.set_ylabel("max |Q| on the probe / Bellman bound")
        bottom.set_xlabel("updates")
        top.legend(fontsize=8)
        bottom.legend(fontsize=8)
    save_figure(fig, path, title)
