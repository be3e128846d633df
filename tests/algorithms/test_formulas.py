"""Every update formula of the continuous actor-critics, pinned against hand computations.

The fixture is a tiny batch in which every term of every formula matters: twin critics
that disagree (min, max and mean differ, and the minimising member changes from row to
row), target networks that differ from the online ones, an action box that is not
[-1, 1] (mid and half-range differ per dimension, so ``action_scale`` matters),
target-policy smoothing noise that is clipped in some entries and not in others, a
temperature far from 0, terminal rows and rows that bootstrap, an n-step ``discount``
different from ``gamma`` in some rows, and importance weights far from 1.

The hand computations never call the method under test: networks are evaluated layer by
layer with raw tensor ops (:func:`forward`) on deep copies of the module's networks, the
squashed-Gaussian log-density is written from its change-of-variables formula, the TD
target and losses are spelled out, and each whole update is replayed with
``torch.autograd.grad`` and a plain SGD step (the module's Adam swapped for SGD, so every
gradient entry shows, where Adam's first step keeps only its sign), then once more with
the module's real Adam against ``torch.optim.Adam``. Randomness (smoothing noise, policy
samples, CQL's proposals) is reproduced by re-seeding the torch generator before each
update and drawing the same tensors in the same order.

A second, independent reference: Stable-Baselines3's SAC and TD3 critic targets on
identical weights and batch.

The batch is already in normalised-state space (the DataModules normalise it), so state
normalisation does not enter these formulas; tests/algorithms/test_policies.py pins it
where it applies, in ``act`` / ``explore`` / ``evaluate``. A truncated transition is
stored with ``terminated = 0`` (the DataModules keep truncation apart from termination),
so the truncated rows below bootstrap and the terminated rows do not.
"""
from __future__ import annotations

import copy
import math
import types

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lit_qlearn.algorithms import CQL, DDPG, IQL, SAC, TD3, TD3BC, PreQN
from lit_qlearn.algorithms.base import QLearningModule
from lit_qlearn.data.types import Transitions
from lit_qlearn.networks import Sin

B, OBS_DIM, ACT_DIM = 6, 3, 2
LOW, HIGH = torch.tensor([-2.0, 0.0]), torch.tensor([1.0, 1.0])
MID, SCALE = (HIGH + LOW) / 2, (HIGH - LOW) / 2  # (-0.5, 0.5) and (1.5, 0.5)
GAMMA = 0.9
TERMINATED = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 0.0])  # rows 1 and 4 end the episode
TRUNCATED = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 1.0])  # rows 2 and 5 hit a time limit: they bootstrap
DISCOUNT = torch.tensor([0.9, 0.9, 0.81, 0.729, 0.9, 0.81])  # gamma^k of n-step returns, != gamma in rows 2, 3, 5
WEIGHT = torch.tensor([0.5, 1.5, 1.0, 2.0, 0.25, 3.0])
LR = 0.1  # every learning rate of the whole-update tests: SGD moves parameters by ~0.01-0.1
TAU = 0.4
SEED = 1234
SMALL = dict(obs_dim=OBS_DIM, act_dim=ACT_DIM, action_low=LOW.tolist(), action_high=HIGH.tolist(), gamma=GAMMA,
             critic_hidden=(8,), actor_hidden=(8,), eval_every=0)


# ----------------------------------------------------------------- hand computations
def forward(net: nn.Sequential, x: Tensor) -> Tensor:
    """``net(x)`` layer by layer with raw tensor ops (not nn.Module calls, not the critic's batched pass)."""
    for layer in net:
        if isinstance(layer, nn.Linear):
            x = x @ layer.weight.T + layer.bias
        elif isinstance(layer, nn.ReLU):
            x = x.clamp(min=0.0)
        elif isinstance(layer, nn.Tanh):
            x = torch.tanh(x)
        elif isinstance(layer, Sin):
            x = torch.sin(x)
        else:
            raise TypeError(f"forward: no hand version of {layer!r}")
    return x


def q_all(members: list[nn.Sequential], obs: Tensor, act: Tensor) -> Tensor:
    """Every critic member's ``Q(s, a)``, ``(E, N)``."""
    return torch.stack([forward(m, torch.cat([obs, act], dim=-1)).squeeze(-1) for m in members])


def mu(net: nn.Sequential, obs: Tensor) -> Tensor:
    """The deterministic actor ``mid + half_range * tanh(mlp(s))`` in the test's own box."""
    assert isinstance(net[-1], nn.Tanh)
    return MID + SCALE * torch.tanh(forward(net[:-1], obs))


def squashed_sample(net: nn.Sequential, obs: Tensor, eps: Tensor, log_std_min: float = -5.0,
                    log_std_max: float = 2.0) -> tuple[Tensor, Tensor]:
    """SAC's ``a = mid + scale tanh(u)``, ``u = mean + std eps``, and ``log pi(a|s)`` by the change of
    variables: ``log N(u; mean, std) - sum log(scale (1 - tanh(u)^2))``."""
    out = forward(net, obs)
    mean, raw = out[:, :ACT_DIM], out[:, ACT_DIM:]
    log_std = log_std_min + 0.5 * (log_std_max - log_std_min) * (torch.tanh(raw) + 1.0)
    std = torch.exp(log_std)
    u = mean + std * eps
    gauss = -0.5 * ((u - mean) / std) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    # in float64: in float32, 1 - tanh(u)^2 has no significant digits left once |u| > ~4
    log_det = torch.log(SCALE.double() * (1.0 - torch.tanh(u.double()) ** 2)).float()
    return MID + SCALE * torch.tanh(u), (gauss - log_det).sum(-1)


def smoothed_target_action(actor_net: nn.Sequential, next_obs: Tensor, policy_noise: float,
                           noise_clip: float = 0.3) -> Tensor:
    """TD3's ``clip(mu'(s') + clip(N(0, sigma^2), -c, c) * half_range, low, high)``; one draw of the
    torch generator, ``randn (B, da)``, when ``policy_noise > 0``."""
    next_act = mu(actor_net, next_obs)
    if policy_noise == 0:
        return next_act
    noise = (torch.randn(B, ACT_DIM) * policy_noise).clamp(-noise_clip, noise_clip)  # in half-ranges
    return torch.max(torch.min(next_act + noise * SCALE, HIGH), LOW)


def target(rew: Tensor, discount: Tensor, terminated: Tensor, next_v: Tensor) -> Tensor:
    return rew + discount * (1.0 - terminated) * next_v


def weighted_td(q: Tensor, y: Tensor, weight: Tensor | None) -> Tensor:
    """Sum over members of the batch mean of ``w (Q_i - y)^2``."""
    w = torch.ones_like(y) if weight is None else weight
    return sum((w * (q[i] - y) ** 2).mean() for i in range(q.shape[0]))


