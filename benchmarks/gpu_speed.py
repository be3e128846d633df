"""Updates per second of SAC, TD3, DQN and PQN, eager, compiled (compile=True) and compiled with
CUDA graphs (compile="reduce-overhead", on a GPU only), beside LeanRL's published speed-ups.

LeanRL (the compiled CleanRL) reports, on an H100, SAC 5.7x and TD3 3.4x CleanRL's speed with
torch.compile and CUDA graphs. Those are whole training loops (environment steps included)
against CleanRL's eager ones; here each algorithm is lit_qlearn's own module in a Lightning
Trainer at its defaults, so the ratio is that of the same code eager and compiled:

* SAC and TD3: updates on ``OfflineDataModule("default")`` (batch 256, 256x256 networks), the
  updates alone (no environment);
* DQN: online on CartPole-v1 (one update per environment step after ``learning_starts``),
  the environment steps included, as LeanRL's loops include them;
* PQN: on-policy on CartPole-v1 at CleanRL's settings (4 x 128 environment steps and their
  Q(lambda) returns per 16 updates), the rollouts included.

Each repeat runs every (algorithm, mode) once, the order rotated; the clock starts after
``--warmup`` updates (compilation, CUDA-graph capture, first-call costs). Ratios are medians
over repeats. On a CPU the CUDA-graph mode is skipped; the claims on LeanRL's ratios are made
only where a CUDA device ran them. ``--smoke`` runs the eager mode only, for seconds.

    python benchmarks/gpu_speed.py [--updates 3000] [--repeats 3] [--device cuda] [--algos SAC TD3 DQN PQN] [--smoke]
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

import lit_qlearn.algorithms.base
from harness import TrainClock, argument_parser, claim, environment, interleaved, parse_args, quiet_trainer, \
    write_result

WARMUP = 100  # updates before the clock starts: compilation and graph capture happen there
#: LeanRL's published speed-ups over CleanRL (torch.compile + CUDA graphs, H100)
LEANRL = {"SAC": 5.7, "TD3": 3.4}
MODES = {"eager": False, "compile": True, "cudagraphs": "reduce-overhead"}


def offline(name: str) -> Callable[[Any, int], tuple[Any, Any]]:
    def make(mode: Any, seed: int) -> tuple[Any, Any]:
        from lit_qlearn import algorithms
        from lit_qlearn.data import OfflineDataModule

        return getattr(algorithms, name)(eval_every=0, compile=mode), OfflineDataModule("default", seed=seed)
    return make


def dqn(mode: Any, seed: int) -> tuple[Any, Any]:
    from lit_qlearn.algorithms import DQN
    from lit_qlearn.data import OnlineDataModule

    return DQN(compile=mode), OnlineDataModule("CartPole-v1", learning_starts=1000, batch_size=256, seed=seed)


def pqn(mode: Any, seed: int) -> tuple[Any, Any]:
    from lit_qlearn.algorithms import PQN
    from lit_qlearn.data import OnPolicyDataModule

    return PQN(compile=mode, eval_every=0), OnPolicyDataModule("CartPole-v1", seed=seed)


ALGOS: dict[str, Callable[[Any, int], tuple[Any, Any]]] = {"SAC": offline("SAC"), "TD3": offline("TD3"), "DQN": dqn,
                                                            "PQN": pqn}


def rate(algo: str, mode: str, updates: int, warmup: int, device: str, seed: int) -> float:
    """Updates per second of ``algo`` in ``mode`` from update ``warmup`` to ``warmup + updates``."""
    L.seed_everything(seed, verbose=False)
    module, dm = ALGOS[algo](MODES[mode], seed)
    clock = TrainClock(warmup=warmup)
    quiet_trainer(max_steps=warmup + updates, accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
                  callbacks=[clock]).fit(module, dm)
    return clock.rate


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--updates", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=WARMUP, help="updates before the clock starts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a shared CPU: 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=list(ALGOS))
    parser.add_argument("--modes", nargs="+", default=None, choices=list(MODES),
                        help="default: eager and compile, and cudagraphs on a CUDA device")
    args = parse_args(parser, smoke={"updates": 20, "warmup": 5, "repeats": 1, "modes": ["eager"]}, data=["default"])
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    modes = args.modes or [m for m in MODES if cuda or m != "cudagraphs"]
    if "cudagraphs" in modes and not cuda:
        parser.error("--modes cudagraphs needs a CUDA device")
    started = time.perf_counter()
    speeds: dict[str, dict[str, list[float]]] = {a: {m: [] for m in modes} for a in args.algos}
    for r, (algo, mode) in interleaved([(a, m) for a in args.algos for m in modes], args.repeats):
        speeds[algo][mode].append(rate(algo, mode, args.updates, args.warmup, args.device, seed=r))
        print(f"repeat {r}: {algo} {mode}: {speeds[algo][mode][-1]:.1f} updates/s", flush=True)
    medians = {a: {m: statistics.median(v) for m, v in by_mode.items()} for a, by_mode in speeds.items()}
    ratios = {a: {m: statistics.median(x / e for x, e in zip(by_mode[m], by_mode["eager"]))
                  for m in by_mode if m != "eager"} for a, by_mode in speeds.items() if "eager" in by_mode}
    claims = []
    for algo, published in LEANRL.items():
        measured = ratios.get(algo, {}).get("cudagraphs")
        if measured is not None:
            claims.append(claim(f"{algo} compiled with CUDA graphs runs >= {published}x its eager updates per second "
                                f"on {args.device} (LeanRL's ratio over CleanRL, H100)",
                                f"LeanRL: {published}x", measured, measured >= published))
    for algo, by_mode in ratios.items():
        if "compile" in by_mode:
            claims.append(claim(f"{algo} with compile=True is not slower than eager on {args.device}",
                                "torch.compile's promise", by_mode["compile"], by_mode["compile"] >= 1.0))
    if not claims:  # eager only (the smoke run): the one thing measured is that every algorithm ran
        claims.append(claim("every algorithm ran eagerly at a positive speed", "-", medians,
                            all(v > 0 for by_mode in medians.values() for v in by_mode.values())))
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    result = {
        "claims": claims,
        "benchmark": "updates per second, eager / torch.compile / CUDA graphs",
        "smoke": args.smoke,
        "device": device_name,
        "torch_threads": torch.get_num_threads(),
        "setting": f"{args.updates} timed updates after {args.warmup}, {args.repeats} interleaved repeats; SAC/TD3 on "
                   "OfflineDataModule('default') (updates only), DQN online and PQN on-policy on CartPole-v1 "
                   "(environment included)",
        "updates_per_s": speeds,
        "medians": medians,
        "ratios_over_eager": ratios,
        "leanrl_published": LEANRL,
        **environment({"base_py": Path(lit_qlearn.algorithms.base.__file__)}),
    }
    for algo, by_mode in medians.items():
        print(f"{algo}: " + ", ".join(f"{m} {v:.1f}/s" for m, v in by_mode.items())
              + "".join(f"; {m}/eager {x:.2f}x" for m, x in ratios.get(algo, {}).items()))
    write_result("gpu_speed", result, started, args.out)


if __name__ == "__main__":
    main()
