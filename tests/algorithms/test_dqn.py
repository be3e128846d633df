import inspect
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lit_qlearn.algorithms import DQN, TD3
from lit_qlearn.algorithms import dqn as dqn_module
from lit_qlearn.callbacks import CrashPredictor, NTKGramCallback, SEEMMonitor
from lit_qlearn.data import OnlineDataModule, Transitions
from lit_qlearn.ntk import ntk_gram
from lit_qlearn.probe import check_probe_module
from lit_qlearn.toys import ChainEnv
from tests.conftest import fit, run_ddp_script

CHAIN = "lit_qlearn.toys:Chain-v0"
GAMMA = 0.9


def chain_dqn(**kwargs):
    options = dict(gamma=GAMMA, critic_hidden=(64, 64), critic_lr=1e-3, target_every=50, epsilon_steps=2000,
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


def _mlp_by_hand(weights, x):
    """``Linear -> ReLU -> ... -> Linear`` written out: ``weights`` is ``[W1, b1, W2, b2, ...]``."""
    layers = list(zip(weights[::2], weights[1::2]))
    for i, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if i < len(layers) - 1:
            x = x.clamp(min=0.0)
    return x


def _fixed_dqn(seed=8, **kwargs):
    """A tiny DQN (3 -> 6 -> 4) whose online and target networks hold independent seeded
    weights, so their argmaxes disagree, and a batch of 8 rows: terminal rows 1 and 4,
    time-limit truncations at rows 2 and 5 (not terminal: they bootstrap like any other
    row), n-step discounts gamma^k with k = 1, 2, 3, and importance weights far from 1."""
    g = torch.Generator().manual_seed(seed)
    module = DQN(obs_shape=(3,), num_actions=4, critic_hidden=(6,), gamma=0.9, **kwargs)
    with torch.no_grad():
        for net in (module.q_net, module.q_target):
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    batch = Transitions(
        obs=torch.randn(8, 3, generator=g), act=torch.tensor([0, 1, 2, 3, 3, 2, 1, 0]),
        rew=2.0 * torch.randn(8, generator=g), next_obs=1.5 * torch.randn(8, 3, generator=g),
        terminated=torch.tensor([0.0, 1, 0, 0, 1, 0, 0, 0]),
        discount=torch.tensor([0.9, 0.81, 0.729, 0.9, 0.81, 0.729, 0.9, 0.81]),
        weight=torch.tensor([1.0, 0.2, 0.5, 1.0, 0.7, 0.3, 0.9, 0.1]))
    return module, batch


def test_double_and_plain_next_values_by_hand():
    module, batch = _fixed_dqn()
    with torch.no_grad():
        online = _mlp_by_hand([p.clone() for p in module.q_net.parameters()], batch.next_obs)
        target = _mlp_by_hand([p.clone() for p in module.q_target.parameters()], batch.next_obs)
    rows = torch.arange(8)
    double = target[rows, online.argmax(1)]  # van Hasselt et al.: online network picks, target values
    plain = target.max(1).values
    # The test can tell "argmax of the online network" from "argmax of the target": they differ
    # on most rows, and there the two values are far apart.
    disagree = online.argmax(1) != target.argmax(1)
    assert disagree.sum() >= 6 and ((plain - double).abs()[disagree] > 0.1).all()
    torch.testing.assert_close(module.next_value(batch), double)
    # y = r + gamma^k (1 - terminated) V(s'): the terminal rows keep r alone; truncated rows bootstrap
    y = batch.rew + batch.discount * (1 - batch.terminated) * double
    torch.testing.assert_close(module.td_target(batch), y)
    assert torch.equal(module.td_target(batch)[[1, 4]], batch.rew[[1, 4]])
    # without a discount column the module's gamma discounts one step
    torch.testing.assert_close(module.td_target(batch._replace(discount=None)),
                               batch.rew + 0.9 * (1 - batch.terminated) * double)
    module.double = False
    torch.testing.assert_close(module.next_value(batch), plain)
    torch.testing.assert_close(module.td_target(batch), batch.rew + batch.discount * (1 - batch.terminated) * plain)


def _adam_step_by_hand(params, grads, state, t, lr, eps, betas=(0.9, 0.999)):
    """Kingma & Ba's Algorithm 1, step ``t`` (1-based), in place on ``params``."""
    b1, b2 = betas
    for p, g, (m, v) in zip(params, grads, state):
        m.mul_(b1).add_((1 - b1) * g)
        v.mul_(b2).add_((1 - b2) * g * g)
        p.sub_(lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps))