def make_batch(weight: bool = True, discount: bool = True, seed: int = 0) -> Transitions:
    g = torch.Generator().manual_seed(seed)
    act = LOW + (HIGH - LOW) * (0.05 + 0.9 * torch.rand(B, ACT_DIM, generator=g))
    return Transitions(torch.randn(B, OBS_DIM, generator=g), act, 1.0 + torch.randn(B, generator=g),
                       torch.randn(B, OBS_DIM, generator=g), TERMINATED.clone(),
                       DISCOUNT.clone() if discount else None, WEIGHT.clone() if weight else None)


def spread(module: nn.Module, seed: int = 0) -> nn.Module:
    """Make the tiny networks' numbers matter: critic outputs of a few units, and target
    networks that differ from the online ones (so using the wrong one shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("critic", "critic_target"):
            critic = getattr(module, name, None)
            if critic is None:
                continue
            for member in critic.members:
                member[-1].weight.mul_(4.0)
                if name == "critic_target":
                    for p in member.parameters():
                        p.add_(0.3 * torch.randn(p.shape, generator=g))
        if getattr(module, "actor_target", None) is not None:
            for p in module.actor_target.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            module.actor_target.net[-2].weight.mul_(3.0)  # near the bounds: the box clamp binds on some entries
    return module


def disagree(q: Tensor) -> None:
    """The twin critics ``(2, N)`` disagree both ways, so min, max, mean and member 0 all differ."""
    assert (q[0] < q[1] - 0.05).any() and (q[0] > q[1] + 0.05).any(), q


def balance(critic: nn.Module, obs: Tensor, act: Tensor) -> None:
    """Shift member 1's output so that it lies above member 0 on half of the rows ``(obs, act)``
    and below on the other half: twins that disagree both ways, by construction."""
    with torch.no_grad():
        diff = (q_all(list(critic.members), obs, act)[1] - q_all(list(critic.members), obs, act)[0]).sort().values
        critic.members[1][-1].bias.sub_((diff[B // 2 - 1] + diff[B // 2]) / 2)


def center(critic: nn.Module, obs: Tensor, act: Tensor) -> None:
    """Shift member 0's output to median zero on ``(obs, act)``: Q of both signs, so mean |Q| is not |mean Q|."""
    with torch.no_grad():
        critic.members[0][-1].bias.sub_(q_all(list(critic.members[:1]), obs, act)[0].median())


def members(critic: nn.Module) -> list[nn.Sequential]:
    return [copy.deepcopy(m) for m in critic.members]


# --------------------------------------------------------------------- V(s') by hand
def test_td3_next_value_is_the_min_of_target_critics_at_the_clipped_smoothed_target_action():
    torch.manual_seed(0)
    module = spread(TD3(**SMALL, policy_noise=0.4, noise_clip=0.3))
    batch = make_batch()
    torch.manual_seed(SEED)
    eps = torch.randn(B, ACT_DIM)
    with torch.no_grad():
        noise = (eps * 0.4).clamp(-0.3, 0.3)
        clipped = (eps * 0.4).abs() > 0.3
        assert clipped.any() and (~clipped).any()  # the noise clip binds on some entries only
        raw = mu(module.actor_target.net, batch.next_obs) + noise * SCALE  # noise in half-ranges
        assert ((raw < LOW) | (raw > HIGH)).any()  # the box clamp binds too
        next_act = torch.max(torch.min(raw, HIGH), LOW)
        balance(module.critic_target, batch.next_obs, next_act)
        q = q_all(members(module.critic_target), batch.next_obs, next_act)
    disagree(q)
    torch.manual_seed(SEED)
    torch.testing.assert_close(module.next_value(batch), q.min(dim=0).values)


def test_td_target_uses_the_batch_discount_else_gamma_and_cuts_only_terminated_rows():
    torch.manual_seed(0)
    module = spread(DDPG(**SMALL))  # deterministic V(s') (no smoothing noise)
    batch = make_batch()
    with torch.no_grad():
        v = q_all(members(module.critic_target), batch.next_obs, mu(module.actor_target.net, batch.next_obs))[0]
    assert v.abs().min() > 0.1
    torch.testing.assert_close(module.next_value(batch), v)
    torch.testing.assert_close(module.td_target(batch), target(batch.rew, DISCOUNT, TERMINATED, v))
    no_discount = batch._replace(discount=None)
    torch.testing.assert_close(module.td_target(no_discount), target(batch.rew, torch.full((B,), GAMMA), TERMINATED, v))
    # terminated rows are the reward alone; truncated rows bootstrap like any other
    y = module.td_target(batch)
    torch.testing.assert_close(y[TERMINATED == 1], batch.rew[TERMINATED == 1])
    rows = TRUNCATED == 1
    torch.testing.assert_close(y[rows], batch.rew[rows] + DISCOUNT[rows] * v[rows])


def test_ddpg_next_value_has_no_noise_and_one_critic():
    torch.manual_seed(0)
    module = spread(DDPG(**SMALL))
    batch = make_batch()
    assert module.critic.num_q == 1
    with torch.no_grad():
        expected = q_all(members(module.critic_target), batch.next_obs, mu(module.actor_target.net, batch.next_obs))
    torch.testing.assert_close(module.next_value(batch), expected[0])


@pytest.mark.parametrize("cls", [SAC, CQL])
def test_sac_next_value_is_the_soft_min_of_target_critics(cls):
    torch.manual_seed(0)
    extra = dict(backup_entropy=True) if cls is CQL else {}
    module = spread(cls(**SMALL, init_alpha=2.0, **extra))
    batch = make_batch()
    torch.manual_seed(SEED)
    eps = torch.randn(B, ACT_DIM)
    with torch.no_grad():
        next_act, next_logp = squashed_sample(module.actor.net, batch.next_obs, eps)
        balance(module.critic_target, batch.next_obs, next_act)
        q = q_all(members(module.critic_target), batch.next_obs, next_act)
    torch.manual_seed(SEED)
    v = module.next_value(batch)
    disagree(q)
    assert (2.0 * next_logp).abs().min() > 0.1  # the entropy term is not negligible
    torch.testing.assert_close(v, q.min(dim=0).values - 2.0 * next_logp, rtol=1e-5, atol=1e-5)


def test_cql_next_value_without_entropy_backup():
    torch.manual_seed(0)
    module = spread(CQL(**SMALL, init_alpha=2.0))
    batch = make_batch()
    torch.manual_seed(SEED)
    v = module.next_value(batch)
    torch.manual_seed(SEED)
    q, _ = soft_next_q(module.actor.net, members(module.critic_target), batch.next_obs, check=False)
    torch.testing.assert_close(v, q.min(dim=0).values, rtol=1e-5, atol=1e-5)


