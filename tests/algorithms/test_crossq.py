"""CrossQ pinned against hand computations: the whole update (joint train-mode critic pass,
the soft TD target from its detached next half, the eval-mode critic under the actor's loss,
the policy delay, the temperature) replayed with raw tensor ops and hand-written batch
renormalisation, with SGD and with Adam(beta1 = 0.5); the joint pass against two separate
passes; the probe protocol in eval mode; the defaults; DDP on the union batch.

The fixture batch and the whole-update machinery are tests/algorithms/test_formulas.py's."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lit_qlearn.algorithms import CrossQ
from lit_qlearn.callbacks import CrashPredictor, SEEMMonitor
from lit_qlearn.data import OnlineDataModule, Transitions
from lit_qlearn.networks import BatchRenorm1d, EvalModeQ
from lit_qlearn.probe import check_probe_module
from tests.algorithms.test_formulas import (ACT_DIM, B, DISCOUNT, GAMMA, HIGH, LOW, LR, MID, OBS_DIM, SCALE, SEED,
                                            TERMINATED, WEIGHT, assert_state, make_batch, optimizer, params,
                                            run_updates, weighted_td)
from tests.conftest import CHAIN_STATES, fit, run_ddp_script

__all__ = ["optimizer"]  # the fixture, imported for the whole-update test

EPS, MOM, RMAX, DMAX, WARMUP, DELAY, BETAS = 1e-3, 0.3, 1.5, 0.5, 1, 2, (0.5, 0.999)
SMALL = dict(obs_dim=OBS_DIM, act_dim=ACT_DIM, action_low=LOW.tolist(), action_high=HIGH.tolist(), gamma=GAMMA,
             critic_hidden=(8,), actor_hidden=(8,), eval_every=0, renorm_momentum=MOM, renorm_eps=EPS,
             renorm_warmup_steps=WARMUP, renorm_r_max=RMAX, renorm_d_max=DMAX, policy_delay=DELAY)


# ----------------------------------------------------------------- hand computations
class Clips:
    """Whether r's and d's clips bound, entry by entry, over the hand-written passes."""

    def __init__(self) -> None:
        self.r: list[Tensor] = []
        self.d: list[Tensor] = []


def renorm(m: BatchRenorm1d, x: Tensor, train: bool, clips: Clips) -> Tensor:
    """Ioffe's Algorithm 1 with raw ops on the copy ``m``'s tensors, its running statistics
    moved by hand; the test's own constants (EPS, MOM, RMAX, DMAX, WARMUP)."""
    if not train:
        return (x - m.running_mean) / m.running_std * m.weight + m.bias
    mu_b = x.mean(0)
    sigma_b = ((x - mu_b) ** 2).mean(0).add(EPS).sqrt()
    with torch.no_grad():
        if int(m.num_batches_tracked) >= WARMUP:
            r_raw, d_raw = sigma_b / m.running_std, (mu_b - m.running_mean) / m.running_std
            r, d = r_raw.clamp(1 / RMAX, RMAX), d_raw.clamp(-DMAX, DMAX)
            clips.r.append(r_raw != r), clips.d.append(d_raw != d)
        else:
            r, d = torch.ones_like(mu_b), torch.zeros_like(mu_b)
        m.running_mean.copy_(m.running_mean + MOM * (mu_b - m.running_mean))
        m.running_std.copy_(m.running_std + MOM * (sigma_b - m.running_std))
        m.num_batches_tracked.add_(1)
    return ((x - mu_b) / sigma_b * r + d) * m.weight + m.bias


def forward(net: nn.Sequential, x: Tensor, train: bool, clips: Clips) -> Tensor:
    for layer in net:
        if isinstance(layer, nn.Linear):
            x = x @ layer.weight.T + layer.bias
        elif isinstance(layer, nn.ReLU):
            x = x.clamp(min=0.0)
        elif isinstance(layer, BatchRenorm1d):
            x = renorm(layer, x, train, clips)
        else:
            raise TypeError(f"forward: no hand version of {layer!r}")
    return x


