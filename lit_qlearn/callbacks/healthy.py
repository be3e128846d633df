"""HealthyCheckpoint: keep on disk the checkpoints of the last steps a monitor judged
healthy, to write the newest out when the monitor detects a divergence, or to roll back to one.

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
from typing import Any, NamedTuple

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from torch import Tensor

from lit_qlearn.ntk import parameter_norm

__all__ = ["Held", "HealthyCheckpoint", "FabricHealthyState", "all_finite", "last_healthy_name"]


def last_healthy_name(step: int) -> str:
    """The name of the kept checkpoint of healthy step ``step``."""
    return f"last-healthy-step={step}.ckpt"


class Held(NamedTuple):
    """One held checkpoint: its step, its file, and the owner's value of that step (None: not measured)."""

    step: int
    path: Path
    value: float | None


class HealthyCheckpoint(Callback):
    """The checkpoints of the last ``keep`` healthy steps, kept in hidden files while the run goes on.

    At the end of a batch whose step was :meth:`mark`-ed healthy, when the module's and
    the optimisers' states are all finite on every rank (a NaN the owner's measurement
    does not see is not kept), the step's checkpoint is written with
    ``Trainer.save_checkpoint`` (on every rank, rank zero writing, as a ``ModelCheckpoint``
    does) to ``.last-healthy-<hash of key>.partial.ckpt`` in ``dirpath`` and renamed
    ``.last-healthy-<hash of key>.step=<step>.ckpt``, so that a run killed mid-write keeps
    the previous whole files; the oldest beyond ``keep`` is removed. The names are hidden
    and their stems do not start with "last" (``ckpt_path="last"`` never takes them); the
    hash of ``key`` (the owner's ``state_key``) lets two owners with other options share a
    directory. :attr:`held` lists them, oldest first, each with the value the owner gave
    :meth:`mark` (CrashPredictor: the step's ``max|Q| / bound``).

    :meth:`keep` renames the newest ``last-healthy-step=<step>.ckpt`` and removes the
    others; :meth:`discard` removes them all (at the end of a run without detection, or one
    that raises; a killed process leaves them: ordinary checkpoints of their steps).
    :meth:`restore` loads one back into the running module, optimisers and schedulers;
    :meth:`roll_back` does so at the end of the batch, lets the owner change the state (a
    remedy), and holds the result as the current step's checkpoint, alone: the states before
    the remedy are dropped, so a later rollback never undoes it.

    Placement: the checkpoint holds every callback's state of the step, so the component
    must run after every other callback's ``on_train_batch_end`` and before the checkpoint
    callbacks (Lightning keeps those last): :meth:`attach` inserts it there.

    Its cost is one checkpoint write per marked step, that of a ``ModelCheckpoint`` saving
    at each of them, on disk and not in memory (a DataModule that saves its replay buffer
    writes the buffer too), and ``keep`` files on disk.

    Args:
        key: names the temporary files (the owner's ``state_key``).
        dirpath: where the files go (default ``<log_dir>/checkpoints``).
        keep: how many healthy steps' checkpoints are held (>= 1).
    """

    def __init__(self, key: str, dirpath: str | os.PathLike | None = None, keep: int = 1) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"HealthyCheckpoint: keep must be an integer >= 1, got {keep!r}")
        self.key = key
        self.dirpath = dirpath
        self.keep_last = keep
        #: The held checkpoints, oldest first (the same list on every rank: captures are collective).
        self.held: list[Held] = []
        #: Once :meth:`keep` ran: the step and the path of the kept file.
        self.kept = False
        self._kept: Held | None = None
        self._marked: tuple[int, float | None] | None = None
        self._rollback: tuple[Callable[[Trainer, LightningModule, int], None],
                              Callable[[list[Held]], int] | None] | None = None
        self._directory: Path | None = None

    def _newest(self) -> Held | None:
        """The kept checkpoint after :meth:`keep`, else the newest held; None: none."""
        return self._kept if self.kept else (self.held[-1] if self.held else None)

    @property
    def step(self) -> int | None:
        """The step of the newest held checkpoint (of the kept one after :meth:`keep`); None: none."""
        newest = self._newest()
        return None if newest is None else newest.step

    @property
    def path(self) -> Path | None:
        """Where the newest held checkpoint is (the kept file after :meth:`keep`); None: none."""
        newest = self._newest()
        return None if newest is None else newest.path

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
    def mark(self, step: int, value: float | None = None) -> None:
        """Take the checkpoint of ``step`` (the current ``global_step``) at the end of its
        batch; ``value`` is the owner's measure of it, kept beside it in :attr:`held`."""
        self._marked = (step, value)

    def roll_back(self, then: Callable[[Trainer, LightningModule, int], None],
                  choose: Callable[[list[Held]], int] | None = None) -> None:
        """At the end of this batch, after every other callback: :meth:`restore` the held
        checkpoint ``choose(held)`` (an index into :attr:`held`; default: the newest), call
        ``then(trainer, pl_module, restored_step)`` (the owner's remedy), and hold the
        resulting state alone as the checkpoint of the current step (so a second rollback
        starts from the first one's remedied state)."""
        self._rollback = (then, choose)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self._rollback is not None and not self.kept:
            (then, choose), self._rollback = self._rollback, None
            restored = self.restore(trainer, pl_module, -1 if choose is None else choose(list(self.held)))
            trainer.strategy.barrier("HealthyCheckpoint.rolled_back")  # every rank has read the file
            self._drop(trainer, self.held)  # the states before the remedy: a later rollback must not undo it
            self.held = []
            then(trainer, pl_module, restored)
            self._marked = (trainer.global_step, None)
        if self._marked is None or self._marked[0] != trainer.global_step or self.kept:
            return
        (step, value), self._marked = self._marked, None
        # What the checkpoint holds of the model and optimisers (references, no copy): one
        # fused norm over them, reduced so that every rank takes part in the save or none.
        states = [pl_module.state_dict(), [list(o.state.values()) for o in trainer.optimizers]]
        if not trainer.strategy.reduce_boolean_decision(all_finite(_tensors(states)), all=True):
            return  # keep the previous files, whose states were finite
        if self._directory is None:  # resolved once, on every rank (trainer.log_dir is collective)
            self._directory = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints")
        partial, held = self._partial(), self._held_file(step)
        trainer.save_checkpoint(partial, weights_only=False)  # ends with a barrier: the file is whole
        if trainer.is_global_zero:
            os.replace(partial, held)  # atomic: a held file is always one whole checkpoint
        self.held = [h for h in self.held if h.step != step] + [Held(step, held, value)]
        if len(self.held) > self.keep_last:
            self._drop(trainer, self.held[:-self.keep_last])
            self.held = self.held[-self.keep_last:]

    def _partial(self) -> Path:
        """The file being written."""
        return _hidden(self._directory, self.key, "partial")

    def _held_file(self, step: int) -> Path:
        return _hidden(self._directory, self.key, f"step={step}")

    def _drop(self, trainer: Trainer, entries: Iterable[Held]) -> None:
        """Remove held files (rank zero, which wrote them)."""
        if trainer.is_global_zero:
            for entry in entries:
                _remove(entry.path)

    # ----------------------------------------------------------- the outcome
    def keep(self, trainer: Trainer) -> Path | None:
        """Rename the newest held checkpoint ``last-healthy-step=<step>.ckpt`` in its
        directory, remove the other held files, and return its path (None when no marked
        step had a finite state); collective: every rank calls it, rank zero renames.
        Nothing is captured after it."""
        if self.kept:
            return self.path
        if not self.held or self._directory is None:  # the same on every rank: captures are collective
            return None
        newest = self.held[-1]
        path = self._directory / last_healthy_name(newest.step)
        if trainer.is_global_zero:
            os.replace(newest.path, path)
        self._drop(trainer, self.held[:-1])
        trainer.strategy.barrier("HealthyCheckpoint.keep")
        self._kept, self.kept, self.held = Held(newest.step, path, newest.value), True, []
        return path

    def discard(self, trainer: Trainer) -> None:
        """Remove the temporary files (rank zero, which wrote them); a kept file stays."""
        if self._directory is not None and trainer.is_global_zero:
            _remove(self._partial())
            for stale in self._directory.glob(_hidden(self._directory, self.key, "step=*").name):
                _remove(stale)
        self.held = []
        self._marked = self._rollback = None

    def restore(self, trainer: Trainer, pl_module: LightningModule, index: int = -1) -> int:
        """Load the held checkpoint ``held[index]`` (default: the newest): its weights (target
        networks and buffers included), optimiser states and learning-rate schedulers' states
        into the running ``pl_module``, ``trainer.optimizers`` and
        ``trainer.lr_scheduler_configs``; return its step. Counters, random states and
        callbacks' states are left as they are (the run goes on counting);
        ``trainer.fit(ckpt_path=path)`` resumes from all of them.

        Read with ``trainer.strategy.load_checkpoint(weights_only=True)``: the reader of
        the strategy's ``CheckpointIO`` that wrote the file, tensors and plain values only."""
        if pl_module is not trainer.lightning_module:
            raise ValueError("HealthyCheckpoint.restore: pl_module must be the module the trainer fits")
        entries = [self._kept] if self.kept else self.held  # restore(index) reads any held one
        if not entries:
            raise RuntimeError("HealthyCheckpoint.restore: no healthy checkpoint is held (no marked step had a "
                               "finite state yet)")
        trainer.strategy.barrier("HealthyCheckpoint.restore")  # rank zero's rename is done
        checkpoint = trainer.strategy.load_checkpoint(entries[index].path, weights_only=True)
        trainer.strategy.load_model_state_dict(checkpoint)
        trainer.strategy.load_optimizer_state_dict(checkpoint)
        for config, state in zip(trainer.lr_scheduler_configs, checkpoint.get("lr_schedulers", [])):
            config.scheduler.load_state_dict(state)
        return int(checkpoint["global_step"])

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning calls no teardown hook after an exception (Ctrl-C included).
        self.discard(trainer)


