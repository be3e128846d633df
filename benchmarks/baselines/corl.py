"""CORL-style hand-written offline loops (Tarasov et al. 2022, ``algorithms/offline/{td3_bc,cql,iql}.py``),
the reference benchmarks/offline_speed.py measures lit_qlearn's TD3+BC, CQL and IQL against.

Each loop is the corresponding CORL script as written: separate networks with their own
``torch.optim.Adam`` (defaults), the replay tensors indexed with ``np.random.randint``, the
losses ``.item()``-ed into a log dict every update, Polyak targets by ``param.data.copy_``.
TD3+BC: two critics and an actor, the actor and targets every ``policy_freq`` updates. CQL:
CORL's ContinuousCQL.train (the policy and temperature losses first, then the critics' TD +
CQL(H) loss with the two critics evaluated separately on 10 uniform, 10 pi(.|s) and 10
pi(.|s') actions per state, then the temperature, actor and critic steps in that order; a
torch.distributions tanh-Gaussian actor; 3x256 networks). IQL: CORL's
ImplicitQLearning.train (V(s'), the expectile value step, the twin-Q step and its target,
then the advantage-weighted actor step and its cosine schedule; 2x256 networks).

Each ``corl_*(data, updates, warmup, seed)`` takes the D4RL-format arrays (``read_d4rl``),
runs ``warmup`` untimed updates and ``updates`` timed ones, and returns the steady-state
updates per second.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, TanhTransform, TransformedDistribution
from torch.optim.lr_scheduler import CosineAnnealingLR

__all__ = ["corl_cql", "corl_iql", "corl_td3bc"]


class CorlActor(nn.Module):
    def __init__(self, state_dim: int, action_dim: int, max_action: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, action_dim), nn.Tanh())
        self.max_action = max_action

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.max_action * self.net(state)


class CorlCritic(nn.Module):
    def __init__(self, state_dim: int, action_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim + action_dim, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, 1))

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([state, action], 1))


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    for target_param, source_param in zip(target.parameters(), source.parameters()):
        target_param.data.copy_((1 - tau) * target_param.data + tau * source_param.data)


def corl_td3bc(data: dict[str, np.ndarray], updates: int, warmup: int, seed: int, flush: bool = False) -> float:
    """CORL's TD3_BC.train, batch by batch; returns steady-state updates per second.
    ``flush``: with denormal floats flushed to zero, as lit_qlearn fits (an ablation)."""
    torch.set_flush_denormal(flush)
    torch.manual_seed(seed)
    np.random.seed(seed)
    states, actions = torch.tensor(data["observations"]), torch.tensor(data["actions"])
    rewards, next_states = torch.tensor(data["rewards"])[:, None], torch.tensor(data["next_observations"])
    dones = torch.tensor(data["terminals"], dtype=torch.float32)[:, None]
    state_dim, action_dim, max_action = states.shape[1], actions.shape[1], 1.0
    actor = CorlActor(state_dim, action_dim, max_action)
    actor_target = copy.deepcopy(actor)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=3e-4)
    critic_1, critic_2 = CorlCritic(state_dim, action_dim), CorlCritic(state_dim, action_dim)
    critic_1_target, critic_2_target = copy.deepcopy(critic_1), copy.deepcopy(critic_2)
    critic_1_optimizer = torch.optim.Adam(critic_1.parameters(), lr=3e-4)
    critic_2_optimizer = torch.optim.Adam(critic_2.parameters(), lr=3e-4)
    discount, tau, policy_noise, noise_clip, policy_freq, alpha = 0.99, 0.005, 0.2, 0.5, 2, 2.5
    size, total_it = len(states), 0

    def train() -> dict[str, float]:
        nonlocal total_it
        total_it += 1
        indices = np.random.randint(0, size, size=256)
        state, action, reward, next_state, done = (t[indices] for t in (states, actions, rewards, next_states, dones))
        log_dict = {}
        not_done = 1 - done
        with torch.no_grad():
            noise = (torch.randn_like(action) * policy_noise).clamp(-noise_clip, noise_clip)
            next_action = (actor_target(next_state) + noise).clamp(-max_action, max_action)
            target_q = torch.min(critic_1_target(next_state, next_action), critic_2_target(next_state, next_action))
            target_q = reward + not_done * discount * target_q
        current_q1, current_q2 = critic_1(state, action), critic_2(state, action)
        critic_loss = F.mse_loss(current_q1, target_q) + F.mse_loss(current_q2, target_q)
        log_dict["critic_loss"] = critic_loss.item()
        critic_1_optimizer.zero_grad()
        critic_2_optimizer.zero_grad()
        critic_loss.backward()
        critic_1_optimizer.step()
        critic_2_optimizer.step()
        if total_it % policy_freq == 0:
            pi = actor(state)
            q = critic_1(state, pi)
            lmbda = alpha / q.abs().mean().detach()
            actor_loss = -lmbda * q.mean() + F.mse_loss(pi, action)
            log_dict["actor_loss"] = actor_loss.item()
            actor_optimizer.zero_grad()
            actor_loss.backward()
            actor_optimizer.step()
            soft_update(critic_1_target, critic_1, tau)
            soft_update(critic_2_target, critic_2, tau)
            soft_update(actor_target, actor, tau)
        return log_dict

    try:
        return timed_loop(updates, warmup, train)
    finally:
        torch.set_flush_denormal(False)


# ------------------------------------------------------------------ CORL-style CQL and IQL
def corl_sampler(data: dict[str, np.ndarray], seed: int) -> tuple[Callable[[], list[torch.Tensor]], int, int]:
    """Seed as CORL's set_seed does, fill CORL's ReplayBuffer (states normalised as with
    its ``normalize=True``: ``(s - mean) / (std + 1e-3)``) and return its ``sample(256)``
    with the state and action sizes. Denormals are left as PyTorch's default has them."""
    torch.set_flush_denormal(False)
    torch.manual_seed(seed)
    np.random.seed(seed)
    mean, std = data["observations"].mean(0), data["observations"].std(0) + 1e-3
    tensors = [torch.tensor((data["observations"] - mean) / std, dtype=torch.float32),
               torch.tensor(data["actions"], dtype=torch.float32),
               torch.tensor(data["rewards"][..., None], dtype=torch.float32),
               torch.tensor((data["next_observations"] - mean) / std, dtype=torch.float32),
               torch.tensor(data["terminals"][..., None], dtype=torch.float32)]
    size = len(tensors[0])

    def sample() -> list[torch.Tensor]:
        indices = np.random.randint(0, size, size=256)
        return [t[indices] for t in tensors]

    return sample, tensors[0].shape[1], tensors[1].shape[1]


