"""The measuring core: the probe set, the measurements, their state and the crash
decision, in plain objects that know nothing of a Trainer (docs/design.md sections 4, 5, 9).

A *meter* is given a probe batch once and a module implementing the probe protocol
(:mod:`lit_qlearn.probe`: ``gamma``, ``q_value``, ``greedy_action``, ``q_network``) at
each measurement, and returns the scalars by name::

    meter = SEEMMeter()
    meter.set_probe(probe)                 # a Transitions batch, kept on the CPU
    scalars = meter.measure(agent, step)   # {"seem/max_eig": ..., ...}

The Lightning callbacks (:mod:`lit_qlearn.callbacks`) are adapters over these meters: they
draw the probe from the DataModule or the first batches, keep the cadence, reduce
decisions across ranks, publish and act. A plain training loop uses :class:`Monitor`
and :func:`write`; :class:`ActorCriticProbe` and :class:`DiscreteQProbe` give the
protocol to networks that do not have it.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lit_qlearn.data.types import Transitions
from lit_qlearn.forecast import Forecast, adam_slope, bellman_bound
from lit_qlearn.forecast import forecast as fit_laws
from lit_qlearn.ntk import (METHODS, SOLVERS, DiscreteQ, check_choice, gram_cosine, gram_stats, ntk_gram,
                            parameter_norm, seem)
from lit_qlearn.plasticity import plasticity_metrics
from lit_qlearn.probe import bootstrap_target, check_probe_module
from lit_qlearn.td import check_gamma

__all__ = ["Meter", "NTKMeter", "SEEMMeter", "PlasticityMeter", "CrashMeter", "Monitor", "write", "no_trace",
           "ActorCriticProbe", "DiscreteQProbe", "LAWS"]

LAWS = ("auto", "sgd", "adam")


# ------------------------------------------------------------------ hygiene


def _roots(module: Any) -> list[nn.Module]:
    """The modules whose train/eval modes a measurement sets and restores: the module itself
    when it is an ``nn.Module``, else its ``nn.Module`` attributes and ``q_network()``."""
    if isinstance(module, nn.Module):
        return [module]
    found = [v for v in vars(module).values() if isinstance(v, nn.Module)] if hasattr(module, "__dict__") else []
    return [*found, module.q_network()]


def _device(module: Any) -> torch.device:
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    for p in module.q_network().parameters():
        return p.device
    return torch.device("cpu")


class no_trace:
    """No trace of a measurement in the training run: the random states (and the CUDA one of
    the module's device) are restored, every submodule's train/eval mode too, and the modules
    are in eval mode meanwhile (the NTK engine never writes ``.grad``)."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __enter__(self) -> None:
        device = _device(self.module)
        self.rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        self.rng.__enter__()
        roots = _roots(self.module)
        self.modes = [(m, m.training) for root in roots for m in root.modules()]
        for root in roots:
            root.eval()

    def __exit__(self, *exc: object) -> None:
        for m, mode in self.modes:
            m.training = mode
        self.rng.__exit__(*exc)


# ------------------------------------------------------------------- meters


class Meter:
    """A measurement on a fixed probe set: the probe, the measuring, the state.

    :meth:`measure` checks the module against the probe protocol the first time it sees it
    (on four probe rows), moves the probe to the module's device, measures under
    :class:`no_trace` and returns the scalars. :attr:`reasons` says what the latest
    measurement found wrong (empty: healthy; only :class:`CrashMeter` judges).

    Args:
        method: NTK engine, see :func:`lit_qlearn.ntk.ntk_gram`.
        dtype: dtype of the NTK computation (None: the parameters').
        owner: the name errors and protocol checks are reported under (an adapter passes its own).
    """

    def __init__(self, method: str = "auto", dtype: torch.dtype | None = None, *, owner: str | None = None) -> None:
        self.owner = owner or type(self).__name__
        check_choice(self.owner, "method", method, METHODS)
        self.method = method
        self.dtype = dtype
        self.probe: Transitions | None = None
        self.last_step = -1  # the step of the latest measurement
        self.reasons: list[str] = []
        self._checked: int | None = None  # id() of the module last checked against the protocol

    def set_probe(self, probe: Transitions) -> None:
        """Keep ``probe`` (a detached CPU copy) as the fixed probe set."""
        if not isinstance(probe, Transitions):
            raise TypeError(f"{self.owner}: probe must be a lit_qlearn.data.Transitions batch, got "
                            f"{type(probe).__name__}")
        self.probe = probe.map(lambda t: t.detach().cpu().clone())

    def check(self, module: Any) -> None:
        """Raise :class:`~lit_qlearn.probe.ProbeProtocolError` naming what ``module`` lacks or gets
        wrong, its methods run on four probe rows (without the probe set: the members only)."""
        if self.probe is None:
            check_probe_module(module, self.owner)
            return
        with no_trace(module):
            device = _device(module)
            check_probe_module(module, self.owner, self.probe.map(lambda t: t[:4].to(device)))
        self._checked = id(module)

    def measure(self, module: Any, step: int) -> dict[str, float]:
        """The scalars of ``module`` on the probe set at ``step``."""
        if self.probe is None:
            raise RuntimeError(f"{self.owner}: no probe set; call set_probe(batch) before measure")
        if self._checked != id(module):
            self.check(module)
        device = _device(module)
        probe = self.probe.map(lambda t: t.to(device))
        with no_trace(module):
            metrics = self.compute(module, probe, step)
        self.last_step = step
        return metrics

    def compute(self, module: Any, probe: Transitions, step: int) -> dict[str, float]:
        """The measurement itself, on a probe already on the module's device (no hygiene)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"last_step": self.last_step}
        if self.probe is not None:  # absent optional fields stay absent (Transitions' defaults)
            state["probe"] = {k: v for k, v in self.probe._asdict().items() if v is not None}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict.get("last_step", -1))
        if "probe" in state_dict:
            self.probe = Transitions(**state_dict["probe"])


class NTKMeter(Meter):
    """The critic's empirical NTK Gram ``G = Phi Phi^T`` on the probe ``(obs, act)``, ``(N, N)``.

    Scalars: ``ntk/diag_mean``, ``ntk/offdiag_abs_mean``, ``ntk/row_ratio_mean``,
    ``ntk/cos_prev`` (against the previous measurement's Gram, NaN at the first) and
    ``ntk/cos_first`` (against the first). The latest Gram is :attr:`previous` (CPU).
    """

    def __init__(self, method: str = "auto", dtype: torch.dtype | None = None, *, owner: str | None = None) -> None:
        super().__init__(method, dtype, owner=owner)
        self.previous: Tensor | None = None
        self.first: Tensor | None = None

    def compute(self, module: Any, probe: Transitions, step: int) -> dict[str, float]:
        gram = ntk_gram(module.q_network(), (probe.obs, probe.act), method=self.method, dtype=self.dtype).cpu()
        metrics = {f"ntk/{k}": v for k, v in gram_stats(gram).items()}
        metrics["ntk/cos_prev"] = gram_cosine(gram, self.previous) if self.previous is not None else math.nan
        metrics["ntk/cos_first"] = gram_cosine(gram, self.first) if self.first is not None else math.nan
        self.previous = gram
        if self.first is None:
            self.first = gram
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "previous": self.previous, "first": self.first}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.previous, self.first = state_dict.get("previous"), state_dict.get("first")


class SEEMMeter(Meter):
    """SEEM (docs/design.md section 5.3): the largest real eigenvalue of
    ``A = gamma G(X*, X) - G(X, X)``, ``X = (s, a)``, ``X* = (s', greedy_action(s'))``.

    Scalars: ``seem/max_eig``, ``seem/max_eig_normalized`` (divided by ``||A||_F``),
    ``seem/q_data_mean``, ``seem/q_policy_mean``, ``seem/action_cos_prev`` (the greedy
    actions against the previous measurement's: cosine, or for discrete actions the share
    that agree) and, with ``participation``, ``seem/participation``; the top eigenvector
    is :attr:`eigenvector` ``(N,)`` and, with ``spectrum``, every eigenvalue :attr:`eigenvalues`.

    Args:
        method, dtype: see :class:`Meter`.
        scale_by_params: divide the Gram by the parameter count P, as the authors do.
        solver: eigen-solver, ``"auto"``, ``"arnoldi"`` or ``"dense"``.
        tol: relative residual at which the Arnoldi eigenvalue is accepted.
        spectrum: also keep every eigenvalue (dense solver, slower).
        participation: compute the top eigenvector and its participation.
    """

    def __init__(self, method: str = "auto", dtype: torch.dtype | None = None, scale_by_params: bool = True,
                 solver: str = "auto", tol: float = 1e-4, spectrum: bool = False, participation: bool = True, *,
                 owner: str | None = None) -> None:
        super().__init__(method, dtype, owner=owner)
        check_choice(self.owner, "solver", solver, SOLVERS)
        self.scale_by_params = scale_by_params
        self.solver = solver
        self.tol = tol
        self.spectrum = spectrum
        self.participation = participation
        self.previous_actions: Tensor | None = None
        self.eigenvector: Tensor | None = None
        self.eigenvalues: Tensor | None = None

    def compute(self, module: Any, probe: Transitions, step: int) -> dict[str, float]:
        with torch.no_grad():
            next_act = module.greedy_action(probe.next_obs)
            q_data = module.q_value(probe.obs, probe.act).mean().item()
            q_policy = module.q_value(probe.next_obs, next_act).mean().item()
        result = seem(module.q_network(), (probe.obs, probe.act), (probe.next_obs, next_act), module.gamma,
                      scale_by_params=self.scale_by_params, method=self.method, dtype=self.dtype,
                      solver=self.solver, tol=self.tol, return_spectrum=self.spectrum,
                      return_vector=self.participation)
        actions = next_act.detach().cpu()
        metrics = {
            "seem/max_eig": result.value,
            "seem/max_eig_normalized": result.normalized,
            "seem/q_data_mean": q_data,
            "seem/q_policy_mean": q_policy,
            "seem/action_cos_prev": _action_similarity(actions, self.previous_actions),
        }
        self.previous_actions = actions
        if result.eigenvector is not None:
            metrics["seem/participation"] = result.participation
            self.eigenvector = result.eigenvector.detach().cpu()
        self.eigenvalues = None if result.eigenvalues is None else result.eigenvalues.detach().cpu()
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "previous_actions": self.previous_actions}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.previous_actions = state_dict.get("previous_actions")


class PlasticityMeter(Meter):
    """Dormant units, feature rank, weight norm and pre-activation statistics of
    ``q_network()`` on the probe ``(obs, act)`` (:func:`lit_qlearn.plasticity.plasticity_metrics`),
    as ``plasticity/*``.

    Args:
        tau: dormancy threshold on the normalised score.
        delta: the share of the singular value sum the effective rank may leave out.
    """

    def __init__(self, tau: float = 0.025, delta: float = 0.01, *, owner: str | None = None) -> None:
        super().__init__(owner=owner)
        if not tau >= 0:
            raise ValueError(f"{self.owner}: tau must be >= 0, got {tau!r}")
        if not 0 <= delta < 1:
            raise ValueError(f"{self.owner}: delta must be in [0, 1), got {delta!r}")
        self.tau = float(tau)
        self.delta = float(delta)

    def compute(self, module: Any, probe: Transitions, step: int) -> dict[str, float]:
        metrics = plasticity_metrics(module.q_network(), (probe.obs, probe.act), tau=self.tau, delta=self.delta)
        return {f"plasticity/{k}": v for k, v in metrics.items()}


class CrashMeter(Meter):
    """The crash laws' quantities on the probe set, their forecasts, and whether the critic
    is healthy (docs/design.md sections 5.4, 5.8).

    Each measurement computes ``u = Q(X) - (r + gamma (1 - d) Q(X*))`` and ``||theta||`` of
    ``q_network()``, keeps ``(step, ||u||, ||theta||)`` in a window of ``window``
    measurements (:attr:`history`) and fits the laws on it (:func:`lit_qlearn.forecast.forecast`).
    Scalars: ``crash/td_error_norm``, ``params/norm``, ``params/adam_slope`` (when an Adam-like
    optimiser holds the critic), ``params/norm_slope``, ``crash/predicted_step``,
    ``crash/steps_left``, ``crash/fit_r2``, ``crash/loglog_slope``, ``crash/threshold_step``,
    ``crash/threshold_steps_left`` (when the fits give them) and ``crash/q_bound_ratio``
    (the largest ``|Q|`` over ``X`` and ``X*`` divided by the Bellman bound).

    **The decision.** :attr:`reasons` lists why the latest measurement is unhealthy (empty:
    healthy): the earliest forecast is at most ``horizon`` steps away, ``|Q|`` exceeds the
    bound, or the critic is non-finite on the probe set. What to do about it is the caller's.

    Args:
        window: measurements the laws are fitted on (>= 2).
        min_points: fewest measurements a forecast is made from.
        num_layers: L of the crash law; None counts the ``nn.Linear`` layers of ``q_network()``.
        min_r2: fits with a lower R^2 make no forecast.
        threshold: the ``||u||`` that counts as diverged for the threshold forecast.
        horizon: unhealthy when a forecast is at most this many steps away; None: ten
            times the gap between the window's last two measurements.
        restart_on_action_change: restart the window when the greedy actions move by more
            than ``action_rtol`` (relative L2 change; any change of a discrete action).
        law: ``"auto"`` (``"adam"`` when :meth:`setup` is given an Adam-like optimiser holding
            the critic, else ``"sgd"``), ``"sgd"`` or ``"adam"``.
        q_bound: the largest possible ``|Q|`` (default ``max|r| / (1 - gamma)`` over the
            rewards given to :meth:`setup`, else the probe set's); ``math.inf`` disables it.
    """

    def __init__(self, window: int = 20, min_points: int = 5, num_layers: int | None = None, min_r2: float = 0.9,
                 threshold: float = 1e6, horizon: int | None = None, restart_on_action_change: bool = True,
                 action_rtol: float = 1e-2, law: str = "auto", q_bound: float | None = None, *,
                 owner: str | None = None) -> None:
        super().__init__(owner=owner)
        who = self.owner
        check_choice(who, "law", law, LAWS)
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"{who}: window must be an integer >= 2, got {window!r}")
        if isinstance(min_points, bool) or not isinstance(min_points, int) or not 2 <= min_points <= window:
            raise ValueError(f"{who}: min_points must be an integer in [2, window={window}], got {min_points!r}")
        if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int)
                                       or num_layers < 2):
            raise ValueError(f"{who}: num_layers must be an integer >= 2 or None, got {num_layers!r}")
        if not threshold > 0:
            raise ValueError(f"{who}: threshold must be > 0, got {threshold!r}")
        if horizon is not None and horizon < 0:
            raise ValueError(f"{who}: horizon must be >= 0 or None, got {horizon!r}")
        if q_bound is not None and not q_bound > 0:
            raise ValueError(f"{who}: q_bound must be > 0 (math.inf disables it) or None, got {q_bound!r}")
        self.window = window
        self.min_points = min_points
        self.num_layers = num_layers
        self.min_r2 = float(min_r2)
        self.threshold = float(threshold)
        self.horizon = None if horizon is None else int(horizon)
        self.restart_on_action_change = restart_on_action_change
        self.action_rtol = float(action_rtol)
        self.law = law
        self.q_bound = None if q_bound is None else float(q_bound)
        # State (checkpointed): (step, ||u||, ||theta||) of the current window, the greedy
        # actions of the previous measurement, the last forecast's crash/* scalars.
        self.history: list[tuple[int, float, float]] = []
        self.previous_actions: Tensor | None = None
        self.forecast: dict[str, float] = {}
        # Resolved by setup() and at the first measurement after it (None: no bound).
        self.bound: float | None = None
        self.max_abs_reward: float | None = None
        self.adam_slope: float | None = None
        self._law = law
        self._layers: int | None = num_layers
        self._bound_resolved = False
        self._set_up = False
        self.outlook: Forecast | None = None  # the laws' forecast at the latest measurement

    def setup(self, module: Any, optimizers: Iterable[torch.optim.Optimizer] = (),
              rewards: Tensor | None = None) -> None:
        """Resolve what depends on the run: L (counted in ``q_network()`` unless given), the
        Adam reference ``eta sqrt(P)`` and the law from ``optimizers``, and ``max|r|`` from
        ``rewards`` (the data's; None: the probe set's). The bound is set at the next measurement."""
        network = module.q_network()
        if self.num_layers is None:
            self._layers = sum(isinstance(m, nn.Linear) for m in network.modules())
            if self._layers < 2:
                raise ValueError(
                    f"{self.owner}: q_network() of {type(module).__name__} has {self._layers} nn.Linear "
                    "layer(s); the crash law needs L >= 2: pass num_layers= explicitly"
                )
        self.adam_slope = self.adam_reference(optimizers, network)
        if self.law == "auto":
            self._law = "sgd" if self.adam_slope is None else "adam"
        self.max_abs_reward = None
        if isinstance(rewards, Tensor) and rewards.numel() > 0:
            self.max_abs_reward = float(rewards.abs().max())
        self._bound_resolved = False
        self._set_up = True

    @staticmethod
    def adam_reference(optimizers: Iterable[torch.optim.Optimizer], network: nn.Module) -> float | None:
        """eta sqrt(P) for the optimiser holding the critic's parameters, if it is Adam-like."""
        params = [p for p in network.parameters() if p.requires_grad]
        if not params:
            return None
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                if any(p is params[0] for p in group["params"]) and "betas" in group:
                    return adam_slope(group["lr"], sum(p.numel() for p in params))
        return None

    def resolve_bound(self, gamma: float, max_abs_reward: float) -> float | None:
        """``q_bound``, else ``max|r| / (1 - gamma)``; None when that is 0 or infinite (no information)."""
        if self.q_bound is not None:
            return self.q_bound if math.isfinite(self.q_bound) else None
        return bellman_bound(max_abs_reward, float(gamma))

    def bound_for(self, gamma: float, probe: Transitions) -> float | None:
        """:meth:`resolve_bound` with ``max|r|`` of the data's rewards given to :meth:`setup`,
        else of the probe set's."""
        scale = self.max_abs_reward if self.max_abs_reward is not None else float(probe.rew.abs().max())
        return self.resolve_bound(gamma, scale)

    def compute(self, module: Any, probe: Transitions, step: int) -> dict[str, float]:
        if not self._set_up:  # no setup(): L from the network, the law from no optimiser
            self.setup(module)
        if not self._bound_resolved:
            self.bound, self._bound_resolved = self.bound_for(module.gamma, probe), True
        with torch.no_grad():
            next_act = module.greedy_action(probe.next_obs)
            q, q_next = module.q_value(probe.obs, probe.act), module.q_value(probe.next_obs, next_act)
            u = q - bootstrap_target(module, probe, next_act)
            u_norm = torch.linalg.vector_norm(u.double()).item()
            q_max = torch.maximum(q.abs().max(), q_next.abs().max()).item()
            params = [p for p in module.q_network().parameters() if p.requires_grad]
            p_norm = parameter_norm(params, torch.float64).item()
        metrics: dict[str, float] = {}
        reasons: list[str] = []
        if math.isfinite(u_norm) and math.isfinite(p_norm) and math.isfinite(q_max):
            metrics = self.record(step, u_norm, p_norm, next_act.detach().cpu())
            horizon = self._horizon()
            if self.outlook is not None and horizon is not None and self.outlook.within(horizon):
                left = self.outlook.soonest()
                reasons.append(f"the critic is forecast to diverge at step {step + left:.0f} "
                               f"({left:.0f} steps from now; ||u|| = {u_norm:.3g})")
            if self.bound is not None:
                metrics["crash/q_bound_ratio"] = q_max / self.bound
                if q_max > self.bound:
                    source = "q_bound" if self.q_bound is not None else "the Bellman bound max|r|/(1-gamma)"
                    reasons.append(f"max |Q| on the probe set is {q_max:.4g}, beyond {source} = {self.bound:.4g}")
        else:  # the crash has happened: nothing finite to fit
            reasons.append("the critic is non-finite on the probe set")
        self.reasons = reasons
        return metrics

    def _horizon(self) -> float | None:
        if self.horizon is not None:
            return self.horizon
        if len(self.history) < 2:
            return None
        return 10 * (self.history[-1][0] - self.history[-2][0])

    @property
    def healthy(self) -> bool:
        """Whether the latest measurement found nothing wrong (:attr:`reasons` is empty)."""
        return not self.reasons

    def record(self, step: int, u_norm: float, p_norm: float, actions: Tensor) -> dict[str, float]:
        """Append a measurement to the window and fit the laws on it; return the scalars.
        The forecast is :attr:`outlook` (None: fewer than ``min_points`` measurements)."""
        if self.restart_on_action_change and _actions_moved(actions, self.previous_actions, self.action_rtol):
            # A new segment starts: keep the last (min_points - 1) measurements plus this one at most.
            self.history = self.history[-(self.min_points - 1):] if self.min_points > 1 else []
        self.previous_actions = actions
        self.history.append((step, u_norm, p_norm))
        self.history = self.history[-self.window:]
        metrics = {"crash/td_error_norm": u_norm, "params/norm": p_norm}
        if self.adam_slope is not None:
            metrics["params/adam_slope"] = self.adam_slope
        self.outlook = None
        if len(self.history) >= self.min_points:
            steps, u, p = zip(*self.history)
            self.outlook = fit_laws(steps, u, p, law=self._law, num_layers=self._layers, min_r2=self.min_r2,
                                    threshold=self.threshold)
            metrics.update(_forecast_metrics(self.outlook))
        self.forecast = {k: v for k, v in metrics.items() if k.startswith("crash/") and k != "crash/td_error_norm"}
        return metrics

    def restart(self) -> None:
        """Forget the window (after a rollback: its measurements describe a trajectory undone)."""
        self.history, self.previous_actions, self.forecast, self.outlook = [], None, {}, None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": list(self.history), "previous_actions": self.previous_actions,
                "forecast": dict(self.forecast)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = [tuple(h) for h in state_dict.get("history", [])]
        self.previous_actions = state_dict.get("previous_actions")
        self.forecast = dict(state_dict.get("forecast", {}))


# -------------------------------------------------------------- plain loops


class Monitor:
    """Several meters on one probe set, for a training loop of one's own.

    Args:
        meters: the meters (each measures what its class says).
        probe: the fixed probe set, a :class:`~lit_qlearn.data.Transitions` batch (kept on the CPU).
    """

    def __init__(self, meters: Sequence[Meter], probe: Transitions) -> None:
        meters = list(meters)
        if not meters or not all(isinstance(m, Meter) for m in meters):
            raise TypeError("Monitor: meters must be a non-empty list of lit_qlearn.monitoring meters, got "
                            f"{[type(m).__name__ for m in meters]}")
        self.meters = meters
        for meter in meters:
            meter.set_probe(probe)

    def measure(self, module: Any, step: int) -> dict[str, float]:
        """Every meter's scalars of ``module`` at ``step``, in one dict."""
        scalars: dict[str, float] = {}
        for meter in self.meters:
            scalars.update(meter.measure(module, step))
        return scalars

    @property
    def reasons(self) -> list[str]:
        """Why the latest measurement is unhealthy, every meter's (empty: healthy)."""
        return [r for meter in self.meters for r in meter.reasons]

    def state_dict(self) -> dict[str, Any]:
        return {str(i): meter.state_dict() for i, meter in enumerate(self.meters)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for i, meter in enumerate(self.meters):
            meter.load_state_dict(state_dict[str(i)])


def write(writer: Any, scalars: dict[str, float], step: int) -> None:
    """``writer.add_scalar(name, value, step)`` for every finite scalar (a
    ``torch.utils.tensorboard.SummaryWriter`` or anything with that method); NaNs
    (nothing to compare with yet, no forecast) are left out."""
    for name, value in scalars.items():
        if not math.isnan(float(value)):
            writer.add_scalar(name, float(value), step)


class _ScalarQ(nn.Module):
    """``critic(obs, act)`` as one scalar per sample, ``(N,)``."""

    def __init__(self, critic: nn.Module) -> None:
        super().__init__()
        self.critic = critic

    def forward(self, obs: Tensor, act: Tensor) -> Tensor:
        return self.critic(obs, act).reshape(obs.shape[0])


class ActorCriticProbe:
    """The probe protocol for a deterministic actor and a critic of one's own.

    Args:
        critic: ``critic(obs, act) -> (N,)`` or ``(N, 1)``, the critic under study.
        actor: ``actor(obs) -> (N, da)``, the action the bootstrap target uses (for a
            stochastic actor pass its mean action).
        gamma: the discount, in [0, 1).
        critics: every critic member (twins), for ``q_networks()``; default ``[critic]``.
    """

    def __init__(self, critic: nn.Module, actor: nn.Module, gamma: float,
                 critics: Sequence[nn.Module] | None = None) -> None:
        for name, value in (("critic", critic), ("actor", actor)):
            if not isinstance(value, nn.Module):
                raise TypeError(f"ActorCriticProbe: {name} must be an nn.Module, got {type(value).__name__}")
        check_gamma("ActorCriticProbe", gamma)
        self.critic, self.actor, self.gamma = critic, actor, float(gamma)
        self._q = _ScalarQ(critic)
        self._members = [_ScalarQ(c) for c in critics] if critics is not None else [self._q]

    def q_network(self) -> nn.Module:
        return self._q

    def q_networks(self) -> list[nn.Module]:
        return list(self._members)

    def q_value(self, obs: Tensor, act: Tensor) -> Tensor:
        return self._q(obs, act)

    def greedy_action(self, obs: Tensor) -> Tensor:
        return self.actor(obs)


class DiscreteQProbe:
    """The probe protocol for a discrete-action Q-network ``q_net(obs) -> (N, num_actions)``:
    ``Q(s, a)`` is the gathered output (:class:`lit_qlearn.ntk.DiscreteQ`), the greedy action its argmax.

    Args:
        q_net: the Q-network under study.
        gamma: the discount, in [0, 1).
    """

    def __init__(self, q_net: nn.Module, gamma: float) -> None:
        if not isinstance(q_net, nn.Module):
            raise TypeError(f"DiscreteQProbe: q_net must be an nn.Module, got {type(q_net).__name__}")
        check_gamma("DiscreteQProbe", gamma)
        self.q_net, self.gamma = q_net, float(gamma)
        self._q = DiscreteQ(q_net)

    def q_network(self) -> nn.Module:
        return self._q

    def q_value(self, obs: Tensor, act: Tensor) -> Tensor:
        return self._q(obs, act)

    def greedy_action(self, obs: Tensor) -> Tensor:
        return self.q_net(obs).argmax(dim=1)


# ---------------------------------------------------------------- helpers


def _action_similarity(actions: Tensor, previous: Tensor | None) -> float:
    if previous is None:
        return math.nan
    if not actions.is_floating_point():  # discrete: share of probe states whose greedy action is unchanged
        return (actions == previous).double().mean().item()
    a, b = actions.double().flatten(), previous.double().flatten()
    denom = torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)
    return (a @ b / denom).item() if denom > 0 else math.nan


def _actions_moved(actions: Tensor, previous: Tensor | None, rtol: float) -> bool:
    if previous is None:
        return False
    if not actions.is_floating_point():
        return bool((actions != previous).any())
    change = torch.linalg.vector_norm((actions - previous).double())
    return bool(change > rtol * torch.linalg.vector_norm(previous.double()).clamp_min(1e-12))


def _forecast_metrics(outlook: Forecast) -> dict[str, float]:
    """The ``crash/*`` and ``params/norm_slope`` scalars of a forecast (absent: no forecast)."""
    metrics = {"params/norm_slope": outlook.norm_slope}
    if outlook.crash is not None:
        metrics.update({"crash/predicted_step": outlook.crash.step, "crash/steps_left": outlook.steps_left,
                        "crash/fit_r2": outlook.crash.r2})
    if outlook.loglog_slope is not None:
        metrics["crash/loglog_slope"] = outlook.loglog_slope
    if outlook.threshold_step is not None:
        metrics.update({"crash/threshold_step": outlook.threshold_step,
                        "crash/threshold_steps_left": outlook.threshold_steps_left})
    return metrics
