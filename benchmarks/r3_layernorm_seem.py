"""Where LayerNorm's positive SEEM comes from (a diagnosis of r3_norms' failing LayerNorm
claim; not a result of the paper).

In r3_norms a LayerNorm critic on generated ``hopper-medium-replay-v5`` keeps Q within the
Bellman bound, yet its normalised SEEM comes and goes up to 0.46, carried by one or two of
the 512 probe transitions (``seem/participation``). This script reruns that setting (TD3,
target = current network, gamma 0.99, LayerNorm critic, seed ``--seed``, ``--updates``
updates, SEEMMonitor on the same 512-transition probe every 50 updates) and, at every
measurement with SEEM above ``--threshold``, inspects the probe transition with the largest
share of the top eigenvector: its share, its bootstrap gradient ``||grad Q(s', pi(s'))||^2``
and data gradient ``||grad Q(s, a)||^2`` against the probe's medians, the spread (standard
deviation over units) of each LayerNorm's input at ``(s', pi(s'))`` against the median, its
Q against the median Q, and how many of its greedy next action's components sit at the
action bound.

Claims (lit_qlearn's diagnosis): at the positive measurements (1) one and the same probe
transition holds the largest share at least 80% of the time; (2) its bootstrap gradient is
at least 100x the median's (median over those measurements); (3) a LayerNorm's input at
its bootstrap point has at most a third of the median spread.

    python benchmarks/r3_layernorm_seem.py [--seed 0] [--updates 4000] [--smoke]
"""
from __future__ import annotations

import collections
import statistics
import time

import lightning as L
import torch

from harness import ROOT, argument_parser, claim, environment, parse_args, save_figure, write_result
from _divergence import td3_run


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--updates", type=int, default=4000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--probe", type=int, default=512)
    parser.add_argument("--threshold", type=float, default=0.05)
    parser.add_argument("--dataset", default="hopper-medium-replay-v5")
    # smoke: threshold -1 (normalised SEEM is >= -1), so that every measurement is inspected
    args = parse_args(parser, smoke={"updates": 20, "every": 10, "probe": 64, "threshold": -1.0, "dataset": "default"},
                      data=lambda a: [a.dataset])
    started = time.perf_counter()
    torch.set_num_threads(1)

    from lit_qlearn.callbacks import SEEMMonitor
    from lit_qlearn.ntk import ntk_gram

    rows: list[dict] = []

    class Inspect(L.Callback):
        """After each SEEMMonitor measurement: the transition that carries its eigenvector."""

        def on_train_batch_end(self, trainer, pl_module, *unused) -> None:
            step = trainer.global_step
            monitor = next(c for c in trainer.callbacks if isinstance(c, SEEMMonitor))
            if step % args.every or monitor.eigenvector is None:
                return
            value = float(trainer.callback_metrics["seem/max_eig_normalized"])
            row = {"step": step, "seem": value, "participation": float(trainer.callback_metrics["seem/participation"])}
            if value > args.threshold:
                probe = trainer.datamodule.probe_batch(args.probe)
                row.update(inspect(pl_module, probe, monitor.eigenvector, ntk_gram))
            rows.append(row)

    # the r3 run itself (_divergence.td3_run: its monitors, probe and stopping rule)
    run = td3_run(args.dataset, 0.99, args.seed, args.updates, args.every, args.probe,
                  critic={"critic_norm": "layer"}, callbacks=[Inspect()])

    positive = [r for r in rows if "top" in r]
    tops = collections.Counter(r["top"] for r in positive)
    top, count = tops.most_common(1)[0] if tops else (None, 0)
    same = count / len(positive) if positive else float("nan")
    grad = statistics.median(r["grad_star_ratio"] for r in positive) if positive else float("nan")
    spread = min((min(r["ln_spread_ratio"]) for r in positive), default=float("nan"))
    claims = [
        claim("at the measurements with positive SEEM, one probe transition holds the largest share of the top "
              "eigenvector >= 80% of the time", "not in the paper: lit_qlearn's diagnosis",
              {"transition": top, "share_of_measurements": same, "measurements": len(positive)}, same >= 0.8),
        claim("its bootstrap gradient ||grad Q(s', pi(s'))||^2 is >= 100x the probe median (median over those "
              "measurements)", "not in the paper", grad, grad >= 100),
        claim("a LayerNorm's input at its bootstrap point has <= 1/3 of the median spread", "not in the paper",
              spread, spread <= 1 / 3),
    ]
    result = {"claims": claims, "settings": vars(args), "measurements": rows, "diverged": run["diverged"],
              "environment": environment({"networks": ROOT / "lit_qlearn/networks.py",
                                          "monitors": ROOT / "lit_qlearn/callbacks/monitors.py"})}
    plot(rows, args)
    write_result("r3_layernorm_seem", result, started, args.out)


def inspect(module, probe, eigenvector: torch.Tensor, ntk_gram) -> dict:
    """The probe transition with the largest share of ``eigenvector`` and how it differs."""
    share = eigenvector.abs() ** 2
    i = int(torch.argmax(share))
    net = module.q_network()
    with torch.no_grad():
        next_act = module.greedy_action(probe.next_obs)
    spreads: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: spreads.append(inp[0].std(dim=-1, unbiased=False)))
             for m in net.modules() if isinstance(m, torch.nn.LayerNorm)]
    try:
        with torch.no_grad():
            q = net(probe.obs, probe.act).flatten()
            spreads.clear()
            net(probe.next_obs, next_act)
    finally:
        for hook in hooks:
            hook.remove()
    g_star = ntk_gram(net, (probe.next_obs, next_act)).diagonal()
    g_data = ntk_gram(net, (probe.obs, probe.act)).diagonal()
    bound = torch.as_tensor(module.actor.action_high)
    return {"top": i, "top_share": float(share[i] / share.sum()),
            "grad_star_ratio": float(g_star[i] / g_star.median()), "grad_data_ratio": float(g_data[i] / g_data.median()),
            "ln_spread_ratio": [float(s[i] / s.median()) for s in spreads],
            "q_ratio": float(q[i] / q.median()),
            "action_at_bound": int((next_act[i].abs() >= 0.99 * bound.abs()).sum()), "action_dim": next_act.shape[1]}


def plot(rows: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_p) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    steps = [r["step"] for r in rows]
    ax_s.plot(steps, [r["seem"] for r in rows], "o-", ms=3, color="tab:blue")
    ax_s.axhline(args.threshold, color="gray", ls=":")
    ax_s.set_ylabel("normalised SEEM")
    ax_p.semilogy(steps, [r["participation"] for r in rows], "o-", ms=3, color="tab:gray", label="participation")
    positive = [r for r in rows if "top" in r]
    ax_p.semilogy([r["step"] for r in positive], [r["grad_star_ratio"] for r in positive], "s", color="tab:red",
                  label="top transition's bootstrap gradient / median")
    ax_p.set_xlabel("update")
    ax_p.legend()
    save_figure(fig, args.out / "r3_layernorm_seem.png",
                f"LayerNorm critic on {args.dataset}: positive SEEM is one transition's")


if __name__ == "__main__":
    main()
