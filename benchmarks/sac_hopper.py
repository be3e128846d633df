"""SAC on Hopper-v5 for 300k environment steps: the learning curve, and the behaviour
policies (a "medium" actor at about a third of the final return, D4RL's definition, and
the final "expert" actor) that the generated D4RL-style datasets are rolled from.

Settings: SAC's defaults (256x256, Adam 3e-4, tau 0.005, learned temperature towards
-|A|), one update per environment step, batch 256, 10k random steps first; a greedy
evaluation of 5 episodes every 10k environment steps, the actor's weights kept at each.
The JSON is rewritten after every evaluation, so a run cut short keeps its curve.

    python benchmarks/sac_hopper.py [--steps 300000] [--seed 0]

Writes benchmarks/results/sac_hopper.json (+ .png) and the medium / final actors to
benchmarks/results/sac_hopper_actors.pt.
"""
from __future__ import annotations

import time

import lightning as L
import numpy as np
import torch

from _claims import RESULTS, argument_parser, claim, environment, save_figure, write_result
from _common import ROOT

TARGET = 2500.0


def main() -> None:
    from lit_qlearn.algorithms import SAC
    from lit_qlearn.data import OnlineDataModule
    from lit_qlearn.data.rollout import make_vector_env, run_episodes

    parser = argument_parser(__doc__)
    parser.add_argument("--steps", type=int, default=300_000)
    parser.add_argument("--eval-every", type=int, default=10_000)
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    L.seed_everything(args.seed, verbose=False)
    learning_starts = 10_000
    dm = OnlineDataModule("Hopper-v5", learning_starts=learning_starts, batch_size=256, capacity=1_000_000,
                          seed=args.seed, save_buffer=False)
    module = SAC(eval_every=0)
    env = make_vector_env("Hopper-v5")
    curve: list[dict[str, float]] = []
    actors: dict[int, dict[str, torch.Tensor]] = {}
    command = f"python benchmarks/sac_hopper.py --steps {args.steps} --seed {args.seed}"

    def report() -> None:
        returns = [p["return"] for p in curve]
        final = returns[-1] if returns else float("nan")
        first = next((p["env_steps"] for p in curve if p["return"] >= TARGET), None)
        claims = [claim(f"SAC reaches an evaluation return >= {TARGET:.0f} on Hopper-v5 within "
                        f"{args.steps} environment steps", "issue 12 target (SB3 zoo: ~3000 at 1M)",
                        {"first_env_steps": first, "best": max(returns, default=None), "final": final},
                        first is not None and first <= args.steps)]
        medium = _medium(curve)
        result = {"claims": claims, "settings": vars(args) | {"learning_starts": learning_starts, "command": command},
                  "curve": curve, "medium": medium, "environment": environment(
                      {"sac": ROOT / "lit_qlearn/algorithms/sac.py", "online": ROOT / "lit_qlearn/data/online.py"})}
        torch.save({"command": command, "final": {"env_steps": curve[-1]["env_steps"], "state_dict": actors[
            curve[-1]["env_steps"]]} if curve else None, "medium": None if medium is None else {
            "env_steps": medium["env_steps"], "state_dict": actors[medium["env_steps"]]},
            "spec": module.spec.to_dict()}, RESULTS / "sac_hopper_actors.pt")
        plot(curve, medium)
        write_result("sac_hopper", result, started)

    class Evaluate(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args_):
            steps = dm.rollout.env_steps
            if (steps - learning_starts) % args.eval_every or steps == learning_starts:
                return
            returns, _ = run_episodes(env, pl_module.act, args.episodes, seed=10_000)
            curve.append({"env_steps": steps, "return": float(np.mean(returns)),
                          "seconds": time.perf_counter() - started})
            actors[steps] = {k: v.detach().cpu().clone() for k, v in pl_module.actor.state_dict().items()}
            print(f"{steps} env steps: return {curve[-1]['return']:.0f} ({curve[-1]['seconds']:.0f} s)", flush=True)
            report()

    trainer = L.Trainer(max_steps=args.steps - learning_starts, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Evaluate()])
    trainer.fit(module, dm)
    report()


def _medium(curve: list[dict[str, float]]) -> dict[str, float] | None:
    """The evaluation whose return is nearest a third of the final one (D4RL's medium)."""
    if len(curve) < 2:
        return None
    third = curve[-1]["return"] / 3
    return min(curve[:-1], key=lambda p: abs(p["return"] - third)) | {"target": third}


def plot(curve: list[dict[str, float]], medium: dict[str, float] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p["env_steps"] for p in curve], [p["return"] for p in curve], marker=".", label="SAC (lit_qlearn)")
    ax.axhline(TARGET, color="gray", ls="--", lw=1, label=f"target {TARGET:.0f}")
    if medium is not None:
        ax.scatter([medium["env_steps"]], [medium["return"]], color="tab:orange", zorder=3, label="medium actor")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("mean evaluation return (5 episodes)")
    ax.legend()
    save_figure(fig, RESULTS / "sac_hopper.png", "SAC on Hopper-v5")


if __name__ == "__main__":
    main()
