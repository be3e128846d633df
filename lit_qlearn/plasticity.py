"""Plasticity statistics of a network — pure tensor maths (torch only, no Lightning).

* **Dormant units** (Sokar et al. 2023, Eq. 1): for hidden layer l with H units and
  inputs D, unit i's score is ``s_i = E_{x in D} |h_i(x)| / ((1/H) sum_k E_{x in D} |h_k(x)|)``;
  the unit is tau-dormant when ``s_i <= tau``. The hidden units are the outputs of the
  model's activation modules (:data:`ACTIVATION_TYPES`).
* **Effective rank** (Kumar et al. 2021, "implicit under-parameterisation"): with
  singular values ``sigma_1 >= ... >= sigma_d`` of a ``(N, d)`` feature matrix,
  ``srank_delta = min{k : sum_{i<=k} sigma_i / sum_i sigma_i >= 1 - delta}``.
* **Penultimate features**: the input of the model's last ``nn.Linear`` call (the
  features the Q head reads).
* **Weight norm**: ``||theta||_2`` over all trainable parameters (weights and biases).
* **Pre-activation statistics**: per activation module, the mean and standard
  deviation (population, over all samples and units) of its input — the drift of
  the pre-activation distribution that Lyle et al. (2024) tie to plasticity loss.

Every measurement runs the model once, in eval mode (every submodule's mode is
restored), under ``torch.no_grad`` with the RNG state restored afterwards: no
``.grad`` is written and no random number is consumed. ``model(*inputs)`` is the
calling convention (a critic ``(obs, act) -> (N,)``); a single tensor is ``model(x)``.
Units are the last dimension of ``(N, d)`` outputs and the channel dimension (1) of
larger ones (``(N, C, ...)``, averaged over the rest).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lit_qlearn.networks import ACTIVATIONS, training_mode
from lit_qlearn.ntk import Inputs, _as_tuple, parameter_norm

__all__ = [
    "ACTIVATION_TYPES",
    "Activations",
    "record_activations",
    "dormant_scores",
    "dormant_fraction",
    "effective_rank",
    "penultimate_features",
    "weight_norm",
    "preactivation_stats",
    "plasticity_metrics",
]

#: Modules whose outputs are hidden units: the package's activations plus torch's common ones.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = tuple(dict.fromkeys((
    *ACTIVATIONS.values(), nn.LeakyReLU, nn.PReLU, nn.GELU, nn.SiLU, nn.SELU, nn.CELU, nn.Sigmoid,
    nn.Softplus, nn.Hardtanh, nn.ReLU6, nn.Hardswish,
)))


@dataclass
class Activations:
    """What one recorded forward pass saw.

    ``pre`` / ``post``: per hidden activation module (qualified name from
    ``named_modules``, in call order), its input and output, each ``(N, ...)``;
    ``penultimate``: the input of the last ``nn.Linear`` call, ``(N, d)`` (None when
    the model has no Linear); ``output``: the model's output.
    """

    pre: dict[str, Tensor] = field(default_factory=dict)
    post: dict[str, Tensor] = field(default_factory=dict)
    penultimate: Tensor | None = None
    output: Tensor | None = None


def record_activations(model: nn.Module, inputs: Inputs) -> Activations:
    """One forward pass ``model(*inputs)`` recording every activation module's input and
    output and the last Linear's input (copies: in-place layers cannot alter them).

    An activation whose output *is* the model's output (an actor's ``tanh``) is not a
    hidden layer and is left out.
    """
    inputs = _as_tuple(inputs)
    names = {m: name for name, m in model.named_modules()}
    rec = Activations()
    last_linear: list[Tensor] = []

    def on_activation(module: nn.Module, args: tuple, output: Tensor) -> None:
        name = names[module]
        if name in rec.post:  # a module used twice per forward: number its calls
            name = f"{name}#{sum(k.split('#')[0] == name for k in rec.post)}"
        rec.pre[name], rec.post[name] = pre_copy.pop(), output.detach().clone()
        originals[name] = output

    pre_copy: list[Tensor] = []
    originals: dict[str, Tensor] = {}  # held, so that no later tensor reuses their memory

    def before_activation(module: nn.Module, args: tuple) -> None:
        pre_copy.append(args[0].detach().clone())  # before an in-place activation overwrites it

    def on_linear(module: nn.Module, args: tuple) -> None:
        last_linear[:] = [args[0].detach()]  # a Linear never modifies its input

    handles = []
    for module in model.modules():
        if isinstance(module, ACTIVATION_TYPES):
            handles += [module.register_forward_pre_hook(before_activation), module.register_forward_hook(on_activation)]
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(on_linear))
    devices = [x.device for x in inputs if x.device.type == "cuda"][:1]
    try:
        with torch.random.fork_rng(devices=devices), training_mode(model, False), torch.no_grad():
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    for name, original in originals.items():  # drop an output activation: the output is a view of it
        if original.data_ptr() == out.data_ptr() and original.numel() == out.numel():
            del rec.post[name], rec.pre[name]
    rec.penultimate = last_linear[0] if last_linear else None
    rec.output = out.detach()
    return rec


def _per_unit(h: Tensor) -> Tensor:
    """``(N, d)`` -> ``(N, d)``; ``(N, C, ...)`` -> ``(N, C)`` averaged over the trailing dims."""
    return h if h.dim() <= 2 else h.flatten(2).mean(2)


def _scores(post: Tensor) -> Tensor:
    """Sokar et al. Eq. 1: ``E_x|h_i| / mean_k E_x|h_k|``; a layer that is all zero scores 0 everywhere."""
    mean_abs = _per_unit(post.abs()).double().mean(0)
    layer_mean = mean_abs.mean()
    return mean_abs / layer_mean if layer_mean > 0 else torch.zeros_like(mean_abs)


def dormant_scores(model: nn.Module, inputs: Inputs) -> dict[str, Tensor]:
    """Per hidden layer (activation module name), the normalised scores ``s_i``, shape ``(H,)``, float64."""
    return {name: _scores(post) for name, post in record_activations(model, inputs).post.items()}


def _dormant_count(scores: dict[str, Tensor], tau: float) -> tuple[int, int]:
    return sum(int((s <= tau).sum()) for s in scores.values()), sum(s.numel() for s in scores.values())


def dormant_fraction(model: nn.Module, inputs: Inputs, tau: float = 0.025) -> float:
    """Share of all hidden units (every layer pooled) that are tau-dormant on ``inputs``:
    score ``<= tau`` (Sokar et al. 2023; tau = 0 counts only units that never fire).
    NaN when the model has no activation module."""
    dormant, total = _dormant_count(dormant_scores(model, inputs), tau)
    return dormant / total if total else float("nan")


def effective_rank(features: Tensor, delta: float = 0.01) -> int:
    """srank of a ``(N, d)`` feature matrix (Kumar et al. 2021): the smallest k whose top-k
    singular values hold a ``1 - delta`` share of their sum; 0 for a zero matrix."""
    if features.dim() != 2:
        raise ValueError(f"effective_rank: features must be (N, d), got shape {tuple(features.shape)}")
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"effective_rank: delta must be in [0, 1), got {delta}")
    x = features.detach().double()
    # sigma_i^2 are the eigenvalues of the smaller Gram (X^T X or X X^T), faster than an SVD
    # at (2560, 256); float64 keeps the error of every sigma below ~1e-8 sigma_max, far under delta.
    gram = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T
    sigma = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)  # descending
    total = sigma.sum()
    if total <= 0:
        return 0
    share = torch.cumsum(sigma, 0) / total
    # Rounding can leave share[-1] a hair below 1: the full rank is the cap.
    return min(int((share < 1.0 - delta).sum()) + 1, sigma.numel())


def penultimate_features(model: nn.Module, inputs: Inputs) -> Tensor:
    """The input of the model's last ``nn.Linear`` call on ``inputs``, ``(N, d)``."""
    feats = record_activations(model, inputs).penultimate
    if feats is None:
        raise ValueError(f"penultimate_features: {type(model).__name__} calls no nn.Linear")
    return feats


