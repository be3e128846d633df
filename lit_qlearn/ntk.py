"""Empirical neural tangent kernels, SEEM and Gram statistics — pure tensor maths.

``model(*inputs)`` must return one scalar per sample, shape ``(N,)`` or ``(N, 1)``.
The Gram matrix is ``G[i, j] = <dQ(x'_i)/dtheta, dQ(x_j)/dtheta>`` over every
trainable parameter (docs/design.md sections 3 and 5).

Two engines, chosen by ``method``:

* ``"structured"`` (docs/design.md section 5.2): for ``Linear`` layers ``z = W a + b`` the
  parameter gradient of sample i is ``delta_i a_i^T`` (and ``delta_i``), so the
  layer's Gram contribution is ``(D' D^T) * (A' A^T + 1)``; for ``LayerNorm``
  ``y = gamma * xhat + beta`` it is ``(G' * Xh')(G * Xh)^T + G' G^T``, and so for
  ``BatchRenorm1d`` in eval mode, whose ``xhat = (x - mu) / sigma`` uses its running statistics. One forward
  and one backward pass of ``sum_i f(x_i)`` per input set give every per-sample
  ``delta`` at once (samples do not interact), so no ``N x P`` Jacobian is formed.
* ``"jacobian"``: ``torch.func`` per-sample Jacobians (``vmap(jacrev)``), contracted
  chunk by chunk; for any layer (convolutions, parametrisations, user layers).

``"auto"`` uses the structured engine when every layer with trainable parameters
is a ``Linear``, ``LayerNorm`` or ``BatchRenorm1d`` applied once per forward to ``(N, d)`` inputs.
The model is evaluated in eval mode (dropout off, BatchNorm with running
statistics: samples independent) and its modes are restored afterwards;
parameter ``.grad`` fields are never touched.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_qlearn.networks import BatchRenorm1d, training_mode

__all__ = [
    "DiscreteQ",
    "ntk_gram",
    "seem",
    "SEEMResult",
    "max_real_eigenpair",
    "max_real_eigenvalue",
    "participation",
    "row_ratio",
    "gram_stats",
    "gram_cosine",
    "contraction_fraction",
    "num_parameters",
    "supports_structured",
    "parameter_norm",
    "preconditioned_step",
    "PreconditionedStep",
    "check_preconditioner_args",
]

Inputs = Union[Tensor, Sequence[Tensor]]
METHODS = ("auto", "structured", "jacobian")  # ntk_gram engines
SOLVERS = ("auto", "dense", "arnoldi")  # max_real_eigenvalue solvers


def check_choice(owner: str, argument: str, value: object, choices: Sequence[object]) -> None:
    """Raise ``ValueError("<owner>: <argument> must be one of ..., got ...")`` unless ``value`` is a choice."""
    if value not in choices:
        raise ValueError(f"{owner}: {argument} must be one of {', '.join(map(repr, choices))}, got {value!r}")


class DiscreteQ(nn.Module):
    """``(obs, act) -> Q(obs)[act]``: a discrete-action Q-network as one scalar per sample,
    so the same NTK engine applies (the gather sends the gradient to the chosen output)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, obs: Tensor, act: Tensor) -> Tensor:
        return self.net(obs).gather(1, act.long().reshape(-1, 1)).squeeze(1)


def _as_tuple(inputs: Inputs) -> tuple[Tensor, ...]:
    return (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)


def _trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def num_parameters(model: nn.Module) -> int:
    """P, the number of trainable parameters (the authors' SEEM divides G by it)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_norm(tensors: Iterable[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """``||(t_1, ..., t_k)||_2`` of tensors as one scalar: the per-tensor norms in one
    fused kernel, combined in ``dtype`` (default: theirs). inf or NaN when any entry
    is, or when a tensor's norm overflows."""
    norms = torch.stack(torch._foreach_norm(list(tensors)))
    return torch.linalg.vector_norm(norms if dtype is None else norms.to(dtype))


#: The layers the structured engine knows (an affine per-feature norm's Gram is LayerNorm's, with its
#: own normalised input: BatchRenorm1d's in eval mode, with the running statistics).
_STRUCTURED = (nn.Linear, nn.LayerNorm, BatchRenorm1d)


