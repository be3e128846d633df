from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lit_qlearn.algorithms import DQN, TD3
from lit_qlearn.callbacks import CrashPredictor, NTKGramCallback, SEEMMonitor
from lit_qlearn.data import OnlineDataModule, Transitions
from lit_qlearn.ntk import ntk_gram
from lit_qlearn.probe import check_probe_module
from lit_qlearn.toys import ChainEnv
from tests.conftest import fit, run_ddp_script

CHAIN = "lit_qlearn.toys:Chain-v0"
GAMMA = 0.9


def chain_dqn(**kwargs):
    options = dict(gamma=GAMMA, hidden=(64, 64), lr=1e-3, target_every=50, epsilon_steps=2000,
                   epsilon_end=0.2, loss="mse", max_grad_norm=None)
    options.update(kwargs)
    return DQN(**options)


def chain_data(**kwargs):
    options = dict(learning_starts=500, batch_size=64, capacity=5000, seed=0)
    options.update(kwargs)
    return OnlineDataModule(CHAIN, **options)


def all_q(module):
    with torch.no_grad():
        return module.q_net(torch.eye(5)).numpy()


@pytest.mark.parametrize("options", [{}, {"prioritized": True}, {"n_step": 3}, {"num_envs": 2, "train_freq": 2,
                                                                                 "gradient_steps": 2}])
def test_online_dqn_learns_the_closed_form_q_of_the_chain(options):
    L.seed_everything(0, verbose=False)
    # n-step returns follow the behaviour policy for n - 1 steps (no off-policy correction), so
    # they estimate Q* only when exploration is rare: epsilon 0.1 there (a random left move
    # within the next two steps, p ~ 0.1, costs ~(1 - gamma^2) Q ~ 0.13: a bias ~ 0.013), and the
    # random prefill is overwritten (capacity 2000 < 4000 new steps).
    nstep = dict(epsilon_end=0.1, epsilon_steps=1000) if "n_step" in options else {}
    module, dm = chain_dqn(**nstep), chain_data(**options, **({"capacity": 2000} if nstep else {}))
    trainer = fit(module, dm, 4000)
    assert module.updates == trainer.global_step == 4000
    # Q*(s, right) = 0.9^(4 - s); Q*(s, left) = 0.9 Q*(max(s-1, 0), right). Episodes are truncated
    # after 8 steps, so a target that cut the bootstrap at truncation would sit far below Q*.
    np.testing.assert_allclose(all_q(module), ChainEnv.optimal_q(GAMMA), atol=0.05)
    assert dm.rollout.env_steps >= 500 + 4000 - options.get("num_envs", 1)


def test_truncation_is_not_termination_in_the_buffer():
    L.seed_everything(0, verbose=False)
    dm = chain_data(learning_starts=200)
    fit(chain_dqn(), dm, 1)
    batch = dm.buffer.sample(len(dm.buffer), generator=torch.Generator().manual_seed(0))
    right_end = (batch.obs[:, 4] == 1) & (batch.act == 1)
    # Only moving right from the last state terminates; everything else (truncations too) bootstraps.
    assert torch.equal(batch.terminated.bool(), right_end)
    assert torch.all(batch.rew == right_end.float())
    # the stored next state is the true one, also where the episode was truncated and reset
    moved = torch.where(batch.act == 1, (batch.obs.argmax(1) + 1).clamp(max=4), (batch.obs.argmax(1) - 1).clamp(min=0))
    assert torch.equal(batch.next_obs.argmax(1), moved)


def test_double_and_plain_next_values_by_hand():
    module = DQN(obs_shape=(3,), num_actions=4, hidden=(8,))
    next_obs = torch.randn(6, 3)
    batch = Transitions(torch.randn(6, 3), torch.zeros(6, dtype=torch.long), torch.ones(6), next_obs,
                        torch.tensor([0.0, 1, 0, 0, 1, 0]))
    with torch.no_grad():
        for p in module.q_target.parameters():  # a target different from the online network
            p.add_(0.3 * torch.randn_like(p))
        online, target = module.q_net(next_obs), module.q_target(next_obs)
        double = target[torch.arange(6), online.argmax(1)]
        torch.testing.assert_close(module.next_value(batch), double)
        torch.testing.assert_close(module.td_target(batch), 1 + 0.99 * (1 - batch.terminated) * double)
        module.double = False
        torch.testing.assert_close(module.next_value(batch), target.max(1).values)


