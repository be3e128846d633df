"""Run by test_preqn.py as its own program: PreQN and TD3 + PreQNLineSearch under DDP
with 2 CPU processes. Usage: python ddp_preqn.py DATASET OUTDIR."""
import sys
import warnings

import lightning as L
import torch

from lit_qlearn.algorithms import TD3, PreQN
from lit_qlearn.callbacks import PreQNLineSearch
from lit_qlearn.data import OfflineDataModule
from tests.ddp_exit import shut_down


class FirstBatch(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.batch = [t.clone() for t in batch[:5]]


def run(cls, callbacks, dataset):
    L.seed_everything(0, verbose=False)
    dm = OfflineDataModule(dataset, batch_size=16, normalize_states=False, steps_per_epoch=10)
    model = cls(obs_dim=5, act_dim=1, critic_hidden=(16, 16), actor_hidden=(16, 16), eval_every=0)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    first = FirstBatch()
    trainer = L.Trainer(max_steps=1, strategy="ddp", accelerator="cpu", devices=2, logger=False,
                        callbacks=[first, *callbacks], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, dm)
    vector = torch.nn.utils.parameters_to_vector
    return trainer.global_rank, {"init": init, "batch": first.batch, "params": vector(model.parameters()).detach(),
                                 "critic": vector(model.critic.parameters()).detach()}


def main(dataset: str, outdir: str) -> None:
    warnings.filterwarnings("ignore")
    rank, preqn = run(PreQN, [], dataset)
    _, td3 = run(TD3, [PreQNLineSearch()], dataset)
    torch.save({"preqn": preqn, "td3": td3}, f"{outdir}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    shut_down()
