"""Plasticity of the demo's two critics: does the diverging critic lose rank?

The setting of ``lit-qlearn demo``: TD3 with target = current network on 5% of the
default data (100k steps of the shipped medium Hopper-v5 policy), a plain ReLU critic against a LayerNorm critic,
here with the CrashPredictor only warning, so that the plain run goes on diverging (the run
of benchmarks/_divergence.py). PlasticityMonitor (dormant fraction, srank of the penultimate
features, weight norm) and SEEMMonitor measure both on the same probe set every ``--every``
updates.

Writes benchmarks/results/demo_plasticity.json (+ .png), or into ``--out``; ``--smoke``: tiny sizes.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from _divergence import td3_run
from harness import ROOT, argument_parser, claim, environment, parse_args, save_figure, write_result

METRICS = ("plasticity/dormant_fraction", "plasticity/feature_rank", "plasticity/weight_norm",
           "seem/max_eig_normalized", "seem/q_data_mean")


def run(norm: str | None, steps: int, every: int, probe: int, seed: int) -> dict[str, list]:
    """The divergence run (_divergence.td3_run, never stopped) on 5% of the default data with a
    PlasticityMonitor beside its monitors: ``{metric: [(step, value), ...]}`` for METRICS."""
    from lit_qlearn.callbacks import PlasticityMonitor

    measured = td3_run("default", 0.99, seed, steps, every, probe, critic={"critic_norm": norm},
                       stop_on_divergence=False, fraction=0.05,
                       monitors=[PlasticityMonitor(every_n_steps=every, probe_size=probe)], series=METRICS)
    return {name: [(t, v) for t, v in zip(measured["steps"], measured[name]) if v is not None] for name in METRICS}


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--probe-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parse_args(parser, smoke={"steps": 40, "every": 20, "probe_size": 64}, data=["default"])
    torch.set_num_threads(1)
    started = time.perf_counter()
    runs = {name: run(norm, args.steps, args.every, args.probe_size, args.seed)
            for name, norm in (("plain", None), ("layernorm", "layer"))}

    def values(name: str, metric: str) -> np.ndarray:
        return np.array([v for _, v in runs[name][metric]])

    rank = {name: values(name, "plasticity/feature_rank") for name in runs}
    dormant = {name: values(name, "plasticity/dormant_fraction") for name in runs}
    final_q = {name: float(values(name, "seem/q_data_mean")[-1]) for name in runs}
    claims = [
        claim("the diverging (plain) critic ends with a lower srank of its penultimate features than the LayerNorm "
              "critic", "Kumar et al. 2021: implicit under-parameterisation (rank collapse) accompanies TD "
              "instability", {"plain_final": int(rank["plain"][-1]), "layernorm_final": int(rank["layernorm"][-1]),
                              "plain_first": int(rank["plain"][0]), "layernorm_first": int(rank["layernorm"][0])},
              rank["plain"][-1] < rank["layernorm"][-1]),
        claim("the plain critic diverges in this setting (Q on the data beyond the LayerNorm critic's by 10x)",
              "the demo (issue 14): plain Q 15,370 vs LayerNorm 81 on 5,000 random Hopper transitions",
              final_q, abs(final_q["plain"]) > 10 * abs(final_q["layernorm"])),
    ]
    result = {
        "claims": claims,
        "settings": vars(args) | {"data": "default (100k random Hopper-v5), fraction 0.05", "algorithm":
                                  "TD3, EMATarget(tau=1, every=1), 256x256"},
        "final_dormant_fraction": {name: float(d[-1]) for name, d in dormant.items()},
        "series": runs,
        "environment": environment({"plasticity": ROOT / "lit_qlearn/plasticity.py",
                                    "monitor": ROOT / "lit_qlearn/callbacks/plasticity.py"}),
    }
    plot(runs, args.out / "demo_plasticity.png")
    write_result("demo_plasticity", result, started, args.out)


def plot(runs: dict[str, dict[str, list]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    panels = (("seem/q_data_mean", "Q on the probe (log)"), ("seem/max_eig_normalized", "normalised SEEM"),
              ("plasticity/feature_rank", "srank of penultimate features"),
              ("plasticity/dormant_fraction", "dormant fraction (tau 0.025)"))
    for ax, (metric, title) in zip(axes, panels):
        for name, color in (("plain", "tab:red"), ("layernorm", "tab:blue")):
            steps, vals = zip(*runs[name][metric]) if runs[name][metric] else ((), ())
            ax.plot(steps, np.abs(vals) if metric == "seem/q_data_mean" else vals, color=color, marker=".",
                    label=f"{name} critic")
        if metric == "seem/q_data_mean":
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("update")
        ax.legend()
    save_figure(fig, path, "TD3 without target averaging on 5% of random Hopper data")


if __name__ == "__main__":
    main()
