"""The scalars researchers read when a critic misbehaves, pinned against hand computations on
test_formulas.py's batch: each regulariser apart from the Bellman term, the mean TD target
``q/target_mean`` and the critic's gradient norm before any clip ``train/critic_grad_norm``,
logged at the update count on logging steps only.

Every optimiser is swapped for SGD (:func:`use_sgd`), so the reference replays the
critic's step as ``theta - lr * grad`` and reads the actor's terms after it, as the update
does. Randomness is reproduced by re-seeding the torch generator before each update.
"""
from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lit_qlearn.algorithms import CQL, DQN, IQL, SAC, TD3, TD3BC, PreQN
from lit_qlearn.algorithms import optim
from lit_qlearn.data.types import Transitions
from tests.algorithms.test_formulas import (ACT_DIM, B, DISCOUNT, LR, OBS_DIM, SEED, SMALL, TERMINATED, WEIGHT,
                                            balance, center, cql_gap, cql_proposals, disagree, forward, make_batch,
                                            members, mu, params, q_all, smoothed_target_action, soft_next_q, spread,
                                            target, use_sgd, weighted_td)
from tests.callbacks.test_crash import MemoryLogger


def logged_updates(module, batch: Transitions, n: int, log_every: int = 1) -> MemoryLogger:
    """``n`` updates of ``module`` on ``batch`` through a real Trainer that logs every
    ``log_every`` updates; the torch generator is seeded with ``SEED + i`` before update ``i``."""

    class Seed(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            torch.manual_seed(SEED + batch_idx)

    logger = MemoryLogger()
    trainer = L.Trainer(max_steps=n, logger=logger, log_every_n_steps=log_every, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", callbacks=[Seed()])
    trainer.fit(module, train_dataloaders=DataLoader([batch] * n, batch_size=None))
    return logger


def norm_and_sgd_step(loss: Tensor, ps: list[Tensor], lr: float) -> float:
    """The global L2 norm of ``d loss / d ps`` (one vector of every entry); then ``ps -= lr * grad``."""
    grads = torch.autograd.grad(loss, ps)
    with torch.no_grad():
        for p, g in zip(ps, grads):
            p.sub_(lr * g)
    return float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads])))


