"""EMATarget: the Trainer-level owner of a module's target networks."""
from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from lit_qlearn.targets import TargetUpdate

__all__ = ["EMATarget"]


class EMATarget(Callback):
    """Update the target networks of any module that declares ``target_pairs()``.

    ``target <- (1 - tau) * target + tau * online`` after every ``every``-th
    training step. Special cases:

    * ``EMATarget(tau=0.005)``: Polyak averaging after every update;
    * ``EMATarget(tau=1.0, every=k)`` (or ``EMATarget.hard(k)``): a hard copy every k updates;
    * ``EMATarget.no_ema()``: target = current network after every update, the
      "no EMA" setting in which Yue et al. (2023) study divergence.

    Args:
        tau: Polyak rate in (0, 1]; 1 copies.
        every: updates between target moves.

    A module without ``target_pairs()``, or whose list is empty (e.g. PreQN), is an
    error at set-up or fit start, before the first update.

    Attached to a ``Trainer`` it takes precedence over the module's own default
    rule (its hyperparameters), which is restored when fitting ends. A module with a
    ``target_update`` attribute (every lit_qlearn algorithm) applies the rule itself,
    at the end of each update and at its own update count, so a checkpoint never
    holds a target one step stale; for any other module the callback moves the
    targets after each training batch and keeps its own count, saved in checkpoints.
    The target weights themselves are part of the module's ``state_dict``.
    """

    def __init__(self, tau: float = 0.005, every: int = 1) -> None:
        try:
            self.rule = TargetUpdate(tau, every)
        except ValueError as err:
            raise ValueError(f"EMATarget: {err}") from None
        self.updates = 0
        self._module_rule: Any = None
        self._applied_by_module = False

    @classmethod
    def hard(cls, every: int) -> EMATarget:
        """A hard copy of the online networks every ``every`` updates."""
        return cls(tau=1.0, every=every)

    @classmethod
    def no_ema(cls) -> EMATarget:
        """Target = current network: a copy after every update."""
        return cls(tau=1.0, every=1)

    def __repr__(self) -> str:
        return f"EMATarget(tau={self.rule.tau}, every={self.rule.every})"

    @property
    def state_key(self) -> str:
        # tau and every are all the options there are: two instances with different rules keep separate counts.
        return self._generate_state_key(tau=self.rule.tau, every=self.rule.every)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "target_pairs", None)):
            raise TypeError(
                f"EMATarget needs {type(pl_module).__name__}.target_pairs() -> [(online, target), ...]; "
                "the module declares no target networks"
            )
        self._applied_by_module = hasattr(pl_module, "target_update")
        if self._applied_by_module:
            # The Trainer's rule takes precedence over the module's default; the module
            # applies it inside its update (QLearningModule.training_step).
            self._module_rule, pl_module.target_update = pl_module.target_update, self.rule

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Checked here, not in setup: callbacks' setup runs before the module's, which may
        # build its networks (and targets) from the DataModule only then.
        if not pl_module.target_pairs():
            # An EMATarget with nothing to update would silently do nothing (PreQN has no
            # target networks by design): say so before the first update.
            raise ValueError(
                f"{self!r}: {type(pl_module).__name__}.target_pairs() is empty, the module has no target "
                "networks to update; remove the EMATarget callback"
            )

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if getattr(self, "_applied_by_module", False) and pl_module.target_update is self.rule:
            pl_module.target_update = self._module_rule

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if getattr(self, "_applied_by_module", False):
            return
        self.updates += 1
        self.rule.step(pl_module.target_pairs(), self.updates)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "tau": self.rule.tau, "every": self.rule.every}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = int(state_dict["updates"])
