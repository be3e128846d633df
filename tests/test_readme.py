"""The README's code runs as written."""
import re
from pathlib import Path

import lightning as L
import torch

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_the_write_your_own_algorithm_example_trains():
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", README, re.S) if "class MyDQN" in block]
    namespace: dict = {}
    exec("import torch\nfrom lit_qlearn.algorithms import QLearningModule\nfrom lit_qlearn.networks import mlp\n"
         "from lit_qlearn.targets import TargetUpdate\nfrom lit_qlearn.td import td_loss\n" + code, namespace)
    from lit_qlearn.data import OnlineDataModule

    module = namespace["MyDQN"]()
    dm = OnlineDataModule("lit_qlearn.toys:Chain-v0", learning_starts=32, batch_size=16, prioritized=True)
    seen = []

    class Watch(L.Callback):  # target == online after each update?
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(torch.equal(pl_module.q[0].weight, pl_module.q_target[0].weight))

    trainer = L.Trainer(max_steps=100, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Watch()])
    trainer.fit(module, dm)
    assert module.updates == trainer.global_step == 100
    # the hard copy fires after update 100 only, inside the update; in between the target stays put
    assert seen == [False] * 99 + [True]
