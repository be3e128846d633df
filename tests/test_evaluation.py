"""Evaluation episodes (lit_qlearn.evaluation): the function against episodes rolled by
hand, the callback's schedule, publication, history and hooks."""
import math

import gymnasium as gym
import lightning as L
import numpy as np
import pytest
import torch

from lit_qlearn.algorithms import DQN, TD3
from lit_qlearn.data import OfflineDataModule, OnlineDataModule
from lit_qlearn.data.rollout import make_vector_env, run_episodes
from lit_qlearn.data.types import DataSpec
from lit_qlearn.evaluation import Evaluation, evaluate_module, evaluate_policy
from tests.callbacks.test_crash import MemoryLogger
from tests.conftest import fit

CHAIN = "lit_qlearn.toys:Chain-v0"


def right(obs):
    return np.ones(len(obs), dtype=np.int64)


def left(obs):
    return np.zeros(len(obs), dtype=np.int64)


def by_hand(policy, episodes, seed):
    """Episodes of one environment reset once with ``seed`` and then without (what a
    vector environment's autoreset does): their returns and lengths."""
    env = gym.make(CHAIN)
    obs, _ = env.reset(seed=seed)
    returns, lengths = [], []
    ret, length = 0.0, 0
    while len(returns) < episodes:
        obs, rew, terminated, truncated, _ = env.step(int(policy(obs[None])[0]))
        ret, length = ret + rew, length + 1
        if terminated or truncated:
            returns.append(ret)
            lengths.append(length)
            ret, length = 0.0, 0
            obs, _ = env.reset()
    return returns, lengths


def test_evaluate_policy_is_the_mean_of_the_episodes_rolled_by_hand():
    # moving right reaches the paying end from a random start: return 1, length 5 - start
    returns, lengths = by_hand(right, 6, seed=3)
    assert returns == [1.0] * 6 and len(set(lengths)) > 1  # the starts differ
    result = evaluate_policy(right, CHAIN, 6, seed=3, ref_scores=(-1.0, 3.0))
    assert result["return"] == 1.0
    assert result["length"] == pytest.approx(np.mean(lengths))
    assert result["normalized_score"] == pytest.approx(100 * (1.0 + 1.0) / 4.0)
    # moving left never pays and is cut by the time limit (8 steps); no references: NaN
    result = evaluate_policy(left, CHAIN, 3, seed=3)
    assert (result["return"], result["length"]) == (0.0, 8.0) and np.isnan(result["normalized_score"])
    # a vector environment given is rolled and left open
    env = make_vector_env(CHAIN)
    assert evaluate_policy(right, env, 6, seed=3)["length"] == pytest.approx(np.mean(lengths))
    assert evaluate_policy(right, env, 6, seed=3)["length"] == pytest.approx(np.mean(lengths))
    env.close()
    with pytest.raises(ValueError, match="episodes must be an integer >= 1, got 0"):
        evaluate_policy(right, CHAIN, 0)


def chain_dqn(**kwargs):
    L.seed_everything(0, verbose=False)
    dm = OnlineDataModule(CHAIN, learning_starts=32, batch_size=16, save_buffer=False)
    return DQN(gamma=0.9, critic_hidden=(8,), **kwargs), dm


def test_module_evaluates_every_eval_every_updates_and_publishes_at_the_update():
    module, dm = chain_dqn(eval_every=2, eval_episodes=3)
    logger = MemoryLogger()
    trainer = fit(module, dm, 6, logger=logger, log_every_n_steps=100)
    evaluation = next(cb for cb in trainer.callbacks if isinstance(cb, Evaluation))  # configure_callbacks' one
    assert [entry["step"] for entry in evaluation.history] == [2, 4, 6]
    assert sorted(s for s, row in logger.rows.items() if "eval/return" in row) == [2, 4, 6]
    assert all("eval/normalized_score" not in row for row in logger.rows.values())  # no references for the chain
    # the last one is the final policy's: evaluated again, the same episodes
    again = evaluate_policy(module.act, CHAIN, 3)
    assert logger.rows[6]["eval/return"] == again["return"] and logger.rows[6]["eval/length"] == again["length"]
    assert float(trainer.callback_metrics["eval/length"]) == again["length"]
    direct = module.evaluate(3)  # the method: the same function on the module's environment
    assert (direct["return"], direct["length"]) == (again["return"], again["length"])


def test_evaluation_on_a_callers_schedule_with_a_hook():
    module, dm = chain_dqn()  # eval_every=0: the module adds none
    seen = []

    class EveryThird(Evaluation):
        def due(self, trainer, pl_module):
            return trainer.global_step % 3 == 0

    evaluation = EveryThird(episodes=1, ref_scores=(0.0, 2.0),
                            on_result=lambda trainer, pl_module, result: seen.append((pl_module, result)))
    trainer = fit(module, dm, 7, callbacks=[evaluation])
    assert [e["step"] for e in evaluation.history] == [3, 6]
    assert [r for _, r in seen] == evaluation.history and all(m is module for m, _ in seen)
    entry = evaluation.history[-1]
    assert entry["normalized_score"] == pytest.approx(100 * entry["return"] / 2.0) and entry["seconds"] > 0
    assert float(trainer.callback_metrics["eval/normalized_score"]) == pytest.approx(entry["normalized_score"])


def test_a_trainers_evaluation_replaces_the_modules_own():
    module, dm = chain_dqn(eval_every=2, eval_episodes=1)
    mine = Evaluation(every=5, episodes=1)
    trainer = fit(module, dm, 6, callbacks=[mine])
    assert [cb for cb in trainer.callbacks if isinstance(cb, Evaluation)] == [mine]
    assert [e["step"] for e in mine.history] == [5]