def _layers(model: nn.Module) -> list[nn.Module] | None:
    """The layers with trainable parameters if all are structurally supported, else None."""
    layers = []
    owned: set[int] = set()
    for module in model.modules():
        own = _trainable(module)
        if not own:
            continue
        if nn.utils.parametrize.is_parametrized(module):
            return None
        ids = {id(p) for _, p in own}
        if ids & owned:  # a parameter tied across layers: its gradient is the sum over them
            return None
        owned |= ids
        if type(module) in _STRUCTURED:
            layers.append(module)
        else:
            return None
    return layers


def supports_structured(model: nn.Module) -> bool:
    """Whether ``method="structured"`` applies: only Linear / LayerNorm / BatchRenorm1d layers carry
    trainable parameters."""
    return _layers(model) is not None


class _Unsupported(Exception):
    pass


def _features(model: nn.Module, layers: list[nn.Module], inputs: tuple[Tensor, ...]) -> list[tuple]:
    """Per layer, what its Gram contribution needs: (A, D) for Linear, (Xhat, G) for the norms.

    A: layer inputs ``(N, in)``; D: ``d(sum f)/dz`` ``(N, out)``, which is row i's own
    ``df_i/dz_i`` because samples do not interact.
    """
    seen: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {m: [] for m in layers}
    versions: list[tuple[Tensor, int]] = []

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        seen[module].append((args[0], output))
        versions.extend([(args[0], args[0]._version), (output, output._version)])

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        # callers may hold torch.no_grad() or torch.inference_mode() (Lightning's validation loop)
        with torch.inference_mode(False), torch.enable_grad():
            inputs = tuple(x.clone() if x.is_inference() else x for x in inputs)
            out = model(*inputs)
            total = out.sum()
    finally:
        for h in handles:
            h.remove()
    n = inputs[0].shape[0]
    if out.dim() == 2 and out.shape[1] == 1:
        out = out.squeeze(1)
    if out.shape != (n,):
        raise ValueError(f"ntk_gram: model(*inputs) must return one scalar per sample, shape ({n},), got {tuple(out.shape)}")
    if any(t._version != v for t, v in versions):  # e.g. ReLU(inplace=True) rebases a layer's output
        raise _Unsupported("a layer's input or output is modified in place")
    if any(len(v) != 1 for v in seen.values()):
        raise _Unsupported("a layer is used more or less than once per forward")
    calls = [seen[m][0] for m in layers]
    if any(x.dim() != 2 or y.dim() != 2 for x, y in calls):
        raise _Unsupported("a layer sees inputs that are not (N, d)")
    grads = torch.autograd.grad(total, [y for _, y in calls], allow_unused=True)
    feats = []
    for m, (x, y), g in zip(layers, calls, grads):
        g = torch.zeros_like(y) if g is None else g
        if type(m) is nn.Linear:
            feats.append((x.detach(), g.detach()))
        elif type(m) is nn.LayerNorm:  # gradient w.r.t. its output, and the normalised input
            xhat = F.layer_norm(x.detach(), m.normalized_shape, eps=m.eps)
            feats.append((xhat, g.detach()))
        else:  # BatchRenorm1d, in eval mode: normalised by its running statistics
            feats.append(((x.detach() - m.running_mean) / m.running_std, g.detach()))
    return feats


def _structured_gram(model: nn.Module, layers: list[nn.Module], inputs: tuple, other: tuple | None) -> Tensor:
    fx = _features(model, layers, inputs)
    fo = fx if other is None else _features(model, layers, other)
    n, m = inputs[0].shape[0], (inputs if other is None else other)[0].shape[0]
    gram = torch.zeros(m, n, dtype=fx[0][1].dtype, device=fx[0][1].device) if fx else torch.zeros(m, n)
    for layer, (a, d), (a2, d2) in zip(layers, fx, fo):
        names = {name for name, _ in _trainable(layer)}
        if type(layer) is nn.Linear:
            dd = d2 @ d.T  # (M, N)
            if "weight" in names:
                gram += dd * (a2 @ a.T)
            if "bias" in names:
                gram += dd
        else:
            if "weight" in names:
                gram += (d2 * a2) @ (d * a).T
            if "bias" in names:
                gram += d2 @ d.T
    return gram


