"""Q-learning algorithms as LightningModules."""
from lit_qlearn.algorithms.actor_critic import ActorCritic
from lit_qlearn.algorithms.base import QLearningModule
from lit_qlearn.algorithms.cql import CQL
from lit_qlearn.algorithms.crossq import CrossQ
from lit_qlearn.algorithms.dqn import DQN
from lit_qlearn.algorithms.iql import IQL
from lit_qlearn.algorithms.pqn import PQN
from lit_qlearn.algorithms.preqn import PreQN
from lit_qlearn.algorithms.sac import SAC
from lit_qlearn.algorithms.td3 import DDPG, TD3, TD3BC

__all__ = ["ActorCritic", "CQL", "CrossQ", "DDPG", "DQN", "IQL", "PQN", "PreQN", "QLearningModule", "SAC", "TD3",
           "TD3BC"]