def test_iql_next_value_is_the_state_value_network():
    torch.manual_seed(0)
    module = spread(IQL(**SMALL))
    batch = make_batch(weight=False)
    with torch.no_grad():
        v = forward(module.value, batch.next_obs).squeeze(-1)
        q = q_all(members(module.critic_target), batch.next_obs, mu(module.actor.net, batch.next_obs))
    assert (v - q.min(dim=0).values).abs().min() > 0.1  # not a Q of s'
    torch.testing.assert_close(module.next_value(batch), v)
    torch.testing.assert_close(module.td_target(batch), target(batch.rew, DISCOUNT, TERMINATED, v))


def test_preqn_next_value_is_the_current_critic_at_the_current_actor():
    torch.manual_seed(0)
    module = spread(PreQN(**SMALL))
    batch = make_batch(weight=False)
    assert not module.target_pairs()
    with torch.no_grad():
        v = q_all(members(module.critic), batch.next_obs, mu(module.actor.net, batch.next_obs))[0]
    assert v.abs().min() > 0.05
    torch.testing.assert_close(module.next_value(batch), v)
    torch.testing.assert_close(module.td_target(batch), target(batch.rew, DISCOUNT, TERMINATED, v))


# ---------------------------------------------------------------------- losses by hand
def test_td3bc_actor_loss_normalises_q_by_its_detached_mean_absolute_value():
    torch.manual_seed(0)
    module = spread(TD3BC(**SMALL, bc_alpha=2.5))
    batch = make_batch()
    center(module.critic, batch.obs, mu(module.actor.net, batch.obs))
    pi = module.actor(batch.obs)
    q_pi = module.q_value(batch.obs, pi)
    assert (q_pi > 0.1).any() and (q_pi < -0.1).any()  # mean |Q| differs from |mean Q|
    loss = module.actor_loss(batch, pi, q_pi)
    (grad,) = torch.autograd.grad(loss, pi)
    # by hand on leaf copies: lambda = alpha / mean|Q| is a constant of the step
    pi_ = pi.detach().clone().requires_grad_(True)
    q_ = q_all(members(module.critic)[:1], batch.obs, pi_)[0]
    lam = 2.5 / q_.detach().abs().mean()
    expected = -lam * q_.mean() + ((pi_ - batch.act) ** 2).mean()
    (expected_grad,) = torch.autograd.grad(expected, pi_)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    td3 = TD3(**SMALL)
    torch.testing.assert_close(td3.actor_loss(batch, pi, q_pi), -q_pi.mean())


def test_sac_temperature_loss_by_hand():
    module = SAC(**SMALL, init_alpha=2.0)
    logp = torch.tensor([1.5, -3.0, 0.2, -0.7, 2.5, -1.0])
    loss = module.temperature_loss(logp)
    (grad,) = torch.autograd.grad(loss, module.log_alpha)
    log_alpha = math.log(2.0)
    assert module.target_entropy == -2.0
    assert loss.item() == pytest.approx(-log_alpha * (logp.mean().item() - 2.0), rel=1e-6)
    assert grad.item() == pytest.approx(-(logp.mean().item() - 2.0), rel=1e-6)


def test_cql_penalty_and_lagrange_loss_by_hand():
    torch.manual_seed(0)
    n, temp = 3, 2.0
    module = spread(CQL(**SMALL, num_samples=n, cql_temp=temp, lagrange=True, cql_alpha=0.5, target_action_gap=0.3))
    batch = make_batch()
    torch.manual_seed(SEED)
    gap = module.cql_penalty(batch)
    torch.manual_seed(SEED)
    with torch.no_grad():
        proposals, log_mu = cql_proposals(module.actor.net, batch, n)
        expected = cql_gap(members(module.critic), batch, proposals, log_mu, temp)
    torch.testing.assert_close(gap, expected, rtol=1e-5, atol=1e-5)
    # the terms matter: the densities are not 1, T is not 1, the weights are not 1
    assert log_mu[:, :n].abs().min() > 1.0 and log_mu[:, n:].abs().mean() > 1.0
    # Lagrange: -alpha' c (mean gap - target), alpha' = exp(log alpha') = e at the start
    loss = module.lagrange_loss(gap)
    (grad,) = torch.autograd.grad(loss, module.log_cql_alpha)
    value = -math.e * 0.5 * (expected.mean().item() - 0.3)
    assert loss.item() == pytest.approx(value, rel=1e-5) and grad.item() == pytest.approx(value, rel=1e-5)
    assert module.cql_weight.item() == pytest.approx(0.5 * math.e)


def cql_proposals(actor_net: nn.Sequential, batch: Transitions, n: int) -> tuple[Tensor, Tensor]:
    """CQL's 3n actions per state (uniform in the box, pi(.|s), pi(.|s')) and their log-densities,
    drawn from the torch generator in the library's order: ``rand (B, n, da)``, then one
    ``randn`` for the 2Bn policy samples (rows: every s repeated n times, then every s')."""
    uniform = LOW + (HIGH - LOW) * torch.rand(B, n, ACT_DIM)
    log_uniform = torch.full((B, n), -math.log(float((HIGH - LOW).prod())))
    states = torch.cat([batch.obs, batch.next_obs]).repeat_interleave(n, dim=0)
    acts, logp = squashed_sample(actor_net, states, torch.randn(2 * B * n, ACT_DIM))
    acts, logp = acts.view(2, B, n, ACT_DIM), logp.view(2, B, n)
    return torch.cat([uniform, acts[0], acts[1]], 1), torch.cat([log_uniform, logp[0], logp[1]], 1)


def cql_gap(critic: list[nn.Sequential], batch: Transitions, proposals: Tensor, log_mu: Tensor,
            temp: float) -> Tensor:
    """Per member: mean_b w_b [T log sum_j exp((Q(s_b, a_bj) - log mu_bj) / T) - Q(s_b, a_b)], ``(E,)``."""
    m = proposals.shape[1]
    q = q_all(critic, batch.obs.repeat_interleave(m, 0), proposals.reshape(-1, ACT_DIM)).view(len(critic), B, m)
    soft_max = temp * torch.log(torch.exp((q - log_mu) / temp).sum(-1))
    gap = soft_max - q_all(critic, batch.obs, batch.act)
    return (gap * (1.0 if batch.weight is None else batch.weight)).mean(-1)


# ------------------------------------------------------------ whole updates by hand
def use_sgd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every optimiser the modules build becomes SGD at the same learning rate: its step is
    ``-lr * grad``, so every entry of every gradient shows in the parameters."""
    def sgd(params, lr, weight_decay=0.0, eps=1e-8, betas=(0.9, 0.999)):
        return torch.optim.SGD(list(params), lr=lr, weight_decay=weight_decay)
    monkeypatch.setattr(QLearningModule, "adam", staticmethod(sgd))


class Reference:
    """Copies of a module's networks and the optimiser steps of the hand-written update."""

    def __init__(self, optimizer: str) -> None:
        self.optimizer = optimizer
        self._opts: dict[str, torch.optim.Optimizer] = {}

    def step(self, name: str, params: list[Tensor], loss: Tensor, lr: float) -> None:
        if name not in self._opts:
            self._opts[name] = (torch.optim.SGD(params, lr=lr) if self.optimizer == "sgd"
                                else torch.optim.Adam(params, lr=lr, foreach=False))
        opt = self._opts[name]
        for group in opt.param_groups:
            group["lr"] = lr
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()


