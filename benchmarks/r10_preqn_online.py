"""R10: PreQN without target networks against TD3, SAC and TD3 without target networks,
online on Hopper-v5: "PreQN is stable and performant, despite not using target networks"
(Achiam, Knight & Abbeel 2019, section 6 and the appendix's MuJoCo figures).

Algorithms (``--algos``), each at its lit_qlearn defaults (256x256 networks, Adam 3e-4 for
every optimiser, gamma 0.99, batch 256, one update per environment step, exploration noise
0.1 half-ranges for the deterministic actors):

* ``preqn``: :class:`~lit_qlearn.algorithms.PreQN`, sin critic (the paper's choice), no
  target networks, the critic's NTK-preconditioned step (alpha 0.1, cos threshold 0.9);
* ``td3``: :class:`~lit_qlearn.algorithms.TD3`, ReLU, Polyak targets (tau 0.005, moved
  with the delayed actor);
* ``sac``: :class:`~lit_qlearn.algorithms.SAC`, ReLU, Polyak targets, learned temperature;
* ``td3-no-target``: the same TD3 with ``EMATarget.no_ema()``: the targets are copied from
  the online networks after every update, so every TD target uses the current critic and
  actor (the one target-update mechanism, lit_qlearn.targets, with tau 1 every update; the
  setting benchmarks/rescue.py calls td3-copy).

Each run: ``--learning-starts`` uniformly random environment steps, then training to
``--steps`` environment steps in all (one update per step). On every run a SEEMMonitor
(``--seem-probe`` probe transitions, every ``--seem-every`` updates) and a
CrashPredictor with ``action="warn"`` (it records and never stops; ``--crash-probe``
transitions, every ``--crash-every`` updates), both on probe sets drawn from the random
prefill; and a greedy evaluation of ``--episodes`` episodes every ``--eval-every``
environment steps. Recorded against environment steps: the evaluation return, SEEM and
``crash/q_bound_ratio`` = max|Q| over the probe's (s, a) and (s', mu(s')) divided by the
Bellman bound.

The bound: online, the CrashPredictor would take max|r| from the probe set, i.e. from the
random prefill, whose rewards are far below a trained hopper's, so a healthy trained critic
would "leave" it. Here it is given: ``q_bound = R_MAX / (1 - gamma)`` with ``R_MAX`` = 10,
about twice the largest Hopper-v5 reward in the generated datasets (5.19, the medium
policy's; medium-replay's 4.79); each run also records the largest |r| of its own replay
buffer (``buffer_max_abs_reward``), and the report says whether any exceeded ``R_MAX``.
Every record keeps max|Q| itself, so another bound can be applied afterwards.

A run whose ratio passes ``STOP_RATIO`` (100x the bound) or whose critic turns non-finite
has diverged for good and stops there (``stopped_at``); its curves end at that step.

Claims (``holds`` computed over the finished runs; when fewer seeds finished than were
planned the claim's text says so and ``measured`` gives ``finished_seeds`` and
``planned_seeds``): PreQN's max|Q| stays within the bound at every measurement on every
seed; TD3 without target networks leaves it on at least one seed; PreQN's mean final
return (:func:`final_return`: the mean of its evaluations over the last fifth of its
environment steps, 40k to 50k at the default sizes, since one evaluation of a few episodes
swings by hundreds on Hopper) is at least ``RETURN_RATIO`` = 0.8 times
TD3's (the paper: "comparable or better" on most tasks; 0.8 is this benchmark's reading of
"comparable").

Resumable, in parts: every finished run is a record in ``"runs"`` of the results file,
rewritten at once (harness.stored_runs); ``--resume`` runs only the (algorithm, seed)
pairs not stored with the same sizes, ``--first-seed`` / ``--seeds`` / ``--algos`` pick a
part, ``--report-only`` redraws claims and figure from the stored runs. Runs go seed-major
(seed 0 of every algorithm, then seed 1, ...), one at a time, one torch thread each.
Sizing on this machine's 2 shared CPU cores (2,000 updates of each, one thread, niced):
about 40 ms per environment step for PreQN (its critic's NTK Gram on the batch and the line
search), 18 for TD3, 28 for SAC, 23 for TD3 without targets; SEEM (512 probe transitions)
about 0.1 s and a bound measurement (2,560) under 0.1 s each. A 50k-step run is thus about
27 minutes of PreQN, 12 of TD3, 19 of SAC; one seed of all four about 75 minutes. The
study's own per-step costs are in the results file (``cost``: seconds per environment step
of the training loop, and of the monitors and evaluations per update, medians over runs).

    python benchmarks/r10_preqn_online.py [--seeds 3] [--steps 50000] [--algos preqn td3 sac td3-no-target]
                                          [--resume] [--report-only]
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L

from harness import (ROOT, EnvStepEvaluation, SeriesLogger, argument_parser, claim, environment, late_mean,
                     parse_args, quiet_trainer, save_figure, stored_runs, timed_hook, write_result)

ENV = "Hopper-v5"
ALGOS = ("preqn", "td3", "sac", "td3-no-target")
COLORS = {"preqn": "tab:red", "td3": "tab:blue", "sac": "tab:green", "td3-no-target": "tab:purple"}
LABELS = {"preqn": "PreQN (sin, no targets)", "td3": "TD3 (ReLU, Polyak targets)", "sac": "SAC (ReLU)",
          "td3-no-target": "TD3 without targets"}
GAMMA = 0.99
#: the largest |r| the bound allows: about twice the largest Hopper-v5 reward of the generated datasets (5.19)
R_MAX = 10.0
#: a run this far beyond the bound (or non-finite) has diverged for good: it stops
STOP_RATIO = 100.0
#: "comparable": PreQN's mean final return at least this fraction of TD3's
RETURN_RATIO = 0.8


def build(algo: str) -> tuple[L.LightningModule, list[L.Callback]]:
    """The module of ``algo`` and the callbacks that make it that algorithm (the target rule)."""
    from lit_qlearn.algorithms import SAC, TD3, PreQN
    from lit_qlearn.callbacks import EMATarget

    if algo == "preqn":
        return PreQN(gamma=GAMMA, eval_every=0), []
    if algo == "sac":
        return SAC(gamma=GAMMA, eval_every=0), []
    module = TD3(gamma=GAMMA, eval_every=0)
    return module, [EMATarget.no_ema()] if algo == "td3-no-target" else []


class StopWhenDiverged(L.Callback):
    """Stop the fit at a CrashPredictor measurement beyond ``STOP_RATIO`` times the bound,
    or at which the critic is non-finite (the predictor then publishes no ratio)."""

    def __init__(self, crash: Any, logged: SeriesLogger) -> None:
        self.crash, self.logged = crash, logged
        self.stopped_at: int | None = None
        self.ratio: float | None = None  # the ratio it stopped at (None: the critic was non-finite)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.crash.last_step != step:
            return
        ratio = self.logged.rows.get(step, {}).get("crash/q_bound_ratio")
        if ratio is None or not math.isfinite(ratio) or ratio > STOP_RATIO:
            self.stopped_at, self.ratio = step, ratio
            trainer.should_stop = True


def run(job: dict[str, Any]) -> dict[str, Any]:
    """One run of ``job`` (algo, seed and the sizes); the record the results file keeps."""
    import torch

    from lit_qlearn.callbacks import CrashPredictor, SEEMMonitor
    from lit_qlearn.data import OnlineDataModule

    torch.set_num_threads(1)
    algo, seed, starts = job["algo"], job["seed"], job["learning_starts"]
    L.seed_everything(seed, verbose=False)
    dm = OnlineDataModule(ENV, learning_starts=starts, batch_size=256, capacity=job["steps"], seed=seed,
                          save_buffer=False)
    module, callbacks = build(algo)
    logged = SeriesLogger()
    seem = timed_hook(SEEMMonitor(every_n_steps=job["seem_every"], probe_size=job["seem_probe"]))
    crash = timed_hook(CrashPredictor(every_n_steps=job["crash_every"], probe_size=job["crash_probe"], action="warn",
                                      q_bound=R_MAX / (1 - GAMMA)))
    stop = StopWhenDiverged(crash, logged)
    evaluation = EnvStepEvaluation(dm, every=job["eval_every"], episodes=job["episodes"])
    trainer = quiet_trainer(max_steps=job["steps"] - starts, logger=logged, log_every_n_steps=job["crash_every"],
                            callbacks=[*callbacks, seem, crash, stop, evaluation], accelerator="cpu", devices=1)
    begin = time.perf_counter()
    trainer.fit(module, dm)
    seconds = time.perf_counter() - begin

    def on_env_steps(key: str) -> dict[str, list[float]]:
        steps, values = logged.series(key)  # updates; one environment step per update after the prefill
        return {"env_steps": [starts + s for s in steps], "values": values}

    ratio = on_env_steps("crash/q_bound_ratio")
    finite = all(bool(torch.isfinite(p).all()) for p in module.q_network().parameters())
    eval_seconds = sum(h["seconds"] for h in evaluation.history)
    monitor_seconds = seem.hook_seconds + crash.hook_seconds
    updates = trainer.global_step
    record = {**{k: job[k] for k in ("algo", "seed", "steps", "learning_starts")}, "env": ENV,
              "env_steps_done": dm.rollout.env_steps, "updates": updates,
              "completed": updates >= job["steps"] - starts and stop.stopped_at is None,
              "stopped_at": None if stop.stopped_at is None else starts + stop.stopped_at,
              "bound": crash.bound, "buffer_max_abs_reward": float(dm.buffer.gather(torch.arange(len(dm.buffer)))
                                                                         .rew.abs().max()),
              "eval": {"env_steps": [p["env_steps"] for p in evaluation.curve],
                       "return": [p["return"] for p in evaluation.curve]},
              "q_bound_ratio": ratio,
              "max_abs_q": {"env_steps": ratio["env_steps"], "values": [v * crash.bound for v in ratio["values"]]},
              "seem": on_env_steps("seem/max_eig"), "seem_normalized": on_env_steps("seem/max_eig_normalized"),
              "seconds": seconds, "eval_seconds": eval_seconds, "seem_seconds": seem.hook_seconds,
              "crash_seconds": crash.hook_seconds,
              # the training loop's own time (environment steps and updates), per update
              "seconds_per_step": (seconds - eval_seconds - monitor_seconds) / max(updates, 1)}
    # a critic non-finite on the probe (no ratio published at the stop) or in its weights has no max ratio
    nonfinite = not finite or (stop.stopped_at is not None and stop.ratio is None)
    finite_ratios = [v for v in ratio["values"] if math.isfinite(v)]
    record.update(nonfinite=nonfinite, max_ratio=max(finite_ratios) if finite_ratios else None)
    record["final_return"] = final_return(record)
    seem_values = record["seem"]["values"]
    record["max_seem"] = max(seem_values) if seem_values else None
    return record


# ----------------------------------------------------------------------------- report


def final_return(record: dict) -> float | None:
    """The mean evaluation return at environment steps >= 4/5 of the run's ``steps``, of a
    run that completed them (None: it stopped early, or no evaluation fell there)."""
    return late_mean(record["eval"]["env_steps"], record["eval"]["return"], record["steps"]) if record["completed"] \
        else None


def of(runs: list[dict], algo: str) -> list[dict]:
    return sorted((r for r in runs if r["algo"] == algo), key=lambda r: r["seed"])


def within(record: dict) -> bool:
    """max|Q| within the bound at every measurement (a non-finite critic is not)."""
    return not record["nonfinite"] and record["max_ratio"] is not None and record["max_ratio"] <= 1.0


def completeness(runs: list[dict], planned: dict[str, list[int]], algo: str) -> tuple[dict[str, int], str]:
    """``{"finished_seeds", "planned_seeds"}`` of ``algo`` and the note a claim on it carries."""
    done = {r["seed"] for r in of(runs, algo)}
    plan = set(planned.get(algo, [])) | done
    note = (" [no finished runs]" if not done else
            "" if done >= plan else f" [data incomplete: {len(done)} of {len(plan)} planned seeds finished]")
    return {"finished_seeds": len(done), "planned_seeds": len(plan)}, note


def summary(runs: list[dict]) -> dict[str, dict[str, Any]]:
    """Per algorithm: the seeds, final returns, max ratio, max SEEM, time per step."""
    out = {}
    for algo in ALGOS:
        group = of(runs, algo)
        if not group:
            continue
        returns = [final_return(r) for r in group]
        finals = [v for v in returns if v is not None]
        out[algo] = {"seeds": [r["seed"] for r in group], "final_return": returns,
                     "mean_final_return": statistics.fmean(finals) if finals else None,
                     "max_q_bound_ratio": [r["max_ratio"] for r in group],
                     "within_bound": [within(r) for r in group],
                     "stopped_at": [r["stopped_at"] for r in group],
                     "max_seem": [r["max_seem"] for r in group],
                     "max_seem_normalized": [max(r["seem_normalized"]["values"], default=None) for r in group],
                     "buffer_max_abs_reward": [r["buffer_max_abs_reward"] for r in group],
                     "seconds_per_step": statistics.median(r["seconds_per_step"] for r in group)}
    return out


def claims(runs: list[dict], planned: dict[str, list[int]], steps: int) -> list[dict[str, Any]]:
    table = summary(runs)
    preqn, td3, nt = of(runs, "preqn"), of(runs, "td3"), of(runs, "td3-no-target")
    bound = f"the Bellman bound R_MAX / (1 - gamma) = {R_MAX / (1 - GAMMA):.0f}"
    count, note = completeness(runs, planned, "preqn")
    out = [claim(f"PreQN (sin, no target networks): max|Q| on the probe stays within {bound} at every measurement, "
                 f"on every seed{note}",
                 "Achiam et al. 2019: PreQN is stable despite not using target networks",
                 {**count, "max_q_bound_ratio": {r["seed"]: r["max_ratio"] for r in preqn}},
                 bool(preqn) and all(within(r) for r in preqn))]
    count, note = completeness(runs, planned, "td3-no-target")
    out.append(claim(f"TD3 without target networks (targets = the current networks) leaves {bound} on at least one "
                     f"seed{note}",
                     "Achiam et al. 2019 / Yue et al. 2023: without targets TD3's critic diverges",
                     {**count, "max_q_bound_ratio": {r["seed"]: r["max_ratio"] for r in nt},
                      "stopped_at": {r["seed"]: r["stopped_at"] for r in nt}},
                     any(not within(r) for r in nt)))
    count_p, note_p = completeness(runs, planned, "preqn")
    count_t, note_t = completeness(runs, planned, "td3")
    mine = table.get("preqn", {}).get("mean_final_return")
    theirs = table.get("td3", {}).get("mean_final_return")
    holds = mine is not None and theirs is not None and (mine >= RETURN_RATIO * theirs if theirs > 0
                                                         else mine >= theirs)
    incomplete = " [data incomplete: " + ", ".join(
        f"{a} {c['finished_seeds']} of {c['planned_seeds']}" for a, c in (("PreQN", count_p), ("TD3", count_t))
        if c["finished_seeds"] < max(c["planned_seeds"], 1)) + " planned seeds finished]" if note_p or note_t else ""
    out.append(claim(f"PreQN's mean final return (evaluations over the last fifth of {steps} environment steps) is "
                     f">= {RETURN_RATIO} x TD3's "
                     f"(with Polyak targets): 'comparable'{incomplete}",
                     "Achiam et al. 2019: PreQN's performance is comparable or better than TD3's on most tasks",
                     {"preqn": {**count_p, "mean": mine, "per_seed": {r["seed"]: final_return(r) for r in preqn}},
                      "td3": {**count_t, "mean": theirs, "per_seed": {r["seed"]: final_return(r) for r in td3}},
                      "ratio": None if mine is None or not theirs else mine / theirs},
                     holds))
    return out


def report(args: Any, runs: list[dict], planned: dict[str, list[int]], started: float) -> None:
    import lit_qlearn.algorithms.preqn as preqn_module

    largest = max((r["buffer_max_abs_reward"] for r in runs), default=None)
    result = {"claims": claims(runs, planned, args.steps), "summary": summary(runs),
              "bound": {"r_max": R_MAX, "gamma": GAMMA, "q_bound": R_MAX / (1 - GAMMA),
                        "largest_buffer_abs_reward": largest,
                        "bound_covers_every_reward_seen": largest is None or largest <= R_MAX},
              "cost": cost(runs),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "resume", "report_only", "smoke")},
              "planned": planned, "runs": runs,
              "environment": environment({"preqn": Path(preqn_module.__file__),
                                          "td3": ROOT / "lit_qlearn/algorithms/td3.py",
                                          "online": ROOT / "lit_qlearn/data/online.py"})}
    plot(runs, args.out / f"{args.name}.png")
    write_result(args.name, result, started, args.out)


def cost(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per algorithm, medians over its runs: seconds per environment step of the training
    loop (stepping and updating), and per update of the monitors and evaluations."""
    out = {}
    for algo in ALGOS:
        group = of(runs, algo)
        if group:
            per = {k: statistics.median(r[k] / max(r["updates"], 1) for r in group)
                   for k in ("seem_seconds", "crash_seconds", "eval_seconds", "seconds")}
            out[algo] = {"train_seconds_per_env_step": statistics.median(r["seconds_per_step"] for r in group),
                         **{f"{k}_per_update": v for k, v in per.items()}}
    return out