@pytest.mark.parametrize("loss", ["huber", "mse"])
def test_whole_update_matches_a_hand_reference(loss):
    """Two updates through the Trainer against the same two updates written out: the
    double-Q target, the weighted Huber / squared loss, autograd, the global-norm clip
    (binding), Adam. Adam's eps is large enough that the step depends on the gradient's
    size (a first Adam step is otherwise ~lr * sign(g), blind to the clip)."""
    from torch.utils.data import DataLoader

    lr, eps, max_norm = 0.05, 0.05, 0.3
    module, batch = _fixed_dqn(loss=loss, critic_lr=lr, adam_eps=eps, max_grad_norm=max_norm, double=True)
    params = [p.detach().clone() for p in module.q_net.parameters()]
    target = [p.detach().clone() for p in module.q_target.parameters()]
    unclipped = [p.clone() for p in params]
    state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    state_unclipped = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    rows = torch.arange(8)

    def grads_at(weights):
        weights = [w.clone().requires_grad_(True) for w in weights]
        with torch.no_grad():
            a_next = _mlp_by_hand(weights, batch.next_obs).argmax(1)
            y = batch.rew + batch.discount * (1 - batch.terminated) * _mlp_by_hand(target, batch.next_obs)[rows, a_next]
        delta = _mlp_by_hand(weights, batch.obs)[rows, batch.act] - y
        if loss == "huber":  # smooth L1, threshold 1
            per_sample = torch.where(delta.abs() < 1, 0.5 * delta**2, delta.abs() - 0.5)
        else:
            per_sample = delta**2
        grads = torch.autograd.grad((batch.weight * per_sample).mean(), weights)
        return grads, delta.detach()

    for t in (1, 2):
        grads, delta = grads_at(params)
        if t == 1:  # both Huber regimes are exercised
            assert (delta.abs() > 1).any() and (delta.abs() < 1).any()
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        assert norm > 2 * max_norm  # the clip binds
        _adam_step_by_hand(params, [g * max_norm / (norm + 1e-6) for g in grads], state, t, lr, eps)
        _adam_step_by_hand(unclipped, grads_at(unclipped)[0], state_unclipped, t, lr, eps)

    loader = DataLoader([batch, batch], batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, train_dataloaders=loader)
    assert module.updates == 2
    for got, want, other in zip(module.q_net.parameters(), params, unclipped):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    # the reference without the clip lands elsewhere: the comparison sees the clip
    assert max((a - b).abs().max() for a, b in zip(params, unclipped)) > 1e-3
    # the target network did not move (a hard copy every 1000 updates)
    for got, want in zip(module.q_target.parameters(), target):
        assert torch.equal(got, want)


def test_dueling_head_by_hand():
    g = torch.Generator().manual_seed(1)
    module = DQN(obs_shape=(3,), num_actions=4, critic_hidden=(5,), dueling=True)
    net = module.q_net
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        obs = torch.randn(6, 3, generator=g)
        value = _mlp_by_hand([p.clone() for p in net.value.parameters()], obs)  # (6, 1)
        advantage = _mlp_by_hand([p.clone() for p in net.head.parameters()], obs)  # (6, 4)
        assert advantage.mean(1).abs().min() > 0.05  # the mean subtraction matters on every row
        q = value + advantage - advantage.mean(1, keepdim=True)  # Wang et al. Eq. (9)
        torch.testing.assert_close(net(obs), q)
        torch.testing.assert_close(module.q_value(obs, torch.tensor([0, 1, 2, 3, 0, 1])), q[torch.arange(6),
                                                                                         [0, 1, 2, 3, 0, 1]])
        torch.testing.assert_close(module.greedy_action(obs), q.argmax(1))


