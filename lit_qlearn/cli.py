"""The ``lit-qlearn`` command.

* ``lit-qlearn fit --config configs/td3bc_hopper.yaml`` — LightningCLI: any
  algorithm of :mod:`lit_qlearn.algorithms` over any DataModule
  (:class:`~lit_qlearn.data.OfflineDataModule`, :class:`~lit_qlearn.data.OnlineDataModule`,
  :class:`~lit_qlearn.data.OnPolicyDataModule`);
  ``--help`` lists every option, ``--model.help lit_qlearn.algorithms.TD3`` an algorithm's.
* ``lit-qlearn collect ENV_ID PATH --policy random --steps N --seed S`` — roll a
  policy in a gymnasium environment and write a D4RL-format HDF5 file.
* ``lit-qlearn datasets list`` / ``lit-qlearn datasets make hopper-medium-v5 [--steps N]``
  — the D4RL-style datasets made from lit_qlearn's own SAC policies (no download;
  ``datasets make default``: the demo's data); ``lit-qlearn datasets train walker2d
  [--steps N]`` trains those policies. ``fit`` only reads data: it never makes a dataset.
* ``lit-qlearn demo`` — make the default dataset if absent, train TD3
  without target averaging with a plain and a LayerNorm critic under SEEMMonitor,
  NTKGramCallback and CrashPredictor, print the comparison and draw it
  (:mod:`lit_qlearn.demo`; ``--algo td3bc``: train TD3+BC and evaluate it).
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "demo", "collect_main", "datasets_main", "fit_main"]

# Each command imports what it uses inside its own function: `lit-qlearn --help`, and a
# command's argument errors, load neither torch nor Lightning.


# "started": set once `lit-qlearn fit` has run its first update; "interrupted": Ctrl-C
# was pressed (a Trainer catches the KeyboardInterrupt itself: teardown, then sys.exit(1))
_TRAINING = {"started": False, "interrupted": False}


def fit_main(args: Sequence[str]) -> None:
    from lightning.pytorch import Callback, LightningDataModule
    from lightning.pytorch.cli import LightningCLI

    from lit_qlearn.algorithms import QLearningModule

    class TrainingStarted(Callback):
        """Marks the first update: a ValueError / TypeError after it is no input error
        (those are raised at setup) and keeps its traceback."""

        def on_train_batch_start(self, *args: Any) -> None:
            _TRAINING["started"] = True

    class CLI(LightningCLI):
        def parse_arguments(self, parser: Any, args: Any) -> None:
            # LightningCLI warns whenever `args` is given while sys.argv holds arguments,
            # fearing two command lines that disagree. Here `args` is the command line:
            # main() reads it from sys.argv (or is handed it by a caller who means it), so
            # that warning, printed on every `lit-qlearn fit`, does not apply; only it is
            # silenced, and only while parsing.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
                super().parse_arguments(parser, args)
            # Next, LightningCLI fills --model from --ckpt_path's hyper-parameters, whose
            # `_class_path` jsonargparse would import (running that module): the file is
            # checked here first, as data, and may name only the package's own algorithms
            # or the class the user gave
            _check_ckpt_path(self.config[self.config.subcommand])

    CLI(
        QLearningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=["fit", *args],
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False},
        trainer_defaults={"callbacks": [TrainingStarted()]},
    )


class _NoInterruptNotice(logging.Filter):
    """Drops Lightning's "Detected KeyboardInterrupt, attempting graceful shutdown ..."
    (logged when Ctrl-C reaches a Trainer): :func:`main` reports the interruption itself,
    in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Detected KeyboardInterrupt" not in record.getMessage()


def _on_sigint(signum: int, frame: Any) -> None:
    # Python's own Ctrl-C handler, noting the interruption first: a Trainer (fit's, the
    # demo's, a dataset's SAC run) catches the KeyboardInterrupt and exits 1 instead
    _TRAINING["interrupted"] = True
    raise KeyboardInterrupt