def _jacobian_rows(model: nn.Module, inputs: tuple[Tensor, ...], chunk_size: int) -> Tensor:
    """Per-sample parameter Jacobian, flattened, ``(N, P)``, computed ``chunk_size`` samples at a time."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v for k, v in model.named_parameters() if not v.requires_grad}
    buffers = dict(model.named_buffers())

    def f(p: dict, *xs: Tensor) -> Tensor:
        out = functional_call(model, {**p, **frozen, **buffers}, tuple(x.unsqueeze(0) for x in xs))
        return out.reshape(())

    jac = vmap(jacrev(f), in_dims=(None,) + (0,) * len(inputs))
    rows = []
    n = inputs[0].shape[0]
    for start in range(0, n, chunk_size):
        chunk = tuple(x[start:start + chunk_size] for x in inputs)
        j = jac(params, *chunk)
        rows.append(torch.cat([j[k].reshape(chunk[0].shape[0], -1) for k in params], dim=1))
    return torch.cat(rows)


def _jacobian_gram(model: nn.Module, inputs: tuple, other: tuple | None, chunk_size: int) -> Tensor:
    jx = _jacobian_rows(model, inputs, chunk_size)
    if other is None:
        return jx @ jx.T
    jo = _jacobian_rows(model, other, chunk_size)
    return jo @ jx.T


def ntk_gram(
    model: nn.Module,
    inputs: Inputs,
    other: Inputs | None = None,
    *,
    method: str = "auto",
    dtype: torch.dtype | None = None,
    chunk_size: int = 256,
) -> Tensor:
    """Raw empirical NTK Gram over all trainable parameters of ``model``.

    Args:
        model: ``model(*inputs)`` returns ``(N,)`` or ``(N, 1)``.
        inputs: a tensor or a tuple of tensors with N rows (e.g. ``(obs, act)``).
        other: optional second input set with M rows.
        method: ``"auto"``, ``"structured"`` or ``"jacobian"`` (module docstring).
        dtype: compute in this dtype (e.g. ``torch.float64``) on a copy of the model.
        chunk_size: samples per vmap call of the Jacobian engine (bounds its memory).

    Returns:
        ``(N, N)`` when ``other`` is None, else ``(M, N)``: rows from ``other``,
        columns from ``inputs``.
    """
    check_choice("ntk_gram", "method", method, METHODS)
    inputs = _as_tuple(inputs)
    other = None if other is None else _as_tuple(other)
    if dtype is not None:
        model = copy.deepcopy(model).to(dtype)
        cast = lambda xs: tuple(x.to(dtype) if x.is_floating_point() else x for x in xs)  # noqa: E731
        inputs = cast(inputs)
        other = None if other is None else cast(other)
    with training_mode(model, False):
        layers = _layers(model) if method != "jacobian" else None
        if method == "structured" and layers is None:
            raise ValueError(
                "ntk_gram: method='structured' supports Linear, LayerNorm and BatchRenorm1d layers (no tied "
                "parameters) only; "
                f"{type(model).__name__} has others (use method='auto' or 'jacobian')"
            )
        if layers is not None:
            try:
                return _structured_gram(model, layers, inputs, other)
            except _Unsupported as err:
                if method == "structured":
                    raise ValueError(f"ntk_gram: method='structured' does not apply: {err}") from None
        return _jacobian_gram(model, inputs, other, chunk_size)


# --------------------------------------------------------------------------- SEEM


def _arnoldi_max_real(a: Tensor, krylov: int, restarts: int, tol: float,
                      seed: int) -> tuple[complex, Tensor | None, bool]:
    """Eigenpair of largest real part by explicitly restarted Arnoldi iteration.

    Each cycle builds a ``krylov``-dimensional Krylov basis (modified Gram-Schmidt,
    re-orthogonalised once), takes the Ritz pair of largest real part from the small
    Hessenberg matrix and restarts from the Ritz vector's real part. Converged when
    the residual ``||A v - theta v||`` is below ``tol * ||A||_F``. Returns the Ritz
    value, its unit Ritz vector (complex) and whether it converged.
    """
    n = a.shape[0]
    k = min(krylov, n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v0 = torch.randn(n, generator=gen, dtype=a.dtype).to(a.device)
    scale = torch.linalg.matrix_norm(a.double()).item() or 1.0
    theta, ritz = complex("nan"), None
    for _ in range(restarts):
        basis = torch.zeros(n, k + 1, dtype=a.dtype, device=a.device)
        hess = torch.zeros(k + 1, k, dtype=a.dtype, device=a.device)
        basis[:, 0] = v0 / torch.linalg.vector_norm(v0)
        m = k
        for j in range(k):
            w = a @ basis[:, j]
            for _ in range(2):  # classical Gram-Schmidt twice: numerically orthogonal
                h = basis[:, : j + 1].T @ w
                w = w - basis[:, : j + 1] @ h
                hess[: j + 1, j] += h
            hess[j + 1, j] = torch.linalg.vector_norm(w)
            if hess[j + 1, j] <= 1e-12 * scale:  # invariant subspace: Ritz values are exact
                m = j + 1
                break
            basis[:, j + 1] = w / hess[j + 1, j]
        evals, evecs = torch.linalg.eig(hess[:m, :m])
        i = int(torch.argmax(evals.real))
        theta = complex(evals[i].item())
        y = evecs[:, i]
        ritz = basis[:, :m].to(y.dtype) @ y
        ritz = ritz / torch.linalg.vector_norm(ritz)
        residual = torch.linalg.vector_norm(a.to(y.dtype) @ ritz - theta * ritz)
        if residual.item() <= tol * scale:
            return theta, ritz, True
        v0 = ritz.real if torch.linalg.vector_norm(ritz.real) > 1e-12 else ritz.imag
    return theta, ritz, False


def max_real_eigenvalue(a: Tensor, solver: str = "auto", *, krylov: int = 96, restarts: int = 10,
                        tol: float | None = None, seed: int = 0) -> tuple[complex, str]:
    """The eigenvalue of ``a`` (square, not symmetric) with the largest real part.

    ``solver="dense"``: ``torch.linalg.eigvals`` (all eigenvalues, O(N^3)).
    ``solver="arnoldi"``: restarted Arnoldi, O(N^2 k) per cycle, an order of magnitude
    faster at N = 2560 (timings: benchmarks/results/ntk_speed.json), accepted when
    the Ritz residual is below ``tol * ||A||_F`` — so the *normalised* value
    (eigenvalue / ||A||_F) is accurate to about ``tol`` — and replaced by the dense
    solver when it does not converge within ``restarts`` cycles (typical when the
    top eigenvalues cluster near zero, i.e. a stable critic). ``"auto"``: dense
    below N = 512, else Arnoldi. ``tol=None``: ``max(1e-8, 50 eps)`` of ``a``'s dtype
    (6e-6 in float32, whose rounding a tighter residual could not reach; 1e-8 in
    float64). Returns ``(eigenvalue, solver actually used)``; :func:`max_real_eigenpair`
    also returns the eigenvector.
    """
    value, _, used = _max_real(a, solver, krylov, restarts, tol, seed, vector=False, owner="max_real_eigenvalue")
    return value, used


def max_real_eigenpair(a: Tensor, solver: str = "auto", *, krylov: int = 96, restarts: int = 10,
                       tol: float | None = None, seed: int = 0) -> tuple[complex, Tensor, str]:
    """:func:`max_real_eigenvalue` with its unit eigenvector (complex, ``(N,)``):
    ``(eigenvalue, eigenvector, solver used)``. Arnoldi has the vector for free; the
    dense solver then uses ``torch.linalg.eig``, slower than ``eigvals``."""
    return _max_real(a, solver, krylov, restarts, tol, seed, vector=True, owner="max_real_eigenpair")


def _max_real(a: Tensor, solver: str, krylov: int, restarts: int, tol: float | None, seed: int,
              vector: bool, owner: str) -> tuple[complex, Tensor | None, str]:
    if tol is None:
        tol = max(1e-8, 50 * torch.finfo(a.dtype).eps)
    check_choice(owner, "solver", solver, SOLVERS)
    n = a.shape[0]
    if solver == "arnoldi" or (solver == "auto" and n >= 512):
        theta, ritz, ok = _arnoldi_max_real(a, krylov, restarts, tol, seed)
        if ok:
            return theta, ritz, "arnoldi"
    if not vector:
        evals = torch.linalg.eigvals(a)
        return complex(evals[int(torch.argmax(evals.real))].item()), None, "dense"
    evals, evecs = torch.linalg.eig(a)
    i = int(torch.argmax(evals.real))
    return complex(evals[i].item()), evecs[:, i] / torch.linalg.vector_norm(evecs[:, i]), "dense"


def participation(vector: Tensor) -> float:
    """How many rows carry ``vector``: the participation number ``1 / sum_i p_i^2``
    with ``p_i = |v_i|^2 / ||v||^2`` — N for a vector spread evenly over N rows, 1 for
    one row, k for k rows with equal shares."""
    p = vector.abs().double() ** 2
    p = p / p.sum()
    return float(1.0 / (p**2).sum())


@dataclass
class SEEMResult:
    """``value``: largest real part of A's eigenvalues (SEEM); ``normalized``: value / ||A||_F;
    with ``return_vector``: ``eigenvector`` (unit, complex, one entry per transition) and its
    ``participation`` (how many transitions carry it, see :func:`participation`)."""

    value: float
    normalized: float
    frobenius: float
    eigenvalue: complex
    solver: str
    num_params: int
    matrix: Tensor | None = None
    eigenvalues: Tensor | None = None
    eigenvector: Tensor | None = None
    participation: float | None = None


def seem(
    model: nn.Module,
    x_inputs: Inputs,
    x_star_inputs: Inputs,
    gamma: float,
    *,
    scale_by_params: bool = False,
    method: str = "auto",
    dtype: torch.dtype | None = None,
    solver: str = "auto",
    tol: float | None = None,
    return_matrix: bool = False,
    return_spectrum: bool = False,
    return_vector: bool = False,
) -> SEEMResult:
    """SEEM (Yue et al. 2023): the top real eigenvalue of ``A = gamma G(X*, X) - G(X, X)``.

    Positive SEEM: the TD error grows along an eigenvector under SGD (self-excitation,
    divergence). ``scale_by_params`` divides G by P, as the authors' code does; the
    normalised value is scale-free either way. Where the top eigenvector sits says
    whether the self-excitation is the critic's as a whole or one transition's: its
    participation is tens or more for an eigenvector spread over the probe set (diverging
    critics, benchmarks/results/r3_norms.json), ~1 when a single transition whose
    bootstrap gradient dwarfs the others' carries it (docs/design.md section 5.3).

    Args:
        x_inputs: dataset pairs X = (s, a).
        x_star_inputs: bootstrap pairs X* = (s', pi(s')).
        solver / tol: eigen-solver, see :func:`max_real_eigenvalue`.
        return_matrix / return_spectrum: keep A / all its eigenvalues (dense) in the result.
        return_vector: keep the top eigenvector and its participation in the result.

    A critic that has diverged (a non-finite or overflowing Gram) has no eigenvalue to
    report: ``value``, ``normalized`` and ``eigenvalue`` are then NaN, no eigenvector.
    """
    g_xx = ntk_gram(model, x_inputs, method=method, dtype=dtype)
    g_sx = ntk_gram(model, x_inputs, other=x_star_inputs, method=method, dtype=dtype)
    if g_sx.shape != g_xx.shape:
        raise ValueError(f"seem: X and X* must have the same number of rows, got {g_xx.shape[0]} and {g_sx.shape[0]}")
    a = gamma * g_sx - g_xx
    p = num_parameters(model)
    if scale_by_params:
        a = a / p
    frob = torch.linalg.matrix_norm(a.double()).item()  # float32 accumulation is off by ~1e-4
    spectrum = vector = None
    if not bool(torch.isfinite(a).all()):  # the eigen-solvers raise on inf / NaN entries
        return SEEMResult(value=math.nan, normalized=math.nan, frobenius=frob, eigenvalue=complex(math.nan, math.nan),
                          solver="none", num_params=p, matrix=a if return_matrix else None)
    if return_spectrum:
        spectrum, vectors = torch.linalg.eig(a) if return_vector else (torch.linalg.eigvals(a), None)
        i = int(torch.argmax(spectrum.real))
        eig, used = complex(spectrum[i].item()), "dense"
        vector = None if vectors is None else vectors[:, i] / torch.linalg.vector_norm(vectors[:, i])
    elif return_vector:
        eig, vector, used = max_real_eigenpair(a, solver, tol=tol)
    else:
        eig, used = max_real_eigenvalue(a, solver, tol=tol)
    return SEEMResult(
        value=eig.real,
        normalized=eig.real / frob if frob > 0 else math.nan,
        frobenius=frob,
        eigenvalue=eig,
        solver=used,
        num_params=p,
        matrix=a if return_matrix else None,
        eigenvalues=spectrum,
        eigenvector=vector,
        participation=None if vector is None else participation(vector),
    )


# --------------------------------------------------------------- Gram statistics


def row_ratio(gram: Tensor) -> Tensor:
    """PreQN's row ratio ``R_i = (1/N) sum_{j != i} |K_ij| / K_ii``, shape ``(N,)``."""
    n = gram.shape[0]
    diag = torch.diagonal(gram)
    off = gram.abs().sum(dim=1) - diag.abs()
    return off / (n * diag)


