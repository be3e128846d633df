"""Run by test_plasticity_monitor.py as its own program: PlasticityMonitor under DDP with 2 CPU processes.

Usage: python ddp_plasticity.py DATASET OUTDIR. Each rank saves the metrics it saw;
rank zero also measures the final parameters on one device with the pure function.
"""
import sys

import lightning as L
import torch

from lit_qlearn.algorithms import TD3BC
from lit_qlearn.callbacks import PlasticityMonitor
from lit_qlearn.data import OfflineDataModule
from lit_qlearn.plasticity import plasticity_metrics
from tests.ddp_exit import shut_down


def main(dataset: str, outdir: str) -> None:
    L.seed_everything(0, verbose=False)
    dm = OfflineDataModule(dataset, batch_size=16, normalize_states=False, steps_per_epoch=10)
    model = TD3BC(obs_dim=5, act_dim=1, critic_hidden=(16, 16), actor_hidden=(16, 16), eval_every=0)
    monitor = PlasticityMonitor(every_n_steps=5, probe_size=32)
    trainer = L.Trainer(
        max_steps=10, strategy="ddp", accelerator="cpu", devices=2, logger=False, callbacks=[monitor],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("plasticity/")}
    single = {}
    if trainer.global_rank == 0:
        probe = dm.probe_batch(32, seed=0)
        single = plasticity_metrics(model.q_network(), (probe.obs, probe.act))
    torch.save({"metrics": metrics, "single_device": single}, f"{outdir}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    shut_down()
