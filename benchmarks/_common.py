"""What every benchmark records about the code it measured."""
from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import lightning as L

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent


def git_info(files: dict[str, Path]) -> dict:
    """The HEAD commit and, per measured source file, whether it differs from HEAD and its sha256."""

    def run(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    info: dict = {"commit": run("rev-parse", "HEAD")}
    for name, path in files.items():
        path = path.resolve()
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        info[f"{name}_modified_vs_head"] = bool(run("status", "--porcelain", str(rel)))
        info[f"{name}_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return info


class TrainClock(L.Callback):
    """Wall time from the first to the last training batch (Trainer set-up excluded)."""

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def timed_hook(callback: L.Callback) -> L.Callback:
    """Accumulate the wall time ``callback.on_train_batch_end`` takes in ``hook_seconds``."""
    hook = callback.on_train_batch_end
    callback.hook_seconds = 0.0

    def timed(*args, **kwargs):
        start = time.perf_counter()
        hook(*args, **kwargs)
        callback.hook_seconds += time.perf_counter() - start

    callback.on_train_batch_end = timed
    return callback


def interleaved(configs: Sequence[T], repeats: int) -> Iterator[tuple[int, T]]:
    """``(repeat, config)`` for every config, ``repeats`` times, the order rotated each
    repeat (A B, B A, ...), so that a drift of the machine hits every config alike."""
    order = list(configs)
    for r in range(repeats):
        k = r % len(order)
        for config in order[k:] + order[:k]:
            yield r, config
