"""R5: NTK diagonal and row-ratio trends of Q-networks at initialisation (PreQN,
Achiam, Knight & Abbeel 2019; docs/design.md 5.5).

Inputs: 1000 states of Ant-v5 visited by a uniformly random policy (raw, 105-d,
``gymnasium.make("Ant-v5")``, reset seed 0, resets at episode ends), each
concatenated with a fresh uniformly random action (8-d): a Q-network's
``(s, a)`` input, 113-d. Networks: ``mlp(113, 1, hidden=(width,) * depth,
activation)`` for activation in relu / tanh / sin / elu / mish, width in 32..1024,
depth (hidden layers) 1..4, ``--seeds`` seeds each, under two initialisations:

* ``pytorch``: PyTorch's default ``nn.Linear`` init, weights and biases
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (what ``mlp`` builds);
* ``glorot``: Glorot-uniform weights and zero biases, TensorFlow's default and so
  what PreQN's TensorFlow code (Spinning Up) used.

For each network the raw empirical NTK ``K = G(X, X)`` (1000 x 1000, all
parameters, :func:`lit_qlearn.ntk.ntk_gram`) gives ``diag_mean = mean_i K_ii`` and
``row_ratio_mean = mean_i R_i`` with ``R_i = (1/N) sum_{j != i} |K_ij| / K_ii``
(:func:`lit_qlearn.ntk.row_ratio`); both are averaged over seeds.

Claims (per init), with ``holds`` computed as stated:

* ReLU has the largest / sin the lowest row ratio: of the per-activation row ratio
  averaged over every width and depth; the share of (width, depth) cells where it is
  so is reported too;
* ReLU has the largest diagonal (docs/design.md 5.5's reading of the paper): the same on the diagonal;
* the diagonal grows with width: the least-squares slope of log diag_mean against
  log width is > 0 for every (activation, depth);
* the diagonal shrinks with depth: slope of log diag_mean against depth < 0 for every
  (activation, width);
* the row ratio grows with depth: slope of row_ratio_mean against depth > 0 for every
  (activation, width).

    python benchmarks/r5_ntk_trends.py [--seeds 5] [--widths 32,64,128,256,512,1024]
"""
from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import gymnasium as gym  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import lit_qlearn.ntk  # noqa: E402
from harness import argument_parser, claim, environment, parse_args, save_figure, write_result  # noqa: E402
from lit_qlearn.networks import mlp  # noqa: E402
from lit_qlearn.ntk import ntk_gram, row_ratio  # noqa: E402

