import math

import lightning as L
import numpy as np
import pytest
import torch

from lit_qlearn.algorithms import IQL
from lit_qlearn.algorithms.iql import CosineToZero, expectile_loss
from lit_qlearn.data import OfflineDataModule, write_d4rl
from lit_qlearn.networks import GaussianActor
from lit_qlearn.probe import check_probe_module
from tests.algorithms.test_td3 import chain_grid
from tests.conftest import CHAIN_STATES, chain_q, fit

SMALL = dict(critic_hidden=(64, 64), actor_hidden=(64, 64), critic_lr=1e-3, value_lr=1e-3, target_tau=0.05,
             eval_every=0)


def test_expectile_loss_against_a_hand_computation():
    u = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0])
    # weights |0.7 - 1(u < 0)| = 0.3, 0.3, 0.7, 0.7, 0.7: (0.3*4 + 0.3*0.25 + 0 + 0.7*1 + 0.7*9) / 5
    assert expectile_loss(u, 0.7).item() == pytest.approx(8.275 / 5)
    assert expectile_loss(u, 0.5).item() == pytest.approx(0.5 * u.pow(2).mean().item())  # tau = 0.5: half the MSE


@pytest.mark.parametrize("tau", [0.5, 0.7, 0.99])
def test_expectile_loss_is_minimised_at_the_sample_expectile(tau):
    # sample {0, 0, 0, 1}: for 0 < m < 1 the stationarity condition tau (1 - m) = (1 - tau) 3m gives
    # m = tau / (tau + 3 (1 - tau)): the mean 0.25 at 0.5, 0.4375 at 0.7, 0.9706 at 0.99 (-> max 1 as tau -> 1)
    x = torch.tensor([0.0, 0.0, 0.0, 1.0])
    m = tau / (tau + 3 * (1 - tau))
    v = torch.tensor(m, requires_grad=True)
    expectile_loss(x - v, tau).backward()
    assert abs(v.grad.item()) < 1e-6
    for shift, sign in ((-0.01, -1.0), (0.01, 1.0)):  # convex: the gradient changes sign across m
        v = torch.tensor(m + shift, requires_grad=True)
        expectile_loss(x - v, tau).backward()
        assert np.sign(v.grad.item()) == sign


def one_state_bandit(path):
    """One state, four actions taken equally often, reward = action, every step terminal:
    Q(s, a) = a exactly, V(s) = the tau-expectile of {-1, -1/3, 1/3, 1}."""
    a = np.tile(np.array([-1, -1 / 3, 1 / 3, 1], np.float32), 100)
    return write_d4rl(path, {"observations": np.ones((400, 1), np.float32), "actions": a[:, None],
                             "rewards": a.copy(), "terminals": np.ones(400, bool)})


@pytest.mark.parametrize("tau, expectile", [(0.5, 0.0), (0.7, 4 / 15), (0.99, 0.98 / 1.02)])
def test_value_learns_the_expectile_and_the_actor_the_advantage_weighted_mean(tmp_path, tau, expectile):
    # tau-expectile m of {-1, -1/3, 1/3, 1}: 0.7 -> for -1/3 < m < 1/3, 0.7 (4/3 - 2m) = 0.3 (2m + 4/3): m = 4/15;
    # 0.99 -> for 1/3 < m < 1, 0.99 (1 - m) = 0.01 (3m + 1): m = 0.98 / 1.02 = 0.961, near the max 1
    L.seed_everything(0, verbose=False)
    dm = OfflineDataModule(str(one_state_bandit(tmp_path / "bandit.hdf5")), batch_size=256, normalize_states=False,
                           seed=0, steps_per_epoch=100)
    module = IQL(obs_dim=1, act_dim=1, expectile=tau, actor_lr=3e-3, **SMALL)
    fit(module, dm, 800)
    s, a = torch.ones(4, 1), torch.tensor([[-1.0], [-1 / 3], [1 / 3], [1.0]])
    with torch.no_grad():
        np.testing.assert_allclose(module.q_value(s, a).numpy(), a.ravel().numpy(), atol=0.01)
        assert module.state_value(s[:1]).item() == pytest.approx(expectile, abs=0.05)
        mean, std = module.greedy_action(s[:1]).item(), module.actor.log_std.exp().item()
    # the Gaussian maximising sum_i w_i log N(a_i) with w_i = exp(3 (a_i - V)) (no clip reached) has the
    # weighted mean and std of the actions, whatever V: 0.8965 and 0.2794
    actions = np.array([-1, -1 / 3, 1 / 3, 1])
    w = np.exp(3.0 * actions)
    w_mean = (w * actions).sum() / w.sum()
    w_std = math.sqrt((w * (actions - w_mean) ** 2).sum() / w.sum())
    assert (round(w_mean, 4), round(w_std, 4)) == (0.8965, 0.2794)
    assert mean == pytest.approx(w_mean, abs=0.04) and std == pytest.approx(w_std, abs=0.01)


