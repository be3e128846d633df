"""Crash prediction (Yue et al. 2023, Theorems 3-4; DESIGN.md section 5.4).

After the critical step, SGD on an L-layer ReLU critic gives
||u_t|| = O((1 - C lambda eta t)^(-L/(2L-2))), so ||u_t||^(-(2L-2)/L) falls
linearly in t and reaches zero at the crash step T = 1/(C lambda eta).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["CrashFit", "predict_crash_step"]


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


def predict_crash_step(steps: Sequence[float], td_error_norms: Sequence[float], num_layers: int = 2) -> CrashFit:
    """Fit ``||u||^(-(2L-2)/L)`` linearly against the step (Eq.: for L = 2, ``1/||u||``).

    Args:
        steps: training steps t of the measurements, ``(K,)``, K >= 2.
        td_error_norms: ``||u_t||`` at those steps, positive and finite.
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
    y = u**exponent
    slope, intercept = np.polyfit(t, y, 1)
    residual = y - (slope * t + intercept)
    total = np.sum((y - y.mean()) ** 2)
    r2 = 1.0 - float(np.sum(residual**2) / total) if total > 0 else (1.0 if np.allclose(residual, 0) else 0.0)
    step = float(-intercept / slope) if slope < 0 else None
    return CrashFit(step=step, slope=float(slope), intercept=float(intercept), r2=r2, exponent=exponent)
