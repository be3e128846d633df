"""NTK engine (lit_qlearn.ntk): every number is checked against an independent computation.

The reference Gram is a plain per-sample loop of ``torch.autograd.grad`` (one
backward pass per row, no torch.func, nothing from ntk.py), contracted as
``J(other) @ J(inputs).T``. Sizes are small: the file runs in seconds on 2 cores.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from lit_qlearn.networks import StateActionQ, mlp
from lit_qlearn.ntk import (
    DiscreteQ,
    SEEMResult,
    contraction_fraction,
    gram_cosine,
    gram_stats,
    max_real_eigenpair,
    max_real_eigenvalue,
    ntk_gram,
    num_parameters,
    participation,
    row_ratio,
    seem,
    supports_structured,
)

F64 = torch.float64
OBS, ACT = 5, 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small matrices gain nothing from two threads, and spinning OpenMP threads slow to a crawl
    when another process holds a core; restored afterwards for the rest of the session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------- helpers


def reference_jacobian(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(N, P): row i is d model(x_i) / d theta over the trainable parameters, one backward per sample."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(inputs[0].shape[0]):
        y = model(*[x[i:i + 1] for x in inputs]).reshape(())
        grads = torch.autograd.grad(y, params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]))
    return torch.stack(rows)


def reference_gram(model: nn.Module, inputs, other=None) -> torch.Tensor:
    """G[i, j] = <phi(other_i), phi(inputs_j)>: (M, N), rows from ``other`` (inputs when None)."""
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    jx = reference_jacobian(model, inputs)
    if other is None:
        return jx @ jx.T
    other = (other,) if isinstance(other, torch.Tensor) else tuple(other)
    return reference_jacobian(model, other) @ jx.T


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b)).item()


def state_actions(n: int, seed: int, dtype=F64, act_scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, OBS, generator=gen, dtype=dtype)
    act = (torch.rand(n, ACT, generator=gen, dtype=dtype) * 2 - 1) * act_scale
    return obs, act


def perturb_layernorm(model: nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.normal_(m.weight, mean=1.0, std=0.5)
            nn.init.normal_(m.bias, mean=0.0, std=0.5)


def critic(hidden=(16, 16), activation="relu", norm=None, seed=0, dtype=F64, **kwargs) -> StateActionQ:
    torch.manual_seed(seed)
    return StateActionQ(mlp(OBS + ACT, 1, hidden=hidden, activation=activation, norm=norm, **kwargs)).to(dtype)


# ----------------------------------------- 1. structured Gram vs the reference


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("norm", [None, "layer", "layer_noaffine"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "sin"])
def test_structured_gram_matches_reference(activation, norm, depth):
    widths = (16, 12, 8)[:depth]
    model = critic(widths, activation, norm="layer" if norm else None, norm_affine=norm != "layer_noaffine",
                   seed=depth)
    if norm == "layer":
        perturb_layernorm(model, seed=1)
        ln = [m for m in model.modules() if isinstance(m, nn.LayerNorm)][0]
        assert not torch.allclose(ln.weight, torch.ones_like(ln.weight))
        assert not torch.allclose(ln.bias, torch.zeros_like(ln.bias))
    if norm == "layer_noaffine":
        assert any(isinstance(m, nn.LayerNorm) for m in model.modules())
        assert all(not isinstance(m, nn.LayerNorm) or m.weight is None for m in model.modules())
    assert supports_structured(model)
    x, x2 = state_actions(24, seed=10), state_actions(16, seed=11, act_scale=3.0)

    ref = reference_gram(model, x)
    ref_cross = reference_gram(model, x, other=x2)
    assert ref_cross.shape == (16, 24)
    for method in ("structured", "jacobian", "auto"):
        g = ntk_gram(model, x, method=method)
        assert g.shape == (24, 24) and g.dtype == F64
        assert rel_err(g, ref) <= 1e-5, method
        gc = ntk_gram(model, x, other=x2, method=method)
        assert gc.shape == (16, 24), method  # rows from `other`, columns from `inputs`
        assert rel_err(gc, ref_cross) <= 1e-5, method
    # orientation really matters: the transpose is a different matrix
    assert rel_err(ntk_gram(model, x2, other=x, method="structured"), ref_cross.T) <= 1e-5


def test_discrete_q_matches_reference():
    torch.manual_seed(0)
    n_actions = 4
    model = DiscreteQ(mlp(OBS, n_actions, hidden=(16, 16), activation="tanh")).double()
    gen = torch.Generator().manual_seed(3)
    obs, obs2 = torch.randn(20, OBS, generator=gen, dtype=F64), torch.randn(12, OBS, generator=gen, dtype=F64)
    act, act2 = torch.randint(n_actions, (20,), generator=gen), torch.randint(n_actions, (12,), generator=gen)
    ref = reference_gram(model, (obs, act))
    ref_cross = reference_gram(model, (obs, act), other=(obs2, act2))
    for method in ("structured", "jacobian", "auto"):
        assert rel_err(ntk_gram(model, (obs, act), method=method), ref) <= 1e-5, method
        gc = ntk_gram(model, (obs, act), other=(obs2, act2), method=method)
        assert gc.shape == (12, 20)
        assert rel_err(gc, ref_cross) <= 1e-5, method
    # the same state under two different actions has different features: the gather routes the gradient
    same_state = ntk_gram(model, (obs[:1].repeat(2, 1), torch.tensor([0, 1])))
    assert not torch.allclose(same_state[0, 0], same_state[1, 1])


# ----------------------------------------------------------- 2. linear model


def test_linear_model_gram_is_xxt_plus_one():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, x2 = torch.randn(10, 4, generator=gen, dtype=F64), torch.randn(7, 4, generator=gen, dtype=F64)
    with_bias, no_bias = nn.Linear(4, 1).double(), nn.Linear(4, 1, bias=False).double()
    for method in ("structured", "jacobian", "auto"):
        torch.testing.assert_close(ntk_gram(with_bias, x, method=method), x @ x.T + 1, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ntk_gram(with_bias, x, x2, method=method), x2 @ x.T + 1, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ntk_gram(no_bias, x, method=method), x @ x.T, rtol=1e-12, atol=1e-12)


def test_frozen_parameter_is_excluded():
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double()
    model.weight.requires_grad_(False)
    assert num_parameters(model) == 1
    x = torch.randn(6, 4, dtype=F64)
    for method in ("structured", "jacobian", "auto"):
        torch.testing.assert_close(ntk_gram(model, x, method=method), torch.ones(6, 6, dtype=F64))
    # a frozen hidden layer in an MLP: only the trainable ones count
    net = critic((12, 12))
    net.net[2].weight.requires_grad_(False)
    x = state_actions(10, seed=2)
    ref = reference_gram(net, x)
    for method in ("structured", "jacobian"):
        assert rel_err(ntk_gram(net, x, method=method), ref) <= 1e-10


# ------------------------------------------------------- 3. homogeneity (5.4)


@pytest.mark.parametrize("layers", [2, 3])
def test_relu_homogeneity(layers):
    torch.manual_seed(layers)
    widths = [6] + [16] * (layers - 1) + [1]
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(widths[i], widths[i + 1], bias=False))
        if i < layers - 1:
            mods.append(nn.ReLU())
    model = nn.Sequential(*mods).double()
    x = torch.randn(12, 6, dtype=F64)
    g = ntk_gram(model, x)
    for lam in (5.0, 10.0):
        scaled = copy.deepcopy(model)
        with torch.no_grad():
            for p in scaled.parameters():
                p.mul_(lam)
        torch.testing.assert_close(scaled(x), lam**layers * model(x), rtol=1e-10, atol=0)
        torch.testing.assert_close(ntk_gram(scaled, x), lam ** (2 * (layers - 1)) * g, rtol=1e-6, atol=0)


# ------------------------------------- 4. unsupported layers fall back, modes


class ConvQ(nn.Module):
    """(N, d) -> Conv1d over the features -> Linear -> (N,)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 3, kernel_size=3)
        self.head = nn.Linear(3 * (d - 2), 1)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x.unsqueeze(1))).flatten(1)).squeeze(1)


