"""R4 (Yue et al. 2023, docs/design.md 7): LayerNorm lifts offline algorithms on small fractions
of the data, with little change on all of it.

TD3+BC, CQL and IQL at their defaults, each with the plain critic and with
``critic_norm="layer"`` (IQL: on its V-network too), on 1%, 10% and 100% of the transitions
of generated ``{hopper,halfcheetah,walker2d}-medium-v5`` (``OfflineDataModule(fraction=)``,
the subset chosen with the run's seed; IQL with its D4RL protocol's rewards, scaled to a
return spread of 1000: ``reward_transform="locomotion"``), 3 seeds; after ``--updates``
updates the greedy policy's normalised score over ``--episodes`` episodes (reference
scores: the shipped policies' random and expert returns). Published (1M updates, D4RL
data): LayerNorm lifts CQL on 1% data from a total of about 50 to 300 normalised points
and TD3+BC from 70 to 228, with little change at 100%.

Claims, per algorithm: LayerNorm's mean score (over seeds and tasks) >= the plain critic's
at 1% and at 10%; at 100% within ``--margin`` (10) points of it. Each run also records
whether its critic diverged: Q of the data's actions on 2,048 probe transitions at the end
(``q_data_mean``) and the largest |Q| there over the Bellman bound max|r| / (1 - gamma) of
its subset (``q_bound_ratio``, > 1: diverged).

Sizing on 2 CPU cores: TD3+BC and IQL update at ~190 / ~135 updates/s, CQL at ~8. The
defaults (``--updates 10000``, ``--cql-updates 2000``, 1 seed: 54 runs) take about an hour
with ``--workers 2`` (and the three 1M-step datasets, 4 minutes each to make the first
time); ``--seeds 3 --algos td3bc iql`` (108 runs) took 92 minutes on 2 cores shared with
other runs. The paper's setting is ``--full`` (1M updates, 3 seeds; for a GPU,
``--accelerator gpu``). A run cut short keeps what it measured (the JSON is rewritten after
every run) and ``--resume`` with the same settings runs only what is missing; ``--name``
writes another results file (e.g. a longer run on one fraction).

    python benchmarks/r4_fraction.py [--tasks hopper] [--algos td3bc iql] [--seeds 1] [--workers 2] [--smoke]
"""
from __future__ import annotations

import itertools
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

from harness import ROOT, argument_parser, claim, environment, parse_args, quiet_trainer, save_figure, write_result

FRACTIONS = (0.01, 0.1, 1.0)
TASKS = ("hopper", "halfcheetah", "walker2d")
ALGOS = ("td3bc", "cql", "iql")
#: each algorithm's D4RL protocol: IQL scales locomotion rewards to a return spread of 1000
REWARD_TRANSFORM = {"td3bc": None, "cql": None, "iql": "locomotion"}


def _key(job: tuple) -> dict:
    """What identifies a run (a job's settings, without how it is evaluated or run)."""
    algo, task, fraction, layernorm, seed, updates = job[:6]
    return {"algo": algo, "task": task, "fraction": fraction, "layernorm": layernorm, "seed": seed,
            "updates": updates, "reward_transform": REWARD_TRANSFORM[algo]}


