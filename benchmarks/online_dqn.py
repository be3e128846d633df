"""Online DQN on CartPole-v1: lit_qlearn against Stable-Baselines3's DQN, same settings, interleaved.

Both run the rl-baselines3-zoo CartPole hyperparameters: Adam 2.3e-3, batch 64, a
100k buffer, 1000 random steps first, 256 environment steps then 128 updates, the
target copied every 10 environment steps (in SB3's units; once per collection phase,
i.e. every 128 updates, in ours), epsilon from 1 to 0.04 over the first 16% of 50k
steps, a 256x256 ReLU Q-network, Huber loss, gradient norm clipped at 10, plain
(not double) DQN. Every 2560 environment steps both are evaluated greedily over 10
episodes (evaluation time is not training time); a run stops when the mean return
reaches 475 or at 50k environment steps. Per seed the two libraries run back to
back, the order alternating, so that the machine's drift hits both alike; the
ratios are per seed. One torch thread for both (``--threads``): on two cores a
256x256 MLP is faster on one.

Writes benchmarks/results/online_dqn.json (+ .png; or into ``--out``): evaluation return against
environment steps and wall time for every run, environment steps per second, the
steps and seconds to reach 475, and the claims of the issue.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from harness import ROOT, EnvStepEvaluation, argument_parser, baseline_available, claim, environment, interleaved, \
    parse_args, quiet_trainer, save_figure, write_result

ENV = "CartPole-v1"
SOLVED = 475.0
ZOO = dict(lr=2.3e-3, batch_size=64, buffer_size=100_000, learning_starts=1000, gamma=0.99, train_freq=256,
           gradient_steps=128, target_update_interval=10, exploration_fraction=0.16, exploration_final_eps=0.04,
           net_arch=[256, 256])


def run_lit_qlearn(seed: int, max_env_steps: int, eval_every: int, eval_episodes: int) -> dict[str, Any]:
    """lit_qlearn's DQN at the zoo settings, evaluated at the end of a training phase (as SB3's
    callback does) every ``eval_every`` environment steps, each evaluation from its own reset
    seed; stops once solved or at ``max_env_steps``."""
    import lightning as L

    from lit_qlearn.algorithms import DQN
    from lit_qlearn.data import OnlineDataModule

    L.seed_everything(seed, verbose=False)
    z = ZOO
    dm = OnlineDataModule(ENV, capacity=z["buffer_size"], learning_starts=z["learning_starts"],
                          batch_size=z["batch_size"], train_freq=z["train_freq"], gradient_steps=z["gradient_steps"],
                          seed=seed)
    module = DQN(gamma=z["gamma"], critic_hidden=tuple(z["net_arch"]), critic_lr=z["lr"], double=False, loss="huber",
                 max_grad_norm=10.0, target_tau=1.0, target_every=z["gradient_steps"],
                 epsilon_start=1.0, epsilon_end=z["exploration_final_eps"],
                 epsilon_steps=int(z["exploration_fraction"] * max_env_steps))

    def stop_when_done(trainer: L.Trainer, pl_module: L.LightningModule, result: dict[str, float]) -> None:
        if result["return"] >= SOLVED or dm.rollout.env_steps >= max_env_steps:
            trainer.should_stop = True

    evaluation = EnvStepEvaluation(dm, every=eval_every, episodes=eval_episodes, vary_seed=True,
                                   on_result=stop_when_done)
    quiet_trainer(max_steps=10 ** 9, accelerator="cpu", callbacks=[evaluation]).fit(module, dm)
    return {"curve": evaluation.curve, "updates": module.updates, "env_steps": dm.rollout.env_steps}


def run_sb3(seed: int, max_env_steps: int, eval_every: int, eval_episodes: int) -> dict[str, Any]:
    """Stable-Baselines3's DQN at the same settings (baselines/sb3.py)."""
    from baselines.sb3 import sb3_dqn

    return sb3_dqn(ENV, ZOO, seed, max_env_steps, eval_every, eval_episodes, SOLVED)