def test_dueling_head_subtracts_the_mean_advantage():
    module = DQN(obs_shape=(3,), num_actions=4, hidden=(8,), dueling=True)
    net, obs = module.q_net, torch.randn(5, 3)
    with torch.no_grad():
        value, advantage = net.value(obs), net.head(obs)
        torch.testing.assert_close(net(obs), value + advantage - advantage.mean(1, keepdim=True))
        # identifiability: the mean of Q over actions is V
        torch.testing.assert_close(net(obs).mean(1), value.squeeze(1))


def test_epsilon_schedule_and_exploration():
    module = DQN(obs_shape=(3,), num_actions=4, epsilon_start=1.0, epsilon_end=0.1, epsilon_steps=100)
    assert [module.epsilon(t) for t in (0, 50, 100, 1000)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
    obs = np.random.default_rng(0).normal(size=(4000, 3)).astype(np.float32)
    greedy = module.act(obs)
    torch.manual_seed(0)
    explored = module.explore(obs, 100)
    # epsilon 0.1: a random action (1/4 of which is the greedy one) 10% of the time -> 7.5% differ
    assert abs(np.mean(explored != greedy) - 0.075) < 0.015
    assert greedy.shape == (4000,) and module.act(obs[0]).shape == ()


def test_action_kind_is_checked_at_setup():
    with pytest.raises(ValueError, match=r"TD3 needs continuous actions, the data has Discrete\(2\)"):
        fit(TD3(eval_every=0), chain_data(), 1)
    from lit_qlearn.data import OfflineDataModule

    with pytest.raises(ValueError, match=r"DQN needs discrete actions, the data has Box\(-1.0, 1.0, \(1,\)\)"):
        fit(DQN(), OfflineDataModule(str(_chain_offline()), normalize_states=False), 1)


def _chain_offline():
    import tempfile

    from lit_qlearn.data import write_d4rl
    from tests.conftest import chain_arrays

    return write_d4rl(Path(tempfile.mkdtemp()) / "chain.hdf5", chain_arrays(episodes=4))


def test_probe_protocol_and_monitors_online(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from lightning.pytorch.loggers import TensorBoardLogger

    L.seed_everything(0, verbose=False)
    module, dm = chain_dqn(), chain_data()
    logger = TensorBoardLogger(tmp_path, name="tb")
    monitors = [SEEMMonitor(every_n_steps=20, probe_size=64), NTKGramCallback(every_n_steps=20, probe_size=64),
                CrashPredictor(every_n_steps=20, probe_size=64)]
    fit(module, dm, 40, logger=logger, log_every_n_steps=20, callbacks=monitors)
    check_probe_module(module, probe=dm.probe_batch(8))
    probe = dm.probe_batch(64)
    with torch.no_grad():
        q = module.q_net(probe.obs)
        torch.testing.assert_close(module.q_value(probe.obs, probe.act), q[torch.arange(64), probe.act])
        torch.testing.assert_close(module.greedy_action(probe.obs), q.argmax(1))
    # the NTK of the gathered scalar: per-sample gradients of Q(s, a) by hand
    grads = []
    for i in range(8):
        module.zero_grad()
        module.q_value(probe.obs[i:i + 1], probe.act[i:i + 1]).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.q_net.parameters()]))
    grads = torch.stack(grads)
    torch.testing.assert_close(ntk_gram(module.q_network(), (probe.obs[:8], probe.act[:8])), grads @ grads.T,
                               rtol=1e-4, atol=1e-5)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"seem/max_eig_normalized", "ntk/row_ratio_mean", "crash/td_error_norm", "rollout/env_steps",
            "train/critic_loss"} <= tags
    assert [e.step for e in events.Scalars("seem/max_eig_normalized")] == [20, 40]
    assert [e.step for e in events.Scalars("rollout/env_steps")] == [20, 40]
    # one environment step per update after the 500 random ones
    assert [e.value for e in events.Scalars("rollout/env_steps")] == [520, 540]


