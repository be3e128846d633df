"""A small hand-written TD3 loop in Lightning Fabric with lit_qlearn's callbacks at the
documented points (``on_fabric_setup`` once, ``on_fabric_update`` after each update,
``on_fabric_end`` at the end): what tests/test_fabric.py and its DDP script run.

The data are a fixed batch of transitions (an offline-like buffer); every rank draws the
same global minibatch and target noise from one seeded generator and trains on its share of
the rows, so that under DDP (gradients averaged over equal shares) the run is the
one-device run on the whole minibatch."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lit_qlearn.data.types import Transitions
from lit_qlearn.networks import mlp


class QNet(nn.Module):
    """One critic member, ``(obs, act) -> (N,)``."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.net = mlp(obs_dim + act_dim, 1, hidden)

    def forward(self, obs: Tensor, act: Tensor) -> Tensor:
        return self.net(torch.cat([obs, act], dim=-1)).squeeze(-1)


class TwinCritic(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.q1, self.q2 = QNet(obs_dim, act_dim, hidden), QNet(obs_dim, act_dim, hidden)

    def forward(self, obs: Tensor, act: Tensor) -> Tensor:
        return torch.stack([self.q1(obs, act), self.q2(obs, act)])


class Agent(nn.Module):
    """TD3's networks, with the probe protocol (``gamma``, ``q_value``, ``greedy_action``,
    ``q_network``, ``q_networks``) that the callbacks ask for."""

    def __init__(self, obs_dim: int, act_dim: int, gamma: float = 0.99, hidden: tuple[int, ...] = (32, 32)) -> None:
        super().__init__()
        self.gamma = gamma
        self.actor = nn.Sequential(mlp(obs_dim, act_dim, hidden), nn.Tanh())
        self.critic = TwinCritic(obs_dim, act_dim, hidden)
        self.actor_target, self.critic_target = copy.deepcopy(self.actor), copy.deepcopy(self.critic)
        for p in [*self.actor_target.parameters(), *self.critic_target.parameters()]:
            p.requires_grad_(False)

    def q_network(self) -> nn.Module:
        return self.critic.q1

    def q_networks(self) -> list[nn.Module]:
        return [self.critic.q1, self.critic.q2]

    def q_value(self, obs: Tensor, act: Tensor) -> Tensor:
        return self.critic.q1(obs, act)

    def greedy_action(self, obs: Tensor) -> Tensor:
        return self.actor(obs)


def make_data(n: int = 256, obs_dim: int = 3, act_dim: int = 1, seed: int = 123) -> Transitions:
    g = torch.Generator().manual_seed(seed)
    return Transitions(obs=torch.randn(n, obs_dim, generator=g), act=torch.rand(n, act_dim, generator=g) * 2 - 1,
                       rew=torch.rand(n, generator=g), next_obs=torch.randn(n, obs_dim, generator=g),
                       terminated=(torch.rand(n, generator=g) < 0.05).float())


class Loop:
    """TD3 (policy delay 2, target noise 0.2 clipped at 0.5, Polyak ``tau``) in ``fabric``."""

    def __init__(self, fabric: Any, data: Transitions, lr: float = 1e-3, tau: float = 0.005, gamma: float = 0.99,
                 batch_size: int = 32, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.fabric, self.data, self.tau, self.batch_size = fabric, data, tau, batch_size
        self.agent = Agent(data.obs.shape[1], data.act.shape[1], gamma)
        self.actor, self.actor_opt = fabric.setup(self.agent.actor, torch.optim.Adam(self.agent.actor.parameters(), lr))
        self.critic, self.critic_opt = fabric.setup(self.agent.critic,
                                                    torch.optim.Adam(self.agent.critic.parameters(), lr))
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.step = 0

    def state(self, **callbacks: Any) -> dict[str, Any]:
        """What the loop saves with ``fabric.save`` (``callbacks``: those to save with it)."""
        return {"agent": self.agent, "actor_opt": self.actor_opt, "critic_opt": self.critic_opt,
                "generator": _GeneratorState(self.generator), "step": _Counter(self), **callbacks}

    def update(self) -> None:
        fabric, agent = self.fabric, self.agent
        idx = torch.randint(len(self.data.obs), (self.batch_size,), generator=self.generator)
        noise = (0.2 * torch.randn(self.batch_size, self.data.act.shape[1], generator=self.generator)).clamp(-.5, .5)
        mine = slice(fabric.global_rank, None, fabric.world_size)  # this rank's share of the global minibatch
        b = self.data.map(lambda t: t[idx[mine]].to(fabric.device))
        with torch.no_grad():
            next_act = (agent.actor_target(b.next_obs) + noise[mine]).clamp(-1, 1)
            y = b.rew + agent.gamma * (1 - b.terminated) * agent.critic_target(b.next_obs, next_act).min(0).values
        critic_loss = (self.critic(b.obs, b.act) - y).pow(2).mean()
        self.critic_opt.zero_grad()
        fabric.backward(critic_loss)
        self.critic_opt.step()
        self.step += 1
        if self.step % 2 == 0:
            frozen = {k: v.detach() for k, v in agent.critic.q1.named_parameters()}
            actor_loss = -functional_call(agent.critic.q1, frozen, (b.obs, self.actor(b.obs))).mean()
            self.actor_opt.zero_grad()
            fabric.backward(actor_loss)
            self.actor_opt.step()
            with torch.no_grad():
                for online, target in ((agent.actor, agent.actor_target), (agent.critic, agent.critic_target)):
                    for p, tp in zip(online.parameters(), target.parameters()):
                        tp.lerp_(p, self.tau)

    def run(self, steps: int, crash: Any = None, state: dict[str, Any] | None = None,
            on_step: Any = None) -> None:
        """``steps`` updates from the current step, the callbacks called where documented;
        stops when ``crash.should_stop``."""
        fabric = self.fabric
        fabric.call("on_fabric_setup", fabric=fabric, module=self.agent, data=self.data, step=self.step,
                    optimizers=[self.critic_opt], state=state)
        for _ in range(steps):
            self.update()
            fabric.call("on_fabric_update", fabric=fabric, module=self.agent, step=self.step)
            if on_step is not None:
                on_step(self)
            if crash is not None and crash.should_stop:
                break
        fabric.call("on_fabric_end", fabric=fabric)


class _GeneratorState:
    """A generator as a stateful object for ``fabric.save`` / ``fabric.load``."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, Tensor]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["state"])


class _Counter:
    def __init__(self, loop: Loop) -> None:
        self.loop = loop

    def state_dict(self) -> dict[str, int]:
        return {"step": self.loop.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.loop.step = int(state["step"])
