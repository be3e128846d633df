"""Run by test_crash.py as its own program: CrashPredictor on the R1 toy under DDP with
2 CPU processes. Usage: python ddp_crash.py OUTDIR [forecast | bound Q_BOUND]; each rank
saves its window, forecast and what it did.

``bound``: only rank 1 is given the Bellman bound (rank 0 has none), so only rank 1
sees it crossed: the reduced decision must stop both ranks at that step, and rank zero,
which writes checkpoints, must write the last healthy state."""
import math
import os
import sys
import warnings

import lightning as L
import torch

from lit_qlearn.callbacks import CrashPredictor
from lit_qlearn.toys import RandomWalkDataModule, RandomWalkQ
from tests.ddp_exit import shut_down


def main(outdir: str, mode: str = "forecast", q_bound: str = "inf") -> None:
    warnings.filterwarnings("ignore")
    rank = int(os.environ.get("LOCAL_RANK", 0))  # the launcher sets it in the processes it starts
    L.seed_everything(0, verbose=False)
    if mode == "forecast":
        callback = CrashPredictor(every_n_steps=5, window=10)
    else:
        callback = CrashPredictor(every_n_steps=5, action="checkpoint_and_stop", min_r2=1.1, threshold=math.inf,
                                  q_bound=float(q_bound) if rank == 1 else math.inf, dirpath=outdir)
    trainer = L.Trainer(max_steps=120, strategy="ddp", accelerator="cpu", devices=2, logger=False,
                        callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(RandomWalkQ(lr=0.02), RandomWalkDataModule(seed=0))
    torch.save({"history": callback.history, "forecast": callback.forecast, "global_step": trainer.global_step,
                "stopped_step": callback.stopped_step, "healthy_step": callback.healthy_step,
                "checkpoint_path": callback.checkpoint_path}, f"{outdir}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
    shut_down()
