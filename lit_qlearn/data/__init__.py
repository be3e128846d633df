"""Data, read and served (docs/design.md section 6): offline datasets (D4RL-format HDF5
and Minari readers, the writer, :class:`OfflineDataModule`), online replay
(:class:`ReplayBuffer`, :class:`PrioritizedReplayBuffer`, the environment loop
:class:`Rollout`, :class:`OnlineDataModule`), on-policy rollouts (:class:`OnPolicyDataModule`), reference scores and where named datasets
live (:mod:`lit_qlearn.data.names`). Making datasets is :mod:`lit_qlearn.datasets`' job."""
from lit_qlearn.data.d4rl import DatasetError, read_d4rl, write_d4rl
from lit_qlearn.data.minari import read_minari
from lit_qlearn.data.names import REF_SCORES, default_dataset_path, reference_scores, resolve
from lit_qlearn.data.offline import OfflineDataModule
from lit_qlearn.data.online import OnlineDataModule
from lit_qlearn.data.onpolicy import OnPolicyDataModule
from lit_qlearn.data.replay import PrioritizedReplayBuffer, ReplayBuffer
from lit_qlearn.data.rollout import Rollout, make_env, make_vector_env, run_episodes
from lit_qlearn.data.types import DataSpec, Transitions, data_spec

__all__ = [
    "Transitions",
    "DataSpec",
    "data_spec",
    "OnlineDataModule",
    "OnPolicyDataModule",
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
    "OfflineDataModule",
    "default_dataset_path",
    "resolve",
    "reference_scores",
    "REF_SCORES",
]