def weight_norm(model: nn.Module) -> float:
    """``||theta||_2`` over every trainable parameter of ``model`` (computed in float64)."""
    params = [p.detach() for p in model.parameters() if p.requires_grad]
    return float(parameter_norm(params, torch.float64)) if params else 0.0


def _moments(pre: Tensor) -> tuple[float, float]:
    x = pre.double()
    return x.mean().item(), x.std(unbiased=False).item()


def preactivation_stats(model: nn.Module, inputs: Inputs) -> dict[str, tuple[float, float]]:
    """Per hidden layer (activation module name), ``(mean, std)`` of its input over all
    samples and units (population std)."""
    return {name: _moments(pre) for name, pre in record_activations(model, inputs).pre.items()}


def plasticity_metrics(model: nn.Module, inputs: Inputs, tau: float = 0.025, delta: float = 0.01) -> dict[str, float]:
    """Every statistic above from one recorded forward pass, as plain floats:

    ``dormant_fraction`` (all hidden units pooled), ``dormant_fraction/<layer>``,
    ``feature_rank`` (:func:`effective_rank` of the penultimate features; absent when
    the model calls no Linear, NaN when they are not finite), ``weight_norm``, ``preact_mean/<layer>`` and
    ``preact_scale/<layer>`` (mean and std of the layer's pre-activation).
    ``<layer>`` is the activation module's qualified name (``named_modules``).
    """
    rec = record_activations(model, inputs)
    scores = {name: _scores(post) for name, post in rec.post.items()}
    dormant, total = _dormant_count(scores, tau)
    metrics = {"dormant_fraction": dormant / total if total else float("nan"), "weight_norm": weight_norm(model)}
    for name, s in scores.items():
        metrics[f"dormant_fraction/{name}"] = (s <= tau).double().mean().item()
    if rec.penultimate is not None:  # features of a diverged critic (inf / NaN) have no rank: NaN
        features = rec.penultimate.flatten(1)
        finite = bool(torch.isfinite(features).all())  # (their float64 Gram in effective_rank does not overflow)
        metrics["feature_rank"] = float(effective_rank(features, delta)) if finite else float("nan")
    for name, pre in rec.pre.items():
        metrics[f"preact_mean/{name}"], metrics[f"preact_scale/{name}"] = _moments(pre)
    return metrics
