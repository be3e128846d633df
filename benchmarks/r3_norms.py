"""R3 (Yue et al. 2023, DESIGN.md 5.6 and 7): which critic regularisers keep SEEM low and Q
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

Shortened: ``--updates 4000`` per run (the paper: 1M); ``--full`` 100k updates with a
2560 probe; ``--accelerator gpu``.

    python benchmarks/r3_norms.py [--updates 4000] [--workers 2]
"""
from __future__ import annotations

import itertools
import math
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from _claims import RESULTS, argument_parser, claim, environment, save_figure, write_result
from _common import ROOT
from _divergence import peak, td3_run

CRITICS = {
    "plain": {},
    "layernorm": {"critic_norm": "layer"},
    "batchnorm": {"critic_norm": "batch"},
    "weightnorm": {"critic_weight_norm": True},
    "dropout": {"critic_dropout": 0.1},
    "weight_decay": {"critic_weight_decay": 1e-3},
}
DATASETS = ("hopper-medium-replay-v5", "default")


def _run(job: tuple) -> dict:
    import torch

    torch.set_num_threads(1)
    name, *rest = job
    return td3_run(*rest) | {"name": name}


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
    parser.add_argument("--updates", type=int, default=4000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--probe", type=int, default=512)
    parser.add_argument("--gamma", type=float, default=0.99)
    parser.add_argument("--threshold", type=float, default=0.05)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--full", action="store_true", help="100k updates, probe 2560")
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()
    if args.full:
        args.updates, args.probe = 100_000, 2560
    started = time.perf_counter()
    jobs = [(name, d, args.gamma, s, args.updates, args.every, args.probe, CRITICS[name], True, args.accelerator)
            for d, name, s in itertools.product(args.datasets, CRITICS, range(args.seeds))]
    runs: list[dict] = []
    with ProcessPoolExecutor(args.workers) as pool:
        for run in pool.map(_run, jobs):
            seem = [v for v in run["seem/max_eig_normalized"] if v is not None and math.isfinite(v)]
            run["seem_max"] = max(seem) if seem else float("nan")
            run["ratio_max"] = peak(run, "crash/q_bound_ratio")
            run["turns"] = turns(run["crash/q_bound_ratio"])
            runs.append(run)
            print(f"{run['dataset']} {run['name']} seed {run['seed']}: SEEM max {run['seem_max']:.3f}, ratio max "
                  f"{run['ratio_max']:.3g}, diverged {run['diverged']} at {run['diverged_at']}, turns {run['turns']} "
                  f"({run['seconds']:.0f} s)", flush=True)
            report(args, runs, started)


def report(args, runs: list[dict], started: float) -> None:
    def of(name: str) -> list[dict]:
        return [r for r in runs if r["name"] == name]

    def summary(name: str) -> dict:
        rs = of(name)
        return {"runs": len(rs), "diverged": sum(r["diverged"] for r in rs),
                "seem_max": max((r["seem_max"] for r in rs), default=None),
                "ratio_max": max((r["ratio_max"] for r in rs), default=None),
                "turns": [r["turns"] for r in rs]}

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
    result = {"claims": claims, "settings": vars(args) | {"critics": CRITICS}, "summary": table, "runs": runs,
              "environment": environment({"networks": ROOT / "lit_qlearn/networks.py",
                                          "monitors": ROOT / "lit_qlearn/callbacks/monitors.py"})}
    plot(runs)
    write_result("r3_norms", result, started)


def plot(runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in runs})
    fig, axes = plt.subplots(2, len(datasets), figsize=(6 * len(datasets), 8), squeeze=False)
    colors = dict(zip(CRITICS, ("black", "tab:blue", "tab:purple", "tab:green", "tab:orange", "tab:red")))
    for col, dataset in enumerate(datasets):
        top, bottom = axes[0, col], axes[1, col]
        for r in (r for r in runs if r["dataset"] == dataset):
            label = r["name"] if r["seed"] == 0 else None
            seem = [math.nan if v is None else v for v in r["seem/max_eig_normalized"]]
            ratio = [math.nan if v is None else v for v in r["crash/q_bound_ratio"]]
            top.plot(r["steps"], seem, color=colors[r["name"]], alpha=0.8, label=label)
            bottom.semilogy(r["steps"], ratio, color=colors[r["name"]], alpha=0.8, label=label)
        bottom.axhline(1.0, color="gray", ls="--", lw=1)
        top.set_title(dataset)
        top.set_ylabel("normalised SEEM")
        bottom.set_ylabel("max |Q| on the probe / Bellman bound")
        bottom.set_xlabel("updates")
        top.legend(fontsize=8)
    save_figure(fig, RESULTS / "r3_norms.png", "R3: critic regularisers, TD3 with target = current, gamma 0.99")


if __name__ == "__main__":
    main()