def polyak(target: list[nn.Module] | nn.Module, online: list[nn.Module] | nn.Module, tau: float) -> None:
    target = target if isinstance(target, list) else [target]
    online = online if isinstance(online, list) else [online]
    with torch.no_grad():
        for t, o in zip(target, online):
            for pt, po in zip(t.parameters(), o.parameters()):
                pt.copy_((1 - tau) * pt + tau * po)


def params(*nets: nn.Module | list[nn.Module]) -> list[Tensor]:
    out = []
    for net in nets:
        for m in (net if isinstance(net, list) else [net]):
            out.extend(m.parameters())
    return out


def run_updates(module: QLearningModule, batch: Transitions, n: int) -> list[dict[str, Tensor]]:
    """``n`` updates of ``module`` on ``batch`` through a real Trainer; the torch generator is
    seeded with ``SEED + i`` before update ``i``; returns the state after each update."""
    states = []

    class Hook(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            torch.manual_seed(SEED + batch_idx)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    trainer = L.Trainer(max_steps=n, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=[Hook()])
    trainer.fit(module, train_dataloaders=DataLoader([batch] * n, batch_size=None))
    assert module.updates == n == len(states)
    return states


def assert_state(update: int, state: dict[str, Tensor], initial: dict[str, Tensor],
                 nets: dict[str, nn.Module | Tensor], changed: set[str] = frozenset()) -> None:
    """Every entry of ``state`` equals the reference ``nets`` (prefix -> module or tensor), every
    other entry its initial value; the prefixes in ``changed`` must have moved from it."""
    expected = dict(initial)
    for prefix, net in nets.items():
        if isinstance(net, Tensor):
            assert prefix in expected
            expected[prefix] = net.detach()
            continue
        for key, value in net.state_dict().items():
            assert f"{prefix}.{key}" in expected, f"{prefix}.{key}"
            expected[f"{prefix}.{key}"] = value
    assert expected.keys() == state.keys()
    wrong = [f"{key}: max |diff| {(state[key].float() - expected[key].float()).abs().max():.3g}" for key in state
             if not torch.allclose(state[key].float(), expected[key].float(), rtol=1e-4, atol=2e-5)]
    assert not wrong, f"after update {update}, differ from the hand-written update: " + "; ".join(wrong)
    for key in state:
        if any(key == p or key.startswith(p + ".") for p in changed) and state[key].is_floating_point():
            if key.endswith(("action_low", "action_high", "action_mid", "action_scale")):
                continue
            assert not torch.allclose(state[key], initial[key], atol=1e-4), f"{key} did not move"


def critic_nets(q: list[nn.Module], qt: list[nn.Module]) -> dict[str, nn.Module]:
    """The reference copies of the critic members and target members, under their state_dict prefixes."""
    return {**{f"critic.members.{i}": m for i, m in enumerate(q)},
            **{f"critic_target.members.{i}": m for i, m in enumerate(qt)}}


def soft_copies(module: QLearningModule, *scalars: str) -> tuple[dict[str, Tensor], list[nn.Sequential],
                                                                  list[nn.Sequential], nn.Sequential, list[Tensor]]:
    """Before the updates of a SAC-style module: its state, copies of its critics, target critics
    and actor network, and its log-scalars named in ``scalars`` as leaves the reference will step."""
    initial = {k: v.detach().clone() for k, v in module.state_dict().items()}
    q, qt, pi = members(module.critic), members(module.critic_target), copy.deepcopy(module.actor.net)
    return initial, q, qt, pi, [getattr(module, name).detach().clone().requires_grad_(True) for name in scalars]


def soft_next_q(pi: nn.Sequential, qt: list[nn.Sequential], next_obs: Tensor, check: bool) -> tuple[Tensor, Tensor]:
    """Draw a' ~ pi(s') (one ``randn(B, ACT_DIM)``); returns the target critics' Q(s', a') ``(num_q, B)``
    and log pi(a'|s') ``(B,)``, without gradient. ``check``: the members must disagree there."""
    with torch.no_grad():
        next_act, next_logp = squashed_sample(pi, next_obs, torch.randn(B, ACT_DIM))
        next_q = q_all(qt, next_obs, next_act)
    if check:
        disagree(next_q)
    return next_q, next_logp


def soft_actor_and_alpha_steps(ref: Reference, q: list[nn.Sequential], pi: nn.Sequential, log_alpha: Tensor,
                               obs: Tensor, check: bool) -> None:
    """Draw a ~ pi(s) (one ``randn(B, ACT_DIM)``); step the actor on mean(alpha log pi - min_i Q_i(s, a)) against
    the just-updated critics, then log alpha on -mean(log alpha (log pi + target entropy)), target entropy
    -ACT_DIM = -2. ``check``: the critics disagree at a (so the min is not member 0)."""
    alpha = log_alpha.detach().exp()
    act_pi, logp = squashed_sample(pi, obs, torch.randn(B, ACT_DIM))
    q_pi = q_all(q, obs, act_pi)
    if check:
        disagree(q_pi.detach())
    ref.step("actor", params(pi), (alpha * logp - q_pi.min(dim=0).values).mean(), LR)
    ref.step("alpha", [log_alpha], -(log_alpha * (logp.detach() - 2.0)).mean(), LR)


@pytest.fixture(params=["sgd", "adam"])
def optimizer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A whole-update test runs with SGD (every optimiser the modules build swapped for it, see
    :func:`use_sgd`), then with the modules' real Adam; the value names the reference's optimiser."""
    if request.param == "sgd":
        use_sgd(monkeypatch)
    return request.param


@pytest.mark.parametrize("cls", [TD3, DDPG, TD3BC])
def test_td3_family_updates_equal_a_hand_written_update(optimizer, cls):
    torch.manual_seed(0)
    critic_lr = LR / 10 if cls is TD3BC else LR  # TD3BC: a slower critic, so the centred Q keeps both signs
    options = dict(critic_lr=critic_lr, actor_lr=LR, target_tau=TAU)
    if cls is DDPG:  # DDPG's defaults: one critic, no smoothing, actor and targets every update
        noise, freq, num_q = 0.0, 1, 1
    else:
        noise, freq, num_q = 0.4, 2, 2
        options.update(policy_noise=noise, noise_clip=0.3, policy_freq=freq)
    module = spread(cls(**SMALL, **options))
    assert module.critic.num_q == num_q
    batch = make_batch()
    torch.manual_seed(SEED)
    with torch.no_grad():
        first_next_act = smoothed_target_action(module.actor_target.net, batch.next_obs, noise)
    if num_q == 2:
        balance(module.critic_target, batch.next_obs, first_next_act)
    if cls is TD3BC:
        center(module.critic, batch.obs, mu(module.actor.net, batch.obs))
    initial = {k: v.detach().clone() for k, v in module.state_dict().items()}
    q, qt = members(module.critic), members(module.critic_target)
    pi, pit = copy.deepcopy(module.actor.net), copy.deepcopy(module.actor_target.net)
    states = run_updates(module, batch, 3)

    ref = Reference(optimizer)
    s, a, s2 = batch.obs, batch.act, batch.next_obs
    for k in range(1, 4):
        torch.manual_seed(SEED + k - 1)
        with torch.no_grad():
            next_q = q_all(qt, s2, smoothed_target_action(pit, s2, noise))
            if k == 1 and num_q == 2:
                disagree(next_q)
            y = target(batch.rew, DISCOUNT, TERMINATED, next_q.min(dim=0).values)
        ref.step("critic", params(q), weighted_td(q_all(q, s, a), y, WEIGHT), critic_lr)
        actor_moves = k % freq == 0
        if actor_moves:  # the delayed actor, then the targets (TD3 moves them with the actor)
            pi_s = mu(pi, s)
            q_pi = q_all([q[0]], s, pi_s)[0]
            if cls is TD3BC:
                assert (q_pi > 0.05).any() and (q_pi < -0.05).any()  # mean |Q| is not |mean Q|
                actor_loss = -2.5 / q_pi.detach().abs().mean() * q_pi.mean() + ((pi_s - a) ** 2).mean()
            else:
                actor_loss = -q_pi.mean()
            ref.step("actor", params(pi), actor_loss, LR)
            polyak(qt, q, TAU)
            polyak(pit, pi, TAU)
        nets = {**critic_nets(q, qt), "actor.net": pi, "actor_target.net": pit}
        assert_state(k, states[k - 1], initial, nets, changed={"critic"} | ({"actor", "actor_target", "critic_target"}
                                                                          if k >= freq else set()))
    if cls is not DDPG:
        assert not torch.equal(states[0]["actor.net.0.weight"], states[1]["actor.net.0.weight"])  # delayed: moves at 2
        assert torch.equal(states[0]["actor.net.0.weight"], initial["actor.net.0.weight"])


def test_sac_update_equals_a_hand_written_update(optimizer):
    torch.manual_seed(0)
    module = spread(SAC(**SMALL, critic_lr=LR, actor_lr=LR, alpha_lr=LR, target_tau=TAU, init_alpha=2.0))
    batch = make_batch()
    torch.manual_seed(SEED)
    with torch.no_grad():
        balance(module.critic_target, batch.next_obs, squashed_sample(module.actor.net, batch.next_obs,
                                                                      torch.randn(B, ACT_DIM))[0])
        balance(module.critic, batch.obs, squashed_sample(module.actor.net, batch.obs, torch.randn(B, ACT_DIM))[0])
    initial, q, qt, pi, (log_alpha,) = soft_copies(module, "log_alpha")
    states = run_updates(module, batch, 2)

    ref = Reference(optimizer)
    s, a, s2 = batch.obs, batch.act, batch.next_obs
    for k in (1, 2):
        torch.manual_seed(SEED + k - 1)
        next_q, next_logp = soft_next_q(pi, qt, s2, check=k == 1)  # draw 1: a' ~ pi(s') for the soft target
        y = target(batch.rew, DISCOUNT, TERMINATED, next_q.min(dim=0).values - log_alpha.detach().exp() * next_logp)
        ref.step("critic", params(q), weighted_td(q_all(q, s, a), y, WEIGHT), LR)
        # draw 2: a ~ pi(s) for the actor, against the min of the just-updated critics (min and member 0 differ)
        soft_actor_and_alpha_steps(ref, q, pi, log_alpha, s, check=k == 1)
        polyak(qt, q, TAU)
        nets = {**critic_nets(q, qt), "actor.net": pi, "log_alpha": log_alpha}
        assert_state(k, states[k - 1], initial, nets, changed={"critic", "critic_target", "actor", "log_alpha"})


def test_cql_update_equals_a_hand_written_update(optimizer):
    torch.manual_seed(0)
    n, temp, c, gap_target = 2, 2.0, 0.5, 0.3
    module = spread(CQL(**SMALL, critic_lr=LR, actor_lr=LR, alpha_lr=LR, cql_alpha_lr=LR, target_tau=TAU,
                        init_alpha=2.0, num_samples=n, cql_temp=temp, cql_alpha=c, lagrange=True,
                        target_action_gap=gap_target))
    batch = make_batch()
    torch.manual_seed(SEED)
    with torch.no_grad():
        balance(module.critic_target, batch.next_obs, squashed_sample(module.actor.net, batch.next_obs,
                                                                      torch.randn(B, ACT_DIM))[0])
    initial, q, qt, pi, (log_alpha, log_cql_alpha) = soft_copies(module, "log_alpha", "log_cql_alpha")
    states = run_updates(module, batch, 2)

    ref = Reference(optimizer)
    s, a, s2 = batch.obs, batch.act, batch.next_obs
    for k in (1, 2):
        torch.manual_seed(SEED + k - 1)
        next_q, _ = soft_next_q(pi, qt, s2, check=k == 1)
        y = target(batch.rew, DISCOUNT, TERMINATED, next_q.min(dim=0).values)  # no entropy in the backup (CORL)
        with torch.no_grad():
            proposals, log_mu = cql_proposals(pi, batch, n)
        gap = cql_gap(q, batch, proposals, log_mu, temp)
        weight = c * log_cql_alpha.detach().exp()
        ref.step("critic", params(q), weighted_td(q_all(q, s, a), y, WEIGHT) + weight * gap.sum(), LR)
        ref.step("cql_alpha", [log_cql_alpha], -log_cql_alpha.exp() * c * (gap.detach().mean() - gap_target), LR)
        soft_actor_and_alpha_steps(ref, q, pi, log_alpha, s, check=False)
        polyak(qt, q, TAU)
        nets = {**critic_nets(q, qt), "actor.net": pi, "log_alpha": log_alpha, "log_cql_alpha": log_cql_alpha}
        assert_state(k, states[k - 1], initial, nets,
                     changed={"critic", "critic_target", "actor", "log_alpha", "log_cql_alpha"})


def test_iql_update_equals_a_hand_written_update(optimizer):
    torch.manual_seed(0)
    tau, beta, max_weight, steps = 0.8, 3.0, 2.0, 3
    # log-std bounds [-3, -0.5] with the log-std at (0, -1): the clamp binds in the first dimension only
    module = spread(IQL(**SMALL, critic_lr=LR, actor_lr=LR, value_lr=LR, target_tau=TAU, expectile=tau, beta=beta,
                        max_weight=max_weight, actor_lr_cosine_steps=steps, log_std_min=-3.0, log_std_max=-0.5))
    batch = make_batch(weight=False)
    balance(module.critic_target, batch.obs, batch.act)
    with torch.no_grad():
        module.actor.log_std.copy_(torch.tensor([0.0, -1.0]))
    with torch.no_grad():  # V in the middle of the data's Q: advantages of both signs
        q_data = q_all(list(module.critic_target.members), batch.obs, batch.act).min(dim=0).values
        module.value[-1].bias.add_((q_data - forward(module.value, batch.obs).squeeze(-1)).median())
    initial = {k: v.detach().clone() for k, v in module.state_dict().items()}
    q, qt = members(module.critic), members(module.critic_target)
    actor, value = copy.deepcopy(module.actor), copy.deepcopy(module.value)
    states = run_updates(module, batch, 3)

    ref = Reference(optimizer)
    s, a, s2 = batch.obs, batch.act, batch.next_obs
    for k in (1, 2, 3):
        with torch.no_grad():  # y with V before its step
            y = target(batch.rew, DISCOUNT, TERMINATED, forward(value, s2).squeeze(-1))
            q_data = q_all(qt, s, a)
            if k == 1:
                disagree(q_data)
            q_data = q_data.min(dim=0).values
        adv = q_data - forward(value, s).squeeze(-1)
        if k == 1:
            assert (adv > 0.05).any() and (adv < -0.05).any()  # both sides of the expectile
        expectile_weight = torch.where(adv > 0, tau, 1.0 - tau)
        ref.step("value", params(value), (expectile_weight * adv ** 2).mean(), LR)
        ref.step("critic", params(q), weighted_td(q_all(q, s, a), y, None), LR)
        weights = torch.exp(beta * adv.detach())
        if k == 1:
            assert (weights > max_weight).any() and (weights < max_weight).any()  # the clip binds on some rows
        weights = weights.clamp(max=max_weight)
        mean = MID + SCALE * torch.tanh(forward(actor.net[:-1], s))
        log_std = actor.log_std.clamp(-3.0, -0.5)
        log_prob = (-0.5 * ((a - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        lr = LR * 0.5 * (1 + math.cos(math.pi * (k - 1) / steps))  # CORL's cosine: LR, 0.75 LR, 0.25 LR
        ref.step("actor", params(actor), -(weights * log_prob).mean(), lr)
        polyak(qt, q, TAU)
        nets = {**critic_nets(q, qt), "actor": actor, "value": value}
        assert_state(k, states[k - 1], initial, nets, changed={"critic", "critic_target", "actor", "value"})


def test_preqn_update_equals_a_hand_written_preconditioned_step(monkeypatch):
    use_sgd(monkeypatch)  # the actor's Adam; the critic has no optimiser
    torch.manual_seed(0)
    module = spread(PreQN(**SMALL, actor_lr=LR, preqn_lr=0.5, cos_threshold=0.9, shrink=0.5, max_shrinks=20))
    batch = make_batch(weight=False)
    initial = {k: v.detach().clone() for k, v in module.state_dict().items()}
    (critic,), pi = members(module.critic), copy.deepcopy(module.actor.net)
    states = run_updates(module, batch, 2)

    s, a, s2 = batch.obs, batch.act, batch.next_obs
    ref = Reference("sgd")
    theta = list(critic.parameters())
    shrinks = []
    for k in (1, 2):
        with torch.no_grad():  # no target networks: the current critic at the current actor
            y = target(batch.rew, DISCOUNT, TERMINATED, q_all([critic], s2, mu(pi, s2))[0])
        # per-sample gradients of Q(s_i, a_i), one backward each, in float64
        critic64 = copy.deepcopy(critic).double()
        jac = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            q_all([critic64], s[i:i + 1].double(), a[i:i + 1].double())[0, 0], list(critic64.parameters()))])
            for i in range(B)])  # (B, P)
        with torch.no_grad():
            q0 = q_all([critic], s, a)[0]
            delta = (y - q0).double()
            gram = jac @ jac.T
            z = torch.linalg.pinv(gram, hermitian=True, rtol=1e-6) @ delta
            direction = jac.T @ z
            start = [p.detach().clone() for p in theta]
            scale, tries = 0.5, 0
            while True:
                offset = 0
                for p, p0 in zip(theta, start):
                    p.copy_(p0 + scale * direction[offset:offset + p.numel()].view_as(p).float())
                    offset += p.numel()
                change = (q_all([critic], s, a)[0] - q0).double()
                cos = float(change @ delta / (change.norm() * delta.norm()))
                if cos >= 0.9 or tries == 20:
                    break
                scale, tries = scale * 0.5, tries + 1
            shrinks.append(tries)
        ref.step("actor", params(pi), -q_all([critic], s, mu(pi, s))[0].mean(), LR)
        assert_state(k, states[k - 1], initial, {"critic.members.0": critic, "actor.net": pi},
                     changed={"critic", "actor"})
    assert TERMINATED.sum() > 0 and max(shrinks) < 20


# ------------------------------------------------------- Stable-Baselines3 as reference
class _BoxEnv:
    """A gymnasium env with the fixture's shapes and actions in [-1, 1] (SB3 acts in [-1, 1];
    our density is in the env's units, so on [-1, 1] the two conventions coincide)."""

    @staticmethod
    def make():
        import gymnasium as gym
        import numpy as np

        class Env(gym.Env):
            observation_space = gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)
            action_space = gym.spaces.Box(-1.0, 1.0, (ACT_DIM,), np.float32)

            def reset(self, *, seed=None, options=None):
                super().reset(seed=seed)
                return np.zeros(OBS_DIM, np.float32), {}

            def step(self, action):
                return np.zeros(OBS_DIM, np.float32), 0.0, False, False, {}

        return Env()