def gram_stats(gram: Tensor) -> dict[str, float]:
    """``diag_mean``, ``offdiag_abs_mean`` and ``row_ratio_mean`` of a square Gram."""
    n = gram.shape[0]
    diag = torch.diagonal(gram)
    off_sum = gram.abs().sum() - diag.abs().sum()
    return {
        "diag_mean": diag.mean().item(),
        "offdiag_abs_mean": (off_sum / max(n * (n - 1), 1)).item(),
        "row_ratio_mean": row_ratio(gram).mean().item(),
    }


def gram_cosine(g1: Tensor, g2: Tensor) -> float:
    """Cosine similarity ``<G1, G2>_F / (||G1||_F ||G2||_F)``: 1 when the kernel keeps its direction."""
    g1, g2 = g1.double(), g2.double()
    return ((g1 * g2).sum() / (torch.linalg.matrix_norm(g1) * torch.linalg.matrix_norm(g2))).item()


def contraction_fraction(gram: Tensor, gamma: float, rho: Tensor | None = None) -> float:
    """Share of rows meeting PreQN's contraction condition (Theorem 2):
    ``(1 + gamma) sum_{j != i} |K_ij| rho_j <= (1 - gamma) K_ii rho_i`` (rho = 1 by default)."""
    n = gram.shape[0]
    rho = torch.ones(n, dtype=gram.dtype, device=gram.device) if rho is None else rho
    diag = torch.diagonal(gram)
    off = gram.abs() @ rho - diag.abs() * rho
    return ((1 + gamma) * off <= (1 - gamma) * diag * rho).double().mean().item()


