"""A Lightning logger that keeps every scalar in memory: what ``lit-qlearn demo`` draws its
table and figure from, and what a script reads a run's series from after ``fit``."""
from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import Logger

__all__ = ["SeriesLogger"]


class SeriesLogger(Logger):
    """Keeps every logged scalar in memory, ``rows[step][name] = value`` (a scalar logged
    twice at one step keeps its last value). Use it beside an on-disk logger
    (``Trainer(logger=[TensorBoardLogger(...), SeriesLogger()])``); it writes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "series"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.rows.setdefault(int(step or 0), {}).update({k: float(v) for k, v in metrics.items()})

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of ``key``, by step (steps at which ``key`` was not logged are left out)."""
        points = [(s, row[key]) for s, row in sorted(self.rows.items()) if key in row]
        return [s for s, _ in points], [v for _, v in points]
