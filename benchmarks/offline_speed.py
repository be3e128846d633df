"""Offline updates per second: lit_qlearn's TD3+BC, CQL and IQL in a Lightning Trainer
against CORL-style hand-written loops of the same algorithms, interleaved in one run.

The CORL-style loops are the CORL scripts as written (Tarasov et al. 2022; see
benchmarks/baselines/corl.py). lit_qlearn: ``TD3BC()``, ``CQL()``, ``IQL()`` at their
defaults (CORL's) over ``OfflineDataModule`` (batch 256), a ``Trainer(max_steps=...)``
with a TensorBoard logger writing every 50 updates, no progress bar; and TD3+BC with
``compile=True``. Both sides: the same network sizes, batch 256, the default dataset,
the first ``--warmup`` updates untimed. One torch thread for all (``--threads``). The
ratio is per repeat; within each repeat every algorithm's configurations run back to
back, rotated every repeat. An ablation runs the TD3+BC CORL-style loop once more with
denormal floats flushed to zero (what lit_qlearn does while fitting), to show how much
of the difference that is.

    python benchmarks/offline_speed.py [--updates 2000] [--repeats 3] [--algos td3bc cql iql] [--no-compile]
"""
from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from baselines.corl import corl_cql, corl_iql, corl_td3bc
from harness import ROOT, TrainClock, argument_parser, claim, environment, interleaved, parse_args, quiet_trainer, \
    write_result

TARGET = 1.5  # TD3+BC (issue 12)
TARGET_CQL_IQL = 1.2  # CQL and IQL (issue 13)
ALGOS = ("td3bc", "cql", "iql")


