"""The NTK authors' recipe (Yue et al. 2023's code: one forward and one
``torch.autograd.grad`` per sample, dense products, dense eigenvalues) and the torch.func
NTK tutorial's Jacobian contraction: what benchmarks/ntk_speed.py measures lit_qlearn's
structured engine (``lit_qlearn.ntk``) against. Each returns its result with the wall time
of its phases."""
from __future__ import annotations

import time

import numpy as np
import torch
from torch.func import functional_call, jacrev, vmap

__all__ = ["authors_gram", "authors_seem", "per_sample_jacobian", "torch_func_gram"]


def per_sample_jacobian(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The authors' recipe: forward and backward one sample at a time, rows of J (N x P)."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = inputs[0].shape[0]
    jac = torch.empty(n, sum(p.numel() for p in params))
    for i in range(n):
        out = model(*(x[i:i + 1] for x in inputs)).sum()
        grads = torch.autograd.grad(out, params)
        torch.cat([g.reshape(-1) for g in grads], out=jac[i])
    return jac


def authors_gram(model, inputs) -> tuple[torch.Tensor, dict[str, float]]:
    """(a): J from the per-sample loop, then J J^T. Returns G and the phase times."""
    t0 = time.perf_counter()
    jac = per_sample_jacobian(model, inputs)
    t1 = time.perf_counter()
    gram = jac @ jac.T
    t2 = time.perf_counter()
    del jac
    return gram, {"per_sample": t1 - t0, "product": t2 - t1}


def torch_func_gram(model, inputs, chunk_size: int = 512) -> tuple[torch.Tensor, dict[str, float]]:
    """(b): per-sample Jacobians by vmap(jacrev) + functional_call, contracted parameter by parameter."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, *xs):
        return functional_call(model, p, tuple(x.unsqueeze(0) for x in xs)).reshape(())

    t0 = time.perf_counter()
    jac = vmap(jacrev(f), in_dims=(None,) + (0,) * len(inputs), chunk_size=chunk_size)(params, *inputs)
    t1 = time.perf_counter()
    n = inputs[0].shape[0]
    gram = None
    for j in jac.values():
        j = j.reshape(n, -1)
        gram = j @ j.T if gram is None else gram.addmm_(j, j.T)
    t2 = time.perf_counter()
    del jac
    return gram, {"per_sample": t1 - t0, "product": t2 - t1}


def authors_seem(model, x, x_star, gamma: float) -> dict:
    """The authors' SEEM: per-sample loops, dense products, /P, float64 numpy eigenvalues."""
    t0 = time.perf_counter()
    jac = per_sample_jacobian(model, x)
    jac_star = per_sample_jacobian(model, x_star)
    t1 = time.perf_counter()
    p = jac.shape[1]
    a = (gamma * (jac_star @ jac.T) - jac @ jac.T) / p
    del jac, jac_star
    t2 = time.perf_counter()
    a64 = a.double().numpy()
    evals = np.linalg.eigvals(a64)
    top = evals[np.argmax(evals.real)]
    frob = float(np.linalg.norm(a64))
    t3 = time.perf_counter()
    return {"time_s": t3 - t0, "phases_s": {"per_sample": t1 - t0, "products": t2 - t1, "eigvals": t3 - t2},
            "seem": float(top.real), "eigenvalue_imag": float(top.imag), "normalized": float(top.real) / frob,
            "frobenius": frob}
