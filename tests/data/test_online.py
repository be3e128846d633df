import contextlib
import math

import gymnasium as gym
import lightning as L
import numpy as np
import pytest
import torch

from lit_qlearn.data import DatasetError, OnlineDataModule, Rollout, make_vector_env, run_episodes
from lit_qlearn.toys import ChainEnv

CHAIN = "lit_qlearn.toys:Chain-v0"


def right(obs):
    return np.ones(len(obs), dtype=np.int64)


@pytest.mark.parametrize("mode", ["same", "next"])
def test_rollout_handles_both_autoreset_modes(mode):
    autoreset = gym.vector.AutoresetMode.SAME_STEP if mode == "same" else gym.vector.AutoresetMode.NEXT_STEP
    envs = gym.vector.SyncVectorEnv([lambda: gym.make(CHAIN) for _ in range(2)], autoreset_mode=autoreset)
    rollout = Rollout(envs, seed=0)
    rollout.reset()
    starts = rollout.obs.argmax(1).copy()
    steps = [rollout.step(right) for _ in range(12)]
    valid = np.array([s.valid for s in steps])  # (T, E)
    for e in range(2):
        # always moving right: the episode ends after (4 - start) + 1 steps with reward 1, terminated
        first_end = next(t for t, s in enumerate(steps) if s.terminated[e])
        assert first_end == 4 - starts[e]
        assert steps[first_end].rew[e] == 1.0 and not steps[first_end].truncated[e]
        # the stored next state of the terminal step is the final state, never a reset one
        assert steps[first_end].next_obs[e].argmax() == 4
        # NEXT_STEP: the step after an episode end only resets: not a transition
        assert valid[first_end + 1, e] == (mode == "same")
    assert rollout.env_steps == valid.sum()
    assert all(ret == 1.0 for ret, _ in rollout.episodes)
    assert rollout.episodes[0][1] == min(5 - starts)  # the first to finish: the env nearest the goal
    assert all(1 <= n <= 5 for _, n in rollout.episodes)


def test_truncation_keeps_the_final_state_and_is_not_terminal():
    envs = make_vector_env(CHAIN)
    rollout = Rollout(envs, seed=3)
    rollout.reset()
    left = lambda obs: np.zeros(len(obs), dtype=np.int64)  # noqa: E731 - never reaches the goal
    steps = [rollout.step(left) for _ in range(8)]
    assert steps[-1].truncated[0] and not steps[-1].terminated[0]
    assert steps[-1].next_obs[0].argmax() == 0  # the state it was cut in, not the reset state
    assert rollout.episodes == [(0.0, 8)]


def test_run_episodes_returns_the_first_finished_episodes():
    returns, lengths = run_episodes(make_vector_env(CHAIN), right, 3, seed=0)
    assert returns == [1.0, 1.0, 1.0] and all(1 <= n <= 5 for n in lengths)


def _fitted(steps=6, **kwargs):
    from lit_qlearn.algorithms import DQN

    options = dict(learning_starts=40, batch_size=8, capacity=500)
    options.update(kwargs)
    dm = OnlineDataModule(CHAIN, **options)
    module = DQN(gamma=0.9, critic_hidden=(8,))
    L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, dm)
    return dm, module


@pytest.mark.parametrize("train_freq, gradient_steps, num_envs", [(1, 1, 1), (4, 1, 1), (6, 3, 2), (1, 4, 2)])
def test_environment_steps_per_update(train_freq, gradient_steps, num_envs):
    dm, module = _fitted(steps=12, train_freq=train_freq, gradient_steps=gradient_steps, num_envs=num_envs)
    phases = math.ceil(12 / gradient_steps)
    per_phase = math.ceil(train_freq / num_envs) * num_envs  # whole vector steps
    assert dm.rollout.env_steps == 40 + phases * per_phase
    assert len(dm.buffer) == dm.rollout.env_steps


def test_rollout_counts_have_the_same_keys_on_every_rank_and_drain():
    dm, module = _fitted(steps=1)
    dm._episodes = [(1.0, 3), (0.0, 8)]
    assert dm.rollout_metrics() == {"env_steps": float(dm.rollout.env_steps), "episodes": 2.0, "return_sum": 1.0,
                                    "length_sum": 11.0}
    assert dm.rollout_metrics()["episodes"] == 0.0  # drained, the keys stay


