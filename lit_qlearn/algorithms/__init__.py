"""Q-learning algorithms as LightningModules."""
from lit_qlearn.algorithms.base import QLearningModule
from lit_qlearn.algorithms.dqn import DQN
from lit_qlearn.algorithms.preqn import PreQN
from lit_qlearn.algorithms.td3 import TD3, TD3BC

__all__ = ["DQN", "PreQN", "QLearningModule", "TD3", "TD3BC"]