class TwiceQ(nn.Module):
    """The same Linear applied twice per forward: structurally unsupported."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.inner = nn.Linear(d, d)
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x))))).squeeze(1)


def _modes(model):
    return [m.training for m in model.modules()]


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap over weight_norm
@pytest.mark.parametrize("kind", ["conv1d", "weight_norm", "batch_norm", "shared_layer"])
def test_unsupported_models_fall_back(kind):
    torch.manual_seed(0)
    d = OBS + ACT
    x, x2 = state_actions(16, seed=5), state_actions(10, seed=6)
    if kind in ("conv1d", "shared_layer"):
        model = ConvQ(d).double() if kind == "conv1d" else TwiceQ(d).double()
        x, x2 = (torch.cat(x, 1),), (torch.cat(x2, 1),)
    else:
        norm = "batch" if kind == "batch_norm" else None
        model = critic((16, 16), weight_norm_output=kind == "weight_norm", norm=norm)
    model.train()
    if kind == "batch_norm":
        with torch.no_grad():  # move the running statistics away from (0, 1)
            for s in range(3):
                model(*state_actions(32, seed=100 + s, act_scale=2.0))
    list(model.modules())[-1].eval()  # a submodule whose mode differs from its parent's
    modes = _modes(model)
    assert any(modes) and not all(modes)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    args, args2 = x, x2

    ref_model = copy.deepcopy(model).eval()  # running statistics, samples independent
    ref, ref_cross = reference_gram(ref_model, args), reference_gram(ref_model, args, other=args2)

    if kind == "shared_layer":
        assert supports_structured(model)  # only the forward pass reveals the reuse
    else:
        assert not supports_structured(model)
    for method in ("auto", "jacobian"):
        assert rel_err(ntk_gram(model, args, method=method), ref) <= 1e-10, method
        assert rel_err(ntk_gram(model, args, other=args2, method=method), ref_cross) <= 1e-10, method
        assert _modes(model) == modes
    with pytest.raises(ValueError, match="structured"):
        ntk_gram(model, args, method="structured")
    assert _modes(model) == modes
    for k, v in model.state_dict().items():  # BatchNorm statistics were not updated
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_grad_disabled_contexts(context):
    """Regression: the structured engine crashed under torch.no_grad() / torch.inference_mode()
    (Lightning runs validation hooks under inference mode)."""
    model = critic((12, 12), norm="layer")
    perturb_layernorm(model, seed=0)
    x, x2 = state_actions(8, seed=0), state_actions(5, seed=1)
    ref, ref_cross = reference_gram(model, x), reference_gram(model, x, other=x2)
    with context():
        xs, x2s = tuple(t.clone() for t in x), tuple(t.clone() for t in x2)  # inference tensors in inference mode
        for method in ("structured", "jacobian", "auto"):
            assert rel_err(ntk_gram(model, xs, method=method), ref) <= 1e-10, method
            assert rel_err(ntk_gram(model, xs, other=x2s, method=method), ref_cross) <= 1e-10, method
        r = seem(model, xs, tuple(t[:8] for t in state_actions(8, seed=2)), 0.9)
    assert math.isfinite(r.value)
    assert all(p.grad is None for p in model.parameters())


def test_tied_parameters_are_not_treated_as_separate_layers():
    """Regression: the structured engine summed per-layer Grams, missing the cross terms of a tied weight."""
    torch.manual_seed(0)
    first, second = nn.Linear(6, 6), nn.Linear(6, 6)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), nn.Linear(6, 1)).double()
    x = torch.randn(10, 6, dtype=F64)
    assert not supports_structured(model)
    assert rel_err(ntk_gram(model, x), reference_gram(model, x)) <= 1e-10
    with pytest.raises(ValueError, match="structured"):
        ntk_gram(model, x, method="structured")


def test_inplace_activation_falls_back():
    """Regression: ReLU(inplace=True) rebased the hooked Linear output, so the structured delta missed the mask."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(inplace=True), nn.Linear(16, 16), nn.ReLU(inplace=True),
                          nn.Linear(16, 1)).double()
    x = torch.randn(12, 6, dtype=F64)
    assert rel_err(ntk_gram(model, x), reference_gram(model, x)) <= 1e-10
    with pytest.raises(ValueError, match="structured"):
        ntk_gram(model, x, method="structured")


