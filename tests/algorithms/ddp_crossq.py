"""Run by test_crossq.py as its own program: CrossQ under DDP with 2 CPU processes, two
updates (the second with the actor). Usage: python ddp_crossq.py DATASET OUTDIR. Each rank
saves its initial and final state, its batches, its torch random state at each batch (the
ranks' streams differ) and the |TD error| its updates return."""
import sys
import warnings

import lightning as L
import torch

from lit_qlearn.algorithms import CrossQ
from lit_qlearn.data import OfflineDataModule
from tests.ddp_exit import shut_down


class Record(L.Callback):
    def __init__(self) -> None:
        self.batches, self.rng = [], []

    def on_train_start(self, trainer, pl_module):
        torch.manual_seed(100 + trainer.global_rank)  # the ranks' random streams differ

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append([t.clone() for t in batch[:5]])
        self.rng.append(torch.get_rng_state())


def main(dataset: str, outdir: str) -> None:
    warnings.filterwarnings("ignore")
    L.seed_everything(0, verbose=False)
    dm = OfflineDataModule(dataset, batch_size=16, normalize_states=False, steps_per_epoch=10)
    model = CrossQ(obs_dim=5, act_dim=1, critic_hidden=(16, 16), actor_hidden=(16, 16), eval_every=0,
                   policy_delay=2, renorm_warmup_steps=1)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    record, td_abs, update = Record(), [], model.update
    model.update = lambda batch: td_abs.append(update(batch)) or td_abs[-1]
    trainer = L.Trainer(max_steps=2, strategy="ddp", accelerator="cpu", devices=2, logger=False, callbacks=[record],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    torch.save({"init": init, "batches": record.batches, "rng": record.rng, "td_abs": td_abs,
                "state": {k: v.detach().clone() for k, v in model.state_dict().items()}},
               f"{outdir}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    shut_down()
