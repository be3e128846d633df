"""Crash-step prediction on the random-walk toy (docs/design.md section 7, R1; section 5.4).

Setting (R1): ``RandomWalkQ(lr=0.01, optimizer="sgd", hidden=(64,), gamma=0.99)`` on
``RandomWalkDataModule(num_transitions=64, step=0.1, noise=0.02, seed=seed)``, full-batch
SGD, for seeds 0..9 (``L.seed_everything(seed)`` before the module is built, the same
seed for the trajectory). Each run trains in a Lightning Trainer (``max_steps=3000``)
with ``CrashPredictor(every_n_steps=1, window=10**9, action="warn")`` attached, which
measures ``crash/td_error_norm`` = ||u_t|| on the whole trajectory after every update.
The NaN step is T = (last step with a finite ``crash/td_error_norm``) + 1. Once the
parameters are non-finite the run is stopped (nothing after that step is used); a seed
with finite ||u|| up to ``max_steps`` is recorded as not diverging.

From these logs, for a fit point f (a fraction of T) two forecasts are made with
``predict_crash_step`` (1/||u|| fitted linearly against the step, zero crossing):

  paper:    the measurements at the steps s with f*T - 0.1*T <= s <= f*T (the paper's
            protocol: a window of 10% of the run ending at f*T);
  callback: what ``CrashPredictor(window=<that many points>)`` (its defaults otherwise:
            ``restart_on_action_change=True``, ``min_points=5``) fits at step floor(f*T):
            the same number of points, but not reaching back past the last change of
            the greedy actions on the probe set (the callback then keeps the last
            ``min_points - 1`` = 4 measurements). Reproduced by recording, after every
            measurement, the length h of the callback's history (its window is
            unbounded here) and fitting the last min(h, n) points up to floor(f*T).

The relative error is (forecast - T) / T in %; a fit whose line does not fall forecasts
nothing and counts as a miss. Reported for f in (0.6, 0.7, 0.8, 0.9): per-seed errors,
median and max |error|, seeds within 10%, the fits' R^2 (the callback only publishes a
forecast with R^2 >= 0.9). "How early": for f scanned from 0.30 to 0.95 in steps of
0.05, the earliest f of each seed from which on every later f of the scan is within
10%; median and max over seeds. Targets: median |error| <= 3% and every seed within
10% at f = 0.8, per protocol.

What a user acts on. Each R1 run also carries the predictor as it would be deployed,
``CrashPredictor(every_n_steps=5, window=20, action="warn")`` (DEPLOYED; defaults otherwise):
its **lead time** is NaN step - the first measurement from which on every published
``crash/predicted_step`` is within 10% of the NaN step (a measurement without a forecast
breaks the run); target: at least 20% of the run on every diverging seed. **False alarms**:
the same predictor on R1 variants that do not diverge (gamma 0.9, gamma 0.95, and
``norm="layer"``, ``--control-steps`` updates, same seeds): a warning on a run without a
NaN is a false alarm; target zero. Both go into the JSON's ``claims`` list ({claim,
published, measured, holds}, holds computed) with the R1 forecast accuracy at 80%, and
into the figure's fourth panel.

Also the variant printed in the paper's appendix: moves of 0.01
(``step=0.01``), 100 transitions (``num_transitions=100``; the toy draws them as one
trajectory), width 200 (``hidden=(200,)``), SGD lr 0.01, same seeds, 5000 steps:
whether ||u|| (measured every 10 steps) ever turns non-finite, and its final value.

Cost (section "overhead", on the default Hopper dataset of ``ensure_default_dataset``):
``CrashPredictor(action="checkpoint_and_stop")`` at its defaults (a probe of 2560
transitions every 100 steps) and with ``guard=True`` (plus a finiteness check of the
critic after every step), on a TD3+BC run (256x256 networks, batch
256), measured in situ as in ntk_speed.py: time inside its ``on_train_batch_end`` /
the rest of the same run. Runs without it and with both settings alternate (order
rotated each repeat); the ratio of median run times is reported too. And the price
of ``PreQNLineSearch()`` on TD3's critic (batch 256, twin critics): seconds per
update with and without it, alternating in one process.

Results: benchmarks/results/crash_prediction.json and a figure beside it (.png):
1/||u|| against the step with the 80% fit (paper protocol) extended to zero and the
NaN step marked, the error distribution per fraction, the error-vs-fraction scan, and
the deployed predictor's lead time per seed with the false alarms. ``--skip-overhead``
keeps the cost section of the previous results file (labelled ``overhead_carried_from``):
the cost needs an idle machine, the accuracy does not.

    python benchmarks/crash_prediction.py [--quick] [--out DIR] [--smoke]
"""
from __future__ import annotations

import json
import math
import platform
import statistics
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

import lit_qlearn
from harness import TrainClock, argument_parser, claim, git_info, interleaved, parse_args, quiet, quiet_trainer, \
    timed_hook, write_result
