"""Stable-Baselines3 runs at the settings lit_qlearn's online benchmarks compare with:
DQN on CartPole-v1 at the rl-baselines3-zoo settings with a greedy evaluation curve
(benchmarks/online_dqn.py), SAC's environment steps per second on Hopper-v5
(benchmarks/online_speed.py) and sb3-contrib's CrossQ with an evaluation curve
(benchmarks/crossq_sb3.py). Imported only when ``stable_baselines3`` is installed
(``pip install -e '.[bench]'``); :func:`sb3_crossq` imports ``sb3_contrib`` itself."""
from __future__ import annotations

import time
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3 import DQN, SAC
from stable_baselines3.common.callbacks import BaseCallback

__all__ = ["sb3_crossq", "sb3_dqn", "sb3_sac"]


def greedy_return(model: Any, env: gym.Env, episodes: int, seed: int) -> float:
    """The mean return of ``episodes`` deterministic episodes of ``model`` in ``env``, episode k
    reset with ``seed + k``."""
    returns = []
    for k in range(episodes):
        obs, _ = env.reset(seed=seed + k)
        total, done = 0.0, False
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(action)
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    return float(np.mean(returns))


def sb3_dqn(env_id: str, zoo: dict[str, Any], seed: int, max_env_steps: int, eval_every: int, eval_episodes: int,
            solved: float) -> dict[str, Any]:
    """SB3's DQN with the zoo settings ``zoo`` (the keys of online_dqn.ZOO), evaluated greedily
    over ``eval_episodes`` episodes when a collection phase starts (right after SB3's
    ``train()``) once ``eval_every`` more environment steps are done, the evaluation time
    kept out of ``train_seconds``; stops once the mean return reaches ``solved`` or at
    ``max_env_steps``. Returns ``{"curve", "env_steps"}``, a curve point being
    ``{"env_steps", "return", "train_seconds"}``."""
    z = zoo
    env = gym.make(env_id)
    model = DQN("MlpPolicy", env, learning_rate=z["lr"], batch_size=z["batch_size"], buffer_size=z["buffer_size"],
                learning_starts=z["learning_starts"], gamma=z["gamma"], train_freq=z["train_freq"],
                gradient_steps=z["gradient_steps"], target_update_interval=z["target_update_interval"],
                exploration_fraction=z["exploration_fraction"], exploration_final_eps=z["exploration_final_eps"],
                policy_kwargs={"net_arch": z["net_arch"]}, seed=seed, device="cpu", verbose=0)
    eval_env = gym.make(env_id)
    curve: list[dict[str, float]] = []

    class Evaluate(BaseCallback):
        """Greedy evaluation when a collection phase starts, i.e. right after SB3's train()."""

        def _on_training_start(self) -> None:
            self.start, self.eval_seconds, self.next_eval, self.solved = time.perf_counter(), 0.0, eval_every, False

        def _on_step(self) -> bool:
            return not self.solved  # False stops learn()

        def _on_rollout_start(self) -> None:
            steps = self.num_timesteps
            if steps < self.next_eval:
                return
            t0 = time.perf_counter()
            mean_return = greedy_return(self.model, eval_env, eval_episodes, seed=10_000 * (len(curve) + 1))
            self.eval_seconds += time.perf_counter() - t0
            curve.append({"env_steps": steps, "return": mean_return,
                          "train_seconds": time.perf_counter() - self.start - self.eval_seconds})
            self.next_eval += eval_every
            self.solved = curve[-1]["return"] >= solved

    model.learn(total_timesteps=max_env_steps, callback=Evaluate())
    eval_env.close()
    return {"curve": curve, "env_steps": int(model.num_timesteps)}


def sb3_sac(steps: int, warmup: int, seed: int) -> float:
    """SB3's SAC on Hopper-v5 (one update per environment step, batch 256, 256x256, Adam
    3e-4, tau 0.005, a 1M buffer, ``warmup`` random steps first): environment steps per
    second over ``steps`` steps timed from 10 steps after the warm-up."""
    model = SAC("MlpPolicy", gym.make("Hopper-v5"), learning_rate=3e-4, buffer_size=1_000_000,
                learning_starts=warmup, batch_size=256, tau=0.005, gamma=0.99, train_freq=1, gradient_steps=1,
                policy_kwargs={"net_arch": [256, 256]}, seed=seed, device="cpu", verbose=0)
    clock: dict[str, float] = {}

    class Clock(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps == warmup + 10:
                clock["start"] = time.perf_counter()
            return True

    model.learn(total_timesteps=warmup + 10 + steps, callback=Clock())
    return steps / (time.perf_counter() - clock["start"])


def sb3_crossq(env_id: str, settings: dict[str, Any], seed: int, steps: int, eval_every: int,
               episodes: int) -> dict[str, Any]:
    """sb3-contrib's CrossQ on ``env_id`` for ``steps`` environment steps with ``settings``
    (the keys of crossq_sb3.SETTINGS), greedy (deterministic) evaluation of ``episodes``
    episodes at every multiple of ``eval_every`` environment steps, from reset seed 10000,
    its time kept out of ``train_seconds``. Returns ``{"curve"}``, a point being
    ``{"env_steps", "return", "train_seconds"}``."""
    from sb3_contrib import CrossQ

    s = settings
    model = CrossQ("MlpPolicy", gym.make(env_id), learning_rate=s["lr"], buffer_size=s["buffer_size"],
                   learning_starts=s["learning_starts"], batch_size=s["batch_size"], gamma=s["gamma"], train_freq=1,
                   gradient_steps=1, policy_delay=s["policy_delay"],
                   policy_kwargs={"net_arch": {"pi": list(s["actor_hidden"]), "qf": list(s["critic_hidden"])}},
                   seed=seed, device="cpu", verbose=0)
    eval_env = gym.make(env_id)
    curve: list[dict[str, float]] = []

    class Evaluate(BaseCallback):
        def _on_training_start(self) -> None:
            self.start, self.eval_seconds = time.perf_counter(), 0.0

        def _on_step(self) -> bool:
            if self.num_timesteps % eval_every:
                return True
            t0 = time.perf_counter()
            mean_return = greedy_return(self.model, eval_env, episodes, seed=10_000)
            self.eval_seconds += time.perf_counter() - t0
            curve.append({"env_steps": self.num_timesteps, "return": mean_return,
                          "train_seconds": time.perf_counter() - self.start - self.eval_seconds})
            return True

    model.learn(total_timesteps=steps, callback=Evaluate())
    eval_env.close()
    return {"curve": curve}
