"""PQN by hand: the Q(lambda) returns against their forward view and a hand computation,
the module's targets and loss, its RAdam step, the epsilon and learning-rate schedules,
and the OnPolicyDataModule's minibatch / epoch structure. (The base contract, checkpoint
and exact resume included, is tests/algorithms/test_contract.py's; DDP is ddp_pqn.py's.)"""
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lit_qlearn.algorithms import PQN
from lit_qlearn.data import DatasetError, OnPolicyDataModule, Transitions
from lit_qlearn.td import lambda_returns, td_target
from tests.conftest import fit, run_ddp_script

GAMMA, LAM = 0.9, 0.6


def forward_view(rew, next_value, terminated, truncated, gamma, lam):
    """G^lambda_t = (1 - lam) sum_{n<N} lam^(n-1) G^(n)_t + lam^(N-1) G^(N)_t, N the steps to the
    episode's or the rollout's end, G^(n)_t = sum_{k<n} gamma^k r_{t+k} + gamma^n (1 - term) V_{t+n-1}
    (Sutton & Barto 2018, Eq. 12.3, cut at the episode's end), one cell at a time in float64."""
    T, E = rew.shape
    out = np.zeros((T, E))
    for e in range(E):
        for t in range(T):
            end = t
            while end < T - 1 and not (terminated[end, e] or truncated[end, e]):
                end += 1
            N = end - t + 1

            def n_step(n):
                last = t + n - 1
                ret = sum(gamma ** k * rew[t + k, e] for k in range(n))
                return ret + gamma ** n * (1 - terminated[last, e]) * next_value[last, e]

            out[t, e] = (1 - lam) * sum(lam ** (n - 1) * n_step(n) for n in range(1, N)) + lam ** (N - 1) * n_step(N)
    return out


def rollout(seed=0, T=7, E=3):
    g = torch.Generator().manual_seed(seed)
    rew = torch.randn(T, E, generator=g, dtype=torch.float64)
    value = 1.0 + torch.rand(T, E, generator=g, dtype=torch.float64)  # far from 0: a missing bootstrap shows
    terminated, truncated = torch.zeros(T, E, dtype=torch.float64), torch.zeros(T, E, dtype=torch.float64)
    terminated[2, 0] = 1  # a termination in the middle
    truncated[3, 1] = 1  # a truncation in the middle: bootstraps from its own next state
    terminated[T - 1, 2] = 1  # a termination at the rollout's end
    return rew, value, terminated, truncated


def test_lambda_returns_match_the_forward_view_across_dones():
    rew, value, terminated, truncated = rollout()
    got = lambda_returns(rew, value, terminated, truncated, GAMMA, LAM)
    want = forward_view(rew.numpy(), value.numpy(), terminated.numpy(), truncated.numpy(), GAMMA, LAM)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    assert np.abs(want).max() > 0.5


def test_lambda_returns_by_hand_on_three_steps():
    # one environment: r = (1, 2, 3), V(s'_t) = (10, 20, 30), the episode terminates at t = 1
    rew = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    value = torch.tensor([[10.0], [20.0], [30.0]], dtype=torch.float64)
    terminated = torch.tensor([[0.0], [1.0], [0.0]], dtype=torch.float64)
    truncated = torch.zeros(3, 1, dtype=torch.float64)
    g, lam = 0.5, 0.5
    G2 = 3 + g * 30  # the last step bootstraps: 18
    G1 = 2  # terminated: the reward alone, nothing of the next episode
    G0 = 1 + g * (10 + lam * (G1 - 10))  # 1 + 0.5 * 6 = 4
    got = lambda_returns(rew, value, terminated, truncated, g, lam)
    torch.testing.assert_close(got[:, 0], torch.tensor([G0, G1, G2], dtype=torch.float64))
    # the same step truncated instead: it bootstraps from its final state
    got = lambda_returns(rew, value, truncated, terminated, g, lam)
    torch.testing.assert_close(got[1, 0], torch.tensor(2 + g * 20, dtype=torch.float64))


