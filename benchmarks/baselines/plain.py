"""A hand-written PyTorch TD3+BC loop: what benchmarks/throughput.py measures lit_qlearn's
``TD3BC`` in a Lightning Trainer against.

The same networks (lit_qlearn.networks), batch, sampling (random index gathers), logging
cadence (TensorBoard every 50 updates) and TD3+BC update (critic every step, actor and
Polyak targets every 2) as the module, written as a user would write the loop by hand.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

from lit_qlearn.networks import Actor, Critic

__all__ = ["plain_td3bc"]


def plain_td3bc(data, updates: int, warmup: int, batch_size: int, device: str, logdir: str, seed: int = 0,
                fused: bool = False) -> float:
    """The hand-written loop, with ``torch.optim.Adam``'s default kernel or (``fused``)
    the fused one lit_qlearn uses, on ``data`` (a ``Transitions``; its optional fields
    are not used), ``updates`` updates of which the first ``warmup`` are not timed.
    Returns steady-state updates per second."""
    torch.manual_seed(seed)
    obs, act, rew, next_obs, done = (t.to(device) for t in (data.obs, data.act, data.rew, data.next_obs,
                                                           data.terminated))
    obs_dim, act_dim = obs.shape[1], act.shape[1]
    critic = Critic(obs_dim, act_dim, num_q=2).to(device)
    actor = Actor(obs_dim, act_dim).to(device)
    critic_t, actor_t = copy.deepcopy(critic).requires_grad_(False), copy.deepcopy(actor).requires_grad_(False)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=3e-4, fused=fused or None)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=3e-4, fused=fused or None)
    gen = torch.Generator().manual_seed(seed)
    writer = SummaryWriter(logdir)
    n = obs.shape[0]
    start = None
    for step in range(1, updates + 1):
        if step == warmup + 1:
            start = time.perf_counter()
        idx = torch.randint(n, (batch_size,), generator=gen).to(device)
        s, a, r, s2, d = obs[idx], act[idx], rew[idx], next_obs[idx], done[idx]
        with torch.no_grad():
            noise = (torch.randn_like(a) * 0.2).clamp(-0.5, 0.5)
            a2 = (actor_t(s2) + noise).clamp(-1.0, 1.0)
            y = r + 0.99 * (1 - d) * critic_t(s2, a2).min(0).values
        q = critic(s, a)
        critic_loss = (q - y).pow(2).mean(1).sum()
        critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        critic_opt.step()
        if step % 2 == 0:
            critic.requires_grad_(False)
            pi = actor(s)
            q_pi = critic.members[0](torch.cat([s, pi], -1)).squeeze(-1)
            actor_loss = -2.5 / q_pi.abs().mean().detach() * q_pi.mean() + F.mse_loss(pi, a)
            actor_opt.zero_grad(set_to_none=True)
            actor_loss.backward()
            actor_opt.step()
            critic.requires_grad_(True)
            with torch.no_grad():
                for net, tgt in ((critic, critic_t), (actor, actor_t)):
                    for p, pt in zip(net.parameters(), tgt.parameters()):
                        pt.mul_(0.995).add_(p, alpha=0.005)
        if step % 50 == 0:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(critic.parameters()))))
            for name, value in (("train/critic_loss", critic_loss), ("train/actor_loss", actor_loss),
                                ("q/data_mean", q[0].mean()), ("q/policy_mean", q_pi.mean()),
                                ("params/critic_norm", norm)):
                writer.add_scalar(name, value.item(), step)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    writer.close()
    return (updates - warmup) / elapsed