def test_epsilon_schedule_by_hand_at_several_env_steps():
    module = DQN(obs_shape=(3,), num_actions=4, critic_hidden=(8,), epsilon_start=0.8, epsilon_end=0.1,
                 epsilon_steps=250)
    # eps(t) = 0.8 + min(1, t / 250) (0.1 - 0.8)
    steps = [0, 1, 60, 125, 249, 250, 251, 10**6]
    assert [module.epsilon(t) for t in steps] == pytest.approx([0.8, 0.7972, 0.632, 0.45, 0.1028, 0.1, 0.1, 0.1])
    obs = np.random.default_rng(0).normal(size=(6000, 3)).astype(np.float32)
    greedy = module.act(obs)
    assert len(np.unique(greedy)) > 1  # so "differs from greedy" is not "differs from one action"
    torch.manual_seed(0)
    for t, eps in [(60, 0.632), (125, 0.45)]:
        # a uniformly random action with probability eps, which differs from the greedy one 3/4 of the time
        assert abs(np.mean(module.explore(obs, t) != greedy) - 0.75 * eps) < 0.02


def test_dueling_head_subtracts_the_mean_advantage():
    module = DQN(obs_shape=(3,), num_actions=4, critic_hidden=(8,), dueling=True)
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


def test_exploration_at_epsilon_one_is_uniform_and_never_runs_the_network():
    """While epsilon is 1 the greedy action is not needed: no forward pass (and, on a GPU,
    no device sync to find that out); the actions are uniform over the action set."""
    module = DQN(obs_shape=(3,), num_actions=4, epsilon_start=1.0, epsilon_end=0.1, epsilon_steps=100)
    obs = np.random.default_rng(0).normal(size=(8000, 3)).astype(np.float32)
    module.q_net.register_forward_hook(lambda *_: pytest.fail("the Q-network ran at epsilon 1"))
    torch.manual_seed(0)
    counts = np.bincount(module.explore(obs, 0), minlength=4)
    assert counts.sum() == 8000 and np.all(np.abs(counts / 8000 - 0.25) < 0.02)


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
    module = DQN(critic_lr=2.3e-3, target_every=128, epsilon_end=0.04, epsilon_steps=8000, double=False)
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
    module = DQN(critic_hidden=(64,), target_every=10)
    fit(module, dm, 5)
    assert module.spec.obs_shape == (4, 84, 84) and module.spec.obs_dtype == "uint8"
    assert dm.buffer.sample(4).obs.dtype == torch.uint8
    assert module.updates == 5 and module.act(dm.rollout.obs).shape == (1,)


def test_batchnorm_and_dropout_q_networks_explore_in_eval_mode():
    L.seed_everything(0, verbose=False)
    dm = chain_data(learning_starts=64, batch_size=32)
    module = chain_dqn(critic_norm="batch", critic_dropout=0.1, epsilon_start=0.0, epsilon_end=0.0)
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
    module = DQN(obs_shape=(4, 84, 84), num_actions=6, critic_hidden=(8,))
    dm = OnlineDataModule("ALE/Pong-v5", env_wrapper="atari", learning_starts=64, batch_size=32, capacity=100)
    with pytest.raises(ValueError, match=r"obs_dtype='float32' vs 'uint8'"):
        fit(module, dm, 1)
    fit(DQN(obs_shape=(4, 84, 84), num_actions=6, obs_dtype="uint8", critic_hidden=(8,)), dm, 1)  # matches


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


