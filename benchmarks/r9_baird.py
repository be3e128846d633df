"""R9: Baird's counterexample (Sutton & Barto, 2nd ed., Example 11.1, Figures 11.1-11.2).

Seven states, eight weights. Upper states i = 1..6 have features ``2 e_i + e_8``
(``v = 2 w_i + w_8``), the lower state 7 has ``e_7 + 2 e_8`` (``v = w_7 + 2 w_8``).
Behaviour policy: *dashed* with probability 6/7 (to one of the six upper states,
uniformly), *solid* with probability 1/7 (to state 7); the target policy always
takes *solid*. Reward 0, gamma = 0.99, step size alpha = 0.01,
``w_0 = (1, 1, 1, 1, 1, 1, 10, 1)``. The true values are 0, representable with w = 0.

Two update rules, as in Figure 11.2:

* ``sampled`` (left panel): semi-gradient off-policy TD(0) along one behaviour
  trajectory, ``w += alpha rho delta grad v(S)`` with ``rho = pi/b`` = 7 on solid,
  0 on dashed, ``delta = gamma v(S') - v(S)`` (5 seeds);
* ``expected`` (right panel): semi-gradient DP, ``w += alpha/|S| sum_s
  (gamma v(7) - v(s)) grad v(s)`` (the expectation of the sampled update under the
  uniform state distribution, which is the behaviour policy's stationary one).

Three value functions: ``linear`` (the book's ``v = w . phi(s)``); ``layernorm``:
``v = w . LN(phi(s))`` with a LayerNorm over the 8 features *without* learned
gain/bias (so still linear in w with fixed normalised features); ``layernorm_affine``:
``v = w . (g * LN_hat(phi(s)) + b)`` with the LayerNorm's own learned gain g
(init 1) and bias b (init 0) updated by the same semi-gradient rule.

For a value linear in w (``linear``, ``layernorm``) the expected update is
``w += alpha A w`` with ``A = (1/7) sum_s x(s) (gamma x(7) - x(s))^T``: it diverges
iff A has an eigenvalue of positive real part (on the span of the features), which
the JSON reports. Diverges means ``||theta_T|| >= 100 ||theta_0||`` or non-finite;
converges means finite, ``max_t ||theta_t|| <= 10 ||theta_0||`` and the largest TD
error under the target policy, ``max_s |gamma v(7) - v(s)|``, below 1e-3 at the end.

    python benchmarks/r9_baird.py [--steps 5000] [--seeds 5]
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from harness import argument_parser, claim, environment, parse_args, save_figure, write_result  # noqa: E402

GAMMA, ALPHA = 0.99, 0.01
W0 = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 10.0, 1.0)
LOWER = 6  # index of state 7
KINDS = ("linear", "layernorm", "layernorm_affine")
RULES = ("expected", "sampled")


def baird_features() -> Tensor:
    """``(7, 8)`` feature matrix of Figure 11.1."""
    phi = torch.zeros(7, 8, dtype=torch.float64)
    phi[torch.arange(6), torch.arange(6)] = 2.0
    phi[:6, 7] = 1.0
    phi[LOWER, 6], phi[LOWER, 7] = 1.0, 2.0
    return phi


class BairdValue(nn.Module):
    """``v(s) = w . x(s)`` with ``x = phi``, ``LN(phi)`` or ``g * LN_hat(phi) + b`` (module docstring)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.register_buffer("phi", baird_features())
        self.w = nn.Parameter(torch.tensor(W0, dtype=torch.float64))
        self.norm = None if kind == "linear" else nn.LayerNorm(8, elementwise_affine=kind == "layernorm_affine",
                                                                dtype=torch.float64)

    def features(self, states: Tensor) -> Tensor:
        x = self.phi[states]
        return x if self.norm is None else self.norm(x)

    def forward(self, states: Tensor) -> Tensor:
        return self.features(states) @ self.w


