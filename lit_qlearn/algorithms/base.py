"""What every Q-learning module shares: update counting, targets, gradient sync,
cheap logging and evaluation episodes. Algorithms own only their losses.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from lit_qlearn.targets import TargetUpdate, make_target

__all__ = ["QLearningModule"]


def _no_op() -> None:
    return None


class QLearningModule(LightningModule):
    """Base class of lit_qlearn's algorithms.

    * **Update counting.** ``self.updates`` counts gradient updates (training
      steps) and drives every cadence (targets, actor delay, evaluation); it is
      saved in checkpoints. Lightning's ``global_step`` counts optimiser steps,
      which with a critic and a delayed actor would not be the number of updates,
      so only the critic's step is counted (:meth:`optimize`) and
      ``Trainer(max_steps=n)`` means n updates.
    * **Targets.** Subclasses create target networks with :meth:`add_target`;
      :meth:`target_pairs` lists them and ``self.target_update`` (a
      :class:`~lit_qlearn.targets.TargetUpdate` built from the module's
      hyperparameters) moves them after each update, unless an
      :class:`~lit_qlearn.callbacks.EMATarget` callback has taken over.
    * **Multi-device.** Under DDP, gradients are averaged across ranks with one
      flat all-reduce per optimiser step (:meth:`optimize`), instead of DDP's
      reducer, which expects every parameter in every backward pass and so breaks
      with a critic step and an actor step per batch.
    * **Logging.** Metrics are computed and logged only on the Trainer's logging
      steps (:meth:`logging_now`), so logging costs nothing in between.
    * **Evaluation.** Every ``eval_every`` updates, ``eval_episodes`` episodes in
      the DataModule's gymnasium environment, logged as ``eval/return`` and
      ``eval/normalized_score``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.updates = 0
        self.target_update: TargetUpdate | None = None
        self._target_pairs: list[tuple[nn.Module, nn.Module]] = []
        self._ddp: Any = None
        self._direct_steps = False
        self._eval_env: Any = None
        self.env_id: str | None = None
        self.ref_scores: tuple[float, float] | None = None

    # ------------------------------------------------------------------ targets
    def add_target(self, online: nn.Module) -> nn.Module:
        """Create, register and return a frozen target copy of ``online``."""
        target = make_target(online)
        self._target_pairs.append((online, target))
        return target

    def target_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """The ``(online, target)`` pairs that target-update rules act on."""
        return list(self._target_pairs)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.target_update is not None:
            self.target_update.step(self._target_pairs, self.updates)
        if self.eval_every and self.updates % self.eval_every == 0:
            self.log_evaluation()

    # ------------------------------------------------------------ optimisation
    def on_fit_start(self) -> None:
        from torch.nn.parallel import DistributedDataParallel

        wrapper = self.trainer.strategy.model
        # Kept out of nn.Module registration: the wrapper contains this module.
        self.__dict__["_ddp"] = wrapper if isinstance(wrapper, DistributedDataParallel) else None
        self._direct_steps = self._nothing_listens_to_steps()

    # Hooks that Lightning's backward / optimiser-step wrappers exist to call.
    _STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")

    def _nothing_listens_to_steps(self) -> bool:
        """Whether Lightning's backward and step wrappers would do nothing but dispatch
        hooks nobody overrides: full precision, one device or DDP (whose gradient sync
        optimize() does itself), and no callback or module hook on those events. Then
        optimize() calls ``backward`` and the optimiser directly, saving ~0.2 ms per
        update on CPU; otherwise it goes through Lightning as usual."""
        from lightning.pytorch import Callback
        from lightning.pytorch.plugins.precision import Precision
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
        from lightning.pytorch.utilities.model_helpers import is_overridden

        strategy = self.trainer.strategy
        if type(strategy.precision_plugin) is not Precision or type(strategy) not in (SingleDeviceStrategy, DDPStrategy):
            return False
        if any(is_overridden(h, self, LightningModule) for h in (*self._STEP_HOOKS, "backward")):
            return False
        return not any(is_overridden(h, cb, Callback) for cb in self.trainer.callbacks for h in self._STEP_HOOKS)

    def optimize(self, optimizer: Any, loss: Tensor, count_step: bool = True) -> None:
        """One optimiser step on ``loss``: zero grads, backward, average across ranks, step.

        ``count_step=False`` keeps the step out of Lightning's ``global_step``:
        algorithms pass it for every optimiser but the critic's, so that
        ``global_step`` (and ``Trainer(max_steps=...)``) counts updates.
        """
        raw = getattr(optimizer, "optimizer", optimizer)
        direct = self._direct_steps and hasattr(optimizer, "_on_after_step")
        raw.zero_grad(set_to_none=True)
        if direct:
            loss.backward()
        elif self._ddp is None:
            self.manual_backward(loss)
        else:
            # Keep DDP's reducer out of this backward (Lightning arms it before each
            # manual backward); the gradients are averaged below instead.
            self._ddp.require_backward_grad_sync = False
            try:
                self.manual_backward(loss)
            finally:
                self._ddp.require_backward_grad_sync = True
        if self._ddp is not None:
            grads = [p.grad for group in raw.param_groups for p in group["params"] if p.grad is not None]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)
        if direct:
            # Lightning counts a LightningOptimizer's steps through these two hooks.
            if count_step:
                optimizer._on_before_step()
            raw.step()
            if count_step:
                optimizer._on_after_step()
        elif count_step or not hasattr(optimizer, "_on_after_step"):
            optimizer.step()
        else:
            hooks = optimizer._on_before_step, optimizer._on_after_step
            optimizer._on_before_step = optimizer._on_after_step = _no_op
            try:
                optimizer.step()
            finally:
                optimizer._on_before_step, optimizer._on_after_step = hooks

    @staticmethod
    def adam(params: Any, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
        """Adam with the fused kernel where the parameters' device has one.

        Mathematically the same update as ``torch.optim.Adam``'s default, about 4x
        faster on CPU for a 256x256 twin critic (measured: 0.17 vs 0.73 ms per step).
        """
        params = list(params)
        try:
            return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError):  # device or dtype without a fused kernel
            return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)

    # ------------------------------------------------------------------ logging
    def logging_now(self) -> bool:
        """Whether this update is one the Trainer writes to its logger."""
        trainer = self._trainer
        if trainer is None or trainer.logger is None:
            return False
        return self.updates % max(1, trainer.log_every_n_steps) == 0

    def log_scalars(self, metrics: dict[str, Tensor | float], rank_zero_only: bool = False, **kwargs: Any) -> None:
        """Log step scalars; under DDP they are averaged over the ranks' batches (only
        on logging steps, so the all-reduce costs nothing in between)."""
        sync = not rank_zero_only and self.trainer.world_size > 1
        for name, value in metrics.items():
            self.log(name, value, on_step=True, on_epoch=False, prog_bar=False, sync_dist=sync,
                     rank_zero_only=rank_zero_only, **kwargs)

    # -------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lit_qlearn_updates"] = self.updates
        # Lets `lit_qlearn.data.collect` rebuild the policy from a checkpoint alone.
        checkpoint["lit_qlearn_class"] = f"{type(self).__module__}.{type(self).__qualname__}"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.updates = int(checkpoint.get("lit_qlearn_updates", 0))

    # ---------------------------------------------------------------- evaluation
    eval_every: int = 0
    eval_episodes: int = 10

    def act(self, obs: np.ndarray) -> np.ndarray:
        """The evaluation policy on raw (unnormalised) observations ``(ds,)`` or ``(B, ds)``."""
        raise NotImplementedError

    def _make_eval_env(self) -> Any:
        import gymnasium as gym

        if self._eval_env is None:
            self._eval_env = gym.make(self.env_id)
        return self._eval_env

    def teardown(self, stage: str) -> None:
        if self._eval_env is not None:
            self._eval_env.close()
            self._eval_env = None

    @torch.no_grad()
    def evaluate(self, episodes: int | None = None, seed: int = 10_000) -> dict[str, float]:
        """Run ``episodes`` evaluation episodes; return mean ``return`` and ``normalized_score``."""
        if self.env_id is None:
            raise RuntimeError(
                f"{type(self).__name__}.evaluate: no environment id; the DataModule has no env_id "
                "(pass env_id= to the DataModule)"
            )
        env = self._make_eval_env()
        episodes = self.eval_episodes if episodes is None else episodes
        was_training = self.training
        self.eval()
        try:
            returns = []
            for k in range(episodes):
                obs, _ = env.reset(seed=seed + k)
                total, done = 0.0, False
                while not done:
                    obs, reward, terminated, truncated, _ = env.step(self.act(obs))
                    total += float(reward)
                    done = terminated or truncated
                returns.append(total)
        finally:
            self.train(was_training)
        result = {"return": float(np.mean(returns))}
        result["normalized_score"] = self.normalized_score(result["return"])
        return result

    def normalized_score(self, ret: float) -> float:
        """D4RL's ``100 * (return - ref_min) / (ref_max - ref_min)``; NaN without references."""
        if self.ref_scores is None:
            return math.nan
        lo, hi = self.ref_scores
        return 100.0 * (ret - lo) / (hi - lo)

    def log_evaluation(self) -> None:
        """Evaluate on rank zero and log ``eval/return`` and ``eval/normalized_score``."""
        if self.env_id is None or self.trainer.global_rank != 0:
            return
        result = self.evaluate()
        metrics = {"eval/return": result["return"]}
        if not math.isnan(result["normalized_score"]):
            metrics["eval/normalized_score"] = result["normalized_score"]
        self.log_scalars(metrics, rank_zero_only=True)
