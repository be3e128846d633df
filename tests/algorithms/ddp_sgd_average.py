"""Run by test_ddp_average.py as its own program: DQN with a plain SGD critic under DDP
with 2 CPU processes, each rank on its own batches.

SGD's step is lr * gradient, so a gradient that the ranks summed instead of averaged moves
the parameters twice as far (Adam's step, m / sqrt(v), would hide the factor). With equal
batch sizes, the mean of the ranks' gradients is the gradient of the mean loss over the
union of their batches: the test compares with a one-process run on the concatenated
batches.

Usage: python ddp_sgd_average.py OUTDIR [direct|lightning]. Each rank saves its final parameters,
whether its steps took the direct path, and the critic gradient norms it logged (every update).
"""
import sys
import warnings

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from lit_qlearn.algorithms import DQN
from lit_qlearn.data import Transitions
from tests.ddp_exit import shut_down

STEPS, BATCH, OBS_DIM, ACTIONS = 3, 16, 4, 3


def make_batches(rank: int) -> list[Transitions]:
    """``STEPS`` batches of rank ``rank``: random states, actions, rewards; every 4th row terminal."""
    g = torch.Generator().manual_seed(100 + rank)
    return [Transitions(obs=torch.randn(BATCH, OBS_DIM, generator=g), act=torch.randint(ACTIONS, (BATCH,), generator=g),
                        rew=2 * torch.randn(BATCH, generator=g), next_obs=torch.randn(BATCH, OBS_DIM, generator=g),
                        terminated=(torch.arange(BATCH) % 4 == 0).float())
            for _ in range(STEPS)]


class SGDDQN(DQN):
    """DQN whose critic steps with SGD, serving ``batches`` (None: this rank's ``make_batches``)."""

    batches: list[Transitions] | None = None

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"critic": torch.optim.SGD(self.q_net.parameters(), lr=0.2)}

    def train_dataloader(self) -> DataLoader:
        batches = make_batches(self.trainer.global_rank) if self.batches is None else self.batches
        return DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


def make_module() -> SGDDQN:
    """The same initial weights in every process; MSE and no gradient clip, which would hide a factor too."""
    L.seed_everything(0, verbose=False)
    return SGDDQN(obs_shape=(OBS_DIM,), num_actions=ACTIONS, critic_hidden=(8,), gamma=0.9, loss="mse",
                  max_grad_norm=None, target_every=1000)


class StepListener(L.Callback):
    """Listening to a step hook routes the module's steps through Lightning's wrappers
    (manual_backward under DDP's no_sync, LightningOptimizer.step) instead of the direct path."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        pass


class NormLogger(Logger):
    """Keeps ``train/critic_grad_norm`` by step, on every rank."""

    name, version = "norms", 0

    def __init__(self) -> None:
        super().__init__()
        self.norms: dict[int, float] = {}

    def log_metrics(self, metrics, step=None) -> None:
        if "train/critic_grad_norm" in metrics:
            self.norms[step] = float(metrics["train/critic_grad_norm"])

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass


def main(outdir: str, path: str = "direct") -> None:
    warnings.filterwarnings("ignore")
    module = make_module()
    logger = NormLogger()
    trainer = L.Trainer(max_steps=STEPS, strategy="ddp", accelerator="cpu", devices=2, logger=logger,
                        log_every_n_steps=1,
                        use_distributed_sampler=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[StepListener()] if path == "lightning" else [])
    trainer.fit(module)
    torch.save({"params": torch.nn.utils.parameters_to_vector(module.q_net.parameters()).detach(),
                "updates": module.updates, "direct": module.stepper.direct, "norms": logger.norms},
               f"{outdir}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
    shut_down()
