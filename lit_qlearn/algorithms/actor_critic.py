"""What the continuous-control algorithms share: an ensemble critic, an actor, their
options, optimisers, the probe protocol and the logged scalars. TD3 (and DDPG, TD3+BC,
PreQN) and SAC differ only in their actor, targets and losses."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from lit_qlearn.algorithms.base import QLearningModule, compile_mode
from lit_qlearn.data.types import DataSpec, Transitions
from lit_qlearn.networks import Critic
from lit_qlearn.ntk import parameter_norm
from lit_qlearn.targets import TargetUpdate
from lit_qlearn.td import check_gamma, td_loss

__all__ = ["ActorCritic", "CriticLoss", "frozen"]


class ActorCritic(QLearningModule):
    """Base of the actor-critics: ``num_q`` critics evaluated in one batched pass and an
    actor built by the subclass (:meth:`make_actor`). The sizes are read from the
    DataModule at setup unless ``obs_dim`` and ``act_dim`` are given.

    Args:
        obs_dim: observation size; None reads it from the DataModule.
        act_dim: action size; None reads it from the DataModule.
        action_low: lower action bound(s), used with ``obs_dim`` / ``act_dim``.
        action_high: upper action bound(s), used with ``obs_dim`` / ``act_dim``.
        gamma: discount factor in [0, 1).
        critic_hidden: hidden widths of each critic.
        critic_activation: critic activation, one of relu, tanh, sin, elu, mish.
        critic_norm: None, "layer" (the LayerNorm remedy of docs/design.md 5.6), "batch" or "batchrenorm".
        critic_norm_layers: indices of the hidden layers that get the norm (None: all).
        critic_norm_affine: learnable gain and bias in the critic's norm layers.
        critic_weight_norm: weight-normalise the critic's output layer.
        critic_dropout: dropout rate after each hidden activation of the critic.
        num_q: number of critics; targets take their minimum.
        actor_hidden: hidden widths of the actor.
        actor_activation: actor activation.
        actor_lr: actor Adam learning rate.
        critic_lr: critic Adam learning rate.
        critic_weight_decay: Adam (L2) weight decay of the critic.
        target_tau: Polyak rate of the default target rule (an EMATarget callback overrides it).
        target_every: updates between target moves (None: the algorithm's default).
        eval_every: evaluation cadence in updates (0 disables).
        eval_episodes: episodes per evaluation.
        compile: ``torch.compile`` the critic and actor networks (and their targets) at fit start: True,
            or a ``torch.compile`` mode ("reduce-overhead": CUDA graphs on a GPU).
    """

    action_kinds = ("continuous",)
    #: Adam's ``(beta1, beta2)`` of the critic's and the actor's optimisers (torch's default;
    #: CrossQ's is ``(0.5, 0.999)``).
    adam_betas: tuple[float, float] = (0.9, 0.999)

    def __init__(
        self,
        obs_dim: int | None = None,
        act_dim: int | None = None,
        action_low: float | Sequence[float] = -1.0,
        action_high: float | Sequence[float] = 1.0,
        gamma: float = 0.99,
        critic_hidden: Sequence[int] = (256, 256),
        critic_activation: str = "relu",
        critic_norm: str | None = None,
        critic_norm_layers: Sequence[int] | None = None,
        critic_norm_affine: bool = True,
        critic_weight_norm: bool = False,
        critic_dropout: float = 0.0,
        num_q: int = 2,
        actor_hidden: Sequence[int] = (256, 256),
        actor_activation: str = "relu",
        actor_lr: float = 3e-4,
        critic_lr: float = 3e-4,
        critic_weight_decay: float = 0.0,
        target_tau: float = 0.005,
        target_every: int | None = None,
        eval_every: int = 5000,
        eval_episodes: int = 10,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.gamma = check_gamma(type(self).__name__, gamma)
        self.critic_options = dict(hidden=critic_hidden, activation=critic_activation, norm=critic_norm,
                                   norm_layers=critic_norm_layers, norm_affine=critic_norm_affine,
                                   weight_norm_output=critic_weight_norm, dropout=critic_dropout)
        self.actor_options = dict(hidden=actor_hidden, activation=actor_activation)
        self.num_q = int(num_q)
        self.actor_lr, self.critic_lr, self.critic_weight_decay = actor_lr, critic_lr, critic_weight_decay
        self.eval_every, self.eval_episodes = int(eval_every), int(eval_episodes)
        self.compile_networks = compile_mode(type(self).__name__, compile)
        self.target_tau, self.target_every = target_tau, target_every
        self.actor: nn.Module | None = None
        self.critic: Critic | None = None
        if obs_dim is not None and act_dim is not None:  # built once every constructor has run
            self.given_spec = DataSpec.continuous(obs_dim, act_dim, action_low, action_high)

    def default_target_update(self) -> TargetUpdate | None:
        """Polyak averaging at ``target_tau`` every ``target_every`` updates (None:
        :meth:`default_target_every`), resolved after every constructor has run."""
        every = self.default_target_every() if self.target_every is None else self.target_every
        return TargetUpdate(self.target_tau, every)

    def default_target_every(self) -> int:
        """Updates between target moves when ``target_every`` is None."""
        return 1

    # ---------------------------------------------------------------- networks
    def make_actor(self, spec: DataSpec) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must implement make_actor(spec)")

    def build(self, spec: DataSpec) -> None:
        self.critic = Critic(spec.obs_dim, spec.action_dim, num_q=self.num_q, **self.critic_options)
        self.actor = self.make_actor(spec)
        self.build_targets()

    def build_targets(self) -> None:
        """The target networks the algorithm bootstraps from (:meth:`add_target`), made
        after the critic and the actor; none by default (PreQN has none)."""

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"critic": self.adam(self.critic.parameters(), lr=self.critic_lr, weight_decay=self.critic_weight_decay,
                                    betas=self.adam_betas),
                "actor": self.adam(self.actor.parameters(), lr=self.actor_lr, betas=self.adam_betas)}

    # ------------------------------------------------------------ probe protocol
    def q_value(self, obs: Tensor, act: Tensor) -> Tensor:
        """First critic's ``Q(s, a)``, shape ``(N,)``."""
        return self.critic.members[0](torch.cat([obs, act], dim=-1)).squeeze(-1)

    def greedy_action(self, obs: Tensor) -> Tensor:
        """The actor's deterministic action: the action the probe's bootstrap uses."""
        return self.actor(obs)

    def q_network(self) -> nn.Module:
        return self.critic.q_function(0)

    def q_networks(self) -> list[nn.Module]:
        """Every critic member as ``(obs, act) -> (N,)`` (optional protocol member used by
        :class:`~lit_qlearn.callbacks.PreQNLineSearch`)."""
        return [self.critic.q_function(i) for i in range(self.critic.num_q)]

    # ---------------------------------------------------------------- policies
    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.actor(self.normalize(obs)).cpu().numpy()

    # --------------------------------------------------------------- the update
    def critic_loss(self, batch: Transitions, y: Tensor) -> CriticLoss:
        """The (importance-weighted) TD loss of every critic member against ``y`` (``(B,)``,
        no gradient); a variant overrides it to add a term (CQL's penalty)."""
        q = self.critic(batch.obs, batch.act)
        td = td_loss(q, y, batch.weight)
        return CriticLoss(td.loss, q.detach(), td.td_abs, {"train/critic_loss": td.loss.detach()})

    def log_update(self, batch: Transitions, q_data: Tensor, scalars: dict[str, Tensor | float],
                   y: Tensor | None = None, critic_grad_norm: Tensor | None = None) -> None:
        """Log one update's scalars (call on logging steps only): ``q/data_mean`` (of
        ``q_data``, the first critic on the data's actions before its step, ``(B,)``),
        ``q/target_mean`` (of the TD target ``y`` ``(B,)``, if given),
        ``train/critic_grad_norm`` (the critic's gradient norm before any clip, if given),
        ``scalars``, ``q/policy_mean`` (measured now unless ``scalars`` has it) and
        ``params/critic_norm``."""
        metrics: dict[str, Tensor | float] = {"q/data_mean": q_data.mean(), **scalars}
        if y is not None:
            metrics["q/target_mean"] = y.mean()
        if critic_grad_norm is not None:
            metrics["train/critic_grad_norm"] = critic_grad_norm
        with torch.no_grad():
            if "q/policy_mean" not in metrics:
                metrics["q/policy_mean"] = self.q_value(batch.obs, self.greedy_action(batch.obs)).mean()
            metrics["params/critic_norm"] = parameter_norm(self.critic.parameters())
        self.log_scalars(metrics)


class CriticLoss(NamedTuple):
    """A critic loss and what the rest of the update reads from it."""

    loss: Tensor  # () what the critic's optimiser minimises
    q: Tensor  # (num_q, B) Q(s, a) of every member on the data's actions, before the step, detached
    td_abs: Tensor  # (B,) per-sample |TD error|, detached: new priorities for prioritised replay
    # detached scalars to log: "train/critic_loss" (the TD loss) and a variant's own, which
    # its other optimisers may read (CQL's alpha' reads "train/cql_gap")
    scalars: dict[str, Tensor]


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Within the block, ``module``'s parameters get no gradient (an actor's loss
    backpropagates through the critic without touching the critic's ``.grad``)."""
    module.requires_grad_(False)
    try:
        yield
    finally:
        module.requires_grad_(True)