def band(records: list[dict], key: str, field: str = "values") -> tuple[list[int], list[float], list[float],
                                                                         list[float]]:
    """``(x, mean, min, max)`` over the records of series ``key`` at every x some run has
    (runs stopped early leave the later points to the others)."""
    at: dict[int, list[float]] = {}
    for r in records:
        for x, v in zip(r[key]["env_steps"], r[key][field]):
            if v is not None and math.isfinite(v):
                at.setdefault(x, []).append(v)
    xs = sorted(at)
    return xs, [statistics.fmean(at[x]) for x in xs], [min(at[x]) for x in xs], [max(at[x]) for x in xs]


def plot(runs: list[dict], path: Path) -> None:
    """Evaluation return, max|Q| / bound and SEEM against environment steps: the mean over
    seeds (line) and their range (band), one colour per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = (("eval", "return", "evaluation return"), ("q_bound_ratio", "values", "max|Q| / Bellman bound"),
              ("seem_normalized", "values", "normalised SEEM (largest real eigenvalue / ||A||_F)"))
    for ax, (key, field, label) in zip(axes, panels):
        for algo in ALGOS:
            group = of(runs, algo)
            if not group:
                continue
            xs, mean, low, high = band(group, key, field)
            ax.plot(xs, mean, color=COLORS[algo], lw=1.5, label=f"{LABELS[algo]} ({len(group)} seeds)")
            ax.fill_between(xs, low, high, color=COLORS[algo], alpha=0.2, lw=0)
        ax.set_xlabel("environment steps")
        ax.set_ylabel(label)
    axes[1].set_yscale("log")
    axes[1].axhline(1.0, color="black", ls="--", lw=1)
    axes[2].set_yscale("symlog", linthresh=1e-4)
    axes[2].axhline(0.0, color="black", ls="--", lw=1)
    axes[0].legend(fontsize=8)
    save_figure(fig, path, f"{ENV}: PreQN without targets against TD3 and SAC (mean and range over seeds; "
                           "dashed: the bound, SEEM 0)")


# ----------------------------------------------------------------------------- main


def job_key(job: dict[str, Any]) -> tuple:
    return job["algo"], job["seed"], job["steps"], job["learning_starts"]


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--steps", type=int, default=50_000, help="environment steps of a run, random ones included")
    parser.add_argument("--learning-starts", type=int, default=10_000, help="random environment steps first")
    parser.add_argument("--eval-every", type=int, default=5000, help="environment steps between evaluations")
    parser.add_argument("--episodes", type=int, default=5, help="episodes per evaluation")
    parser.add_argument("--seem-every", type=int, default=1000, help="updates between SEEM measurements")
    parser.add_argument("--seem-probe", type=int, default=512, help="SEEM's probe transitions")
    parser.add_argument("--crash-every", type=int, default=500, help="updates between Bellman-bound measurements")
    parser.add_argument("--crash-probe", type=int, default=2560, help="the CrashPredictor's probe transitions")
    parser.add_argument("--name", default="r10_preqn_online", help="results file <out>/<name>.json / .png")
    parser.add_argument("--resume", action="store_true",
                        help="keep the stored runs of the same sizes, run the missing (algorithm, seed) pairs")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: claims, summary and figure of the runs stored in <out>/<name>.json")
    # smoke: 256 random steps, 30 updates; an evaluation, a SEEM and three bound measurements per run
    args = parse_args(parser, smoke={"seeds": 1, "steps": 286, "learning_starts": 256, "eval_every": 30,
                                     "episodes": 1, "seem_every": 30, "seem_probe": 32, "crash_every": 10,
                                     "crash_probe": 64})
    if args.learning_starts >= args.steps:
        parser.error(f"--learning-starts ({args.learning_starts}) must be below --steps ({args.steps})")
    started = time.perf_counter()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    sizes = {k: getattr(args, k) for k in ("steps", "learning_starts", "eval_every", "episodes", "seem_every",
                                           "seem_probe", "crash_every", "crash_probe")}
    # seed-major: a study cut short has every algorithm's first seeds
    jobs = [{"algo": algo, "seed": seed, **sizes} for seed in seeds for algo in args.algos]
    planned = {algo: list(seeds) for algo in args.algos}
    # another part's runs of the same sizes stay in the file (e.g. --algos preqn --resume keeps TD3's)
    same_sizes = lambda record: all(record.get(k) == sizes[k] for k in ("steps", "learning_starts"))  # noqa: E731
    runs, jobs, stored = resumed = stored_runs(args.out / f"{args.name}.json", jobs, job_key, args.resume,
                                               args.report_only, keep=same_sizes)
    if args.report_only:
        planned = stored.get("planned", planned)
    elif stored:  # resumed: the plan is this part's and the stored file's
        planned = {algo: sorted(set(planned.get(algo, [])) | set(stored.get("planned", {}).get(algo, [])))
                   for algo in ALGOS if algo in planned or algo in stored.get("planned", {})}
    started -= resumed.spent_s
    for job in jobs:
        record = run(job)
        runs.append(record)
        print(f"{record['algo']} seed {record['seed']}: final return {record['final_return']}, max|Q|/bound "
              f"{'non-finite' if record['nonfinite'] else record['max_ratio']}, max SEEM {record['max_seem']}, "
              f"{record['seconds_per_step'] * 1e3:.1f} ms per step ({record['seconds']:.0f} s)"
              + (f", stopped at {record['stopped_at']} (diverged)" if record["stopped_at"] is not None else ""),
              flush=True)
        report(args, runs, planned, started)
    if not jobs:
        report(args, runs, planned, started)


if __name__ == "__main__":
    main()
