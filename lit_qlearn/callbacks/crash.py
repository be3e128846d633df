"""Crash prediction (Yue et al. 2023, Theorems 3-4; DESIGN.md section 5.4).

After the critical step, SGD on an L-layer ReLU critic gives
||u_t|| = O((1 - C lambda eta t)^(-L/(2L-2))), so ||u_t||^(-(2L-2)/L) falls
linearly in t and reaches zero at the crash step T = 1/(C lambda eta).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lit_qlearn.callbacks.monitors import ProbeCallback
from lit_qlearn.data.types import Transitions
from lit_qlearn.ntk import check_choice, parameter_norm
from lit_qlearn.probe import bootstrap_target, critic_members

__all__ = ["CrashFit", "CrashPredictor", "predict_crash_step"]


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
    slope, intercept, r2 = _line(t, u**exponent)
    step = float(-intercept / slope) if slope < 0 else None
    return CrashFit(step=step, slope=float(slope), intercept=float(intercept), r2=r2, exponent=exponent)


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares ``y = slope * x + intercept``; returns ``(slope, intercept, r2)``."""
    slope, intercept = np.polyfit(x, y, 1)
    total = np.sum((y - y.mean()) ** 2)
    r2 = 1.0 - float(np.sum((y - (slope * x + intercept)) ** 2) / total) if total > 0 else 0.0
    return float(slope), float(intercept), r2


ACTIONS = ("warn", "stop", "checkpoint_and_stop")
LAWS = ("auto", "sgd", "adam")


