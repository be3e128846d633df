"""Offline updates per second: lit_qlearn's TD3+BC in a Lightning Trainer against a
CORL-style hand-written loop of the same algorithm, interleaved in one run.

The CORL-style loop is CORL's td3_bc.py as written (Tarasov et al. 2022): two separate
critic networks with their own ``torch.optim.Adam`` (defaults), an actor with its own,
the replay tensors indexed with ``np.random.randint``, ``critic_loss.item()`` (and the
actor loss's on actor steps) into a log dict every update, Polyak targets by
``param.data.copy_`` every ``policy_freq`` updates. lit_qlearn: ``TD3BC()`` at its
defaults over ``OfflineDataModule`` (batch 256), a ``Trainer(max_steps=...)`` with a
TensorBoard logger writing every 50 updates, no progress bar; and the same with
``compile=True``. Both sides: 256x256 networks, batch 256, the default dataset, the
first ``--warmup`` updates untimed. One torch thread for all (``--threads``). The
ratio is per repeat, configurations rotated every repeat. An ablation runs the CORL-style
loop once more with denormal floats flushed to zero (what lit_qlearn does while fitting),
to show how much of the difference that is.

    python benchmarks/offline_speed.py [--updates 2000] [--repeats 3]
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from _claims import argument_parser, claim, environment, write_result
from _common import ROOT, interleaved

TARGET = 1.5


# ----------------------------------------------------------------------------- CORL-style
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
    size, logs = len(states), []
    start = 0.0
    for total_it in range(1, updates + warmup + 1):
        if total_it == warmup + 1:
            start = time.perf_counter()
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
        logs.append(log_dict)
    speed = updates / (time.perf_counter() - start)
    torch.set_flush_denormal(False)
    return speed


# ----------------------------------------------------------------------------- lit_qlearn
def lit_td3bc(dataset: str, updates: int, warmup: int, seed: int, compile: bool = False) -> float:
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from lit_qlearn.algorithms import TD3BC
    from lit_qlearn.data import OfflineDataModule

    L.seed_everything(seed, verbose=False)
    module = TD3BC(eval_every=0, compile=compile)
    dm = OfflineDataModule(dataset, batch_size=256, seed=seed)
    clock: dict[str, float] = {}

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if pl_module.updates == warmup:
                clock["start"] = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            clock["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as logs:
        L.Trainer(max_steps=warmup + updates, logger=TensorBoardLogger(logs), log_every_n_steps=50,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[Clock()]).fit(module, dm)
    return updates / (clock["end"] - clock["start"])


def main() -> None:
    from lit_qlearn.data import ensure_default_dataset, read_d4rl

    parser = argument_parser(__doc__)
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    path = ensure_default_dataset()
    data = read_d4rl(path)
    runners = {
        "corl_style": lambda seed: corl_td3bc(data, args.updates, args.warmup, seed),
        # an ablation: how much of the difference is denormal arithmetic (Adam's second moments)
        "corl_style_flush_denormal": lambda seed: corl_td3bc(data, args.updates, args.warmup, seed, flush=True),
        "lit_qlearn": lambda seed: lit_td3bc(str(path), args.updates, args.warmup, seed),
        # the first compiled run includes no compilation: it is done in the warm-up updates
        "lit_qlearn_compile": lambda seed: lit_td3bc(str(path), args.updates, args.warmup, seed, compile=True),
    }
    speeds: dict[str, list[float]] = {name: [] for name in runners}
    for repeat, name in interleaved(list(runners), args.repeats):
        speeds[name].append(runners[name](repeat))
        print(f"repeat {repeat} {name}: {speeds[name][-1]:.1f} updates/s", flush=True)
    ratios = {name: [a / b for a, b in zip(speeds[name], speeds["corl_style"])]
              for name in ("lit_qlearn", "lit_qlearn_compile", "corl_style_flush_denormal")}
    medians = {name: statistics.median(r) for name, r in ratios.items()}
    result = {
        "claims": [
            claim(f"TD3+BC offline: lit_qlearn >= {TARGET}x the updates per second of a CORL-style hand-written "
                  "loop (interleaved)", "issue 12 target; measured there: lit_qlearn 105, CORL-style 83 updates/s",
                  {"ratio_median": medians["lit_qlearn"], "ratios": ratios["lit_qlearn"],
                   "updates_per_s": {k: speeds[k] for k in ("lit_qlearn", "corl_style")}},
                  medians["lit_qlearn"] >= TARGET),
            claim(f"the same with compile=True (>= {TARGET}x)", "issue 12: report compile=True beside it",
                  {"ratio_median": medians["lit_qlearn_compile"], "ratios": ratios["lit_qlearn_compile"],
                   "updates_per_s": speeds["lit_qlearn_compile"]}, medians["lit_qlearn_compile"] >= TARGET),
        ],
        "ablation": {"corl_style_flush_denormal_over_corl_style": statistics.median(
            ratios["corl_style_flush_denormal"]), "speeds": speeds["corl_style_flush_denormal"]},
        "settings": vars(args) | {"dataset": str(path.name)},
        "environment": environment({"td3": ROOT / "lit_qlearn/algorithms/td3.py",
                                    "base": ROOT / "lit_qlearn/algorithms/base.py",
                                    "offline": ROOT / "lit_qlearn/data/offline.py"}),
    }
    write_result("offline_speed", result, started)


if __name__ == "__main__":
    main()