def test_resume_without_the_buffer_keeps_the_schedules(tmp_path):
    import lightning as L

    from lit_qlearn.algorithms import DQN

    def run(steps, ckpt=None):
        dm = OnlineDataModule(CHAIN, learning_starts=40, batch_size=8, capacity=500, n_step=3, save_buffer=False)
        module = DQN(gamma=0.9, critic_hidden=(8,), epsilon_steps=100)
        trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path)
        with pytest.warns(UserWarning, match="no replay buffer") if ckpt else contextlib.nullcontext():
            trainer.fit(module, dm, ckpt_path=ckpt)
        return trainer, dm, module

    trainer, dm, module = run(30)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    _, dm2, module2 = run(40, tmp_path / "c.ckpt")
    # the environment step count (and with it epsilon) continues; the buffer was refilled
    assert dm2.rollout.env_steps == 40 + 40 and module2.epsilon(dm2.rollout.env_steps) == module.epsilon(80)
    assert len(dm2.buffer) >= 40


def test_probe_batch_is_fixed_and_distinct():
    dm, _ = _fitted(steps=1)
    a, b = dm.probe_batch(30, seed=1), dm.probe_batch(30, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a[:6], b[:6]))
    assert a.index is None and a.weight is None and a.discount is not None
    assert not torch.equal(a.obs, dm.probe_batch(30, seed=2).obs)
    assert dm.probe_batch(10_000).obs.shape[0] == len(dm.buffer)
    with pytest.raises(DatasetError, match="empty"):
        OnlineDataModule(CHAIN).probe_batch(4)


def test_prioritized_replay_gets_each_updates_td_errors():
    from lit_qlearn.algorithms import DQN

    dm = OnlineDataModule(CHAIN, learning_starts=40, batch_size=8, capacity=500, prioritized=True, beta=0.4,
                          beta_steps=10)
    module = DQN(gamma=0.9, critic_hidden=(8,), loss="mse")
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            with torch.no_grad():  # the TD errors the update is about to see
                seen.append((batch.index.clone(), (pl_module.td_target(batch) - pl_module.q_value(
                    batch.obs, batch.act)).abs(), dm.beta))

    L.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[Record()]).fit(module, dm)
    index, td_abs, beta = seen[-1]
    tree = dm.buffer._tree
    # the last update's slots carry (|delta| + eps)^alpha (a slot drawn twice: the same value)
    torch.testing.assert_close(tree.sum[index + tree.leaves], ((td_abs + dm.buffer.eps) ** 0.6).double())
    assert [b for _, _, b in seen] == pytest.approx([0.4 + 0.6 * k / 10 for k in range(5)])


