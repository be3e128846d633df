"""The random-walk toy of Yue et al. (2023) on which Q-value divergence and its
crash step are studied (docs/design.md section 7, R1).

A trajectory of planar states: ``s_0`` uniform in ``[0, 1)^2``, each move ``step``
along one of the 8 compass directions (chosen uniformly) plus uniform noise in
``[0, noise)`` per coordinate. The critic sees ``(s, direction)`` in R^4 (the
direction as a unit vector), the reward is 0 (so the true Q is 0) and the target
is ``gamma * max`` over the 8 directions of the *current* network at ``s'``,
without gradient and without a target network. Full-batch SGD on the mean
squared TD error with ``gamma = 0.99`` diverges: NaN after a few hundred steps
at ``lr = 0.01``, with ``1/||u||`` falling on a line that reaches zero at the NaN
step (docs/design.md section 5.4; measured: benchmarks/results/crash_prediction.json).

:class:`RandomWalkQ` implements the probe protocol, so every callback of the
package attaches to it; :class:`RandomWalkDataModule` serves the whole
trajectory as every batch and as the probe set.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import gymnasium as gym
import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from lit_qlearn.algorithms.base import QLearningModule
from lit_qlearn.data.types import DataSpec, Transitions
from lit_qlearn.networks import StateActionQ, mlp
from lit_qlearn.td import td_loss

__all__ = ["compass_directions", "random_walk", "RandomWalkDataModule", "RandomWalkQ", "ChainEnv"]


def compass_directions() -> Tensor:
    """The 8 unit vectors ``(cos k pi/4, sin k pi/4)``, shape ``(8, 2)``."""
    k = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    return torch.stack([k.cos(), k.sin()], dim=1).float()


def random_walk(num_transitions: int = 64, step: float = 0.1, noise: float = 0.02, seed: int = 0) -> Transitions:
    """One random-walk trajectory as ``num_transitions`` transitions ``(s, d, 0, s', 0)``.

    ``s' = s + step * d + U[0, noise)^2`` with ``d`` one of :func:`compass_directions`.
    """
    if num_transitions < 1:
        raise ValueError(f"random_walk: num_transitions must be >= 1, got {num_transitions}")
    g = torch.Generator().manual_seed(seed)
    dirs = compass_directions()
    start = torch.rand(2, generator=g)
    choice = torch.randint(8, (num_transitions,), generator=g)
    moves = step * dirs[choice] + noise * torch.rand(num_transitions, 2, generator=g)
    positions = torch.cat([start[None], start + moves.cumsum(0)])
    zeros = torch.zeros(num_transitions)
    return Transitions(positions[:-1].contiguous(), dirs[choice], zeros, positions[1:].contiguous(), zeros.clone())


class _Repeat(IterableDataset):
    def __init__(self, batch: Transitions, times: int) -> None:
        self.batch, self.times = batch, times

    def __iter__(self) -> Iterator[Transitions]:
        for _ in range(self.times):
            yield self.batch

    def __len__(self) -> int:
        return self.times


class RandomWalkDataModule(LightningDataModule):
    """The random-walk trajectory, served whole as every batch (full-batch SGD) and as
    the probe set. Every DDP rank gets the same batch, so a DDP run takes the same
    steps as a single-device one.

    Args:
        num_transitions: transitions in the trajectory (see :func:`random_walk`).
        step: length of each move.
        noise: upper end of the uniform noise added to each coordinate of a move.
        seed: seed of the trajectory.
        steps_per_epoch: batches per epoch (use ``Trainer(max_steps=...)`` to stop).
    """

    #: States in the plane; actions are the compass directions as unit vectors.
    spec = DataSpec.continuous(2, 2, -1.0, 1.0)

    def __init__(self, num_transitions: int = 64, step: float = 0.1, noise: float = 0.02, seed: int = 0,
                 steps_per_epoch: int = 1000) -> None:
        super().__init__()
        self.data = random_walk(num_transitions, step, noise, seed)
        self.steps_per_epoch = int(steps_per_epoch)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Repeat(self.data, self.steps_per_epoch), batch_size=None)

    def probe_batch(self, n: int | None = None, seed: int = 0) -> Transitions:
        """The first ``min(n, len)`` transitions (all of them by default): the toy's
        studies measure on the whole trajectory."""
        n = len(self.data.obs) if n is None else min(int(n), len(self.data.obs))
        return self.data.map(lambda t: t[:n].clone())


class RandomWalkQ(QLearningModule):
    """Q-learning on the random-walk toy: full-batch SGD (or Adam) on the squared TD
    error against ``r + gamma (1 - terminated) max_d Q(s', d)`` of the current network.

    Args:
        gamma: discount factor (0.99 diverges; 0.95 and below converge: benchmarks/results/crash_prediction.json).
        hidden: hidden widths of the ReLU MLP (``(64,)``: the 2-layer network of the paper).
        activation: activation of the MLP, one of relu, tanh, sin, elu, mish.
        norm: None or "layer" (the LayerNorm remedy) or "batch".
        lr: learning rate.
        optimizer: ``"sgd"`` (finite crash step) or ``"adam"`` (polynomial growth, docs/design.md section 5.4).
    """

    def __init__(self, gamma: float = 0.99, hidden: Sequence[int] = (64,), activation: str = "relu",
                 norm: str | None = None, lr: float = 0.01, optimizer: str = "sgd") -> None:
        super().__init__()
        self.save_hyperparameters()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"RandomWalkQ: optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        self.gamma = float(gamma)
        self.register_buffer("directions", compass_directions())
        self.build_for(RandomWalkDataModule.spec)

    def build(self, spec: DataSpec) -> None:
        hp = self.hparams
        self.net = mlp(4, 1, hidden=hp.hidden, activation=hp.activation, norm=hp.norm)

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        cls = torch.optim.SGD if self.hparams.optimizer == "sgd" else torch.optim.Adam
        return {"critic": cls(self.net.parameters(), lr=self.hparams.lr)}

    # ------------------------------------------------------------ probe protocol
    def q_value(self, obs: Tensor, act: Tensor) -> Tensor:
        return self.net(torch.cat([obs, act], dim=-1)).squeeze(-1)

    def all_q(self, obs: Tensor) -> Tensor:
        """``Q(s, d)`` for the 8 directions, shape ``(N, 8)``."""
        n, k = obs.shape[0], self.directions.shape[0]
        x = torch.cat([obs.repeat_interleave(k, dim=0), self.directions.repeat(n, 1)], dim=-1)
        return self.net(x).view(n, k)

    def greedy_action(self, obs: Tensor) -> Tensor:
        return self.directions[self.all_q(obs).argmax(dim=1)]

    def q_network(self) -> nn.Module:
        return StateActionQ(self.net)

    # --------------------------------------------------------------- the update
    def next_value(self, batch: Transitions) -> Tensor:
        """``V(s') = max_d Q(s', d)`` of the current network."""
        return self.all_q(batch.next_obs).max(dim=1).values

    def update(self, batch: Transitions) -> Tensor:
        y = self.td_target(batch)
        critic = td_loss(self.q_value(batch.obs, batch.act), y)
        self.step("critic", critic.loss)
        if self.logging_now():
            self.log_scalars({"train/critic_loss": critic.loss.detach()})
        return critic.td_abs


class ChainEnv(gym.Env):
    """A discrete chain MDP with a known Q*, as a gymnasium environment
    (``gymnasium.make("lit_qlearn.toys:Chain-v0")``).

    States ``0 .. n-1`` (one-hot observations), action 1 moves right, action 0 left
    (state 0 stays). Moving right from the last state pays 1 and terminates; every
    other step pays 0. Episodes start in a uniformly random state and are truncated
    after ``max_episode_steps`` (8 by default), so many transitions are truncated,
    and a learner that cut the bootstrap there would be biased low. Closed form
    (:meth:`optimal_q`): ``Q*(s, right) = gamma^(n-1-s)``,
    ``Q*(s, left) = gamma * Q*(max(s-1, 0), right)``.

    Args:
        num_states: length of the chain.
    """

    metadata: dict = {"render_modes": []}

    def __init__(self, num_states: int = 5) -> None:
        self.num_states = int(num_states)
        self.observation_space = gym.spaces.Box(0.0, 1.0, (self.num_states,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.state = 0

    def _obs(self) -> np.ndarray:
        return np.eye(self.num_states, dtype=np.float32)[self.state]

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.state = int(self.np_random.integers(self.num_states))
        return self._obs(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        if int(action) == 1 and self.state == self.num_states - 1:
            return self._obs(), 1.0, True, False, {}
        self.state = min(self.state + 1, self.num_states - 1) if int(action) == 1 else max(self.state - 1, 0)
        return self._obs(), 0.0, False, False, {}

    @staticmethod
    def optimal_q(gamma: float, num_states: int = 5) -> np.ndarray:
        """``Q*(s, a)`` as an ``(num_states, 2)`` array (columns: left, right)."""
        right = gamma ** (num_states - 1 - np.arange(num_states))
        left = gamma * right[np.maximum(np.arange(num_states) - 1, 0)]
        return np.stack([left, right], axis=1)


gym.register("Chain-v0", entry_point=ChainEnv, max_episode_steps=8)