ACTS = ("relu", "tanh", "sin", "elu", "mish")
INITS = ("pytorch", "glorot")
COLORS = dict(zip(ACTS, ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange")))


def ant_inputs(n: int, seed: int = 0) -> Tensor:
    """``(n, 113)``: Ant-v5 states under a random policy, each with a random action."""
    env = gym.make("Ant-v5")
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    states = []
    for _ in range(n):
        states.append(obs)
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            obs, _ = env.reset()
    env.close()
    actions = np.random.default_rng(seed + 1).uniform(-1, 1, size=(n, env.action_space.shape[0]))
    return torch.as_tensor(np.concatenate([np.asarray(states), actions], 1), dtype=torch.float32)


def network(in_dim: int, activation: str, width: int, depth: int, init: str, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    net = mlp(in_dim, 1, hidden=(width,) * depth, activation=activation)
    if init == "glorot":
        for layer in net:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
    return net


def slope(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.polyfit(x, y, 1)[0])


def trend_claims(init: str, table: dict, widths: list[int], depths: list[int]) -> list[dict]:
    """The claims of the module docstring on one init's seed-averaged ``table[act][(w, d)]``."""
    def avg(key: str) -> dict[str, float]:
        return {a: float(np.mean([table[a][c][key] for c in table[a]])) for a in ACTS}

    def share_extreme(key: str, act: str, fn) -> float:
        cells = list(table[ACTS[0]])
        return float(np.mean([fn(ACTS, key=lambda a: table[a][c][key]) == act for c in cells]))

    rr, dg = avg("row_ratio_mean"), avg("diag_mean")
    width_slopes = {f"{a}/depth{d}": slope(np.log(widths), np.log([table[a][(w, d)]["diag_mean"] for w in widths]))
                    for a in ACTS for d in depths}
    depth_diag = {f"{a}/width{w}": slope(np.array(depths), np.log([table[a][(w, d)]["diag_mean"] for d in depths]))
                  for a in ACTS for w in widths}
    depth_rr = {f"{a}/width{w}": slope(np.array(depths), np.array([table[a][(w, d)]["row_ratio_mean"] for d in depths]))
                for a in ACTS for w in widths}
    tag = f"[{init} init] "
    return [
        claim(tag + "ReLU has the largest row ratio", "largest",
              {"row_ratio_by_activation": rr, "share_of_cells_relu_largest": share_extreme("row_ratio_mean", "relu", max)},
              max(rr, key=rr.get) == "relu"),
        claim(tag + "sin has the lowest row ratio", "lowest",
              {"row_ratio_by_activation": rr, "share_of_cells_sin_lowest": share_extreme("row_ratio_mean", "sin", min)},
              min(rr, key=rr.get) == "sin"),
        claim(tag + "ReLU has the largest NTK diagonal", "largest",
              {"diag_by_activation": dg, "share_of_cells_relu_largest": share_extreme("diag_mean", "relu", max)},
              max(dg, key=dg.get) == "relu"),
        claim(tag + "diagonal grows with width (every activation, depth)", "grows",
              {"min_slope_log_diag_vs_log_width": min(width_slopes.values()),
               "share_positive": float(np.mean([s > 0 for s in width_slopes.values()]))},
              all(s > 0 for s in width_slopes.values())),
        claim(tag + "diagonal shrinks with depth (every activation, width)", "shrinks",
              {"max_slope_log_diag_vs_depth": max(depth_diag.values()),
               "share_negative": float(np.mean([s < 0 for s in depth_diag.values()])),
               "positive_curves": [k for k, s in depth_diag.items() if s >= 0]},
              all(s < 0 for s in depth_diag.values())),
        claim(tag + "row ratio grows with depth (every activation, width)", "grows",
              {"min_slope_row_ratio_vs_depth": min(depth_rr.values()),
               "share_positive": float(np.mean([s > 0 for s in depth_rr.values()])),
               "non_positive_curves": [k for k, s in depth_rr.items() if s <= 0]},
              all(s > 0 for s in depth_rr.values())),
    ]


def plot(tables: dict, widths: list[int], depths: list[int], width_at: int, depth_at: int, path: Path) -> None:
    fig, axes = plt.subplots(len(INITS), 4, figsize=(19, 4.2 * len(INITS)), squeeze=False)
    for row, init in enumerate(INITS):
        t = tables[init]
        panels = [("diag_mean", "width", depth_at), ("diag_mean", "depth", width_at),
                  ("row_ratio_mean", "width", depth_at), ("row_ratio_mean", "depth", width_at)]
        for ax, (key, axis, fixed) in zip(axes[row], panels):
            for a in ACTS:
                if axis == "width":
                    xs, ys = widths, [t[a][(w, fixed)][key] for w in widths]
                else:
                    xs, ys = depths, [t[a][(fixed, d)][key] for d in depths]
                ax.plot(xs, ys, "o-", color=COLORS[a], label=a)
            if axis == "width":
                ax.set_xscale("log", base=2)
            if key == "diag_mean":
                ax.set_yscale("log")
            ax.set_xlabel(axis + (" (hidden layers)" if axis == "depth" else ""))
            ax.set_ylabel("mean K_ii" if key == "diag_mean" else "mean row ratio")
            ax.set_title(f"{init} init, {'depth' if axis == 'width' else 'width'} {fixed}")
            ax.legend(fontsize=8)
    save_figure(fig, path, "NTK at initialisation on 1000 Ant-v5 random-policy (s, a), seed means")


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--widths", default="32,64,128,256,512,1024")
    parser.add_argument("--depths", default="1,2,3,4")
    parser.add_argument("--states", type=int, default=1000)
    # smoke: two widths and two depths, so that every trend (a slope) is computed
    args = parse_args(parser, smoke={"seeds": 1, "widths": "8,16", "depths": "1,2", "states": 16})
    widths = [int(w) for w in args.widths.split(",")]
    depths = [int(d) for d in args.depths.split(",")]
    started = time.perf_counter()
    x = ant_inputs(args.states)
    tables: dict = {}
    for init in INITS:
        tables[init] = {a: {} for a in ACTS}
        for a in ACTS:
            for w in widths:
                for d in depths:
                    per_seed = []
                    for seed in range(args.seeds):
                        k = ntk_gram(network(x.shape[1], a, w, d, init, seed), x)
                        per_seed.append((torch.diagonal(k).mean().item(), row_ratio(k).mean().item()))
                    diag, rr = np.mean(per_seed, 0)
                    tables[init][a][(w, d)] = {"diag_mean": float(diag), "row_ratio_mean": float(rr)}
        print(f"{init} init done ({time.perf_counter() - started:.0f} s)", flush=True)
    claims = [c for init in INITS for c in trend_claims(init, tables[init], widths, depths)]
    result = {
        "claims": claims,
        "setting": {"states": args.states, "env": "Ant-v5 (gymnasium), random policy, raw 105-d states + random "
                    "8-d action = 113-d input", "widths": widths, "depths_hidden_layers": depths, "seeds": args.seeds,
                    "activations": ACTS, "inits": {"pytorch": "nn.Linear default: W, b ~ U(+-1/sqrt(fan_in))",
                                                   "glorot": "xavier_uniform_ weights, zero biases (TF default)"},
                    "kernel": "raw empirical NTK over all parameters, float32, structured engine"},
        "published_setting": "PreQN Figure (MLPs at initialisation on 1000 Ant states, TF init); the paper's trends, "
                             "no numbers are compared",
        "table": {init: {a: {f"w{w}_d{d}": v for (w, d), v in tables[init][a].items()} for a in ACTS}
                  for init in INITS},
        **environment({"ntk_py": Path(lit_qlearn.ntk.__file__), "r5_ntk_trends_py": Path(__file__)}),
    }
    plot(tables, widths, depths, width_at=256 if 256 in widths else widths[-1], depth_at=2 if 2 in depths else depths[0],
         path=args.out / "r5_ntk_trends.png")
    write_result("r5_ntk_trends", result, started, args.out)


if __name__ == "__main__":
    main()
