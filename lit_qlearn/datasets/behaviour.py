"""Behaviour policies trained with lit_qlearn's own SAC, the way D4RL's were made.

:func:`train_sac` runs SAC online (its defaults: 256x256, Adam 3e-4, tau 0.005, learned
temperature towards -|A|; one update per environment step, batch 256, ``learning_starts``
uniform random steps first), evaluates the deterministic actor ``tanh(mean)`` every
``eval_every`` environment steps and keeps its weights there. The "medium" policy is the
evaluation whose return is nearest a third of the final one (D4RL's definition), the
"expert" policy the final actor (the policy reached after the training budget used).

The same call with the same arguments reruns the same run bit for bit on a CPU (one
torch thread, seeded, MuJoCo is deterministic): that is how ``medium-replay`` (the run's
own replay buffer up to the medium policy) is remade where it is not on disk.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch

from lit_qlearn.algorithms import SAC
from lit_qlearn.data.online import OnlineDataModule
from lit_qlearn.data.replay import ReplayBuffer
from lit_qlearn.evaluation import EnvStepEvaluation

__all__ = ["BehaviourRun", "train_sac", "medium_point", "replay_arrays"]


@dataclasses.dataclass
class BehaviourRun:
    """What :func:`train_sac` returns.

    Attributes:
        settings: the arguments of the run (enough to rerun it).
        curve: one ``{"env_steps", "return", "seconds"}`` per evaluation.
        actors: the actor's ``state_dict`` at each evaluation, keyed by environment steps.
        spec: the environment's :class:`~lit_qlearn.data.types.DataSpec` as a dict.
        buffer: the replay buffer (``capacity`` = the run's steps, so nothing is overwritten
            and row ``i`` is environment step ``i``).
    """

    settings: dict[str, Any]
    curve: list[dict[str, float]]
    actors: dict[int, dict[str, torch.Tensor]]
    spec: dict[str, Any]
    buffer: ReplayBuffer | None

    def medium(self) -> dict[str, float] | None:
        """:func:`medium_point` of the curve."""
        return medium_point(self.curve)


def medium_point(curve: list[dict[str, float]]) -> dict[str, float] | None:
    """The evaluation before the last whose return is nearest a third of the final return
    (D4RL's "medium"), with the third as ``target``; None with fewer than two evaluations."""
    if len(curve) < 2:
        return None
    third = curve[-1]["return"] / 3
    return min(curve[:-1], key=lambda p: abs(p["return"] - third)) | {"target": third}


def train_sac(env_id: str, steps: int = 300_000, seed: int = 0, *, learning_starts: int = 10_000,
              eval_every: int = 10_000, episodes: int = 5, threads: int = 1,
              on_eval: Callable[[BehaviourRun], Any] | None = None,
              progress: Callable[[int], Any] | None = None) -> BehaviourRun:
    """Train SAC on ``env_id`` for ``steps`` environment steps (see the module docstring).

    Args:
        env_id: a gymnasium environment with a Box action space.
        steps: environment steps in all, the random ones included.
        seed: seeds Python, numpy, torch and the environments.
        learning_starts: uniform random steps before the first update.
        eval_every: environment steps between greedy evaluations (the first one at
            ``learning_starts + eval_every``).
        episodes: episodes per evaluation (their mean return is the curve's point).
        threads: torch threads during the run (a rerun must use as many to be bit-identical).
        on_eval: called with the run so far after every evaluation (its curve and actors;
            ``spec`` and ``buffer`` are set when the run ends).
        progress: called with the number of environment steps done since its last call.
    """
    if steps <= learning_starts:
        raise ValueError(f"train_sac: steps ({steps}) must exceed learning_starts ({learning_starts})")
    settings = {"env_id": env_id, "steps": int(steps), "seed": int(seed), "learning_starts": int(learning_starts),
                "eval_every": int(eval_every), "episodes": int(episodes), "threads": int(threads)}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        L.seed_everything(seed, verbose=False)
        dm = OnlineDataModule(env_id, learning_starts=learning_starts, batch_size=256, capacity=steps, seed=seed,
                              save_buffer=False)
        module = SAC(eval_every=0)
        run = BehaviourRun(settings, [], {}, {}, None)

        def keep(trainer: L.Trainer, pl_module: SAC, result: dict[str, float]) -> None:
            """Each evaluation: a point of the curve and the actor's weights at it."""
            env_steps = int(result["env_steps"])
            run.curve.append({"env_steps": env_steps, "return": result["return"],
                              "seconds": time.perf_counter() - started})
            run.actors[env_steps] = {k: v.detach().cpu().clone() for k, v in pl_module.actor.state_dict().items()}
            if on_eval is not None:
                on_eval(run)

        # every eval_every environment steps after learning_starts (one update per step)
        callbacks: list[L.Callback] = [EnvStepEvaluation(dm, every=eval_every, episodes=episodes, on_result=keep,
                                                         origin=learning_starts)]
        if progress is not None:
            callbacks.append(_Progress(dm, progress))
        trainer = L.Trainer(max_steps=steps - learning_starts, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
        trainer.fit(module, dm)
        run.spec, run.buffer = module.spec.to_dict(), dm.buffer
        return run
    finally:
        torch.set_num_threads(previous_threads)


class _Progress(L.Callback):
    """Reports the environment steps taken since its last report after every update."""

    def __init__(self, dm: OnlineDataModule, progress: Callable[[int], Any]) -> None:
        self.dm, self.progress, self.reported = dm, progress, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        env_steps = self.dm.rollout.env_steps
        self.progress(env_steps - self.reported)
        self.reported = env_steps


def replay_arrays(buffer: ReplayBuffer, rows: int) -> dict[str, np.ndarray]:
    """The first ``rows`` rows of a 1-step, 1-environment replay buffer, as D4RL arrays
    (in the order written if the buffer has not wrapped: :func:`train_sac`'s never does).
    The buffer keeps ``terminated`` but not truncation: an episode ends at row ``i``
    where ``next_obs[i]`` is not ``obs[i + 1]`` (the next row starts from a reset), and
    an end that is not a termination is a timeout; the last row is a timeout unless it
    terminates (the run stopped there)."""
    if buffer.n_step != 1 or buffer.num_envs != 1:
        raise ValueError("replay_arrays: needs a 1-step replay buffer of one environment")
    if not 0 < rows <= len(buffer):
        raise ValueError(f"replay_arrays: rows must be in [1, {len(buffer)}], got {rows}")
    t = buffer.gather(torch.arange(rows, device=buffer.device)).map(lambda x: x.cpu())
    obs, next_obs = t.obs.numpy().astype(np.float32), t.next_obs.numpy().astype(np.float32)
    terminals = t.terminated.numpy() > 0.5
    ends = np.ones(rows, dtype=bool)
    ends[:-1] = np.any(next_obs[:-1] != obs[1:], axis=tuple(range(1, obs.ndim)))
    return {"observations": obs, "actions": t.act.numpy().astype(np.float32),
            "rewards": t.rew.numpy().astype(np.float32), "terminals": terminals, "timeouts": ends & ~terminals,
            "next_observations": next_obs}
