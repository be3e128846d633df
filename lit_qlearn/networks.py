"""Networks: the one MLP builder, critics (single and ensemble) and actors.

Every network in lit_qlearn is built by :func:`mlp`, a plain ``nn.Sequential``
of ``Linear`` / norm / activation / dropout layers. The NTK engine relies on that
structure (docs/design.md section 5.2), so critics keep each member a plain ``mlp``
and only *evaluate* an ensemble in one batched computation.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Sin", "mlp", "orthogonal_init", "Critic", "Actor", "StateActionQ", "EvalModeQ", "DiscreteQNetwork",
           "NatureEncoder", "SquashedGaussianActor", "GaussianActor", "BatchRenorm1d", "training_mode", "ACTIVATIONS",
           "NORMS", "NORM_POSITIONS"]


class Sin(nn.Module):
    """``sin(x)``: PreQN's activation with the smallest NTK row ratio (docs/design.md section 5.5)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(x)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sin": Sin,
    "elu": nn.ELU,
    "mish": nn.Mish,
}
NORMS = (None, "layer", "batch", "batchrenorm")
#: Where :func:`mlp` puts its norm layers: between each hidden ``Linear`` and its activation, or
#: in front of every ``Linear`` (the network's input and each hidden activation's output).
NORM_POSITIONS = ("pre_activation", "before_linear")


@contextmanager
def training_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """Within the block ``module`` and every submodule are in train (``True``) or eval
    (``False``) mode; afterwards each submodule has its own mode back. (BatchNorm-type
    layers normalise with the batch's statistics and move their running ones in train
    mode only.)"""
    flipped = [m for m in module.modules() if m.training != training]  # only these change, and change back
    for m in flipped:
        m.training = training
    try:
        yield
    finally:
        for m in flipped:
            m.training = not training