def corl_mlp(dims: list[int], output: nn.Module | None = None) -> nn.Sequential:
    """Linear + ReLU between ``dims``, a plain Linear last, then ``output`` if given."""
    layers: list[nn.Module] = []
    for width_in, width_out in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
    layers.append(nn.Linear(dims[-2], dims[-1]))
    return nn.Sequential(*layers, *([output] if output is not None else []))


class CorlScalar(nn.Module):
    """CORL's Scalar: one learnable number, returned by calling the module."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.constant = nn.Parameter(torch.tensor(value, dtype=torch.float32))

    def forward(self) -> nn.Parameter:
        return self.constant


def repeat_states(states: torch.Tensor, repeat: int) -> torch.Tensor:
    """CORL's extend_and_repeat(states, 1, repeat): ``(B, d)`` to ``(B, repeat, d)``."""
    return states.unsqueeze(1).repeat_interleave(repeat, dim=1)


class CorlTanhGaussianPolicy(nn.Module):
    """CORL's CQL TanhGaussianPolicy: 3x256 to (mean, log_std), log_std scaled and shifted
    by learnable scalars (1, -1) and clamped to [-20, 2], a torch.distributions Normal
    through TanhTransform, sampled by rsample; the last layer xavier(gain 1e-2) as CORL's
    init_module_weights does without orthogonal init (CORL builds its actor so)."""

    def __init__(self, state_dim: int, action_dim: int, max_action: float) -> None:
        super().__init__()
        self.action_dim, self.max_action = action_dim, max_action
        self.base_network = corl_mlp([state_dim, 256, 256, 256, 2 * action_dim])
        nn.init.xavier_uniform_(self.base_network[-1].weight, gain=1e-2)
        nn.init.constant_(self.base_network[-1].bias, 0.0)
        self.log_std_multiplier, self.log_std_offset = CorlScalar(1.0), CorlScalar(-1.0)

    def forward(self, observations: torch.Tensor, repeat: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if repeat is not None:
            observations = repeat_states(observations, repeat)
        mean, log_std = torch.split(self.base_network(observations), self.action_dim, dim=-1)
        log_std = torch.clamp(self.log_std_multiplier() * log_std + self.log_std_offset(), -20.0, 2.0)
        distribution = TransformedDistribution(Normal(mean, torch.exp(log_std)), TanhTransform(cache_size=1))
        actions = distribution.rsample()
        return self.max_action * actions, torch.sum(distribution.log_prob(actions), dim=-1)


class CorlQFunction(nn.Module):
    """CORL's CQL FullyConnectedQFunction: 3x256, orthogonal init (its config's
    ``orthogonal_init=True``), ``(B, N, da)`` actions evaluated at the repeated states."""

    def __init__(self, state_dim: int, action_dim: int) -> None:
        super().__init__()
        self.network = corl_mlp([state_dim + action_dim, 256, 256, 256, 1])
        for layer in self.network[:-1]:
            if isinstance(layer, nn.Linear):
                nn.init.orthogonal_(layer.weight, gain=np.sqrt(2))
                nn.init.constant_(layer.bias, 0.0)
        nn.init.orthogonal_(self.network[-1].weight, gain=1e-2)
        nn.init.constant_(self.network[-1].bias, 0.0)

    def forward(self, observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        batch_size, multiple = observations.shape[0], actions.ndim == 3
        if multiple:
            observations = repeat_states(observations, actions.shape[1]).reshape(-1, observations.shape[-1])
            actions = actions.reshape(-1, actions.shape[-1])
        q_values = torch.squeeze(self.network(torch.cat([observations, actions], dim=-1)), dim=-1)
        return q_values.reshape(batch_size, -1) if multiple else q_values


def timed_loop(updates: int, warmup: int, update: Callable[[], dict[str, float]]) -> float:
    """Run ``warmup + updates`` calls of ``update``, keeping each log dict as CORL hands
    it to its logger; return the steady-state updates per second."""
    logs, start = [], 0.0
    for it in range(1, updates + warmup + 1):
        if it == warmup + 1:
            start = time.perf_counter()
        logs.append(update())
    return updates / (time.perf_counter() - start)


def corl_cql(data: dict[str, np.ndarray], updates: int, warmup: int, seed: int) -> float:
    """CORL's ContinuousCQL.train at its D4RL config (cql_alpha 10, 10 actions, temperature
    1, importance sampling, no Lagrange, no max backup, no entropy backup, bc_steps 0,
    policy lr 3e-5, Q lr 3e-4, tau 5e-3 every update), batch by batch; updates per second."""
    sample, state_dim, action_dim = corl_sampler(data, seed)
    critic_1, critic_2 = CorlQFunction(state_dim, action_dim), CorlQFunction(state_dim, action_dim)
    critic_1_optimizer = torch.optim.Adam(list(critic_1.parameters()), 3e-4)
    critic_2_optimizer = torch.optim.Adam(list(critic_2.parameters()), 3e-4)
    actor = CorlTanhGaussianPolicy(state_dim, action_dim, 1.0)
    actor_optimizer = torch.optim.Adam(actor.parameters(), 3e-5)
    target_critic_1, target_critic_2 = copy.deepcopy(critic_1), copy.deepcopy(critic_2)
    log_alpha = CorlScalar(0.0)
    alpha_optimizer = torch.optim.Adam(log_alpha.parameters(), lr=3e-5)
    log_alpha_prime = CorlScalar(1.0)  # CORL builds alpha' and its optimiser; unused without Lagrange
    torch.optim.Adam(log_alpha_prime.parameters(), lr=3e-4)
    target_entropy, discount, tau = -float(action_dim), 0.99, 5e-3
    n_actions, cql_temp, cql_alpha = 10, 1.0, 10.0

    def train() -> dict[str, float]:
        observations, actions, rewards, next_observations, dones = sample()
        new_actions, log_pi = actor(observations)
        alpha_loss = -(log_alpha() * (log_pi + target_entropy).detach()).mean()
        alpha = log_alpha().exp() * 1.0  # alpha_multiplier
        q_new_actions = torch.min(critic_1(observations, new_actions), critic_2(observations, new_actions))
        policy_loss = (alpha * log_pi - q_new_actions).mean()
        log_dict = dict(log_pi=log_pi.mean().item(), policy_loss=policy_loss.item(), alpha_loss=alpha_loss.item(),
                        alpha=alpha.item())
        # the critics' loss (CORL's _q_loss)
        q1_predicted, q2_predicted = critic_1(observations, actions), critic_2(observations, actions)
        new_next_actions, _ = actor(next_observations)
        target_q_values = torch.min(target_critic_1(next_observations, new_next_actions),
                                    target_critic_2(next_observations, new_next_actions))
        td_target = (rewards + (1.0 - dones) * discount * target_q_values.unsqueeze(-1).detach()).squeeze(-1)
        qf1_loss, qf2_loss = F.mse_loss(q1_predicted, td_target.detach()), F.mse_loss(q2_predicted, td_target.detach())
        batch_size = actions.shape[0]
        random_actions = actions.new_empty((batch_size, n_actions, action_dim), requires_grad=False).uniform_(-1, 1)
        current_actions, current_log_pis = (t.detach() for t in actor(observations, repeat=n_actions))
        next_actions, next_log_pis = (t.detach() for t in actor(next_observations, repeat=n_actions))
        random_density = np.log(0.5**action_dim)
        per_critic = {}
        for i, critic, q_predicted in ((1, critic_1, q1_predicted), (2, critic_2, q2_predicted)):
            q_rand = critic(observations, random_actions)
            q_current = critic(observations, current_actions)
            q_next = critic(observations, next_actions)
            std_q = torch.std(torch.cat([q_rand, q_predicted.unsqueeze(1), q_next, q_current], dim=1), dim=1)
            cat_q = torch.cat([q_rand - random_density, q_next - next_log_pis, q_current - current_log_pis], dim=1)
            ood = torch.logsumexp(cat_q / cql_temp, dim=1) * cql_temp
            diff = torch.clamp(ood - q_predicted, -np.inf, np.inf).mean()
            per_critic[i] = dict(std=std_q, rand=q_rand, current=q_current, next=q_next, diff=diff,
                                 min_qf_loss=diff * cql_alpha)
        alpha_prime_loss, alpha_prime = observations.new_tensor(0.0), observations.new_tensor(0.0)
        qf_loss = qf1_loss + qf2_loss + per_critic[1]["min_qf_loss"] + per_critic[2]["min_qf_loss"]
        log_dict.update(qf1_loss=qf1_loss.item(), qf2_loss=qf2_loss.item(), alpha=alpha.item(),
                        average_qf1=q1_predicted.mean().item(), average_qf2=q2_predicted.mean().item(),
                        average_target_q=target_q_values.mean().item())
        for key in ("std", "rand", "min_qf_loss", "diff", "current", "next"):
            for i in (1, 2):
                log_dict[f"cql_{key}_q{i}"] = per_critic[i][key].mean().item()
        log_dict.update(alpha_prime_loss=alpha_prime_loss.item(), alpha_prime=alpha_prime.item())
        # the steps, in CORL's order: temperature, actor, critics, targets
        alpha_optimizer.zero_grad()
        alpha_loss.backward()
        alpha_optimizer.step()
        actor_optimizer.zero_grad()
        policy_loss.backward()
        actor_optimizer.step()
        critic_1_optimizer.zero_grad()
        critic_2_optimizer.zero_grad()
        qf_loss.backward(retain_graph=True)
        critic_1_optimizer.step()
        critic_2_optimizer.step()
        soft_update(target_critic_1, critic_1, tau)
        soft_update(target_critic_2, critic_2, tau)
        return log_dict

    return timed_loop(updates, warmup, train)


class CorlTwinQ(nn.Module):
    """CORL's IQL TwinQ: two 2x256 MLPs in one module (one optimiser), ``cat(s, a)`` once."""

    def __init__(self, state_dim: int, action_dim: int) -> None:
        super().__init__()
        self.q1, self.q2 = (corl_mlp([state_dim + action_dim, 256, 256, 1]) for _ in range(2))

    def both(self, state: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sa = torch.cat([state, action], 1)
        return self.q1(sa).squeeze(-1), self.q2(sa).squeeze(-1)

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return torch.min(*self.both(state, action))


class CorlGaussianPolicy(nn.Module):
    """CORL's IQL GaussianPolicy: a 2x256 tanh-bounded mean, a state-independent log-std
    clamped to [-20, 2], returned as a torch.distributions Normal."""

    def __init__(self, state_dim: int, action_dim: int) -> None:
        super().__init__()
        self.net = corl_mlp([state_dim, 256, 256, action_dim], nn.Tanh())
        self.log_std = nn.Parameter(torch.zeros(action_dim, dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> Normal:
        return Normal(self.net(obs), torch.exp(self.log_std.clamp(-20.0, 2.0)))


def corl_iql(data: dict[str, np.ndarray], updates: int, warmup: int, seed: int) -> float:
    """CORL's ImplicitQLearning.train at its defaults (expectile 0.7, beta 3, weights
    clipped at 100, Adam 3e-4 for V, Q and the actor, the actor's CosineAnnealingLR over
    10^6 steps, tau 0.005 every update), batch by batch; updates per second."""
    sample, state_dim, action_dim = corl_sampler(data, seed)
    q_network, v_network = CorlTwinQ(state_dim, action_dim), corl_mlp([state_dim, 256, 256, 1])
    actor = CorlGaussianPolicy(state_dim, action_dim)
    v_optimizer = torch.optim.Adam(v_network.parameters(), lr=3e-4)
    q_optimizer = torch.optim.Adam(q_network.parameters(), lr=3e-4)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=3e-4)
    q_target = copy.deepcopy(q_network).requires_grad_(False)
    actor_lr_schedule = CosineAnnealingLR(actor_optimizer, 1_000_000)
    iql_tau, beta, discount, tau = 0.7, 3.0, 0.99, 0.005

    def train() -> dict[str, float]:
        observations, actions, rewards, next_observations, dones = sample()
        log_dict = {}
        with torch.no_grad():
            next_v = v_network(next_observations).squeeze(-1)
        # value: expectile regression onto the target twin-Q's min (CORL's _update_v)
        with torch.no_grad():
            target_q = q_target(observations, actions)
        adv = target_q - v_network(observations).squeeze(-1)
        v_loss = torch.mean(torch.abs(iql_tau - (adv < 0).float()) * adv**2)
        log_dict["value_loss"] = v_loss.item()
        v_optimizer.zero_grad()
        v_loss.backward()
        v_optimizer.step()
        # Q onto r + discount (1 - done) V(s'), then its target (CORL's _update_q)
        rewards, dones = rewards.squeeze(dim=-1), dones.squeeze(dim=-1)
        targets = rewards + (1.0 - dones.float()) * discount * next_v.detach()
        qs = q_network.both(observations, actions)
        q_loss = sum(F.mse_loss(q, targets) for q in qs) / len(qs)
        log_dict["q_loss"] = q_loss.item()
        q_optimizer.zero_grad()
        q_loss.backward()
        q_optimizer.step()
        soft_update(q_target, q_network, tau)
        # actor: advantage-weighted log-likelihood of the data's actions (CORL's _update_policy)
        exp_adv = torch.exp(beta * adv.detach()).clamp(max=100.0)
        bc_losses = -actor(observations).log_prob(actions).sum(-1, keepdim=False)
        policy_loss = torch.mean(exp_adv * bc_losses)
        log_dict["actor_loss"] = policy_loss.item()
        actor_optimizer.zero_grad()
        policy_loss.backward()
        actor_optimizer.step()
        actor_lr_schedule.step()
        return log_dict

    return timed_loop(updates, warmup, train)
