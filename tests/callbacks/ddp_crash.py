"""Run by test_crash.py as its own program: CrashPredictor on the R1 toy under DDP with
2 CPU processes. Usage: python ddp_crash.py OUTDIR; each rank saves its window and forecast."""
import sys
import warnings

import lightning as L
import torch

from lit_qlearn.callbacks import CrashPredictor
from lit_qlearn.toys import RandomWalkDataModule, RandomWalkQ


def main(outdir: str) -> None:
    warnings.filterwarnings("ignore")
    L.seed_everything(0, verbose=False)
    callback = CrashPredictor(every_n_steps=5, window=10)
    trainer = L.Trainer(max_steps=120, strategy="ddp", accelerator="cpu", devices=2, logger=False,
                        callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(RandomWalkQ(lr=0.02), RandomWalkDataModule(seed=0))
    torch.save({"history": callback.history, "forecast": callback.forecast}, f"{outdir}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
