"""SAC on Hopper-v5, environment steps per second: lit_qlearn against Stable-Baselines3's
SAC with the same settings, interleaved in one run.

Both: one update per environment step, batch 256, 256x256 actor and twin critics, Adam
3e-4, tau 0.005, learned temperature, a 1M buffer; ``--warmup`` random steps first
(not timed), then ``--steps`` timed steps of training. lit_qlearn runs twice, eager and
with ``compile=True`` (compilation happens in the untimed first updates). Each repeat
runs all three, the order rotated; ratios are per repeat. One torch thread for all
(``--threads``).

    python benchmarks/online_speed.py [--steps 2000] [--repeats 3] [--no-compile]
"""
from __future__ import annotations

import statistics
import time

import torch

from harness import ROOT, TrainClock, argument_parser, baseline_available, claim, environment, interleaved, \
    parse_args, quiet_trainer, write_result


def lit_qlearn_sac(steps: int, warmup: int, seed: int, compile: bool = False) -> float:
    """lit_qlearn's SAC at its defaults: environment steps per second from its 50th update (after
    allocation, warm caches, compilation) to the end of ``steps + 10`` updates."""
    import lightning as L

    from lit_qlearn.algorithms import SAC
    from lit_qlearn.data import OnlineDataModule

    L.seed_everything(seed, verbose=False)
    dm = OnlineDataModule("Hopper-v5", learning_starts=warmup, batch_size=256, capacity=1_000_000, seed=seed)
    module = SAC(eval_every=0, compile=compile)
    clock = TrainClock(warmup=50, count=lambda: dm.rollout.env_steps)
    quiet_trainer(max_steps=steps + 10, callbacks=[clock]).fit(module, dm)
    return clock.rate


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the compile=True runs (compiling takes about a minute on a CPU)")
    # smoke: no compile=True runs (tests/algorithms/test_compile.py covers compile); steps > 40, as
    # lit_qlearn's clock starts at its 50th update of steps + 10
    args = parse_args(parser, smoke={"steps": 60, "warmup": 256, "repeats": 1, "no_compile": True})
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runners = {"lit_qlearn": lit_qlearn_sac}
    if baseline_available("stable_baselines3"):
        from baselines.sb3 import sb3_sac

        runners["sb3"] = sb3_sac
    if not args.no_compile:
        runners["lit_qlearn_compile"] = lambda *a, **k: lit_qlearn_sac(*a, **k, compile=True)
    speeds: dict[str, list[float]] = {name: [] for name in runners}
    for repeat, name in interleaved(list(runners), args.repeats):
        speeds[name].append(runners[name](args.steps, args.warmup, seed=repeat))
        print(f"repeat {repeat} {name}: {speeds[name][-1]:.1f} env steps/s", flush=True)
    ratios = [a / b for a, b in zip(speeds["lit_qlearn"], speeds.get("sb3", []))]
    median = statistics.median(ratios) if ratios else None
    compiled = [a / b for a, b in zip(speeds.get("lit_qlearn_compile", []), speeds.get("sb3", []))]

    result = {
        "claims": [claim("SAC on Hopper-v5: lit_qlearn >= 1.5x Stable-Baselines3's environment steps per second "
                         "(same settings, interleaved)", "issue 12 target; SB3 measured at 47 steps/s there",
                         {"ratio_median": median, "ratios": ratios, "speeds": speeds},
                         median is not None and median >= 1.5),
                   claim("the same with compile=True (>= 1.5x)", "issue 12: report compile=True beside it",
                         {"ratio_median": statistics.median(compiled), "ratios": compiled} if compiled
                         else "not run (--no-compile, or no stable_baselines3)",
                         bool(compiled) and statistics.median(compiled) >= 1.5)],
        "settings": vars(args),
        "environment": environment({"sac": ROOT / "lit_qlearn/algorithms/sac.py",
                                    "online": ROOT / "lit_qlearn/data/online.py"}),
    }
    if "sb3" in speeds:
        import stable_baselines3

        result["environment"]["stable_baselines3"] = stable_baselines3.__version__
    write_result("online_speed", result, started, args.out)


if __name__ == "__main__":
    main()