def test_bad_arguments():
    model = critic((8,))
    x = state_actions(4, seed=0)
    with pytest.raises(ValueError, match="method"):
        ntk_gram(model, x, method="exact")
    with pytest.raises(ValueError, match="one scalar per sample"):
        ntk_gram(mlp(OBS, 2, hidden=(8,)).double(), x[0])


# ------------------------------------------------------------------ 5. dtype


@pytest.mark.parametrize("method", ["structured", "jacobian"])
def test_float64_on_float32_model(method):
    model = critic((16, 16), activation="tanh", norm="layer", dtype=torch.float32)
    perturb_layernorm(model, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = state_actions(20, seed=1, dtype=torch.float32)
    g32 = ntk_gram(model, x, method=method)
    g64 = ntk_gram(model, x, method=method, dtype=F64)
    assert g32.dtype == torch.float32 and g64.dtype == F64
    assert rel_err(g32.double(), g64) <= 1e-5
    # the float64 result is the float64 model's exact Gram
    ref = reference_gram(copy.deepcopy(model).double(), tuple(t.double() for t in x))
    assert rel_err(g64, ref) <= 1e-10
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k])
    # integer actions survive the cast
    dq = DiscreteQ(mlp(OBS, 3, hidden=(8,)))
    obs, act = x[0], torch.arange(20) % 3
    assert ntk_gram(dq, (obs, act), dtype=F64).dtype == F64


