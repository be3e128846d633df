"""CleanRL's ``pqn.py`` (vwxyzjn/cleanrl, cleanrl/pqn.py) as a function: what
benchmarks/pqn_cartpole.py measures lit_qlearn's ``PQN`` against.

The loop is CleanRL's, step for step: ``num_envs`` gymnasium environments in a
``SyncVectorEnv`` (reset in the step that ends an episode, as gymnasium 0.29, which the
script was written for, did; each wrapped in ``RecordEpisodeStatistics`` as there), an MLP
120-84 with LayerNorm and ReLU initialised orthogonally (gain sqrt(2), zero biases), RAdam
with the rate annealed per iteration, epsilon-greedy with ``linear_schedule`` at the step
count after the step, the Q-value of the greedy action stored while acting, the Q(lambda) recursion as the script writes it
(a truncation is a termination; at a terminal step ``gamma lambda G_{t+1}`` of the next
episode is added, only the one-step bootstrap is cut), then ``update_epochs`` passes of
``np.random.shuffle``-d minibatches, MSE loss, the global gradient norm clipped. What the
script only logs (TensorBoard, stdout every episode) is left out; episode returns are
recorded per iteration instead. Its defaults are CleanRL's CartPole-v1 settings.
"""
from __future__ import annotations

import random
import time
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CLEANRL_PQN", "cleanrl_pqn"]

#: CleanRL pqn.py's ``Args`` defaults (the CartPole-v1 settings of its docs' table)
CLEANRL_PQN = dict(total_timesteps=500_000, learning_rate=2.5e-4, num_envs=4, num_steps=128, num_minibatches=4,
                   update_epochs=4, anneal_lr=True, gamma=0.99, start_e=1.0, end_e=0.05, exploration_fraction=0.5,
                   max_grad_norm=10.0, q_lambda=0.65)


def _q_network(obs_dim: int, num_actions: int) -> nn.Sequential:
    layers = [nn.Linear(obs_dim, 120), nn.LayerNorm(120), nn.ReLU(), nn.Linear(120, 84), nn.LayerNorm(84), nn.ReLU(),
              nn.Linear(84, num_actions)]
    for layer in layers:
        if isinstance(layer, nn.Linear):  # CleanRL's layer_init
            nn.init.orthogonal_(layer.weight, np.sqrt(2))
            nn.init.constant_(layer.bias, 0.0)
    return nn.Sequential(*layers)


def cleanrl_pqn(env_id: str, seed: int, **settings: Any) -> dict[str, Any]:
    """Train as ``python cleanrl/pqn.py --env-id ENV --seed SEED`` would (``settings``
    override :data:`CLEANRL_PQN`). Returns ``curve`` (per iteration: ``env_steps``,
    ``episodes`` finished, their ``return_sum``), ``env_steps``, ``seconds`` (the loop,
    from after the first reset, as the script's SPS) and ``network`` (the trained Q-network)."""
    a = {**CLEANRL_PQN, **settings}
    batch_size = a["num_envs"] * a["num_steps"]
    minibatch_size = batch_size // a["num_minibatches"]
    num_iterations = a["total_timesteps"] // batch_size
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    def thunk(i: int):
        def make() -> gym.Env:
            env = gym.wrappers.RecordEpisodeStatistics(gym.make(env_id))
            env.action_space.seed(seed + i)
            return env
        return make

    envs = gym.vector.SyncVectorEnv([thunk(i) for i in range(a["num_envs"])],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    num_actions = envs.single_action_space.n
    q_network = _q_network(int(np.prod(envs.single_observation_space.shape)), num_actions)
    optimizer = torch.optim.RAdam(q_network.parameters(), lr=a["learning_rate"])

    shape = (a["num_steps"], a["num_envs"])
    obs = torch.zeros(shape + envs.single_observation_space.shape)
    actions = torch.zeros(shape + envs.single_action_space.shape)
    rewards, dones, values = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)

    global_step = 0
    episode_return = np.zeros(a["num_envs"])
    curve: list[dict[str, float]] = []
    start = time.perf_counter()
    next_obs = torch.Tensor(envs.reset(seed=seed)[0])
    next_done = torch.zeros(a["num_envs"])
    duration = a["exploration_fraction"] * a["total_timesteps"]
    for iteration in range(1, num_iterations + 1):
        if a["anneal_lr"]:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * a["learning_rate"]
        finished, return_sum = 0, 0.0
        for step in range(a["num_steps"]):
            global_step += a["num_envs"]
            obs[step], dones[step] = next_obs, next_done
            epsilon = max((a["end_e"] - a["start_e"]) / duration * global_step + a["start_e"], a["end_e"])
            random_actions = torch.randint(0, num_actions, (a["num_envs"],))
            with torch.no_grad():
                q_values = q_network(next_obs)
                max_actions = torch.argmax(q_values, dim=1)
                values[step] = q_values[torch.arange(a["num_envs"]), max_actions].flatten()
            explore = torch.rand((a["num_envs"],)) < epsilon
            action = torch.where(explore, random_actions, max_actions)
            actions[step] = action
            next_obs_np, reward, terminations, truncations, _ = envs.step(action.cpu().numpy())
            done = np.logical_or(terminations, truncations)
            rewards[step] = torch.tensor(reward).view(-1)
            next_obs, next_done = torch.Tensor(next_obs_np), torch.Tensor(done)
            episode_return += reward  # (the script reads RecordEpisodeStatistics' info)
            finished += int(done.sum())
            return_sum += float(episode_return[done].sum())
            episode_return[done] = 0.0

        with torch.no_grad():  # the script's Q(lambda) recursion
            returns = torch.zeros_like(rewards)
            for t in reversed(range(a["num_steps"])):
                if t == a["num_steps"] - 1:
                    next_value, _ = torch.max(q_network(next_obs), dim=-1)
                    returns[t] = rewards[t] + a["gamma"] * next_value * (1.0 - next_done)
                else:
                    returns[t] = rewards[t] + a["gamma"] * (
                        a["q_lambda"] * returns[t + 1] + (1 - a["q_lambda"]) * values[t + 1] * (1.0 - dones[t + 1]))

        b_obs = obs.reshape((-1,) + envs.single_observation_space.shape)
        b_actions = actions.reshape((-1,) + envs.single_action_space.shape)
        b_returns = returns.reshape(-1)
        b_inds = np.arange(batch_size)
        for _ in range(a["update_epochs"]):
            np.random.shuffle(b_inds)
            for begin in range(0, batch_size, minibatch_size):
                mb_inds = b_inds[begin:begin + minibatch_size]
                old_val = q_network(b_obs[mb_inds]).gather(1, b_actions[mb_inds].unsqueeze(-1).long()).squeeze()
                loss = F.mse_loss(b_returns[mb_inds], old_val)
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(q_network.parameters(), a["max_grad_norm"])
                optimizer.step()
        curve.append({"env_steps": global_step, "episodes": finished, "return_sum": return_sum})
    seconds = time.perf_counter() - start
    envs.close()
    return {"curve": curve, "env_steps": global_step, "seconds": seconds, "network": q_network}
