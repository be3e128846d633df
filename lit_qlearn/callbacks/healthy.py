"""HealthyCheckpoint: keep on disk the checkpoint of the last step a monitor judged
healthy, to write it out when the monitor detects a divergence, or to roll back to it.

A component, not a monitor: its owner (:class:`~lit_qlearn.callbacks.CrashPredictor`)
decides which steps are healthy and calls :meth:`HealthyCheckpoint.mark`; the component
takes that step's checkpoint with the public ``Trainer.save_checkpoint`` at the end of
the batch, where a ``ModelCheckpoint`` takes its own, so the file is the ordinary
checkpoint of that step.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from torch import Tensor

from lit_qlearn.ntk import parameter_norm

__all__ = ["HealthyCheckpoint", "all_finite", "last_healthy_name"]


def last_healthy_name(step: int) -> str:
    """The name of the kept checkpoint of healthy step ``step``."""
    return f"last-healthy-step={step}.ckpt"


class HealthyCheckpoint(Callback):
    """The checkpoint of the last healthy step, kept in one hidden file while the run goes on.

    At the end of a batch whose step was :meth:`mark`-ed healthy, when the module's and
    the optimisers' states are all finite on every rank (a NaN the owner's measurement
    does not see is not kept), the step's checkpoint is written with
    ``Trainer.save_checkpoint`` (on every rank, rank zero writing, as a ``ModelCheckpoint``
    does) to ``.last-healthy-<hash of key>.partial.ckpt`` in ``dirpath`` and renamed over
    ``.last-healthy-<hash of key>.tmp.ckpt``, so that a run killed mid-write keeps the
    previous whole file. The names are hidden and their stems do not start with "last"
    (``ckpt_path="last"`` never takes them); the hash of ``key`` (the owner's
    ``state_key``) lets two owners with other options share a directory.

    :meth:`keep` renames that file ``last-healthy-step=<step>.ckpt``; :meth:`discard`
    removes it (at the end of a run without detection, or one that raises; a killed
    process leaves it: an ordinary checkpoint of that step). :meth:`restore` loads it
    back into the running module, optimisers and schedulers; :meth:`roll_back` does so at
    the end of the batch, lets the owner change the state (a remedy), and holds the result
    as the current step's checkpoint.

    Placement: the checkpoint holds every callback's state of the step, so the component
    must run after every other callback's ``on_train_batch_end`` and before the checkpoint
    callbacks (Lightning keeps those last): :meth:`attach` inserts it there.

    Its cost is one checkpoint write per marked step, that of a ``ModelCheckpoint`` saving
    at each of them, on disk and not in memory (a DataModule that saves its replay buffer
    writes the buffer too).

    Args:
        key: names the temporary files (the owner's ``state_key``).
        dirpath: where the files go (default ``<log_dir>/checkpoints``).
    """

    def __init__(self, key: str, dirpath: str | os.PathLike | None = None) -> None:
        self.key = key
        self.dirpath = dirpath
        #: The step whose checkpoint is held (None: none yet), and where it is: the
        #: temporary file while the run goes on, ``last-healthy-step=<step>.ckpt`` once kept.
        self.step: int | None = None
        self.path: Path | None = None
        self.kept = False
        self._marked: int | None = None
        self._rollback: Callable[[Trainer, LightningModule, int], None] | None = None
        self._directory: Path | None = None

    @property
    def state_key(self) -> str:
        # One per owner: two owners' components are two callbacks in one Trainer.
        return self._generate_state_key(key=self.key)

    # ------------------------------------------------------------ placement
    def attach(self, trainer: Trainer) -> None:
        """Insert into ``trainer.callbacks`` before the first checkpoint callback."""
        callbacks = trainer.callbacks
        if self not in callbacks:
            at = next((i for i, cb in enumerate(callbacks) if isinstance(cb, Checkpoint)), len(callbacks))
            callbacks.insert(at, self)

    def detach(self, trainer: Trainer) -> None:
        """Remove the temporary files (a kept file stays) and leave ``trainer.callbacks``."""
        self.discard(trainer)
        if self in trainer.callbacks:
            trainer.callbacks.remove(self)

    # ------------------------------------------------------------- capturing
    def mark(self, step: int) -> None:
        """Take the checkpoint of ``step`` (the current ``global_step``) at the end of its batch."""
        self._marked = step

    def roll_back(self, then: Callable[[Trainer, LightningModule, int], None]) -> None:
        """At the end of this batch, after every other callback: :meth:`restore` the held
        checkpoint, call ``then(trainer, pl_module, restored_step)`` (the owner's remedy),
        and hold the resulting state as the checkpoint of the current step (so a second
        rollback starts from the first one's remedied state)."""
        self._rollback = then

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self._rollback is not None and not self.kept:
            then, self._rollback = self._rollback, None
            then(trainer, pl_module, self.restore(trainer, pl_module))
            self._marked = trainer.global_step
        if self._marked is None or self._marked != trainer.global_step or self.kept:
            return
        step, self._marked = self._marked, None
        # What the checkpoint holds of the model and optimisers (references, no copy): one
        # fused norm over them, reduced so that every rank takes part in the save or none.
        states = [pl_module.state_dict(), [list(o.state.values()) for o in trainer.optimizers]]
        if not trainer.strategy.reduce_boolean_decision(all_finite(_tensors(states)), all=True):
            return  # keep the previous file, whose state was finite
        if self._directory is None:  # resolved once, on every rank (trainer.log_dir is collective)
            self._directory = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints")
        partial, held = self._temporary_files()
        trainer.save_checkpoint(partial, weights_only=False)  # ends with a barrier: the file is whole
        if trainer.is_global_zero:
            os.replace(partial, held)  # atomic: the held file is always one whole checkpoint
        self.step, self.path = step, held

    def _temporary_files(self) -> tuple[Path, Path]:
        """The file being written, and the one it replaces."""
        tag = hashlib.sha1(self.key.encode()).hexdigest()[:10]
        return (self._directory / f".last-healthy-{tag}.partial.ckpt",
                self._directory / f".last-healthy-{tag}.tmp.ckpt")

    # ----------------------------------------------------------- the outcome
    def keep(self, trainer: Trainer) -> Path | None:
        """Rename the held checkpoint ``last-healthy-step=<step>.ckpt`` in its directory and
        return its path (None when no marked step had a finite state); collective: every
        rank calls it, rank zero renames. Nothing is captured after it."""
        if self.kept:
            return self.path
        if self.step is None or self._directory is None:  # the same on every rank: captures are collective
            return None
        path = self._directory / last_healthy_name(self.step)
        if trainer.is_global_zero:
            os.replace(self._temporary_files()[1], path)
        trainer.strategy.barrier("HealthyCheckpoint.keep")
        self.path, self.kept = path, True
        return path

    def discard(self, trainer: Trainer) -> None:
        """Remove the temporary files (rank zero, which wrote them); a kept file stays."""
        if self._directory is not None and trainer.is_global_zero:
            for path in self._temporary_files():
                _remove(path)
        if not self.kept:
            self.step = self.path = None
        self._marked = self._rollback = None

    def restore(self, trainer: Trainer, pl_module: LightningModule) -> int:
        """Load the held checkpoint's weights (target networks and buffers included),
        optimiser states and learning-rate schedulers' states into the running
        ``pl_module``, ``trainer.optimizers`` and ``trainer.lr_scheduler_configs``; return
        its step. Counters, random states and callbacks' states are left as they are (the
        run goes on counting); ``trainer.fit(ckpt_path=path)`` resumes from all of them.

        Read with ``trainer.strategy.load_checkpoint(weights_only=True)``: the reader of
        the strategy's ``CheckpointIO`` that wrote the file, tensors and plain values only."""
        if pl_module is not trainer.lightning_module:
            raise ValueError("HealthyCheckpoint.restore: pl_module must be the module the trainer fits")
        if self.path is None:
            raise RuntimeError("HealthyCheckpoint.restore: no healthy checkpoint is held (no marked step had a "
                               "finite state yet)")
        trainer.strategy.barrier("HealthyCheckpoint.restore")  # rank zero's rename is done
        checkpoint = trainer.strategy.load_checkpoint(self.path, weights_only=True)
        trainer.strategy.load_model_state_dict(checkpoint)
        trainer.strategy.load_optimizer_state_dict(checkpoint)
        for config, state in zip(trainer.lr_scheduler_configs, checkpoint.get("lr_schedulers", [])):
            config.scheduler.load_state_dict(state)
        return int(checkpoint["global_step"])

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning calls no teardown hook after an exception (Ctrl-C included).
        self.discard(trainer)


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every floating-point tensor is finite: one fused float64 norm (non-finite
    also when the norm overflows, a state too large to be healthy)."""
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel() > 0]
    return not floats or bool(parameter_norm(floats, torch.float64).isfinite())


def _tensors(state: Any) -> Iterator[Tensor]:
    """Every tensor in a nested dict / list / tuple."""
    if isinstance(state, Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _tensors(value)


def _remove(path: Path) -> None:
    """Remove a file, or the directory a sharded strategy's save_checkpoint writes; no error if absent."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
