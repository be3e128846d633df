"""Run by test_td3.py as its own program: TD3+BC evaluating under DDP with 2 CPU processes,
with a ModelCheckpoint and an EarlyStopping that monitor ``eval/return``.

Usage: python ddp_eval.py DATASET OUTDIR. Each rank saves what its callbacks saw.
"""
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lit_qlearn.algorithms import TD3BC
from lit_qlearn.data import OfflineDataModule
from tests.ddp_exit import shut_down


def main(dataset: str, outdir: str) -> None:
    L.seed_everything(0, verbose=False)
    dm = OfflineDataModule(dataset, batch_size=32, steps_per_epoch=20)
    model = TD3BC(critic_hidden=(16,), actor_hidden=(16,), eval_every=10, eval_episodes=1)
    best = ModelCheckpoint(dirpath=f"{outdir}/ckpt", monitor="eval/return", mode="max", every_n_train_steps=10)
    stop = EarlyStopping(monitor="eval/return", mode="max", patience=100, check_on_train_epoch_end=True)
    trainer = L.Trainer(max_steps=20, strategy="ddp", accelerator="cpu", devices=2, logger=False,
                        callbacks=[best, stop], enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    torch.save({"eval_return": float(trainer.callback_metrics["eval/return"]),
                "best_score": float(best.best_model_score), "direct": model.evaluate(1)["return"]},
               f"{outdir}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    shut_down()