def test_td3bc_logs_its_bc_and_q_terms_apart_the_target_mean_and_the_critic_gradient_norm(monkeypatch):
    use_sgd(monkeypatch)
    torch.manual_seed(0)
    module = spread(TD3BC(**SMALL, critic_lr=LR / 10, actor_lr=LR, policy_noise=0.4, noise_clip=0.3, policy_freq=1))
    batch = make_batch()
    s, a, s2 = batch.obs, batch.act, batch.next_obs
    center(module.critic, s, mu(module.actor.net, s))
    q, qt = members(module.critic), members(module.critic_target)
    pi, pit = copy.deepcopy(module.actor.net), copy.deepcopy(module.actor_target.net)
    row = logged_updates(module, batch, 1).rows[1]

    torch.manual_seed(SEED)
    with torch.no_grad():
        next_q = q_all(qt, s2, smoothed_target_action(pit, s2, 0.4))
        disagree(next_q)
        y = target(batch.rew, DISCOUNT, TERMINATED, next_q.min(dim=0).values)
    td = weighted_td(q_all(q, s, a), y, WEIGHT)
    norm = norm_and_sgd_step(td, params(q), LR / 10)
    with torch.no_grad():  # the actor's terms, against the stepped critic
        pi_s = mu(pi, s)
        q_pi = q_all([q[0]], s, pi_s)[0]
        q_term = float(-2.5 / q_pi.abs().mean() * q_pi.mean())
        bc = float(((pi_s - a) ** 2).mean())
    assert abs(q_term) > 0.05 and bc > 0.05  # both terms matter
    assert row["q/target_mean"] == pytest.approx(float(y.mean()), rel=1e-5)
    assert row["train/critic_loss"] == pytest.approx(float(td), rel=1e-5)  # the Bellman term alone
    assert row["train/critic_grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert row["train/actor_q_term"] == pytest.approx(q_term, rel=1e-5)
    assert row["train/bc_loss"] == pytest.approx(bc, rel=1e-5)
    assert row["train/actor_loss"] == pytest.approx(q_term + bc, rel=1e-5)


def test_td3s_actor_q_term_is_its_whole_actor_loss_and_there_is_no_bc_term():
    torch.manual_seed(0)
    row = logged_updates(spread(TD3(**SMALL, policy_freq=1)), make_batch(), 1).rows[1]
    assert row["train/actor_q_term"] == row["train/actor_loss"] and "train/bc_loss" not in row


def test_sac_logs_the_soft_target_mean_and_the_critic_gradient_norm(monkeypatch):
    use_sgd(monkeypatch)
    torch.manual_seed(0)
    module = spread(SAC(**SMALL, critic_lr=LR, init_alpha=2.0))
    batch = make_batch()
    s, a, s2 = batch.obs, batch.act, batch.next_obs
    q, qt, pi = members(module.critic), members(module.critic_target), copy.deepcopy(module.actor.net)
    row = logged_updates(module, batch, 1).rows[1]

    torch.manual_seed(SEED)
    next_q, next_logp = soft_next_q(pi, qt, s2, check=False)
    y = target(batch.rew, DISCOUNT, TERMINATED, next_q.min(dim=0).values - 2.0 * next_logp)
    norm = norm_and_sgd_step(weighted_td(q_all(q, s, a), y, WEIGHT), params(q), LR)
    assert row["q/target_mean"] == pytest.approx(float(y.mean()), rel=1e-5)
    assert row["train/critic_grad_norm"] == pytest.approx(norm, rel=1e-5)


def test_cql_logs_its_penalty_and_weight_apart_and_the_gradient_norm_of_the_whole_critic_loss(monkeypatch):
    use_sgd(monkeypatch)
    torch.manual_seed(0)
    n, temp, c = 2, 2.0, 0.5
    module = spread(CQL(**SMALL, critic_lr=LR, num_samples=n, cql_temp=temp, cql_alpha=c))
    batch = make_batch()
    s, a, s2 = batch.obs, batch.act, batch.next_obs
    q, qt, pi = members(module.critic), members(module.critic_target), copy.deepcopy(module.actor.net)
    row = logged_updates(module, batch, 1).rows[1]

    torch.manual_seed(SEED)  # the library's order: a' ~ pi(s'), then the proposals
    next_q, _ = soft_next_q(pi, qt, s2, check=False)
    y = target(batch.rew, DISCOUNT, TERMINATED, next_q.min(dim=0).values)
    with torch.no_grad():
        proposals, log_mu = cql_proposals(pi, batch, n)
    td = weighted_td(q_all(q, s, a), y, WEIGHT)
    gap = cql_gap(q, batch, proposals, log_mu, temp)
    gap_mean = float(gap.mean())
    norm = norm_and_sgd_step(td + c * gap.sum(), params(q), LR)
    assert abs(gap_mean) > 0.05
    assert row["train/critic_loss"] == pytest.approx(float(td), rel=1e-5)  # the Bellman term alone
    assert row["train/cql_gap"] == pytest.approx(gap_mean, rel=1e-5)
    assert row["train/cql_weight"] == pytest.approx(c)
    assert row["q/target_mean"] == pytest.approx(float(y.mean()), rel=1e-5)
    assert row["train/critic_grad_norm"] == pytest.approx(norm, rel=1e-5)


def test_iql_logs_its_value_loss_its_target_mean_and_the_critic_gradient_norm(monkeypatch):
    use_sgd(monkeypatch)
    torch.manual_seed(0)
    tau = 0.8
    module = spread(IQL(**SMALL, critic_lr=LR, expectile=tau))
    batch = make_batch(weight=False)
    s, a, s2 = batch.obs, batch.act, batch.next_obs
    balance(module.critic_target, s, a)
    with torch.no_grad():  # V in the middle of the data's Q: advantages of both signs
        q_data = q_all(list(module.critic_target.members), s, a).min(dim=0).values
        module.value[-1].bias.add_((q_data - forward(module.value, s).squeeze(-1)).median())
    q, qt, value = members(module.critic), members(module.critic_target), copy.deepcopy(module.value)
    row = logged_updates(module, batch, 1).rows[1]

    with torch.no_grad():
        y = target(batch.rew, DISCOUNT, TERMINATED, forward(value, s2).squeeze(-1))
        adv = q_all(qt, s, a).min(dim=0).values - forward(value, s).squeeze(-1)
        assert (adv > 0.05).any() and (adv < -0.05).any()  # both sides of the expectile
        value_loss = float((torch.where(adv > 0, tau, 1.0 - tau) * adv ** 2).mean())
    norm = norm_and_sgd_step(weighted_td(q_all(q, s, a), y, None), params(q), LR)
    assert row["train/value_loss"] == pytest.approx(value_loss, rel=1e-5)
    assert row["q/target_mean"] == pytest.approx(float(y.mean()), rel=1e-5)
    assert row["train/critic_grad_norm"] == pytest.approx(norm, rel=1e-5)


def test_preqn_logs_the_target_mean_of_its_own_bootstrap_and_no_gradient_norm():
    torch.manual_seed(0)
    module = PreQN(**{k: v for k, v in SMALL.items() if k != "critic_hidden"}, critic_hidden=(8,))
    batch = make_batch(weight=False)
    q, pi = members(module.critic), copy.deepcopy(module.actor.net)
    row = logged_updates(module, batch, 1).rows[1]
    with torch.no_grad():  # y = r + discount (1 - d) Q(s', mu(s')), the current critic and actor
        y = target(batch.rew, DISCOUNT, TERMINATED, q_all(q, batch.next_obs, mu(pi, batch.next_obs))[0])
    assert row["q/target_mean"] == pytest.approx(float(y.mean()), rel=1e-5)
    assert "train/critic_grad_norm" not in row  # the critic takes a preconditioned step, not a gradient step


# ----------------------------------------------------------------------------- DQN
def dqn_batch() -> Transitions:
    g = torch.Generator().manual_seed(0)
    return Transitions(torch.randn(B, OBS_DIM, generator=g), torch.tensor([0, 1, 1, 0, 1, 0]),
                       1.0 + 2.0 * torch.randn(B, generator=g), torch.randn(B, OBS_DIM, generator=g),
                       TERMINATED.clone(), DISCOUNT.clone(), WEIGHT.clone())


def huber(d: Tensor) -> Tensor:
    return torch.where(d.abs() < 1.0, 0.5 * d ** 2, d.abs() - 0.5)


def test_dqn_logs_the_gradient_norm_before_a_binding_clip_and_its_double_q_target_mean(monkeypatch):
    use_sgd(monkeypatch)
    torch.manual_seed(0)
    module = DQN(obs_shape=(OBS_DIM,), num_actions=2, gamma=0.9, critic_hidden=(8,), critic_lr=LR)
    with torch.no_grad():  # a target network whose actions are the online one's swapped: double Q is not max
        last = module.q_target.head[-1]
        last.weight.copy_(last.weight.flip(0))
        last.bias.copy_(last.bias.flip(0) + torch.tensor([0.3, -0.2]))
    batch = dqn_batch()
    s, a, s2 = batch.obs, batch.act, batch.next_obs
    net, target_net = copy.deepcopy(module.q_net.head), copy.deepcopy(module.q_target.head)
    with torch.no_grad():
        online_next = forward(net, s2)
        next_v = forward(target_net, s2).gather(1, online_next.argmax(1, keepdim=True)).squeeze(1)
        assert not torch.equal(next_v, forward(target_net, s2).max(1).values)  # double Q differs from max
        y = target(batch.rew, DISCOUNT, TERMINATED, next_v)
    d = forward(net, s).gather(1, a.view(-1, 1)).squeeze(1) - y
    assert (d.abs() < 1).any() and (d.abs() > 1).any()  # both branches of the Huber loss
    loss = (WEIGHT * huber(d)).mean()
    grads = torch.autograd.grad(loss, list(net.parameters()))
    norm = float(torch.linalg.vector_norm(torch.cat([x.reshape(-1) for x in grads])))
    module.max_grad_norm = norm / 4  # a clip that binds: the step is a quarter of the gradient's
    before = [p.detach().clone() for p in module.q_net.head.parameters()]
    row = logged_updates(module, batch, 1).rows[1]

    assert row["train/critic_grad_norm"] == pytest.approx(norm, rel=1e-5)  # before the clip, not max_grad_norm
    assert row["q/target_mean"] == pytest.approx(float(y.mean()), rel=1e-5)
    for p0, g, p in zip(before, grads, module.q_net.head.parameters()):
        torch.testing.assert_close(p.detach(), p0 - LR * g / 4, rtol=1e-4, atol=1e-6)


def test_dqn_without_clipping_measures_the_gradient_norm_on_logging_steps(monkeypatch):
    use_sgd(monkeypatch)
    torch.manual_seed(0)
    module = DQN(obs_shape=(OBS_DIM,), num_actions=2, gamma=0.9, critic_hidden=(8,), critic_lr=LR, max_grad_norm=None)
    batch = dqn_batch()
    net, target_net = copy.deepcopy(module.q_net.head), copy.deepcopy(module.q_target.head)
    with torch.no_grad():  # double Q: the online argmax valued by the target network
        choice = forward(net, batch.next_obs).argmax(1, keepdim=True)
        y = target(batch.rew, DISCOUNT, TERMINATED, forward(target_net, batch.next_obs).gather(1, choice).squeeze(1))
    d = forward(net, batch.obs).gather(1, batch.act.view(-1, 1)).squeeze(1) - y
    norm = norm_and_sgd_step((WEIGHT * huber(d)).mean(), list(net.parameters()), LR)
    row = logged_updates(module, batch, 1).rows[1]
    assert row["train/critic_grad_norm"] == pytest.approx(norm, rel=1e-5)


@pytest.mark.parametrize("cls", [TD3, DQN])
def test_the_gradient_norm_is_measured_on_logging_steps_only(monkeypatch, cls):
    calls = []
    measure = optim._global_norm
    monkeypatch.setattr(optim, "_global_norm", lambda grads: calls.append(1) or measure(grads))
    torch.manual_seed(0)
    if cls is DQN:
        module, batch = DQN(obs_shape=(OBS_DIM,), num_actions=2, critic_hidden=(8,), max_grad_norm=None), dqn_batch()
    else:
        module, batch = TD3(**SMALL), make_batch()
    logger = logged_updates(module, batch, 6, log_every=3)
    assert len(calls) == 2  # the critic's norm at updates 3 and 6; no other optimiser's, no other update's
    assert sorted(logger.series("train/critic_grad_norm")) == [3, 6]
    assert sorted(logger.series("q/target_mean")) == [3, 6]


def test_the_stepper_returns_no_norm_unless_asked_or_clipping():
    module = DQN(obs_shape=(OBS_DIM,), num_actions=2, critic_hidden=(8,))
    stepper = optim.Stepper.__new__(optim.Stepper)  # no fit: direct steps, one process
    stepper.module, stepper.ddp, stepper.direct = module, None, True
    opt = torch.optim.SGD(module.q_net.parameters(), lr=0.0)
    loss = lambda: module.q_net(torch.ones(2, OBS_DIM)).pow(2).sum()  # noqa: E731
    assert stepper.step(opt, loss()) is None
    asked = stepper.step(opt, loss(), measure_norm=True)
    expected = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in module.q_net.parameters()]))
    torch.testing.assert_close(asked, expected)
    clipped = stepper.step(opt, loss(), max_grad_norm=1e-3)
    torch.testing.assert_close(clipped, expected)  # the norm before the clip
    assert math.isclose(float(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in
                                                                   module.q_net.parameters()]))), 1e-3, rel_tol=1e-3)


def test_a_subclass_overriding_actor_loss_is_still_stepped_on_it():
    """``actor_loss`` was the extension point before ``actor_loss_terms``: a subclass that
    overrides it steps on its loss (its terms unknown, none logged)."""
    seen = []

    class Own(TD3):
        def actor_loss(self, batch, pi, q_pi):
            loss = (pi ** 2).mean()
            seen.append(float(loss))
            return loss

    torch.manual_seed(0)
    row = logged_updates(Own(**SMALL, policy_freq=1), make_batch(), 1).rows[1]
    assert row["train/actor_loss"] == pytest.approx(seen[0]) and "train/actor_q_term" not in row