def _run(job: tuple) -> dict:
    import lightning as L
    import torch

    from lit_qlearn.algorithms import CQL, IQL, TD3BC
    from lit_qlearn.data import OfflineDataModule

    torch.set_num_threads(1)
    algo, task, fraction, layernorm, seed, updates, episodes, accelerator = job
    L.seed_everything(seed, verbose=False)
    dm = OfflineDataModule(f"{task}-medium-v5", fraction=fraction, seed=seed, steps_per_epoch=updates,
                           reward_transform=REWARD_TRANSFORM[algo])
    module = {"td3bc": TD3BC, "cql": CQL, "iql": IQL}[algo](critic_norm="layer" if layernorm else None, eval_every=0)
    start = time.perf_counter()
    quiet_trainer(max_steps=updates, max_epochs=1, accelerator=accelerator, devices=1).fit(module, dm)
    seconds = time.perf_counter() - start
    module.cpu()
    result = module.evaluate(episodes)
    # did the critic diverge? Q of the data's actions on 2,048 probe rows against the
    # Bellman bound max|r| / (1 - gamma) over the run's subset
    probe = dm.probe_batch(2048)
    with torch.no_grad():
        q = module.q_value(probe.obs, probe.act)
    bound = float(dm.data.rew.abs().max()) / (1 - float(module.gamma))
    return {**_key(job), "episodes": episodes, "transitions": dm.num_transitions, "seconds": seconds, **result,
            "q_data_mean": float(q.mean()), "q_bound_ratio": float(q.abs().max()) / bound}


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    parser.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--cql-seeds", type=int, default=None, help="seeds for CQL (default: --seeds)")
    parser.add_argument("--updates", type=int, default=10_000)
    parser.add_argument("--cql-updates", type=int, default=2_000)
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--margin", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="1M updates for every algorithm, 3 seeds")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--name", default="r4_fraction", help="results file <out>/<name>.json / .png")
    parser.add_argument("--resume", action="store_true",
                        help="continue the results file made with the same settings: run only the missing runs")
    # smoke: a fraction below 1 and all the data, so that both kinds of claim are computed; 2 updates (TD3+BC's
    # actor steps at the second), 1 of CQL (about 0.3 s each on a CPU)
    args = parse_args(parser, smoke={"tasks": ["hopper"], "fractions": [0.5, 1.0], "updates": 2, "cql_updates": 1,
                                     "episodes": 1, "workers": 1},
                      data=lambda a: [f"{task}-medium-v5" for task in a.tasks])
    if args.full:
        args.updates = args.cql_updates = 1_000_000
        args.seeds = args.cql_seeds = 3
    if args.cql_seeds is None:
        args.cql_seeds = args.seeds
    started = time.perf_counter()
    from lit_qlearn.datasets import ensure_dataset

    for task in args.tasks:  # made once, before the workers read them
        ensure_dataset(f"{task}-medium-v5")
    jobs = [(a, t, f, ln, s, args.cql_updates if a == "cql" else args.updates, args.episodes, args.accelerator)
            for a in args.algos
            for t, f, s, ln in itertools.product(args.tasks, args.fractions,
                                                 range(args.cql_seeds if a == "cql" else args.seeds), (False, True))]
    runs: list[dict] = []
    if args.resume and (args.out / f"{args.name}.json").exists():
        runs, jobs, before = resume(args, jobs)
        started -= before  # the file's wall time adds up over its processes
    with ProcessPoolExecutor(args.workers) as pool:
        for run in pool.map(_run, jobs):
            runs.append(run)
            print(f"{run['algo']} {run['task']} {run['fraction']:.0%} {'LN' if run['layernorm'] else 'plain'} seed "
                  f"{run['seed']}: score {run['normalized_score']:.1f}, max|Q|/bound "
                  f"{run['q_bound_ratio']:.2f} ({run['seconds']:.0f} s)", flush=True)
            report(args, runs, started)
    if runs and not jobs:  # nothing left to run (--resume of a finished file): claims and figure again
        report(args, runs, started)


def resume(args, jobs: list[tuple]) -> tuple[list[dict], list[tuple], float]:
    """The stored runs of ``--name``, the jobs still to run and the file's wall time so far
    (seconds). Only a file made with the same settings is resumed (a mixed file would
    average runs of different sizes), and every stored run is a job of those settings, so
    nothing stored is dropped."""
    stored = json.loads((args.out / f"{args.name}.json").read_text())
    ignore = {"workers", "resume", "name", "out"}
    differ = sorted(k for k, v in vars(args).items()
                    if k not in ignore and k in stored["settings"] and stored["settings"][k] != v)
    if differ:
        raise SystemExit(f"r4_fraction --resume: {args.out / (args.name + '.json')} was made with other settings ("
                         + ", ".join(f"{k} {stored['settings'][k]!r}, not {vars(args)[k]!r}" for k in differ)
                         + "); pass the same ones, or --name for a new file")
    keys = [_key(job) for job in jobs]
    runs = [r for r in stored["runs"] if {k: r.get(k) for k in _key(jobs[0])} in keys] if jobs else []
    done = [{k: r[k] for k in keys[0]} for r in runs]
    print(f"resuming: {len(runs)} runs kept, {len(jobs) - len(runs)} to run", flush=True)
    return runs, [job for job, key in zip(jobs, keys) if key not in done], float(stored.get("wall_time_s", 0.0))