def test_iql_learns_the_closed_form_q_of_the_chain(chain_file):
    # Q of the chain is the same for every action, so V (any expectile of it) = Q and
    # Q -> r + gamma V(s') is the closed form (1 - gamma^(K-k)) / (1 - gamma)
    L.seed_everything(0, verbose=False)
    dm = OfflineDataModule(str(chain_file), batch_size=64, normalize_states=False, seed=0, steps_per_epoch=100)
    module = IQL(obs_dim=CHAIN_STATES, act_dim=1, gamma=0.9, actor_lr=1e-3, actor_lr_cosine_steps=1000, **SMALL)
    trainer = fit(module, dm, 800)
    obs, act = chain_grid()
    with torch.no_grad():
        q = module.q_value(obs, act).view(CHAIN_STATES, 21).numpy()
        v = module.state_value(torch.eye(CHAIN_STATES)).numpy()
    np.testing.assert_allclose(q, np.repeat(chain_q(0.9)[:, None], 21, 1), atol=0.05)
    np.testing.assert_allclose(v, chain_q(0.9), atol=0.05)
    assert module.updates == trainer.global_step == 800
    # the actor's learning rate follows CORL's cosine, T = 1000: stepped after each of the 800 actor
    # steps, the optimiser holds the rate of update 801
    actor_optimizer = trainer.optimizers[module._optimizer_names.index("actor")]
    assert actor_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 800 / 1000)))
    assert module._optimizer_names == ["critic", "actor", "value"]


def cosine(lr, steps, update):
    """CORL's rate in update ``update`` (1-based): ``lr (1 + cos(pi (update - 1) / T)) / 2``, 0 after T updates."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(update - 1, steps) / steps))


def test_cosine_to_zero_is_the_closed_form_and_stays_at_zero():
    params = [torch.zeros(1, requires_grad=True)]
    optimizer = torch.optim.SGD(params, lr=2e-3)
    schedule = CosineToZero(optimizer, T_max=1000)
    rates = []
    for _ in range(1500):  # torch's cosine would rise again after 1000 steps
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    expected = [cosine(2e-3, 1000, u) for u in range(1, 1501)]
    assert rates == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert rates[1000:] == [0.0] * 500 and rates[500] == pytest.approx(1e-3)


def test_the_actor_steps_at_the_cosine_rate_logs_it_and_resumes_it(chain_file, tmp_path):
    """In every update the actor's optimiser steps at CORL's rate for that update (the
    scheduler steps once per actor step), ``train/actor_lr`` logs it, and a fit resumed
    from a checkpoint continues the schedule where it was."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    lr, steps = 1e-3, 4
    used, logged = [], []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            used.append(pl_module.optimizer("actor").param_groups[0]["lr"])

        def on_train_batch_end(self, trainer, pl_module, *args):
            logged.append(float(trainer.callback_metrics["train/actor_lr"]))

    def run(name, ckpt_path=None):
        L.seed_everything(0, verbose=False)
        dm = OfflineDataModule(str(chain_file), batch_size=16, normalize_states=False, seed=0, steps_per_epoch=100)
        module = IQL(obs_dim=CHAIN_STATES, act_dim=1, critic_hidden=(8,), actor_hidden=(8,), actor_lr=lr,
                     actor_lr_cosine_steps=steps, eval_every=0)
        checkpoints = ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=3, save_top_k=-1, filename="{step}")
        fit(module, dm, 7, ckpt_path=ckpt_path, callbacks=[Record(), checkpoints], logger=CSVLogger(tmp_path / name),
            log_every_n_steps=1, enable_checkpointing=True)

    run("whole")
    expected = [cosine(lr, steps, u) for u in range(1, 8)]
    assert expected[1] < expected[0] and expected[steps:] == [0.0] * 3
    assert used == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert logged == pytest.approx(used, rel=1e-6)  # logged in float32
    used.clear()
    run("resumed", ckpt_path=tmp_path / "whole" / "step=3.ckpt")
    assert used == pytest.approx(expected[3:], rel=1e-9, abs=1e-15)
    # a checkpoint written before the schedule was a scheduler: no scheduler state, and the actor's
    # rate set by hand to that of its last update
    ckpt = torch.load(tmp_path / "whole" / "step=3.ckpt", weights_only=True)
    ckpt["lr_schedulers"] = []
    group = ckpt["optimizer_states"][1]["param_groups"][0]  # critic, actor, value
    del group["initial_lr"]
    group["lr"] = cosine(lr, steps, 3)
    torch.save(ckpt, tmp_path / "old.ckpt")
    used.clear()
    run("old", ckpt_path=tmp_path / "old.ckpt")
    assert used == pytest.approx(expected[3:], rel=1e-9, abs=1e-15)