def semi_gradient_step(v: BairdValue, states: Tensor, weights: Tensor) -> None:
    """``theta += alpha sum_k weights_k delta_k grad v(s_k)`` with the target ``gamma v(7)``
    held fixed (semi-gradient): the gradient of ``sum_k weights_k delta_k v(s_k)``."""
    with torch.no_grad():
        delta = GAMMA * v(torch.tensor([LOWER])) - v(states)
    params = list(v.parameters())
    grads = torch.autograd.grad((weights * delta * v(states)).sum(), params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(g, alpha=ALPHA)


def run(kind: str, rule: str, steps: int, seed: int) -> dict[str, list[float]]:
    """One run; per step the parameter norm ``||theta||`` and ``max_s |gamma v(7) - v(s)|``."""
    v = BairdValue(kind)
    gen = torch.Generator().manual_seed(seed)
    all_states = torch.arange(7)
    state = int(torch.randint(7, (1,), generator=gen))
    norms, td = [], []
    for _ in range(steps):
        if rule == "expected":
            semi_gradient_step(v, all_states, torch.full((7,), 1 / 7, dtype=torch.float64))
        else:
            solid = float(torch.rand(1, generator=gen)) < 1 / 7
            nxt = LOWER if solid else int(torch.randint(6, (1,), generator=gen))
            rho = 7.0 if solid else 0.0  # pi(solid) / b(solid) = 1 / (1/7); pi(dashed) = 0
            semi_gradient_step(v, torch.tensor([state]), torch.tensor([rho], dtype=torch.float64))
            state = nxt
        with torch.no_grad():
            values = v(all_states)
            norms.append(float(torch.linalg.vector_norm(torch.cat([p.reshape(-1) for p in v.parameters()]))))
            td.append(float((GAMMA * values[LOWER] - values).abs().max()))
    return {"norm": norms, "td": td, "norm0": math.sqrt(sum(x * x for x in W0)) if kind != "layernorm_affine"
            else math.sqrt(sum(x * x for x in W0) + 8)}


def verdict(r: dict[str, list[float]]) -> dict[str, object]:
    """diverged / converged by the module docstring's definitions, with the numbers behind them."""
    norms, td = r["norm"], r["td"]
    finite = all(math.isfinite(x) for x in norms)
    first_nan = next((t + 1 for t, x in enumerate(norms) if not math.isfinite(x)), None)
    final = norms[-1]
    peak = max((x for x in norms if math.isfinite(x)), default=math.inf)
    return {"final_norm": final, "max_norm": peak, "final_max_td_error": td[-1], "first_nonfinite_step": first_nan,
            "diverged": (not finite) or final >= 100 * r["norm0"],
            "converged": finite and peak <= 10 * r["norm0"] and td[-1] < 1e-3}


def expected_update_eigenvalue(kind: str) -> float:
    """Largest real part of the eigenvalues of A on the span of the features (a value linear in w).

    ``A = X^T M X`` with ``M = (gamma 1 e_7^T - I) / 7``; its nonzero eigenvalues are those of
    the 7 x 7 matrix ``M X X^T`` (w orthogonal to the features' span never moves).
    """
    x = BairdValue(kind).features(torch.arange(7)).detach()
    m = (GAMMA * torch.ones(7, 1, dtype=x.dtype) * torch.eye(7, dtype=x.dtype)[LOWER] - torch.eye(7, dtype=x.dtype)) / 7
    return float(torch.linalg.eigvals(m @ x @ x.T).real.max())


def plot(runs: dict, steps: int, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = {"linear": "tab:red", "layernorm": "tab:orange", "layernorm_affine": "tab:blue"}
    labels = {"linear": "linear (book)", "layernorm": "LayerNorm, no gain/bias",
              "layernorm_affine": "LayerNorm with learned gain/bias"}
    t = range(1, steps + 1)
    for ax, rule in zip(axes[:2], RULES):
        for kind in KINDS:
            for i, r in enumerate(runs[rule][kind]):
                ax.plot(t, r["norm"], color=colors[kind], lw=1.2 if i == 0 else 0.5, alpha=1 if i == 0 else 0.5,
                        label=labels[kind] if i == 0 else None)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("||theta||")
        ax.set_title(f"{'semi-gradient DP (expected)' if rule == 'expected' else 'semi-gradient off-policy TD(0), 5 seeds'}")
        ax.legend(fontsize=8)
    for kind in KINDS:
        axes[2].plot(t, runs["expected"][kind][0]["td"], color=colors[kind], label=labels[kind])
    axes[2].set_yscale("log")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("max_s |gamma v(7) - v(s)|")
    axes[2].set_title("TD error under the target policy (expected updates)")
    axes[2].legend(fontsize=8)
    save_figure(fig, path, "Baird's counterexample, gamma = 0.99, alpha = 0.01, w0 = (1,1,1,1,1,1,10,1); "
                "NaN/inf ends a line", dpi=110)


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--seeds", type=int, default=5, help="trajectories of the sampled rule")
    args = parse_args(parser, smoke={"steps": 100, "seeds": 1})
    started = time.perf_counter()
    runs = {rule: {kind: [run(kind, rule, args.steps, seed) for seed in range(1 if rule == "expected" else args.seeds)]
                   for kind in KINDS} for rule in RULES}
    verdicts = {rule: {kind: [verdict(r) for r in runs[rule][kind]] for kind in KINDS} for rule in RULES}
    claims = []
    expectations = {"linear": ("diverges", "Sutton & Barto Example 11.1 / Figure 11.2"),
                    "layernorm": ("converges", "LayerNorm in front of the linear head (the brief; cf. Gallici et "
                                               "al. 2024 for LayerNorm in TD)"),
                    "layernorm_affine": ("converges", "same, LayerNorm with learned gain/bias")}
    for kind in KINDS:
        expected, source = expectations[kind]
        for rule in RULES:
            vs = verdicts[rule][kind]
            key = "diverged" if expected == "diverges" else "converged"
            claims.append(claim(
                f"{kind}, {rule} update: {expected}" + (f" (all {len(vs)} seeds)" if len(vs) > 1 else ""),
                f"{expected} ({source})",
                {"diverged": [v["diverged"] for v in vs], "converged": [v["converged"] for v in vs],
                 "final_norm": [v["final_norm"] for v in vs], "final_max_td_error": [v["final_max_td_error"] for v in vs],
                 "first_nonfinite_step": [v["first_nonfinite_step"] for v in vs]},
                all(v[key] for v in vs)))
    result = {
        "claims": claims,
        "setting": {"gamma": GAMMA, "alpha": ALPHA, "w0": W0, "steps": args.steps, "sampled_seeds": args.seeds,
                    "dtype": "float64", "layernorm_eps": 1e-5},
        "definitions": {"diverged": "||theta_T|| >= 100 ||theta_0|| or non-finite",
                        "converged": "finite, max_t ||theta_t|| <= 10 ||theta_0||, max_s |gamma v(7) - v(s)| < 1e-3 "
                                     "at step T",
                        "theta": "all learned parameters (w; and the LayerNorm gain/bias for layernorm_affine)"},
        "expected_update_max_real_eigenvalue": {k: expected_update_eigenvalue(k) for k in ("linear", "layernorm")},
        "expected_update_note": "for a value linear in w, w_{t+1} = (I + alpha A) w_t: a positive eigenvalue on the "
                                "features' span means divergence. LN without gain/bias is a fixed feature map, so "
                                "this test applies to it as well",
        "note_layernorm_affine_sampled": "with learned gain g the value is bilinear in (w, g); one solid step "
                                         "(rho = 7, w_7 = 10, |delta| ~ 10) moves g by alpha * rho * delta * w * x_hat "
                                         "~ 10-20, far outside the small-step regime, and the iterates overflow "
                                         "(first_nonfinite_step); the expected (DP) update of the same model converges",
        "verdicts": verdicts,
        "curves_every_50_steps": {rule: {kind: {"norm": runs[rule][kind][0]["norm"][::50],
                                                "td": runs[rule][kind][0]["td"][::50]} for kind in KINDS}
                                  for rule in RULES},
        **environment({"r9_baird_py": Path(__file__)}),
    }
    plot(runs, args.steps, args.out / "r9_baird.png")
    write_result("r9_baird", result, started, args.out)


if __name__ == "__main__":
    main()