def test_lambda_zero_is_the_one_step_target_and_one_the_bootstrapped_return():
    rew, value, terminated, truncated = rollout(1)
    flat = Transitions(torch.zeros(rew.numel(), 1), torch.zeros(rew.numel()), rew.reshape(-1),
                       torch.zeros(rew.numel(), 1), terminated.reshape(-1))
    torch.testing.assert_close(lambda_returns(rew, value, terminated, truncated, GAMMA, 0.0).reshape(-1),
                               td_target(flat, value.reshape(-1), GAMMA))
    # lam = 1 with no dones: the discounted rewards to the end plus gamma^N V at the end
    zero = torch.zeros_like(rew)
    T = rew.shape[0]
    mc = sum(GAMMA ** k * rew[k] for k in range(T)) + GAMMA ** T * value[T - 1]
    torch.testing.assert_close(lambda_returns(rew, value, zero, zero, GAMMA, 1.0)[0], mc)


def test_lambda_returns_agree_with_cleanrls_recursion_where_no_episode_ends():
    """CleanRL's pqn.py recursion (no done in the rollout; values[t+1] = V(s'_t))."""
    rew, value, _, _ = rollout(2)
    zero = torch.zeros_like(rew)
    T = rew.shape[0]
    want = torch.zeros_like(rew)
    want[T - 1] = rew[T - 1] + GAMMA * value[T - 1]
    for t in reversed(range(T - 1)):
        want[t] = rew[t] + GAMMA * (LAM * want[t + 1] + (1 - LAM) * value[t])
    torch.testing.assert_close(lambda_returns(rew, value, zero, zero, GAMMA, LAM), want)


def test_lambda_returns_reject_bad_input():
    rew, value, terminated, truncated = rollout()
    with pytest.raises(ValueError, match="lam must be in"):
        lambda_returns(rew, value, terminated, truncated, GAMMA, 1.5)
    with pytest.raises(ValueError, match=r"\(T, E\) shape"):
        lambda_returns(rew, value[:, :2], terminated, truncated, GAMMA, LAM)


# ---------------------------------------------------------------- the module
def module(**kwargs):
    torch.manual_seed(0)
    return PQN(obs_shape=(3,), num_actions=2, critic_hidden=(8, 8), **kwargs)


def test_rollout_targets_bootstrap_with_the_networks_max_over_next_states():
    m = module(gamma=GAMMA, q_lambda=LAM)
    g = torch.Generator().manual_seed(3)
    T, E = 5, 2
    batch = Transitions(torch.randn(T, E, 3, generator=g), torch.randint(2, (T, E), generator=g),
                        torch.randn(T, E, generator=g), torch.randn(T, E, 3, generator=g), torch.zeros(T, E))
    truncated = torch.zeros(T, E)
    truncated[1, 1] = 1
    with torch.no_grad():
        value = torch.stack([torch.stack([m.q_net(batch.next_obs[t, e:e + 1])[0].max() for e in range(E)])
                             for t in range(T)])
    got = m.rollout_targets(batch, truncated, env_step=0)
    torch.testing.assert_close(got, lambda_returns(batch.rew, value, batch.terminated, truncated, GAMMA, LAM))
    assert value.abs().min() > 1e-3


def test_layer_norm_orthogonal_init_and_l2_are_the_papers_and_cleanrls():
    m = module(weight_decay=1e-3)
    layers = list(m.q_net.head)
    assert [type(x).__name__ for x in layers] == ["Linear", "LayerNorm", "ReLU", "Linear", "LayerNorm", "ReLU",
                                                  "Linear"]
    w = layers[0].weight  # (8, 3): orthogonal columns of norm sqrt(2)
    torch.testing.assert_close(w.T @ w, 2.0 * torch.eye(3), rtol=1e-5, atol=1e-5)
    assert all(x.bias.abs().max() == 0 for x in layers if isinstance(x, torch.nn.Linear))
    optimizer = m.build_optimizers()["critic"]
    assert isinstance(optimizer, torch.optim.RAdam) and optimizer.defaults["weight_decay"] == 1e-3
    assert list(PQN(obs_shape=(3,), num_actions=2, critic_norm=None).q_net.head)[1].__class__.__name__ == "ReLU"