def q_all(members: list[nn.Sequential], x: Tensor, train: bool, clips: Clips) -> Tensor:
    """Every member's Q on the rows ``x = cat(s, a)``, ``(E, N)``."""
    return torch.stack([forward(m, x, train, clips).squeeze(-1) for m in members])


def sample(net: nn.Sequential, obs: Tensor, eps: Tensor, train: bool, clips: Clips) -> tuple[Tensor, Tensor]:
    """``a = mid + scale tanh(mean + std eps)`` and ``log pi(a|s)`` by the change of variables."""
    out = forward(net, obs, train, clips)
    mean, raw = out[:, :ACT_DIM], out[:, ACT_DIM:]
    log_std = -5.0 + 0.5 * 7.0 * (torch.tanh(raw) + 1.0)
    u = mean + log_std.exp() * eps
    gauss = -0.5 * eps ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    log_det = torch.log(SCALE * (1.0 - torch.tanh(u) ** 2))
    return MID + SCALE * torch.tanh(u), (gauss - log_det).sum(-1)


class Reference:
    """The hand-written update's optimiser steps: SGD, or Adam with the given betas."""

    def __init__(self, optimizer: str) -> None:
        self.optimizer, self._opts = optimizer, {}

    def step(self, name: str, tensors: list[Tensor], loss: Tensor, betas: tuple[float, float]) -> None:
        if name not in self._opts:
            self._opts[name] = (torch.optim.SGD(tensors, lr=LR) if self.optimizer == "sgd"
                                else torch.optim.Adam(tensors, lr=LR, betas=betas, foreach=False))
        for p, g in zip(tensors, torch.autograd.grad(loss, tensors)):
            p.grad = g
        self._opts[name].step()


def module(**kwargs) -> CrossQ:
    options = dict(SMALL, critic_lr=LR, actor_lr=LR, alpha_lr=LR, init_alpha=2.0)
    options.update(kwargs)
    return CrossQ(**options)