# ----------------------------------------------------------------------------- lit_qlearn
def lit_offline(algo: str, dataset: str, updates: int, warmup: int, seed: int, compile: bool = False) -> float:
    """lit_qlearn's ``algo`` (td3bc, cql or iql) at its defaults in a Trainer; updates per second."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from lit_qlearn.algorithms import CQL, IQL, TD3BC
    from lit_qlearn.data import OfflineDataModule

    L.seed_everything(seed, verbose=False)
    module = {"td3bc": TD3BC, "cql": CQL, "iql": IQL}[algo](eval_every=0, compile=compile)
    dm = OfflineDataModule(dataset, batch_size=256, seed=seed)
    clock = TrainClock(warmup=warmup)
    with tempfile.TemporaryDirectory() as logs:
        quiet_trainer(max_steps=warmup + updates, logger=TensorBoardLogger(logs), log_every_n_steps=50,
                      callbacks=[clock]).fit(module, dm)
    return clock.rate


def ratios_to(speeds: dict[str, list[float]], names: list[str]) -> dict[str, list[float]]:
    """Per-repeat ratios of each of ``names`` to ``corl_style`` (the same repeat's)."""
    return {name: [a / b for a, b in zip(speeds[name], speeds["corl_style"])] for name in names}


def main() -> None:
    from lit_qlearn.data import read_d4rl
    from lit_qlearn.datasets import ensure_default_dataset

    parser = argument_parser(__doc__)
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--algos", nargs="+", choices=ALGOS, default=list(ALGOS))
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the compile=True runs (compiling takes about a minute on a CPU)")
    # smoke: no compile=True runs (tests/algorithms/test_compile.py covers compile); TD3+BC's actor steps at update 2
    args = parse_args(parser, smoke={"updates": 2, "warmup": 1, "repeats": 1, "no_compile": True},
                      data=["default"])
    algos = [algo for algo in ALGOS if algo in args.algos]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    path = ensure_default_dataset()
    data = read_d4rl(path)
    n, w = args.updates, args.warmup
    runners: dict[str, dict[str, Callable[[int], float]]] = {
        "td3bc": {
            "corl_style": lambda seed: corl_td3bc(data, n, w, seed),
            # an ablation: how much of the difference is denormal arithmetic (Adam's second moments)
            "corl_style_flush_denormal": lambda seed: corl_td3bc(data, n, w, seed, flush=True),
            "lit_qlearn": lambda seed: lit_offline("td3bc", str(path), n, w, seed),
        } | ({} if args.no_compile else {
            # the first compiled run includes no compilation: it is done in the warm-up updates
            "lit_qlearn_compile": lambda seed: lit_offline("td3bc", str(path), n, w, seed, compile=True)}),
        "cql": {"corl_style": lambda seed: corl_cql(data, n, w, seed),
                "lit_qlearn": lambda seed: lit_offline("cql", str(path), n, w, seed)},
        "iql": {"corl_style": lambda seed: corl_iql(data, n, w, seed),
                "lit_qlearn": lambda seed: lit_offline("iql", str(path), n, w, seed)},
    }
    # repeat by repeat; in each, every algorithm's configurations back to back, rotated
    plan = sorted(((repeat, i, algo, name) for i, algo in enumerate(algos)
                   for repeat, name in interleaved(list(runners[algo]), args.repeats)), key=lambda step: step[:2])
    speeds = {algo: {name: [] for name in runners[algo]} for algo in algos}
    for repeat, _, algo, name in plan:
        speeds[algo][name].append(runners[algo][name](repeat))
        print(f"repeat {repeat} {algo} {name}: {speeds[algo][name][-1]:.1f} updates/s", flush=True)
    claims, sections = [], {}
    if "td3bc" in algos:
        s = speeds["td3bc"]
        ratios = ratios_to(s, [name for name in ("lit_qlearn", "lit_qlearn_compile") if name in s])
        medians = {name: statistics.median(r) for name, r in ratios.items()}
        flushed = ratios_to(s, ["corl_style_flush_denormal"])["corl_style_flush_denormal"]
        claims += [
            claim(f"TD3+BC offline: lit_qlearn >= {TARGET}x the updates per second of a CORL-style hand-written "
                  "loop (interleaved)", "issue 12 target; measured there: lit_qlearn 105, CORL-style 83 updates/s",
                  {"ratio_median": medians["lit_qlearn"], "ratios": ratios["lit_qlearn"],
                   "updates_per_s": {k: s[k] for k in ("lit_qlearn", "corl_style")}},
                  medians["lit_qlearn"] >= TARGET),
            claim(f"the same with compile=True (>= {TARGET}x)", "issue 12: report compile=True beside it",
                  {"ratio_median": medians["lit_qlearn_compile"], "ratios": ratios["lit_qlearn_compile"],
                   "updates_per_s": s["lit_qlearn_compile"]} if not args.no_compile else "not run (--no-compile)",
                  not args.no_compile and medians["lit_qlearn_compile"] >= TARGET),
        ]
        sections["td3bc"] = {
            "updates_per_s": s, "ratios_to_corl_style": ratios,
            "ablation": {"corl_style_flush_denormal_over_corl_style": statistics.median(flushed),
                         "ratios": flushed, "speeds": s["corl_style_flush_denormal"]}}
    for algo, label in (("cql", "CQL"), ("iql", "IQL")):
        if algo not in algos:
            continue
        s = speeds[algo]
        ratios = ratios_to(s, ["lit_qlearn"])["lit_qlearn"]
        median = statistics.median(ratios)
        claims.append(claim(
            f"{label} offline: lit_qlearn >= {TARGET_CQL_IQL}x the updates per second of a CORL-style hand-written "
            "loop (interleaved)", f"issue 13 target ({TARGET_CQL_IQL}x)",
            {"ratio_median": median, "ratios": ratios, "updates_per_s": s}, median >= TARGET_CQL_IQL))
        sections[algo] = {"updates_per_s": s, "ratios_to_corl_style": {"lit_qlearn": ratios}}
    result = {
        "claims": claims,
        "algorithms": sections,
        "settings": vars(args) | {"algos": algos, "dataset": str(path.name), "batch_size": 256},
        "environment": environment({name: ROOT / f"lit_qlearn/algorithms/{name}.py"
                                    for name in ("td3", "sac", "cql", "iql", "actor_critic", "base")}
                                   | {"offline": ROOT / "lit_qlearn/data/offline.py"}),
    }
    write_result("offline_speed", result, started, args.out)


if __name__ == "__main__":
    main()
