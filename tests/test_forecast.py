"""The crash laws as pure maths (lit_qlearn.forecast): fits against closed forms and
exact synthetic laws, and the module imports without Lightning."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lit_qlearn.forecast import Forecast, adam_slope, bellman_bound, fit_line, forecast, predict_crash_step

ROOT = Path(__file__).resolve().parents[1]


def diverging(t, crash, layers, c=0.3):
    """Theorem 3's law: ||u_t|| = c (1 - t/T)^(-L/(2L-2))."""
    return c * (1 - np.asarray(t, dtype=float) / crash) ** (-layers / (2 * layers - 2))


@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("crash", [605.0, 12_345.0])
def test_recovers_the_crash_step_exactly(layers, crash):
    t = np.linspace(0.5 * crash, 0.8 * crash, 20)
    fit = predict_crash_step(t, diverging(t, crash, layers), num_layers=layers)
    assert fit.step == pytest.approx(crash, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.exponent == pytest.approx(-(2 * layers - 2) / layers)


def test_published_example_line():
    # Paper: a line fitted on steps 450-500 gave 1/||u|| = -1.44e-3 t + 0.87, crash at about 605.
    t = np.arange(450, 501, 5)
    fit = predict_crash_step(t, 1 / (-1.44e-3 * t + 0.87))
    assert fit.slope == pytest.approx(-1.44e-3) and fit.intercept == pytest.approx(0.87)
    assert fit.step == pytest.approx(0.87 / 1.44e-3)  # 604.2


def test_converging_or_flat_curves_forecast_no_crash():
    t = np.arange(100, 200)
    assert predict_crash_step(t, 5 * np.exp(-t / 50)).step is None  # TD error shrinking
    assert predict_crash_step(t, np.full(100, 2.0)).step is None  # stalled


def test_tolerates_noise():
    rng = np.random.default_rng(0)
    t = np.linspace(300, 480, 40)
    u = diverging(t, 600.0, 2) * np.exp(rng.normal(0, 0.02, size=t.shape))
    fit = predict_crash_step(t, u)
    assert fit.step == pytest.approx(600.0, rel=0.02) and fit.r2 > 0.95


@pytest.mark.parametrize("steps, norms, layers, match", [
    ([1], [1.0], 2, "length >= 2"),
    ([1, 2], [1.0], 2, "same length"),
    ([1, 2], [1.0, np.nan], 2, "positive and finite"),
    ([1, 2], [1.0, 0.0], 2, "positive and finite"),
    ([1, 2], [1.0, 2.0], 1, "num_layers"),
])
def test_bad_input_is_named(steps, norms, layers, match):
    with pytest.raises(ValueError, match=match):
        predict_crash_step(steps, norms, num_layers=layers)


def test_fit_line_is_the_closed_form_least_squares():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 50, size=30)
    y = 2.5 - 0.3 * x + rng.normal(0, 1.0, size=30)
    dx, dy = x - x.mean(), y - y.mean()
    slope = (dx @ dy) / (dx @ dx)  # cov / var
    corr = (dx @ dy) / math.sqrt((dx @ dx) * (dy @ dy))
    got = fit_line(x, y)
    assert got == pytest.approx((slope, y.mean() - slope * x.mean(), corr**2), rel=1e-10)
    assert fit_line([0, 1, 2], [4.0, 4.0, 4.0])[2] == 0.0  # nothing to explain: R^2 0


def test_sgd_forecast_is_the_crash_step_of_the_window():
    """Theorem 3's law sampled at integer steps: the forecast's crash step is T, the steps
    left T minus the last step; the parameter norm's slope is that of the line it follows."""
    steps = np.arange(300, 481, 10)
    t_crash = 600.0
    u = diverging(steps, t_crash, 2)
    out = forecast(steps, u, 3.0 + 0.25 * steps, law="sgd", num_layers=2, threshold=1e300)
    assert out.step == 480 and out.norm_slope == pytest.approx(0.25, rel=1e-10)
    assert out.crash.step == pytest.approx(t_crash, rel=1e-9) and out.crash.r2 == pytest.approx(1.0, abs=1e-12)
    assert out.steps_left == pytest.approx(t_crash - 480, rel=1e-9)
    assert out.threshold_step is None or out.threshold_step > t_crash  # the crash comes first
    assert out.soonest() == out.steps_left
    assert out.within(120.0 + 1e-6) and not out.within(119.0)


