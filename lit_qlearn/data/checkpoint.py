"""Reading a checkpoint as data: tensors and plain values only, never code.

Every checkpoint the package opens itself goes through :func:`read_checkpoint`:
``torch.load(weights_only=True)``, which refuses any pickled object beyond tensors and
plain Python values, and one-line errors naming the file and what is wrong with it
(missing, empty, truncated, not a checkpoint, holding code) in place of torch's raw
ones, one of which advises loading with ``weights_only=False``, the switch that lets
a file run code.
"""
from __future__ import annotations

import os
import pathlib
import pickle
import re
import sys
from typing import Any

import torch

from lit_qlearn.data.d4rl import DatasetError, one_line

__all__ = ["CheckpointError", "read_checkpoint", "check_named_code", "check_before_loading", "explain_load_failure"]

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive


class CheckpointError(DatasetError):
    """A checkpoint file that cannot be read as data: the message is one line naming the
    file and what is wrong with it."""


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint dict at ``path``, loaded on the CPU with ``weights_only=True``.

    ``mmap``: map the tensors' storage instead of reading it (a cheap check of a large
    file's structure, e.g. one holding a replay buffer). Raises :class:`CheckpointError`
    for a missing, empty, truncated or corrupt file, a file that is no checkpoint, one
    holding pickled objects beyond tensors and plain values, or one that is no dict.
    """
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a checkpoint file (a directory or special file)")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    is_zip = head == _ZIP_MAGIC
    try:
        # mmap needs the zip format; torch's legacy format (a bare pickle stream) is read whole
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as e:
        # torch's text goes on to advise weights_only=False, which would run the file's code:
        # only what is wrong is kept
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:  # the refusal names the first class / function the pickle would call
            raise CheckpointError(f"{path}: the checkpoint holds pickled Python objects ({found.group(1)}) beyond "
                                  "tensors and plain values; lit_qlearn loads no code from a checkpoint") from None
        operand = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
        reason = operand.group(1).strip() if operand else _reason(e)
        if is_zip:
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({size} bytes; {reason})") from None
        raise CheckpointError(f"{path}: not a checkpoint (no PyTorch archive; {reason})") from None
    except Exception as e:  # torch raises RuntimeError / EOFError / KeyError / ... for broken files
        if is_zip:
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({size} bytes; {_reason(e)})") from None
        raise CheckpointError(f"{path}: not a checkpoint (no PyTorch archive; {_reason(e)})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    return ckpt


def _reason(err: BaseException) -> str:
    """The first sentence of torch's error, one line (its later sentences are advice)."""
    text = one_line(err).split(". ")[0][:160]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__



#: The one instantiator a checkpoint's hyper-parameters may name: the one LightningCLI writes.
CLI_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


def check_named_code(checkpoint: dict[str, Any], path: str | os.PathLike, cls: type) -> None:
    """Raise :class:`CheckpointError` if ``checkpoint``'s hyper-parameters name code that
    ``cls.load_from_checkpoint`` would import: an ``_instantiator`` other than
    LightningCLI's, or a ``_class_path`` that is not ``cls`` or a subclass of it already
    imported (nothing is imported to find out). Lightning refuses both itself from 2.6.6
    on; this holds whatever Lightning is installed."""
    # the key Lightning rebuilds ``cls`` from: "hyper_parameters" for a module,
    # "datamodule_hyper_parameters" for a DataModule
    hparams = checkpoint.get(getattr(cls, "CHECKPOINT_HYPER_PARAMS_KEY", "hyper_parameters"))
    if not isinstance(hparams, dict):
        return
    instantiator = hparams.get("_instantiator")
    if instantiator is not None and instantiator != CLI_INSTANTIATOR:
        raise CheckpointError(f"{path}: its hyper-parameters name the instantiator {instantiator!r}, which was not "
                              "imported (a checkpoint chooses no code to run)")
    class_path = hparams.get("_class_path")
    if class_path is None:
        return
    module_name, _, name = str(class_path).rpartition(".")
    named = getattr(sys.modules.get(module_name), name, None)
    if not (isinstance(named, type) and issubclass(named, cls)):
        raise CheckpointError(f"{path}: its hyper-parameters name the class {class_path!r}, which is not "
                              f"{cls.__name__} or an imported subclass of it and was not imported; if you trust "
                              "that code, import it first")


def _local(path: Any) -> bool:
    """Whether ``path`` is a file on this machine (not a URL a remote filesystem reads)."""
    return isinstance(path, (str, os.PathLike)) and "://" not in str(path)


def check_before_loading(path: Any, cls: type, weights_only: bool | None) -> None:
    """What ``cls.load_from_checkpoint(path)`` checks before Lightning reads the file: a
    local file read as data (:func:`read_checkpoint`: one-line errors for a broken file)
    whose hyper-parameters name no code to import (:func:`check_named_code`). Skipped for
    ``weights_only=False``, the caller's word that the file may hold code."""
    if _local(path) and weights_only is not False:
        check_named_code(read_checkpoint(path, mmap=True), path, cls)


def explain_load_failure(path: Any) -> None:
    """After loading ``path`` failed: raise the one-line :class:`CheckpointError` that says
    what is wrong with the file, if the file explains the failure (missing, empty,
    truncated, not a checkpoint, holding code); return if it reads as a sound
    checkpoint (the failure was something else) or is no local path."""
    if _local(path):
        read_checkpoint(path, mmap=True)
