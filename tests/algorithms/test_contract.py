"""One contract, checked on every algorithm (docs/design.md section 8): the probe protocol on
real rows, updates = global_step, a checkpoint that rebuilds the module alone, and a
resumed run that ends bit-identical to an uninterrupted one. Each algorithm also has its
own closed-form test in its test file."""
import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_qlearn.algorithms import CQL, DDPG, DQN, IQL, PQN, SAC, TD3, TD3BC, CrossQ, PreQN
from lit_qlearn.data import OfflineDataModule, OnlineDataModule, OnPolicyDataModule
from lit_qlearn.probe import check_probe_module

SMALL = dict(critic_hidden=(16,), actor_hidden=(16,), eval_every=0)
ALGORITHMS = {
    "TD3": lambda: TD3(**SMALL),
    "TD3BC": lambda: TD3BC(**SMALL),
    "DDPG": lambda: DDPG(**SMALL),
    "PreQN": lambda: PreQN(**SMALL),
    "SAC": lambda: SAC(**SMALL),
    "CQL": lambda: CQL(num_samples=3, **SMALL),
    "CQL-Lagrange": lambda: CQL(num_samples=3, lagrange=True, target_action_gap=0.5, **SMALL),
    "IQL": lambda: IQL(**SMALL),
    # renormalising from the third critic pass on: the resume crosses the warm-up boundary
    "CrossQ": lambda: CrossQ(renorm_warmup_steps=2, **SMALL),
    "DQN": lambda: DQN(critic_hidden=(16,), target_every=3, epsilon_steps=20),
    "PQN": lambda: PQN(critic_hidden=(16,), total_env_steps=40),
}


def data(name, chain_file):
    if name == "DQN":
        # trust_checkpoint: the resume unpickles the environments it saved (our own file)
        return OnlineDataModule("lit_qlearn.toys:Chain-v0", learning_starts=40, batch_size=16, capacity=200,
                                prioritized=True, trust_checkpoint=True)
    if name == "PQN":
        # 6 updates per rollout: the resume at step 5 starts in the first rollout's second epoch
        return OnPolicyDataModule("lit_qlearn.toys:Chain-v0", num_envs=2, num_steps=6, num_minibatches=3,
                                  update_epochs=2, trust_checkpoint=True)
    return OfflineDataModule(str(chain_file), batch_size=16, normalize_states=False, steps_per_epoch=7)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_contract(name, chain_file, tmp_path):
    L.seed_everything(0, verbose=False)
    module, dm = ALGORITHMS[name](), data(name, chain_file)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(max_steps=10, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ckpt], accelerator="cpu")
    trainer.fit(module, dm)
    # the step axis: one update per Trainer step, whatever the optimisers
    assert module.updates == trainer.global_step == 10
    # the probe protocol on real rows
    probe = dm.probe_batch(8)
    check_probe_module(module, probe=probe)
    with torch.no_grad():
        assert module.q_value(probe.obs, probe.act).shape == (8,)
        torch.testing.assert_close(module.q_network()(probe.obs, probe.act), module.q_value(probe.obs, probe.act))
    # a checkpoint rebuilds the module with no sizes given and acts the same
    loaded = type(module).load_from_checkpoint(tmp_path / "step=10.ckpt")
    obs = probe.obs.numpy()
    np.testing.assert_array_equal(loaded.act(obs), module.act(obs))
    assert loaded.updates == 10 and loaded.spec == module.spec
    # resuming at step 5 (after a different global seed) ends bit-identical to the run above
    L.seed_everything(123, verbose=False)
    resumed, dm2 = ALGORITHMS[name](), data(name, chain_file)
    L.Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(resumed, dm2, ckpt_path=tmp_path / "step=5.ckpt")
    for (key, a), b in zip(module.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
