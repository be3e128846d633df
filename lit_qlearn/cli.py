"""The ``lit-qlearn`` command.

* ``lit-qlearn fit --config configs/td3bc_hopper.yaml`` — LightningCLI: any
  algorithm of :mod:`lit_qlearn.algorithms` over any DataModule
  (:class:`~lit_qlearn.data.OfflineDataModule`, :class:`~lit_qlearn.data.OnlineDataModule`);
  ``--help`` lists every option, ``--model.help lit_qlearn.algorithms.TD3`` an algorithm's.
* ``lit-qlearn collect ENV_ID PATH --policy random --steps N --seed S`` — roll a
  policy in a gymnasium environment and write a D4RL-format HDF5 file.
* ``lit-qlearn datasets list`` / ``lit-qlearn datasets make hopper-medium-v5 [--steps N]``
  — the D4RL-style datasets made from lit_qlearn's own SAC policies (no download);
  ``lit-qlearn datasets train walker2d [--steps N]`` trains those policies.
* ``lit-qlearn demo`` — generate the embedded default dataset if absent, train TD3
  without target averaging with a plain and a LayerNorm critic under SEEMMonitor,
  NTKGramCallback and CrashPredictor, print the comparison and draw it
  (:mod:`lit_qlearn.demo`; ``--algo td3bc``: train TD3+BC and evaluate it).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "demo", "collect_main", "datasets_main", "fit_main"]


_TRAINING = {"started": False}  # set once `lit-qlearn fit` has run its first update


def fit_main(args: Sequence[str]) -> None:
    from lightning.pytorch import Callback, LightningDataModule
    from lightning.pytorch.cli import LightningCLI

    from lit_qlearn.algorithms import QLearningModule

    class TrainingStarted(Callback):
        """Marks the first update: a ValueError / TypeError after it is no input error
        (those are raised at setup) and keeps its traceback."""

        def on_train_batch_start(self, *args: Any) -> None:
            _TRAINING["started"] = True

    LightningCLI(
        QLearningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=["fit", *args],
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False},
        trainer_defaults={"callbacks": [TrainingStarted()]},
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


def datasets_main(args: Sequence[str]) -> None:
    from lit_qlearn.data import generated

    parser = argparse.ArgumentParser(prog="lit-qlearn datasets", description=generated.__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the datasets that can be made here")
    make = sub.add_parser("make", help="write one of them (D4RL format)")
    make.add_argument("name", help="e.g. hopper-medium-v5")
    make.add_argument("--steps", type=int, default=None,
                      help="environment steps (default 1M; medium-expert: of each; medium-replay: none, it reruns "
                           "the SAC run up to its medium policy)")
    make.add_argument("--path", default=None, help="output .hdf5 (default: the data directory)")
    make.add_argument("--seed", type=int, default=None, help="rollout seed (default 0; medium-replay: none)")
    make.add_argument("--minari", default=None, metavar="DATASET_ID",
                      help="also write it as a Minari dataset with this id (needs the minari extra)")
    train = sub.add_parser("train", help="train the SAC behaviour policies of a family (writes the policy file "
                                         "and the medium-replay dataset)")
    train.add_argument("family", choices=sorted(generated.ENV_IDS))
    train.add_argument("--steps", type=int, default=300_000, help="environment steps of the SAC run")
    train.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(list(args))
    if ns.command == "list":
        print("\n".join(generated.dataset_names()))
        return
    from tqdm.auto import tqdm

    if ns.command == "train":
        def report(run: Any) -> None:
            bar.set_postfix_str(f"return {run.curve[-1]['return']:.0f}")

        with tqdm(total=ns.steps, desc=f"SAC {generated.ENV_IDS[ns.family]}", unit="step") as bar:
            path = generated.train_policy(ns.family, ns.steps, ns.seed, on_eval=report, progress=bar.update)
        print(f"wrote {path}")
        return

    with tqdm(total=generated.total_steps(ns.name, ns.steps), desc=ns.name, unit="step") as bar:
        path = generated.make_dataset(ns.name, ns.steps, ns.path, ns.seed, progress=bar.update)
    print(f"wrote {path}")
    if ns.minari:
        from lit_qlearn.data.minari import write_minari

        print(f"wrote {write_minari(path, ns.minari)}")


def demo(args: Sequence[str] = ()) -> Any:
    """``lit-qlearn demo``: the logic lives in :mod:`lit_qlearn.demo` (user errors are
    reported by :func:`main`)."""
    from lit_qlearn.demo import main as demo_main

    return demo_main(args)


def _input_errors() -> tuple[type[BaseException], ...]:
    """Errors that only a user's input causes."""
    from jsonargparse import ArgumentError

    from lit_qlearn.data import DatasetError
    from lit_qlearn.probe import ProbeProtocolError

    return DatasetError, ProbeProtocolError, ArgumentError, FileNotFoundError


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user's input can cause: reported in one line, not a traceback. Plain
    ValueError / TypeError (argument checks) count only before training starts."""
    return *_input_errors(), ValueError, TypeError


def _is_input_error(err: BaseException) -> bool:
    return isinstance(err, _input_errors()) or not _TRAINING["started"]


def main(argv: Sequence[str] | None = None) -> None:
    """Run a command; a user error prints ``lit-qlearn CMD: error: ...`` (one line) and
    exits with status 2 (``LIT_QLEARN_TRACEBACK=1`` shows the traceback instead). A
    ValueError / TypeError raised once ``fit`` has begun updating is no input error
    (inputs are checked at setup) and keeps its traceback."""
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    _TRAINING["started"] = False
    commands = {"fit": fit_main, "collect": collect_main, "datasets": datasets_main, "demo": demo}
    if not argv or argv[0] not in commands:
        wanted_help = bool(argv) and argv[0] in ("-h", "--help")
        print(__doc__.strip(), file=sys.stdout if wanted_help else sys.stderr)
        raise SystemExit(0 if wanted_help else 2)
    try:
        commands[argv[0]](argv[1:])
    except _user_errors() as err:
        if os.environ.get("LIT_QLEARN_TRACEBACK") or not _is_input_error(err):
            raise
        message = " ".join(str(err).split())
        print(f"lit-qlearn {argv[0]}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
