"""Data: offline datasets (D4RL-format HDF5 and Minari readers, the writer, the
collector, :class:`OfflineDataModule`; DESIGN.md section 6) and online replay
(:class:`ReplayBuffer`, :class:`PrioritizedReplayBuffer`, the environment loop
:class:`Rollout`, :class:`OnlineDataModule`)."""
from lit_qlearn.data.collect import REF_SCORES, collect, default_dataset_path, ensure_default_dataset, reference_scores
from lit_qlearn.data.d4rl import DatasetError, read_d4rl, write_d4rl
from lit_qlearn.data.minari import read_minari
from lit_qlearn.data.offline import OfflineDataModule
from lit_qlearn.data.online import OnlineDataModule
from lit_qlearn.data.replay import PrioritizedReplayBuffer, ReplayBuffer
from lit_qlearn.data.rollout import Rollout, make_env, make_vector_env, run_episodes
from lit_qlearn.data.types import DataSpec, Transitions, data_spec

__all__ = [
    "Transitions",
    "DataSpec",
    "data_spec",
    "OnlineDataModule",
    "ReplayBuffer",
    "PrioritizedReplayBuffer",
    "Rollout",
    "make_env",
    "make_vector_env",
    "run_episodes",
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