class CrashPredictor(ProbeCallback):
    """Forecast the step at which the critic diverges, and act before it does.

    Every ``every_n_steps`` steps the TD-error vector ``u = Q(X) - (r + gamma (1 - d)
    Q(X*))`` is computed on the fixed probe set (``X* = (s', greedy_action(s'))``, the
    probe protocol), and ``||u||`` is kept in a sliding window of ``window``
    measurements. Two laws of Yue et al. (2023, DESIGN.md 5.4) are fitted on it:

    * **SGD**: ``||u||^(-(2L-2)/L)`` falls linearly and reaches zero at the crash step
      (:func:`predict_crash_step`). Logged: ``crash/predicted_step``,
      ``crash/steps_left`` and ``crash/fit_r2``, when the line falls with R^2 >=
      ``min_r2``. Not under the Adam law, where this line keeps receding.
    * **Adam**: no finite crash time; ``||u|| = Theta(t^L)`` and ``||theta||`` grows by
      ``eta sqrt(P)`` per step. Logged (under both laws): ``crash/loglog_slope``
      (slope of log ||u|| against log t, compare with L), ``params/norm``,
      ``params/norm_slope`` (compare with ``params/adam_slope`` = eta sqrt(P) when the
      critic's optimiser has betas), and, extrapolating the log-log line,
      ``crash/threshold_step`` and ``crash/threshold_steps_left``: when ``||u||``
      will cross ``threshold``.

    ``law="auto"`` takes the Adam law when the optimiser holding the critic's
    parameters has ``betas`` (Adam, AdamW, ...), else the SGD law.

    ``crash/td_error_norm`` is logged at every measurement.

    The theorem holds after the *critical step*, when the greedy actions stop
    changing; with ``restart_on_action_change`` the window restarts after every
    measurement at which the greedy actions on the probe set moved by more than
    ``action_rtol`` (relative L2 change; any change of a discrete action counts),
    keeping at least ``min_points`` measurements.

    When the earliest forecast (crash step, or threshold crossing) is at most
    ``horizon`` steps away, ``action`` happens once:

    * ``"warn"``: a warning with the forecast;
    * ``"stop"``: the Trainer stops after this step;
    * ``"checkpoint_and_stop"``: a checkpoint ``crash-forecast-step=<step>.ckpt`` is
      written to ``dirpath`` (default ``<log_dir>/checkpoints``) and the Trainer stops.
      It is written only when every parameter, buffer and optimiser state is finite;
      its path is :attr:`checkpoint_path`.

    With ``"stop"`` and ``"checkpoint_and_stop"``, training also stops (and nothing is
    written) when the critic turns non-finite before a forecast: at the next
    measurement, or, with ``guard=True``, at once: the critic's parameters (those of
    ``q_networks()``, else ``q_network()``: where a divergence starts) are then
    checked after every step with one fused norm (non-finite, or so large that the
    norm overflows). That check reads the critic's weights once per step, about 2.5%
    of a TD3+BC update at batch 256 on CPU (benchmarks/crash_prediction.py) and one
    synchronisation per step on a GPU, hence off by default. The checkpoint itself is
    written only when every parameter, buffer and optimiser state of the module is
    finite.

    Under DDP every rank measures the same probe set with the same parameters, so
    all ranks take the same decision at the same step.

    Args:
        every_n_steps / probe_size / probe_seed / probe_source: see :class:`ProbeCallback`.
        window: measurements the laws are fitted on (>= 2).
        min_points: fewest measurements a forecast is made from.
        num_layers: L of the crash law; ``None`` counts the ``nn.Linear`` layers of
            ``q_network()``.
        min_r2: fits with a lower R^2 make no forecast.
        threshold: the ``||u||`` that counts as diverged for the threshold forecast
            (1e6, the paper's divergence threshold).
        action: ``"warn"``, ``"stop"`` or ``"checkpoint_and_stop"``.
        horizon: act when the forecast is at most this many steps away
            (default ``10 * every_n_steps``).
        restart_on_action_change / action_rtol: see above.
        dirpath: where ``"checkpoint_and_stop"`` writes.
        guard: also check the critic's parameters for finiteness after every step
            (see above).
        law: ``"auto"``, ``"sgd"`` or ``"adam"`` (see above).
    """

    def __init__(self, every_n_steps: int = 100, probe_size: int = 2560, probe_seed: int = 0,
                 probe_source: str = "datamodule", window: int = 20, min_points: int = 5,
                 num_layers: int | None = None, min_r2: float = 0.9, threshold: float = 1e6,
                 action: str = "warn", horizon: int | None = None, restart_on_action_change: bool = True,
                 action_rtol: float = 1e-2, dirpath: str | os.PathLike | None = None, law: str = "auto",
                 guard: bool = False) -> None:
        super().__init__(every_n_steps, probe_size, probe_seed, probe_source)
        check_choice("CrashPredictor", "action", action, ACTIONS)
        check_choice("CrashPredictor", "law", law, LAWS)
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"CrashPredictor: window must be an integer >= 2, got {window!r}")
        if isinstance(min_points, bool) or not isinstance(min_points, int) or not 2 <= min_points <= window:
            raise ValueError(f"CrashPredictor: min_points must be an integer in [2, window={window}], got {min_points!r}")
        if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int)
                                       or num_layers < 2):
            raise ValueError(f"CrashPredictor: num_layers must be an integer >= 2 or None, got {num_layers!r}")
        if not threshold > 0:
            raise ValueError(f"CrashPredictor: threshold must be > 0, got {threshold!r}")
        if horizon is not None and horizon < 0:
            raise ValueError(f"CrashPredictor: horizon must be >= 0 or None, got {horizon!r}")
        self.window = window
        self.min_points = min_points
        self.num_layers = num_layers
        self.min_r2 = float(min_r2)
        self.threshold = float(threshold)
        self.action = action
        self.horizon = 10 * every_n_steps if horizon is None else int(horizon)
        self.restart_on_action_change = restart_on_action_change
        self.action_rtol = float(action_rtol)
        self.dirpath = dirpath
        self.law = law
        self.guard = bool(guard)
        self._law = law
        self._layers: int | None = num_layers
        # State (checkpointed): (step, ||u||, ||theta||) of the current window, the
        # greedy actions of the previous measurement, the last forecast.
        self.history: list[tuple[int, float, float]] = []
        self.previous_actions: Tensor | None = None
        self.forecast: dict[str, float] = {}
        self.fired = False
        self.checkpoint_path: str | None = None
        self._adam_slope: float | None = None
        self._guarded: list[Tensor] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, probe_size=self.probe_size,
                                        window=self.window)

    # --------------------------------------------------------------- set-up
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        network = pl_module.q_network()
        if self.num_layers is None:
            self._layers = sum(isinstance(m, nn.Linear) for m in network.modules())
            if self._layers < 2:
                raise ValueError(
                    f"CrashPredictor: q_network() of {type(pl_module).__name__} has {self._layers} nn.Linear "
                    "layer(s); the crash law needs L >= 2: pass num_layers= explicitly"
                )
        self._adam_slope = self._adam_reference(trainer, network)
        self._guarded = [p for net in critic_members(pl_module) for p in net.parameters()]
        if self.law == "auto":
            self._law = "sgd" if self._adam_slope is None else "adam"

    @staticmethod
    def _adam_reference(trainer: Trainer, network: nn.Module) -> float | None:
        """eta sqrt(P) for the optimiser holding the critic's parameters, if it is Adam-like."""
        params = [p for p in network.parameters() if p.requires_grad]
        if not params:
            return None
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                if any(p is params[0] for p in group["params"]) and "betas" in group:
                    return float(group["lr"]) * math.sqrt(sum(p.numel() for p in params))
        return None

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._guarded = []  # no references to the module's parameters outlive the run
        super().teardown(trainer, pl_module, stage)

    # ------------------------------------------------------------ measuring
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.guard and self.action != "warn" and not trainer.should_stop and not _all_finite(self._guarded):
            self._stop_non_finite(trainer)
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _stop_non_finite(self, trainer: Trainer) -> None:
        rank_zero_warn(
            f"CrashPredictor: the critic became non-finite by step {trainer.global_step}, before a crash was "
            "forecast; training stops" + (" and no checkpoint is written" if self.action != "stop" else "")
        )
        trainer.should_stop = True

    def measure(self, trainer: Trainer, pl_module: LightningModule, probe: Transitions) -> dict[str, float]:
        step = trainer.global_step
        with torch.no_grad():
            next_act = pl_module.greedy_action(probe.next_obs)
            u = pl_module.q_value(probe.obs, probe.act) - bootstrap_target(pl_module, probe, next_act)
            u_norm = torch.linalg.vector_norm(u.double()).item()
            params = [p for p in pl_module.q_network().parameters() if p.requires_grad]
            p_norm = parameter_norm(params, torch.float64).item()
        if not (math.isfinite(u_norm) and math.isfinite(p_norm)):  # the crash has happened: nothing finite to fit
            if self.action != "warn" and not trainer.should_stop:
                self._stop_non_finite(trainer)
            return {}
        actions = next_act.detach().cpu()
        if self.restart_on_action_change and _actions_moved(actions, self.previous_actions, self.action_rtol):
            # A new segment starts: keep the last (min_points - 1) measurements plus this one at most.
            self.history = self.history[-(self.min_points - 1):] if self.min_points > 1 else []
        self.previous_actions = actions
        self.history.append((step, u_norm, p_norm))
        self.history = self.history[-self.window:]
        metrics = {"crash/td_error_norm": u_norm, "params/norm": p_norm}
        if self._adam_slope is not None:
            metrics["params/adam_slope"] = self._adam_slope
        metrics.update(self._fit(step, u_norm))
        self.forecast = {k: v for k, v in metrics.items() if k.startswith("crash/") and k != "crash/td_error_norm"}
        self._act(trainer, pl_module, step, metrics)
        return metrics

    def _fit(self, step: int, u_norm: float) -> dict[str, float]:
        if len(self.history) < self.min_points:
            return {}
        steps, u, p = (np.array(col, dtype=np.float64) for col in zip(*self.history))
        metrics: dict[str, float] = {"params/norm_slope": _line(steps, p)[0]}
        fit = predict_crash_step(steps, u, self._layers) if self._law == "sgd" else None
        if fit is not None and fit.step is not None and fit.r2 >= self.min_r2:
            metrics.update({"crash/predicted_step": fit.step, "crash/steps_left": fit.step - step,
                            "crash/fit_r2": fit.r2})
        positive = steps > 0
        if positive.sum() >= 2:
            slope, intercept, r2 = _line(np.log(steps[positive]), np.log(u[positive]))
            metrics["crash/loglog_slope"] = slope
            if u_norm >= self.threshold:
                metrics.update({"crash/threshold_step": float(step), "crash/threshold_steps_left": 0.0})
            elif slope > 0 and r2 >= self.min_r2:
                crossing = math.exp(min((math.log(self.threshold) - intercept) / slope, 700.0))
                metrics.update({"crash/threshold_step": crossing, "crash/threshold_steps_left": crossing - step})
        return metrics

    # ------------------------------------------------------------ acting
    def _act(self, trainer: Trainer, pl_module: LightningModule, step: int, metrics: dict[str, float]) -> None:
        left = [metrics[k] for k in ("crash/steps_left", "crash/threshold_steps_left") if k in metrics]
        if self.fired or not left or min(left) > self.horizon:
            return
        self.fired = True
        when = step + min(left)
        message = (f"CrashPredictor: the critic is forecast to diverge at step {when:.0f} "
                   f"({min(left):.0f} steps from step {step}; ||u|| = {metrics['crash/td_error_norm']:.3g})")
        if self.action == "warn":
            rank_zero_warn(message)
            return
        if self.action == "checkpoint_and_stop":
            if _all_finite(_checkpoint_tensors(trainer, pl_module)):
                directory = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints")
                path = directory / f"crash-forecast-step={step}.ckpt"
                trainer.save_checkpoint(path)
                self.checkpoint_path = str(path)
                message += f"; checkpoint written to {path}"
            else:
                message += "; the weights are already non-finite, no checkpoint is written"
        rank_zero_warn(message + "; training stops")
        trainer.should_stop = True

    # --------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": list(self.history), "previous_actions": self.previous_actions,
                "forecast": dict(self.forecast), "fired": self.fired, "checkpoint_path": self.checkpoint_path}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = [tuple(h) for h in state_dict.get("history", [])]
        self.previous_actions = state_dict.get("previous_actions")
        self.forecast = dict(state_dict.get("forecast", {}))
        self.fired = bool(state_dict.get("fired", False))
        self.checkpoint_path = state_dict.get("checkpoint_path")


def _actions_moved(actions: Tensor, previous: Tensor | None, rtol: float) -> bool:
    if previous is None:
        return False
    if not actions.is_floating_point():
        return bool((actions != previous).any())
    change = torch.linalg.vector_norm((actions - previous).double())
    return bool(change > rtol * torch.linalg.vector_norm(previous.double()).clamp_min(1e-12))


def _all_finite(tensors: Iterable[Tensor]) -> bool:
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel() > 0]
    return not floats or bool(parameter_norm(floats, torch.float64).isfinite())


def _checkpoint_tensors(trainer: Trainer, pl_module: LightningModule) -> list[Tensor]:
    tensors = list(pl_module.state_dict().values())
    for optimizer in trainer.optimizers:
        for state in optimizer.state.values():
            tensors.extend(v for v in state.values() if isinstance(v, Tensor))
    return tensors
