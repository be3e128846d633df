"""CrossQ on Pendulum-v1 or Hopper-v5 (``--env``): lit_qlearn against sb3-contrib's CrossQ
with the same settings, evaluation return at equal environment steps and environment
steps per second, the runs interleaved.

Settings (both), on sb3-contrib's CrossQ defaults (Adam 1e-3 with beta1 0.5, batch 256, a
1M buffer, gamma 0.99, BatchRenorm with momentum 0.01 and a 100k-pass warm-up, one update
per environment step):

- Pendulum-v1 (results ``crossq_sb3``): rl-baselines3-zoo's hyperparams/crossq.yml entry
  (20k environment steps, actor and critics 256x256, actor every 2 updates), 256 random
  steps first for both (sb3-contrib's default is 100).
- Hopper-v5 (results ``crossq_sb3_hopper``): 100k environment steps, the actor every 3
  updates (sb3-contrib's default and the paper's), 5000 random steps first (the paper's),
  actor and critics 256x256: the paper's 2048x2048 critics (sb3-contrib's 1024x1024) cost
  ~40x (~10x) the compute per update, beyond a CPU-only machine at 100k steps.

A greedy evaluation of ``--episodes`` episodes every ``--eval-every`` environment steps (its
time kept out of the training time). Each seed runs both, the order rotated per seed
(harness.interleaved).

Speed is timed apart from the long runs, whose hour-long stretches meet whatever else the
machine does at the time: ``--speed-rounds`` rounds of short runs (``--speed-steps``
environment steps, 256 random ones first, evaluation excluded) of both libraries, the
order rotated per round; the ratio is the median of the per-round ratios (the long runs'
speeds are reported beside it). One torch thread (``--threads``). The JSON is rewritten
after every run and ``--resume`` keeps what it holds, so a long study runs in parts: in
turn, or at once in several processes (``--first-seed`` / ``--seeds``, each its own
``--out``), whose files ``--merge`` joins (``--report-only`` redraws claims and figure).

Claims: lit_qlearn's mean final return is at most the environment's gap below
sb3-contrib's (Pendulum returns run from about -1500 to -150: 50; Hopper's from 0 to ~3500:
300), and lit_qlearn's environment steps per second are >= 1.1x sb3-contrib's (median
over the timing rounds; issue 22's goal).

    python benchmarks/crossq_sb3.py [--seeds 3] [--steps 20000]
    python benchmarks/crossq_sb3.py --env Hopper-v5 --seeds 1
    python benchmarks/crossq_sb3.py --env Hopper-v5 --resume --first-seed 1 --seeds 1 --out part1
    python benchmarks/crossq_sb3.py --env Hopper-v5 --merge part1/crossq_sb3_hopper.json --report-only
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from harness import ROOT, EnvStepEvaluation, argument_parser, baseline_available, claim, environment, interleaved, \
    late_mean, parse_args, quiet_trainer, save_figure, write_result

#: rl-baselines3-zoo's CrossQ Pendulum-v1 entry over sb3-contrib's defaults
SETTINGS = {"lr": 1e-3, "buffer_size": 1_000_000, "learning_starts": 256, "batch_size": 256, "gamma": 0.99,
            "policy_delay": 2, "critic_hidden": (256, 256), "actor_hidden": (256, 256)}
#: per environment: settings over SETTINGS, the run's default sizes, the return gap the claim allows, results name
ENVS = {
    "Pendulum-v1": {"settings": {}, "steps": 20_000, "eval_every": 2000, "episodes": 10, "gap": 50.0,
                    "name": "crossq_sb3"},
    "Hopper-v5": {"settings": {"learning_starts": 5000, "policy_delay": 3}, "steps": 100_000, "eval_every": 10_000,
                  "episodes": 5, "gap": 300.0, "name": "crossq_sb3_hopper"},
}
SPEED_GOAL = 1.1


def lit_qlearn_crossq(env: str, settings: dict, seed: int, steps: int, eval_every: int, episodes: int) -> dict:
    """lit_qlearn's CrossQ with ``settings``: the evaluation curve (EnvStepEvaluation)."""
    from lit_qlearn.algorithms import CrossQ
    from lit_qlearn.data import OnlineDataModule

    s = settings
    L.seed_everything(seed, verbose=False)
    dm = OnlineDataModule(env, learning_starts=s["learning_starts"], batch_size=s["batch_size"],
                          capacity=s["buffer_size"], seed=seed, save_buffer=False)
    module = CrossQ(gamma=s["gamma"], critic_lr=s["lr"], actor_lr=s["lr"], alpha_lr=s["lr"],
                    policy_delay=s["policy_delay"], critic_hidden=s["critic_hidden"], actor_hidden=s["actor_hidden"],
                    eval_every=0)
    evaluation = EnvStepEvaluation(dm, every=eval_every, episodes=episodes)
    quiet_trainer(max_steps=steps - s["learning_starts"], callbacks=[evaluation]).fit(module, dm)
    return {"curve": [{"env_steps": p["env_steps"], "return": p["return"], "train_seconds": p["train_seconds"]}
                      for p in evaluation.curve]}


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--env", default="Pendulum-v1", choices=sorted(ENVS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1 (a "
                        "study split over processes, each with its own --out; --merge joins them)")
    parser.add_argument("--steps", type=int, help="environment steps of a run (default: the environment's)")
    parser.add_argument("--eval-every", type=int, help="environment steps between evaluations (default: the "
                                                         "environment's)")
    parser.add_argument("--episodes", type=int, help="episodes per evaluation (default: the environment's)")
    parser.add_argument("--hidden", type=int, default=256, help="width of the two hidden layers of every network")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--speed-rounds", type=int, default=3, help="interleaved timing rounds of both libraries")
    parser.add_argument("--speed-steps", type=int, default=2256,
                        help="environment steps of a timing run (256 random ones first)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs and timing rounds of <out>/<name>.json (same settings), run the rest")
    parser.add_argument("--merge", type=Path, nargs="+", default=[], metavar="JSON",
                        help="results files of other parts of this study (same settings): their runs join "
                             "<out>/<name>.json's (implies --resume)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: redraw claims and figure from <out>/<name>.json (and --merge files)")
    parser.add_argument("--batch-size", type=int, default=SETTINGS["batch_size"])
    parser.add_argument("--learning-starts", type=int,
                        help="random environment steps first (default: the environment's)")
    # smoke: 64 updates after 64 random steps, two evaluations of one episode, small networks and batches
    args = parse_args(parser, smoke={"seeds": 1, "steps": 128, "eval_every": 64, "episodes": 1, "hidden": 32,
                                     "batch_size": 32, "learning_starts": 64, "speed_rounds": 2,
                                     "speed_steps": 320})
    task = ENVS[args.env]
    for option in ("steps", "eval_every", "episodes"):
        if getattr(args, option) is None:
            setattr(args, option, task[option])
    if args.learning_starts is None:
        args.learning_starts = {**SETTINGS, **task["settings"]}["learning_starts"]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    settings = {**SETTINGS, **task["settings"], "critic_hidden": (args.hidden,) * 2,
                "actor_hidden": (args.hidden,) * 2, "batch_size": args.batch_size,
                "learning_starts": args.learning_starts}
    runners = {"lit_qlearn": lit_qlearn_crossq}
    if baseline_available("sb3_contrib"):
        from baselines.sb3 import sb3_crossq

        runners["sb3_contrib"] = sb3_crossq
    runs: dict[str, dict[int, dict]] = {name: {} for name in runners}
    timing: list[dict[str, float]] = []
    stored = args.out / f"{ENVS[args.env]['name']}.json"

    def read(path: Path, remedy: str) -> dict:
        """A results file of this study, refused when its settings differ from these."""
        previous = json.loads(path.read_text())
        same = {k: previous["settings"].get(k) for k in ("env", "steps", "eval_every", "episodes", "speed_steps")}
        if same != {k: getattr(args, k) for k in same} or previous["settings"]["algorithm"] != json.loads(
                json.dumps(settings)):
            parser.error(f"{path} holds runs of other settings ({same}); {remedy}")
        return previous

    if args.report_only and not stored.exists():
        parser.error(f"--report-only: {stored} does not exist")
    for path in args.merge:
        if not path.is_file():
            parser.error(f"--merge: {path} is not a results file")
    if (args.resume or args.merge or args.report_only) and stored.exists():
        previous = read(stored, "give another --out")
        runs = {name: {int(seed): run for seed, run in previous["runs"].get(name, {}).items()} for name in runners}
        timing = previous.get("timing", [])
        started -= previous.get("wall_time_s", 0.0)
        print(f"resuming {stored}: {sum(map(len, runs.values()))} runs, {len(timing)} timing rounds kept", flush=True)
    for path in args.merge:  # another part's runs of seeds not stored here; its timing rounds stay its own
        joined = 0
        for name, seeds in read(path, "merge only parts of one study")["runs"].items():
            for seed, run in seeds.items():
                if name in runs and int(seed) not in runs[name]:
                    runs[name][int(seed)], joined = run, joined + 1
        print(f"merged {joined} runs of {path}", flush=True)
    if args.report_only:
        report(runs, timing, settings, args, started)
        return
    # speed: short runs (256 random steps, then updates), alternating, the order rotated per round
    speed_settings = {**settings, "learning_starts": max(args.batch_size, SETTINGS["learning_starts"])}
    for r, name in interleaved(list(runners), args.speed_rounds):
        if r < len(timing) and name in timing[r]:
            continue
        if r == len(timing):
            timing.append({})
        point = runners[name](args.env, speed_settings, seed=1000 + r, steps=args.speed_steps,
                              eval_every=args.speed_steps, episodes=1)["curve"][-1]
        timing[r][name] = point["env_steps"] / point["train_seconds"]
        print(f"timing round {r} {name}: {timing[r][name]:.1f} env steps/s", flush=True)
        report(runs, timing, settings, args, started)
    for r, name in interleaved(list(runners), args.seeds):
        seed = args.first_seed + r
        if seed in runs[name]:
            continue
        runs[name][seed] = runners[name](args.env, settings, seed=seed, steps=args.steps, eval_every=args.eval_every,
                                         episodes=args.episodes)
        last = runs[name][seed]["curve"][-1]
        print(f"seed {seed} {name}: return {last['return']:.0f} at {last['env_steps']} env steps, "
              f"{last['env_steps'] / last['train_seconds']:.1f} env steps/s", flush=True)
        report(runs, timing, settings, args, started)


