"""The crash laws of Yue et al. (2023, Theorems 3-4; docs/design.md section 5.4) as pure
maths: line fits and forecasts on a window of measurements, no Lightning.

**SGD law.** After the critical step, SGD on an L-layer ReLU critic gives
``||u_t|| = O((1 - C lambda eta t)^(-L/(2L-2)))``, so ``||u_t||^(-(2L-2)/L)`` falls
linearly in t and reaches zero at the crash step ``T = 1/(C lambda eta)``
(:func:`predict_crash_step`).

**Adam law.** No finite crash time: ``||u_t|| = Theta(t^L)``, a line of slope L in
``(log t, log ||u||)``, and ``||theta||`` grows by ``eta sqrt(P)`` per step
(:func:`adam_slope`); the forecast is the step at which the log-log line crosses a
divergence threshold.

**Bellman bound.** No true Q-value exceeds ``max|r| / (1 - gamma)`` in absolute value
(:func:`bellman_bound`).

:class:`~lit_qlearn.callbacks.CrashPredictor` measures ``||u||`` and ``||theta||`` while
training and publishes what :func:`forecast` returns; everything here also runs on logged
numbers after the fact.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["CrashFit", "Forecast", "adam_slope", "bellman_bound", "fit_line", "forecast", "predict_crash_step"]

#: Forecast laws: "sgd" (finite crash step) or "adam" (threshold crossing only).
FORECAST_LAWS = ("sgd", "adam")
# exp() of a larger number overflows a float: a crossing further than e^700 steps away is "never".
_MAX_LOG_STEP = 700.0


@dataclass(frozen=True)
class CrashFit:
    """A line ``y = slope * t + intercept`` fitted to ``y = ||u||^exponent``.

    ``step`` is where the line reaches zero (the forecast crash step), or None when
    the line does not fall (no divergence under way); ``r2`` is the fit's R^2.
    """

    step: float | None
    slope: float
    intercept: float
    r2: float
    exponent: float


def fit_line(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """Least-squares ``y = slope * x + intercept`` on ``(K,)`` arrays, K >= 2; returns
    ``(slope, intercept, r2)``, with ``r2 = 0`` when ``y`` is constant (nothing to explain)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    total = np.sum((y - y.mean()) ** 2)
    r2 = 1.0 - float(np.sum((y - (slope * x + intercept)) ** 2) / total) if total > 0 else 0.0
    return float(slope), float(intercept), r2


def predict_crash_step(steps: Sequence[float], td_error_norms: Sequence[float], num_layers: int = 2) -> CrashFit:
    """Fit ``||u||^(-(2L-2)/L)`` linearly against the step (for L = 2, ``1/||u||``).

    Args:
        steps: training steps t of the measurements, ``(K,)``, K >= 2.
        td_error_norms: ``||u_t||`` at those steps, ``(K,)``, positive and finite.
        num_layers: L, the number of Linear layers of the critic (>= 2).

    Returns:
        :class:`CrashFit`; its ``step`` is the forecast crash step ``-intercept / slope``
        when the fitted line falls, else None.
    """
    t = np.asarray(steps, dtype=np.float64)
    u = np.asarray(td_error_norms, dtype=np.float64)
    if t.ndim != 1 or t.shape != u.shape or len(t) < 2:
        raise ValueError(
            f"predict_crash_step: steps and td_error_norms must be 1-D of the same length >= 2, "
            f"got shapes {t.shape} and {u.shape}"
        )
    if not np.all(np.isfinite(u)) or np.any(u <= 0):
        raise ValueError("predict_crash_step: td_error_norms must be positive and finite")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 2:
        raise ValueError(f"predict_crash_step: num_layers must be an integer >= 2, got {num_layers!r}")
    exponent = -(2 * num_layers - 2) / num_layers
    slope, intercept, r2 = fit_line(t, u**exponent)
    step = float(-intercept / slope) if slope < 0 else None
    return CrashFit(step=step, slope=float(slope), intercept=float(intercept), r2=r2, exponent=exponent)


