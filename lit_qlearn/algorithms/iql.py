"""IQL (Kostrikov, Nair & Levine 2021): implicit Q-learning by expectile regression."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler

from lit_qlearn.algorithms.actor_critic import ActorCritic
from lit_qlearn.data.types import DataSpec, Transitions
from lit_qlearn.networks import GaussianActor, mlp

__all__ = ["IQL", "CosineToZero", "expectile_loss"]


def expectile_loss(diff: Tensor, expectile: float) -> Tensor:
    """``mean |tau - 1(u < 0)| u^2`` of ``u = diff`` (IQL's Eq. 5, ``u = Q - V``). Its minimiser
    in a constant ``v`` with ``u = x - v`` is the ``tau``-expectile of the sample ``x``:
    the mean at ``tau = 0.5``, approaching the maximum as ``tau -> 1``."""
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return (weight * diff.pow(2)).mean()


class IQL(ActorCritic):
    """Implicit Q-learning: a state-value network ``V_psi`` fitted by expectile regression
    to the data's target Q-values, Q fitted to ``r + gamma V_psi(s')``, and a policy
    extracted by advantage-weighted regression. No action outside the data is ever
    evaluated by the critics.

    Per update, CORL's three steps, each on values computed before any of them (so their
    order is immaterial): the critics minimise the TD loss against
    ``y = r + discount (1 - terminated) V(s')`` (:meth:`next_value`, the one
    :meth:`td_target`); the actor, a :class:`~lit_qlearn.networks.GaussianActor` (CORL's
    default ``GaussianPolicy``: tanh-bounded mean, state-independent std, not squashed),
    maximises ``min(exp(beta A), max_weight) log pi(a_data | s)`` with
    ``A = min_i Q'_i(s, a) - V(s)``, its learning rate on a cosine schedule
    (:class:`CosineToZero`); V minimises :func:`expectile_loss` of ``A`` (twin target
    critics, Polyak-averaged). ``V`` is one :func:`~lit_qlearn.networks.mlp` over the state with
    the critic's options (``critic_hidden``, ``critic_norm``, ...), so ``critic_norm="layer"``
    gives it LayerNorm too, and ``compile=True`` compiles it with the other networks.

    Probe protocol: ``q_value`` / ``q_network`` are the first critic, ``greedy_action``
    is the actor's mean action (also :meth:`act` and, unchanged from the base,
    :meth:`explore`). What SEEM measures here: IQL's bootstrap is ``V_psi(s')``, a
    separate network, not ``Q(s', pi(s'))``, so the probe's bootstrap inputs
    ``(s', greedy_action(s'))`` and the Q-network's kernel ``G(X*, X)`` describe the
    self-excitation Q would have if it bootstrapped from itself at the policy's mean
    action. It approximates IQL's own dynamics to the extent that ``Q(s', mu(s')) ~ V(s')``:
    V is an upper expectile of Q over the data's actions and the advantage-weighted
    policy concentrates on high-advantage data actions; the loop through V (a different
    parameter set) is not in the kernel.

    Defaults are CORL's ``algorithms/offline/iql.py``: expectile 0.7, beta 3.0, weights
    clipped at 100, Adam 3e-4 for Q, V and the actor, the actor's learning rate on a
    cosine schedule over 10^6 updates (CORL's ``max_timesteps``), Polyak 0.005 every
    update, 256x256 networks, gamma 0.99, log-std clamped to [-20, 2]. One difference:
    CORL averages the two critics' MSE, here they are summed (``td_loss``), which Adam's
    scale invariance makes immaterial but for its epsilon; CORL's deterministic-actor
    option (``iql_deterministic``, off by default) is not offered. The other arguments are
    :class:`~lit_qlearn.algorithms.ActorCritic`'s; importance weights (prioritised
    replay) are not supported.

    Args:
        expectile: the expectile tau of V's regression, in (0, 1) (0.5: the mean, i.e. SARSA; -> 1: the max).
        beta: inverse temperature of the advantage weights (0: behaviour cloning).
        max_weight: clip of the advantage weights exp(beta A).
        value_lr: Adam learning rate of V (optimiser ``"value"``).
        actor_lr_cosine_steps: updates over which the actor's learning rate decays to 0 by a cosine (None: constant).
        log_std_min: lower clamp of the actor's log standard deviation.
        log_std_max: upper clamp of the actor's log standard deviation.
    """

    supports_weights = False

    def __init__(self, *args: Any, expectile: float = 0.7, beta: float = 3.0, max_weight: float = 100.0,
                 value_lr: float = 3e-4, actor_lr_cosine_steps: int | None = 1_000_000, log_std_min: float = -20.0,
                 log_std_max: float = 2.0, **kwargs: Any) -> None:
        checks = (("expectile", expectile, 0 < _number(expectile) < 1, "a number in (0, 1)"),
                  ("beta", beta, _number(beta) >= 0, "a number >= 0"),
                  ("max_weight", max_weight, _number(max_weight) > 0, "a number > 0"),
                  ("value_lr", value_lr, _number(value_lr) > 0, "a number > 0"),
                  ("log_std_max", log_std_max, _number(log_std_max) > _number(log_std_min),
                   f"a number > log_std_min = {log_std_min!r}"))
        for name, value, ok, expected in checks:
            if not ok:
                raise ValueError(f"IQL: {name} must be {expected}, got {value!r}")
        steps = actor_lr_cosine_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"IQL: actor_lr_cosine_steps must be None or an integer >= 1, got {steps!r}")
        super().__init__(*args, **kwargs)
        self.expectile, self.beta, self.max_weight = float(expectile), float(beta), float(max_weight)
        self.value_lr, self.actor_lr_cosine_steps = value_lr, steps
        self.actor_options.update(log_std_min=log_std_min, log_std_max=log_std_max)
        self.value: nn.Module | None = None

    # ---------------------------------------------------------------- networks
    def make_actor(self, spec: DataSpec) -> GaussianActor:
        return GaussianActor(spec.obs_dim, spec.action_dim, spec.action_low, spec.action_high, **self.actor_options)

    def build(self, spec: DataSpec) -> None:
        super().build(spec)
        self.value = mlp(spec.obs_dim, 1, **self.critic_options)

    def build_targets(self) -> None:
        """The critics' target copy, the ``Q'`` that V regresses onto (no actor or V target)."""
        self.critic_target = self.add_target(self.critic)

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        optimizers = super().build_optimizers()
        optimizers["value"] = self.adam(self.value.parameters(), lr=self.value_lr)
        return optimizers

    def state_value(self, obs: Tensor) -> Tensor:
        """``V_psi(s)`` ``(N,)``."""
        return self.value(obs).squeeze(-1)

    def build_schedulers(self, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, LRScheduler]:
        """The actor's rate on CORL's cosine (:class:`CosineToZero`), stepped once per actor
        step: ``actor_lr (1 + cos(pi (u - 1) / T)) / 2`` in update ``u``, ``T =
        actor_lr_cosine_steps``, 0 after T updates; none (a constant rate) when T is None."""
        if self.actor_lr_cosine_steps is None:
            return {}
        return {"actor": CosineToZero(optimizers["actor"], T_max=self.actor_lr_cosine_steps)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        steps = self.actor_lr_cosine_steps
        if steps is None or not checkpoint.get("optimizer_states") or checkpoint.get("lr_schedulers"):
            return
        # Written before the schedule was a scheduler: no scheduler state, and the actor's rate
        # set by hand to its last update's. A resumed fit goes on from the update count, as it did.
        done = min(self.updates, steps)  # actor steps taken, one per update
        state = CosineToZero(torch.optim.SGD([torch.zeros(1)], lr=self.actor_lr), T_max=steps).state_dict()
        rate = self.actor_lr * 0.5 * (1.0 + math.cos(math.pi * done / steps))  # the next update's
        state.update(last_epoch=done, **({"_last_lr": [rate]} if "_last_lr" in state else {}))
        checkpoint["lr_schedulers"] = [state]
        group = checkpoint["optimizer_states"][list(self.build_optimizers()).index("actor")]["param_groups"][0]
        group.update(lr=rate, initial_lr=self.actor_lr)

    # --------------------------------------------------------------- the update
    def next_value(self, batch: Transitions) -> Tensor:
        """IQL's bootstrap ``V_psi(s')``, shape ``(B,)``."""
        return self.state_value(batch.next_obs)

    def update(self, batch: Transitions) -> Tensor:
        # targets: y = r + discount (1 - d) V(s') (V before its step, as in CORL) for the critics, and
        # min_i Q'_i(s, a_data) for V; the three steps below each read only what is computed here
        logging = self.logging_now()
        y = self.td_target(batch)
        with torch.no_grad():
            q_target = self.critic_target(batch.obs, batch.act).min(dim=0).values
        advantage = q_target - self.state_value(batch.obs)  # A = min_i Q'_i(s, a) - V(s), with V's gradient
        # critic
        critic = self.critic_loss(batch, y)
        grad_norm = self.step("critic", critic.loss, measure_norm=logging)
        # actor: advantage-weighted regression onto the data's actions, at the schedule's rate
        weights = torch.exp(self.beta * advantage.detach()).clamp(max=self.max_weight)
        actor_loss = -(weights * self.actor.log_prob(batch.obs, batch.act)).mean()
        actor_lr = self.optimizer("actor").param_groups[0]["lr"]
        self.step("actor", actor_loss)
        if self.actor_lr_cosine_steps is not None:
            self.scheduler("actor").step()
        # value: expectile regression of V(s) onto min_i Q'_i(s, a_data)
        value_loss = expectile_loss(advantage, self.expectile)
        self.step("value", value_loss)
        if logging:
            self.log_update(batch, critic.q[0], {**critic.scalars, "train/value_loss": value_loss.detach(),
                                                 "train/actor_loss": actor_loss.detach(),
                                                 "train/advantage_mean": advantage.detach().mean(),
                                                 "train/weight_mean": weights.mean(),
                                                 "v/data_mean": (q_target - advantage.detach()).mean(),
                                                 "train/actor_lr": actor_lr},
                            y=y, critic_grad_norm=grad_norm)
        return critic.td_abs


class CosineToZero(CosineAnnealingLR):
    """CORL's ``CosineAnnealingLR(T_max)`` for runs of any length: the rate falls from its
    initial value to ``eta_min`` by a cosine over ``T_max`` steps, then stays there
    (torch's rises again, a cosine of period ``2 T_max``)."""

    def step(self, epoch: int | None = None) -> None:
        if epoch is not None or self.last_epoch < self.T_max:
            super().step(epoch)


def _number(value: object) -> float:
    """``value`` as a float, NaN (which fails every comparison) unless it is a real number."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