def test_ddp_two_cpu_processes_online_dqn(tmp_path):
    run_ddp_script(Path(__file__).with_name("ddp_dqn.py"), tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["updates"] == r1["updates"] == r0["global_step"] == 30
    assert torch.equal(r0["params"], r1["params"])
    # each rank stepped its own environments with its own seed into its own buffer
    assert not torch.equal(r0["buffer_obs"], r1["buffer_obs"])
    # and every rank measured SEEM on rank zero's probe set
    assert r0["seem"] == r1["seem"]


@pytest.mark.slow
def test_cartpole_reaches_475():
    """The zoo settings (benchmarks/online_dqn.py): a greedy evaluation over 10 episodes
    after every other training phase reaches a mean return of 475 within 50k steps."""
    from lit_qlearn.data.rollout import make_vector_env, run_episodes

    L.seed_everything(1, verbose=False)
    dm = OnlineDataModule("CartPole-v1", learning_starts=1000, batch_size=64, train_freq=256, gradient_steps=128,
                          seed=1)
    module = DQN(lr=2.3e-3, target_every=128, epsilon_end=0.04, epsilon_steps=8000, double=False)
    env, best = make_vector_env("CartPole-v1"), []

    class Evaluate(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if pl_module.updates % 256 == 0:
                best.append(float(np.mean(run_episodes(env, pl_module.act, 10, seed=pl_module.updates)[0])))
                trainer.should_stop = best[-1] >= 475 or dm.rollout.env_steps >= 50_000

    fit(module, dm, 10 ** 6, callbacks=[Evaluate()])
    assert max(best) >= 475 and dm.rollout.env_steps <= 50_000 + 256


def test_atari_smoke():
    pytest.importorskip("ale_py")
    L.seed_everything(0, verbose=False)
    dm = OnlineDataModule("ALE/Pong-v5", env_wrapper="atari", learning_starts=64, batch_size=32, capacity=1000)
    module = DQN(hidden=(64,), target_every=10)
    fit(module, dm, 5)
    assert module.spec.obs_shape == (4, 84, 84) and module.spec.obs_dtype == "uint8"
    assert dm.buffer.sample(4).obs.dtype == torch.uint8
    assert module.updates == 5 and module.act(dm.rollout.obs).shape == (1,)


def test_batchnorm_and_dropout_q_networks_explore_in_eval_mode():
    L.seed_everything(0, verbose=False)
    dm = chain_data(learning_starts=64, batch_size=32)
    module = chain_dqn(norm="batch", dropout=0.1, epsilon_start=0.0, epsilon_end=0.0)
    seen = []
    explore = module.explore

    def recording(obs, env_step):
        seen.append(module.q_net.training)
        return explore(obs, env_step)

    module.explore = recording
    fit(module, dm, 5)  # one environment, so a train-mode BatchNorm would fail on a batch of one
    assert seen and not any(seen) and module.q_net.training  # back in train mode for the updates


def test_spec_mismatch_names_the_field_that_differs():
    pytest.importorskip("ale_py")
    module = DQN(obs_shape=(4, 84, 84), num_actions=6, hidden=(8,))
    dm = OnlineDataModule("ALE/Pong-v5", env_wrapper="atari", learning_starts=64, batch_size=32, capacity=100)
    with pytest.raises(ValueError, match=r"obs_dtype='float32' vs 'uint8'"):
        fit(module, dm, 1)
    fit(DQN(obs_shape=(4, 84, 84), num_actions=6, obs_dtype="uint8", hidden=(8,)), dm, 1)  # matches


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_importance_weights_reach_the_loss(scale):
    L.seed_everything(0, verbose=False)
    dm = chain_data(learning_starts=64, batch_size=32, prioritized=True)
    module = chain_dqn()
    next_batch = dm.next_batch
    dm.next_batch = lambda: (lambda b: b._replace(weight=b.weight * scale))(next_batch())
    module.build_for(dm.spec)
    before = [p.detach().clone() for p in module.q_net.parameters()]
    fit(module, dm, 1)
    moved = any(not torch.equal(a, b) for a, b in zip(before, module.q_net.parameters()))
    assert moved == (scale > 0)  # zero weights: zero gradient, and Adam's first step is then zero