def test_act_and_explore_normalise_raw_states_like_the_training_data(tmp_path):
    """Trained on normalised states, the policies take raw environment states: act and
    explore must feed (s - mean) / (std + 1e-3) (the data's statistics, TD3+BC's
    epsilon) to the Q-network, which a raw state would put far off its training range."""
    from lit_qlearn.data import OfflineDataModule, write_d4rl

    rng = np.random.default_rng(0)
    obs = (rng.normal(size=(400, 3)) * [3.0, 0.5, 2.0] + [5.0, -4.0, 1.0]).astype(np.float32)
    path = write_d4rl(tmp_path / "discrete.hdf5", {
        "observations": obs, "actions": rng.integers(0, 4, size=400), "rewards": rng.normal(size=400).astype(np.float32),
        "terminals": np.zeros(400, dtype=bool)})
    L.seed_everything(0, verbose=False)
    module = DQN(critic_hidden=(16,), epsilon_start=0.0, epsilon_end=0.0)
    fit(module, OfflineDataModule(str(path), batch_size=32, normalize_states=True), 1)
    # D4RL's qlearning_dataset drops the last row (no next state): the statistics of rows 0..398
    kept = obs[:-1].astype(np.float64)
    mean, std = kept.mean(0), kept.std(0) + 1e-3
    raw = (rng.normal(size=(500, 3)) * [3.0, 0.5, 2.0] + [5.0, -4.0, 1.0]).astype(np.float32)
    with torch.no_grad():
        by_hand = module.q_net(torch.as_tensor((raw - mean) / std, dtype=torch.float32)).argmax(1).numpy()
        unnormalised = module.q_net(torch.as_tensor(raw)).argmax(1).numpy()
    assert np.mean(by_hand != unnormalised) > 0.2  # feeding raw states would change many actions
    assert np.array_equal(module.act(raw), by_hand)
    assert np.array_equal(module.explore(raw, 10**6), by_hand)  # epsilon 0: the greedy action
    assert module.act(raw[0]) == by_hand[0]


def test_plain_dqn_target_equals_stable_baselines3s(monkeypatch):
    """A second, independent reference: SB3's DQN regresses Q(s, a) on
    ``r + (1 - done) * discount * max_a Q'(s', a)``, our ``double=False`` target. Both get
    the same weights and batch (terminal rows, n-step discounts); SB3's target is read
    from its own training step."""
    pytest.importorskip("stable_baselines3")
    import types

    import gymnasium as gym
    from stable_baselines3 import DQN as SB3DQN
    from stable_baselines3.common.buffers import ReplayBufferSamples
    from stable_baselines3.common.logger import configure

    obs_dim, actions, b = 4, 3, 8

    class Env(gym.Env):
        observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        action_space = gym.spaces.Discrete(actions)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return np.zeros(obs_dim, np.float32), {}

        def step(self, action):
            return np.zeros(obs_dim, np.float32), 0.0, False, False, {}

    torch.manual_seed(0)
    model = SB3DQN("MlpPolicy", Env(), policy_kwargs=dict(net_arch=[16]), gamma=GAMMA, learning_starts=0,
                   buffer_size=10, device="cpu", seed=0)
    module = DQN(obs_shape=(obs_dim,), num_actions=actions, gamma=GAMMA, critic_hidden=(16,), double=False,
                 eval_every=0)
    with torch.no_grad():
        for p in model.q_net_target.parameters():  # a target network that differs from the online one
            p.add_(0.5 * torch.randn(p.shape))
        module.q_net.head.load_state_dict(model.q_net.q_net.state_dict())
        module.q_target.head.load_state_dict(model.q_net_target.q_net.state_dict())
    g = torch.Generator().manual_seed(3)
    batch = Transitions(obs=torch.randn(b, obs_dim, generator=g), act=torch.randint(actions, (b,), generator=g),
                        rew=torch.randn(b, generator=g), next_obs=torch.randn(b, obs_dim, generator=g),
                        terminated=torch.tensor([0, 1, 0, 0, 1, 0, 0, 0], dtype=torch.float32),
                        discount=torch.tensor([GAMMA, GAMMA, GAMMA**2, GAMMA**3, GAMMA, GAMMA, GAMMA**2, GAMMA]))
    seen = []
    real_f = __import__("stable_baselines3.dqn.dqn", fromlist=["F"]).F

    def smooth_l1_loss(current, target, *args, **kwargs):
        seen.append(target.detach().clone())
        return real_f.smooth_l1_loss(current, target, *args, **kwargs)

    samples = ReplayBufferSamples(batch.obs, batch.act[:, None], batch.next_obs, batch.terminated[:, None],
                                  batch.rew[:, None], batch.discount[:, None])
    model.set_logger(configure(None, []))
    monkeypatch.setattr(model.replay_buffer, "sample", lambda *args, **kwargs: samples)
    monkeypatch.setattr("stable_baselines3.dqn.dqn.F", types.SimpleNamespace(smooth_l1_loss=smooth_l1_loss))
    model.train(gradient_steps=1, batch_size=b)
    (expected,) = seen
    y = module.td_target(batch)
    torch.testing.assert_close(y, expected.squeeze(-1), rtol=1e-6, atol=1e-6)
    assert (y - batch.rew)[batch.terminated == 0].abs().min() > 0.05  # the bootstrap matters on every live row
    # and the comparison can tell the two DQN targets apart: double-Q's differs here
    module.double = True
    assert (module.td_target(batch) - y).abs().max() > 0.05