def sb3_target(monkeypatch: pytest.MonkeyPatch, model, module_name: str, batch: Transitions) -> Tensor:
    """Run one SB3 ``train`` step on ``batch`` and return the critic target it regressed on, ``(B,)``
    (read from its ``F.mse_loss(current_q, target)`` calls)."""
    import importlib

    from stable_baselines3.common.buffers import ReplayBufferSamples
    from stable_baselines3.common.logger import configure

    sb3_module = importlib.import_module(module_name)
    seen = []
    real_f = sb3_module.F

    def mse_loss(current, target, *args, **kwargs):
        seen.append(target.detach().clone())
        return real_f.mse_loss(current, target, *args, **kwargs)

    samples = ReplayBufferSamples(batch.obs, batch.act, batch.next_obs, batch.terminated[:, None], batch.rew[:, None],
                                  batch.discount[:, None])
    model.set_logger(configure(None, []))
    monkeypatch.setattr(model.replay_buffer, "sample", lambda *args, **kwargs: samples)
    monkeypatch.setattr(sb3_module, "F", types.SimpleNamespace(mse_loss=mse_loss))
    model.train(gradient_steps=1, batch_size=B)
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])  # one target for both critics
    return seen[0].squeeze(-1)


def _copy_critics(sb3_critic, critic) -> None:
    for i, member in enumerate(critic.members):
        member.load_state_dict(getattr(sb3_critic, f"qf{i}").state_dict())