def test_one_update_is_radam_on_the_mean_squared_error_to_the_target_clipped():
    """The loss and the step by hand: a copy of the network, the same loss written out, the
    global norm clipped to 0.01 (so the clip acts) and torch's RAdam, L2 included."""
    m = module(max_grad_norm=0.01, weight_decay=0.1, critic_lr=1e-2, anneal_lr=False)
    g = torch.Generator().manual_seed(4)
    B = 16
    batch = Transitions(torch.randn(B, 3, generator=g), torch.randint(2, (B,), generator=g), torch.zeros(B),
                        torch.randn(B, 3, generator=g), torch.zeros(B), target=3.0 + torch.randn(B, generator=g))
    reference = PQN(obs_shape=(3,), num_actions=2, critic_hidden=(8, 8))
    reference.load_state_dict(m.state_dict())
    optimizer = torch.optim.RAdam(reference.q_net.parameters(), lr=1e-2, weight_decay=0.1)
    q = reference.q_net(batch.obs)[torch.arange(B), batch.act]
    loss = ((q - batch.target) ** 2).sum() / B
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.q_net.parameters(), 0.01)
    optimizer.step()
    assert norm > 0.1  # the clip acts

    trainer_free = torch.optim.RAdam(m.q_net.parameters(), lr=1e-2, weight_decay=0.1)
    m.step = lambda name, loss, max_grad_norm=None, measure_norm=False: _step(m, trainer_free, loss, max_grad_norm)
    m.logging_now = lambda: False
    assert m.update(batch) is None
    for a, b in zip(m.q_net.parameters(), reference.q_net.parameters()):
        torch.testing.assert_close(a, b)
    assert m.captured_loss == pytest.approx(loss.item(), rel=1e-6)


def _step(m, optimizer, loss, max_grad_norm):
    m.captured_loss = loss.item()
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.q_net.parameters(), max_grad_norm)
    optimizer.step()


def test_epsilon_follows_cleanrls_linear_schedule():
    m = module(total_env_steps=1000, exploration_fraction=0.5, epsilon_start=1.0, epsilon_end=0.05)

    def cleanrl(t, duration=500):  # pqn.py's linear_schedule(start_e, end_e, duration, t)
        return max((0.05 - 1.0) / duration * t + 1.0, 0.05)

    for t in (0, 1, 100, 250, 499, 500, 501, 5000):
        assert m.epsilon(t) == pytest.approx(cleanrl(t), abs=1e-12)
    assert m.epsilon_steps == 500


def test_learning_rate_is_annealed_per_rollout_over_the_run():
    m = module(critic_lr=1e-3, total_env_steps=1000)
    assert [m.learning_rate(s) for s in (0, 250, 1000, 2000)] == pytest.approx([1e-3, 7.5e-4, 0.0, 0.0])
    assert module(critic_lr=1e-3, anneal_lr=False).learning_rate(900) == 1e-3


def test_bad_arguments_are_named():
    for kwargs, match in ((dict(q_lambda=1.5), "q_lambda"), (dict(exploration_fraction=-0.1), "exploration_fraction"),
                          (dict(total_env_steps=0), "total_env_steps"), (dict(gamma=1.0), "gamma"),
                          (dict(weight_decay=-1.0), "weight_decay"), (dict(max_grad_norm=0.0), "max_grad_norm"),
                          (dict(epsilon_end=2.0), "epsilon_end")):
        with pytest.raises(ValueError, match=match):
            PQN(**kwargs)
    with pytest.raises(ValueError, match="no target"):
        module().update(Transitions(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), torch.zeros(2),
                                    torch.zeros(2, 3), torch.zeros(2)))


