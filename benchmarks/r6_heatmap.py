"""R6: the NTK heat map of Yue et al. (2023): a ReLU MLP couples x0 to far-away inputs,
LayerNorm keeps the kernel local (docs/design.md 5.6).

Networks: ``mlp(2, 1, hidden=(10000, 10000))`` — two hidden layers of width 10,000,
ReLU — plain and with ``norm="layer"`` (Linear -> LayerNorm -> ReLU on both hidden
layers, learned gain/bias at their init 1/0), PyTorch's default init, the same seed
(so both have the same Linear weights). x0 = (0.1, 0.2). The raw empirical NTK
``k(x0, x) = <grad_theta f(x0), grad_theta f(x)>`` over all parameters
(:func:`lit_qlearn.ntk.ntk_gram`, structured engine, float32) at initialisation on

* a ``--grid`` x ``--grid`` grid over ``[-E, E]^2`` (E = ``--extent``, default 10), the heat maps;
* rings of 128 points at distance r = 0.5 .. 100 from x0, the coupling against distance.

Coupling ratio: ``R(S) = mean_{x in S} |k(x0, x)| / k(x0, x0)``. "Far" points: grid
points at distance >= E/2 from x0. Claims (``holds`` computed as stated):

* far points couple to x0 more strongly without LayerNorm: ``R_plain(far) / R_LN(far) > 1``
  (the paper reports about 4.5x; its grid extent and normalisation are not given, so the
  magnitude is reported, not tested);
* with LayerNorm the kernel stays bounded far away: ``R_LN(r = 100) <= 1.1 R_LN(r = 10)``;
* without it the coupling keeps growing with distance: ``R_plain(r = 100) > R_plain(r = 10)``.

    python benchmarks/r6_heatmap.py [--grid 101] [--extent 10] [--width 10000]
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import lit_qlearn.ntk  # noqa: E402
from harness import argument_parser, claim, environment, parse_args, save_figure, write_result  # noqa: E402
from lit_qlearn.networks import mlp  # noqa: E402
from lit_qlearn.ntk import ntk_gram  # noqa: E402

X0 = (0.1, 0.2)
RADII = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
RING_POINTS = 128
MODELS = {"plain": None, "layernorm": "layer"}


def kernel_row(net: nn.Module, points: Tensor, chunk: int) -> Tensor:
    """``k(x0, x)`` for every row x of ``points`` ``(M, 2)``, shape ``(M,)``, ``chunk`` rows at a time."""
    x0 = torch.tensor([X0])
    return torch.cat([ntk_gram(net, x0, other=points[i:i + chunk]).squeeze(1) for i in range(0, len(points), chunk)])


def rings() -> Tensor:
    """``(len(RADII) * RING_POINTS, 2)``: points at distance r from x0, evenly spread in angle."""
    angle = torch.arange(RING_POINTS) * (2 * math.pi / RING_POINTS)
    unit = torch.stack([angle.cos(), angle.sin()], 1)
    return torch.cat([torch.tensor([X0]) + r * unit for r in RADII])


def plot(maps: dict[str, np.ndarray], extent: float, ring_ratio: dict[str, list[float]], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    titles = {"plain": "ReLU MLP", "layernorm": "ReLU MLP + LayerNorm"}
    for ax, (name, m) in zip(axes[:2], maps.items()):
        im = ax.imshow(m, origin="lower", extent=(-extent, extent, -extent, extent), cmap="viridis")
        ax.plot(*X0, "r*", ms=10)
        ax.set_title(f"{titles[name]}: k(x0, x) / k(x0, x0)")
        ax.set_xlabel("x_1")
        ax.set_ylabel("x_2")
        fig.colorbar(im, ax=ax)
    for name, ratios in ring_ratio.items():
        axes[2].plot(RADII, ratios, "o-", label=titles[name])
    axes[2].set_xscale("log")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("distance ||x - x0||")
    axes[2].set_ylabel("mean |k(x0, x)| / k(x0, x0) on the ring")
    axes[2].set_title("coupling to x0 against distance")
    axes[2].legend()
    save_figure(fig, path, "NTK at initialisation, 2 hidden layers of width 10,000, x0 = (0.1, 0.2) (red star)")


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--grid", type=int, default=101, help="points per axis of the heat-map grid")
    parser.add_argument("--extent", type=float, default=10.0, help="the grid covers [-extent, extent]^2")
    parser.add_argument("--width", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=2000, help="grid points per ntk_gram call (bounds memory)")
    args = parse_args(parser, smoke={"grid": 11, "width": 64})
    started = time.perf_counter()
    axis = torch.linspace(-args.extent, args.extent, args.grid)
    gy, gx = torch.meshgrid(axis, axis, indexing="ij")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    far = (grid - torch.tensor([X0])).norm(dim=1) >= args.extent / 2
    ring_pts = rings()
    maps, far_ratio, ring_ratio, self_k = {}, {}, {}, {}
    for name, norm in MODELS.items():
        torch.manual_seed(args.seed)
        net = mlp(2, 1, hidden=(args.width, args.width), norm=norm)
        k00 = ntk_gram(net, torch.tensor([X0])).item()
        k_grid = kernel_row(net, grid, args.chunk) / k00
        k_ring = kernel_row(net, ring_pts, args.chunk).abs().reshape(len(RADII), RING_POINTS).mean(1) / k00
        self_k[name] = k00
        maps[name] = k_grid.reshape(args.grid, args.grid).numpy()
        far_ratio[name] = k_grid[far].abs().mean().item()
        ring_ratio[name] = k_ring.tolist()
        print(f"{name}: k(x0, x0) = {k00:.4g}, R(far) = {far_ratio[name]:.4g} ({time.perf_counter() - started:.0f} s)",
              flush=True)
    at = {r: i for i, r in enumerate(RADII)}
    plain_over_ln = far_ratio["plain"] / far_ratio["layernorm"]
    ln_growth = ring_ratio["layernorm"][at[100.0]] / ring_ratio["layernorm"][at[10.0]]
    plain_growth = ring_ratio["plain"][at[100.0]] / ring_ratio["plain"][at[10.0]]
    claims = [
        claim("far points couple to x0 more strongly without LayerNorm: R_plain(far) / R_LN(far) > 1",
              "about 4.5x", {"R_plain_over_R_LN": plain_over_ln, "R_plain_far": far_ratio["plain"],
                             "R_LN_far": far_ratio["layernorm"]}, plain_over_ln > 1),
        claim("with LayerNorm the coupling stays bounded far away: R_LN(r=100) <= 1.1 R_LN(r=10)",
              "LayerNorm keeps the kernel local", {"R_LN_r100_over_r10": ln_growth}, ln_growth <= 1.1),
        claim("without LayerNorm the coupling grows with distance: R_plain(r=100) > R_plain(r=10)",
              "the ReLU MLP is linear far from the data: its NTK grows without bound",
              {"R_plain_r100_over_r10": plain_growth}, plain_growth > 1),
    ]
    result = {
        "claims": claims,
        "setting": {"network": f"mlp(2, 1, hidden=({args.width}, {args.width})), ReLU, PyTorch default init, seed "
                               f"{args.seed}; layernorm: Linear -> LayerNorm (affine, at init) -> ReLU per hidden layer",
                    "hidden_layers": 2, "x0": X0, "grid": f"{args.grid} x {args.grid} over [-{args.extent:g}, "
                    f"{args.extent:g}]^2", "far": f"grid points with ||x - x0|| >= {args.extent / 2:g}",
                    "rings": {"radii": RADII, "points_each": RING_POINTS}, "kernel": "raw empirical NTK, float32"},
        "definitions": {"R(S)": "mean_{x in S} |k(x0, x)| / k(x0, x0)"},
        "k_x0_x0": self_k,
        "far_ratio": far_ratio,
        "ring_ratio": {name: dict(zip(map(str, RADII), v)) for name, v in ring_ratio.items()},
        **environment({"ntk_py": Path(lit_qlearn.ntk.__file__), "r6_heatmap_py": Path(__file__)}),
    }
    plot(maps, args.extent, ring_ratio, args.out / "r6_heatmap.png")
    write_result("r6_heatmap", result, started, args.out)


if __name__ == "__main__":
    main()