def test_adam_forecast_is_the_threshold_crossing_of_the_loglog_line():
    """||u|| = c t^L exactly: the log-log slope is L and ||u|| reaches the threshold at
    t = (threshold / c)^(1/L); under the Adam law no crash step is forecast."""
    c, layers, threshold = 0.02, 2, 1e5
    steps = np.arange(100, 1001, 50)
    out = forecast(steps, c * steps.astype(float) ** layers, np.ones(len(steps)), law="adam", threshold=threshold)
    assert out.crash is None and out.steps_left is None
    assert out.loglog_slope == pytest.approx(layers, rel=1e-9)
    assert out.threshold_step == pytest.approx((threshold / c) ** (1 / layers), rel=1e-9)
    assert out.threshold_steps_left == pytest.approx(out.threshold_step - 1000, rel=1e-9)
    assert out.soonest() == out.threshold_steps_left


def test_threshold_reached_and_step_zero_and_receding_lines():
    # ||u|| at the threshold already: the crossing is now.
    out = forecast([10, 20, 30], [1.0, 10.0, 100.0], [1.0, 1.0, 1.0], law="adam", threshold=100.0)
    assert out.threshold_step == 30.0 and out.threshold_steps_left == 0.0 and out.within(0)
    # Step 0 has no logarithm: the log-log line is fitted on the later measurements only.
    steps, u = [0, 10, 20, 40], [5.0, 1.0, 3.0, 2.0]
    out = forecast(steps, u, [1.0, 2.0, 3.0, 4.0], law="adam")
    assert out.loglog_slope == pytest.approx(fit_line(np.log([10, 20, 40]), np.log([1.0, 3.0, 2.0]))[0], rel=1e-12)
    assert forecast([0, 10], [1.0, 2.0], [1.0, 1.0]).loglog_slope is None  # one point at t > 0
    # Shrinking TD errors: no crash, no crossing, nothing within any horizon.
    out = forecast(np.arange(100, 200), 5 * np.exp(-np.arange(100, 200) / 50), np.ones(100))
    assert out.crash is None and out.threshold_step is None and out.soonest() is None and not out.within(1e12)


def test_a_fit_below_min_r2_forecasts_nothing():
    rng = np.random.default_rng(0)
    steps = np.arange(300, 481, 10)
    u = diverging(steps, 600.0, 2) * np.exp(rng.normal(0, 0.3, size=steps.shape))
    r2 = predict_crash_step(steps, u).r2
    assert 0 < r2 < 0.99
    assert forecast(steps, u, np.ones(len(steps)), min_r2=0.99).crash is None
    assert forecast(steps, u, np.ones(len(steps)), min_r2=r2).crash is not None


@pytest.mark.parametrize("steps, norms, params, law, match", [
    ([1, 2], [1.0, 2.0], [1.0, 1.0], "rmsprop", "law must be one of"),
    ([1, 2, 3], [1.0, 2.0], [1.0, 1.0], "sgd", "same length"),
    ([1], [1.0], [1.0], "sgd", "length >= 2"),
])
def test_forecast_bad_input_is_named(steps, norms, params, law, match):
    with pytest.raises(ValueError, match=match):
        forecast(steps, norms, params, law=law)


def test_bounds_and_slopes():
    assert bellman_bound(2.0, 0.99) == pytest.approx(200.0)
    assert bellman_bound(0.0, 0.99) is None and bellman_bound(1.0, 1.0) is None and bellman_bound(math.inf, 0.9) is None
    assert adam_slope(1e-3, 10_000) == pytest.approx(0.1)
    assert Forecast(step=5, norm_slope=0.0).soonest() is None


def test_imports_without_lightning():
    """Pure maths: importable where Lightning cannot be imported (and without torch)."""
    code = ("import sys\n"
            "for name in ('lightning', 'lightning.pytorch', 'pytorch_lightning'):\n"
            "    sys.modules[name] = None  # any import of it raises ImportError\n"
            "import lit_qlearn.forecast as f\n"
            "assert f.predict_crash_step([0, 1, 2], [1.0, 2.0, 4.0]).slope < 0\n"
            "assert 'torch' not in sys.modules, 'lit_qlearn.forecast imported torch'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