def make_batch_in_unit_box() -> Transitions:
    batch = make_batch(weight=False)
    g = torch.Generator().manual_seed(5)
    return batch._replace(act=torch.rand(B, ACT_DIM, generator=g) * 1.8 - 0.9)


def test_sac_target_equals_stable_baselines3s(monkeypatch):
    pytest.importorskip("stable_baselines3")
    from stable_baselines3 import SAC as SB3SAC

    torch.manual_seed(0)
    model = SB3SAC("MlpPolicy", _BoxEnv.make(), policy_kwargs=dict(net_arch=dict(pi=[8], qf=[8])), gamma=GAMMA,
                   ent_coef="auto_2.0", learning_starts=0, buffer_size=10, device="cpu", seed=0)
    module = SAC(obs_dim=OBS_DIM, act_dim=ACT_DIM, gamma=GAMMA, critic_hidden=(8,), actor_hidden=(8,),
                 init_alpha=2.0, eval_every=0)
    with torch.no_grad():
        for p in model.critic_target.parameters():  # a target that differs from the online critics
            p.add_(0.3 * torch.randn(p.shape))
        _copy_critics(model.critic_target, module.critic_target)
        _copy_critics(model.critic, module.critic)
        # the actor: SB3's mean head copied; both log-stds set to the same state-independent value
        # (SB3 clamps a linear head to [-20, 2], ours squashes by a tanh into [-5, 2])
        actor, net = model.actor, module.actor.net
        net[0].load_state_dict(actor.latent_pi[0].state_dict())
        net[2].weight[:ACT_DIM] = actor.mu.weight
        net[2].bias[:ACT_DIM] = actor.mu.bias
        log_std = -0.3
        actor.log_std.weight.zero_()
        actor.log_std.bias.fill_(log_std)
        net[2].weight[ACT_DIM:] = 0.0
        net[2].bias[ACT_DIM:] = math.atanh(2 * (log_std + 5.0) / 7.0 - 1.0)
    batch = make_batch_in_unit_box()
    torch.manual_seed(SEED)
    expected = sb3_target(monkeypatch, model, "stable_baselines3.sac.sac", batch)  # draws pi(s), then pi(s')
    torch.manual_seed(SEED)
    torch.randn(B, ACT_DIM)  # SB3's first draw (the actor's sample at s)
    y = module.td_target(batch)
    # SB3 adds 1e-6 inside log(1 - tanh(u)^2): agreement to ~1e-5 per unit of alpha
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    assert (y - batch.rew)[TERMINATED == 0].abs().min() > 0.1  # the bootstrap is not negligible
    # the comparison sees the entropy term: with alpha ~ 0 the target moves
    with torch.no_grad():
        module.log_alpha.fill_(math.log(1e-4))
    torch.manual_seed(SEED)
    torch.randn(B, ACT_DIM)
    assert (module.td_target(batch) - expected).abs().max() > 0.1, "the entropy term does not matter here"


