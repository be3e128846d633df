"""Run by test_rollback.py as its own program: CrashPredictor(action="rollback") with
ShrinkAndPerturb on the R1 toy under DDP with 2 CPU processes. Usage:
python ddp_rollback.py OUTDIR Q_BOUND; each rank saves its rollbacks and final weights."""
import math
import os
import sys
import warnings

import lightning as L
import torch

from lit_qlearn.callbacks import CrashPredictor, ShrinkAndPerturb
from lit_qlearn.toys import RandomWalkDataModule, RandomWalkQ
from tests.ddp_exit import shut_down


def main(outdir: str, q_bound: str) -> None:
    warnings.filterwarnings("ignore")
    L.seed_everything(0, verbose=False)
    callback = CrashPredictor(every_n_steps=5, action="rollback", remedy=ShrinkAndPerturb(seed=3), max_rollbacks=2,
                              min_r2=1.1, threshold=math.inf, q_bound=float(q_bound), dirpath=f"{outdir}/ckpt")
    trainer = L.Trainer(max_steps=120, strategy="ddp", accelerator="cpu", devices=2, logger=False,
                        callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    module = RandomWalkQ(lr=0.02)
    trainer.fit(module, RandomWalkDataModule(seed=0))
    torch.save({"rollbacks": callback.rollbacks, "state_dict": module.state_dict(), "rank": int(os.environ.get(
        "LOCAL_RANK", 0))}, f"{outdir}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
    shut_down()
