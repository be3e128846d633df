"""R2 (Yue et al. 2023, DESIGN.md 5.3 and 7): a positive normalised SEEM early in a run
predicts that the run diverges, across discount factors.

TD3 without target averaging (target = current network), Adam 3e-4, batch 256, plain
256x256 critic, on generated ``hopper-medium-replay-v5`` (the SAC run's buffer up to its
medium policy) and the default data (100k steps of the medium policy), gamma in {0.9, 0.95,
0.99, 0.995}, 3 seeds. SEEM and the Bellman-bound ratio are measured on a fixed probe set
of 512 transitions every 25 updates; a run diverges when max|Q| on the probe is beyond
max|r| / (1 - gamma) at the end of the run and from its divergence step on (or Q is
non-finite; _divergence.py). The prediction is SEEM as a user watching it sees it in time:
the largest normalised SEEM measured *before* the divergence step (over the whole run when
it does not diverge) above ``--threshold`` (0.05, fixed before the runs: the LayerNorm
critic of the demo stays at 0.00-0.04). The lead time, from SEEM's first crossing of the
threshold to the divergence step, is reported beside it, and so is the issue's literal
reading: SEEM above the threshold within the first ``--window`` updates (default a tenth
of the budget) against divergence by the end.

Shortened from the paper (1M updates, full D4RL data): ``--updates 4000`` per run (about
an hour on 2 cores for all 24 runs with ``--workers 2``). ``--full`` runs 100k updates with
a probe of 2560, ``--accelerator gpu`` puts them on a GPU.

    python benchmarks/r2_seem_gamma.py [--updates 4000] [--workers 2] [--full] [--accelerator cpu]
"""
from __future__ import annotations

import itertools
import math
import time
from concurrent.futures import ProcessPoolExecutor

from _claims import RESULTS, argument_parser, claim, environment, save_figure, write_result
from _common import ROOT
from _divergence import early_max, first_above, peak, seem_before, td3_run

GAMMAS = (0.9, 0.95, 0.99, 0.995)
DATASETS = ("hopper-medium-replay-v5", "default")


def _run(job: tuple) -> dict:
    import torch

    torch.set_num_threads(1)
    return td3_run(*job)


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--updates", type=int, default=4000)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--probe", type=int, default=512)
    parser.add_argument("--threshold", type=float, default=0.05)
    parser.add_argument("--window", type=int, default=None, help="early window in updates (default updates / 10)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--full", action="store_true", help="100k updates, probe 2560")
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()
    if args.full:
        args.updates, args.probe = 100_000, 2560
    args.window = args.window or args.updates // 10
    started = time.perf_counter()
    jobs = [(d, g, s, args.updates, args.every, args.probe, None, True, args.accelerator)
            for d, g, s in itertools.product(args.datasets, GAMMAS, range(args.seeds))]
    runs: list[dict] = []
    with ProcessPoolExecutor(args.workers) as pool:
        for run in pool.map(_run, jobs):
            run["seem_before"] = seem_before(run)
            run["predicted"] = run["seem_before"] > args.threshold
            run["seem_window"] = early_max(run, "seem/max_eig_normalized", args.window)
            first = first_above(run, args.threshold)
            run["lead_updates"] = run["diverged_at"] - first if run["diverged"] and first is not None else None
            runs.append(run)
            print(f"{run['dataset']} gamma {run['gamma']} seed {run['seed']}: SEEM before {run['seem_before']:.3f}, "
                  f"diverged {run['diverged']} at {run['diverged_at']}, peak ratio "
                  f"{peak(run, 'crash/q_bound_ratio'):.3g} ({run['seconds']:.0f} s)", flush=True)
            report(args, runs, started)


def report(args, runs: list[dict], started: float) -> None:
    agree = [r["predicted"] == r["diverged"] for r in runs]
    leads = [r["lead_updates"] for r in runs if r["lead_updates"] is not None]
    window_agree = [(r["seem_window"] > args.threshold) == r["diverged"] for r in runs]
    by_gamma = {str(g): {"runs": sum(r["gamma"] == g for r in runs),
                         "diverged": sum(r["diverged"] for r in runs if r["gamma"] == g),
                         "seem_positive": sum(r["predicted"] for r in runs if r["gamma"] == g)} for g in GAMMAS}
    claims = [
        claim("positive normalised SEEM before the divergence <=> the run diverges (Q past the Bellman bound); "
              "agreement >= 95% of runs", "Yue et al. 2023, Fig. 3 / Table: SEEM positive exactly on the "
              "diverging runs", {"agreement": sum(agree) / len(agree), "runs": len(runs),
                                "disagreeing": [(r["dataset"], r["gamma"], r["seed"]) for r, a in zip(runs, agree)
                                                if not a], "by_gamma": by_gamma},
              sum(agree) / len(agree) >= 0.95),
        claim(f"the same with SEEM read in the first {args.window} updates (a tenth of the budget), whether or not "
              "the run has diverged by then", "issue 13's wording: 'positive normalised SEEM early in the run'",
              {"agreement": sum(window_agree) / len(window_agree),
               "diverged_within_the_window": sum(r["diverged"] and r["diverged_at"] <= args.window for r in runs)},
              sum(window_agree) / len(window_agree) >= 0.95),
    ]
    predicted = [r["lead_updates"] for r in runs if r["diverged"] and r["predicted"]]
    lead = {"runs_predicted_in_time": len(predicted), "lead_updates": sorted(predicted),
            "median": sorted(predicted)[len(predicted) // 2] if predicted else None,
            "all_runs_lead_updates (negative: SEEM crossed after the divergence)": leads,
            "runs_that_did_not_diverge": sum(not r["diverged"] for r in runs)}
    result = {"claims": claims, "lead_time": lead, "settings": vars(args) | {"gammas": GAMMAS},
              "runs": runs, "environment": environment({"td3": ROOT / "lit_qlearn/algorithms/td3.py",
                                                        "monitors": ROOT / "lit_qlearn/callbacks/monitors.py",
                                                        "crash": ROOT / "lit_qlearn/callbacks/crash.py"})}
    plot(args, runs)
    write_result("r2_seem_gamma", result, started)


def plot(args, runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in runs})
    fig, axes = plt.subplots(2, len(datasets), figsize=(6 * len(datasets), 8), squeeze=False)
    colors = dict(zip(GAMMAS, ("tab:blue", "tab:green", "tab:orange", "tab:red")))
    for col, dataset in enumerate(datasets):
        top, bottom = axes[0, col], axes[1, col]
        for r in (r for r in runs if r["dataset"] == dataset):
            c = colors[r["gamma"]]
            label = f"gamma {r['gamma']}" if r["seed"] == 0 else None
            seem = [math.nan if v is None else v for v in r["seem/max_eig_normalized"]]
            ratio = [math.nan if v is None else v for v in r["crash/q_bound_ratio"]]
            top.plot(r["steps"], seem, color=c, alpha=0.8, label=label)
            bottom.semilogy(r["steps"], ratio, color=c, alpha=0.8, label=label)
        top.axhline(args.threshold, color="gray", ls="--", lw=1)
        bottom.axhline(1.0, color="black", ls="--", lw=1, label="Bellman bound")
        top.set_title(dataset)
        top.set_ylabel("normalised SEEM")
        bottom.set_ylabel("max |Q| on the probe / bound")
        bottom.set_xlabel("updates")
        top.legend(fontsize=8)
        bottom.legend(fontsize=8)
    save_figure(fig, RESULTS / "r2_seem_gamma.png", "R2: SEEM vs divergence across gamma (TD3, target = current)")


if __name__ == "__main__":
    main()