# --------------------------------------------------------------------- the update by hand
@pytest.fixture
def float64():
    """Module, batch and reference in float64: gradients through batch statistics of a few
    rows lose float32's digits, and a bias in front of a batch norm has a gradient that is 0 in
    exact arithmetic, rounding noise in float32, which Adam's first step would turn into
    +-lr (in float64 the noise stays far below Adam's eps)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


@pytest.mark.parametrize("n_step", [True, False], ids=["batch-discount", "gamma"])
def test_crossq_update_equals_a_hand_written_update(optimizer, float64, n_step):
    torch.manual_seed(0)
    crossq = module()
    batch = make_batch(discount=n_step)
    discount = DISCOUNT if n_step else GAMMA
    initial = {k: v.detach().clone() for k, v in crossq.state_dict().items()}
    q, pi = [copy.deepcopy(m) for m in crossq.critic.members], copy.deepcopy(crossq.actor.net)
    log_alpha = crossq.log_alpha.detach().clone().requires_grad_(True)
    states = run_updates(crossq, batch, 4)

    ref, clips, seen = Reference(optimizer), Clips(), []
    s, a, s2 = batch.obs, batch.act, batch.next_obs
    for k in range(1, 5):
        torch.manual_seed(SEED + k - 1)
        noise = torch.randn(2, B, ACT_DIM)  # draw 1: a' ~ pi(s'); draw 2: the actor's a ~ pi(s)
        alpha = log_alpha.detach().exp()
        with torch.no_grad():  # a' from the actor in eval mode: its statistics stay
            next_act, next_logp = sample(pi, s2, noise[0], train=False, clips=clips)
        # one train-mode pass of each critic over the 2B rows [(s, a); (s', a')], split
        both = q_all(q, torch.cat([torch.cat([s, a], -1), torch.cat([s2, next_act], -1)]), train=True, clips=clips)
        q_sa, q_next = both[:, :B], both[:, B:].detach()
        y = batch.rew + discount * (1.0 - TERMINATED) * (q_next.min(dim=0).values - alpha * next_logp)
        seen.append((q_next, alpha * next_logp, y))
        ref.step("critic", params(q), weighted_td(q_sa, y, WEIGHT), BETAS)
        if k % DELAY == 0:  # the actor in train mode against the critics in eval mode, then the temperature
            act_pi, logp = sample(pi, s, noise[1], train=True, clips=clips)
            q_pi = q_all(q, torch.cat([s, act_pi], -1), train=False, clips=clips)
            ref.step("actor", params(pi), (alpha * logp - q_pi.min(dim=0).values).mean(), BETAS)
            ref.step("alpha", [log_alpha], -(log_alpha * (logp.detach() - 2.0)).mean(), (0.9, 0.999))
        nets = {**{f"critic.members.{i}": m for i, m in enumerate(q)}, "actor.net": pi, "log_alpha": log_alpha}
        assert_state(k, states[k - 1], initial, nets, changed={"critic"} | ({"actor", "log_alpha"} if k >= 2 else set()))
    # what the fixture exercises: twins that disagree (the min is not member 0), targets whose
    # entropy term, terminal cut and n-step discount all matter, and both clips bound and not
    q_next, entropy, y = seen[0]
    assert (q_next[0] < q_next[1] - 0.05).any() and (q_next[0] > q_next[1] + 0.05).any()
    assert (entropy.abs() > 0.3).sum() >= 3 and (y - batch.rew).abs().max() > 1.0
    r, d = torch.cat(clips.r), torch.cat(clips.d)
    assert r.any() and not r.all() and d.any() and not d.all()
    # the actor's statistics moved twice (updates 2 and 4), the critics' once per update
    assert int(states[-1]["actor.net.0.num_batches_tracked"]) == 2
    assert int(states[-1]["critic.members.1.0.num_batches_tracked"]) == 4


def test_crossq_logs_the_joint_pass_target_loss_gradient_norm_and_the_delayed_actor(monkeypatch, float64):
    """Logged at every update: ``q/target_mean``, ``train/critic_loss``, ``q/data_mean`` and
    ``train/critic_grad_norm`` of the joint pass; ``train/actor_loss`` and ``train/entropy`` only at
    the actor's updates, ``q/policy_mean`` at every update (measured in eval mode otherwise)."""
    from tests.algorithms.test_formulas import use_sgd
    from tests.algorithms.test_logged_metrics import logged_updates, norm_and_sgd_step

    use_sgd(monkeypatch)
    torch.manual_seed(0)
    crossq = module()
    batch = make_batch()
    q, pi = [copy.deepcopy(m) for m in crossq.critic.members], copy.deepcopy(crossq.actor.net)
    rows = logged_updates(crossq, batch, 2).rows
    clips, s, a, s2 = Clips(), batch.obs, batch.act, batch.next_obs
    for k in (1, 2):
        torch.manual_seed(SEED + k - 1)
        noise = torch.randn(2, B, ACT_DIM)
        with torch.no_grad():
            next_act, next_logp = sample(pi, s2, noise[0], train=False, clips=clips)
        both = q_all(q, torch.cat([torch.cat([s, a], -1), torch.cat([s2, next_act], -1)]), train=True, clips=clips)
        y = batch.rew + DISCOUNT * (1.0 - TERMINATED) * (both[:, B:].detach().min(dim=0).values - 2.0 * next_logp)
        loss = weighted_td(both[:, :B], y, WEIGHT)
        row = rows[k]
        assert row["q/target_mean"] == pytest.approx(float(y.mean()), rel=1e-6)
        assert row["train/critic_loss"] == pytest.approx(float(loss), rel=1e-6)
        assert row["q/data_mean"] == pytest.approx(float(both[0, :B].mean()), rel=1e-6)
        assert row["train/critic_grad_norm"] == pytest.approx(norm_and_sgd_step(loss, params(q), LR), rel=1e-6)
        assert ("train/actor_loss" in row) == ("train/entropy" in row) == (k == 2) and "q/policy_mean" in row
    assert rows[1]["train/alpha"] == pytest.approx(2.0) and rows[2]["train/alpha"] != pytest.approx(2.0)