# -------------------------------------------------------------------- 6. SEEM


def _seem_problem():
    model = critic((16, 16), seed=4)
    x = state_actions(32, seed=20)
    obs_next = torch.randn(32, OBS, generator=torch.Generator().manual_seed(21), dtype=F64)
    x_star = (obs_next, torch.sign(torch.randn(32, ACT, generator=torch.Generator().manual_seed(22), dtype=F64)) * 4)
    return model, x, x_star


def test_seem_matches_dense_numpy():
    model, x, x_star = _seem_problem()
    gamma = 0.99
    a = (gamma * reference_gram(model, x, other=x_star) - reference_gram(model, x)).numpy()
    evals = np.linalg.eigvals(a)
    top = evals[np.argmax(evals.real)]
    frob = np.linalg.norm(a, "fro")
    p = sum(t.numel() for t in model.parameters())

    r = seem(model, x, x_star, gamma, return_matrix=True, return_spectrum=True)
    assert isinstance(r, SEEMResult)
    assert r.value == pytest.approx(top.real, rel=1e-8)
    assert r.value > 0  # extreme bootstrap actions: a diverging critic at initialisation
    assert r.frobenius == pytest.approx(frob, rel=1e-10)
    assert r.normalized == pytest.approx(top.real / frob, rel=1e-8)
    assert r.eigenvalue.real == pytest.approx(top.real, rel=1e-8)
    assert abs(r.eigenvalue.imag) == pytest.approx(abs(top.imag), abs=1e-8 * frob)
    assert r.num_params == p
    np.testing.assert_allclose(r.matrix.numpy(), a, rtol=0, atol=1e-10 * frob)
    ours = r.eigenvalues.numpy()
    assert ours.shape == (32,)
    for e in evals:  # same spectrum, as multisets (nearest neighbour both ways)
        assert np.min(np.abs(ours - e)) <= 1e-7 * frob
    for e in ours:
        assert np.min(np.abs(evals - e)) <= 1e-7 * frob

    plain = seem(model, x, x_star, gamma)
    assert plain.matrix is None and plain.eigenvalues is None
    assert plain.solver == "dense"  # auto below N = 512
    assert plain.value == pytest.approx(top.real, rel=1e-8)

    scaled = seem(model, x, x_star, gamma, scale_by_params=True, solver="arnoldi")
    assert scaled.value == pytest.approx(top.real / p, rel=1e-6)
    assert scaled.frobenius == pytest.approx(frob / p, rel=1e-10)
    assert scaled.normalized == pytest.approx(top.real / frob, rel=1e-6)


