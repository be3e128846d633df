"""SEEM across target-free Q-learning: DQN without a target network (plain and LayerNorm),
PQN with and without LayerNorm, CrossQ with and without BatchRenorm, and SAC without
targets; SEEM, its participation and max|Q| over the Bellman bound against updates.

Each configuration is online, CPU-sized, with SEEMMonitor and CrashPredictor (``action="warn"``)
measuring on a fixed probe set of the run's own data:

* ``dqn-no-target`` / ``dqn-no-target-layernorm``: DQN on CartPole-v1 whose target network
  is the online one (``target_tau=1, target_every=1``), 120x84 ReLU network (PQN's),
  with or without LayerNorm; double Q-learning off (with no target network it is the
  online network twice);
* ``pqn`` / ``pqn-no-layernorm``: PQN at CleanRL's CartPole settings (LayerNorm, 500k
  environment steps: 15,616 updates), and the same without LayerNorm;
* ``crossq`` / ``crossq-no-batchrenorm``: CrossQ on Pendulum-v1 at rl-baselines3-zoo's
  settings (256x256, actor every 2 updates), with and without BatchRenorm (critic and actor);
* ``sac-no-target``: SAC on Pendulum-v1 whose targets are copied every update
  (``EMATarget.no_ema()``).

SEEM of a BatchRenorm critic is that of its eval-mode function (running statistics), the
function its actor evaluates (docs/design.md section 10). The bound is ``max|r| / (1 -
gamma)``: 100 on CartPole (reward 1), 1627 on Pendulum (``|r| <= 16.27``).

Claims (``holds`` computed over the finished runs):
* the stable configurations of the papers (``pqn``, ``crossq``, ``dqn-no-target-layernorm``)
  keep max|Q| within the bound at every measurement of every seed ("within": at most
  ``BOUND_MARGIN`` = 1.05 times it; on CartPole a time-limit step bootstraps, so the optimal
  Q is ``1 / (1 - gamma)``, the bound itself, and a converged critic sits at it);
* they keep SEEM at or below ~0: the median normalised SEEM over each run's measurements
  is <= ``SEEM_ZERO``;
* every run that leaves the bound shows a positive SEEM (> ``SEEM_ZERO``) at or before the
  first measurement beyond the bound (the paper's "SEEM first"); needs a run that leaves it.

Runs are saved one by one in the results file (``--resume`` goes on, ``--report-only``
redraws), so the study can be run in parts.

    python benchmarks/seem_target_free.py [--configs ...] [--seeds 2] [--resume] [--report-only] [--smoke]
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any

import lightning as L

from harness import SeriesLogger, argument_parser, claim, environment, parse_args, quiet_trainer, save_figure, \
    stored_runs, timed_hook, write_result

NAME = "seem_target_free"
#: "SEEM at or below ~0": normalised SEEM (by ||A||_F) at most this
SEEM_ZERO = 0.02
#: "within the bound": max|Q| at most this times the bound. On CartPole a time-limit step bootstraps, so
#: the optimal policy's Q is sum_t gamma^t = 1 / (1 - gamma): the bound itself, and a converged critic
#: sits at it, a little above or below; leaving it means more than estimation error.
BOUND_MARGIN = 1.05
STABLE = ("pqn", "crossq", "dqn-no-target-layernorm")
CONFIGS = ("dqn-no-target", "dqn-no-target-layernorm", "pqn", "pqn-no-layernorm", "crossq", "crossq-no-batchrenorm",
           "sac-no-target")
#: the environment of each family and its largest |reward|
ENVS = {"cartpole": ("CartPole-v1", 1.0), "pendulum": ("Pendulum-v1", 16.2736044)}
GAMMA = 0.99
COLORS = {"dqn-no-target": "tab:gray", "dqn-no-target-layernorm": "black", "pqn": "tab:blue",
          "pqn-no-layernorm": "tab:cyan", "crossq": "tab:red", "crossq-no-batchrenorm": "tab:orange",
          "sac-no-target": "tab:green"}


def family(config: str) -> str:
    return "cartpole" if config.startswith(("dqn", "pqn")) else "pendulum"


def build(config: str, job: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
    """The module, DataModule and extra callbacks of ``config``."""
    from lit_qlearn.algorithms import DQN, PQN, SAC, CrossQ
    from lit_qlearn.callbacks import EMATarget
    from lit_qlearn.data import OnlineDataModule, OnPolicyDataModule

    env, seed = ENVS[family(config)][0], job["seed"]
    if config.startswith("pqn"):
        dm = OnPolicyDataModule(env, seed=seed)
        return PQN(total_env_steps=job["env_steps"], eval_every=0,
                   critic_norm=None if config == "pqn-no-layernorm" else "layer"), dm, []
    dm = OnlineDataModule(env, learning_starts=job["learning_starts"], batch_size=256, capacity=job["env_steps"],
                          seed=seed, save_buffer=False)
    if config.startswith("dqn"):
        return DQN(critic_hidden=(120, 84), critic_norm="layer" if config.endswith("layernorm") else None,
                   double=False, target_tau=1.0, target_every=1, critic_lr=2.5e-4,
                   epsilon_steps=job["env_steps"] // 2), dm, []
    if config.startswith("crossq"):
        norm = None if config == "crossq-no-batchrenorm" else "batchrenorm"
        return CrossQ(critic_hidden=(256, 256), actor_hidden=(256, 256), policy_delay=2, critic_norm=norm,
                      actor_norm=norm, eval_every=0), dm, []
    return SAC(critic_hidden=(256, 256), actor_hidden=(256, 256), eval_every=0), dm, [EMATarget.no_ema()]


def updates_of(job: dict[str, Any]) -> int:
    """Updates of a run: one per environment step past learning_starts, or PQN's 16 per rollout
    of 4 x 128 steps."""
    if job["config"].startswith("pqn"):
        return job["env_steps"] // 512 * 16
    return job["env_steps"] - job["learning_starts"]


def run(job: dict[str, Any]) -> dict[str, Any]:
    """One run: the series the monitors logged, and the time they took."""
    import torch

    from lit_qlearn.callbacks import CrashPredictor, SEEMMonitor

    torch.set_num_threads(1)
    config = job["config"]
    L.seed_everything(job["seed"], verbose=False)
    module, dm, extra = build(config, job)
    every, probe = job["every"], job["probe"]
    bound = ENVS[family(config)][1] / (1 - GAMMA)
    seem = timed_hook(SEEMMonitor(every_n_steps=every, probe_size=probe))
    crash = timed_hook(CrashPredictor(every_n_steps=every, probe_size=probe, action="warn", q_bound=bound))
    logged = SeriesLogger()
    start = time.perf_counter()
    quiet_trainer(max_steps=updates_of(job), logger=logged, callbacks=[seem, crash, *extra], accelerator="cpu",
                  devices=1).fit(module, dm)
    seconds = time.perf_counter() - start
    series = {key: logged.series(key) for key in ("seem/max_eig_normalized", "seem/participation",
                                                   "crash/q_bound_ratio", "seem/q_data_mean")}
    return {**job, "bound": bound, "seconds": seconds, "monitor_seconds": seem.hook_seconds + crash.hook_seconds,
            "series": {k: {"steps": s, "values": v} for k, (s, v) in series.items()}}


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """What the claims read of one run."""
    seem_s, ratio_s = record["series"]["seem/max_eig_normalized"], record["series"]["crash/q_bound_ratio"]
    seem = [v for v in seem_s["values"] if math.isfinite(v)]
    ratios = ratio_s["values"]
    beyond = next((s for s, r in zip(ratio_s["steps"], ratios) if not math.isfinite(r) or r > BOUND_MARGIN), None)
    positive = next((s for s, v in zip(seem_s["steps"], seem_s["values"]) if v > SEEM_ZERO), None)
    return {"config": record["config"], "seed": record["seed"],
            "max_ratio": max(ratios) if ratios else math.nan,
            "left_bound_at": beyond, "first_positive_seem_at": positive,
            "seem_median": statistics.median(seem) if seem else math.nan,
            "seem_max": max(seem) if seem else math.nan,
            "participation_median": statistics.median(record["series"]["seem/participation"]["values"] or [math.nan])}


def claims_of(runs: list[dict[str, Any]], planned: int) -> list[dict[str, Any]]:
    rows = [summary(r) for r in runs]
    stable = [r for r in rows if r["config"] in STABLE]
    note = f"{len(runs)} of {planned} planned runs finished"
    within = all(r["left_bound_at"] is None for r in stable)
    calm = all(r["seem_median"] <= SEEM_ZERO for r in stable)
    diverged = [r for r in rows if r["left_bound_at"] is not None]
    first = [r for r in diverged if r["first_positive_seem_at"] is not None
             and r["first_positive_seem_at"] <= r["left_bound_at"]]
    return [
        claim(f"the stable configurations ({', '.join(STABLE)}) keep max|Q| within the Bellman bound (x "
              f"{BOUND_MARGIN}: on CartPole the optimal Q is the bound) at every measurement of every seed ({note})",
              "PQN, CrossQ papers; Gallici et al.'s LayerNorm argument",
              {f"{r['config']}/{r['seed']}": r["max_ratio"] for r in stable}, bool(stable) and within),
        claim(f"they keep SEEM at or below ~0: each run's median normalised SEEM <= {SEEM_ZERO} ({note})",
              "SEEM's reading (Yue et al. 2023): SEEM <= 0, no self-excitation",
              {f"{r['config']}/{r['seed']}": r["seem_median"] for r in stable}, bool(stable) and calm),
        claim(f"every run that leaves the bound (x {BOUND_MARGIN}) shows SEEM > {SEEM_ZERO} at or before its "
              f"first measurement beyond it ({len(diverged)} runs left it; {note})",
              "Yue et al. 2023: SEEM rises before the crash",
              {f"{r['config']}/{r['seed']}": [r["first_positive_seem_at"], r["left_bound_at"]] for r in diverged},
              bool(diverged) and len(first) == len(diverged)),
    ]


def figure(runs: list[dict[str, Any]], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(12, 10), sharex="col")
    for col, fam in enumerate(("cartpole", "pendulum")):
        for record in (r for r in runs if family(r["config"]) == fam):
            color, label = COLORS[record["config"]], f"{record['config']} (seed {record['seed']})"
            for row, key in enumerate(("seem/max_eig_normalized", "crash/q_bound_ratio", "seem/participation")):
                s = record["series"][key]
                axes[row, col].plot(s["steps"], s["values"], color=color, alpha=0.8,
                                    label=label if row == 0 else None)
        axes[0, col].set_title(ENVS[fam][0])
        axes[0, col].axhline(0, color="k", lw=0.5)
        axes[1, col].axhline(1, color="k", lw=0.8, ls="--")
        axes[1, col].set_yscale("log")
        axes[0, col].legend(fontsize=7)
        axes[2, col].set_xlabel("updates")
    axes[0, 0].set_ylabel("SEEM / ||A||_F")
    axes[1, 0].set_ylabel("max|Q| / Bellman bound")
    axes[2, 0].set_ylabel("SEEM participation")
    save_figure(fig, path, "SEEM across target-free Q-learning")


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--cartpole-steps", type=int, default=20_000,
                        help="environment steps of a CartPole DQN run")
    parser.add_argument("--pqn-steps", type=int, default=500_000,
                        help="environment steps of a PQN run (CleanRL's CartPole budget)")
    parser.add_argument("--pendulum-steps", type=int, default=10_000, help="environment steps of a Pendulum run")
    parser.add_argument("--every", type=int, default=250, help="updates between measurements")
    parser.add_argument("--probe", type=int, default=512, help="probe transitions")
    parser.add_argument("--resume", action="store_true", help="keep the stored runs and run the others")
    parser.add_argument("--report-only", action="store_true", help="claims and figure from the stored runs")
    args = parse_args(parser, smoke={"seeds": 1, "cartpole_steps": 512, "pqn_steps": 1024, "pendulum_steps": 320,
                                     "every": 16, "probe": 32})
    started = time.perf_counter()
    jobs = [{"config": c, "seed": s, "every": args.every, "probe": args.probe,
             "env_steps": args.pqn_steps if c.startswith("pqn") else
             args.cartpole_steps if family(c) == "cartpole" else args.pendulum_steps,
             "learning_starts": 1000 if not args.smoke else 256}
            for s in range(args.first_seed, args.first_seed + args.seeds) for c in args.configs]
    path = args.out / f"{NAME}.json"

    def key(job: dict[str, Any]) -> tuple:
        return job["config"], job["seed"], job["env_steps"], job["every"], job["probe"]

    stored = stored_runs(path, jobs, key, args.resume, args.report_only)
    started -= stored.spent_s
    runs = list(stored.runs)

    def save() -> None:
        result = {"claims": claims_of(runs, len(jobs) if not args.report_only else len(runs)),
                  "benchmark": "SEEM across target-free Q-learning", "smoke": args.smoke,
                  "settings": {"seem_zero": SEEM_ZERO, "bound_margin": BOUND_MARGIN, "stable": STABLE, "gamma": GAMMA,
                               "every": args.every, "probe": args.probe, "cartpole_steps": args.cartpole_steps,
                               "pqn_steps": args.pqn_steps, "pendulum_steps": args.pendulum_steps},
                  "summary": [summary(r) for r in runs], "runs": runs,
                  **environment({})}
        figure(runs, args.out / f"{NAME}.png")
        write_result(NAME, result, started, args.out)

    for job in stored.jobs:
        runs.append(run(job))
        s = summary(runs[-1])
        print(f"{job['config']} seed {job['seed']}: max ratio {s['max_ratio']:.3g}, SEEM median {s['seem_median']:.3g} "
              f"max {s['seem_max']:.3g}, left the bound at {s['left_bound_at']}, {runs[-1]['seconds']:.0f} s",
              flush=True)
        save()
    if not stored.jobs:
        save()


if __name__ == "__main__":
    main()
