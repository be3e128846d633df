"""R7: Lemma 1 of Yue et al. (2023) on a critic taken from a diverged run (docs/design.md 5.4).

Scaling every parameter of a bias-free L-layer ReLU MLP by lambda scales its output
by lambda^L, its parameter gradient by lambda^(L-1) and its NTK by lambda^(2(L-1));
published check for L = 3: lambda = 5 -> 125, 25, 625 and lambda = 10 -> 1000, 100, 10^4.

The critic: ``mlp(4, 1, hidden=(64, 64))`` (3 Linear layers, ReLU, PyTorch's
default init) with every bias removed, trained on the random-walk toy of
:mod:`lit_qlearn.toys` (64 transitions, reward 0, target ``gamma max_d Q(s', d)``
of the *current* network, gamma = 0.99, full-batch Adam lr 1e-3) until the mean
|Q| on the data exceeds 1e4 (the true Q is 0: a diverged run). On its 64 inputs
X = (s, d), in float64, with theta the trained parameters:

* output factor: ``||f_{lambda theta}(X)|| / ||f_theta(X)||`` (and the worst per-sample ratio);
* gradient factor: ``||grad_theta sum_i f(x_i)||`` at lambda theta over the same at theta
  (plain autograd, independent of the NTK engine);
* NTK factor: ``||G_{lambda theta}(X, X)||_F / ||G_theta(X, X)||_F`` with
  :func:`lit_qlearn.ntk.ntk_gram` (and the worst entry-wise ratio).

A claim holds when the measured factor is within 1% of lambda^L, lambda^(L-1),
lambda^(2(L-1)). For contrast (no claim) the same numbers for the same critic *with*
biases trained the same way: the law then holds only as far as the biases are negligible.

    python benchmarks/r7_homogeneity.py
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import lit_qlearn.ntk  # noqa: E402
from harness import argument_parser, claim, environment, parse_args, save_figure, write_result  # noqa: E402
from lit_qlearn.networks import mlp  # noqa: E402
from lit_qlearn.ntk import ntk_gram  # noqa: E402
from lit_qlearn.toys import compass_directions, random_walk  # noqa: E402

LAMBDAS = (5.0, 10.0)
PUBLISHED = {5.0: (125, 25, 625), 10.0: (1000, 100, 10_000)}
TOLERANCE = 0.01
HIDDEN = (64, 64)
DEPTH = len(HIDDEN) + 1  # L: Linear layers


def critic(bias: bool, seed: int) -> nn.Sequential:
    """``mlp(4, 1, HIDDEN)``, biases removed unless ``bias``."""
    torch.manual_seed(seed)
    net = mlp(4, 1, hidden=HIDDEN)
    if not bias:
        for layer in net:
            if isinstance(layer, nn.Linear):
                layer.bias = None
    return net


def diverge(net: nn.Sequential, seed: int, q_limit: float, max_steps: int, lr: float) -> dict:
    """TD on the random-walk toy with target = the current network, until mean |Q(X)| > q_limit."""
    data = random_walk(64, seed=seed)
    dirs = compass_directions()
    x = torch.cat([data.obs, data.act], 1)
    succ = torch.cat([data.next_obs.repeat_interleave(8, 0), dirs.repeat(64, 1)], 1)  # (s', d) for all 8 d
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    history = []
    for step in range(1, max_steps + 1):
        with torch.no_grad():
            target = 0.99 * net(succ).view(64, 8).max(1).values
        q = net(x).squeeze(1)
        loss = (q - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        q_abs = q.detach().abs().mean().item()
        history.append(q_abs)
        if q_abs > q_limit:
            break
    return {"x": x, "steps": step, "mean_abs_q": q_abs, "history": history}


def scaled(net: nn.Module, lam: float) -> nn.Module:
    out = copy.deepcopy(net)
    with torch.no_grad():
        for p in out.parameters():
            p.mul_(lam)
    return out


def grad_of_sum(net: nn.Module, x: Tensor) -> Tensor:
    params = list(net.parameters())
    grads = torch.autograd.grad(net(x).sum(), params)
    return torch.cat([g.reshape(-1) for g in grads])


def factors(net: nn.Module, x: Tensor, lam: float) -> dict[str, float]:
    """The three measured factors of lambda-scaling, and the worst per-entry ratios."""
    big = scaled(net, lam)
    with torch.no_grad():
        f0, f1 = net(x).squeeze(1), big(x).squeeze(1)
    g0, g1 = grad_of_sum(net, x), grad_of_sum(big, x)
    k0, k1 = ntk_gram(net, x), ntk_gram(big, x)
    ratio_f, ratio_k = f1 / f0, k1 / k0
    return {"output": (f1.norm() / f0.norm()).item(), "gradient": (g1.norm() / g0.norm()).item(),
            "ntk": (torch.linalg.matrix_norm(k1) / torch.linalg.matrix_norm(k0)).item(),
            "output_per_sample_min": ratio_f.min().item(), "output_per_sample_max": ratio_f.max().item(),
            "ntk_entry_min": ratio_k.min().item(), "ntk_entry_max": ratio_k.max().item()}


def plot(histories: dict[str, list[float]], measured: dict[str, dict], path: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, h in histories.items():
        a.plot(range(1, len(h) + 1), h, label=name)
    a.set_yscale("log")
    a.set_xlabel("TD step (Adam, lr 1e-3)")
    a.set_ylabel("mean |Q| on the data (true Q = 0)")
    a.set_title("the diverged runs the critics are taken from")
    a.legend()
    kinds = ("output", "gradient", "ntk")
    width = 0.2
    for i, (name, m) in enumerate(measured.items()):
        for j, lam in enumerate(LAMBDAS):
            # |measured / predicted - 1|, floored at float64 round-off so that a bar is drawn
            vals = [max(abs(m[str(lam)][k] / PUBLISHED[lam][n] - 1), 1e-16) for n, k in enumerate(kinds)]
            b.bar([n + (2 * i + j) * width for n in range(3)], vals, width,
                  label=f"{name}, lambda = {lam:g}")
    b.axhline(TOLERANCE, color="g", lw=1.2, ls="--", label="1% (the claims' tolerance)")
    b.set_yscale("log")
    b.set_xticks([n + 1.5 * width for n in range(3)], ["output vs lambda^3", "gradient vs lambda^2", "NTK vs lambda^4"])
    b.set_ylabel("|measured factor / Lemma 1's factor - 1|")
    b.set_title("Lemma 1 (L = 3)")
    b.legend(fontsize=8)
    save_figure(fig, path, dpi=110)


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--q-limit", type=float, default=1e4, help="stop training when mean |Q| exceeds this")
    parser.add_argument("--max-steps", type=int, default=20_000)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parse_args(parser, smoke={"max_steps": 50})
    started = time.perf_counter()
    torch.set_default_dtype(torch.float32)
    runs, measured, bias_share = {}, {}, {}
    for name, bias in (("bias-free", False), ("with biases", True)):
        net = critic(bias, args.seed)
        run = diverge(net, args.seed, args.q_limit, args.max_steps, args.lr)
        net64, x64 = net.double(), run["x"].double()
        runs[name] = run
        measured[name] = {str(lam): factors(net64, x64, lam) for lam in LAMBDAS}
        biases = [m.bias for m in net64 if isinstance(m, nn.Linear) and m.bias is not None]
        bias_share[name] = (torch.cat([b.reshape(-1) for b in biases]).norm() / lit_qlearn.ntk.parameter_norm(
            net64.parameters())).item() if biases else 0.0
    claims = []
    for lam in LAMBDAS:
        m = measured["bias-free"][str(lam)]
        for kind, exponent, pub in zip(("output", "gradient", "ntk"), (DEPTH, DEPTH - 1, 2 * (DEPTH - 1)),
                                       PUBLISHED[lam]):
            claims.append(claim(f"lambda = {lam:g}: {kind} scales by lambda^{exponent} = {pub} (within 1%)", pub,
                                m[kind], abs(m[kind] / pub - 1) <= TOLERANCE))
    result = {
        "claims": claims,
        "setting": {"critic": f"mlp(4, 1, hidden={HIDDEN}) without biases, ReLU, PyTorch default init, L = {DEPTH}",
                    "training": "random-walk toy (64 transitions, seed), target 0.99 max_d Q(s', d) of the current "
                                f"network, full-batch Adam lr {args.lr}, until mean |Q| > {args.q_limit:g}",
                    "measurement": "float64, on the 64 training inputs (s, d)", "seed": args.seed},
        "diverged_run": {name: {"steps": r["steps"], "mean_abs_q": r["mean_abs_q"]} for name, r in runs.items()},
        "measured": measured,
        "contrast_with_biases": {"bias_share_of_parameter_norm": bias_share["with biases"],
                                 "note": "no claim: Lemma 1 needs negligible biases; the factors of the critic with "
                                         "biases are listed under measured['with biases']"},
        **environment({"ntk_py": Path(lit_qlearn.ntk.__file__), "r7_homogeneity_py": Path(__file__)}),
    }
    plot({n: r["history"] for n, r in runs.items()}, measured, args.out / "r7_homogeneity.png")
    write_result("r7_homogeneity", result, started, args.out)
    for name, m in measured.items():
        print(f"  {name:12s} " + "  ".join(f"lambda={lam}: out {m[lam]['output']:.6g}, grad {m[lam]['gradient']:.6g}, "
                                           f"ntk {m[lam]['ntk']:.6g}" for lam in m))


if __name__ == "__main__":
    main()
