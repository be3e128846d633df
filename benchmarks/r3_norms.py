"""R3 (Yue et al. 2023, docs/design.md 5.6 and 7): which critic regularisers keep SEEM low and Q
within the Bellman bound.

The r2 setting at gamma = 0.99 (TD3 without target averaging, Adam 3e-4, batch 256) with
the 256x256 critic plain, with LayerNorm, BatchNorm, output WeightNorm, dropout 0.1, and
Adam weight decay 1e-3, on generated ``hopper-medium-replay-v5`` and the default data, 3
seeds. SEEM and max|Q| / bound on a fixed probe set of 512 transitions every 50 updates;
divergence as in r2 (_divergence.py); a run stops once 10x beyond the bound.

Claims (the paper's): LayerNorm and WeightNorm keep SEEM low (every measurement at most
``--threshold``, 0.05 as in r2) and Q below the bound;
dropout and weight decay do not (the runs diverge); BatchNorm oscillates: its max|Q| /
bound series changes direction at least ``--turns`` (4) times, where the plain critic's
rises monotonically to divergence.

Also measured, with a claim of lit_qlearn's own (not the paper's): where a positive SEEM
(> ``--threshold``) sits — the participation of the top eigenvector (how many of the 512
probe transitions carry it; SEEMMonitor's ``seem/participation``) at those measurements,
per critic, pooled over both datasets. Claim: LayerNorm's median is at most 3 (a few
transitions), every diverging critic's at least 10 (spread). The thresholds were set
after a first look at the data (medians 1.2 against 21-93), an order of magnitude apart:
"a few" against "many".

Shortened: ``--updates 4000`` per run (the paper: 1M); ``--full`` 100k updates with a
2560 probe; ``--accelerator gpu``.

    python benchmarks/r3_norms.py [--updates 4000] [--workers 2] [--smoke]
"""
from __future__ import annotations

import itertools
import json
import math
import time

import numpy as np

from harness import ROOT, argument_parser, claim, environment, write_result
from _divergence import add_run_arguments, early_max, parse_run_arguments, peak, plot_runs, sweep

CRITICS = {
    "plain": {},
    "layernorm": {"critic_norm": "layer"},
    "batchnorm": {"critic_norm": "batch"},
    "weightnorm": {"critic_weight_norm": True},
    "dropout": {"critic_dropout": 0.1},
    "weight_decay": {"critic_weight_decay": 1e-3},
}


def turns(values: list) -> int:
    """How often a series changes direction (ignoring steps smaller than 1% of its range)."""
    x = np.array([v for v in values if v is not None and math.isfinite(v)])
    if len(x) < 3:
        return 0
    d = np.diff(x)
    d = d[np.abs(d) > 0.01 * (x.max() - x.min() + 1e-12)]
    return int(np.sum(np.sign(d[1:]) != np.sign(d[:-1])))


def main() -> None:
    parser = argument_parser(__doc__)
    add_run_arguments(parser, every=50)
    parser.add_argument("--gamma", type=float, default=0.99)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--report", action="store_true",
                        help="recompute the claims and the figure from the runs in the results file (no runs; not "
                             "while a sweep is writing it)")
    args = parse_run_arguments(parser)
    started = time.perf_counter()
    if args.report:
        stored = json.loads((args.out / "r3_norms.json").read_text())
        vars(args).update({k: v for k, v in stored["settings"].items()
                           if k not in ("critics", "report", "out", "smoke")})
        report(args, stored["runs"], started, stored)
        return
    jobs = [({"name": name}, {"dataset": d, "gamma": args.gamma, "seed": s, "critic": CRITICS[name]})
            for d, name, s in itertools.product(args.datasets, CRITICS, range(args.seeds))]
    runs: list[dict] = []
    for run in sweep(args, jobs):
        run["seem_max"] = early_max(run, "seem/max_eig_normalized", math.inf)
        run["ratio_max"] = peak(run, "crash/q_bound_ratio")
        run["turns"] = turns(run["crash/q_bound_ratio"])
        runs.append(run)
        print(f"{run['dataset']} {run['name']} seed {run['seed']}: SEEM max {run['seem_max']:.3f}, ratio max "
              f"{run['ratio_max']:.3g}, diverged {run['diverged']} at {run['diverged_at']}, turns {run['turns']} "
              f"({run['seconds']:.0f} s)", flush=True)
        report(args, runs, started)


