"""PQN (Gallici et al., ICLR 2025, "Simplifying Deep Temporal Difference Learning"):
Q-learning without a target network and without a replay buffer. Many environments are
stepped in parallel by an :class:`~lit_qlearn.data.OnPolicyDataModule`; the module turns
each rollout into Q(lambda) returns (:func:`lit_qlearn.td.lambda_returns`) and regresses
``Q(s, a)`` on them for a few epochs of minibatches. LayerNorm in the Q-network (and
optionally L2) is what keeps the bootstrapping stable without targets (the paper's
analysis; docs/design.md section 5.6)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lit_qlearn.algorithms.base import compile_mode
from lit_qlearn.algorithms.dqn import EpsilonGreedyQ
from lit_qlearn.data.types import DataSpec, Transitions
from lit_qlearn.networks import DiscreteQNetwork, orthogonal_init
from lit_qlearn.ntk import parameter_norm
from lit_qlearn.td import check_gamma, lambda_returns, td_loss

__all__ = ["PQN"]


class PQN(EpsilonGreedyQ):
    """Parallelised Q-network for discrete actions: no target network, no replay buffer.

    Train it on an :class:`~lit_qlearn.data.OnPolicyDataModule`. For every rollout of T
    steps of E environments the data calls :meth:`rollout_targets`, which returns the
    Q(lambda) returns ``G`` ``(T, E)`` bootstrapped with ``max_a Q(s', a)`` of the network
    that collected the rollout, and then serves the rollout in shuffled minibatches; each
    minibatch is one update of ``mean (Q(s, a) - G)^2`` with RAdam and the gradient's global
    norm clipped. Exploration is epsilon-greedy, epsilon falling linearly from
    ``epsilon_start`` to ``epsilon_end`` over ``exploration_fraction * total_env_steps``
    environment steps; with ``anneal_lr`` the learning rate of each rollout's updates is
    ``critic_lr * (1 - env_step / total_env_steps)``, ``env_step`` counted before the rollout.

    Defaults are CleanRL's ``pqn.py`` (CartPole-v1): an MLP 120-84 with LayerNorm and ReLU,
    orthogonal initialisation (gain sqrt(2), zero biases), RAdam 2.5e-4 annealed over
    500k environment steps, gamma 0.99, lambda 0.65, gradient norm clipped at 10, epsilon
    1 -> 0.05 over half of the run; no weight decay (neither CleanRL nor the authors'
    purejaxql configurations use it). Two differences from CleanRL, both the
    project's conventions: a truncated episode bootstraps from its final state (CleanRL
    treats a truncation as a termination), and the lambda trace stops at an episode's
    end (CleanRL's recursion adds ``gamma lambda G_{t+1}`` of the next episode at a
    terminal step; the authors' purejaxql does not). Epsilon is taken at the environment step
    count before the vector step (CleanRL's after it: ``num_envs`` steps apart). Environment
    steps are counted per rank.

    Args:
        obs_shape: observation shape; None reads it from the DataModule.
        num_actions: number of actions; None reads it from the DataModule.
        obs_dtype: dtype of the observations given with ``obs_shape`` ("uint8" for Atari frames).
        gamma: discount factor in [0, 1).
        q_lambda: lambda of the Q(lambda) returns, in [0, 1] (0: one-step targets).
        critic_hidden: hidden widths of the Q-network (after the convolutional encoder for images).
        critic_activation: activation of the hidden layers, one of relu, tanh, sin, elu, mish.
        critic_norm: None, "layer" (LayerNorm, the paper's) or "batch" in the hidden layers.
        critic_norm_layers: indices of the hidden layers that get the norm (None: all).
        orthogonal: orthogonal initialisation with gain sqrt(2) and zero biases (CleanRL's layer_init).
        critic_lr: RAdam learning rate (at the first rollout when annealed).
        anneal_lr: anneal the learning rate linearly to 0 over ``total_env_steps``.
        weight_decay: L2 penalty coefficient, added to the gradient by RAdam (0: none).
        max_grad_norm: clip the gradient's global norm (None: no clipping).
        total_env_steps: environment steps of the run (per rank): the length of the schedules.
        epsilon_start: exploration epsilon at the first environment step.
        epsilon_end: exploration epsilon after the decay.
        exploration_fraction: fraction of ``total_env_steps`` over which epsilon falls.
        eval_every: evaluation cadence in updates (0 disables).
        eval_episodes: episodes per evaluation.
        compile: ``torch.compile`` the Q-network at fit start: True, or a ``torch.compile`` mode
            ("reduce-overhead": CUDA graphs on a GPU).
    """

    #: Minibatches of a rollout carry no importance weights (there is no replay).
    supports_weights = False

    def __init__(
        self,
        obs_shape: Sequence[int] | None = None,
        num_actions: int | None = None,
        obs_dtype: str = "float32",
        gamma: float = 0.99,
        q_lambda: float = 0.65,
        critic_hidden: Sequence[int] = (120, 84),
        critic_activation: str = "relu",
        critic_norm: str | None = "layer",
        critic_norm_layers: Sequence[int] | None = None,
        orthogonal: bool = True,
        critic_lr: float = 2.5e-4,
        anneal_lr: bool = True,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 10.0,
        total_env_steps: int = 500_000,
        epsilon_start: float = 1.0,
        epsilon_end: float = 0.05,
        exploration_fraction: float = 0.5,
        eval_every: int = 0,
        eval_episodes: int = 10,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.gamma = check_gamma("PQN", gamma)
        for name, value, low in (("q_lambda", q_lambda, 0.0), ("exploration_fraction", exploration_fraction, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= 1.0:
                raise ValueError(f"PQN: {name} must be a number in [0, 1], got {value!r}")
        for name, value in (("critic_lr", critic_lr), ("weight_decay", weight_decay)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"PQN: {name} must be a number >= 0, got {value!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"PQN: max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        if isinstance(total_env_steps, bool) or not isinstance(total_env_steps, int) or total_env_steps < 1:
            raise ValueError(f"PQN: total_env_steps must be an integer >= 1, got {total_env_steps!r}")
        self.set_epsilon_schedule(epsilon_start, epsilon_end, max(1, round(exploration_fraction * total_env_steps)))
        self.q_lambda = float(q_lambda)
        self.critic_options = dict(hidden=critic_hidden, activation=critic_activation, norm=critic_norm,
                                   norm_layers=critic_norm_layers)
        self.orthogonal = bool(orthogonal)
        self.critic_lr, self.anneal_lr, self.weight_decay = float(critic_lr), bool(anneal_lr), float(weight_decay)
        self.max_grad_norm, self.total_env_steps = max_grad_norm, total_env_steps
        self.eval_every, self.eval_episodes = int(eval_every), int(eval_episodes)
        self.compile_networks = compile_mode("PQN", compile)
        self.target_update = None  # no target network: the bootstrap is the online network's
        if obs_shape is not None and num_actions is not None:
            self.given_spec = DataSpec(tuple(obs_shape), num_actions=int(num_actions), obs_dtype=obs_dtype)

    # ---------------------------------------------------------------- networks
    def build(self, spec: DataSpec) -> None:
        self.q_net = DiscreteQNetwork(spec.obs_shape, spec.num_actions, **self.critic_options)
        if self.orthogonal:
            orthogonal_init(self.q_net)

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        # foreach: the multi-tensor kernels, the same update as the default's loop over
        # parameters and faster for a network of small tensors (timed by benchmarks/pqn_cartpole.py)
        return {"critic": torch.optim.RAdam(self.q_net.parameters(), lr=self.critic_lr,
                                            weight_decay=self.weight_decay, foreach=True)}

    # ---------------------------------------------------------------- the data
    def learning_rate(self, env_step: int) -> float:
        """The rate of the updates on a rollout that starts after ``env_step`` environment
        steps: ``critic_lr (1 - env_step / total_env_steps)`` with ``anneal_lr`` (CleanRL's
        per-iteration annealing), else ``critic_lr``."""
        if not self.anneal_lr:
            return self.critic_lr
        return self.critic_lr * max(0.0, 1.0 - env_step / self.total_env_steps)

    def next_value(self, batch: Transitions) -> Tensor:
        """``V(s') = max_a Q(s', a)`` of the current network, ``(B,)`` (or ``(T, E)``)."""
        return self.q_net(batch.next_obs.flatten(0, -1 - len(self.spec.obs_shape))).max(dim=1).values.reshape(
            batch.rew.shape)

    @torch.no_grad()
    def rollout_targets(self, rollout: Transitions, truncated: Tensor, env_step: int) -> Tensor:
        """The Q(lambda) returns of a rollout whose fields are ``(T, E, ...)``, ``(T, E)``,
        bootstrapped with :meth:`next_value`; called by the
        :class:`~lit_qlearn.data.OnPolicyDataModule` once per rollout, before its updates,
        which also sets their learning rate (:meth:`learning_rate`)."""
        if self._trainer is not None:  # (a module used outside a Trainer has no optimiser)
            for group in self.optimizer("critic").optimizer.param_groups:
                group["lr"] = self.learning_rate(env_step)
        return lambda_returns(rollout.rew, self.next_value(rollout), rollout.terminated, truncated, self.gamma,
                              self.q_lambda)

    # --------------------------------------------------------------- the update
    def update(self, batch: Transitions) -> None:
        if batch.target is None:
            raise ValueError("PQN: the batch has no target; train PQN on an OnPolicyDataModule, whose batches carry "
                             "the rollout's Q(lambda) returns")
        logging = self.logging_now()
        q = self.q_value(batch.obs, batch.act)
        critic = td_loss(q, batch.target, kind="mse")
        grad_norm = self.step("critic", critic.loss, max_grad_norm=self.max_grad_norm, measure_norm=logging)
        if logging:
            with torch.no_grad():
                self.log_scalars({"train/critic_loss": critic.loss.detach(), "q/data_mean": q.detach().mean(),
                                  "q/target_mean": batch.target.mean(), "train/td_abs_mean": critic.td_abs.mean(),
                                  "train/critic_grad_norm": grad_norm,
                                  "train/lr": self.optimizer("critic").optimizer.param_groups[0]["lr"],
                                  "params/critic_norm": parameter_norm(self.q_net.parameters())})
        return None
