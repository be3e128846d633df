"""PQN on CartPole-v1: lit_qlearn's PQN against CleanRL's pqn.py, same settings, interleaved.

Both run CleanRL's CartPole-v1 settings (its ``Args`` defaults): 4 environments x 128
steps per rollout, 4 epochs of 4 minibatches, 500k environment steps, RAdam 2.5e-4
annealed to 0, gamma 0.99, Q(lambda) with lambda 0.65, epsilon 1 -> 0.05 over the first
half, gradient norm clipped at 10, an MLP 120-84 with LayerNorm, orthogonal
initialisation. CleanRL's script is reproduced in benchmarks/baselines/cleanrl_pqn.py;
lit_qlearn runs ``PQN`` on an ``OnPolicyDataModule`` in a Lightning Trainer. The two differ
on purpose in the targets at an episode's end (docs/design.md section 5.7: lit_qlearn
bootstraps a truncation from its final state and stops the lambda trace there; CleanRL cuts a
truncation and carries the trace into the next episode).

Per seed the two run back to back, the order alternating (harness.interleaved). Measured:
the training episodic return at the end (the episodes finished in the last
``--final-fraction`` of the environment steps, as CleanRL's charts/episodic_return) against
CleanRL's reported 495.13 +- 6.89 (3 seeds; docs.cleanrl.dev/rl-algorithms/pqn, "Episode
Rewards"), a greedy evaluation of the final network (10 episodes), and environment steps
per second of the whole loop (acting, targets, updates; environments made and the Trainer
set up outside the clock), whose ratio per seed is the speed claim (goal >= 1.1). One torch
thread for both (``--threads``): on two cores tiny networks are fastest on one.

Writes benchmarks/results/pqn_cartpole.json (+ .png; or into ``--out``).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from harness import ROOT, TrainClock, argument_parser, claim, environment, interleaved, parse_args, quiet_trainer, \
    save_figure, write_result

ENV = "CartPole-v1"
PUBLISHED = {"mean": 495.13, "std": 6.89, "seeds": 3, "source": "docs.cleanrl.dev/rl-algorithms/pqn (pqn.py)"}


class RolloutCurve(L.Callback):
    """After each rollout's last update: the DataModule's episode counts since the last one."""

    def __init__(self, dm: Any) -> None:
        self.dm, self.curve = dm, []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step % self.dm.updates_per_rollout == 0:
            counts = self.dm.rollout_metrics()
            self.curve.append({"env_steps": counts["env_steps"], "episodes": counts["episodes"],
                               "return_sum": counts["return_sum"]})


def run_lit_qlearn(seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    from lit_qlearn.algorithms import PQN
    from lit_qlearn.data import OnPolicyDataModule

    s = settings
    L.seed_everything(seed, verbose=False)
    dm = OnPolicyDataModule(ENV, num_envs=s["num_envs"], num_steps=s["num_steps"],
                            num_minibatches=s["num_minibatches"], update_epochs=s["update_epochs"], seed=seed)
    module = PQN(gamma=s["gamma"], q_lambda=s["q_lambda"], critic_lr=s["learning_rate"], anneal_lr=s["anneal_lr"],
                 max_grad_norm=s["max_grad_norm"], total_env_steps=s["total_timesteps"], epsilon_start=s["start_e"],
                 epsilon_end=s["end_e"], exploration_fraction=s["exploration_fraction"])
    rollouts = s["total_timesteps"] // (s["num_envs"] * s["num_steps"])  # CleanRL's num_iterations
    curve = RolloutCurve(dm)
    clock = TrainClock(count=lambda: dm.rollout.env_steps)
    quiet_trainer(max_steps=rollouts * dm.updates_per_rollout, accelerator="cpu", callbacks=[curve, clock]).fit(
        module, dm)
    return {"curve": curve.curve, "env_steps": dm.rollout.env_steps, "seconds": clock.seconds,
            "evaluation": module.evaluate(10)["return"]}


def run_cleanrl(seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    from baselines.cleanrl_pqn import cleanrl_pqn
    from lit_qlearn.data.rollout import make_vector_env, run_episodes

    result = cleanrl_pqn(ENV, seed, **settings)
    network = result.pop("network")

    @torch.no_grad()
    def greedy(obs: np.ndarray) -> np.ndarray:
        return network(torch.as_tensor(obs, dtype=torch.float32)).argmax(dim=1).numpy()

    returns, _ = run_episodes(make_vector_env(ENV), greedy, 10, seed=10_000)  # lit_qlearn's evaluation seed
    return {**result, "evaluation": float(np.mean(returns))}


def final_return(curve: list[dict[str, float]], total: int, fraction: float) -> float | None:
    """Mean return of the episodes finished in the last ``fraction`` of the ``total`` env steps."""
    late = [c for c in curve if c["env_steps"] > (1 - fraction) * total]
    episodes = sum(c["episodes"] for c in late)
    return sum(c["return_sum"] for c in late) / episodes if episodes else None


def main() -> None:
    from baselines.cleanrl_pqn import CLEANRL_PQN

    parser = argument_parser(__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--total-timesteps", type=int, default=CLEANRL_PQN["total_timesteps"])
    parser.add_argument("--final-fraction", type=float, default=0.1,
                        help="the last fraction of the environment steps whose training episodes give the final return")
    parser.add_argument("--threads", type=int, default=1)
    # smoke: 4 rollouts of 512 environment steps each, one seed
    args = parse_args(parser, smoke={"seeds": 1, "total_timesteps": 2048, "final_fraction": 0.5})
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    settings = {**CLEANRL_PQN, "total_timesteps": args.total_timesteps}
    runners = {"lit_qlearn": run_lit_qlearn, "cleanrl": run_cleanrl}
    runs: dict[str, dict[int, Any]] = {name: {} for name in runners}
    for seed, name in interleaved(list(runners), args.seeds):
        result = runners[name](seed + 1, settings)  # CleanRL's seeds are 1, 2, 3
        result["env_steps_per_s"] = result["env_steps"] / result["seconds"]
        result["final_return"] = final_return(result["curve"], args.total_timesteps, args.final_fraction)
        runs[name][seed + 1] = result
        print(f"seed {seed + 1} {name:>10}: final return {result['final_return']}, evaluation "
              f"{result['evaluation']:.1f}, {result['env_steps_per_s']:.0f} env steps/s", flush=True)

    ours, theirs = runs["lit_qlearn"], runs["cleanrl"]

    def across(name: str, key: str) -> dict[str, float | None]:
        values = [r[key] for r in runs[name].values() if r[key] is not None]
        return {"mean": statistics.fmean(values) if values else None,
                "std": statistics.pstdev(values) if len(values) > 1 else 0.0 if values else None}

    final = {name: across(name, "final_return") for name in runs}
    ratio = {seed: ours[seed]["env_steps_per_s"] / theirs[seed]["env_steps_per_s"] for seed in ours}
    median_ratio = statistics.median(ratio.values())
    low = PUBLISHED["mean"] - 2 * PUBLISHED["std"]
    ours_final = final["lit_qlearn"]["mean"]
    claims = [
        claim(f"lit_qlearn PQN's final training return on {ENV} (mean over {args.seeds} seeds) is within two "
              f"published standard deviations of CleanRL's ({low:.1f} or more)",
              f"{PUBLISHED['mean']} +- {PUBLISHED['std']} ({PUBLISHED['source']}, {PUBLISHED['seeds']} seeds)",
              final, ours_final is not None and ours_final >= low),
        claim("environment steps per second, the whole loop: lit_qlearn >= 1.1 x CleanRL's pqn.py (median of the "
              "per-seed ratios, interleaved runs)", "target of issue 22",
              {"per_seed": ratio, "median": median_ratio}, median_ratio >= 1.1),
    ]
    result = {
        "claims": claims,
        "settings": {**settings, "env": ENV, "seeds": args.seeds, "final_fraction": args.final_fraction,
                     "torch_threads": args.threads},
        "published": PUBLISHED,
        "final_return": final,
        "evaluation_return": {name: across(name, "evaluation") for name in runs},
        "env_steps_per_s": {name: {seed: r["env_steps_per_s"] for seed, r in runs[name].items()} for name in runs},
        "runs": {name: {seed: {k: v for k, v in r.items()} for seed, r in runs[name].items()} for name in runs},
        "environment": environment({"pqn": ROOT / "lit_qlearn/algorithms/pqn.py",
                                    "onpolicy": ROOT / "lit_qlearn/data/onpolicy.py",
                                    "td": ROOT / "lit_qlearn/td.py",
                                    "baseline": ROOT / "benchmarks/baselines/cleanrl_pqn.py"}),
    }
    plot(runs, args.out / "pqn_cartpole.png")
    write_result("pqn_cartpole", result, started, args.out)


def plot(runs: dict[str, dict[int, Any]], path: Path) -> None:
    """Training episodic return (mean of the episodes finished in each rollout) against environment steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, by_seed), color in zip(runs.items(), ("C0", "C1")):
        for i, (seed, run) in enumerate(by_seed.items()):
            points = [(c["env_steps"], c["return_sum"] / c["episodes"]) for c in run["curve"] if c["episodes"]]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, color=color, alpha=0.6, lw=1, label=name if i == 0 else None)
    ax.axhline(PUBLISHED["mean"], color="k", ls="--", lw=1, label="CleanRL reported (final)")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("training episodic return")
    ax.legend()
    save_figure(fig, path, title=f"PQN on {ENV}")


if __name__ == "__main__":
    main()