@pytest.mark.parametrize("kwargs, message", [
    ({"num_envs": 0}, "num_envs"), ({"learning_starts": 0}, "learning_starts"),
    ({"beta": 2.0}, "beta"), ({"buffer_device": "gpu"}, "buffer_device"), ({"env_id": "NoSuch-v0"}, "NoSuch-v0"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(DatasetError, match=message):
        OnlineDataModule(**{"env_id": CHAIN, **kwargs})


def test_spec_of_discrete_and_continuous_environments():
    chain = OnlineDataModule(CHAIN).spec
    assert chain.discrete and chain.num_actions == 2 and chain.obs_shape == (5,)
    pendulum = OnlineDataModule("Pendulum-v1").spec
    assert not pendulum.discrete and pendulum.action_low == (-2.0,) and pendulum.action_high == (2.0,)
    assert ChainEnv.optimal_q(0.5)[4, 1] == 1.0


@pytest.mark.parametrize("beta_steps", [8, None])  # None: annealed over the Trainer's max_steps (12)
def test_prioritised_batches_are_weighted_with_the_annealed_beta(beta_steps):
    """Every served batch carries w_i = (p_i / p_min)^(-beta_t), p_min over the whole buffer
    (Schaul et al.'s normalisation by the largest weight, (N P_min)^(-beta)), with beta_t
    annealed from beta to 1: beta_t = beta + (1 - beta) min(1, (t - 1) / beta_steps) for
    update t (t - 1 updates are done when its batch is drawn). The test sets every
    priority itself, so p is known without reading the buffer."""
    from lit_qlearn.algorithms import DQN

    alpha, beta, steps = 0.7, 0.2, 12
    eps = 1e-6  # PrioritizedReplayBuffer's default, which OnlineDataModule keeps
    dm = OnlineDataModule(CHAIN, learning_starts=40, batch_size=16, capacity=500, prioritized=True, alpha=alpha,
                          beta=beta, beta_steps=beta_steps, seed=0)
    rng = np.random.default_rng(0)
    known = {"p": np.ones(0), "max": 1.0}  # priorities the test set, and the largest so far (1.0 at start)
    checked = []

    class TestSetsPriorities(DQN):
        def update(self, batch):
            super().update(batch)
            return None  # no TD errors for the buffer: the callback below sets every priority

    class Check(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            t = pl_module.updates + 1  # the update this batch is for
            # slots filled since the test's last priorities entered with the largest priority seen
            p = np.concatenate([known["p"], np.full(len(dm.buffer) - len(known["p"]), known["max"])])
            beta_t = beta + (1 - beta) * min(1.0, (t - 1) / (beta_steps or steps))
            expected = (p[batch.index.numpy()] / p.min()) ** (-beta_t)
            np.testing.assert_allclose(batch.weight.numpy(), expected, rtol=1e-5)
            checked.append((t, beta_t, float(batch.weight.min())))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            n = len(dm.buffer)
            td = rng.uniform(0.0, 4.0, size=n)
            td[rng.integers(n)] = 0.0  # p_min = eps^alpha somewhere in the buffer
            dm.update_priorities(torch.arange(n), torch.as_tensor(td))
            known["p"] = (np.abs(td) + eps) ** alpha  # Schaul et al.'s proportional priority, by hand
            known["max"] = max(known["max"], known["p"].max())

    L.seed_everything(0, verbose=False)
    L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu", callbacks=[Check()]).fit(
        TestSetsPriorities(gamma=0.9, critic_hidden=(8,)), dm)
    assert [t for t, _, _ in checked] == list(range(1, steps + 1))
    # beta moved from 0.2 towards 1 (reaching it with beta_steps=8), and the weights are far
    # from 1, so a batch weighted with the initial beta would fail above
    assert checked[-1][1] == pytest.approx(1.0 if beta_steps else beta + (1 - beta) * 11 / 12)
    assert all(w < 0.2 for _, _, w in checked[1:])


def test_fewer_random_steps_than_a_batch_are_drawn_with_replacement():
    """Stable-Baselines3's off-policy defaults (100 random steps, batches of 256) port as
    they are: the first batch draws its rows with replacement from the few stored ones."""
    from lit_qlearn.algorithms import DQN

    class Seen(DQN):
        def update(self, batch):
            self.seen.append(batch.index.clone())
            return super().update(batch)

    dm = OnlineDataModule(CHAIN, learning_starts=10, batch_size=64, capacity=500, seed=0)
    module = Seen(gamma=0.9, critic_hidden=(8,))
    module.seen = []
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, dm)
    # 10 random steps, then the phase's one environment step, then the batch
    assert dm.rollout.env_steps == 11 and len(dm.buffer) == 11
    assert len(module.seen[0]) == 64 and int(module.seen[0].max()) < 11 and len(module.seen[0].unique()) <= 11


def test_n_step_prefill_goes_on_until_the_buffer_holds_a_transition():
    # one random step makes no 3-step transition yet (unless its episode ended): the
    # prefill goes on, so the first batch has something to draw from
    dm, _ = _fitted(steps=1, learning_starts=1, batch_size=8, n_step=3, seed=3)
    assert len(dm.buffer) >= 1 and dm.rollout.env_steps >= 2


def test_a_capacity_below_the_batch_size_is_an_error_at_construction():
    with pytest.raises(DatasetError) as e:
        OnlineDataModule(CHAIN, capacity=63, learning_starts=64, batch_size=64)
    assert str(e.value) == ("OnlineDataModule: capacity (63) must be at least batch_size (64), the transitions one "
                            "batch draws from the replay buffer")
    assert OnlineDataModule(CHAIN, capacity=64, learning_starts=64, batch_size=64).hparams.capacity == 64