class BatchRenorm1d(nn.Module):
    """Batch renormalisation (Ioffe 2017, Algorithm 1) of ``(N, C)`` inputs, the critic's
    normaliser in CrossQ (Bhatt et al. 2024).

    In train mode, with the batch's ``mu_B`` and ``sigma_B = sqrt(var_B + eps)`` (``var_B``
    the biased variance) and the running ``mu``, ``sigma``::

        r = clip(sigma_B / sigma, 1 / r_max, r_max)     d = clip((mu_B - mu) / sigma, -d_max, d_max)
        y = ((x - mu_B) / sigma_B * r + d) * weight + bias

    with ``r`` and ``d`` treated as constants (no gradient flows through them; through
    ``mu_B`` and ``sigma_B`` it does, as in BatchNorm), then
    ``mu += momentum (mu_B - mu)`` and ``sigma += momentum (sigma_B - sigma)``. For the
    first ``warmup_steps`` train-mode passes ``r = 1`` and ``d = 0``: plain BatchNorm while
    the running statistics settle (the CrossQ authors' schedule: BatchNorm for 100k steps,
    then the clips at ``r_max = 3``, ``d_max = 5`` at once; Ioffe relaxes them gradually).
    In eval mode ``y = (x - mu) / sigma * weight + bias``, so samples do not interact.

    Differences from Stable-Baselines3-contrib's ``BatchRenorm1d`` (which CrossQ there
    uses): it keeps a running *variance* and normalises with ``sqrt(var + eps)``, uses the
    unbiased batch variance, and leaves warm-up after ``warmup_steps + 1`` passes; this
    layer keeps Ioffe's running standard deviation.

    Args:
        num_features: C, the number of features.
        eps: added to the batch variance.
        momentum: rate of the running statistics' moving average.
        affine: learnable per-feature ``weight`` (1) and ``bias`` (0).
        r_max: clip of ``r`` to ``[1 / r_max, r_max]`` after warm-up (>= 1).
        d_max: clip of ``d`` to ``[-d_max, d_max]`` after warm-up (>= 0).
        warmup_steps: train-mode passes with ``r = 1``, ``d = 0`` (plain BatchNorm).
    """

    def __init__(self, num_features: int, eps: float = 1e-3, momentum: float = 0.01, affine: bool = True,
                 r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 100_000) -> None:
        super().__init__()
        checks = (("num_features", num_features, isinstance(num_features, int) and num_features >= 1,
                   "an integer >= 1"),
                  ("eps", eps, eps > 0, "> 0"), ("momentum", momentum, 0 < momentum <= 1, "in (0, 1]"),
                  ("r_max", r_max, r_max >= 1, ">= 1"), ("d_max", d_max, d_max >= 0, ">= 0"),
                  ("warmup_steps", warmup_steps, isinstance(warmup_steps, int) and warmup_steps >= 0,
                   "an integer >= 0"))
        for name, value, ok, expected in checks:
            if not ok:
                raise ValueError(f"BatchRenorm1d: {name} must be {expected}, got {value!r}")
        self.num_features, self.eps, self.momentum = int(num_features), float(eps), float(momentum)
        self.affine, self.r_max, self.d_max, self.warmup_steps = bool(affine), float(r_max), float(d_max), warmup_steps
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_std", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}")

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchRenorm1d: expected input (N, {self.num_features}), got {tuple(x.shape)}")
        if self.training and x.shape[0] < 2:
            raise ValueError(f"BatchRenorm1d: a train-mode batch needs N >= 2 samples, got {x.shape[0]}")
        y = self.renormalise(x, self.running_mean, self.running_std, self.num_batches_tracked)
        return y * self.weight + self.bias if self.affine else y

    def renormalise(self, x: Tensor, running_mean: Tensor, running_std: Tensor, num_batches_tracked: Tensor) -> Tensor:
        """The normalisation without the affine map, over the rows (dim -2) of ``x``
        ``(..., N, C)`` with running statistics ``(..., C)`` and pass counts ``(...)``, which
        train mode moves in place: this layer's own (``forward``) or several layers' stacked
        (the batched critic's pass over its members)."""
        if not self.training:
            return (x - running_mean.unsqueeze(-2)) / running_std.unsqueeze(-2)
        mean = x.mean(dim=-2, keepdim=True)
        centred = x - mean
        # the biased variance as a mean of squares: Tensor.var over rows is ~10x slower on a CPU
        std = ((centred * centred).mean(dim=-2, keepdim=True) + self.eps).sqrt()
        with torch.no_grad():
            warm = (num_batches_tracked >= self.warmup_steps)[..., None, None]  # r = 1, d = 0 until then
            mu, sigma = running_mean.unsqueeze(-2), running_std.unsqueeze(-2)
            r = torch.where(warm, (std / sigma).clamp(1.0 / self.r_max, self.r_max), 1.0)
            d = torch.where(warm, ((mean - mu) / sigma).clamp(-self.d_max, self.d_max), 0.0)
            running_mean.add_(self.momentum * (mean.squeeze(-2) - running_mean))
            running_std.add_(self.momentum * (std.squeeze(-2) - running_std))
            num_batches_tracked.add_(1)
        return centred / std * r + d


def _batched_renorm(layers: Sequence[BatchRenorm1d], h: Tensor) -> Tensor:
    """E structurally identical BatchRenorm1d layers on ``h`` ``(E, N, C)``, member e over its
    own N rows with its own running statistics (moved in train mode, as E separate calls would)."""
    first = layers[0]
    stacked = [torch.stack([getattr(m, name) for m in layers])
               for name in ("running_mean", "running_std", "num_batches_tracked")]
    y = first.renormalise(h, *stacked)
    if first.training:
        with torch.no_grad():
            for name, values in zip(("running_mean", "running_std", "num_batches_tracked"), stacked):
                for m, value in zip(layers, values):
                    getattr(m, name).copy_(value)
    if first.affine:
        weight, bias = (torch.stack([getattr(m, name) for m in layers]).unsqueeze(1) for name in ("weight", "bias"))
        y = y * weight + bias
    return y


