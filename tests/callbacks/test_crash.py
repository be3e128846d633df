import numpy as np
import pytest

from lit_qlearn.callbacks import predict_crash_step


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
