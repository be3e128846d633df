"""Run by test_pqn.py as its own program: PQN on on-policy rollouts under DDP with 2 CPU processes.

Usage: python ddp_pqn.py OUTDIR. Each rank saves its parameters, its last rollout and SEEM.
"""
import sys

import lightning as L
import torch

from lit_qlearn.algorithms import PQN
from lit_qlearn.callbacks import SEEMMonitor
from lit_qlearn.data import OnPolicyDataModule
from tests.ddp_exit import shut_down


def main(outdir: str) -> None:
    L.seed_everything(0, verbose=False)
    dm = OnPolicyDataModule("lit_qlearn.toys:Chain-v0", num_envs=2, num_steps=8, num_minibatches=2, update_epochs=2)
    model = PQN(gamma=0.9, critic_hidden=(16, 16), total_env_steps=64)
    seem = SEEMMonitor(every_n_steps=12, probe_size=16)
    trainer = L.Trainer(max_steps=12, strategy="ddp", accelerator="cpu", devices=2, logger=False, callbacks=[seem],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    torch.save(
        {"params": torch.nn.utils.parameters_to_vector(model.parameters()).detach(), "updates": model.updates,
         "global_step": trainer.global_step, "rollout_obs": dm.data.obs,
         "seem": float(trainer.callback_metrics["seem/max_eig_normalized"])},
        f"{outdir}/rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1])
    shut_down()