class FabricHealthyState:
    """The last healthy state of a Lightning Fabric loop: what :class:`HealthyCheckpoint` is
    to a Trainer, for :class:`~lit_qlearn.callbacks.CrashPredictor`'s ``"checkpoint_and_stop"``
    under Fabric.

    At each :meth:`mark`-ed step whose ``state`` is all finite on every rank, ``state`` (the
    dict the loop itself saves: modules, optimisers, any object with ``state_dict``) is
    written with ``fabric.save`` (rank zero writes, every rank waits) to a hidden file in
    ``dirpath``, which replaces the previous one. :meth:`keep` renames it
    ``last-healthy-step=<step>.ckpt``: ``fabric.load(path, state)`` puts the loop back in that
    state. :meth:`discard` removes the hidden files. Collective: every rank calls each method.

    Args:
        fabric: the loop's Fabric.
        state: the loop's state, as given to ``fabric.save``.
        key: names the hidden files (the owner's ``state_key``).
        dirpath: where the files go.
    """

    def __init__(self, fabric: Any, state: dict[str, Any], key: str, dirpath: str | os.PathLike) -> None:
        if not isinstance(state, dict) or not state:
            raise ValueError("FabricHealthyState: state must be the non-empty dict the loop saves with fabric.save "
                             f"(modules, optimisers, ...), got {type(state).__name__}")
        self.fabric, self.state, self.key, self.directory = fabric, state, key, Path(dirpath)
        #: The newest held state; after :meth:`keep`, the kept file.
        self.held: Held | None = None
        self.kept = False

    @property
    def step(self) -> int | None:
        return None if self.held is None else self.held.step

    @property
    def path(self) -> Path | None:
        return None if self.held is None else self.held.path

    def mark(self, step: int, value: float | None = None) -> None:
        """Hold the state as it is now, that of ``step``, unless something in it is not finite."""
        if self.kept:
            return
        states = [v.state_dict() if callable(getattr(v, "state_dict", None)) else v for v in self.state.values()]
        if not self.fabric.strategy.reduce_boolean_decision(all_finite(_tensors(states)), all=True):
            return  # keep the previous file, whose state was finite
        partial, held = _hidden(self.directory, self.key, "partial"), _hidden(self.directory, self.key, f"step={step}")
        self.fabric.save(partial, self.state)  # ends with a barrier: the file is whole
        if self.fabric.is_global_zero:
            os.replace(partial, held)
            if self.held is not None and self.held.path != held:
                _remove(self.held.path)
        self.held = Held(step, held, value)

    def keep(self, fabric: Any = None) -> Path | None:
        """Rename the held file ``last-healthy-step=<step>.ckpt`` and return its path (None:
        nothing was held); nothing is held after it."""
        if self.kept or self.held is None:
            return self.path
        path = self.directory / last_healthy_name(self.held.step)
        if self.fabric.is_global_zero:
            os.replace(self.held.path, path)
        self.fabric.barrier("FabricHealthyState.keep")
        self.held, self.kept = Held(self.held.step, path, self.held.value), True
        return path

    def discard(self, fabric: Any = None) -> None:
        """Remove the hidden files (a kept file stays)."""
        if self.fabric.is_global_zero:
            _remove(_hidden(self.directory, self.key, "partial"))
            for stale in self.directory.glob(_hidden(self.directory, self.key, "step=*").name):
                _remove(stale)
        if not self.kept:
            self.held = None


def _hidden(directory: Path, key: str, suffix: str) -> Path:
    """A hidden file of the owner named ``key``: ``.last-healthy-<hash of key>.<suffix>.ckpt``."""
    return directory / f".last-healthy-{hashlib.sha1(key.encode()).hexdigest()[:10]}.{suffix}.ckpt"


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
