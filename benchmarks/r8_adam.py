"""R8 (Yue et al. 2023, docs/design.md 5.4): under Adam a diverging critic's parameters grow
linearly, ||theta_t|| ~ eta sqrt(P) t, and its TD error polynomially, ||u_t|| = Theta(t^L)
for an L-layer ReLU critic.

A diverging run of r2 (TD3 without target averaging, Adam eta = 3e-4, gamma 0.99, plain
256x256 critic: L = 3 linear layers, on the default data), kept going past the bound for
``--updates`` updates, with ``CrashPredictor`` measuring ||u|| and ||theta|| of the first
critic on the probe set every ``--every`` updates. The slopes are fitted over the last half
of the run (after divergence, where the theorem's regime holds): ||theta|| against t
(compare with eta sqrt(P), P the first critic's parameter count) and log ||u|| against log
t (compare with L); beside it, log ||u|| against log ||theta|| (L exactly when ||u|| grows
as ||theta||^L: the t^L law is asymptotic, ||theta|| = theta_0 + eta sqrt(P) t has an
offset t_0 = theta_0 / (eta sqrt(P)) that makes the slope in log t L t / (t + t_0) at
finite t). CrashPredictor's own logged ``params/norm_slope`` and
``crash/loglog_slope`` (fitted over its sliding window) at the end are reported beside.

    python benchmarks/r8_adam.py [--updates 20000] [--every 100] [--seed 0] [--smoke]
"""
from __future__ import annotations

import math
import time

import numpy as np

from harness import ROOT, argument_parser, claim, environment, parse_args, save_figure, write_result
from _divergence import td3_run


def main() -> None:
    import torch

    parser = argument_parser(__doc__)
    parser.add_argument("--updates", type=int, default=20_000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--probe", type=int, default=512)
    parser.add_argument("--gamma", type=float, default=0.99)
    parser.add_argument("--dataset", default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="cpu")
    # smoke: measurements enough for the fits over the last half (4 points)
    args = parse_args(parser, smoke={"updates": 40, "every": 5, "probe": 64}, data=lambda a: [a.dataset])
    torch.set_num_threads(1)
    started = time.perf_counter()
    run = td3_run(args.dataset, args.gamma, args.seed, args.updates, args.every, args.probe, None,
                  stop_on_divergence=False, accelerator=args.accelerator)
    steps = np.array(run["steps"], dtype=float)
    theta = np.array([math.nan if v is None else v for v in run["params/norm"]])
    u = np.array([math.nan if v is None else v for v in run["crash/td_error_norm"]])
    late = (steps >= steps[-1] / 2) & np.isfinite(theta) & np.isfinite(u) & (u > 0)
    theta_slope, intercept = (float(c) for c in np.polyfit(steps[late], theta[late], 1))
    loglog_slope = float(np.polyfit(np.log(steps[late]), np.log(u[late]), 1)[0])
    # The theorem's t^L is asymptotic: ||theta|| = theta_0 + eta sqrt(P) t carries an offset,
    # so at finite t the slope against log t is L t / (t + t_0). Against log ||theta|| it is L.
    theta_loglog = float(np.polyfit(np.log(theta[late]), np.log(u[late]), 1)[0])
    t_mid = float(np.median(steps[late]))
    t0 = intercept / theta_slope
    adam = next(v for v in reversed(run["params/adam_slope"]) if v is not None)
    layers = 3

    def last(key: str):
        return next((v for v in reversed(run[key]) if v is not None), None)

    claims = [
        claim("||theta|| grows linearly with slope within 10% of eta sqrt(P)", "Yue et al. 2023, Theorem (Adam)",
              {"slope": theta_slope, "eta_sqrt_P": adam, "ratio": theta_slope / adam,
               "crash_predictor_norm_slope": last("params/norm_slope")}, abs(theta_slope / adam - 1) <= 0.1),
        claim(f"log ||u|| against log t has slope within 10% of L = {layers}", "Yue et al. 2023, Theorem (Adam)",
              {"slope": loglog_slope, "L": layers, "crash_predictor_loglog_slope": last("crash/loglog_slope"),
               "slope_against_log_theta": theta_loglog, "theta_offset_in_updates_t0": t0,
               "finite_t_prediction_L_t_over_t_plus_t0": layers * t_mid / (t_mid + t0)},
              abs(loglog_slope / layers - 1) <= 0.1),
    ]
    result = {"claims": claims, "settings": vars(args),
              "run": {k: run[k] for k in ("bound", "diverged", "diverged_at", "updates", "seconds", "transitions")},
              "series": {k: run[k] for k in ("steps", "params/norm", "crash/td_error_norm", "crash/q_bound_ratio",
                                             "params/norm_slope", "crash/loglog_slope")},
              "environment": environment({"crash": ROOT / "lit_qlearn/callbacks/crash.py"})}
    plot(steps, theta, u, late, theta_slope, loglog_slope, adam, layers, theta_loglog, args.out / "r8_adam.png")
    write_result("r8_adam", result, started, args.out)


def plot(steps, theta, u, late, theta_slope, loglog_slope, adam, layers, theta_loglog, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(steps, theta, label="||theta|| (first critic)")
    t0 = steps[late][0]
    a.plot(steps[late], theta[late][0] + adam * (steps[late] - t0), "--", label=f"slope eta sqrt(P) = {adam:.3g}")
    a.set_xlabel("updates")
    a.set_title(f"fitted slope {theta_slope:.3g}")
    a.legend()
    b.loglog(steps, u, label="||u|| on the probe")
    b.loglog(steps[late], u[late][0] * (steps[late] / t0) ** layers, "--", label=f"t^{layers}")
    b.set_xlabel("updates")
    b.set_title(f"fitted log-log slope {loglog_slope:.3g} (against log ||theta||: {theta_loglog:.3g})")
    b.legend()
    save_figure(fig, path, "R8: a diverging Adam run (TD3, target = current)")


if __name__ == "__main__":
    main()