def mean_score(runs: list[dict], algo: str, fraction: float, layernorm: bool) -> float | None:
    scores = [r["normalized_score"] for r in runs
              if r["algo"] == algo and r["fraction"] == fraction and r["layernorm"] == layernorm]
    return statistics.fmean(scores) if scores else None


def report(args, runs: list[dict], started: float) -> None:
    claims = []
    table = {}
    for algo in args.algos:
        table[algo] = {f"{f:g}": {"plain": mean_score(runs, algo, f, False), "layernorm": mean_score(runs, algo, f, True)}
                       for f in args.fractions}
        for f in args.fractions:
            plain, ln = table[algo][f"{f:g}"]["plain"], table[algo][f"{f:g}"]["layernorm"]
            if plain is None or ln is None:
                continue
            if f < 1.0:
                claims.append(claim(f"{algo}: LayerNorm >= plain critic on {f:.0%} of the data (mean normalised score "
                                    "over seeds and tasks)", "Yue et al. 2023: LayerNorm lifts CQL 50 -> 300 and "
                                    "TD3+BC 70 -> 228 (totals) on 1% data", {"plain": plain, "layernorm": ln},
                                    ln >= plain))
            else:
                claims.append(claim(f"{algo}: LayerNorm within {args.margin:g} points of the plain critic on all the "
                                    "data", "Yue et al. 2023: little change at 100%", {"plain": plain, "layernorm": ln},
                                    abs(ln - plain) <= args.margin))
    if not claims:
        claims.append(claim("at least one plain / LayerNorm pair measured", "-", len(runs), False))
    result = {"claims": claims, "scores": table, "settings": vars(args), "runs": runs,
              "environment": environment({"td3": ROOT / "lit_qlearn/algorithms/td3.py",
                                          "cql": ROOT / "lit_qlearn/algorithms/cql.py",
                                          "iql": ROOT / "lit_qlearn/algorithms/iql.py"})}
    plot(args, table, runs)
    write_result(args.name, result, started, args.out)


def plot(args, table: dict, runs: list[dict]) -> None:
    """Mean scores as bars, every run as a dot (one marker per task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = dict(zip(TASKS, "o^s"))
    fig, axes = plt.subplots(1, len(table), figsize=(5 * len(table), 4.5), squeeze=False)
    for ax, (algo, rows) in zip(axes[0], table.items()):
        xs = list(range(len(rows)))
        for kind, color, dx in (("plain", "tab:gray", -0.2), ("layernorm", "tab:blue", 0.2)):
            ys = [rows[f][kind] if rows[f][kind] is not None else float("nan") for f in rows]
            ax.bar([x + dx for x in xs], ys, width=0.4, color=color, alpha=0.6, label=kind)
            for x, f in zip(xs, rows):
                for r in runs:
                    if r["algo"] == algo and f"{r['fraction']:g}" == f and r["layernorm"] == (kind == "layernorm"):
                        ax.plot(x + dx + 0.1 * (r["seed"] - 1) / max(1, args.seeds), r["normalized_score"],
                                markers[r["task"]], ms=4, color="black", alpha=0.7)
        for task, marker in markers.items():
            if task in args.tasks:
                ax.plot([], [], marker, color="black", ls="", label=task)
        ax.set_xticks(xs, [f"{float(f):.0%}" for f in rows])
        ax.set_title(algo)
        ax.set_ylabel("normalised score")
        ax.set_ylim(0, 1.35 * ax.get_ylim()[1])  # room for the legend above the runs
        ax.legend(fontsize="small", ncol=2, loc="upper left", title="bars: means, dots: runs", title_fontsize="small")
    save_figure(fig, args.out / f"{args.name}.png", f"R4: LayerNorm on fractions of medium data ({args.updates:,} "
                f"updates{f', CQL {args.cql_updates:,}' if 'cql' in args.algos else ''})")


if __name__ == "__main__":
    main()