from lit_qlearn.callbacks import CrashPredictor, PreQNLineSearch
from lit_qlearn.data import OfflineDataModule
from lit_qlearn.datasets import ensure_default_dataset
from lit_qlearn.forecast import predict_crash_step
from lit_qlearn.toys import RandomWalkDataModule, RandomWalkQ

FRACTIONS = (0.6, 0.7, 0.8, 0.9)
SCAN = tuple(round(0.30 + 0.05 * k, 2) for k in range(14))  # 0.30 .. 0.95
WINDOW_FRACTION = 0.1
TOLERANCE = 10.0  # %
TARGET = {"fraction": 0.8, "median_abs_error_pct": 3.0, "all_within_pct": 10.0}
PROTOCOLS = ("paper", "callback")
R1 = {"lr": 0.01, "optimizer": "sgd", "hidden": [64], "gamma": 0.99, "num_transitions": 64, "step": 0.1,
      "noise": 0.02}
# What a user attaches (action="warn" here, so that a run goes on to its NaN and its
# forecasts can be scored): measured every 5 updates, the default window of 20 points
# (100 updates), the default horizon of 10 measurements.
DEPLOYED = {"every_n_steps": 5, "window": 20}
CONTROLS = {"gamma=0.9": {"gamma": 0.9}, "gamma=0.95": {"gamma": 0.95}, "layernorm": {"norm": "layer"}}
LEAD_TARGET = 0.2  # lead time of at least 20% of the run on every diverging seed
PRINTED = {"lr": 0.01, "optimizer": "sgd", "hidden": [200], "gamma": 0.99, "num_transitions": 100, "step": 0.01,
           "noise": 0.02}


