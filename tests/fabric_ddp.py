"""Run by test_fabric.py as its own program: the callbacks in a Fabric TD3 loop under DDP
with 2 CPU processes.

Usage: python fabric_ddp.py OUTDIR. Each rank saves the scalars its loggers saw, for a
healthy run and for a diverging one under ``checkpoint_and_stop`` (files in OUTDIR/kept)."""
import sys
import warnings

import torch
from lightning.fabric import Fabric

from lit_qlearn.callbacks import CrashPredictor, NTKGramCallback, SEEMMonitor
from lit_qlearn.loggers import SeriesLogger
from tests.ddp_exit import shut_down
from tests.fabric_td3 import Loop, make_data


def main(outdir: str) -> None:
    log = SeriesLogger()
    callbacks = [SEEMMonitor(every_n_steps=10, probe_size=64), NTKGramCallback(every_n_steps=10, probe_size=64),
                 CrashPredictor(every_n_steps=10, probe_size=64)]
    fabric = Fabric(strategy="ddp", accelerator="cpu", devices=2, loggers=log, callbacks=callbacks)
    fabric.launch()
    Loop(fabric, make_data()).run(30)

    diverging, crash = SeriesLogger(), CrashPredictor(every_n_steps=10, probe_size=16, action="checkpoint_and_stop",
                                                      dirpath=f"{outdir}/kept")
    fabric = Fabric(strategy="ddp", accelerator="cpu", devices=2, loggers=diverging, callbacks=[crash])
    fabric.launch()
    loop = Loop(fabric, make_data(n=16), lr=1e-2, tau=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loop.run(200, crash=crash, state=loop.state())
    torch.save({"rows": log.rows, "diverging": diverging.rows, "stopped": loop.step,
                "kept": crash.checkpoint_path, "healthy_step": crash.healthy_step},
               f"{outdir}/rank{fabric.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
    shut_down()
