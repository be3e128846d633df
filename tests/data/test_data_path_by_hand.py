"""The data path against hand computations: n-step queues, subsets, rollouts into the buffer.

Written by mutation testing (issue 19): each test catches a planted single-line bug that
the other data tests let through, named in its docstring.
"""
from __future__ import annotations

import lightning as L
import numpy as np
import torch

from lit_qlearn.data import OnlineDataModule, ReplayBuffer, Rollout, make_vector_env
from lit_qlearn.data.offline import subset_indices

CHAIN = "lit_qlearn.toys:Chain-v0"


def test_drop_pending_starts_the_n_step_queue_afresh():
    """After ``drop_pending`` (environments reset outside ``add``, e.g. on resume) no row joins
    the steps before it: the first 3-step row starts at the first step added after the drop.
    Catches a drop that resets the queue's head but not its length."""
    buf = ReplayBuffer(16, obs_shape=(1,), n_step=3, gamma=0.5)
    step = lambda t, end=False: buf.add([[float(t)]], [0.0], [float(t)], [[t + 1.0]], [end], [False])  # noqa: E731
    step(0)
    step(1)  # two steps pending, nothing written yet
    assert len(buf) == 0
    buf.drop_pending()
    for t in (10, 11, 12):
        step(t)
    assert len(buf) == 1
    row = buf.gather(torch.tensor([0]))
    # (s_10, R = 10 + 0.5 * 11 + 0.25 * 12, s_13, gamma^3)
    assert row.obs.item() == 10.0 and row.next_obs.item() == 13.0
    assert row.rew.item() == 10 + 0.5 * 11 + 0.25 * 12 and row.discount.item() == 0.125


def test_subset_size_rounds_to_nearest():
    """``max(1, round(fraction * n))`` rows: 5.7 rounds to 6, not down to 5."""
    assert len(subset_indices(100, 0.057, seed=0)) == 6
    assert len(subset_indices(100, 0.051, seed=0)) == 5
    assert len(subset_indices(100, 0.001, seed=0)) == 1


def _moved(state: np.ndarray, action: np.ndarray, n: int = 5) -> np.ndarray:
    """The chain's next state by hand: right (1) moves up to n - 1, left (0) down to 0."""
    return np.where(action == 1, np.minimum(state + 1, n - 1), np.maximum(state - 1, 0))


def test_rollout_next_obs_at_a_truncation_is_the_final_state():
    """Same-step autoreset: the row that a time limit cuts carries the state the episode was cut
    in (by hand from the previous state and the action), not the new episode's first state, and
    is truncated, not terminated. The policy keeps every chain between states 1 and 3, away
    from state 0 and from the goal, so the final state and the reset state differ. Catches the
    final observation substituted on termination only."""
    envs = make_vector_env(CHAIN, num_envs=4)
    rollout = Rollout(envs, seed=7)
    rollout.reset()
    middle = lambda obs: (obs.argmax(1) < 2).astype(np.int64)  # noqa: E731 - right below 2, else left
    cut = 0
    for t in range(20):
        step = rollout.step(middle)
        state = step.obs.argmax(1)
        np.testing.assert_array_equal(step.next_obs.argmax(1), _moved(state, step.act))
        assert not step.terminated.any()
        if step.truncated.any():
            cut += int(step.truncated.sum())
            # the next row starts the new episode: rollout.obs is the reset observation
            assert (rollout.obs.argmax(1) != step.next_obs.argmax(1))[step.truncated].any()
    assert cut >= 4  # every env was cut at least once (8-step limit, 20 steps)


def test_online_buffer_rows_are_terminated_only_at_the_goal():
    """Rows an 8-step time limit cut bootstrap: in the buffer an online DataModule fills, a row is
    terminated exactly when it holds the goal's reward. Catches ``terminated | truncated`` passed
    to the buffer as terminated."""
    from lit_qlearn.algorithms import DQN

    L.seed_everything(0, verbose=False)
    dm = OnlineDataModule(CHAIN, learning_starts=64, batch_size=8, capacity=500, seed=0)
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(DQN(gamma=0.9, critic_hidden=(8,)), dm)
    rows = dm.buffer.gather(torch.arange(len(dm.buffer)))
    goals = int((rows.rew > 0).sum())
    # Without a time limit every episode (at most 8 steps, else it is cut) would end at the goal:
    # at least len / 8 - 1 goal rows. Fewer means the time limit cut some, so the test has teeth.
    assert len(rows.rew) >= 64 and goals < len(rows.rew) / 8 - 1
    torch.testing.assert_close(rows.terminated, (rows.rew > 0).float())


def test_next_step_autoreset_after_a_truncation_is_not_a_transition():
    """A user's vector env with gymnasium's default NEXT_STEP autoreset: the step after a time-limit
    cut only resets; it is invalid, not counted, and not part of the next episode. Two 8-step
    episodes of a policy that never reaches the goal take 17 vector steps. Catches the reset step
    marked after terminations only, and episode lengths that count the reset step."""
    import gymnasium as gym

    envs = gym.vector.SyncVectorEnv([lambda: gym.make(CHAIN)])  # NEXT_STEP by default
    rollout = Rollout(envs, seed=0)
    rollout.reset()
    left = lambda obs: np.zeros(len(obs), dtype=np.int64)  # noqa: E731
    steps = [rollout.step(left) for _ in range(17)]
    assert steps[7].truncated[0] and not steps[7].terminated[0]
    assert [bool(s.valid[0]) for s in steps] == [True] * 8 + [False] + [True] * 8
    assert rollout.env_steps == 16
    assert rollout.episodes == [(0.0, 8), (0.0, 8)]


def test_offline_batches_draw_every_row_uniformly():
    """Offline minibatches draw row indices uniformly over all M kept rows (with replacement):
    over 5 x 600 draws from M = 3 every row appears, each about a third of the time (binomial
    sd ~0.009). Catches draws over ``M - 1`` rows (the last row never trained on)."""
    from lit_qlearn.data.offline import _RandomBatches

    batches = _RandomBatches(lambda idx: idx, n=3, batch_size=600, steps=5, seed=0, trainer_fn=lambda: None)
    idx = torch.cat(list(batches))
    assert idx.shape == (3000,) and idx.min() == 0 and idx.max() == 2
    shares = torch.bincount(idx, minlength=3).double() / len(idx)
    torch.testing.assert_close(shares, torch.full((3,), 1 / 3, dtype=torch.float64), rtol=0, atol=0.05)
