"""Cost of lit_qlearn's MonitorCallback on a Stable-Baselines3 SAC run at its default cadence.

SB3's SAC at its defaults (256x256 networks, batch 256, one update per environment step) on
Pendulum-v1 with ``learning_starts=1000``, ``--steps`` environment steps per run, CPU, one torch
thread. ``MonitorCallback()`` at its defaults: SEEMMeter, NTKMeter and CrashMeter every 5,000
steps on 512 probe transitions drawn when learning starts. Two measures of its cost:

* **in situ** (the claim): the wall time spent inside the callback's ``_on_step`` (every
  measurement, the probe's draw, the cadence's checks) divided by the rest of the same run,
  so the machine's drift cancels; the median over ``--repeats`` runs;
* **interleaved**: runs with and without the callback in turn (same seeds), the ratio of
  their wall times, median over the pairs (noisy on a shared machine: reported beside).

Pendulum's environment step is cheap, so the updates dominate the run and the cost is close to
its largest share (on MuJoCo the environment adds time and the share falls).

    python benchmarks/sb3_monitor_cost.py [--steps 10000] [--repeats 2] [--out DIR] [--smoke]
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

import lit_qlearn.integrations.sb3
from harness import argument_parser, claim, environment, interleaved, parse_args, write_result

TARGET = 0.03


def run(steps: int, seed: int, monitored: bool, every_n_steps: int | None, probe_size: int | None) -> dict:
    from stable_baselines3 import SAC

    from lit_qlearn.integrations.sb3 import MonitorCallback

    class Timed(MonitorCallback):
        """The callback, with the wall time spent inside ``_on_step`` counted."""

        seconds = 0.0
        measured: list[int] = []

        def _on_step(self) -> bool:
            start = time.perf_counter()
            try:
                return super()._on_step()
            finally:
                self.seconds += time.perf_counter() - start
                if self.last_step == self.num_timesteps and self.last_step not in self.measured:
                    self.measured = [*self.measured, self.last_step]

    options = {k: v for k, v in (("every_n_steps", every_n_steps), ("probe_size", probe_size)) if v is not None}
    callback = Timed(**options) if monitored else None
    model = SAC("MlpPolicy", "Pendulum-v1", learning_starts=1000, seed=seed, device="cpu")
    start = time.perf_counter()
    model.learn(steps, callback=callback)
    seconds = time.perf_counter() - start
    out = {"monitored": monitored, "seed": seed, "seconds": seconds, "steps": steps}
    if monitored:
        out.update(seconds_inside=callback.seconds, cost=callback.seconds / (seconds - callback.seconds),
                   measurements=callback.measured,
                   every_n_steps=callback.every_n_steps, probe_size=callback.probe_size,
                   meters=[type(m).__name__ for m in callback.meters], scalars=callback.scalars)
    return out


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every-n-steps", type=int, default=None, help="the callback's cadence (default: its own)")
    parser.add_argument("--probe-size", type=int, default=None, help="probe transitions (default: the callback's)")
    args = parse_args(parser, smoke={"steps": 1100, "repeats": 1, "every_n_steps": 50, "probe_size": 64})
    torch.set_num_threads(1)
    started = time.perf_counter()
    run(min(args.steps, 1050), args.seed, False, None, None)  # warm-up: imports, first allocations
    runs = []
    for r, monitored in interleaved([True, False], args.repeats):
        runs.append(run(args.steps, args.seed + r, monitored, args.every_n_steps, args.probe_size))
        line = runs[-1]
        print(f"repeat {r} {'with' if monitored else 'without'}: {line['seconds']:.1f} s"
              + (f", {line['seconds_inside']:.3f} s inside ({100 * line['cost']:.3f}%)" if monitored else ""),
              flush=True)
    with_cb = [r for r in runs if r["monitored"]]
    without = {r["seed"]: r["seconds"] for r in runs if not r["monitored"]}
    cost = statistics.median(r["cost"] for r in with_cb)
    ratios = [r["seconds"] / without[r["seed"]] for r in with_cb]
    every, probe = with_cb[0]["every_n_steps"], with_cb[0]["probe_size"]
    result = {
        "claims": [claim(f"MonitorCallback at its defaults (every {every} steps, {probe} probe transitions, SEEM + "
                         f"NTK + crash meters) costs <= {TARGET:.0%} of an SB3 SAC run (time inside it / the rest "
                         f"of the run, median of {args.repeats})",
                         "issue 23 goal", cost, cost <= TARGET)],
        "benchmark": "MonitorCallback cost on Stable-Baselines3 SAC",
        "smoke": args.smoke,
        "setting": f"SB3 SAC defaults, Pendulum-v1, learning_starts=1000, {args.steps} environment steps per run, "
                   f"CPU, 1 torch thread, {args.repeats} interleaved pairs",
        "definition": "cost = seconds inside MonitorCallback._on_step / (the run's seconds - those); "
                      "interleaved ratio = run with the callback / run without, same seed",
        "runs": runs,
        "cost_in_situ_median": cost,
        "interleaved_ratio_median": statistics.median(ratios),
        "interleaved_ratios": ratios,
        "target": {"cost_at_most": TARGET, "meets": cost <= TARGET},
        **environment({"sb3_integration_py": Path(lit_qlearn.integrations.sb3.__file__)}),
    }
    print(f"\nMonitorCallback on SB3 SAC: in situ {100 * cost:.3f}% (target <= {100 * TARGET:g}%: "
          f"{'met' if cost <= TARGET else 'NOT met'}); interleaved ratio {statistics.median(ratios):.3f}")
    write_result("sb3_monitor_cost", result, started, args.out)


if __name__ == "__main__":
    main()
