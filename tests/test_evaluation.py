"""Evaluation episodes (lit_qlearn.evaluation): the function against episodes rolled by
hand, the callback's schedule, publication, history and hooks."""
import gymnasium as gym
import lightning as L
import numpy as np
import pytest

from lit_qlearn.algorithms import DQN, TD3
from lit_qlearn.data import OfflineDataModule, OnlineDataModule
from lit_qlearn.data.rollout import make_vector_env
from lit_qlearn.evaluation import Evaluation, evaluate_policy
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