@dataclass(frozen=True)
class Forecast:
    """What the laws say at ``step``, the latest measurement of a window.

    ``crash`` is the SGD law's fit when it forecasts (its line falls with R^2 >= the
    minimum), else None; ``loglog_slope`` the slope of ``log ||u||`` against ``log t``
    (None: fewer than two measurements at t > 0); ``threshold_step`` the step at which
    ``||u||`` reaches the threshold on that log-log line (``step`` itself once reached;
    None when the line does not rise or fits worse than the minimum R^2).
    """

    step: int
    norm_slope: float
    crash: CrashFit | None = None
    loglog_slope: float | None = None
    threshold_step: float | None = None

    @property
    def steps_left(self) -> float | None:
        """Steps from ``step`` to the forecast crash step (SGD law), or None."""
        return None if self.crash is None else self.crash.step - self.step

    @property
    def threshold_steps_left(self) -> float | None:
        """Steps from ``step`` to the threshold crossing, or None."""
        return None if self.threshold_step is None else self.threshold_step - self.step

    def soonest(self) -> float | None:
        """Steps to the earliest forecast event (crash step or threshold crossing), or None."""
        left = [s for s in (self.steps_left, self.threshold_steps_left) if s is not None]
        return min(left) if left else None

    def within(self, horizon: float) -> bool:
        """Whether a forecast event is at most ``horizon`` steps away."""
        soonest = self.soonest()
        return soonest is not None and soonest <= horizon


def forecast(steps: Sequence[float], td_error_norms: Sequence[float], param_norms: Sequence[float], *,
             law: str = "sgd", num_layers: int = 2, min_r2: float = 0.9, threshold: float = 1e6) -> Forecast:
    """Fit the laws on a window of measurements ``(t, ||u_t||, ||theta_t||)``, each ``(K,)``
    with K >= 2, increasing ``t``, ``||u||`` positive and finite; the forecast is made at
    the last one.

    Args:
        law: ``"sgd"`` fits :func:`predict_crash_step` too; ``"adam"`` only the log-log
            line (under Adam the SGD line keeps receding and forecasts nothing useful).
        num_layers: L of the SGD law.
        min_r2: fits with a lower R^2 make no forecast.
        threshold: the ``||u||`` that counts as diverged for the threshold crossing.
    """
    if law not in FORECAST_LAWS:
        raise ValueError(f"forecast: law must be one of {FORECAST_LAWS}, got {law!r}")
    t = np.asarray(steps, dtype=np.float64)
    u = np.asarray(td_error_norms, dtype=np.float64)
    p = np.asarray(param_norms, dtype=np.float64)
    if not t.shape == u.shape == p.shape or t.ndim != 1 or len(t) < 2:
        raise ValueError(f"forecast: steps, td_error_norms and param_norms must be 1-D of the same length >= 2, "
                         f"got shapes {t.shape}, {u.shape} and {p.shape}")
    step, u_now = int(t[-1]), float(u[-1])
    crash = predict_crash_step(t, u, num_layers) if law == "sgd" else None
    if crash is not None and (crash.step is None or crash.r2 < min_r2):
        crash = None
    loglog_slope = threshold_step = None
    positive = t > 0  # log t: the measurements after step 0
    if positive.sum() >= 2:
        slope, intercept, r2 = fit_line(np.log(t[positive]), np.log(u[positive]))
        loglog_slope = slope
        if u_now >= threshold:
            threshold_step = float(step)
        elif slope > 0 and r2 >= min_r2:
            # log u = slope log t + intercept reaches log threshold at t = exp((log thr - intercept) / slope)
            threshold_step = math.exp(min((math.log(threshold) - intercept) / slope, _MAX_LOG_STEP))
    return Forecast(step=step, norm_slope=fit_line(t, p)[0], crash=crash, loglog_slope=loglog_slope,
                    threshold_step=threshold_step)


def adam_slope(lr: float, num_parameters: int) -> float:
    """``eta sqrt(P)``: the growth of ``||theta||`` per Adam step when every coordinate
    moves by ``eta`` in a fixed direction (Theorem 4's regime)."""
    return float(lr) * math.sqrt(num_parameters)


def bellman_bound(max_abs_reward: float, gamma: float) -> float | None:
    """``max|r| / (1 - gamma)``, the largest ``|Q|`` any policy can have; None when it
    carries no information (zero or non-finite rewards, ``gamma >= 1``)."""
    r_max, gamma = float(max_abs_reward), float(gamma)
    if r_max == 0 or gamma >= 1 or not math.isfinite(r_max):
        return None
    return r_max / (1.0 - gamma)