# ------------------------------------------------------------------ the data
def chain_data(**kwargs):
    options = dict(num_envs=2, num_steps=4, num_minibatches=2, update_epochs=3, seed=5)
    options.update(kwargs)
    return OnPolicyDataModule("lit_qlearn.toys:Chain-v0", **options)


class Recording(PQN):
    """PQN that keeps each rollout it is handed and the batches it trains on."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rollouts, self.batches = [], []

    def rollout_targets(self, rollout, truncated, env_step):
        target = super().rollout_targets(rollout, truncated, env_step)
        lr = self.optimizer("critic").optimizer.param_groups[0]["lr"]
        self.rollouts.append((rollout, truncated, env_step, target, lr))
        return target

    def update(self, batch):
        self.batches.append(batch)
        return super().update(batch)


def test_rollouts_are_served_as_shuffled_minibatches_for_several_epochs():
    L.seed_everything(0, verbose=False)
    dm = chain_data()
    m = Recording(critic_hidden=(8,), total_env_steps=32, critic_lr=1e-3)
    fit(m, dm, 12)
    # 12 updates = 2 rollouts x 3 epochs x 2 minibatches of 2 * 4 / 2 = 4 rows
    assert len(m.rollouts) == 2 and [r[2] for r in m.rollouts] == [0, 8]
    assert dm.rollout.env_steps == 16
    # each rollout's learning rate: annealed from its env step count
    assert [r[4] for r in m.rollouts] == pytest.approx([1e-3, 1e-3 * (1 - 8 / 32)])
    for i, (rollout, truncated, _, target, _) in enumerate(m.rollouts):
        assert rollout.obs.shape == (4, 2, 5) and truncated.shape == (4, 2)
        flat_obs, flat_target = rollout.obs.reshape(8, 5), target.reshape(8)
        served = m.batches[6 * i:6 * (i + 1)]
        assert all(len(b.obs) == 4 for b in served)
        rows = []
        for epoch in range(3):
            pair = served[2 * epoch:2 * epoch + 2]
            epoch_rows = [_row(flat_obs, flat_target, b.obs[j], b.target[j]) for b in pair for j in range(4)]
            assert sorted(epoch_rows) == list(range(8))  # every transition once per epoch
            rows.append(epoch_rows)
        assert rows[0] != rows[1] or rows[1] != rows[2]  # shuffled anew each epoch


def _row(flat_obs, flat_target, obs, target):
    """The rollout row a served (obs, target) pair came from."""
    hits = [k for k in range(len(flat_obs)) if torch.equal(flat_obs[k], obs) and flat_target[k] == target]
    assert hits, "a served row that is not in the rollout"
    return hits[0]


def test_truncations_reach_the_module_apart_from_terminations():
    L.seed_everything(0, verbose=False)
    dm = chain_data(num_envs=3, num_steps=20, num_minibatches=4, update_epochs=1)
    m = Recording(critic_hidden=(8,), epsilon_start=0.5, epsilon_end=0.5)
    fit(m, dm, 4)
    rollout, truncated, _, _, _ = m.rollouts[0]
    assert truncated.sum() > 0 and rollout.terminated.sum() > 0  # the chain truncates at 8 steps
    assert (truncated * rollout.terminated).sum() == 0


def test_rollout_metrics_count_the_episodes_the_rollouts_finished():
    """What the module logs as rollout/episode_return and /episode_length: the episodes that
    ended (terminated or truncated) in the rollouts served, counted from the rollouts' rows."""
    L.seed_everything(0, verbose=False)
    dm = chain_data(num_envs=3, num_steps=20, num_minibatches=4, update_epochs=1)
    m = Recording(critic_hidden=(8,), epsilon_start=0.5, epsilon_end=0.5)
    fit(m, dm, 8)  # two rollouts of 20 steps of 3 environments, from a reset
    assert len(m.rollouts) == 2
    rew = torch.cat([r[0].rew for r in m.rollouts]).double()  # (40, 3)
    done = torch.cat([r[0].terminated + r[1] for r in m.rollouts]) > 0
    episodes = return_sum = length_sum = 0.0
    for e in range(3):  # every step up to an environment's last episode end belongs to a finished episode
        ends = torch.nonzero(done[:, e]).flatten()
        if len(ends):
            episodes += len(ends)
            return_sum += float(rew[:ends[-1] + 1, e].sum())
            length_sum += float(ends[-1] + 1)
    assert episodes >= 3
    counts = dm.rollout_metrics()
    assert counts["env_steps"] == 120 and counts["episodes"] == episodes
    assert counts["return_sum"] == pytest.approx(return_sum) and counts["length_sum"] == length_sum


