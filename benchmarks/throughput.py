"""Gradient updates per second: TD3+BC in a Lightning Trainer vs a hand-written PyTorch loop.

Both sides use the same networks (lit_qlearn.networks), batch size, data tensors,
sampling (random index gathers), device, logging cadence (TensorBoard every 50
updates) and TD3+BC update (critic every step, actor and Polyak targets every 2).
lit_qlearn's modules use Adam's fused kernel (the same update, faster), so the
plain loop runs twice: with the fused kernel (same optimiser: the ratio is the
pure cost of Lightning and the library) and with torch.optim.Adam's default
(what a hand-written loop usually does). Runs alternate, in an order rotated
every repeat, so that drift of the machine affects all alike; medians and
ratios are written to benchmarks/results/throughput.json (or into ``--out``).

    python benchmarks/throughput.py [--updates 1000] [--repeats 7] [--device cpu] [--out DIR] [--smoke]
"""
from __future__ import annotations

import copy
import json
import platform
import statistics
import tempfile
import time

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

from _claims import argument_parser, parse_args
from lit_qlearn.algorithms import TD3BC
from lit_qlearn.data import OfflineDataModule, ensure_default_dataset
from lit_qlearn.networks import Actor, Critic

WARMUP = 50  # updates excluded from the timing on both sides


def plain_td3bc(data, updates: int, batch_size: int, device: str, logdir: str, seed: int = 0,
                fused: bool = False) -> float:
    """The hand-written loop, with ``torch.optim.Adam``'s default kernel or (``fused``)
    the fused one lit_qlearn uses, on ``data`` (a ``Transitions``; its optional fields
    are not used). Returns steady-state updates per second."""
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
        if step == WARMUP + 1:
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
    return (updates - WARMUP) / elapsed


class _Clock(L.Callback):
    """Times updates WARMUP+1 .. end, as the plain loop does."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.updates == WARMUP:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.end = time.perf_counter()


def lightning_td3bc(dataset: str, updates: int, batch_size: int, device: str, logdir: str, seed: int = 0) -> float:
    torch.manual_seed(seed)
    dm = OfflineDataModule(dataset, batch_size=batch_size, seed=seed, steps_per_epoch=updates)
    model = TD3BC(eval_every=0)
    clock = _Clock()
    trainer = L.Trainer(
        max_steps=updates, accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
        logger=L.pytorch.loggers.TensorBoardLogger(logdir), log_every_n_steps=50, callbacks=[clock],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, dm)
    return (updates - WARMUP) / (clock.end - clock.start)


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dataset", default=None, help="D4RL-format file (default: the embedded Hopper data)")
    # smoke: the timing starts after WARMUP updates
    args = parse_args(parser, smoke={"updates": WARMUP + 10, "repeats": 1}, data=lambda a: [a.dataset or "default"])

    dataset = args.dataset or str(ensure_default_dataset())
    dm = OfflineDataModule(dataset, batch_size=args.batch_size)
    dm.setup("fit")
    data = dm.data  # the same normalised tensors the Lightning side samples from
    plain, fused, lit = [], [], []
    with tempfile.TemporaryDirectory() as logdir:
        for r in range(args.repeats):
            runs = [
                lambda: plain.append(plain_td3bc(data, args.updates, args.batch_size, args.device, f"{logdir}/p{r}",
                                                 seed=r)),
                lambda: fused.append(plain_td3bc(data, args.updates, args.batch_size, args.device, f"{logdir}/f{r}",
                                                 seed=r, fused=True)),
                lambda: lit.append(lightning_td3bc(dataset, args.updates, args.batch_size, args.device,
                                                   f"{logdir}/l{r}", seed=r)),
            ]
            for k in range(3):  # rotate the order so that no side always runs first or last
                runs[(r + k) % 3]()
            print(f"repeat {r}: plain {plain[-1]:.1f}, plain fused-Adam {fused[-1]:.1f}, "
                  f"lightning {lit[-1]:.1f} updates/s")
    med = {name: statistics.median(v) for name, v in (("plain", plain), ("fused", fused), ("lit", lit))}
    ratio_same = med["lit"] / med["fused"]
    ratio_default = med["lit"] / med["plain"]
    result = {
        "benchmark": "TD3+BC gradient updates per second, Lightning Trainer vs plain PyTorch loop",
        "smoke": args.smoke,
        "dataset": dataset,
        "transitions": int(dm.num_transitions),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "updates_per_run": args.updates,
        "warmup_updates_excluded": WARMUP,
        "plain_default_adam_updates_per_s": plain,
        "plain_fused_adam_updates_per_s": fused,
        "lightning_updates_per_s": lit,
        "medians": med,
        "ratio_lightning_over_plain_same_optimizer": ratio_same,
        "ratio_lightning_over_plain_default_adam": ratio_default,
        "target_ratio_same_optimizer": 0.9,
        "meets_target": ratio_same >= 0.9,
        "versions": {"torch": torch.__version__, "lightning": L.__version__, "python": platform.python_version(),
                     "numpy": np.__version__},
        "machine": platform.machine(),
    }
    out = args.out / "throughput.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"lightning / plain (same fused Adam) = {ratio_same:.3f} (target >= 0.9); "
          f"lightning / plain (default Adam) = {ratio_default:.3f} -> {out}")


if __name__ == "__main__":
    main()