def test_td3_target_equals_stable_baselines3s(monkeypatch):
    pytest.importorskip("stable_baselines3")
    from stable_baselines3 import TD3 as SB3TD3

    torch.manual_seed(0)
    model = SB3TD3("MlpPolicy", _BoxEnv.make(), policy_kwargs=dict(net_arch=dict(pi=[8], qf=[8])), gamma=GAMMA,
                   target_policy_noise=0.5, target_noise_clip=0.2, learning_starts=0, buffer_size=10, device="cpu",
                   seed=0)
    module = TD3(obs_dim=OBS_DIM, act_dim=ACT_DIM, gamma=GAMMA, critic_hidden=(8,), actor_hidden=(8,),
                 policy_noise=0.5, noise_clip=0.2, eval_every=0)
    with torch.no_grad():
        for p in (*model.critic_target.parameters(), *model.actor_target.parameters()):
            p.add_(0.3 * torch.randn(p.shape))
        for qf in (model.critic_target.qf0, model.critic_target.qf1):
            qf[-1].weight.mul_(4.0)  # Q of a few units
        model.actor_target.mu[-2].weight.mul_(2.0)  # near the bounds: the clamp to [-1, 1] binds on some entries
        _copy_critics(model.critic_target, module.critic_target)
        _copy_critics(model.critic, module.critic)
        module.actor.net.load_state_dict(model.actor.mu.state_dict())
        module.actor_target.net.load_state_dict(model.actor_target.mu.state_dict())
    batch = make_batch_in_unit_box()
    torch.manual_seed(SEED)
    expected = sb3_target(monkeypatch, model, "stable_baselines3.td3.td3", batch)  # its one draw: the smoothing noise
    torch.manual_seed(SEED)
    y = module.td_target(batch)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert (y - batch.rew)[TERMINATED == 0].abs().min() > 0.1
    # the comparison sees the noise clip: without it the target moves
    module.noise_clip = 100.0
    torch.manual_seed(SEED)
    assert (module.td_target(batch) - expected).abs().max() > 1e-2, "the clip does not matter here"