def test_the_joint_pass_normalises_over_the_union_and_differs_from_two_passes():
    """``joint_q`` equals each member's train-mode pass over the concatenated rows and moves the
    running statistics once; two separate train-mode passes (each half normalised by its own
    statistics) give other Q-values."""
    torch.manual_seed(0)
    crossq = module(renorm_warmup_steps=0)
    batch = make_batch()
    next_act = LOW + (HIGH - LOW) * torch.rand(B, ACT_DIM)
    twin = copy.deepcopy(crossq.critic)
    q, q_next = crossq.joint_q(batch.obs, batch.act, batch.next_obs, next_act)
    with torch.no_grad():
        union = torch.stack([m(torch.cat([torch.cat([batch.obs, batch.act], -1),
                                          torch.cat([batch.next_obs, next_act], -1)])).squeeze(-1)
                             for m in copy.deepcopy(twin).train().members])
        apart = (twin.train()(batch.obs, batch.act), twin(batch.next_obs, next_act))
    torch.testing.assert_close(torch.cat([q, q_next], 1).detach(), union)
    assert (q.detach() - apart[0]).abs().max() > 0.05 and (q_next.detach() - apart[1]).abs().max() > 0.05
    assert int(crossq.critic.members[0][0].num_batches_tracked) == 1
    # the critic is back in the mode it was in
    crossq.critic.eval()
    crossq.joint_q(batch.obs, batch.act, batch.next_obs, next_act)
    assert not crossq.critic.training and int(crossq.critic.members[0][0].num_batches_tracked) == 2


def test_the_probe_protocol_and_the_policies_evaluate_in_eval_mode():
    torch.manual_seed(0)
    crossq = module(renorm_warmup_steps=0)
    batch = make_batch()
    crossq.train()
    crossq.joint_q(batch.obs, batch.act, batch.next_obs, batch.act)  # running statistics away from (0, 1)
    crossq.actor(batch.obs)
    state = {k: v.clone() for k, v in crossq.state_dict().items()}
    q = crossq.q_value(batch.obs, batch.act)
    torch.testing.assert_close(crossq.q_network()(batch.obs, batch.act), q)
    assert isinstance(crossq.q_network(), EvalModeQ) and len(crossq.q_networks()) == 2
    # by hand: the first member with its running statistics; one row alone gives its own Q
    with torch.no_grad():
        hand = q_all([crossq.critic.members[0]], torch.cat([batch.obs, batch.act], -1), train=False, clips=Clips())[0]
        torch.testing.assert_close(q, hand)
        torch.testing.assert_close(crossq.q_value(batch.obs[:1], batch.act[:1]), q[:1])
        greedy = crossq.greedy_action(batch.obs)
        torch.testing.assert_close(greedy[:1], crossq.greedy_action(batch.obs[:1]))
    np.testing.assert_allclose(crossq.act(batch.obs.numpy()), greedy.numpy(), rtol=1e-6)
    assert crossq.explore(batch.obs.numpy(), 0).shape == (B, ACT_DIM)
    crossq.next_value(batch)
    check_probe_module(crossq, probe=batch)
    # nothing of it moved a running statistic, and the modes are as they were
    assert crossq.training and crossq.critic.members[0][0].training
    assert all(torch.equal(v, state[k]) for k, v in crossq.state_dict().items())


def test_defaults_are_the_papers_and_arguments_are_checked():
    crossq = CrossQ(obs_dim=3, act_dim=2)
    member = crossq.critic.members[0]
    assert [m.out_features for m in member if isinstance(m, nn.Linear)] == [2048, 2048, 1]
    assert [m.out_features for m in crossq.actor.net if isinstance(m, nn.Linear)] == [256, 256, 4]
    norms = [m for net in (member, crossq.actor.net) for m in net if isinstance(m, BatchRenorm1d)]
    assert len(norms) == 6 and isinstance(member[0], BatchRenorm1d) and isinstance(crossq.actor.net[0], BatchRenorm1d)
    assert {(m.momentum, m.eps, m.warmup_steps, m.r_max, m.d_max) for m in norms} == {(0.01, 1e-3, 100_000, 3.0, 5.0)}
    assert (crossq.critic_lr, crossq.actor_lr, crossq.alpha_lr, crossq.adam_betas) == (1e-3, 1e-3, 1e-3, (0.5, 0.999))
    assert (crossq.policy_delay, crossq.num_q, crossq.gamma, crossq.target_entropy) == (3, 2, 0.99, -2.0)
    assert crossq.target_update is None and crossq.target_pairs() == []
    plain = CrossQ(obs_dim=3, act_dim=2, critic_hidden=(4,), critic_norm=None, actor_norm=None)
    assert not any(isinstance(m, BatchRenorm1d) for m in plain.modules())
    for kwargs, argument in ((dict(policy_delay=0), "policy_delay"), (dict(adam_beta1=1.0), "adam_beta1"),
                             (dict(critic_norm="renorm"), "critic_norm"), (dict(actor_norm="x"), "actor_norm"),
                             (dict(init_alpha=0.0), "init_alpha"), (dict(renorm_momentum=0.0), "renorm_momentum"),
                             (dict(renorm_r_max=0.5), "renorm_r_max"), (dict(renorm_warmup_steps=-1),
                                                                         "renorm_warmup_steps")):
        with pytest.raises(ValueError, match=argument):
            CrossQ(**kwargs)