def test_evaluation_without_an_environment(chain_file):
    """The module's own evaluation skips data without an environment id (as it always
    did); an Evaluation the user attached says so at fit start."""
    dm = OfflineDataModule(str(chain_file), batch_size=16)
    module = TD3(critic_hidden=(8,), actor_hidden=(8,), eval_every=1)
    trainer = fit(module, dm, 2)
    assert "eval/return" not in trainer.callback_metrics
    with pytest.raises(ValueError, match="Evaluation: no environment to evaluate TD3 in: the data has no env_id"):
        fit(TD3(critic_hidden=(8,), actor_hidden=(8,), eval_every=0), dm, 1, callbacks=[Evaluation(every=1)])
    with pytest.raises(ValueError, match="every must be an integer >= 0, got -1"):
        Evaluation(every=-1)


# ------------------------------------------------------------ the overestimation gap
def test_run_episodes_gives_each_episodes_first_state_and_discounted_return():
    """Moving right from state s0 pays 1 at step 4 - s0 (0-indexed) and ends there: the
    discounted return is gamma^(4 - s0) and the length 5 - s0. Checked per episode, in
    a SAME_STEP and in a NEXT_STEP vector environment (reset-only steps in between)."""
    gamma = 0.7
    same = make_vector_env(CHAIN, 2)
    next_step = gym.vector.SyncVectorEnv([lambda: gym.make(CHAIN)] * 2)  # gymnasium's default NEXT_STEP
    for env in (same, next_step):
        plain = run_episodes(env, right, 9, seed=3)
        returns, lengths, starts, discounted = run_episodes(env, right, 9, seed=3, gamma=gamma)
        assert (returns, lengths) == plain  # the returns and lengths are what they were
        assert starts.shape == (9, 5) and (starts.sum(1) == 1).all()  # one-hot first observations
        s0 = starts.argmax(1)
        assert len(set(s0)) > 2
        np.testing.assert_array_equal(s0, 5 - np.array(lengths))
        np.testing.assert_allclose(discounted, gamma ** (4 - s0))
        env.close()
    # moving left never pays: every discounted return is 0
    assert run_episodes(make_vector_env(CHAIN), left, 3, seed=3, gamma=gamma)[3] == [0.0] * 3


def linear_chain_dqn(gamma, w_right, bias_right, mean, std):
    """A DQN on the chain whose Q is linear in the normalised state x = (onehot - mean) / std:
    ``Q(x, right) = w_right . x + bias_right`` and ``Q(x, left)`` far below, so greedy is right."""
    module = DQN(gamma=gamma, critic_hidden=())
    module.build_for(DataSpec((5,), num_actions=2, obs_mean=tuple(mean), obs_std=tuple(std)))
    with torch.no_grad():
        module.obs_mean.copy_(torch.tensor(mean))
        module.obs_std.copy_(torch.tensor(std))
        head = module.q_net.head[0]
        head.weight.copy_(torch.stack([torch.zeros(5), torch.tensor(w_right)]))
        head.bias.copy_(torch.tensor([-100.0, bias_right]))
    return module


def test_evaluate_module_measures_q_at_the_normalised_start_states_minus_the_discounted_return():
    gamma, w, b = 0.8, [1.0, -2.0, 0.5, 3.0, 0.25], 0.3
    mean, std = [0.2, 0.1, 0.3, 0.0, 0.4], [0.5, 2.0, 1.0, 4.0, 0.25]
    module = linear_chain_dqn(gamma, w, b, mean, std)
    _, lengths = by_hand(right, 6, seed=3)
    s0 = 5 - np.array(lengths)
    x = (np.eye(5)[s0] - np.array(mean)) / np.array(std)
    q_start = x @ np.array(w) + b
    mc = gamma ** (4 - s0)
    result = evaluate_module(module, CHAIN, 6, seed=3)
    assert result["return"] == 1.0  # greedy is right
    assert result["q_start_mean"] == pytest.approx(q_start.mean(), rel=1e-5)
    assert result["discounted_return_mean"] == pytest.approx(mc.mean())
    assert result["q_overestimation"] == pytest.approx((q_start - mc).mean(), rel=1e-5)
    assert not math.isclose(np.mean(np.eye(5)[s0] @ np.array(w) + b), q_start.mean())  # normalisation matters


def test_the_gap_needs_both_its_arguments_and_a_plain_policy_gets_none():
    assert set(evaluate_policy(right, CHAIN, 2, seed=3)) == {"return", "length", "normalized_score"}
    with pytest.raises(ValueError, match="start_value and gamma go together"):
        evaluate_policy(right, CHAIN, 2, start_value=lambda obs: np.zeros(len(obs)))
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\], got 1.5"):
        evaluate_policy(right, CHAIN, 2, start_value=lambda obs: np.zeros(len(obs)), gamma=1.5)


def test_evaluation_publishes_the_overestimation_gap_at_the_update():
    module, dm = chain_dqn(eval_every=2, eval_episodes=3)
    logger = MemoryLogger()
    trainer = fit(module, dm, 4, logger=logger, log_every_n_steps=100)
    evaluation = next(cb for cb in trainer.callbacks if isinstance(cb, Evaluation))
    for step in (2, 4):
        row = logger.rows[step]
        assert row["eval/q_overestimation"] == pytest.approx(row["eval/q_start_mean"]
                                                             - row["eval/discounted_return_mean"], abs=1e-6)
    entry = evaluation.history[-1]
    again = evaluate_module(module, CHAIN, 3)  # the final policy's, the same episodes
    for key in ("q_overestimation", "q_start_mean", "discounted_return_mean"):
        assert entry[key] == logger.rows[4][f"eval/{key}"] == pytest.approx(again[key])
        assert float(trainer.callback_metrics[f"eval/{key}"]) == pytest.approx(again[key])
