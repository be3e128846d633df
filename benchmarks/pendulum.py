"""SAC, TD3 and DDPG online on Pendulum-v1 at their defaults: evaluation return against
environment steps, 5 seeds each, 20k environment steps.

Every algorithm at its documented defaults (256x256 networks, Adam 3e-4, tau 0.005,
batch 256, one update per environment step, 1000 random steps first; TD3 / DDPG
exploration noise 0.1 half-ranges). A greedy evaluation of 10 episodes every 2000
environment steps. The JSON is rewritten after every run, so a run cut short keeps what
it measured. Claim (issue 12): the mean evaluation return at 20k steps is >= -200 for
each algorithm (rl-baselines3-zoo reports -157, -152 and -152 at 20k for SAC, TD3 and
DDPG, with tuned settings).

    python benchmarks/pendulum.py [--seeds 5] [--steps 20000]
"""
from __future__ import annotations

import time

import lightning as L
import numpy as np
import torch

from harness import ROOT, EnvStepEvaluation, argument_parser, claim, environment, parse_args, quiet_trainer, \
    save_figure, write_result

TARGET = -200.0
ZOO = {"SAC": -157.0, "TD3": -152.0, "DDPG": -152.0}


def run(name: str, seed: int, steps: int, eval_every: int, episodes: int) -> list[dict[str, float]]:
    """One run of ``name`` at its defaults: the evaluation curve (lit_qlearn.evaluation.EnvStepEvaluation)."""
    import lit_qlearn.algorithms as algorithms
    from lit_qlearn.data import OnlineDataModule

    L.seed_everything(seed, verbose=False)
    learning_starts = 1000
    dm = OnlineDataModule("Pendulum-v1", learning_starts=learning_starts, batch_size=256, seed=seed,
                          save_buffer=False)
    module = getattr(algorithms, name)(eval_every=0)
    evaluation = EnvStepEvaluation(dm, every=eval_every, episodes=episodes)
    quiet_trainer(max_steps=steps - learning_starts, callbacks=[evaluation]).fit(module, dm)
    return evaluation.curve


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--eval-every", type=int, default=2000)
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    # smoke: after the 1000 random steps, 50 updates and two evaluations of one episode
    args = parse_args(parser, smoke={"seeds": 1, "steps": 1050, "eval_every": 25, "episodes": 1})
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runs: dict[str, dict[int, list]] = {name: {} for name in ZOO}
    for seed in range(args.seeds):
        for name in ZOO:
            runs[name][seed] = run(name, seed, args.steps, args.eval_every, args.episodes)
            final = runs[name][seed][-1]
            print(f"{name} seed {seed}: {final['return']:.0f} at {final['env_steps']} ({final['seconds']:.0f} s)",
                  flush=True)
            report(runs, args, started)


def report(runs: dict[str, dict[int, list]], args, started: float) -> None:
    finals = {name: [curve[-1]["return"] for curve in seeds.values()] for name, seeds in runs.items() if seeds}
    claims = [claim(f"{name}: mean evaluation return at {args.steps} environment steps >= {TARGET:.0f} "
                    f"({len(values)} seeds)", f"rl-baselines3-zoo {ZOO[name]:.0f} at 20k (tuned settings)",
                    {"mean": float(np.mean(values)), "per_seed": values}, float(np.mean(values)) >= TARGET)
              for name, values in finals.items()]
    seconds = {name: [curve[-1]["seconds"] for curve in seeds.values()] for name, seeds in runs.items() if seeds}
    result = {"claims": claims, "settings": vars(args), "runs": runs,
              "env_steps_per_s": {name: float(np.median([args.steps / s for s in v])) for name, v in seconds.items()},
              "environment": environment({"sac": ROOT / "lit_qlearn/algorithms/sac.py",
                                          "td3": ROOT / "lit_qlearn/algorithms/td3.py"})}
    plot(runs, args)
    write_result("pendulum", result, started, args.out)


def plot(runs: dict[str, dict[int, list]], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, seeds), color in zip(runs.items(), ("tab:blue", "tab:orange", "tab:green")):
        for k, curve in enumerate(seeds.values()):
            ax.plot([p["env_steps"] for p in curve], [p["return"] for p in curve], color=color, alpha=0.7,
                    marker=".", label=name if k == 0 else None)
    ax.axhline(TARGET, color="gray", ls="--", lw=1, label=f"target {TARGET:.0f}")
    ax.set_xlabel("environment steps")
    ax.set_ylabel(f"mean evaluation return ({args.episodes} episodes)")
    ax.legend()
    save_figure(fig, args.out / "pendulum.png", "Pendulum-v1 at the algorithms' defaults")


if __name__ == "__main__":
    main()
