"""The ``lit-qlearn`` command.

* ``lit-qlearn fit --config configs/td3bc_hopper.yaml`` — LightningCLI: any
  algorithm of :mod:`lit_qlearn.algorithms` over an
  :class:`~lit_qlearn.data.OfflineDataModule` (``--help`` lists every option).
* ``lit-qlearn collect ENV_ID PATH --policy random --steps N --seed S`` — roll a
  policy in a gymnasium environment and write a D4RL-format HDF5 file.
* ``lit-qlearn demo`` — generate the embedded default dataset if absent, train
  TD3+BC briefly on it, print the evaluation and where the TensorBoard logs are.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

__all__ = ["main", "demo", "collect_main", "fit_main"]


def fit_main(args: Sequence[str]) -> None:
    from lightning.pytorch.cli import LightningCLI

    from lit_qlearn.algorithms import QLearningModule
    from lit_qlearn.data import OfflineDataModule

    LightningCLI(
        QLearningModule,
        OfflineDataModule,
        subclass_mode_model=True,
        args=["fit", *args],
        save_config_kwargs={"overwrite": True},
    )


def collect_main(args: Sequence[str]) -> None:
    from lit_qlearn.data import collect

    parser = argparse.ArgumentParser(prog="lit-qlearn collect", description=collect.__doc__.split("\n")[0])
    parser.add_argument("env_id", help="gymnasium environment id, e.g. Hopper-v5")
    parser.add_argument("path", help="output .hdf5 file (D4RL format)")
    parser.add_argument("--policy", default="random", help="'random' or a lit_qlearn checkpoint (.ckpt)")
    parser.add_argument("--steps", type=int, default=100_000, help="environment steps to record")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(list(args))
    path = collect(ns.env_id, ns.policy, steps=ns.steps, path=ns.path, seed=ns.seed)
    print(f"wrote {path}")


def demo(args: Sequence[str] = ()) -> dict[str, float]:
    """Train TD3+BC on the embedded default dataset and print the evaluation."""
    parser = argparse.ArgumentParser(prog="lit-qlearn demo", description=demo.__doc__)
    parser.add_argument("--dataset", default="default", help="dataset path or name (default: generated Hopper-v5 data)")
    parser.add_argument("--steps", type=int, default=3000, help="gradient updates")
    parser.add_argument("--layernorm", action="store_true", help="LayerNorm in the critic")
    parser.add_argument("--episodes", type=int, default=5, help="evaluation episodes")
    parser.add_argument("--logdir", default="lightning_logs", help="TensorBoard log directory")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(list(args))

    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from lit_qlearn.algorithms import TD3BC
    from lit_qlearn.data import OfflineDataModule

    L.seed_everything(ns.seed, verbose=False)
    dm = OfflineDataModule(ns.dataset, seed=ns.seed)
    dm.prepare_data()  # generates the default dataset on first use (~20 s), outside the timing
    dm.setup("fit")
    model = TD3BC(critic_norm="layer" if ns.layernorm else None, eval_every=0)
    logger = TensorBoardLogger(ns.logdir, name="demo")
    trainer = L.Trainer(
        max_steps=ns.steps,
        logger=logger,
        log_every_n_steps=50,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - start
    result = model.evaluate(ns.episodes)
    print(
        f"TD3+BC on {dm.env_id} ({dm.num_transitions} transitions): {model.updates} updates in {seconds:.1f} s "
        f"({model.updates / seconds:.0f} updates/s)"
    )
    print(f"evaluation over {ns.episodes} episodes: return {result['return']:.1f}, "
          f"normalized score {result['normalized_score']:.1f}")
    print(f"TensorBoard: tensorboard --logdir {logger.log_dir}")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"fit": fit_main, "collect": collect_main, "demo": demo}
    if not argv or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
