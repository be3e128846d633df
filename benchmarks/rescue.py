"""Rescue: a diverging critic rolled back to its last healthy state and remedied
(``CrashPredictor(action="rollback", remedy=...)``), against stopping and restarting from
scratch with a setting known to be stable.

Settings (``--settings``), each a critic that diverges when left alone:

* ``td3-copy/<dataset>``: the R2/R3 setting. TD3 with target = current network
  (``EMATarget.no_ema()``), Adam 3e-4, gamma 0.99, batch 256, on generated
  ``hopper-medium-replay-v5`` and on the default data; every plain run leaves the Bellman
  bound within a few hundred updates (benchmarks/results/r2_seem_gamma.json).
* ``td3bc-small``: TD3+BC at its defaults (Polyak targets, tau 0.005) on a small subset of
  the medium policy's data. r4_fraction_long saw a plain TD3+BC critic on 1% of
  hopper-medium-v5 (10,000 transitions) end at 4.6x the bound after 100k updates, on one
  seed of two; a 100k-update run costs about 15 minutes here, so this setting takes
  ``--small-fraction`` of the default data (the medium policy's own rollouts, 100k steps),
  found to diverge within ``--small-updates`` updates (see the module's result,
  ``settings``).

Arms, per setting and seed:

* ``plain``: the setting as it is; a CrashPredictor measures (``action="warn"``), and the
  run stops once max|Q| on the probe is 10x the bound or non-finite (it has diverged for
  good). Its detection step (the predictor's first unhealthy measurement) is what a user
  who restarts from scratch would have spent.
* ``rollback`` with no remedy, and with each remedy at its defaults: ``lr``
  (``ScaleLearningRate``: the critic's learning rate halved), ``slow-targets``
  (``SlowTargets``: Polyak averaging turned on, tau 0.005, or its rate halved),
  ``shrink-perturb`` (``ShrinkAndPerturb``: 0.8 w + 0.01 w_fresh), ``preqn``
  (``PreQNStep``: PreQN's preconditioned step with its line search); ``max_rollbacks=3``.
* ``layernorm``: from scratch with ``critic_norm="layer"`` (Yue et al. 2023's remedy).
* ``polyak``: from scratch with Polyak averaging, tau 0.005 (``td3-copy``) or, where the
  plain setting averages already (``td3bc-small``), with tau halved to 0.0025 (the
  SlowTargets remedy applied from the start).

Measured per run: max|Q| on the probe over the bound at every measurement (the figure),
the rollbacks (step, step restored to, remedy), whether the run *ends within the bound*
(it completed its updates and its last measurement is finite and <= 1), the final greedy
policy's normalised score over ``--episodes`` episodes, and the updates spent: a rollback
run spends its ``--updates`` (of which ``step - restored_to`` per rollback were undone); a
restart spends the plain run's detection step plus a whole run from scratch.

Claims: with at least one remedy, rollback ends within the bound on >= 90% of its runs
(over settings and seeds); that remedy's mean score is >= 90% of the best stable
from-scratch arm's (the from-scratch arm with the most runs within the bound, ties broken
by score), per setting. And the cost of being ready: CrashPredictor with ``action="rollback"``
(the healthy checkpoint kept at every healthy measurement) against ``action="warn"``, on
TD3+BC at its defaults with the monitors' default cadence (every 100 updates, 2,560 probe
transitions), interleaved, ``--cost-repeats`` pairs: at most 3% slower.

Sizing on 2 CPU cores: a TD3 run of 5,000 updates takes about a minute (PreQN's step after
a rollback costs ~5x an Adam step); the default sweep (3 settings x 8 arms x 3 seeds) about
an hour and a half with ``--workers 2``. Every finished run is written to the JSON at once;
``--resume`` with the same settings runs only what is missing.

    python benchmarks/rescue.py [--settings td3-copy/default td3bc-small] [--seeds 3] [--resume] [--smoke]
"""
from __future__ import annotations

import itertools
import math
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L

