"""Gradient updates per second: TD3+BC in a Lightning Trainer vs a hand-written PyTorch loop.

Both sides use the same networks (lit_qlearn.networks), batch size, data tensors,
sampling (random index gathers), device, logging cadence (TensorBoard every 50
updates) and TD3+BC update (critic every step, actor and Polyak targets every 2).
lit_qlearn's modules use Adam's fused kernel (the same update, faster), so the
plain loop runs twice: with the fused kernel (same optimiser: the ratio is the
pure cost of Lightning and the library) and with torch.optim.Adam's default
(what a hand-written loop usually does). Runs alternate, in an order rotated
every repeat, so that drift of the machine affects all alike; medians and
ratios are written to benchmarks/results/throughput.json (or into ``--out``).

    python benchmarks/throughput.py [--updates 1000] [--repeats 7] [--device cpu] [--out DIR] [--smoke]
"""
from __future__ import annotations

import platform
import statistics
import tempfile
import time

import lightning as L
import numpy as np
import torch

from baselines.plain import plain_td3bc
from harness import TrainClock, argument_parser, claim, parse_args, quiet_trainer, write_result
from lit_qlearn.algorithms import TD3BC
from lit_qlearn.data import OfflineDataModule
from lit_qlearn.datasets import ensure_default_dataset

WARMUP = 50  # updates excluded from the timing on both sides
TARGET = 0.9  # Lightning / plain loop with the same optimiser


def lightning_td3bc(dataset: str, updates: int, batch_size: int, device: str, logdir: str, seed: int = 0) -> float:
    """lit_qlearn's TD3BC at its defaults in a Trainer, TensorBoard every 50 updates; updates per second
    after the first WARMUP, as the plain loop times them."""
    torch.manual_seed(seed)
    dm = OfflineDataModule(dataset, batch_size=batch_size, seed=seed, steps_per_epoch=updates)
    model = TD3BC(eval_every=0)
    clock = TrainClock(warmup=WARMUP)
    trainer = quiet_trainer(max_steps=updates, accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
                            logger=L.pytorch.loggers.TensorBoardLogger(logdir), log_every_n_steps=50,
                            callbacks=[clock])
    trainer.fit(model, dm)
    return clock.rate


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dataset", default=None, help="D4RL-format file (default: the embedded Hopper data)")
    # smoke: the timing starts after WARMUP updates
    args = parse_args(parser, smoke={"updates": WARMUP + 10, "repeats": 1}, data=lambda a: [a.dataset or "default"])

    started = time.perf_counter()
    dataset = args.dataset or str(ensure_default_dataset())
    dm = OfflineDataModule(dataset, batch_size=args.batch_size)
    dm.setup("fit")
    data = dm.data  # the same normalised tensors the Lightning side samples from
    plain, fused, lit = [], [], []
    with tempfile.TemporaryDirectory() as logdir:
        for r in range(args.repeats):
            runs = [
                lambda: plain.append(plain_td3bc(data, args.updates, WARMUP, args.batch_size, args.device,
                                                 f"{logdir}/p{r}", seed=r)),
                lambda: fused.append(plain_td3bc(data, args.updates, WARMUP, args.batch_size, args.device,
                                                 f"{logdir}/f{r}", seed=r, fused=True)),
                lambda: lit.append(lightning_td3bc(dataset, args.updates, args.batch_size, args.device,
                                                   f"{logdir}/l{r}", seed=r)),
            ]
            for k in range(3):  # rotate the order so that no side always runs first or last
                runs[(r + k) % 3]()
            print(f"repeat {r}: plain {plain[-1]:.1f}, plain fused-Adam {fused[-1]:.1f}, "
                  f"lightning {lit[-1]:.1f} updates/s")
    med = {name: statistics.median(v) for name, v in (("plain", plain), ("fused", fused), ("lit", lit))}
    ratio_same = med["lit"] / med["fused"]
    ratio_default = med["lit"] / med["plain"]
    result = {
        "claims": [claim(f"TD3+BC in a Lightning Trainer >= {TARGET}x the updates per second of the same hand-written "
                         "PyTorch loop with the same (fused) Adam", "lit_qlearn's target: Lightning costs at most "
                         "a tenth", {"ratio": ratio_same, "medians": med}, ratio_same >= TARGET)],
        "benchmark": "TD3+BC gradient updates per second, Lightning Trainer vs plain PyTorch loop",
        "smoke": args.smoke,
        "dataset": dataset,
        "transitions": int(dm.num_transitions),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "updates_per_run": args.updates,
        "warmup_updates_excluded": WARMUP,
        "plain_default_adam_updates_per_s": plain,
        "plain_fused_adam_updates_per_s": fused,
        "lightning_updates_per_s": lit,
        "medians": med,
        "ratio_lightning_over_plain_same_optimizer": ratio_same,
        "ratio_lightning_over_plain_default_adam": ratio_default,
        "target_ratio_same_optimizer": TARGET,
        "meets_target": ratio_same >= TARGET,
        "versions": {"torch": torch.__version__, "lightning": L.__version__, "python": platform.python_version(),
                     "numpy": np.__version__},
        "machine": platform.machine(),
    }
    print(f"lightning / plain (same fused Adam) = {ratio_same:.3f} (target >= {TARGET}); "
          f"lightning / plain (default Adam) = {ratio_default:.3f}")
    write_result("throughput", result, started, args.out)


if __name__ == "__main__":
    main()