# ------------------------------------------------------------------ PreQN's update
@dataclass(frozen=True)
class PreconditionedStep:
    """What one :func:`preconditioned_step` did.

    ``cos``: ``cos(Q_theta'(X) - Q_theta(X), delta)`` of the applied step;
    ``shrink_steps``: how often the step was shrunk; ``step_norm``: ``||theta' - theta||``;
    ``accepted``: whether ``cos >= cos_threshold`` (else the cap was hit and the
    smallest step tried was kept).
    """

    cos: float
    shrink_steps: int
    step_norm: float
    accepted: bool


def preconditioned_step(
    model: nn.Module,
    inputs: Inputs,
    td_errors: Tensor,
    *,
    lr: float = 0.1,
    cos_threshold: float = 0.9,
    shrink: float = 0.5,
    max_shrinks: int = 20,
    rcond: float = 1e-6,
    method: str = "auto",
) -> PreconditionedStep:
    """PreQN's critic update (Achiam, Knight & Abbeel 2019; docs/design.md section 5.5), in place.

    With ``K = G(X, X)`` the NTK Gram of ``model`` on the batch ``X`` (float64) and
    ``delta`` the TD errors ``y - Q(X)``:

    1. ``Z = K^+ delta``, the minimum-norm least-squares solution of ``K Z = delta``
       through the eigendecomposition of the symmetric ``K``, eigenvalues below
       ``rcond * max eigenvalue`` counted as zero. This cutoff is the only
       regularisation: directions the kernel can barely move (a minibatch of a few
       distinct states has a nearly singular ``K``) would otherwise need parameter
       steps of size ``1/sqrt(lambda)``, far outside the first-order regime, and the
       line search would shrink the whole step to nothing;
    2. the direction ``d = sum_i Z_i grad_theta Q(x_i)``: one vector-Jacobian product
       (K, Z and d in float64 on a copy of the model, then applied to ``model``);
    3. ``theta' = theta + s * lr * d`` with ``s = 1, shrink, shrink^2, ...`` until
       ``cos(Q_theta'(X) - Q_theta(X), delta) >= cos_threshold``, at most
       ``max_shrinks`` times; if the criterion is never met the smallest step is kept.

    To first order ``Q_theta'(X) - Q_theta(X) = s * lr * K Z = s * lr * delta``: the
    network moves like tabular Q-learning with step ``s * lr`` on the batch.

    Defaults (no official values exist): ``lr = 0.1`` (the tabular step size),
    ``cos_threshold = 0.9``, ``shrink = 0.5``, ``max_shrinks = 20`` (smallest step
    ``lr * 2^-20``), ``rcond = 1e-6``. The model is evaluated in eval mode; ``.grad`` is not touched.
    Every rank of a distributed run must pass the same batch and TD errors to take
    the same step.

    Args:
        model: ``model(*inputs) -> (N,)``, its trainable parameters are updated.
        inputs: the batch ``X`` (a tensor or a tuple of tensors, e.g. ``(obs, act)``).
        td_errors: ``delta``, shape ``(N,)``.
        lr / cos_threshold / shrink / max_shrinks / rcond: see above.
        method: NTK engine, see :func:`ntk_gram`.
    """
    inputs = _as_tuple(inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"preconditioned_step: {type(model).__name__} has no trainable parameters")
    check_preconditioner_args("preconditioned_step", lr=lr, cos_threshold=cos_threshold, shrink=shrink,
                              max_shrinks=max_shrinks, rcond=rcond)
    delta = td_errors.detach().reshape(-1).double()
    # Everything up to the direction in float64: Z can be large, and J^T Z cancels.
    exact = model if all(p.dtype == torch.float64 for p in params) else copy.deepcopy(model).double()
    inputs64 = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    gram = ntk_gram(exact, inputs64, method=method)
    if gram.shape[0] != delta.shape[0]:
        raise ValueError(f"preconditioned_step: {delta.shape[0]} TD errors for a batch of {gram.shape[0]} inputs")
    evals, evecs = torch.linalg.eigh(gram)
    keep = evals > evals.abs().max() * rcond
    z = evecs[:, keep] @ ((evecs[:, keep].T @ delta) / evals[keep])
    exact_params = [p for p in exact.parameters() if p.requires_grad]
    with training_mode(exact, False), torch.enable_grad():
        direction64 = torch.autograd.grad(exact(*inputs64).reshape(-1), exact_params, grad_outputs=z)
    direction = [d.to(p.dtype) for d, p in zip(direction64, params)]
    with training_mode(model, False):
        with torch.no_grad():
            q = model(*inputs).reshape(-1)
        q0 = q.detach().double()
        start = [p.detach().clone() for p in params]
        scale = float(lr)
        with torch.no_grad():
            for shrinks in range(max_shrinks + 1):
                for p, p0, d in zip(params, start, direction):
                    p.copy_(p0).add_(d, alpha=scale)
                change = model(*inputs).reshape(-1).double() - q0
                cos = float(F.cosine_similarity(change, delta, dim=0, eps=1e-30))
                if cos >= cos_threshold or shrinks == max_shrinks:
                    break
                scale *= shrink
    norm = scale * float(parameter_norm(direction64))
    return PreconditionedStep(cos=cos, shrink_steps=shrinks, step_norm=norm, accepted=cos >= cos_threshold)


def check_preconditioner_args(owner: str, *, lr: float, cos_threshold: float, shrink: float, max_shrinks: int,
                              rcond: float, lr_name: str = "lr") -> None:
    """Raise ``ValueError`` naming ``owner`` unless the arguments of
    :func:`preconditioned_step` are valid."""
    if not lr > 0 or not 0 < shrink < 1 or max_shrinks < 0 or not -1 <= cos_threshold <= 1 or not 0 <= rcond < 1:
        raise ValueError(
            f"{owner}: need {lr_name} > 0, 0 < shrink < 1, max_shrinks >= 0, cos_threshold in [-1, 1] and "
            f"0 <= rcond < 1; got {lr_name}={lr}, shrink={shrink}, max_shrinks={max_shrinks}, "
            f"cos_threshold={cos_threshold}, rcond={rcond}"
        )
