"""CrossQ (Bhatt, Palenicek et al., ICLR 2024): SAC without target networks, whose critic
normalises with batch renormalisation and sees ``(s, a)`` and ``(s', a')`` in one batch."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lit_qlearn.algorithms.actor_critic import CriticLoss
from lit_qlearn.algorithms.sac import SoftActorCritic
from lit_qlearn.data.types import Transitions
from lit_qlearn.networks import NORMS, BatchRenorm1d, EvalModeQ, training_mode
from lit_qlearn.td import td_loss, td_target

__all__ = ["CrossQ"]


class CrossQ(SoftActorCritic):
    """CrossQ: SAC's actor and temperature (:class:`~lit_qlearn.algorithms.sac.SoftActorCritic`),
    **no target networks**, and a critic with :class:`~lit_qlearn.networks.BatchRenorm1d`
    in front of every Linear layer (``mlp(norm="batchrenorm", norm_position="before_linear")``).

    Each update, with ``a' ~ pi(s')`` drawn from the actor in eval mode (no gradient),
    the critic runs **one** train-mode pass over ``cat[(s, a), (s', a')]``: the batch
    renormalisation's statistics are those of the union of the two distributions (the
    paper's point: normalised apart, ``(s', a')`` would look out of distribution to the
    running statistics). The pass is split; the ``(s', a')`` half, detached, gives
    ``y = r + discount (1 - terminated) (min_i Q_i(s', a') - alpha log pi(a' | s'))``
    (:func:`lit_qlearn.td.td_target`) and the ``(s, a)`` half the TD loss
    (:func:`lit_qlearn.td.td_loss`, summed over the twin critics). Every ``policy_delay``
    updates the actor steps on ``alpha log pi(a|s) - min_i Q_i(s, a)`` with the actor in
    train mode (its own statistics move) and the critic in **eval** mode (running
    statistics, which the actor's step leaves alone), then the temperature steps on
    SAC's loss, as Stable-Baselines3-contrib does (temperature every ``policy_delay``).

    Defaults: the paper's and the authors' code (github.com/adityab/CrossQ, ``-algo
    crossq``): critics 2048x2048 and actor 256x256, ReLU, BatchRenorm in both
    (``bn_mode="brn_actor"``) with momentum 0.01 (their flax 0.99), eps 1e-3, 100k
    warm-up passes of plain BatchNorm, then ``r_max = 3``, ``d_max = 5``; Adam with
    learning rate 1e-3 and ``beta1 = 0.5`` for critic and actor; the actor (and the
    temperature) every 3 critic updates; twin critics; gamma 0.99. The batch (256) and
    ``learning_starts`` (5000 there, 100 in Stable-Baselines3-contrib) are the
    DataModule's. Stable-Baselines3-contrib's ``CrossQ`` differs in its critic width
    (1024x1024 by default), Adam's default betas for the temperature (kept here: its
    ``alpha_lr`` is 1e-3 with betas (0.9, 0.999)) and its actor's log-std (a clamp to
    [-20, 2]; here SAC's tanh-squashed [-5, 2]).

    The probe protocol evaluates the critic and the actor in **eval** mode: ``q_value``,
    ``q_network()`` (an :class:`~lit_qlearn.networks.EvalModeQ`), ``greedy_action``, and
    ``act`` / ``explore`` for the environment, so every sample's value depends on that
    sample alone (the NTK of section 5.2 is then defined) and measuring or acting never
    moves the running statistics. :meth:`next_value` (the base's ``td_target``, which
    callbacks may call) is likewise the eval-mode soft value; the update's own target comes
    from the joint train-mode pass.

    Under DDP the ranks' batches are gathered and every rank runs the update on their
    union, with rank zero's random draws: the batch statistics are the union's, and the
    update (parameters, running statistics) is the one a single device makes on the union
    batch. Each rank computes the whole union batch (no speed-up from more devices).

    Args:
        obs_dim: observation size; None reads it from the DataModule.
        act_dim: action size; None reads it from the DataModule.
        action_low: lower action bound(s), used with ``obs_dim`` / ``act_dim``.
        action_high: upper action bound(s), used with ``obs_dim`` / ``act_dim``.
        gamma: discount factor in [0, 1).
        critic_hidden: hidden widths of each critic.
        critic_activation: critic activation.
        critic_norm: the critic's norm in front of every Linear ("batchrenorm"; None: the ablation without).
        num_q: number of critics; the targets and the actor take their minimum.
        actor_hidden: hidden widths of the actor.
        actor_activation: actor activation.
        actor_norm: the actor's norm in front of every Linear ("batchrenorm"; None: a plain MLP).
        critic_lr: critic Adam learning rate.
        actor_lr: actor Adam learning rate.
        alpha_lr: Adam learning rate of log alpha.
        adam_beta1: Adam's beta1 of the critic and the actor (beta2 0.999).
        policy_delay: critic updates per actor and temperature update.
        init_alpha: initial temperature.
        learn_alpha: learn alpha (False: keep init_alpha fixed).
        target_entropy: entropy target (None: -act_dim).
        log_std_min: lower bound of the actor's log standard deviation.
        log_std_max: upper bound of the actor's log standard deviation.
        renorm_momentum: rate of the BatchRenorm running statistics' moving average.
        renorm_eps: eps added to the BatchRenorm batch variance.
        renorm_warmup_steps: train-mode passes of each BatchRenorm layer as plain BatchNorm.
        renorm_r_max: clip of BatchRenorm's r after warm-up.
        renorm_d_max: clip of BatchRenorm's d after warm-up.
        eval_every: evaluation cadence in updates (0 disables).
        eval_episodes: episodes per evaluation.
        compile: ``torch.compile`` the critic and actor networks at fit start: True, or a
            ``torch.compile`` mode ("reduce-overhead": CUDA graphs on a GPU).
    """

    def __init__(self, obs_dim: int | None = None, act_dim: int | None = None,
                 action_low: float | Sequence[float] = -1.0, action_high: float | Sequence[float] = 1.0,
                 gamma: float = 0.99, critic_hidden: Sequence[int] = (2048, 2048), critic_activation: str = "relu",
                 critic_norm: str | None = "batchrenorm", num_q: int = 2, actor_hidden: Sequence[int] = (256, 256),
                 actor_activation: str = "relu", actor_norm: str | None = "batchrenorm", critic_lr: float = 1e-3,
                 actor_lr: float = 1e-3, alpha_lr: float = 1e-3, adam_beta1: float = 0.5, policy_delay: int = 3,
                 init_alpha: float = 1.0, learn_alpha: bool = True, target_entropy: float | None = None,
                 log_std_min: float = -5.0, log_std_max: float = 2.0, renorm_momentum: float = 0.01,
                 renorm_eps: float = 1e-3, renorm_warmup_steps: int = 100_000, renorm_r_max: float = 3.0,
                 renorm_d_max: float = 5.0, eval_every: int = 5000, eval_episodes: int = 10,
                 compile: bool | str = False) -> None:
        if isinstance(policy_delay, bool) or not isinstance(policy_delay, int) or policy_delay < 1:
            raise ValueError(f"CrossQ: policy_delay must be an integer >= 1, got {policy_delay!r}")
        if isinstance(adam_beta1, bool) or not isinstance(adam_beta1, (int, float)) or not 0 <= adam_beta1 < 1:
            raise ValueError(f"CrossQ: adam_beta1 must be a number in [0, 1), got {adam_beta1!r}")
        for name, norm in (("critic_norm", critic_norm), ("actor_norm", actor_norm)):
            if norm not in NORMS:
                raise ValueError(f"CrossQ: {name} must be one of {NORMS}, got {norm!r}")
        super().__init__(obs_dim, act_dim, action_low, action_high, gamma=gamma, critic_hidden=critic_hidden,
                         critic_activation=critic_activation, critic_norm=critic_norm, num_q=num_q,
                         actor_hidden=actor_hidden, actor_activation=actor_activation, actor_lr=actor_lr,
                         critic_lr=critic_lr, alpha_lr=alpha_lr, init_alpha=init_alpha, learn_alpha=learn_alpha,
                         target_entropy=target_entropy, log_std_min=log_std_min, log_std_max=log_std_max,
                         eval_every=eval_every, eval_episodes=eval_episodes, compile=compile)
        renorm = dict(momentum=renorm_momentum, eps=renorm_eps, warmup_steps=renorm_warmup_steps,
                      r_max=renorm_r_max, d_max=renorm_d_max)
        try:  # checked now, by the layer's own checks, rather than when the networks are built
            BatchRenorm1d(1, **renorm)
        except ValueError as error:
            raise ValueError(str(error).replace("BatchRenorm1d: ", "CrossQ: renorm_", 1)) from None
        self.critic_options.update(norm_position="before_linear",
                                   norm_options=renorm if critic_norm == "batchrenorm" else None)
        self.actor_options.update(norm=actor_norm, norm_position="before_linear",
                                  norm_options=renorm if actor_norm == "batchrenorm" else None)
        self.adam_betas = (float(adam_beta1), 0.999)
        self.policy_delay = policy_delay

    def default_target_update(self) -> None:
        """No target rule: CrossQ has no target networks."""
        return None

    # ------------------------------------------------------------ probe protocol
    def q_value(self, obs: Tensor, act: Tensor) -> Tensor:
        """First critic's ``Q(s, a)`` ``(N,)`` in eval mode (running statistics)."""
        with training_mode(self.critic, False):
            return super().q_value(obs, act)

    def greedy_action(self, obs: Tensor) -> Tensor:
        """The actor's deterministic action ``tanh(mean)`` (scaled), in eval mode."""
        with training_mode(self.actor, False):
            return super().greedy_action(obs)

    def q_network(self) -> nn.Module:
        return EvalModeQ(self.critic.members[0])

    def q_networks(self) -> list[nn.Module]:
        """Every critic member as ``(obs, act) -> (N,)`` in eval mode."""
        return [EvalModeQ(member) for member in self.critic.members]

    # ---------------------------------------------------------------- policies
    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        with training_mode(self.actor, False):
            return super().act(obs)

    @torch.no_grad()
    def explore(self, obs: np.ndarray, env_step: int) -> np.ndarray:
        """An action sampled from the policy, the actor in eval mode."""
        with training_mode(self.actor, False):
            return super().explore(obs, env_step)

    # --------------------------------------------------------------- the update
    def next_value(self, batch: Transitions) -> Tensor:
        """The soft ``V(s') = min_i Q_i(s', a') - alpha log pi(a' | s')``, ``a' ~ pi(s')``,
        ``(B,)``, with the current critic and actor in eval mode (what callbacks get from
        ``td_target``; the update's own target comes from :meth:`joint_q`)."""
        with training_mode(self.actor, False), training_mode(self.critic, False):
            next_act, next_logp = self.actor.sample(batch.next_obs)
            return self.soft_value(self.critic(batch.next_obs, next_act), next_logp)

    def joint_q(self, obs: Tensor, act: Tensor, next_obs: Tensor, next_act: Tensor) -> tuple[Tensor, Tensor]:
        """``Q(s, a)`` and ``Q(s', a')``, each ``(num_q, B)``, from one train-mode pass of the
        critic over ``cat[(s, a), (s', a')]`` (``2B`` rows: the norms' batch statistics are
        the union's, and their running statistics move once)."""
        b = obs.shape[0]
        with training_mode(self.critic, True):
            q = self.critic(torch.cat([obs, next_obs]), torch.cat([act, next_act]))
        return q[:, :b], q[:, b:]

    def union_batch(self, batch: Transitions) -> tuple[Transitions, Tensor]:
        """The batch the update runs on and its standard normal draws ``(2, N, da)`` (for
        ``a' ~ pi(s')`` and for the actor's ``a ~ pi(s)``): this rank's batch and fresh draws
        on one device; under DDP every rank's batch, concatenated in rank order, and rank
        zero's draws, so every rank runs the identical update on the union batch."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            strategy = self.trainer.strategy
            batch = batch.map(lambda t: strategy.all_gather(t).flatten(0, 1))
        noise = torch.randn(2, *batch.act.shape, device=batch.act.device)
        if world > 1:
            dist.broadcast(noise, src=0)
        return batch, noise

    def update(self, batch: Transitions) -> Tensor:
        logging = self.logging_now()
        local = batch.act.shape[0]
        batch, noise = self.union_batch(batch)
        # a' ~ pi(s') from the actor in eval mode (its statistics stay), without gradient
        with torch.no_grad(), training_mode(self.actor, False):
            next_act, next_logp = self.actor.sample(batch.next_obs, noise[0])
        # critic: one train-mode pass over [(s, a); (s', a')], split; the (s', a') half, detached, is
        # the soft bootstrap of y = r + discount (1 - d) (min_i Q_i(s', a') - alpha log pi(a'|s'))
        q, next_q = self.joint_q(batch.obs, batch.act, batch.next_obs, next_act)
        y = td_target(batch, self.soft_value(next_q.detach(), next_logp), self.gamma)
        td = td_loss(q, y, batch.weight)
        grad_norm = self.step("critic", td.loss, measure_norm=logging)
        critic = CriticLoss(td.loss, q.detach(), td.td_abs, {"train/critic_loss": td.loss.detach()})
        # actor (train mode) against the critic in eval mode, then the temperature, every policy_delay updates
        actor: dict[str, Tensor] = {}
        if self.updates % self.policy_delay == 0:
            with training_mode(self.actor, True), training_mode(self.critic, False):
                logp, actor = self.actor_step(batch.obs, noise[1])
            for name, loss in self.extra_losses(critic, logp).items():
                self.step(name, loss)
        if logging:
            self.log_update(batch, critic.q[0], {**critic.scalars, **actor, "train/alpha": self.alpha},
                            y=y, critic_grad_norm=grad_norm)
        # this rank's rows, for its prioritised buffer
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return critic.td_abs[rank * local:(rank + 1) * local]
