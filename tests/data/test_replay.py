"""ReplayBuffer / PrioritizedReplayBuffer: n-step rows written out by hand, sum-tree
sampling frequencies and importance weights against numpy, storage, checkpoints, errors."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from lit_qlearn.data.replay import PrioritizedReplayBuffer, ReplayBuffer
from lit_qlearn.data.types import Transitions


def _rows(buf: ReplayBuffer) -> list[tuple]:
    """The stored rows in slot order as (obs, act, rew, next_obs, terminated, discount)."""
    data = buf.state_dict()["data"]
    return list(zip(*(data[k].flatten(1)[:, 0].tolist() if data[k].ndim > 1 else data[k].tolist()
                      for k in ("obs", "act", "rew", "next_obs", "terminated", "discount"))))


def _step(buf: ReplayBuffer, obs, rew, next_obs, terminated=False, truncated=False) -> None:
    """One step of a 1-d-observation buffer; the action is 100 + obs, to check it travels with obs."""
    obs, rew, next_obs = (np.atleast_1d(np.asarray(x, np.float32)) for x in (obs, rew, next_obs))
    flags = (np.broadcast_to(np.asarray(f), obs.shape) for f in (terminated, truncated))
    buf.add(obs[:, None], (100 + obs).astype(np.int64), rew, next_obs[:, None], *flags)


def _discrete(capacity: int, **kw) -> ReplayBuffer:
    return ReplayBuffer(capacity, (1,), act_dtype=torch.int64, gamma=0.5, **kw)


def _episodes(buf: ReplayBuffer) -> None:
    """Three episodes, rewards powers of two so that gamma = 0.5 sums are exact:
    A: obs 0..3 -> 4, rewards 1, 2, 4, 8, terminated at its 4th step;
    B: obs 10, 11 -> 12, rewards 1, 2, truncated at its 2nd step;
    C: obs 20 -> 21, reward 3, terminated at its 1st step."""
    for t, r in enumerate((1, 2, 4, 8)):
        _step(buf, t, r, t + 1, terminated=t == 3)
    _step(buf, 10, 1, 11)
    _step(buf, 11, 2, 12, truncated=True)
    _step(buf, 20, 3, 21, terminated=True)


# (obs, act, R, next_obs, terminated, discount) with n = 3, gamma = 0.5, in emission order
EPISODE_ROWS_N3 = [
    (0, 100, 1 + 0.5 * 2 + 0.25 * 4, 3, 0, 0.125),  # queue full at step 2
    (1, 101, 2 + 0.5 * 4 + 0.25 * 8, 4, 1, 0.125),  # termination flushes the three pending starts
    (2, 102, 4 + 0.5 * 8, 4, 1, 0.25),
    (3, 103, 8, 4, 1, 0.5),
    (10, 110, 1 + 0.5 * 2, 12, 0, 0.25),  # truncation: bootstrap from s_12 with gamma^m
    (11, 111, 2, 12, 0, 0.5),
    (20, 120, 3, 21, 1, 0.5),
]


# ---------------------------------------------------------------- n-step assembly


def test_n_step_rows_by_hand():
    buf = _discrete(16, n_step=3)
    _episodes(buf)
    assert len(buf) == 7
    assert _rows(buf) == EPISODE_ROWS_N3


def test_n_step_across_the_wrap():
    buf = _discrete(4, n_step=3)
    _episodes(buf)
    # 7 rows into 4 slots: rows 4, 5, 6 overwrite slots 0, 1, 2; slot 3 keeps row 3
    assert len(buf) == 4
    assert _rows(buf) == EPISODE_ROWS_N3[4:7] + EPISODE_ROWS_N3[3:4]


def test_one_step_rows_have_discount_gamma():
    buf = _discrete(16, n_step=1)
    _episodes(buf)
    assert _rows(buf) == [
        (0, 100, 1, 1, 0, 0.5), (1, 101, 2, 2, 0, 0.5), (2, 102, 4, 3, 0, 0.5), (3, 103, 8, 4, 1, 0.5),
        (10, 110, 1, 11, 0, 0.5), (11, 111, 2, 12, 0, 0.5), (20, 120, 3, 21, 1, 0.5),
    ]


def test_n_step_two_envs_ending_at_different_steps():
    buf = _discrete(16, n_step=2, num_envs=2)
    # env 0: obs 0, 1, 2 -> 3 terminated at t = 2, then a new episode from obs 10
    # env 1: obs 50, 51 -> 52 truncated at t = 1, then obs 60, 61 -> 62 terminated at t = 3
    _step(buf, [0, 50], [1, 1], [1, 51])
    _step(buf, [1, 51], [2, 2], [2, 52], truncated=[False, True])
    _step(buf, [2, 60], [4, 4], [3, 61], terminated=[True, False])
    _step(buf, [10, 61], [8, 8], [11, 62], terminated=[False, True])
    assert _rows(buf) == [
        (0, 100, 1 + 0.5 * 2, 2, 0, 0.25),  # t = 1: env 0's queue is full
        (50, 150, 1 + 0.5 * 2, 52, 0, 0.25),  # t = 1: env 1 truncated, both starts flushed
        (51, 151, 2, 52, 0, 0.5),
        (1, 101, 2 + 0.5 * 4, 3, 1, 0.25),  # t = 2: env 0 terminated; env 1 has one step pending
        (2, 102, 4, 3, 1, 0.5),
        (60, 160, 4 + 0.5 * 8, 62, 1, 0.25),  # t = 3: env 1 terminated; env 0 has obs 10 pending
        (61, 161, 8, 62, 1, 0.5),
    ]
    pending = buf.state_dict()["pending"]
    assert pending["length"].tolist() == [1, 0]


# ---------------------------------------------------------------- storage and uniform sampling


def test_wrap_overwrites_the_oldest_rows():
    buf = ReplayBuffer(5, (2,))
    for t in range(8):
        buf.add(np.full((1, 2), t), np.zeros(1), [t], np.full((1, 2), t + 1), [False], [False])
    assert len(buf) == buf.capacity == 5
    # slot t % 5 holds step t: steps 0, 1, 2 are gone
    assert buf.state_dict()["data"]["rew"].tolist() == [5, 6, 7, 3, 4]
    wide = ReplayBuffer(3, (1,), num_envs=5)  # more rows in one step than slots: the last ones stay
    wide.add(np.arange(5.0)[:, None], np.zeros(5), np.arange(5.0), np.zeros((5, 1)), np.zeros(5), np.zeros(5))
    assert sorted(wide.state_dict()["data"]["rew"].tolist()) == [2, 3, 4]


def test_uniform_sample_gathers_filled_rows():
    buf = ReplayBuffer(64, (3,), (2,))
    rng = np.random.default_rng(0)
    for t in range(40):
        o = rng.normal(size=(1, 3))
        buf.add(o, rng.normal(size=(1, 2)), [t], o + 1, [t % 7 == 6], [False])
    batch = buf.sample(20_000, generator=torch.Generator().manual_seed(0))
    assert isinstance(batch, Transitions) and batch.weight is None
    assert batch.index.dtype == torch.int64 and batch.obs.dtype == torch.float32
    assert batch.index.min() >= 0 and batch.index.max() < 40  # never an unfilled slot
    counts = np.bincount(batch.index.numpy(), minlength=40)
    assert counts.min() > 400 and counts.max() < 600  # 500 expected, sd ~ 22
    data = buf.state_dict()["data"]
    torch.testing.assert_close(batch.rew, data["rew"][batch.index])  # slot t holds reward t
    torch.testing.assert_close(batch.next_obs, batch.obs + 1)
    torch.testing.assert_close(batch.terminated, (batch.rew % 7 == 6).float())
    torch.testing.assert_close(batch.discount, torch.full((20_000,), 0.99))


def test_uint8_images_stay_uint8():
    buf = ReplayBuffer(8, (4, 12, 12), obs_dtype=torch.uint8, act_dtype=torch.int64, num_envs=2)
    frames = torch.randint(0, 256, (3, 2, 4, 12, 12), dtype=torch.uint8)
    for t in range(2):
        buf.add(frames[t].numpy(), np.array([t, t]), np.ones(2), frames[t + 1], np.zeros(2), np.zeros(2))
    assert buf.state_dict()["data"]["obs"].dtype == torch.uint8
    batch = buf.sample(16, generator=torch.Generator().manual_seed(1))
    assert batch.obs.dtype == batch.next_obs.dtype == torch.uint8 and batch.act.dtype == torch.int64
    # rows are written env by env: slot 2t + e holds env e at step t
    t, e = batch.index // 2, batch.index % 2
    assert torch.equal(batch.obs, frames[t, e]) and torch.equal(batch.next_obs, frames[t + 1, e])
    assert torch.equal(batch.act, t)


def _round_trip(state: dict) -> dict:
    stream = io.BytesIO()
    torch.save(state, stream)
    stream.seek(0)
    return torch.load(stream)


@pytest.mark.parametrize("prioritized", [False, True])
def test_state_dict_round_trip(prioritized):
    make = PrioritizedReplayBuffer if prioritized else ReplayBuffer
    kwargs = dict(act_dtype=torch.int64, num_envs=2, n_step=3, gamma=0.9)
    buf = make(10, (2,), **kwargs)
    rng = np.random.default_rng(0)

    def step(b: ReplayBuffer, t: int) -> None:
        b.add(np.full((2, 2), t), np.array([t, -t]), np.array([t, 2.0 * t]), np.full((2, 2), t + 1),
              np.array([t % 5 == 4, False]), np.array([False, t % 7 == 6]))

    for t in range(17):  # wraps, with n-step starts pending
        step(buf, t)
        if prioritized and len(buf):
            index = buf.sample(4, beta=0.5).index
            buf.update_priorities(index, torch.as_tensor(rng.exponential(size=4)))
    state = buf.state_dict()
    assert len(state["data"]["obs"]) == len(buf) == 10 and state["pending"]["length"].sum() > 0
    copy = make(10, (2,), **kwargs)
    copy.load_state_dict(_round_trip(state))
    extra = dict(beta=0.7) if prioritized else {}
    for b in (buf, copy):  # the pending queues continue alike
        step(b, 17)
    a, b = (x.sample(32, generator=torch.Generator().manual_seed(3), **extra) for x in (buf, copy))
    for name, x, y in zip(Transitions._fields, a, b):
        assert (x is None and y is None) or torch.equal(x, y), name
    assert len(copy) == len(buf)


# ---------------------------------------------------------------- prioritised replay


def _filled(n: int, capacity: int, **kw) -> PrioritizedReplayBuffer:
    buf = PrioritizedReplayBuffer(capacity, (1,), **kw)
    for t in range(n):
        buf.add([[t]], [0.0], [t], [[t + 1]], [False], [False])
    return buf


def _frequencies(buf: PrioritizedReplayBuffer, n: int, draws: int = 100_000, batch: int = 100) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    index = torch.cat([buf.sample(batch, beta=0.4, generator=g).index for _ in range(draws // batch)])
    return np.bincount(index.numpy(), minlength=n) / len(index)


def _check_tree(buf: PrioritizedReplayBuffer) -> None:
    """Every internal node of the sum-tree (min-tree) is the sum (min) of its children."""
    tree = buf._tree
    nodes = torch.arange(1, tree.leaves)
    torch.testing.assert_close(tree.sum[nodes], tree.sum[2 * nodes] + tree.sum[2 * nodes + 1], rtol=1e-12, atol=0)
    assert torch.equal(tree.min[nodes], torch.minimum(tree.min[2 * nodes], tree.min[2 * nodes + 1]))
    leaves = tree.sum[tree.leaves:]
    torch.testing.assert_close(tree.total, leaves.sum(), rtol=1e-12, atol=0)


def test_sum_tree_frequencies_follow_priorities():
    # 20 slots in a 32-leaf tree. Total variation over 10^5 iid draws from K = 20 cells has
    # mean <= 0.5 sqrt(2K / (pi N)) ~ 0.006, and moves by at most 1/N per draw, so
    # P(TV > mean + 0.014) <= exp(-2 N 0.014^2) ~ e^-39 (McDiarmid); stratification only
    # lowers the variance. 0.02 therefore fails only on a real bias.
    n, alpha, eps = 20, 0.6, 1e-6
    buf = _filled(n, 25, alpha=alpha, eps=eps)
    assert buf._tree.leaves == 32
    # new rows carry the starting max priority 1.0: uniform
    assert 0.5 * np.abs(_frequencies(buf, n) - 1 / n).sum() < 0.02
    rng = np.random.default_rng(1)
    td = rng.exponential(size=n)
    td[3] = 0.0  # eps keeps it drawable
    buf.update_priorities(torch.arange(n), torch.as_tensor(td))
    p = (np.abs(td) + eps) ** alpha
    assert 0.5 * np.abs(_frequencies(buf, n) - p / p.sum()).sum() < 0.02
    _check_tree(buf)
    # a second update of half the slots, with duplicates: the last write wins
    index = np.array([0, 5, 5, 7, 9, 9, 9, 12, 15, 19])
    new_td = rng.exponential(size=len(index)) * 3
    buf.update_priorities(torch.as_tensor(index), torch.as_tensor(-new_td))  # the sign does not matter
    for i, d in zip(index, new_td):
        td[i] = d
    p = (np.abs(td) + eps) ** alpha
    assert 0.5 * np.abs(_frequencies(buf, n) - p / p.sum()).sum() < 0.02
    _check_tree(buf)
    np.testing.assert_allclose(buf._tree.sum[32:32 + n].numpy(), p, rtol=1e-12)


def test_importance_weights_by_hand():
    n, alpha, beta = 12, 0.7, 0.4
    buf = _filled(n, 16, alpha=alpha, eps=0.01)
    td = np.random.default_rng(2).uniform(0, 5, size=n)
    buf.update_priorities(torch.arange(n), torch.as_tensor(td))
    batch = buf.sample(64, beta=beta, generator=torch.Generator().manual_seed(0))
    prob = (td + 0.01) ** alpha / ((td + 0.01) ** alpha).sum()
    w = (n * prob) ** (-beta)
    expected = w[batch.index.numpy()] / w.max()
    np.testing.assert_allclose(batch.weight.numpy(), expected, rtol=1e-6)
    assert batch.weight.dtype == torch.float32 and batch.weight.max() <= 1.0
    torch.testing.assert_close(batch.rew, batch.index.float())  # rows gathered from the sampled slots


def test_stratified_draws_cover_each_segment():
    # equal priorities, batch = number of slots: one draw per equal segment hits every slot once
    buf = _filled(16, 16)
    index = buf.sample(16, beta=1.0, generator=torch.Generator().manual_seed(0)).index
    assert index.tolist() == list(range(16))


def test_new_rows_get_the_max_priority_and_overwrite():
    buf = _filled(6, 6, alpha=1.0, eps=1e-9)
    buf.update_priorities(torch.tensor([0, 1]), torch.tensor([5.0, 0.5]))
    buf.add([[6]], [0.0], [6], [[7]], [False], [False])  # overwrites slot 0
    leaves = buf._tree.sum[8:14].tolist()
    # the new row in slot 0 takes the max priority 5; the untouched rows keep the initial 1.0
    assert leaves == pytest.approx([5.0, 0.5, 1.0, 1.0, 1.0, 1.0], abs=1e-8)
    assert buf._tree.min[14:].tolist() == [float("inf")] * 2  # the rounding-up leaves stay empty
    _check_tree(buf)
    assert buf._tree.smallest.item() == pytest.approx(0.5)


def test_capacity_one_and_empty_leaves_never_drawn():
    one = _filled(3, 1)  # three rows into one slot: the last one stays
    batch = one.sample(4, beta=0.5)
    assert batch.index.tolist() == [0] * 4 and batch.rew.tolist() == [2.0] * 4
    assert batch.weight.tolist() == [1.0] * 4
    part = _filled(5, 8)  # leaves 5..7 of the tree are empty
    part.update_priorities(torch.tensor([4]), torch.tensor([1e3]))  # most mass on the last filled leaf
    index = part.sample(10_000, beta=0.5, generator=torch.Generator().manual_seed(0)).index
    assert index.max().item() == 4 and index.min().item() == 0


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: ReplayBuffer(0, (3,)), "capacity"),
        (lambda: ReplayBuffer(10, (3,), n_step=0), "n_step"),
        (lambda: ReplayBuffer(10, (3,), gamma=1.5), "gamma"),
        (lambda: ReplayBuffer(10, (3,), num_envs=0), "num_envs"),
        (lambda: ReplayBuffer(10, (0, 3)), "obs_shape"),
        (lambda: PrioritizedReplayBuffer(10, (3,), alpha=-1.0), "alpha"),
        (lambda: PrioritizedReplayBuffer(10, (3,), eps=0.0), "eps"),
    ],
)
def test_constructor_errors_name_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_usage_errors_name_the_argument():
    buf = PrioritizedReplayBuffer(8, (3,), num_envs=2)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(4, beta=0.4)
    ok = dict(obs=np.zeros((2, 3)), act=np.zeros(2), rew=np.zeros(2), next_obs=np.zeros((2, 3)),
              terminated=np.zeros(2), truncated=np.zeros(2))
    for name, bad in [("obs", np.zeros((2, 4))), ("next_obs", np.zeros((1, 3))), ("rew", np.zeros(3)),
                      ("act", np.zeros((2, 1))), ("truncated", np.zeros(1))]:
        with pytest.raises(ValueError, match=rf"add: {name} has shape"):
            buf.add(**{**ok, name: bad})
    assert len(buf) == 0  # nothing was written by the rejected steps
    buf.add(**ok)
    with pytest.raises(ValueError, match="batch_size"):
        buf.sample(0, beta=0.4)
    with pytest.raises(ValueError, match="beta"):
        buf.sample(4, beta=-0.1)
    with pytest.raises(ValueError, match="beta"):
        buf.sample(4, torch.Generator())  # the generator passed where beta goes
    with pytest.raises(ValueError, match="index must lie in"):
        buf.update_priorities(torch.tensor([0, 2]), torch.ones(2))
    with pytest.raises(ValueError, match="td_abs must be finite"):
        buf.update_priorities(torch.tensor([0, 1]), torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="td_abs"):
        buf.update_priorities(torch.tensor([0, 1]), torch.ones(3))
    with pytest.raises(ValueError, match="capacity"):
        PrioritizedReplayBuffer(9, (3,), num_envs=2).load_state_dict(buf.state_dict())
    with pytest.raises(ValueError, match="alpha"):
        ReplayBuffer(8, (3,), num_envs=2).load_state_dict(buf.state_dict())


def test_weights_are_normalised_by_the_smallest_priority_in_the_buffer_not_the_batch():
    """w_i = (N P(i))^(-beta) / max_j (N P(j))^(-beta) = (p_i / p_min)^(-beta) with p_min over
    every filled slot, drawn or not (Schaul et al. 2016, Alg. 1). Slot 0 holds a priority so
    small that it is never drawn, so normalising by the batch's own largest weight would give
    a batch maximum of 1 and fail. Checked at several beta, then after slot 0 is overwritten."""
    n, alpha, eps = 10, 0.6, 1e-3
    buf = _filled(n, n, alpha=alpha, eps=eps)
    td = np.random.default_rng(3).uniform(0.5, 4.0, size=n)
    td[0] = 0.0  # p_0 = eps^alpha ~ 0.016, P(0) ~ 1e-3
    buf.update_priorities(torch.arange(n), torch.as_tensor(td))
    p = (td + eps) ** alpha
    g = torch.Generator().manual_seed(0)
    for beta in (0.0, 0.3, 0.7, 1.0):
        batch = buf.sample(8, beta=beta, generator=g)
        assert 0 not in batch.index.tolist()
        np.testing.assert_allclose(batch.weight.numpy(), (p[batch.index.numpy()] / p.min()) ** (-beta), rtol=1e-6)
        if beta > 0:
            assert batch.weight.max() < 0.5  # a batch-max normaliser would give 1
    # a new row overwrites slot 0 with the largest priority: the smallest is now another slot's
    buf.add([[n]], [0.0], [n], [[n + 1]], [False], [False])
    p[0] = p.max()
    batch = buf.sample(8, beta=0.5, generator=g)
    np.testing.assert_allclose(batch.weight.numpy(), (p[batch.index.numpy()] / p.min()) ** -0.5, rtol=1e-6)