def mlp(
    in_dim: int,
    out_dim: int,
    hidden: Sequence[int] = (256, 256),
    activation: str = "relu",
    norm: str | None = None,
    norm_layers: Sequence[int] | None = None,
    norm_affine: bool = True,
    weight_norm_output: bool = False,
    dropout: float = 0.0,
    output_activation: str | None = None,
    norm_position: str = "pre_activation",
    norm_options: Mapping[str, Any] | None = None,
) -> nn.Sequential:
    """Build ``Linear -> [norm] -> activation -> [dropout]`` per hidden layer, then ``Linear``
    (``norm_position="before_linear"``: ``[norm] -> Linear -> activation -> [dropout]``
    per hidden layer, then ``[norm] -> Linear``).

    Args:
        in_dim, out_dim: input and output widths.
        hidden: widths of the hidden layers (``()`` gives a linear model).
        activation: one of ``relu``, ``tanh``, ``sin``, ``elu``, ``mish``.
        norm: ``None``, ``"layer"`` (LayerNorm between Linear and activation, the
            divergence remedy of docs/design.md section 5.6), ``"batch"`` (BatchNorm1d) or
            ``"batchrenorm"`` (:class:`BatchRenorm1d`, CrossQ's).
        norm_layers: indices of the layers that get the norm (default: all): hidden layers
            ``0 .. len(hidden) - 1``, or with ``"before_linear"`` the Linear layers
            ``0 .. len(hidden)`` (0: the network's input).
        norm_affine: learnable gain and bias in the norm layers.
        weight_norm_output: weight-normalise the output ``Linear`` (the paper's WeightNorm).
        dropout: dropout rate after each hidden activation (0 disables it).
        output_activation: optional activation on the output (e.g. ``"tanh"`` for actors).
        norm_position: ``"pre_activation"`` (after each hidden Linear) or ``"before_linear"``
            (in front of every Linear: the input and each hidden activation's output, CrossQ's
            layout, Bhatt et al. 2024).
        norm_options: keyword arguments of the norm layers' constructor (e.g. BatchRenorm1d's
            ``momentum``, ``warmup_steps``).
    """
    if in_dim < 1 or out_dim < 1:
        raise ValueError(f"mlp: in_dim and out_dim must be >= 1, got in_dim={in_dim}, out_dim={out_dim}")
    hidden = tuple(int(h) for h in hidden)
    if any(h < 1 for h in hidden):
        raise ValueError(f"mlp: every hidden width must be >= 1, got hidden={hidden}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"mlp: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if output_activation is not None and output_activation not in ACTIVATIONS:
        raise ValueError(
            f"mlp: output_activation must be None or one of {sorted(ACTIVATIONS)}, got {output_activation!r}"
        )
    if norm not in NORMS:
        raise ValueError(f"mlp: norm must be one of {NORMS}, got {norm!r}")
    if norm_position not in NORM_POSITIONS:
        raise ValueError(f"mlp: norm_position must be one of {NORM_POSITIONS}, got {norm_position!r}")
    if norm_options and norm is None:
        raise ValueError(f"mlp: norm_options {dict(norm_options)} given without a norm (norm=None)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"mlp: dropout must be in [0, 1), got {dropout}")
    before = norm_position == "before_linear"
    slots = len(hidden) + 1 if before else len(hidden)
    normed = set(range(slots)) if norm_layers is None else {int(i) for i in norm_layers}
    bad = sorted(i for i in normed if not 0 <= i < slots)
    if norm is not None and bad:
        raise ValueError(f"mlp: norm_layers {bad} out of range for {slots} {norm_position} norm slots")
    if norm is None:
        normed = set()
    options = dict(norm_options or {})

    def norm_layer(width: int) -> nn.Module:
        if norm == "layer":
            return nn.LayerNorm(width, elementwise_affine=norm_affine, **options)
        if norm == "batch":
            return nn.BatchNorm1d(width, affine=norm_affine, **options)
        return BatchRenorm1d(width, affine=norm_affine, **options)

    layers: list[nn.Module] = []
    width = in_dim
    for i, h in enumerate(hidden):
        if before and i in normed:
            layers.append(norm_layer(width))
        layers.append(nn.Linear(width, h))
        if not before and i in normed:
            layers.append(norm_layer(h))
        layers.append(ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    if before and len(hidden) in normed:
        layers.append(norm_layer(width))
    out = nn.Linear(width, out_dim)
    if weight_norm_output:
        out = nn.utils.parametrizations.weight_norm(out)
    layers.append(out)
    if output_activation is not None:
        layers.append(ACTIVATIONS[output_activation]())
    return nn.Sequential(*layers)


def orthogonal_init(module: nn.Module, gain: float = math.sqrt(2.0)) -> nn.Module:
    """Orthogonal weights scaled by ``gain`` and zero biases in every ``Linear`` of ``module``
    (in place; returned): the initialisation of OpenAI Baselines and CleanRL (``layer_init``)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.orthogonal_(layer.weight, gain)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return module


def _layer_kind(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):  # a weight-normalised Linear computes .weight
        return "linear"
    if isinstance(layer, nn.LayerNorm):
        return "layernorm"
    if isinstance(layer, BatchRenorm1d):
        return "batchrenorm"
    if next(layer.parameters(), None) is None and next(layer.buffers(), None) is None:
        return "elementwise"  # activations, dropout
    return "other"


def _batched_forward(members: Sequence[nn.Sequential], kinds: Sequence[str], x: Tensor) -> Tensor:
    """Evaluate E structurally identical ``mlp`` members on one input in a batched pass.

    Linear layers become one ``baddbmm`` over stacked weights, LayerNorm one
    normalisation with stacked gains, BatchRenorm1d one renormalisation of each member over
    its own N rows with stacked statistics, parameter-free layers run once on the
    ``(E, N, d)`` tensor. Anything else (BatchNorm; a weight-normalised Linear) runs member
    by member. Returns ``(E, N, out_dim)``.
    """
    h = x.unsqueeze(0).expand(len(members), *x.shape)
    for kind, layers in zip(kinds, zip(*members)):
        if kind == "linear":
            weight = torch.stack([m.weight for m in layers])  # (E, out, in)
            bias = torch.stack([m.bias for m in layers]).unsqueeze(1)  # (E, 1, out)
            h = torch.baddbmm(bias, h, weight.transpose(1, 2))
        elif kind == "layernorm":
            first = layers[0]
            h = F.layer_norm(h, first.normalized_shape, eps=first.eps)
            if first.elementwise_affine:
                h = h * torch.stack([m.weight for m in layers]).unsqueeze(1)
                h = h + torch.stack([m.bias for m in layers]).unsqueeze(1)
        elif kind == "batchrenorm" and len({m.training for m in layers}) == 1 and h.shape[1] >= 2:
            h = _batched_renorm(layers, h)  # the members share their options (one mlp builder, one set of kwargs)
        elif kind == "elementwise":
            h = layers[0](h)
        else:
            h = torch.stack([m(hi) for m, hi in zip(layers, h)])
    return h


class Critic(nn.Module):
    """``num_q`` independent Q-networks ``(obs, act) -> Q`` evaluated in one batched pass.

    ``forward`` returns ``(num_q, N)``. Each member is a plain :func:`mlp`
    (``critic.members[i]``), so ``critic.q_function(i)`` is an ordinary module the
    NTK engine can differentiate.
    """

    def __init__(self, obs_dim: int, act_dim: int, num_q: int = 2, **mlp_kwargs) -> None:
        super().__init__()
        if num_q < 1:
            raise ValueError(f"Critic: num_q must be >= 1, got {num_q}")
        self.members = nn.ModuleList(mlp(obs_dim + act_dim, 1, **mlp_kwargs) for _ in range(num_q))
        self._kinds: list[str] | None = None

    @property
    def num_q(self) -> int:
        return len(self.members)

    def forward(self, obs: Tensor, act: Tensor) -> Tensor:
        x = torch.cat([obs, act], dim=-1)
        if len(self.members) == 1:
            return self.members[0](x).squeeze(-1).unsqueeze(0)
        if self._kinds is None:  # the layer plan, worked out once
            self._kinds = [_layer_kind(layer) for layer in self.members[0]]
        return _batched_forward(self.members, self._kinds, x).squeeze(-1)

    def q_function(self, index: int = 0) -> StateActionQ:
        """Member ``index`` as a module ``(obs, act) -> (N,)`` sharing its parameters."""
        return StateActionQ(self.members[index])


class StateActionQ(nn.Module):
    """Wrap an ``mlp`` over ``cat(obs, act)`` as ``(obs, act) -> Q (N,)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, obs: Tensor, act: Tensor) -> Tensor:
        return self.net(torch.cat([obs, act], dim=-1)).squeeze(-1)


class EvalModeQ(StateActionQ):
    """A :class:`StateActionQ` whose network is evaluated in eval mode whatever the mode
    around it: BatchNorm-type layers normalise with their running statistics (which stay
    as they are) and each sample's Q depends on that sample alone."""

    def forward(self, obs: Tensor, act: Tensor) -> Tensor:
        with training_mode(self.net, False):
            return super().forward(obs, act)


def register_action_bounds(module: nn.Module, act_dim: int, low: Sequence[float] | Tensor | float,
                           high: Sequence[float] | Tensor | float) -> None:
    """Give a policy the buffers ``action_low``, ``action_high``, ``action_mid`` and
    ``action_scale`` (half-range), each ``(act_dim,)``; scalar bounds broadcast."""
    low = torch.as_tensor(low, dtype=torch.float32).expand(act_dim).clone()
    high = torch.as_tensor(high, dtype=torch.float32).expand(act_dim).clone()
    if not torch.all(high > low):
        raise ValueError(f"{type(module).__name__}: action_high must exceed action_low, got low={low.tolist()}, "
                         f"high={high.tolist()}")
    module.register_buffer("action_low", low)
    module.register_buffer("action_high", high)
    module.register_buffer("action_mid", (high + low) / 2)
    module.register_buffer("action_scale", (high - low) / 2)


class Actor(nn.Module):
    """Deterministic policy ``obs -> a = mid + half_range * tanh(mlp(obs))`` within the action bounds."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        action_low: Sequence[float] | Tensor | float = -1.0,
        action_high: Sequence[float] | Tensor | float = 1.0,
        **mlp_kwargs,
    ) -> None:
        super().__init__()
        self.net = mlp(obs_dim, act_dim, output_activation="tanh", **mlp_kwargs)
        register_action_bounds(self, act_dim, action_low, action_high)

    def forward(self, obs: Tensor) -> Tensor:
        return self.action_mid + self.action_scale * self.net(obs)


class GaussianActor(Actor):
    """IQL's policy (CORL's ``GaussianPolicy``): ``N(mean(s), diag(std^2))`` with the
    deterministic :class:`Actor`'s mean ``mid + half_range * tanh(mlp(s))`` and a
    state-independent ``log_std`` (one learnable entry per action dimension, initially 0,
    clamped to ``[log_std_min, log_std_max]``). The Gaussian is not squashed, so
    :meth:`log_prob` is finite for any action, the data's actions on the bounds included.
    ``forward`` is the mean."""

    def __init__(self, obs_dim: int, act_dim: int, action_low: Sequence[float] | Tensor | float = -1.0,
                 action_high: Sequence[float] | Tensor | float = 1.0, log_std_min: float = -20.0,
                 log_std_max: float = 2.0, **mlp_kwargs) -> None:
        super().__init__(obs_dim, act_dim, action_low, action_high, **mlp_kwargs)
        self.log_std = nn.Parameter(torch.zeros(act_dim))
        self.log_std_min, self.log_std_max = float(log_std_min), float(log_std_max)

    def log_prob(self, obs: Tensor, action: Tensor) -> Tensor:
        """``log pi(a | s)`` ``(N,)`` of actions ``(N, da)`` (through ``forward``, so a
        compiled actor evaluates compiled)."""
        std = self.log_std.clamp(self.log_std_min, self.log_std_max).exp()
        return torch.distributions.Normal(self(obs), std, validate_args=False).log_prob(action).sum(dim=-1)


class NatureEncoder(nn.Module):
    """The Nature-DQN convolutional torso (Mnih et al. 2015): uint8 frames ``(N, C, 84, 84)``
    scaled to [0, 1], then conv 32x8x8/4, 64x4x4/2, 64x3x3/1 with ReLU, flattened
    (``out_dim`` = 3136 for 84x84 inputs)."""

    def __init__(self, obs_shape: Sequence[int]) -> None:
        super().__init__()
        channels = obs_shape[0]
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            self.out_dim = int(self.net(torch.zeros(1, *obs_shape)).shape[1])

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(obs.float() / 255.0)


class DiscreteQNetwork(nn.Module):
    """``obs -> Q(obs, .)`` ``(N, num_actions)`` for discrete actions.

    Vector observations go straight into the head; image observations (3-D
    ``obs_shape``, uint8) through the :class:`NatureEncoder` first. The head is one
    :func:`mlp`, or with ``dueling=True`` (Wang et al. 2016) a value stream ``V(s)``
    and an advantage stream ``A(s, a)`` combined as
    ``Q = V + A - mean_a A`` (the mean-subtracted form, Eq. 9 of the paper).
    """

    def __init__(self, obs_shape: Sequence[int], num_actions: int, dueling: bool = False, **mlp_kwargs) -> None:
        super().__init__()
        obs_shape = tuple(obs_shape)
        if len(obs_shape) == 3:
            self.encoder: nn.Module = NatureEncoder(obs_shape)
            features = self.encoder.out_dim
        elif len(obs_shape) == 1:
            self.encoder, features = nn.Identity(), obs_shape[0]
        else:
            raise ValueError(f"DiscreteQNetwork: observations must be vectors (d,) or images (C, H, W), "
                             f"got shape {obs_shape}")
        self.dueling = dueling
        self.head = mlp(features, num_actions, **mlp_kwargs)
        self.value = mlp(features, 1, **mlp_kwargs) if dueling else None

    def forward(self, obs: Tensor) -> Tensor:
        h = self.encoder(obs)
        q = self.head(h)
        if self.value is not None:
            q = self.value(h) + q - q.mean(dim=1, keepdim=True)
        return q


class SquashedGaussianActor(nn.Module):
    """SAC's policy: ``u ~ N(mean(s), std(s))``, ``a = mid + half_range * tanh(u)``.

    One :func:`mlp` outputs ``(mean, log_std)``; ``log_std`` is squashed into
    ``[log_std_min, log_std_max]`` by a tanh (smooth, unlike a clamp). ``forward`` is
    the deterministic action ``mid + half_range * tanh(mean)``.
    """

    def __init__(self, obs_dim: int, act_dim: int, action_low: Sequence[float] | Tensor | float = -1.0,
                 action_high: Sequence[float] | Tensor | float = 1.0, log_std_min: float = -5.0,
                 log_std_max: float = 2.0, **mlp_kwargs) -> None:
        super().__init__()
        self.net = mlp(obs_dim, 2 * act_dim, **mlp_kwargs)
        self.log_std_min, self.log_std_max = float(log_std_min), float(log_std_max)
        register_action_bounds(self, act_dim, action_low, action_high)

    def _mean_log_std(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (torch.tanh(log_std) + 1.0)
        return mean, log_std

    def forward(self, obs: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """The deterministic action; with ``sample=True`` :meth:`sample`'s pair."""
        mean, log_std = self._mean_log_std(obs)
        if not sample:
            return self.action_mid + self.action_scale * torch.tanh(mean)
        u = mean + log_std.exp() * (torch.randn_like(mean) if noise is None else noise)
        return self.action_mid + self.action_scale * torch.tanh(u), self._log_prob(u, mean, log_std)

    def sample(self, obs: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """A reparameterised action ``(N, da)`` and its log-density ``(N,)`` (through
        ``forward``, so a compiled actor samples compiled); ``noise`` ``(N, da)``: the
        standard normal draw to use (None: a fresh one)."""
        return self(obs, sample=True, noise=noise)

    def log_prob(self, obs: Tensor, action: Tensor) -> Tensor:
        """``log pi(a | s)`` ``(N,)`` of given actions strictly inside the bounds."""
        mean, log_std = self._mean_log_std(obs)
        y = ((action - self.action_mid) / self.action_scale).clamp(-1 + 1e-6, 1 - 1e-6)
        return self._log_prob(torch.atanh(y), mean, log_std)

    def _log_prob(self, u: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
        # change of variables a = mid + scale tanh(u): log pi(a) = log N(u) - sum log(scale (1 - tanh(u)^2)),
        # with log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)) (numerically stable for large |u|)
        gaussian = -0.5 * ((u - mean) / log_std.exp()).pow(2) - log_std - 0.5 * math.log(2 * math.pi)
        jacobian = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u)) + torch.log(self.action_scale)
        return (gaussian - jacobian).sum(dim=-1)
