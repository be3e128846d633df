"""Cost of PlasticityMonitor at its defaults on a TD3+BC training run.

TD3+BC (default 256x256 networks, batch 256) on ``OfflineDataModule("default")``
(100k steps of the shipped medium Hopper-v5 policy, generated on first use), ``--updates`` updates per run,
TensorBoard logging, CPU. The cost is measured in situ: the wall time spent inside
the monitor's ``on_train_batch_end`` (where every measurement happens) divided by the
rest of the same run's training time, so the machine's drift cancels; the median over
``--repeats`` runs is the number the target (< 1%) refers to. Beside it: the median
time of one measurement (``measure`` on the probe set, after training) and, from it
and the measured time per update, the implied cost at other cadences — the basis for
the default ``every_n_steps``.

    python benchmarks/plasticity_cost.py [--updates 10000] [--repeats 2] [--out DIR] [--smoke]
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

import lit_qlearn.callbacks.plasticity
import lit_qlearn.plasticity
from harness import TrainClock, argument_parser, claim, environment, parse_args, quiet_trainer, timed_hook, \
    write_result
from lit_qlearn.algorithms import TD3BC
from lit_qlearn.callbacks import PlasticityMonitor
from lit_qlearn.data import OfflineDataModule

TARGET = 0.01
CADENCES = (100, 250, 500, 1000, 2500, 10_000)


def fit(updates: int, seed: int, logdir: str, every_n_steps: int | None = None
        ) -> tuple[float, PlasticityMonitor, TD3BC, OfflineDataModule, L.Trainer]:
    L.seed_everything(seed, verbose=False)
    dm = OfflineDataModule("default", seed=seed, steps_per_epoch=updates)
    model = TD3BC(eval_every=0)
    monitor = PlasticityMonitor() if every_n_steps is None else PlasticityMonitor(every_n_steps=every_n_steps)
    clock, monitor = TrainClock(), timed_hook(monitor)
    trainer = quiet_trainer(max_steps=updates, logger=TensorBoardLogger(logdir), log_every_n_steps=50,
                            callbacks=[clock, monitor], accelerator="cpu", devices=1)
    trainer.fit(model, dm)
    return clock.seconds, monitor, model, dm, trainer


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--updates", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every-n-steps", type=int, default=None, help="the monitor's cadence (default: its own)")
    args = parse_args(parser, smoke={"updates": 40, "repeats": 1, "every_n_steps": 20}, data=["default"])
    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as logdir:
        for r in range(args.repeats):
            seconds, monitor, model, dm, trainer = fit(args.updates, args.seed + r, f"{logdir}/{r}",
                                                       args.every_n_steps)
            inside = monitor.hook_seconds
            runs.append({"train_seconds": seconds, "seconds_inside_monitor": inside, "cost": inside / (seconds - inside),
                         "measurements": args.updates // monitor.every_n_steps})
            print(f"run {r}: {seconds:.1f} s, {inside:.3f} s inside the monitor ({100 * runs[-1]['cost']:.3f}%)",
                  flush=True)
        probe = monitor.probe
        per_measure = []
        for _ in range(11):
            start = time.perf_counter()
            monitor.measure(trainer, model, probe)
            per_measure.append(time.perf_counter() - start)
    cost = statistics.median(r["cost"] for r in runs)
    per_update = statistics.median((r["train_seconds"] - r["seconds_inside_monitor"]) / args.updates for r in runs)
    one = statistics.median(per_measure)
    result = {
        "claims": [claim(f"PlasticityMonitor(every_n_steps={monitor.every_n_steps}) costs < {TARGET:.0%} of a TD3+BC "
                         f"run (time inside it / the rest of the run, median of {args.repeats})",
                         "lit_qlearn's target for the monitor", cost, cost < TARGET)],
        "benchmark": "PlasticityMonitor cost on TD3+BC",
        "smoke": args.smoke,
        "setting": f"TD3BC defaults (256x256, batch 256), OfflineDataModule('default'), {args.updates} updates, "
                   f"TensorBoard, CPU, {args.repeats} runs",
        "monitor": {"every_n_steps": monitor.every_n_steps, "probe_size": monitor.probe_size, "tau": monitor.tau,
                    "delta": monitor.delta},
        "definition": "cost = seconds inside PlasticityMonitor.on_train_batch_end / (run's training seconds - those)",
        "runs": runs,
        "cost_measured": cost,
        "seconds_per_measurement": one,
        "seconds_per_update_without_monitor": per_update,
        "implied_cost_by_cadence": {str(n): one / (n * per_update) for n in CADENCES},
        "target": {"cost_below": TARGET, "meets": cost < TARGET},
        **environment({"plasticity_py": Path(lit_qlearn.plasticity.__file__),
                       "callback_py": Path(lit_qlearn.callbacks.plasticity.__file__)}),
    }
    print(f"\nPlasticityMonitor(every_n_steps={monitor.every_n_steps}, probe_size={monitor.probe_size}) on TD3+BC:")
    print(f"  cost in situ (median of {args.repeats}): {100 * cost:.3f}%  (target < {100 * TARGET:g}%: "
          f"{'met' if cost < TARGET else 'NOT met'})")
    print(f"  one measurement: {1e3 * one:.1f} ms; one update: {1e3 * per_update:.2f} ms")
    print("  implied cost by cadence: " + ", ".join(f"{n}: {100 * v:.2f}%"
                                                   for n, v in result["implied_cost_by_cadence"].items()))
    write_result("plasticity_cost", result, started, args.out)


if __name__ == "__main__":
    main()