# ------------------------------------------- gaps found by planting bugs in the update lines
def test_the_update_hands_its_td_errors_to_the_prioritised_buffer():
    """After an update, the DataModule's ``update_priorities`` receives the batch's buffer
    slots and the per-sample ``|y - Q(s, a)|`` of that update (the Q before the step, the
    double-Q target), which the prioritised buffer turns into new priorities."""
    from torch.utils.data import DataLoader

    module, batch = _fixed_dqn(critic_lr=0.05)
    batch = batch._replace(index=torch.tensor([7, 3, 11, 0, 5, 2, 9, 4]))
    rows = torch.arange(8)
    with torch.no_grad():
        online = [p.clone() for p in module.q_net.parameters()]
        target = [p.clone() for p in module.q_target.parameters()]
        a_next = _mlp_by_hand(online, batch.next_obs).argmax(1)
        y = batch.rew + batch.discount * (1 - batch.terminated) * _mlp_by_hand(target, batch.next_obs)[rows, a_next]
        expected = (y - _mlp_by_hand(online, batch.obs)[rows, batch.act]).abs()
    assert expected.min() > 0.05 and expected.max() > 2 * expected.min()
    calls = []

    class Prioritised(L.LightningDataModule):
        spec, weighted = module.spec, True

        def train_dataloader(self):
            return DataLoader([batch], batch_size=None, collate_fn=lambda b: b)

        def update_priorities(self, index, td_abs):
            calls.append((index.clone(), td_abs.detach().clone()))

    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(module, datamodule=Prioritised())
    assert len(calls) == 1
    index, td_abs = calls[0]
    assert torch.equal(index, batch.index)
    torch.testing.assert_close(td_abs, expected)


# ------------------------------------------------- the arguments renamed to the actor-critics' names
OLD_AND_NEW = [("hidden", "critic_hidden", (7,)), ("activation", "critic_activation", "tanh"),
               ("norm", "critic_norm", "layer"), ("norm_layers", "critic_norm_layers", (0,)),
               ("norm_affine", "critic_norm_affine", False), ("weight_norm", "critic_weight_norm", True),
               ("dropout", "critic_dropout", 0.25), ("lr", "critic_lr", 3e-3)]  # values other than the defaults


