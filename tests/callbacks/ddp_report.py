"""Run by test_report.py as its own program: HealthReport under DDP with 2 CPU processes.

Usage: python ddp_report.py OUTDIR. Each rank saves the report it collected and where it
wrote it (rank zero only writes).
"""
import sys
import warnings

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from lit_qlearn.callbacks import CrashPredictor, HealthReport, SEEMMonitor
from lit_qlearn.toys import RandomWalkDataModule, RandomWalkQ
from tests.ddp_exit import shut_down


def main(outdir: str) -> None:
    warnings.filterwarnings("ignore")
    L.seed_everything(0, verbose=False)
    report = HealthReport(verbose=False)
    callbacks = [report, CrashPredictor(every_n_steps=5, probe_size=64, q_bound=50.0, action="stop"),
                 SEEMMonitor(every_n_steps=5, probe_size=64)]
    trainer = L.Trainer(max_steps=400, strategy="ddp", accelerator="cpu", devices=2, logger=CSVLogger(outdir),
                        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(RandomWalkQ(lr=0.02), RandomWalkDataModule(seed=0))
    torch.save({"summary": report.summary, "written": None if report.written is None else str(report.written),
                "log_dir": trainer.log_dir}, f"{outdir}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
    shut_down()