from harness import (SeriesLogger, argument_parser, claim, environment, interleaved, parse_args, quiet_trainer,
                     save_figure, stored_runs, write_result)

SETTINGS = ("td3-copy/default", "td3-copy/hopper-medium-replay-v5", "td3bc-small")
REMEDIES = ("lr", "lr-0.1", "slow-targets", "shrink-perturb", "preqn")
ROLLED = ("rollback", *(f"rollback+{r}" for r in REMEDIES))
#: the same rollbacks to the last healthy state (rollback_ratio=1), the ablation of how far back to go
LAST = tuple(a.replace("rollback", "rollback-last", 1) for a in ROLLED)
ARMS = ("plain", *ROLLED, *LAST, "layernorm", "polyak")
FROM_SCRATCH = ("layernorm", "polyak")
#: a plain run stops once this far beyond the bound (or non-finite): diverged for good
STOP_RATIO = 10.0
#: the claims' thresholds
WITHIN_TARGET, SCORE_TARGET, COST_TARGET = 0.9, 0.9, 0.03


def remedy(arm: str, seed: int) -> Any:
    """The remedy object of a rollback arm (None: rollback alone)."""
    from lit_qlearn.callbacks import PreQNStep, ScaleLearningRate, ShrinkAndPerturb, SlowTargets

    name = arm.partition("+")[2]
    return {"": lambda: None, "lr": ScaleLearningRate, "lr-0.1": lambda: ScaleLearningRate(0.1),
            "slow-targets": SlowTargets,
            "shrink-perturb": lambda: ShrinkAndPerturb(seed=seed), "preqn": PreQNStep}[name]()


def dataset_of(setting: str) -> str:
    return setting.partition("/")[2] if setting.startswith("td3-copy/") else "default"


def run(job: dict[str, Any]) -> dict[str, Any]:
    """One run of ``job`` (setting, arm, seed and the sizes); see the module's docstring."""
    import torch

    from lit_qlearn.algorithms import TD3, TD3BC
    from lit_qlearn.callbacks import CrashPredictor, EMATarget
    from lit_qlearn.data import OfflineDataModule

    torch.set_num_threads(1)
    setting, arm, seed, updates = job["setting"], job["arm"], job["seed"], job["updates"]
    copy_target = setting.startswith("td3-copy/")
    L.seed_everything(seed, verbose=False)
    dm = OfflineDataModule(dataset_of(setting), seed=seed, fraction=1.0 if copy_target else job["fraction"],
                           steps_per_epoch=updates)
    options: dict[str, Any] = {"gamma": 0.99, "eval_every": 0}
    if arm == "layernorm":
        options["critic_norm"] = "layer"
    model = (TD3 if copy_target else TD3BC)(**options)
    callbacks: list[L.Callback] = []
    if copy_target and arm != "polyak":
        callbacks.append(EMATarget.no_ema())
    elif arm == "polyak" and not copy_target:  # the module's own Polyak rate (0.005) halved
        callbacks.append(EMATarget(tau=0.0025))
    rolling = arm.startswith("rollback")
    dirpath = tempfile.mkdtemp(prefix="rescue-")
    if rolling:  # the library's defaults (max_rollbacks 3, rollback_ratio 0.5, keep 8), or back to the last healthy
        crash = CrashPredictor(every_n_steps=job["every"], probe_size=job["probe"], action="rollback",
                               remedy=remedy(arm, seed), dirpath=dirpath,
                               **({"rollback_ratio": 1.0} if arm.startswith("rollback-last") else {}))
    else:
        crash = CrashPredictor(every_n_steps=job["every"], probe_size=job["probe"], action="warn", dirpath=dirpath)
    logged = SeriesLogger()
    timing = RollbackTiming(crash)

    class StopWhenDiverged(L.Callback):
        """A run that is not rolled back ends once far beyond the bound (or non-finite)."""

        def on_train_batch_end(self, trainer, pl_module, *args):
            ratio = logged.rows.get(trainer.global_step, {}).get("crash/q_bound_ratio")
            if ratio is not None and (not math.isfinite(ratio) or ratio > STOP_RATIO):
                trainer.should_stop = True

    trainer = quiet_trainer(max_steps=updates, max_epochs=1, logger=logged, log_every_n_steps=job["every"],
                            callbacks=[*callbacks, crash, timing, *([] if rolling else [StopWhenDiverged()])],
                            accelerator="cpu", devices=1)
    start = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - start
    shutil.rmtree(dirpath, ignore_errors=True)  # the held files are gone at the fit's end; their directory too
    steps, ratios = logged.series("crash/q_bound_ratio")
    last = ratios[-1] if ratios else math.nan
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    completed = trainer.global_step >= updates
    result = {**{k: job[k] for k in ("setting", "arm", "seed", "updates")}, "dataset": dataset_of(setting),
              "transitions": dm.num_transitions, "bound": crash.bound, "steps_done": trainer.global_step,
              "seconds": seconds, "steps": steps, "q_bound_ratio": ratios,
              "detected_at": crash.stopped_step if not rolling else None,
              "rollbacks": crash.rollbacks, "stopped_after_rollbacks": rolling and crash.fired,
              "completed": completed,
              "within_bound": bool(completed and finite and math.isfinite(last) and last <= 1.0),
              "final_ratio": last, "rollback_seconds": timing.restore_seconds,
              "checkpoint_bytes": timing.checkpoint_bytes}
    if finite:
        model.cpu()
        evaluation = model.evaluate(job["episodes"])
        result.update(normalized_score=evaluation["normalized_score"], **{"return": evaluation["return"]})
    else:  # a NaN critic's actor: nothing to evaluate
        result.update(normalized_score=None, **{"return": None})
    return result


