"""Offline datasets: D4RL-format HDF5 and Minari readers, the writer, the collector,
and :class:`OfflineDataModule` (DESIGN.md section 6)."""
from lit_qlearn.data.collect import REF_SCORES, collect, default_dataset_path, ensure_default_dataset, reference_scores
from lit_qlearn.data.d4rl import DatasetError, read_d4rl, write_d4rl
from lit_qlearn.data.minari import read_minari
from lit_qlearn.data.offline import OfflineDataModule
from lit_qlearn.data.types import Transitions

__all__ = [
    "Transitions",
    "DatasetError",
    "read_d4rl",
    "write_d4rl",
    "read_minari",
    "collect",
    "OfflineDataModule",
    "default_dataset_path",
    "ensure_default_dataset",
    "reference_scores",
    "REF_SCORES",
]
