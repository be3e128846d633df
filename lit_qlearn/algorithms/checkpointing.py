"""What a QLearningModule adds to Lightning's checkpoints: the RNG state of every rank
(exact resume), one-line errors for broken files, and one warning silenced."""
from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch

from lit_qlearn.data.checkpoint import CheckpointError, explain_load_failure

__all__ = ["rng_state", "set_rng_state", "explain_broken_checkpoints", "quiet_checkpoint_warning",
           "remove_warning_filter"]


def rng_state() -> dict[str, Any]:
    """The torch (and CUDA), numpy and Python RNG states of this process, as tensors and
    plain values (so a checkpoint holding them loads with ``torch.load(weights_only=True)``)."""
    # numpy's state as (name, key tensor, pos, has_gauss, gauss)
    name, key, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def explain_broken_checkpoints(strategy: Any) -> None:
    """Make a failed ``Trainer.fit(ckpt_path=...)`` read one line naming the file and what
    is wrong with it (:class:`~lit_qlearn.data.checkpoint.CheckpointError`): the Trainer
    loads the file after every ``setup`` hook, through ``strategy.checkpoint_io``, and
    torch's own errors for an empty, truncated or code-holding file are a stack of
    internals, one of them advice to load with ``weights_only=False`` (which would run the
    file's code). The loader is wrapped once per CheckpointIO object; a file that loads is
    untouched, and an error the file itself does not explain is raised as it was."""
    io = strategy.checkpoint_io
    if getattr(io, "_lit_qlearn_explains", False):
        return
    load = io.load_checkpoint

    def load_checkpoint(path: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return load(path, *args, **kwargs)
        except Exception as error:
            try:
                explain_load_failure(path)
            except CheckpointError as explained:
                raise explained from None
            raise error

    io.load_checkpoint = load_checkpoint
    io._lit_qlearn_explains = True


# Lightning 2.6's ModelCheckpoint(every_n_train_steps=...) warns, in 15 lines, on every
# save of a module with manual optimization unless the module keeps pre-step copies of
# weights in attributes named `saved_models` and `layer`. It does not apply here: a
# QLearningModule counts one global_step per update (its counted optimiser only) and
# moves its targets inside the update, so the checkpoint written at step k is the one
# consistent state after k updates, the state that resume needs; pre-step weights would
# pair the weights of k - 1 updates with the counters of k. Only that message, from that
# module, is silenced, from fit start to teardown (installed at import, the filter would
# be lost to any warnings.catch_warnings() block the import happened in).
def quiet_checkpoint_warning() -> tuple[Any, ...]:
    """Install the filter (at fit start) and return its entry, for :func:`remove_warning_filter`
    at teardown: a user's own manually optimised module fitted later still gets the warning."""
    warnings.filterwarnings(
        "ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps, but no "
        r"pre-optimization state was saved", category=UserWarning,
        module=r"lightning\.pytorch\.callbacks\.model_checkpoint")
    return warnings.filters[0]


def remove_warning_filter(entry: tuple[Any, ...] | None) -> None:
    """Remove a filter :func:`quiet_checkpoint_warning` installed (None: nothing)."""
    if entry is not None and entry in warnings.filters:
        warnings.filters.remove(entry)
        mutated = getattr(warnings, "_filters_mutated", None)  # (CPython: drop its cached decisions)
        if mutated is not None:
            mutated()