# ------------------------------------------- gaps found by planting bugs in the update lines
def test_critic_weight_decay_enters_the_critic_step_and_only_it(monkeypatch):
    """``critic_weight_decay`` is the critic optimiser's L2 term: under SGD one critic step is
    ``theta - lr (grad + wd theta)``; the actor's step has none, and it sends no gradient into
    the critic (the critic's ``.grad`` after the update is its own loss's gradient alone)."""
    use_sgd(monkeypatch)
    torch.manual_seed(0)
    wd = 0.5
    module = spread(DDPG(**SMALL, critic_lr=LR, actor_lr=LR, critic_weight_decay=wd, target_tau=TAU))
    batch = make_batch()
    q, qt = members(module.critic), members(module.critic_target)
    pi, pit = copy.deepcopy(module.actor.net), copy.deepcopy(module.actor_target.net)
    (state,) = run_updates(module, batch, 1)
    with torch.no_grad():
        y = target(batch.rew, DISCOUNT, TERMINATED, q_all(qt, batch.next_obs, mu(pit, batch.next_obs))[0])
    grads = torch.autograd.grad(weighted_td(q_all(q, batch.obs, batch.act), y, WEIGHT), params(q))
    for (name, p), g in zip(q[0].named_parameters(), grads):
        assert (LR * wd * p).abs().max() > 1e-3  # the decay term is far above the tolerance (1e-6)
        torch.testing.assert_close(state[f"critic.members.0.{name}"], (p - LR * (g + wd * p)).detach(),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(module.critic.members[0].get_parameter(name).grad, g, rtol=1e-5, atol=1e-6)
    # the actor (after the critic step, against the updated critic) has no decay
    q_new = copy.deepcopy(q[0])
    with torch.no_grad():
        for name, p in q_new.named_parameters():
            p.copy_(state[f"critic.members.0.{name}"])
    actor_grads = torch.autograd.grad(-q_all([q_new], batch.obs, mu(pi, batch.obs))[0].mean(), params(pi))
    for (name, p), g in zip(pi.named_parameters(), actor_grads):
        torch.testing.assert_close(state[f"actor.net.{name}"], (p - LR * g).detach(), rtol=1e-5, atol=1e-6)


def test_cql_lagrange_multiplier_is_clamped_at_corls_maximum():
    """alpha' = min(exp(log alpha'), 1e6) (CORL's clamp) in both the critic's weight and the
    multiplier's own loss, whose gradient vanishes while the clamp binds."""
    module = CQL(**SMALL, lagrange=True, cql_alpha=0.5, target_action_gap=0.3)
    with torch.no_grad():
        module.log_cql_alpha.fill_(20.0)  # exp(20) = 4.9e8, far above the clamp
    assert module.cql_weight.item() == pytest.approx(0.5 * 1e6)
    loss = module.lagrange_loss(torch.tensor([2.0, 4.0]))
    assert loss.item() == pytest.approx(-1e6 * 0.5 * (3.0 - 0.3))
    (grad,) = torch.autograd.grad(loss, module.log_cql_alpha)
    assert grad.item() == 0.0
    with torch.no_grad():
        module.log_cql_alpha.fill_(2.0)  # below the clamp: exp(2)
    assert module.cql_weight.item() == pytest.approx(0.5 * math.exp(2.0))


def test_cql_without_lagrange_still_adds_the_weighted_gap_to_the_critic_loss(monkeypatch):
    """CORL's default (``lagrange=False``, ``cql_alpha`` > 0): one critic step under SGD is the
    gradient of the TD loss plus ``cql_alpha * sum_i gap_i``; alpha' has no optimiser and stays."""
    use_sgd(monkeypatch)
    torch.manual_seed(0)
    n, temp, c = 2, 2.0, 0.5
    module = spread(CQL(**SMALL, critic_lr=LR, actor_lr=LR, alpha_lr=LR, target_tau=TAU, init_alpha=2.0,
                        num_samples=n, cql_temp=temp, cql_alpha=c))
    batch = make_batch()
    q, qt, pi = members(module.critic), members(module.critic_target), copy.deepcopy(module.actor.net)
    log_cql_alpha = module.log_cql_alpha.detach().clone()
    (state,) = run_updates(module, batch, 1)
    torch.manual_seed(SEED)
    with torch.no_grad():
        next_act, _ = squashed_sample(pi, batch.next_obs, torch.randn(B, ACT_DIM))
        y = target(batch.rew, DISCOUNT, TERMINATED, q_all(qt, batch.next_obs, next_act).min(dim=0).values)
        proposals, log_mu = cql_proposals(pi, batch, n)
    td = weighted_td(q_all(q, batch.obs, batch.act), y, WEIGHT)
    grads = torch.autograd.grad(td + c * cql_gap(q, batch, proposals, log_mu, temp).sum(), params(q), retain_graph=True)
    td_grads = torch.autograd.grad(td, params(q))
    names = [f"critic.members.{i}.{name}" for i in range(2) for name, _ in q[i].named_parameters()]
    for name, p, g, g_td in zip(names, params(q), grads, td_grads):
        torch.testing.assert_close(state[name], (p - LR * g).detach(), rtol=1e-4, atol=2e-5)
    assert max((LR * (g - g_td)).abs().max() for g, g_td in zip(grads, td_grads)) > 1e-2  # the penalty shows
    assert torch.equal(state["log_cql_alpha"], log_cql_alpha)


def test_iql_value_network_steps_at_its_own_learning_rate(monkeypatch):
    """V's optimiser runs at ``value_lr``, not the critics' rate: under SGD one value step is
    ``psi - value_lr * grad`` of the expectile loss of ``min_i Q'_i(s, a) - V(s)``."""
    use_sgd(monkeypatch)
    torch.manual_seed(0)
    value_lr, tau = 3 * LR, 0.8
    module = spread(IQL(**SMALL, critic_lr=LR, actor_lr=LR, value_lr=value_lr, target_tau=TAU, expectile=tau))
    batch = make_batch(weight=False)
    qt, value = members(module.critic_target), copy.deepcopy(module.value)
    (state,) = run_updates(module, batch, 1)
    with torch.no_grad():
        q_data = q_all(qt, batch.obs, batch.act).min(dim=0).values
    adv = q_data - forward(value, batch.obs).squeeze(-1)
    grads = torch.autograd.grad((torch.where(adv > 0, tau, 1.0 - tau) * adv ** 2).mean(), params(value))
    for (name, p), g in zip(value.named_parameters(), grads):
        torch.testing.assert_close(state[f"value.{name}"], (p - value_lr * g).detach(), rtol=1e-5, atol=1e-6)
    assert max((value_lr - LR) * g.abs().max() for g in grads) > 1e-2  # a step at the critics' rate lands elsewhere


@pytest.mark.parametrize("cls", [SAC, DDPG])
def test_the_actor_step_sends_no_gradient_into_the_critic(monkeypatch, cls):
    """After one update the critic's ``.grad`` is the gradient of its own TD loss alone (by
    hand): the actor's loss, backpropagated through the critic, leaves nothing there."""
    use_sgd(monkeypatch)
    torch.manual_seed(0)
    extra = dict(init_alpha=2.0) if cls is SAC else {}
    module = spread(cls(**SMALL, critic_lr=LR, actor_lr=LR, target_tau=TAU, **extra))
    batch = make_batch()
    q, qt = members(module.critic), members(module.critic_target)
    pi = copy.deepcopy(module.actor.net)
    pit = copy.deepcopy(module.actor_target.net) if cls is DDPG else None
    run_updates(module, batch, 1)
    torch.manual_seed(SEED)
    with torch.no_grad():
        if cls is SAC:
            next_act, next_logp = squashed_sample(pi, batch.next_obs, torch.randn(B, ACT_DIM))
            next_v = q_all(qt, batch.next_obs, next_act).min(dim=0).values - 2.0 * next_logp
        else:
            next_v = q_all(qt, batch.next_obs, mu(pit, batch.next_obs))[0]
        y = target(batch.rew, DISCOUNT, TERMINATED, next_v)
    grads = torch.autograd.grad(weighted_td(q_all(q, batch.obs, batch.act), y, WEIGHT), params(q))
    for p, g in zip(params(list(module.critic.members)), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)