def test_probe_is_a_seeded_draw_of_distinct_rollout_transitions():
    L.seed_everything(0, verbose=False)
    # CartPole: continuous states, so a state names its transition
    dm = OnPolicyDataModule("CartPole-v1", num_envs=3, num_steps=20, num_minibatches=4, update_epochs=1, seed=5)
    fit(PQN(critic_hidden=(8,)), dm, 2)
    flat = dm.data.obs
    probes = {seed: dm.probe_batch(n=10, seed=seed) for seed in (0, 1, 2)}
    rows = {}
    for seed, probe in probes.items():
        assert probe.obs.shape == (10, 4) and probe.target is None
        rows[seed] = [next(k for k in range(len(flat)) if torch.equal(flat[k], o)) for o in probe.obs]
        for k, i in enumerate(rows[seed]):  # the whole transition is that row's
            assert dm.data.act[i] == probe.act[k] and torch.equal(dm.data.next_obs[i], probe.next_obs[k])
        assert len(set(rows[seed])) == 10  # distinct transitions of the current rollout
        torch.testing.assert_close(dm.probe_batch(n=10, seed=seed).obs, probe.obs)  # the same seed, the same set
    assert len({tuple(sorted(r)) for r in rows.values()}) == 3  # a draw, not the rollout's first rows
    assert len(dm.probe_batch(n=10_000).obs) == 60  # at most the rollout's transitions


def test_data_rejects_bad_arguments_and_modules_without_targets():
    with pytest.raises(DatasetError, match="num_minibatches"):
        chain_data(num_minibatches=3)
    with pytest.raises(DatasetError, match="num_steps"):
        chain_data(num_steps=0)
    from lit_qlearn.algorithms import DQN

    with pytest.raises(TypeError, match="rollout_targets"):
        fit(DQN(critic_hidden=(8,)), chain_data(), 1)


def test_an_untrusted_resume_keeps_the_rollout_and_resets_the_environments(tmp_path):
    """Without trust_checkpoint the environments restart from a reset (one warning), but the
    rollout in use, its targets and the epoch's permutation come back: the updates left of
    that rollout train on the batches an uninterrupted run trains on."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0, verbose=False)
    whole = Recording(critic_hidden=(8,), total_env_steps=64)
    fit(whole, chain_data(), 8, enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")])
    L.seed_everything(1, verbose=False)
    resumed = Recording(critic_hidden=(8,), total_env_steps=64)
    with pytest.warns(UserWarning, match="were not unpickled"):
        fit(resumed, chain_data(), 8, ckpt_path=tmp_path / "step=4.ckpt")
    # updates 5 and 6 finish the first rollout (6 updates each): the same minibatches
    for a, b in zip(whole.batches[4:6], resumed.batches[:2]):
        assert torch.equal(a.obs, b.obs) and torch.equal(a.target, b.target)
    assert len(resumed.rollouts) == 1 and resumed.rollouts[0][2] == 8  # then a rollout of its own


def test_ddp_two_cpu_processes_pqn(tmp_path):
    run_ddp_script(Path(__file__).with_name("ddp_pqn.py"), tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["updates"] == r1["updates"] == r0["global_step"] == 12
    assert torch.equal(r0["params"], r1["params"])
    # each rank stepped its own environments into its own rollout
    assert not torch.equal(r0["rollout_obs"], r1["rollout_obs"])
    # and every rank measured SEEM on rank zero's probe set
    assert r0["seem"] == r1["seem"]
