"""R2 (Yue et al. 2023, docs/design.md 5.3 and 7): a positive normalised SEEM early in a run
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

    python benchmarks/r2_seem_gamma.py [--updates 4000] [--workers 2] [--full] [--accelerator cpu] [--smoke]
"""
from __future__ import annotations

import itertools
import time

from harness import ROOT, argument_parser, claim, environment, write_result
from _divergence import add_run_arguments, early_max, first_above, parse_run_arguments, peak, plot_runs, \
    seem_before, sweep

GAMMAS = (0.9, 0.95, 0.99, 0.995)


def main() -> None:
    parser = argument_parser(__doc__)
    add_run_arguments(parser, every=25)
    parser.add_argument("--window", type=int, default=None, help="early window in updates (default updates / 10)")
    args = parse_run_arguments(parser)
    args.window = args.window or args.updates // 10
    started = time.perf_counter()
    jobs = [({}, {"dataset": d, "gamma": g, "seed": s})
            for d, g, s in itertools.product(args.datasets, GAMMAS, range(args.seeds))]
    runs: list[dict] = []
    for run in sweep(args, jobs):
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
    plot_runs(runs, "gamma", dict(zip(GAMMAS, ("tab:blue", "tab:green", "tab:orange", "tab:red"))),
              args.out / "r2_seem_gamma.png", "R2: SEEM vs divergence across gamma (TD3, target = current)",
              threshold=args.threshold)
    write_result("r2_seem_gamma", result, started, args.out)


if __name__ == "__main__":
    main()