def _dqn(**kwargs):
    """A sized DQN with two normalised hidden layers, so every head option shows in its layers."""
    options = dict(obs_shape=(3,), num_actions=2, critic_hidden=(4, 4), critic_norm="batch")
    options.update(kwargs)
    if "hidden" in kwargs or "norm" in kwargs:  # the old name replaces the new one
        options.pop("critic_" + next(k for k in ("hidden", "norm") if k in kwargs))
    return DQN(**options)


def _described(module):
    """What the options build: the Q-head's layers and the optimiser's learning rate."""
    return [repr(layer) for layer in module.q_net.head], module.build_optimizers()["critic"].param_groups[0]["lr"]


@pytest.mark.parametrize("old, new, value", OLD_AND_NEW)
def test_an_old_argument_name_warns_naming_the_new_one_and_still_works(old, new, value):
    assert {old: new for old, new, _ in OLD_AND_NEW} == dqn_module.RENAMED
    with pytest.warns(FutureWarning, match=f"DQN: the argument '{old}' is now called '{new}'") as warned:
        module = _dqn(**{old: value})
    assert len(warned) == 1 and warned[0].filename == __file__  # pointed at the caller's line
    assert _described(module) == _described(_dqn(**{new: value}))
    assert _described(module) != _described(_dqn())  # the value was used, not dropped
    assert module.hparams[new] == value


@pytest.mark.parametrize("old, new, value", OLD_AND_NEW)
def test_an_old_and_a_new_argument_name_together_are_an_error(old, new, value):
    with pytest.raises(TypeError, match=f"DQN: got both {old}=.* and {new}=.*give {new} only"):
        DQN(**{old: value, new: value})
    # a new name at its default counts as not given (LightningCLI passes every default)
    default = inspect.signature(DQN).parameters[new].default
    with pytest.warns(FutureWarning, match=old):
        DQN(**{old: value, new: list(default) if isinstance(default, tuple) else default})


def test_a_checkpoint_with_the_old_argument_names_loads_silently(tmp_path):
    """A checkpoint written before the renaming holds ``hidden`` / ``lr`` / ... in its
    hyper-parameters: it loads, without a warning, into the network it was trained with."""
    module = DQN(obs_shape=(3,), num_actions=2, critic_hidden=(5, 4), critic_norm="layer", critic_lr=2e-3)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    ckpt = torch.load(tmp_path / "new.ckpt", weights_only=True)
    hparams = ckpt["hyper_parameters"]
    for old, new in dqn_module.RENAMED.items():
        hparams[old] = hparams.pop(new)
    torch.save(ckpt, tmp_path / "old.ckpt")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = DQN.load_from_checkpoint(tmp_path / "old.ckpt")
    assert _described(loaded) == _described(module) and loaded.critic_lr == 2e-3
    for a, b in zip(loaded.parameters(), module.parameters()):
        assert torch.equal(a, b)


def test_the_cli_still_parses_the_old_names(tmp_path, monkeypatch):
    from lit_qlearn.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.warns(FutureWarning) as warned:
        main(["fit", "--seed_everything", "0", "--model", "lit_qlearn.algorithms.DQN",
              "--model.init_args.hidden", "[16]", "--model.init_args.lr", "0.002",
              "--data", "lit_qlearn.data.OnlineDataModule", "--data.init_args.env_id", CHAIN,
              "--data.init_args.learning_starts", "16",
              "--data.init_args.batch_size", "8", "--trainer.max_steps", "2", "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--trainer.default_root_dir", str(tmp_path)])
    assert {str(w.message).split("'")[1] for w in warned if w.category is FutureWarning} == {"hidden", "lr"}
    (ckpt,) = tmp_path.glob("**/*.ckpt")
    loaded = DQN.load_from_checkpoint(ckpt)
    assert loaded.q_net.head[0].out_features == 16 and loaded.critic_lr == 0.002