def _quiet_interrupt_notice() -> None:
    # Lightning's rank_zero_info writes to the logger its last-imported package named; by
    # name, so that nothing is imported here and the filter is in place whichever it is
    for name in ("lightning_utilities.core.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _NoInterruptNotice) for f in log.filters):
            log.addFilter(_NoInterruptNotice())


def _check_ckpt_path(config: Any) -> None:
    """Before anything is built: ``--ckpt_path`` is a readable checkpoint (one-line
    :class:`~lit_qlearn.data.checkpoint.CheckpointError` otherwise), a model class its
    hyper-parameters name is lit_qlearn's own or the one given with ``--model``, and
    Lightning loads it with ``weights_only=True`` unless ``--weights_only false`` is given
    (Lightning's default for a URL is False: a remote file could run code)."""
    from lit_qlearn.data.checkpoint import CheckpointError, read_checkpoint
    from lit_qlearn.datasets import policy_classes

    ckpt_path = config.get("ckpt_path")
    if not ckpt_path:
        return
    if config.get("weights_only") is None:
        config["weights_only"] = True
    if config["weights_only"] is False:
        return  # the user's word (--weights_only false) that the file and the code it names are trusted
    name = str(ckpt_path)
    if name in ("last", "hpc", "best", "registry") or name.startswith("registry:") or "://" in name:
        return  # Lightning's keywords and remote files: nothing local to read ahead
    # mmap: the structure is read, a replay buffer's storage is not (Lightning reads the file next)
    hparams = read_checkpoint(ckpt_path, mmap=True).get("hyper_parameters")
    class_path = hparams.get("_class_path") if isinstance(hparams, dict) else None
    model = config.get("model")
    given = model.get("class_path") if model is not None and hasattr(model, "get") else None
    if class_path is not None and class_path != given and class_path not in policy_classes():
        raise CheckpointError(
            f"{ckpt_path}: its hyper-parameters name the model class {class_path!r}, which is not one of "
            f"lit_qlearn's algorithms and was not imported; if you trust that code, name it: --model {class_path}")


def collect_main(args: Sequence[str]) -> None:
    from lit_qlearn.datasets import collect

    parser = argparse.ArgumentParser(prog="lit-qlearn collect", description=collect.__doc__.split("\n")[0])
    parser.add_argument("env_id", help="gymnasium environment id, e.g. Hopper-v5")
    parser.add_argument("path", help="output .hdf5 file (D4RL format)")
    parser.add_argument("--policy", default="random", help="'random' or a lit_qlearn checkpoint (.ckpt)")
    parser.add_argument("--steps", type=int, default=100_000, help="environment steps to record")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy-class", default=None, metavar="MODULE:CLASS",
                        help="rebuild the --policy checkpoint as this class, which is imported (name only code you "
                             "trust); default: the lit_qlearn algorithm the checkpoint names")
    ns = parser.parse_args(list(args))
    path = collect(ns.env_id, ns.policy, steps=ns.steps, path=ns.path, seed=ns.seed, policy_class=ns.policy_class)
    print(f"wrote {path}")


