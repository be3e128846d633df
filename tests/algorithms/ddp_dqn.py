"""Run by test_dqn.py as its own program: online DQN under DDP with 2 CPU processes.

Usage: python ddp_dqn.py OUTDIR. Each rank saves its parameters, buffer and SEEM.
"""
import sys

import lightning as L
import torch

from lit_qlearn.algorithms import DQN
from lit_qlearn.callbacks import SEEMMonitor
from lit_qlearn.data import OnlineDataModule
from tests.ddp_exit import shut_down


def main(outdir: str) -> None:
    L.seed_everything(0, verbose=False)
    dm = OnlineDataModule("lit_qlearn.toys:Chain-v0", learning_starts=100, batch_size=32, capacity=1000)
    model = DQN(gamma=0.9, critic_hidden=(16, 16), target_every=10)
    seem = SEEMMonitor(every_n_steps=30, probe_size=32)
    trainer = L.Trainer(max_steps=30, strategy="ddp", accelerator="cpu", devices=2, logger=False, callbacks=[seem],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    torch.save(
        {"params": torch.nn.utils.parameters_to_vector(model.parameters()).detach(), "updates": model.updates,
         "global_step": trainer.global_step, "buffer_obs": dm.buffer.sample(
             len(dm.buffer), generator=torch.Generator().manual_seed(0)).obs,
         "seem": float(trainer.callback_metrics["seem/max_eig_normalized"])},
        f"{outdir}/rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1])
    shut_down()