def test_seem_stable_for_small_gamma_and_row_mismatch():
    model, x, x_star = _seem_problem()
    # gamma = 0: A = -G(X, X) is negative semi-definite, SEEM = -lambda_min(G) <= 0
    g = reference_gram(model, x).numpy()
    r = seem(model, x, x_star, 0.0)
    assert r.value == pytest.approx(-np.linalg.eigvalsh(g)[0], rel=1e-6, abs=1e-9 * np.linalg.norm(g))
    assert r.value <= 1e-9 * np.linalg.norm(g)
    with pytest.raises(ValueError, match="same number of rows"):
        seem(model, x, tuple(t[:20] for t in x_star), 0.99)


def test_seem_eigenvector_and_one_transition_that_carries_it():
    model, x, x_star = _seem_problem()
    r = seem(model, x, x_star, 0.99, return_vector=True, return_matrix=True)
    v = r.eigenvector
    assert v.shape == (32,) and torch.linalg.vector_norm(v).item() == pytest.approx(1.0, rel=1e-10)
    a = r.matrix.to(v.dtype)
    assert torch.linalg.vector_norm(a @ v - r.eigenvalue * v).item() <= 1e-8 * r.frobenius
    assert r.participation == pytest.approx(participation(v))
    assert seem(model, x, x_star, 0.99).eigenvector is None  # only when asked
    arnoldi = seem(model, x, x_star, 0.99, return_vector=True, solver="arnoldi")
    assert arnoldi.solver == "arnoldi"
    assert abs(torch.vdot(arnoldi.eigenvector, v).item()) == pytest.approx(1.0, rel=1e-6)  # the same, up to phase
    assert arnoldi.participation == pytest.approx(r.participation, rel=1e-5)
    # one bootstrap point far out (its gradient ~100x the others'): it alone carries the top eigenvector
    obs_next, act_next = (t.clone() for t in x_star)
    obs_next[7] *= 100
    one = seem(model, x, (obs_next, act_next), 0.99, return_vector=True)
    assert one.participation < 1.2 < r.participation
    assert int(torch.argmax(one.eigenvector.abs())) == 7