def report(args, runs: list[dict], started: float, stored: dict | None = None) -> None:
    """Claims, summary and figure from ``runs``; ``stored`` (``--report``): the results file
    the runs come from, whose environment and wall time are kept."""
    def of(name: str) -> list[dict]:
        return [r for r in runs if r["name"] == name]

    def summary(name: str) -> dict:
        rs = of(name)
        carried = [p for r in rs for v, p in zip(r["seem/max_eig_normalized"],
                                                 r.get("seem/participation", [None] * len(r["steps"])))
                   if v is not None and math.isfinite(v) and v > args.threshold and p is not None]
        return {"runs": len(rs), "diverged": sum(r["diverged"] for r in rs),
                "seem_max": max((r["seem_max"] for r in rs), default=None),
                "ratio_max": max((r["ratio_max"] for r in rs), default=None),
                "turns": [r["turns"] for r in rs],
                "positive_seem": {"measurements": len(carried),
                                  "participation_median": float(np.median(carried)) if carried else None,
                                  "participation_max": max(carried, default=None)}}

    table = {name: summary(name) for name in CRITICS}

    def stable(name: str) -> bool:
        rs = of(name)
        return bool(rs) and all(not r["diverged"] and r["ratio_max"] <= 1 and r["seem_max"] <= args.threshold
                                for r in rs)

    claims = [
        claim(f"LayerNorm keeps SEEM low (<= {args.threshold}) and max|Q| within the Bellman bound on every run",
              "Yue et al. 2023: LayerNorm prevents divergence", table["layernorm"], stable("layernorm")),
        claim(f"output WeightNorm keeps SEEM low (<= {args.threshold}) and max|Q| within the bound on every run",
              "Yue et al. 2023: WeightNorm also keeps SEEM low", table["weightnorm"], stable("weightnorm")),
        claim("dropout 0.1 does not prevent divergence (most runs diverge)", "Yue et al. 2023",
              table["dropout"], bool(of("dropout")) and table["dropout"]["diverged"] > len(of("dropout")) / 2),
        claim("weight decay 1e-3 does not prevent divergence (most runs diverge)", "Yue et al. 2023",
              table["weight_decay"], bool(of("weight_decay"))
              and table["weight_decay"]["diverged"] > len(of("weight_decay")) / 2),
        claim(f"BatchNorm oscillates: max|Q| / bound changes direction >= {args.turns} times on most runs",
              "Yue et al. 2023: BatchNorm's Q oscillates", table["batchnorm"],
              bool(of("batchnorm")) and sum(r["turns"] >= args.turns for r in of("batchnorm"))
              > len(of("batchnorm")) / 2),
    ]
    diverging = [name for name in CRITICS if table[name]["runs"] and table[name]["diverged"] > table[name]["runs"] / 2]
    spread = {name: table[name]["positive_seem"]["participation_median"] for name in diverging}
    ln = table["layernorm"]["positive_seem"]["participation_median"]
    claims.append(claim(
        f"where LayerNorm's SEEM is positive (> {args.threshold}, both datasets), a few of the {args.probe} probe "
        "transitions carry it (median participation <= 3); the diverging critics' is spread (median >= 10)",
        "not in the paper: lit_qlearn's reading of the LayerNorm claim above", {"layernorm": ln, **spread},
        ln is not None and ln <= 3 and bool(spread)
        and all(v is not None and v >= 10 for v in spread.values())))
    result = {"claims": claims, "settings": vars(args) | {"critics": CRITICS}, "summary": table, "runs": runs,
              "environment": stored["environment"] if stored else environment(
                  {"networks": ROOT / "lit_qlearn/networks.py", "monitors": ROOT / "lit_qlearn/callbacks/monitors.py"})}
    plot_runs(runs, "name", dict(zip(CRITICS, ("black", "tab:blue", "tab:purple", "tab:green", "tab:orange",
                                               "tab:red"))),
              args.out / "r3_norms.png", "R3: critic regularisers, TD3 with target = current, gamma 0.99")
    write_result("r3_norms", result, started if stored is None else time.perf_counter() - stored["wall_time_s"],
                 args.out)


if __name__ == "__main__":
    main()