class RecordingCrashPredictor(CrashPredictor):
    """CrashPredictor that also records, after every measurement, ||u|| (what it logs as
    ``crash/td_error_norm``) and the length of its fit history (with an unbounded window:
    the measurements since the last restart), and stops the Trainer once the parameters
    are non-finite (nothing finite is left to measure)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norms: dict[int, float] = {}
        self.history_length: dict[int, int] = {}
        self.restarts: list[int] = []
        self.predicted: dict[int, float | None] = {}  # the published crash/predicted_step (None: no forecast)

    def measure(self, trainer, pl_module, probe):
        before = len(self.history)
        metrics = super().measure(trainer, pl_module, probe)
        step = trainer.global_step
        if metrics:
            self.norms[step] = metrics["crash/td_error_norm"]
            self.predicted[step] = metrics.get("crash/predicted_step")
            self.history_length[step] = len(self.history)
            if len(self.history) <= before:  # the (unbounded) window restarted: greedy actions moved
                self.restarts.append(step)
        elif not all(torch.isfinite(p).all() for p in pl_module.parameters()):
            trainer.should_stop = True
        return metrics


def train(config: dict, seed: int, max_steps: int, every_n_steps: int | None,
          deployed: bool = False) -> tuple[RecordingCrashPredictor | None, RandomWalkQ, float, RecordingCrashPredictor | None]:
    """One toy run: (unbounded recorder measuring every ``every_n_steps`` or None, the module,
    wall seconds, the DEPLOYED predictor when ``deployed``)."""
    L.seed_everything(seed, verbose=False)
    module = RandomWalkQ(lr=config["lr"], optimizer=config["optimizer"], hidden=tuple(config["hidden"]),
                         gamma=config["gamma"], norm=config.get("norm"))
    dm = RandomWalkDataModule(num_transitions=config["num_transitions"], step=config["step"], noise=config["noise"],
                              seed=seed)
    callback = None if every_n_steps is None else \
        RecordingCrashPredictor(every_n_steps=every_n_steps, window=10**9, action="warn")
    user = RecordingCrashPredictor(**DEPLOYED, action="warn") if deployed else None
    trainer = quiet_trainer(max_steps=max_steps, callbacks=[c for c in (callback, user) if c is not None],
                            accelerator="cpu", devices=1)
    t0 = time.perf_counter()
    trainer.fit(module, dm)  # the predictors' warnings are the action="warn" runs' records, kept quiet
    return callback, module, time.perf_counter() - t0, user


# --------------------------------------------------------------------------- forecasts


def forecast(norms: dict[int, float], hist_len: dict[int, int], crash: int, f: float, protocol: str) -> dict:
    """The forecast at fit point f (see the module docstring) and its relative error in %."""
    end = math.floor(f * crash)
    start = f * crash - WINDOW_FRACTION * crash
    paper_steps = [s for s in norms if start <= s <= end]
    if protocol == "paper":
        steps = paper_steps
    else:
        n = min(hist_len[end], len(paper_steps))
        steps = list(range(end - n + 1, end + 1))
    fit = predict_crash_step(steps, [norms[s] for s in steps]) if len(steps) >= 2 else None
    pred = fit.step if fit is not None else None
    return {"fit_end": end, "fit_start": steps[0] if steps else None, "points": len(steps),
            "predicted_step": pred, "error_pct": None if pred is None else 100.0 * (pred - crash) / crash,
            "r2": None if fit is None else fit.r2, "slope": None if fit is None else fit.slope,
            "intercept": None if fit is None else fit.intercept}


def within(e: dict) -> bool:
    return e["error_pct"] is not None and abs(e["error_pct"]) <= TOLERANCE


def summarize(errors: list[dict]) -> dict:
    abs_err = [abs(e["error_pct"]) for e in errors if e["error_pct"] is not None]
    return {"errors_pct": [e["error_pct"] for e in errors],
            "median_abs_error_pct": statistics.median(abs_err) if abs_err else None,
            "max_abs_error_pct": (max(abs_err) if len(abs_err) == len(errors) else math.inf) if abs_err else None,
            "no_forecast": sum(e["error_pct"] is None for e in errors),
            "within_10pct": sum(within(e) for e in errors), "seeds": len(errors),
            "min_r2": min((e["r2"] for e in errors if e["r2"] is not None), default=None),
            "below_callback_min_r2_0.9": sum(e["r2"] is None or e["r2"] < 0.9 for e in errors),
            "points": [e["points"] for e in errors]}


def earliest_reliable(scan: dict[float, dict]) -> float | None:
    """Earliest f of the scan from which on every later f is within 10% (None: not even the last)."""
    best = None
    for f in sorted(scan, reverse=True):
        if not within(scan[f]):
            break
        best = f
    return best


# --------------------------------------------------------------------------- runs


def run_r1(seeds: list[int], max_steps: int) -> dict:
    runs = []
    for seed in seeds:
        callback, _, wall, user = train(R1, seed, max_steps, every_n_steps=1, deployed=True)
        norms = {int(s): v for s, v in callback.norms.items() if math.isfinite(v)}
        last = max(norms)
        diverged = last < max_steps
        run = {"seed": seed, "diverged": diverged, "nan_step": last + 1 if diverged else None,
               "last_finite_step": last, "train_wall_s": wall, "action_restarts": callback.restarts,
               "td_error_norm": [norms[s] for s in sorted(norms)]}
        if diverged:
            crash = last + 1
            hist = {int(k): v for k, v in callback.history_length.items()}
            run["fractions"] = {p: {str(f): forecast(norms, hist, crash, f, p) for f in FRACTIONS} for p in PROTOCOLS}
            run["scan"] = {p: {str(f): forecast(norms, hist, crash, f, p) for f in SCAN} for p in PROTOCOLS}
            run["earliest_reliable_fraction"] = {
                p: earliest_reliable({f: run["scan"][p][str(f)] for f in SCAN}) for p in PROTOCOLS}
            last_restart = max(callback.restarts, default=None)
            run["deployed"] = lead_time(user, crash)
            run["last_action_change_step"] = last_restart
            run["last_action_change_fraction"] = None if last_restart is None else last_restart / crash
        print(f"seed {seed}: " + (f"NaN at step {run['nan_step']}" if diverged else f"no NaN in {max_steps} steps")
              + f" ({len(callback.restarts)} greedy-action changes, last at step "
              f"{max(callback.restarts, default=None)}; {wall:.1f} s)", flush=True)
        runs.append(run)
    crashed = [r for r in runs if r["diverged"]]
    table = {p: {str(f): summarize([r["fractions"][p][str(f)] for r in crashed]) for f in FRACTIONS}
             for p in PROTOCOLS}
    early = {}
    for p in PROTOCOLS:
        values = [r["earliest_reliable_fraction"][p] for r in crashed]
        ok = [v for v in values if v is not None]
        early[p] = {"per_seed": values, "never": len(values) - len(ok),
                    "median": statistics.median([v if v is not None else math.inf for v in values]) if values else None,
                    "max": (max(ok) if len(ok) == len(values) else None) if values else None}
    targets = {}
    for p in PROTOCOLS:
        row = table[p][str(TARGET["fraction"])]
        med = row["median_abs_error_pct"]
        med_ok = med is not None and med <= TARGET["median_abs_error_pct"]
        all_ok = bool(crashed) and row["within_10pct"] == len(runs)
        targets[p] = {"median_abs_error_le_3pct_at_80": med_ok, "all_seeds_within_10pct_at_80": all_ok,
                      "meets": med_ok and all_ok, "median_abs_error_pct": row["median_abs_error_pct"],
                      "within_10pct": row["within_10pct"], "seeds": len(runs)}
    nan_steps = [r["nan_step"] for r in crashed]
    leads = [r["deployed"]["lead_fraction"] for r in crashed]
    lead = {"per_seed_steps": [r["deployed"]["lead_steps"] for r in crashed], "per_seed_fraction": leads,
            "min_fraction": min((v if v is not None else 0.0 for v in leads), default=None),
            "median_fraction": statistics.median([v if v is not None else 0.0 for v in leads]) if leads else None,
            "fired_steps_left": [r["deployed"]["fired_steps_before_nan"] for r in crashed]}
    return {"setting": {**R1, "seeds": seeds, "max_steps": max_steps, "every_n_steps": 1,
                        "deployed_callback": f"CrashPredictor({', '.join(f'{k}={v}' for k, v in DEPLOYED.items())}, "
                                             "action='warn'), defaults otherwise (horizon 10 * every_n_steps)",
                        "callback": "CrashPredictor(every_n_steps=1, window=10**9, action='warn'), defaults otherwise "
                                    "(min_points=5, restart_on_action_change=True, action_rtol=1e-2)"},
            "diverged": len(crashed), "seeds": len(runs),
            "nan_steps": nan_steps, "nan_step_range": [min(nan_steps), max(nan_steps)] if nan_steps else None,
            "table": table, "earliest_reliable_fraction": early, "targets": targets, "lead_time": lead,
            "runs": runs}


def lead_time(user: RecordingCrashPredictor, crash: int) -> dict:
    """Lead time of the deployed predictor's forecasts: from the first measurement after which
    every published forecast is within 10% of the NaN step ``crash`` (a measurement without
    a forecast breaks the run of good ones), to the NaN."""
    steps = sorted(s for s in user.predicted if s < crash)
    good = [user.predicted[s] is not None and abs(user.predicted[s] - crash) <= TOLERANCE / 100 * crash
            for s in steps]
    first = None
    for s, ok in zip(reversed(steps), reversed(good)):
        if not ok:
            break
        first = s
    fired = user.stopped_step
    return {"first_reliable_step": first, "lead_steps": None if first is None else crash - first,
            "lead_fraction": None if first is None else (crash - first) / crash,
            "fired_step": fired, "fired_steps_before_nan": None if fired is None else crash - fired,
            "forecasts": {str(s): user.predicted[s] for s in steps}}


def run_controls(seeds: list[int], max_steps: int) -> dict:
    """False alarms: the deployed predictor on R1 variants that converge (gamma <= 0.95, a
    LayerNorm critic). A false alarm is a warning (forecast within the horizon) on a run
    that has no NaN in ``max_steps``."""
    out = {}
    for name, change in CONTROLS.items():
        runs = []
        for seed in seeds:
            _, module, wall, user = train({**R1, **change}, seed, max_steps, every_n_steps=None, deployed=True)
            norms = [v for _, v in sorted(user.norms.items())]
            diverged = max(user.norms, default=0) < max_steps or not all(torch.isfinite(p).all()
                                                                          for p in module.parameters())
            runs.append({"seed": seed, "diverged": diverged, "fired_step": user.stopped_step,
                         "false_alarm": user.stopped_step is not None and not diverged,
                         "first_td_error_norm": norms[0] if norms else None,
                         "final_td_error_norm": norms[-1] if norms else None, "train_wall_s": wall})
            print(f"control {name} seed {seed}: " + ("NaN" if diverged else "finite")
                  + f", warned at {user.stopped_step}, ||u|| {runs[-1]['first_td_error_norm']:.3g} -> "
                  f"{runs[-1]['final_td_error_norm']:.3g} ({wall:.1f} s)", flush=True)
        out[name] = {"change": change, "runs": runs, "diverged": sum(r["diverged"] for r in runs),
                     "false_alarms": sum(r["false_alarm"] for r in runs), "seeds": len(runs)}
    return {"setting": {**R1, "max_steps": max_steps, "variants": CONTROLS,
                        "callback": f"CrashPredictor({', '.join(f'{k}={v}' for k, v in DEPLOYED.items())}, "
                                    "action='warn')"},
            "variants": out, "false_alarms": sum(v["false_alarms"] for v in out.values()),
            "runs": sum(v["seeds"] for v in out.values()),
            "converged": sum(v["seeds"] - v["diverged"] for v in out.values())}


def run_printed(seeds: list[int], max_steps: int, every: int) -> dict:
    runs = []
    for seed in seeds:
        callback, module, wall, _ = train(PRINTED, seed, max_steps, every_n_steps=every)
        series = dict(sorted(callback.norms.items()))
        finite_params = all(torch.isfinite(p).all() for p in module.parameters())
        nonfinite = (not finite_params) or max(series, default=0) < max_steps
        norms = list(series.values())
        run = {"seed": seed, "diverged": bool(nonfinite),
               "last_finite_step": max(series, default=None),
               "first_td_error_norm": norms[0] if norms else None,
               "final_td_error_norm": series.get(max_steps) if not nonfinite else None,
               "max_td_error_norm": max(norms) if norms else None,
               "min_td_error_norm": min(norms) if norms else None,
               "action_changes": len(callback.restarts), "train_wall_s": wall,
               "td_error_norm_every_500": {str(s): v for s, v in series.items() if s % 500 == 0}}
        print(f"printed variant seed {seed}: " + ("NaN/inf" if nonfinite else "finite") +
              f", ||u||: first {run['first_td_error_norm']:.3g}, final {run['final_td_error_norm'] or float('nan'):.3g}"
              f", max {run['max_td_error_norm']:.3g} ({wall:.1f} s)", flush=True)
        runs.append(run)
    return {"setting": {**PRINTED, "seeds": seeds, "max_steps": max_steps, "every_n_steps": every,
                        "note": "100 transitions drawn as one random-walk trajectory (lit_qlearn.toys.random_walk)"},
            "diverged": sum(r["diverged"] for r in runs), "seeds": len(runs), "runs": runs}


# --------------------------------------------------------------------------- cost


def _fit_td3(dataset: str, updates: int, seed: int, callbacks: list, bc: bool = True) -> tuple[float, L.Trainer]:
    from lit_qlearn.algorithms import TD3, TD3BC

    L.seed_everything(seed, verbose=False)
    dm = OfflineDataModule(dataset, seed=seed, steps_per_epoch=updates)
    model = TD3BC(eval_every=0) if bc else TD3(eval_every=0)
    clock = TrainClock()
    trainer = quiet_trainer(max_steps=updates, callbacks=[clock, *callbacks], accelerator="cpu", devices=1)
    trainer.fit(model, dm)
    return clock.seconds, trainer


def bench_overhead(dataset: str, updates: int, repeats: int, preqn_updates: int, seed: int) -> dict:
    """What CrashPredictor costs a TD3+BC run, and what PreQNLineSearch costs per TD3 update."""
    import tempfile

    configs = {"without": None, "default": {}, "guard": {"guard": True}}
    seconds_by, in_situ, stopped_early = {k: [] for k in configs}, {k: [] for k in configs if k != "without"}, []
    with tempfile.TemporaryDirectory() as tmp:
        for r, name in interleaved(configs, repeats):
            kwargs = configs[name]
            callback = None if kwargs is None else \
                timed_hook(CrashPredictor(action="checkpoint_and_stop", dirpath=tmp, **kwargs))
            seconds, trainer = _fit_td3(dataset, updates, seed, [] if callback is None else [callback])
            seconds_by[name].append(seconds)
            if callback is not None:
                in_situ[name].append(callback.hook_seconds / (seconds - callback.hook_seconds))
                stopped_early.append(trainer.global_step < updates)
            print(f"overhead repeat {r}: {name}: {seconds:.1f} s", flush=True)
    plain = statistics.median(seconds_by["without"])
    crash = {
        "setting": f"TD3BC, default 256x256 networks, batch 256, {updates} updates, no logger",
        "callback": "CrashPredictor(action='checkpoint_and_stop') at its defaults (every_n_steps=100, "
                    "probe_size=2560, guard=False) and with guard=True (critic finiteness check every step)",
        "train_seconds": seconds_by,
        "overhead_in_situ_per_run": in_situ,
        "overhead_measured": {k: statistics.median(v) for k, v in in_situ.items()},
        "overhead_ratio_of_median_run_times": {k: statistics.median(seconds_by[k]) / plain - 1 for k in in_situ},
        "stopped_early": stopped_early,
    }
    per_update = {"without": [], "with": []}
    accepted, shrinks = [], []
    for r, with_cb in interleaved((False, True), repeats):
        callback = PreQNLineSearch() if with_cb else None
        seconds, trainer = _fit_td3(dataset, preqn_updates, seed, [callback] if with_cb else [], bc=False)
        per_update["with" if with_cb else "without"].append(seconds / trainer.global_step)
        if with_cb:
            accepted.append(sum(s.accepted for s in callback.last) / len(callback.last))
            shrinks.append(max(s.shrink_steps for s in callback.last))
        print(f"PreQN cost repeat {r}: PreQNLineSearch={with_cb}: {1e3 * seconds / trainer.global_step:.1f} "
              "ms/update", flush=True)
    without, with_ = statistics.median(per_update["without"]), statistics.median(per_update["with"])
    preqn = {
        "setting": f"TD3 (no BC), twin 256x256 critics, batch 256, {preqn_updates} updates, no logger",
        "callback": "PreQNLineSearch() defaults: lr 0.1, cos_threshold 0.9, shrink 0.5, max_shrinks 20",
        "seconds_per_update_without": per_update["without"], "seconds_per_update_with": per_update["with"],
        "slowdown_ratio_of_medians": with_ / without,
        "last_step_accepted_fraction": accepted, "last_step_shrink_steps": shrinks,
    }
    return {"crash_predictor": crash, "preqn_line_search": preqn}


# --------------------------------------------------------------------------- claims


def claims(result: dict) -> list[dict]:
    """The numbers a user acts on, each with what was published (or targeted) and whether it holds."""
    r1, controls = result["r1"], result["controls"]
    out = []
    for p in PROTOCOLS:
        row = r1["table"][p]["0.8"]
        out.append(claim(
            f"R1, lr 0.01: a linear fit of 1/||u|| over 10% of the run ending at 80% of it forecasts the NaN step "
            f"within 10% on every diverging seed ({p} window)",
            "a fit on steps 450-500 predicted step 605; NaN at step 605 (Yue et al. 2023, appendix C)",
            f"{row['within_10pct']}/{row['seeds']} seeds within 10%, median |error| "
            f"{_fmt(row['median_abs_error_pct'], '.1f')}%, max {_fmt(row['max_abs_error_pct'], '.1f')}%",
            row["seeds"] > 0 and row["within_10pct"] == row["seeds"]))
    lead = r1["lead_time"]
    out.append(claim(
        f"R1: the deployed CrashPredictor ({DEPLOYED}) gives a lead time of at least {LEAD_TARGET:.0%} of the run on "
        "every diverging seed (steps from the first forecast that stays within 10% of the NaN step to the NaN)",
        None,
        f"min {_fmt(lead['min_fraction'], '.1%')}, median {_fmt(lead['median_fraction'], '.1%')}; per seed "
        + ", ".join(_fmt(v, ".1%") for v in lead["per_seed_fraction"]),
        bool(lead["per_seed_fraction"]) and all(v is not None and v >= LEAD_TARGET for v in lead["per_seed_fraction"])))
    out.append(claim(
        "zero false alarms of the deployed CrashPredictor on runs that do not diverge (R1 with gamma 0.9 or 0.95, or "
        "with a LayerNorm critic)",
        "gamma <= 0.95 converges with normalised SEEM near 0 (docs/design.md R1); LayerNorm restrains divergence "
        "(Yue et al. 2023)",
        f"{controls['false_alarms']} false alarms in {controls['converged']} converged runs ("
        + ", ".join(f"{k}: {v['false_alarms']} of {v['seeds'] - v['diverged']}"
                    for k, v in controls["variants"].items())
        + f"); {controls['runs'] - controls['converged']} of the runs diverged",
        controls["false_alarms"] == 0 and controls["converged"] > 0))
    return out


# --------------------------------------------------------------------------- figure


def figure(r1: dict, controls: dict, path: Path, show_seeds: int = 3) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    crashed = [r for r in r1["runs"] if r["diverged"]]
    fig, axes = plt.subplots(1, 4, figsize=(23, 5))
    ax = axes[0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, r in enumerate(crashed[:show_seeds]):
        c = colors[k % len(colors)]
        steps = np.arange(1, r["last_finite_step"] + 1)
        ax.plot(steps, 1.0 / np.asarray(r["td_error_norm"]), color=c, lw=1.2, label=f"seed {r['seed']}: 1/||u||")
        fit = r["fractions"]["paper"]["0.8"]
        if fit["slope"] is not None:
            t = np.linspace(fit["fit_start"], fit["predicted_step"] or r["nan_step"], 50)
            ax.plot(t, fit["slope"] * t + fit["intercept"], color=c, ls="--", lw=1.6,
                    label=f"  fit on steps {fit['fit_start']}-{fit['fit_end']}: forecast {fit['predicted_step']:.0f}")
            ax.axvspan(fit["fit_start"], fit["fit_end"], color=c, alpha=0.12)
        ax.axvline(r["nan_step"], color=c, ls=":", lw=1.5, label=f"  NaN at step {r['nan_step']}")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylim(bottom=-0.05 * ax.get_ylim()[1])
    ax.set_xlabel("step")
    ax.set_ylabel("1 / ||u||")
    ax.set_title("R1, lr 0.01: 1/||u|| and the 80% fit (paper window)")
    ax.legend(fontsize=7, loc="upper right")

    ax = axes[1]
    positions, data, labels = [], [], []
    for i, f in enumerate(FRACTIONS):
        for j, p in enumerate(PROTOCOLS):
            errs = [e for e in r1["table"][p][str(f)]["errors_pct"] if e is not None]
            x = i * 3 + j
            positions.append(x)
            data.append(errs)
            labels.append(f"{f:.1f}\n{p}")
            jitter = np.random.default_rng(i * 2 + j).uniform(-0.15, 0.15, len(errs))
            ax.scatter(x + jitter, errs, s=14, color=colors[j], zorder=3)
    ax.boxplot(data, positions=positions, widths=0.6, showfliers=False)
    ax.set_xticks(positions, labels, fontsize=8)
    lim = 40.0
    ax.set_ylim(-lim, lim)
    for x, errs in zip(positions, data):  # points off the scale: a marker at the edge, the values listed
        for sign in (1, -1):
            off = sorted((e for e in errs if sign * e > lim), key=abs, reverse=True)
            if off:
                y = sign * lim * 0.97
                ax.scatter([x], [y], marker="^" if sign > 0 else "v", color="k", s=25, zorder=4)
                ax.annotate("\n".join(f"{e:+.0f}%" for e in off), (x, y), textcoords="offset points",
                            xytext=(0, -8 if sign > 0 else 8), ha="center", va="top" if sign > 0 else "bottom",
                            fontsize=6.5)
    for y in (-TOLERANCE, TOLERANCE):
        ax.axhline(y, color="r", ls="--", lw=0.8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("(forecast - NaN step) / NaN step [%]")
    ax.set_title(f"forecast error by fit point ({len(crashed)} seeds; dashed: +-10%; axis clipped at +-{lim:.0f}%)",
                 fontsize=10)

    ax = axes[2]
    for j, p in enumerate(PROTOCOLS):
        for k, r in enumerate(crashed):
            errs = [r["scan"][p][str(f)]["error_pct"] for f in SCAN]
            errs = [np.nan if e is None else e for e in errs]
            ax.plot(SCAN, errs, color=colors[j], lw=0.9, alpha=0.7, ls="-" if p == "paper" else "--",
                    label=p if k == 0 else None)
    for y in (-TOLERANCE, TOLERANCE):
        ax.axhline(y, color="r", ls="--", lw=0.8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylim(-60, 60)
    ax.set_xlabel("fit point f (fraction of the NaN step; window 0.1 T ending there)")
    ax.set_ylabel("error [%] (clipped to +-60)")
    ax.set_title("error against the fit point, every seed")
    ax.legend(fontsize=8)

    ax = axes[3]  # what a user acts on: lead time per diverging seed, false alarms on converging runs
    leads = [100 * (r["deployed"]["lead_fraction"] or 0.0) for r in crashed]
    ax.bar(range(len(crashed)), leads, color=colors[0])
    for k, r in enumerate(crashed):
        ax.annotate(f"{r['deployed']['lead_steps'] or 0}", (k, leads[k]), ha="center", va="bottom", fontsize=7)
    ax.axhline(100 * LEAD_TARGET, color="r", ls="--", lw=0.8, label=f"target {LEAD_TARGET:.0%}")
    ax.set_xticks(range(len(crashed)), [str(r["seed"]) for r in crashed])
    ax.set_xlabel("seed (bar label: lead time in steps)")
    ax.set_ylabel("lead time [% of the run]")
    alarms = ", ".join(f"{k} {v['false_alarms']}/{v['seeds'] - v['diverged']}" for k, v in controls["variants"].items())
    ax.set_title(f"deployed CrashPredictor(every {DEPLOYED['every_n_steps']}, window {DEPLOYED['window']}): lead time"
                 f"\nfalse alarms / converged runs: {alarms}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- output


def _git() -> dict:
    return git_info({"crash_py": Path(lit_qlearn.callbacks.crash.__file__),
                     "forecast_py": Path(lit_qlearn.forecast.__file__), "toys_py": Path(lit_qlearn.toys.__file__)})


def _fmt(v, spec=".1f"):
    return "-" if v is None else ("inf" if v == math.inf else format(v, spec))


def print_summary(result: dict) -> None:
    r1 = result["r1"]
    print(f"\nR1 (lr 0.01): {r1['diverged']}/{r1['seeds']} seeds diverged, NaN steps {r1['nan_steps']}")
    print(f"{'f':>4} {'protocol':>9} {'median|err|%':>13} {'max|err|%':>10} {'<=10%':>6} {'min R2':>7}  errors %")
    for f in FRACTIONS:
        for p in PROTOCOLS:
            row = r1["table"][p][str(f)]
            errs = " ".join(_fmt(e, "+.1f") for e in row["errors_pct"])
            print(f"{f:4.1f} {p:>9} {_fmt(row['median_abs_error_pct'], '13.2f')} "
                  f"{_fmt(row['max_abs_error_pct'], '10.2f')} {row['within_10pct']:>3}/{row['seeds']:<2} "
                  f"{_fmt(row['min_r2'], '7.3f')}  {errs}")
    for p in PROTOCOLS:
        e = r1["earliest_reliable_fraction"][p]
        print(f"earliest f from which all later f are within 10% ({p}): median {_fmt(e['median'], '.2f')}, "
              f"max {_fmt(e['max'], '.2f')} (never: {e['never']}); per seed {e['per_seed']}")
    for p in PROTOCOLS:
        t = r1["targets"][p]
        print(f"target at 80% ({p}): median |err| <= 3%: {t['median_abs_error_le_3pct_at_80']}, "
              f"all seeds within 10%: {t['all_seeds_within_10pct_at_80']}")
    if "overhead" in result:
        c, q = result["overhead"]["crash_predictor"], result["overhead"]["preqn_line_search"]
        for k, v in c["overhead_measured"].items():
            print(f"CrashPredictor ({k}) overhead on TD3+BC: {100 * v:.2f}% in situ (runs: "
                  + ", ".join(f"{100 * x:.2f}%" for x in c["overhead_in_situ_per_run"][k])
                  + f"), ratio of median run times {100 * c['overhead_ratio_of_median_run_times'][k]:+.1f}%")
        print(f"PreQNLineSearch on TD3: {1e3 * statistics.median(q['seconds_per_update_with']):.1f} ms/update against "
              f"{1e3 * statistics.median(q['seconds_per_update_without']):.1f} "
              f"({q['slowdown_ratio_of_medians']:.1f}x)")
    lead = r1["lead_time"]
    print(f"lead time of the deployed predictor ({DEPLOYED}): steps {lead['per_seed_steps']}, fraction of the run "
          + ", ".join(_fmt(v, ".0%") for v in lead["per_seed_fraction"]) + f"; it warned {lead['fired_steps_left']} "
          "steps before the NaN")
    c = result["controls"]
    print(f"false alarms: {c['false_alarms']} in {c['converged']} converged runs of {c['runs']} ("
          + ", ".join(f"{k}: {v['false_alarms']} alarms, {v['diverged']} diverged" for k, v in c["variants"].items())
          + ")")
    pr = result["printed_variant"]
    print(f"printed variant: {pr['diverged']}/{pr['seeds']} diverged; final ||u||: "
          + ", ".join(_fmt(r["final_td_error_norm"], ".3g") for r in pr["runs"]))


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="3 seeds, printed variant 1000 steps (a first look)")
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1")
    parser.add_argument("--max-steps", type=int, default=3000, help="R1 runs")
    parser.add_argument("--printed-steps", type=int, default=5000, help="printed-variant runs")
    parser.add_argument("--printed-every", type=int, default=10, help="printed variant: measure ||u|| every N steps")
    parser.add_argument("--overhead-updates", type=int, default=2000, help="TD3+BC updates per CrashPredictor cost run")
    parser.add_argument("--overhead-repeats", type=int, default=2, help="runs with and without, alternating")
    parser.add_argument("--preqn-updates", type=int, default=200, help="TD3 updates per PreQNLineSearch cost run")
    parser.add_argument("--control-steps", type=int, default=3000, help="steps of the runs that should not diverge")
    parser.add_argument("--skip-overhead", action="store_true",
                        help="no cost section: the previous results' one is carried over, marked as such")
    parser.add_argument("--dataset", default=None, help="HDF5 for the cost section (default: the generated Hopper data)")
    # smoke: seed 0 reaches its NaN at step 299 (every R1 section is exercised)
    args = parse_args(parser, smoke={"seeds": 1, "max_steps": 400, "printed_steps": 100, "control_steps": 100,
                                     "overhead_updates": 100, "overhead_repeats": 1, "preqn_updates": 10},
                      data=lambda a: [] if a.skip_overhead else [a.dataset or "default"])
    seeds = list(range(3 if args.quick else args.seeds))
    printed_steps = 1000 if args.quick else args.printed_steps
    name = "crash_prediction_quick" if args.quick else "crash_prediction"
    out = args.out / f"{name}.json"  # the figure goes beside it (.png)
    quiet()  # no per-run banners
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is fastest and deterministic in timing

    started = time.perf_counter()
    result = {
        "benchmark": "crash-step prediction from a linear fit of 1/||u|| on the random-walk toy (docs/design.md R1)",
        "quick": args.quick,
        "smoke": args.smoke,
        "definitions": {
            "nan_step": "T = last step with a finite crash/td_error_norm + 1",
            "window": f"measurements at steps f*T - {WINDOW_FRACTION}*T <= s <= f*T (paper); callback: the same number "
                      "of points ending at floor(f*T), cut at the callback's restart after the last greedy-action "
                      "change (it keeps min_points - 1 = 4 earlier points)",
            "error_pct": "100 * (forecast - T) / T; a fit whose line does not fall forecasts nothing (a miss)",
            "earliest_reliable_fraction": f"earliest f in {list(SCAN)} from which on every later f of the scan is "
                                          "within 10% (None: not even f = 0.95)",
        },
        "versions": {"torch": torch.__version__, "lightning": L.__version__, "numpy": np.__version__,
                     "python": platform.python_version(), "lit_qlearn": getattr(lit_qlearn, "__version__", None)},
        "git": _git(),
        "device": "cpu",
        "torch_threads": {"r1_and_printed": 1, "overhead": threads},
        "fractions": list(FRACTIONS),
        "scan": list(SCAN),
        "target": TARGET,
    }
    result["r1"] = run_r1(seeds, args.max_steps)
    result["controls"] = run_controls(seeds, 1000 if args.quick else args.control_steps)
    result["printed_variant"] = run_printed(seeds, printed_steps, args.printed_every)
    if not args.skip_overhead:
        torch.set_num_threads(threads)  # TD3 at its usual size: every core, as a user would run it
        dataset = args.dataset or str(ensure_default_dataset())
        result["overhead"] = bench_overhead(dataset, 300 if args.quick else args.overhead_updates,
                                            1 if args.quick else args.overhead_repeats,
                                            20 if args.quick else args.preqn_updates, seed=0)
    elif out.is_file() and "overhead" in (previous := json.loads(out.read_text())):
        # Cost needs an idle machine; a run without it keeps the last measured numbers, labelled.
        carried = previous.get("overhead_carried_from") or {"commit": previous.get("git", {}).get("commit"),
                                                            "wall_time_s": previous.get("wall_time_s")}
        result["overhead"] = previous["overhead"]
        result["overhead_carried_from"] = {**carried, "note": "not re-measured in this run (--skip-overhead)"}
    result["targets"] = result["r1"]["targets"]
    result["claims"] = claims(result)
    figure(result["r1"], result["controls"], out.with_suffix(".png"))
    print_summary(result)
    write_result(name, result, started, args.out)


if __name__ == "__main__":
    main()