def test_participation_by_hand():
    assert participation(torch.tensor([0.0, 3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert participation(torch.tensor([1.0, -1.0, 1.0, 1.0])) == pytest.approx(4.0)
    assert participation(torch.tensor([1.0, 1j, 0.0, 0.0])) == pytest.approx(2.0)
    # shares 0.8 / 0.2: 1 / (0.64 + 0.04)
    assert participation(torch.tensor([2.0, 1.0])) == pytest.approx(1 / 0.68)


# ------------------------------------------------------ 7. max_real_eigenvalue


def _dense_top(a: torch.Tensor) -> complex:
    evals = np.linalg.eigvals(a.numpy())
    return complex(evals[np.argmax(evals.real)])


@pytest.mark.parametrize("n", [300, 600])
def test_arnoldi_matches_dense_on_random_matrices(n):
    gen = torch.Generator().manual_seed(n)
    ginibre = torch.randn(n, n, generator=gen, dtype=F64) / math.sqrt(n)
    q, _ = torch.linalg.qr(torch.randn(n, 2, generator=gen, dtype=F64))
    complex_top = ginibre + q @ torch.tensor([[3.0, 1.0], [-1.0, 3.0]], dtype=F64) @ q.T  # top pair ~ 3 +- i
    for a in (ginibre, complex_top):
        want = _dense_top(a)
        got, used = max_real_eigenvalue(a, "arnoldi")
        assert used == "arnoldi"
        assert got.real == pytest.approx(want.real, rel=1e-6)
        assert abs(got.imag) == pytest.approx(abs(want.imag), rel=1e-6)
    got, used = max_real_eigenvalue(complex_top, "dense")
    assert used == "dense" and got.real == pytest.approx(_dense_top(complex_top).real, rel=1e-12)
    for solver in ("arnoldi", "dense"):  # the eigenvector: A v = lambda v, |v| = 1
        value, v, used = max_real_eigenpair(complex_top, solver)
        assert used == solver and value.real == pytest.approx(_dense_top(complex_top).real, rel=1e-6)
        assert torch.linalg.vector_norm(v).item() == pytest.approx(1.0, rel=1e-10)
        residual = torch.linalg.vector_norm(complex_top.to(v.dtype) @ v - value * v).item()
        assert residual <= 1e-6 * torch.linalg.matrix_norm(complex_top).item()
    assert max_real_eigenvalue(complex_top)[1] == ("arnoldi" if n >= 512 else "dense")


def test_arnoldi_on_diverging_critic():
    model = critic((32, 32), seed=7)
    x = state_actions(320, seed=30)
    gen = torch.Generator().manual_seed(31)
    x_star = (torch.randn(320, OBS, generator=gen, dtype=F64), torch.sign(torch.randn(320, ACT, generator=gen,
                                                                                        dtype=F64)) * 5)
    a = 0.99 * ntk_gram(model, x, other=x_star) - ntk_gram(model, x)
    want = _dense_top(a)
    assert want.real > 0
    got, used = max_real_eigenvalue(a, "arnoldi")
    assert used == "arnoldi"
    assert got.real == pytest.approx(want.real, rel=1e-6)


def test_arnoldi_falls_back_to_dense():
    # clustered spectrum: eigenvalues 1 + 1e-3 k, k = 0..399, hidden by a random similarity
    n = 400
    gen = torch.Generator().manual_seed(1)
    basis = torch.randn(n, n, generator=gen, dtype=F64) / math.sqrt(n) + torch.eye(n, dtype=F64)
    a = basis @ torch.diag(1 + 1e-3 * torch.arange(n, dtype=F64)) @ torch.linalg.inv(basis)
    got, used = max_real_eigenvalue(a, "arnoldi", krylov=2, restarts=1)
    assert used == "dense"
    assert got.real == pytest.approx(_dense_top(a).real, rel=1e-9)
    assert got.real == pytest.approx(1 + 1e-3 * (n - 1), rel=1e-8)
    with pytest.raises(ValueError, match="solver"):
        max_real_eigenvalue(a, "lanczos")


# ---------------------------------------------------------- 8. Gram statistics

K = torch.tensor([[2.0, 1.0, -1.0], [1.0, 4.0, 0.0], [-1.0, 0.0, 1.0]], dtype=F64)


def test_row_ratio_and_stats_by_hand():
    # row i: (1/3) * (sum_{j != i} |K_ij|) / K_ii = (1/3) * [2/2, 1/4, 1/1]
    torch.testing.assert_close(row_ratio(K), torch.tensor([1 / 3, 1 / 12, 1 / 3], dtype=F64))
    stats = gram_stats(K)
    assert stats["diag_mean"] == pytest.approx(7 / 3)
    assert stats["offdiag_abs_mean"] == pytest.approx(4 / 6)  # |1|+|-1|+|1|+|0|+|-1|+|0| over 6 entries
    assert stats["row_ratio_mean"] == pytest.approx(1 / 4)  # (4/12 + 1/12 + 4/12) / 3


def test_gram_cosine_by_hand():
    assert gram_cosine(K, K) == pytest.approx(1.0)
    assert gram_cosine(K, -K) == pytest.approx(-1.0)
    assert gram_cosine(K, 3.7 * K) == pytest.approx(1.0)
    assert gram_cosine(K.float(), 0.01 * K.float()) == pytest.approx(1.0, rel=1e-6)
    # ||K||_F = 5 (4+1+1+1+16+1+1 = 25), <K, I> = trace = 7, ||I||_F = sqrt(3)
    assert gram_cosine(K, torch.eye(3, dtype=F64)) == pytest.approx(7 / (5 * math.sqrt(3)))


def test_contraction_fraction_by_hand():
    # off-diagonal abs row sums [2, 1, 1], diagonal [2, 4, 1]
    # gamma = 0.5: 1.5 * off <= 0.5 * diag  <=>  off <= diag / 3: only row 1 (1 <= 4/3)
    assert contraction_fraction(K, 0.5) == pytest.approx(1 / 3)
    # gamma = 0.9: off <= diag / 19: none (row 1: 1 > 4/19)
    assert contraction_fraction(K, 0.9) == 0.0
    # gamma = 0: off <= diag, equality counts: every row
    assert contraction_fraction(K, 0.0) == 1.0
    # weights rho = [1, 3, 1], gamma = 0: row 0: 1*3 + 1*1 = 4 > 2*1; row 1: 1 <= 4*3; row 2: 1 <= 1*1
    assert contraction_fraction(K, 0.0, rho=torch.tensor([1.0, 3.0, 1.0], dtype=F64)) == pytest.approx(2 / 3)


# ------------------------------- 9. mutation-testing additions (issue 19)
# Each test below was written against a planted single-line bug that the suite above let
# through; the bug it catches is named in its docstring.


def test_stable_critic_keeps_the_sign_and_the_largest_real_part_on_every_path():
    """A stable critic: the top eigenvalue of A is complex with a *negative* real part, and the
    eigenvalue of largest modulus is another one. Catches: ``normalized = |lambda| / ||A||_F``
    (sign lost), and picking the largest modulus instead of the largest real part in the
    ``return_spectrum`` path or in the dense eigenpair path."""
    model, x, (obs_next, act_next) = _seem_problem()
    x_star = (obs_next, act_next / 8)  # mild bootstrap actions: no self-excitation
    gamma = 0.9
    a = (gamma * reference_gram(model, x, other=x_star) - reference_gram(model, x)).numpy()
    evals = np.linalg.eigvals(a)
    top = evals[np.argmax(evals.real)]
    frob = np.linalg.norm(a, "fro")
    assert top.real < -5e-4 * frob and abs(top.imag) > 5e-4 * frob  # negative real part, complex pair
    assert np.argmax(np.abs(evals)) != np.argmax(evals.real)  # the largest modulus is elsewhere
    for kwargs in ({}, {"return_spectrum": True}, {"return_vector": True, "solver": "dense"},
                   {"return_spectrum": True, "return_vector": True}, {"solver": "arnoldi"}):
        r = seem(model, x, x_star, gamma, return_matrix=True, **kwargs)
        assert r.value == pytest.approx(top.real, rel=1e-6), kwargs
        assert r.normalized == pytest.approx(top.real / frob, rel=1e-6), kwargs
        assert r.normalized < 0, kwargs
        assert abs(r.eigenvalue.imag) == pytest.approx(abs(top.imag), rel=1e-6), kwargs
        if r.eigenvector is not None:  # A v = lambda v for the eigenvalue of largest real part
            v = r.eigenvector
            assert torch.linalg.vector_norm(r.matrix.to(v.dtype) @ v - r.eigenvalue * v).item() <= 1e-8 * frob


def test_arnoldi_accepts_only_below_its_residual_tolerance():
    """Restarted Arnoldi with a small Krylov space needs several cycles; the accepted Ritz pair
    must meet the documented residual ``||A v - theta v|| <= tol ||A||_F`` (tol = 1e-8 in float64),
    not a looser one (a planted 1000x looser acceptance stops cycles early at ~3e-6)."""
    n = 200
    gen = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(n, 1, generator=gen, dtype=F64))
    a = torch.randn(n, n, generator=gen, dtype=F64) / math.sqrt(n) + 1.3 * (q @ q.T)  # top ~1.375, next ~0.99
    frob = torch.linalg.matrix_norm(a).item()
    want = _dense_top(a)
    for tol, rel in ((None, 1e-8), (1e-6, 1e-5)):
        value, v, used = max_real_eigenpair(a, "arnoldi", krylov=8, restarts=200, tol=tol)
        assert used == "arnoldi"
        residual = torch.linalg.vector_norm(a.to(v.dtype) @ v - value * v).item()
        assert residual <= (tol or 1e-8) * frob
        assert value.real == pytest.approx(want.real, rel=rel)