def report(runs: dict[str, dict[int, dict]], timing: list[dict[str, float]], settings: dict, args,
           started: float) -> None:
    finals = {name: [run["curve"][-1]["return"] for run in seeds.values()] for name, seeds in runs.items()}
    # beside the claim's final evaluation: the mean over the last fifth of the steps (one evaluation of a
    # few episodes swings by ~1,500 on Hopper), per seed, as r10_preqn_online reads its runs
    last_fifth = {name: [v for run in seeds.values() if (v := late_mean(
        [p["env_steps"] for p in run["curve"]], [p["return"] for p in run["curve"]], args.steps)) is not None]
        for name, seeds in runs.items()}
    long_run_speeds = {name: {seed: run["curve"][-1]["env_steps"] / run["curve"][-1]["train_seconds"]
                              for seed, run in seeds.items()} for name, seeds in runs.items()}
    ratios = [t["lit_qlearn"] / t["sb3_contrib"] for t in timing if {"lit_qlearn", "sb3_contrib"} <= set(t)]
    ours, theirs = finals["lit_qlearn"], finals.get("sb3_contrib", [])
    gap = float(np.mean(ours) - np.mean(theirs)) if ours and theirs else None
    allowed = ENVS[args.env]["gap"]
    claims = [
        claim(f"CrossQ on {args.env}: lit_qlearn's mean evaluation return at {args.steps} environment steps is at "
              f"most {allowed:.0f} below sb3-contrib's (same settings, {len(ours)} seeds)",
              "issue 22: return at equal environment steps against sb3-contrib's CrossQ",
              {"lit_qlearn": ours, "sb3_contrib": theirs, "mean_difference": gap,
               "last_fifth_mean": {name: {"per_seed": values, "mean": statistics.fmean(values) if values else None}
                                   for name, values in last_fifth.items()}},
              gap is not None and gap >= -allowed),
        claim(f"lit_qlearn's CrossQ on {args.env} >= {SPEED_GOAL}x sb3-contrib's environment steps per second "
              f"(median over {len(ratios)} interleaved timing rounds of {args.speed_steps} steps)", "issue 22 goal",
              {"ratio_median": statistics.median(ratios) if ratios else None, "ratios": ratios, "timing": timing,
               "long_run_speeds": long_run_speeds},
              bool(ratios) and statistics.median(ratios) >= SPEED_GOAL),
    ]
    result = {"claims": claims, "settings": {**vars(args), "algorithm": settings}, "runs": runs, "timing": timing,
              "environment": environment({"crossq": ROOT / "lit_qlearn/algorithms/crossq.py",
                                          "networks": ROOT / "lit_qlearn/networks.py",
                                          "online": ROOT / "lit_qlearn/data/online.py"})}
    if "sb3_contrib" in runs:
        import sb3_contrib

        result["environment"]["sb3_contrib"] = sb3_contrib.__version__
    plot(runs, args)
    write_result(ENVS[args.env]["name"], result, started, args.out)


def plot(runs: dict[str, dict[int, dict]], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, seeds), color in zip(runs.items(), ("tab:blue", "tab:orange")):
        for k, run in enumerate(seeds.values()):
            curve = run["curve"]
            ax.plot([p["env_steps"] for p in curve], [p["return"] for p in curve], color=color, alpha=0.7,
                    marker=".", label=name if k == 0 else None)
    ax.set_xlabel("environment steps")
    ax.set_ylabel(f"mean evaluation return ({args.episodes} episodes)")
    if any(runs.values()):
        ax.legend()
    save_figure(fig, args.out / f"{ENVS[args.env]['name']}.png",
                f"CrossQ on {args.env}: lit_qlearn and sb3-contrib, same settings")


if __name__ == "__main__":
    main()