def solved_at(curve: list[dict[str, float]]) -> dict[str, float] | None:
    return next((point for point in curve if point["return"] >= SOLVED), None)


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--max-env-steps", type=int, default=50_000)
    parser.add_argument("--eval-every", type=int, default=2560, help="environment steps between evaluations")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    # smoke: the 1000 random steps, then two training phases of 256 steps and 128 updates each
    args = parse_args(parser, smoke={"seeds": 1, "max_env_steps": 1300, "eval_every": 256, "eval_episodes": 2})
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runners = {"lit_qlearn": run_lit_qlearn} | ({"sb3": run_sb3} if baseline_available("stable_baselines3") else {})
    runs: dict[str, dict[int, Any]] = {name: {} for name in runners}
    for seed, name in interleaved(list(runners), args.seeds):
        result = runners[name](seed, args.max_env_steps, args.eval_every, args.eval_episodes)
        last = result["curve"][-1] if result["curve"] else {}
        result["solved"] = solved_at(result["curve"])
        result["env_steps_per_s"] = last.get("env_steps", 0) / last["train_seconds"] if last else None
        runs[name][seed] = result
        print(f"seed {seed} {name:>10}: solved {result['solved']}, {result['env_steps_per_s']:.0f} env steps/s")

    def median(name: str, key: str) -> float | None:
        values = [r["solved"][key] for r in runs.get(name, {}).values() if r["solved"]]
        return statistics.median(values) if values else None

    ours, theirs = runs["lit_qlearn"], runs.get("sb3", {})
    every_seed = all(r["solved"] and r["solved"]["env_steps"] <= args.max_env_steps for r in ours.values())
    t_ours, t_sb3 = median("lit_qlearn", "train_seconds"), median("sb3", "train_seconds")
    ratio = t_ours / t_sb3 if t_ours and t_sb3 else None
    speed = {name: statistics.median([r["env_steps_per_s"] for r in runs[name].values()]) for name in runs}
    per_seed = {seed: (ours[seed]["env_steps_per_s"] / theirs[seed]["env_steps_per_s"]) for seed in ours
                if seed in theirs}
    claims = [
        claim(f"every lit_qlearn seed reaches an evaluation return >= {SOLVED:.0f} within "
              f"{args.max_env_steps} environment steps", "target of issue 11",
              {seed: r["solved"] for seed, r in ours.items()}, every_seed),
        claim("median training wall time to reach 475: lit_qlearn <= 0.5 x Stable-Baselines3 (same run)",
              "target of issue 11; SB3 measured at 16-42 s", {"lit_qlearn_s": t_ours, "sb3_s": t_sb3, "ratio": ratio},
              ratio is not None and ratio <= 0.5),
    ]
    result = {
        "claims": claims,
        "settings": {**ZOO, "env": ENV, "seeds": args.seeds, "max_env_steps": args.max_env_steps,
                     "eval_every_env_steps": args.eval_every, "eval_episodes": args.eval_episodes,
                     "torch_threads": args.threads},
        "median_env_steps_to_solve": {name: median(name, "env_steps") for name in runs},
        "median_train_seconds_to_solve": {name: median(name, "train_seconds") for name in runs},
        "median_env_steps_per_s": speed,
        "env_steps_per_s_ratio_per_seed": per_seed,
        "runs": runs,
        "environment": environment({"dqn": ROOT / "lit_qlearn/algorithms/dqn.py",
                                    "online": ROOT / "lit_qlearn/data/online.py",
                                    "replay": ROOT / "lit_qlearn/data/replay.py"}),
    }
    if theirs:
        import stable_baselines3

        result["environment"]["stable_baselines3"] = stable_baselines3.__version__
    plot(runs, args, args.out / "online_dqn.png")
    write_result("online_dqn", result, started, args.out)


def plot(runs: dict[str, dict[int, Any]], args: Any, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"lit_qlearn": "tab:blue", "sb3": "tab:orange"}
    for name, seeds in runs.items():
        for k, (seed, r) in enumerate(seeds.items()):
            steps = [p["env_steps"] for p in r["curve"]]
            secs = [p["train_seconds"] for p in r["curve"]]
            rets = [p["return"] for p in r["curve"]]
            label = {"lit_qlearn": "lit_qlearn DQN", "sb3": "Stable-Baselines3 DQN"}[name] if k == 0 else None
            axes[0].plot(steps, rets, color=colors[name], alpha=0.7, marker=".", label=label)
            axes[1].plot(secs, rets, color=colors[name], alpha=0.7, marker=".", label=label)
    for ax, xlabel in zip(axes, ("environment steps", "training wall time (s), evaluation excluded")):
        ax.axhline(SOLVED, color="gray", ls="--", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"mean evaluation return ({args.eval_episodes} episodes)")
        ax.legend()
    save_figure(fig, path,
                f"CartPole-v1, zoo settings, {args.seeds} seeds each, interleaved ({args.threads} torch thread)")


if __name__ == "__main__":
    main()
