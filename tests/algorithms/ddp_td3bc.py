"""Run by test_td3.py as its own program: TD3+BC under DDP with 2 CPU processes.

Usage: python ddp_td3bc.py DATASET OUTDIR. Each rank saves its parameters.
"""
import sys

import lightning as L
import torch

from lit_qlearn.algorithms import TD3BC
from lit_qlearn.data import OfflineDataModule
from tests.ddp_exit import shut_down


def main(dataset: str, outdir: str) -> None:
    L.seed_everything(0, verbose=False)
    dm = OfflineDataModule(dataset, batch_size=32, normalize_states=False, steps_per_epoch=20)
    model = TD3BC(obs_dim=5, act_dim=1, critic_hidden=(16, 16), actor_hidden=(16, 16), eval_every=0)
    trainer = L.Trainer(
        max_steps=20, strategy="ddp", accelerator="cpu", devices=2, log_every_n_steps=5,
        logger=L.pytorch.loggers.TensorBoardLogger(outdir, name="tb"),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, dm)
    torch.save(
        {"params": torch.nn.utils.parameters_to_vector(model.parameters()).detach(), "updates": model.updates,
         "global_step": trainer.global_step},
        f"{outdir}/rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    shut_down()