class RollbackTiming(L.Callback):
    """Wall time of each restore (the held checkpoint loaded back) and the held file's size."""

    def __init__(self, crash: Any) -> None:
        self.crash = crash
        self.restore_seconds: list[float] = []
        self.checkpoint_bytes: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        healthy = self.crash.healthy
        if healthy is None:  # action="warn": nothing is kept
            return
        restore = healthy.restore

        def timed(*args: Any, **kwargs: Any) -> int:
            begin = time.perf_counter()
            try:
                return restore(*args, **kwargs)
            finally:
                self.restore_seconds.append(time.perf_counter() - begin)

        healthy.restore = timed

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        healthy = self.crash.healthy
        if self.checkpoint_bytes is None and healthy is not None and healthy.path is not None \
                and healthy.path.exists():
            self.checkpoint_bytes = healthy.path.stat().st_size


# ------------------------------------------------------------------------------- cost


def cost_pair(updates: int, repeats: int) -> dict[str, Any]:
    """TD3+BC at its defaults on the default data with CrashPredictor at its default cadence,
    ``action="warn"`` against ``action="rollback"`` (the healthy state kept at each healthy
    measurement), interleaved; updates per second of each fit after a warm-up."""
    import torch

    from harness import TrainClock
    from lit_qlearn.algorithms import TD3BC
    from lit_qlearn.callbacks import CrashPredictor
    from lit_qlearn.data import OfflineDataModule

    torch.set_num_threads(1)
    rates: dict[str, list[float]] = {"warn": [], "rollback": []}
    for _, action in interleaved(("warn", "rollback"), repeats):
        L.seed_everything(0, verbose=False)
        dm = OfflineDataModule("default", seed=0, steps_per_epoch=updates)
        clock = TrainClock(warmup=min(100, updates // 4))
        with tempfile.TemporaryDirectory() as dirpath:
            crash = CrashPredictor(action=action, dirpath=dirpath)  # every 100 updates, 2,560 probe transitions
            quiet_trainer(max_steps=updates, max_epochs=1, callbacks=[crash, clock], accelerator="cpu",
                          devices=1).fit(TD3BC(eval_every=0), dm)
        rates[action].append(clock.rate)
    warn, ready = statistics.median(rates["warn"]), statistics.median(rates["rollback"])
    return {"updates": updates, "repeats": repeats, "updates_per_s": rates, "median_warn": warn,
            "median_rollback": ready, "overhead": warn / ready - 1}


# ----------------------------------------------------------------------------- report


def runs_of(runs: list[dict], setting: str | None = None, arm: str | None = None) -> list[dict]:
    return [r for r in runs if (setting is None or r["setting"] == setting) and (arm is None or r["arm"] == arm)]


def mean(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def table(runs: list[dict]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per setting and arm: runs, fraction within the bound, mean score, updates."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for setting in dict.fromkeys(r["setting"] for r in runs):
        plain = {r["seed"]: r for r in runs_of(runs, setting, "plain")}
        out[setting] = {}
        for arm in ARMS:
            group = runs_of(runs, setting, arm)
            if not group:
                continue
            row: dict[str, Any] = {"runs": len(group),
                                   "within_bound": sum(r["within_bound"] for r in group) / len(group),
                                   "score": mean([r["normalized_score"] for r in group]),
                                   "updates": mean([r["steps_done"] for r in group])}
            if arm.startswith("rollback"):
                row["rollbacks"] = mean([len(r["rollbacks"]) for r in group])
                row["updates_undone"] = mean([sum(b["step"] - b["restored_to"] for b in r["rollbacks"])
                                              for r in group])
                row["stopped_after_max_rollbacks"] = sum(r["stopped_after_rollbacks"] for r in group)
                # a restart: the plain run's detection step, then a whole run from scratch
                restarts = [plain[r["seed"]]["detected_at"] + r["updates"] for r in group
                            if r["seed"] in plain and plain[r["seed"]]["detected_at"] is not None]
                row["updates_if_restarted"] = mean(restarts)
            if arm == "plain":
                row["detected_at"] = mean([r["detected_at"] for r in group])
            out[setting][arm] = row
    return out


def best_from_scratch(rows: dict[str, dict[str, Any]]) -> str | None:
    """The stable from-scratch arm of a setting: most runs within the bound, then the best score."""
    arms = [a for a in FROM_SCRATCH if a in rows]
    return max(arms, key=lambda a: (rows[a]["within_bound"], rows[a]["score"] or -math.inf)) if arms else None


def within_fraction(runs: list[dict], arms: Any) -> float | None:
    group = [r for r in runs if r["arm"] in arms]
    return sum(r["within_bound"] for r in group) / len(group) if group else None


def score_check(mine: float | None, theirs: float | None) -> bool:
    """``mine >= SCORE_TARGET * theirs`` (a from-scratch score at or below zero: ``mine >= theirs``)."""
    if mine is None or theirs is None:
        return False
    return mine >= (SCORE_TARGET * theirs if theirs > 0 else theirs)


def claims(runs: list[dict], cost: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = table(runs)
    rolled = [a for a in ROLLED if runs_of(runs, arm=a)]
    within = {a: within_fraction(runs, (a,)) for a in rolled}

    def scores(arm: str) -> dict[str, dict[str, Any]]:
        out = {}
        for setting, row in rows.items():
            reference = best_from_scratch(row)
            mine, theirs = row.get(arm, {}).get("score"), row[reference]["score"] if reference else None
            out[setting] = {arm: mine, f"from scratch ({reference})": theirs, "holds": score_check(mine, theirs)}
        return out

    # the remedy that ends within the bound most often; ties: the one whose scores hold in more settings
    best = max(rolled, key=lambda a: (within[a], sum(v["holds"] for v in scores(a).values()))) if rolled else None
    out = [claim(f"rollback with at least one remedy ends within the Bellman bound on >= {WITHIN_TARGET:.0%} of runs "
                 f"(best: {best})",
                 "issue 21: a diverging run rolled back and remedied finishes bounded",
                 {a: round(v, 3) for a, v in within.items()}, best is not None and within[best] >= WITHIN_TARGET)]
    checked = scores(best) if best else {}
    out.append(claim(f"{best}'s mean normalised score is >= {SCORE_TARGET:.0%} of the best stable from-scratch arm's "
                     "in every setting (a from-scratch score <= 0: at least as high)",
                     "issue 21: rescuing costs no return against restarting with a stable setting", checked,
                     bool(checked) and all(v["holds"] for v in checked.values())))
    # the ablation on the runs that have both: the same setting, seed and remedy
    pairs = {(r["setting"], r["seed"], r["arm"].replace("rollback-last", "rollback", 1)) for r in runs if r["arm"] in LAST}
    paired = [r for r in runs if r["arm"] in ROLLED and (r["setting"], r["seed"], r["arm"]) in pairs]
    further = within_fraction(paired, ROLLED)
    last = within_fraction([r for r in runs if r["arm"] in LAST], LAST)
    if further is not None and last is not None:
        out.append(claim("rolling back further than the last healthy state (rollback_ratio 0.5, the default) ends "
                         "within the bound more often than rolling back to it (rollback_ratio 1), over every remedy, "
                         "on the settings and seeds run both ways",
                         "lit_qlearn's design: a diverging critic grows geometrically, the last healthy state is one "
                         "measurement from the bound", {"rollback_ratio 0.5": round(further, 3),
                                                        "rollback_ratio 1": round(last, 3)}, further > last))
    if cost is not None:
        out.append(claim(f"being ready to roll back (the healthy states kept at every healthy measurement) costs <= "
                         f"{COST_TARGET:.0%} of a TD3+BC run that never diverges",
                         "issue 21: at most 3%", round(cost["overhead"], 4), cost["overhead"] <= COST_TARGET))
    return out


def report(args: Any, runs: list[dict], cost: dict[str, Any] | None, started: float) -> None:
    import lit_qlearn.callbacks.crash as crash_module
    import lit_qlearn.callbacks.remedies as remedies_module

    result = {"claims": claims(runs, cost), "table": table(runs), "cost": cost,
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "resume", "workers", "smoke")},
              "runs": runs,
              "environment": environment({"crash": Path(crash_module.__file__),
                                          "remedies": Path(remedies_module.__file__)})}
    plot(runs, args.out / f"{args.name}.png")  # first: the results table links the figure when it exists
    write_result(args.name, result, started, args.out)


def plot(runs: list[dict], path: Any) -> None:
    """max|Q| / bound against updates, one column per setting: the top row the plain runs
    and the from-scratch arms, then one row per rollback arm (x: a rollback), every seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in runs))
    colors = dict(zip(("plain", *FROM_SCRATCH, *ROLLED), plt.get_cmap("tab10").colors))
    groups = [("left alone, and from scratch", ("plain", *FROM_SCRATCH))]
    groups += [(arm, (arm,)) for arm in ROLLED if runs_of(runs, arm=arm)]
    fig, axes = plt.subplots(len(groups), len(settings), figsize=(max(8.0, 5.5 * len(settings)), 2.2 * len(groups) + 1),
                             squeeze=False, sharex="col", sharey=True)
    for col, setting in enumerate(settings):
        for row, (title, arms) in enumerate(groups):
            ax = axes[row, col]
            for arm in arms:
                group = runs_of(runs, setting, arm)
                for i, r in enumerate(group):
                    y = [math.nan if v is None or not math.isfinite(v) else max(v, 1e-3) for v in r["q_bound_ratio"]]
                    ax.semilogy(r["steps"], y, color=colors[arm], alpha=0.8, lw=1.2, label=arm if i == 0 else None)
                    for b in r["rollbacks"]:
                        if b["step"] in r["steps"]:
                            at = r["steps"].index(b["step"])
                            ax.plot(b["step"], y[at], "x", color="black", ms=6, mew=1.5)
                if len(arms) == 1:
                    title = (f"{arm}: {sum(r['within_bound'] for r in group)}/{len(group)} end within the bound"
                             if group else f"{arm}: not run")
            ax.axhline(1.0, color="black", ls="--", lw=1)
            ax.set_title(f"{setting} | {title}", fontsize=8)
            if row == 0:
                ax.legend(fontsize=7, loc="lower right")
            if col == 0:
                ax.set_ylabel("max|Q| / bound", fontsize=8)
        axes[-1, col].set_xlabel("updates")
    save_figure(fig, path, "Rescuing a diverging critic (dashed: the Bellman bound; x: a rollback)")


# ------------------------------------------------------------------------------- main


def job_key(job: dict[str, Any]) -> tuple:
    return job["setting"], job["arm"], job["seed"], job["updates"]


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--updates", type=int, default=5000, help="updates of a td3-copy run")
    parser.add_argument("--small-updates", type=int, default=20_000, help="updates of a td3bc-small run")
    parser.add_argument("--small-fraction", type=float, default=0.005,
                        help="td3bc-small: the fraction of the default data")
    parser.add_argument("--every", type=int, default=25, help="updates between measurements (td3bc-small: x10)")
    parser.add_argument("--probe", type=int, default=512)
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--cost-updates", type=int, default=3000)
    parser.add_argument("--cost-repeats", type=int, default=5, help="0: no cost measurement (a stored one is kept)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--name", default="rescue", help="results file <out>/<name>.json / .png")
    parser.add_argument("--resume", action="store_true", help="keep the stored runs of the same sizes, run the rest")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing but the cost measurement (--cost-repeats): the claims, table and figure "
                             "of every run stored in <out>/<name>.json (e.g. runs merged from several files)")
    args = parse_args(parser, smoke={"settings": ["td3-copy/default", "td3bc-small"], "seeds": 1, "updates": 40,
                                     "arms": ["plain", "rollback+slow-targets", "rollback-last+lr", *FROM_SCRATCH],
                                     "small_updates": 40, "small_fraction": 0.5, "every": 5, "probe": 64,
                                     "episodes": 1, "cost_updates": 30, "cost_repeats": 1, "workers": 1},
                      data=lambda a: list(dict.fromkeys(dataset_of(s) for s in a.settings)))
    unknown = [s for s in args.settings if s not in SETTINGS and not s.startswith("td3-copy/")]
    if unknown:
        parser.error(f"--settings: unknown {unknown}; choose from {list(SETTINGS)} (or td3-copy/<dataset>)")
    started = time.perf_counter()
    jobs = []
    for setting, seed, arm in itertools.product(args.settings, range(args.first_seed, args.first_seed + args.seeds),
                                                 args.arms):
        small = not setting.startswith("td3-copy/")
        jobs.append({"setting": setting, "arm": arm, "seed": seed,
                     "updates": args.small_updates if small else args.updates,
                     "every": args.every * (10 if small and not args.smoke else 1), "probe": args.probe,
                     "episodes": args.episodes, "fraction": args.small_fraction})
    path = args.out / f"{args.name}.json"
    if args.report_only and not path.exists():
        parser.error(f"--report-only: {path} does not exist")
    runs, jobs, stored = resumed = stored_runs(path, jobs, job_key, args.resume, args.report_only)
    cost = stored.get("cost")
    started -= resumed.spent_s
    if args.cost_repeats > 0:
        cost = cost_pair(args.cost_updates, args.cost_repeats)
        print(f"cost of being ready to roll back: {cost['overhead']:+.1%} "
              f"({cost['median_warn']:.1f} vs {cost['median_rollback']:.1f} updates/s)", flush=True)
    with ProcessPoolExecutor(args.workers) as pool:
        for r in pool.map(run, jobs):
            runs.append(r)
            print(f"{r['setting']} {r['arm']} seed {r['seed']}: {r['steps_done']} updates, "
                  f"{len(r['rollbacks'])} rollbacks, final max|Q|/bound {r['final_ratio']:.3g}, "
                  f"score {r['normalized_score'] if r['normalized_score'] is None else round(r['normalized_score'], 1)}"
                  f" ({r['seconds']:.0f} s)", flush=True)
            report(args, runs, cost, started)
    if not jobs:
        report(args, runs, cost, started)


if __name__ == "__main__":
    main()