def test_iql_networks_probe_protocol_and_defaults():
    module = IQL(obs_dim=3, act_dim=2, critic_norm="layer", action_low=-2.0, action_high=2.0)
    # the V-network is the critic's mlp over the state, LayerNorm included, and a child network
    # (QLearningModule.compile_all compiles every child with parameters)
    layers = [type(m).__name__ for m in module.value]
    assert layers == [type(m).__name__ for m in module.critic.members[0]] and layers.count("LayerNorm") == 2
    assert module.value[0].in_features == 3 and any(child is module.value for child in module.children())
    assert isinstance(module.actor, GaussianActor)
    assert {id(online) for online, _ in module.target_pairs()} == {id(module.critic)}  # no actor or V target
    check_probe_module(module)
    obs = torch.randn(6, 3)
    with torch.no_grad():
        torch.testing.assert_close(module.greedy_action(obs), module.actor(obs))  # the mean action
        np.testing.assert_allclose(module.act(obs.numpy()), module.actor(obs).numpy())
        assert module.greedy_action(obs).abs().max() < 2.0
    hp = module.hparams
    assert (hp.expectile, hp.beta, hp.max_weight, hp.value_lr, hp.actor_lr, hp.critic_lr, hp.target_tau, hp.gamma,
            hp.actor_lr_cosine_steps, tuple(hp.critic_hidden)) == (0.7, 3.0, 100.0, 3e-4, 3e-4, 3e-4, 0.005, 0.99,
                                                                   1_000_000, (256, 256))


def test_compile_reaches_the_value_network(monkeypatch):
    # compile_all wraps every child network's forward with torch.compile (here a stand-in
    # that returns the function unchanged, so nothing is compiled for real)
    monkeypatch.setattr(torch, "compile", lambda fn, *args, **kwargs: fn)
    module = IQL(obs_dim=3, act_dim=2, critic_hidden=(8,), actor_hidden=(8,), compile=True)
    assert module.compile_networks and module.hparams.compile is True
    assert module.compile_all()
    for net in (module.value, module.critic, module.critic_target, module.actor):
        assert net._compiled_call_impl is not None


def test_gaussian_actor_log_prob_is_the_unsquashed_normal():
    torch.manual_seed(0)
    actor = GaussianActor(3, 2, -2.0, 2.0, hidden=(8,))
    with torch.no_grad():
        actor.log_std.copy_(torch.tensor([-0.5, 0.3]))
    obs, act = torch.randn(5, 3), torch.tensor([[2.0, -2.0]] * 5)  # on the bounds: finite
    with torch.no_grad():
        mean = 2.0 * actor.net(obs)  # the mlp ends in tanh; bounds [-2, 2]
        std = torch.tensor([math.exp(-0.5), math.exp(0.3)])
        expected = (-0.5 * ((act - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)
        torch.testing.assert_close(actor.log_prob(obs, act), expected)


@pytest.mark.parametrize("kwargs, match", [
    (dict(expectile=1.0), "expectile must be a number in \\(0, 1\\)"),
    (dict(expectile=0.0), "expectile"),
    (dict(beta=-1.0), "beta must be a number >= 0"),
    (dict(max_weight=0), "max_weight must be a number > 0"),
    (dict(value_lr="fast"), "value_lr"),
    (dict(actor_lr_cosine_steps=0), "actor_lr_cosine_steps must be None or an integer >= 1"),
    (dict(log_std_min=2.0, log_std_max=1.0), "log_std_max must be a number > log_std_min"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=f"IQL: {match}"):
        IQL(obs_dim=3, act_dim=1, **kwargs)