def datasets_main(args: Sequence[str]) -> None:
    from lit_qlearn.data.minari import check_minari_output, write_minari
    from lit_qlearn.data.names import ENV_IDS
    from lit_qlearn.datasets import generated

    parser = argparse.ArgumentParser(prog="lit-qlearn datasets", description=generated.__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the datasets that can be made here")
    make = sub.add_parser("make", help="write one of them (D4RL format)")
    make.add_argument("name", help="e.g. hopper-medium-v5, or default (the demo's data)")
    make.add_argument("--steps", type=int, default=None,
                      help="environment steps (1M, as D4RL; 100k for default; medium-expert: of each; "
                           "medium-replay: none, it reruns the SAC run up to its medium policy)")
    make.add_argument("--path", default=None, help="output .hdf5 (default: the data directory)")
    make.add_argument("--seed", type=int, default=None, help="rollout seed (default 0; medium-replay: none)")
    make.add_argument("--minari", default=None, metavar="DATASET_ID",
                      help="also write it as a Minari dataset with this id (needs the minari extra)")
    train = sub.add_parser("train", help="train the SAC behaviour policies of a family (writes the policy file "
                                         "and the medium-replay dataset)")
    train.add_argument("family", choices=sorted(ENV_IDS))
    train.add_argument("--steps", type=int, default=300_000, help="environment steps of the SAC run")
    train.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(list(args))
    if ns.command == "list":
        print("\n".join(["default", *generated.dataset_names()]))
        return
    from tqdm.auto import tqdm

    # every input (name, options, output directories) is checked before a bar is drawn
    if ns.command == "train":
        generated.check_train(ns.family)

        def report(run: Any) -> None:
            bar.set_postfix_str(f"return {run.curve[-1]['return']:.0f}")

        with tqdm(total=ns.steps, desc=f"SAC {ENV_IDS[ns.family]}", unit="step") as bar:
            path = generated.train_policy(ns.family, ns.steps, ns.seed, on_eval=report, progress=bar.update)
        print(f"wrote {path}")
        return

    generated.check_request(ns.name, ns.steps, ns.seed, ns.path)
    if ns.minari:
        check_minari_output(ns.minari)
    with tqdm(total=generated.total_steps(ns.name, ns.steps), desc=ns.name, unit="step") as bar:
        path = generated.make_dataset(ns.name, ns.steps, ns.path, ns.seed, progress=bar.update)
    print(f"wrote {path}")
    if ns.minari:
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
    (inputs are checked at setup) and keeps its traceback. Ctrl-C prints
    ``lit-qlearn CMD: interrupted`` and exits with status 130 (128 + SIGINT)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _TRAINING.update(started=False, interrupted=False)
    _quiet_interrupt_notice()
    # Lightning 2.6 builds torch's deprecated LeafSpec on every training step's output and
    # torch >= 2.10 warns about it, once per run, in every command: a note from one
    # dependency to the other that nothing a user of this command can act on. Only that
    # message, raised from that Lightning module, is silenced, and only while a command runs.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
        _run(argv)


def _run(argv: list[str]) -> None:
    """:func:`main` without its console set-up: run ``argv[0]`` with the rest."""
    import os
    import signal
    import threading

    commands = {"fit": fit_main, "collect": collect_main, "datasets": datasets_main, "demo": demo}
    if not argv or argv[0] not in commands:
        wanted_help = bool(argv) and argv[0] in ("-h", "--help")
        print(__doc__.strip(), file=sys.stdout if wanted_help else sys.stderr)
        raise SystemExit(0 if wanted_help else 2)
    # only in place of Python's default handler (a caller's own is left alone), put back after
    noting = (threading.current_thread() is threading.main_thread()
              and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if noting:
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        commands[argv[0]](argv[1:])
    except KeyboardInterrupt:
        _interrupted(argv[0])
        raise
    except SystemExit:
        if _TRAINING["interrupted"]:  # a Trainer caught the Ctrl-C, shut down and exited 1
            _interrupted(argv[0])
        raise
    except _user_errors() as err:
        if os.environ.get("LIT_QLEARN_TRACEBACK") or not _is_input_error(err):
            raise
        message = " ".join(str(err).split())
        print(f"lit-qlearn {argv[0]}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if noting:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _interrupted(command: str) -> None:
    """Ctrl-C: one line and the shell's status for SIGINT, 128 + 2 (a traceback only with
    ``LIT_QLEARN_TRACEBACK=1``, when this returns and the caller re-raises)."""
    import os

    if os.environ.get("LIT_QLEARN_TRACEBACK"):
        return
    print(f"lit-qlearn {command}: interrupted", file=sys.stderr)
    raise SystemExit(130) from None


if __name__ == "__main__":
    main()