def test_online_crossq_under_the_monitors(tmp_path):
    """CrossQ on Pendulum with SEEMMonitor and CrashPredictor: the probe runs (eval mode, the
    structured NTK of a BatchRenorm critic), a measurement leaves the statistics alone."""
    from lightning.pytorch.loggers import CSVLogger

    L.seed_everything(0, verbose=False)
    dm = OnlineDataModule("Pendulum-v1", learning_starts=128, batch_size=32, capacity=1000)
    crossq = CrossQ(critic_hidden=(32, 32), actor_hidden=(32, 32), eval_every=0, renorm_warmup_steps=5)
    monitors = [SEEMMonitor(every_n_steps=10, probe_size=64), CrashPredictor(every_n_steps=10, probe_size=64)]
    trainer = fit(crossq, dm, 20, callbacks=monitors, logger=CSVLogger(tmp_path), log_every_n_steps=6)
    assert crossq.updates == trainer.global_step == 20 and dm.rollout.env_steps == 128 + 20
    assert {"seem/max_eig_normalized", "crash/td_error_norm", "train/critic_loss", "train/actor_loss",
            "train/alpha", "rollout/env_steps"} <= set(trainer.callback_metrics)
    # one critic pass per update, one actor pass per third update: acting and probing moved nothing
    assert int(crossq.critic.members[0][0].num_batches_tracked) == 20
    assert int(crossq.actor.net[0].num_batches_tracked) == 6


def test_ddp_runs_the_single_device_update_on_the_union_batch(chain_file, tmp_path):
    """Two ranks with different random streams: identical parameters and running statistics,
    equal to one device's updates on the concatenated batches with rank zero's random draws."""
    run_ddp_script(Path(__file__).with_name("ddp_crossq.py"), chain_file, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
    crossq = CrossQ(obs_dim=CHAIN_STATES, act_dim=1, critic_hidden=(16, 16), actor_hidden=(16, 16), eval_every=0,
                    policy_delay=2, renorm_warmup_steps=1)
    crossq.load_state_dict(r0["init"])
    td_abs, update = [], crossq.update
    crossq.update = lambda batch: td_abs.append(update(batch)) or td_abs[-1]
    unions = [Transitions(*(torch.cat([b0[i], b1[i]]) for i in range(5))) for b0, b1 in zip(r0["batches"], r1["batches"])]
    rng = iter(r0["rng"])

    class RankZeroDraws(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            torch.set_rng_state(next(rng))

    L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu", callbacks=[RankZeroDraws()]).fit(
        crossq, train_dataloaders=DataLoader(unions, batch_size=None))
    moved = False
    for key, value in crossq.state_dict().items():
        torch.testing.assert_close(r0["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        moved |= not torch.equal(value, r0["init"][key])
    assert moved and int(r0["state"]["actor.net.0.num_batches_tracked"]) == 1
    # each rank hands its own rows' |TD error| to its buffer
    for single, first, second in zip(td_abs, r0["td_abs"], r1["td_abs"]):
        assert first.shape == second.shape == (16,)
        torch.testing.assert_close(torch.cat([first, second]), single, rtol=1e-5, atol=1e-6)
