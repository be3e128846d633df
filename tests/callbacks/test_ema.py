import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_qlearn.callbacks import EMATarget
from lit_qlearn.targets import TargetUpdate, make_target


class UserModule(L.LightningModule):
    """A user's own module: it declares its (online, target) pairs and nothing else."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(3, 1)
        self.net_target = make_target(self.net)
        with torch.no_grad():  # start the target away from the online network
            for p in self.net_target.parameters():
                p.add_(1.0)

    def target_pairs(self):
        return [(self.net, self.net_target)]

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.net(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(n=64):
    return DataLoader(TensorDataset(torch.randn(n, 3)), batch_size=8)


def trainer(tmp_path, steps, callbacks, **kwargs):
    return L.Trainer(
        max_steps=steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu", **kwargs,
    )


def flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_target_update_formula_is_exact():
    online, target = nn.Linear(4, 2), nn.Linear(4, 2)
    before = flat(target).double()
    TargetUpdate(tau=0.3).apply([(online, target)])
    expected = 0.7 * before + 0.3 * flat(online).double()
    torch.testing.assert_close(flat(target).double(), expected, rtol=0, atol=1e-7)
    TargetUpdate(tau=1.0).apply([(online, target)])
    assert torch.equal(flat(target), flat(online))


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.5, "0.5"])
def test_tau_outside_unit_interval_is_rejected_naming_tau(tau):
    with pytest.raises(ValueError, match="tau must be in \\(0, 1\\]"):
        EMATarget(tau=tau)
    with pytest.raises(ValueError, match="every"):
        EMATarget(tau=0.5, every=0)


def test_one_update_polyak_on_a_users_module(tmp_path):
    module = UserModule()
    target_before = flat(module.net_target)
    trainer(tmp_path, 1, [EMATarget(tau=0.25)]).fit(module, loader())
    expected = 0.75 * target_before + 0.25 * flat(module.net)
    torch.testing.assert_close(flat(module.net_target), expected, rtol=0, atol=1e-6)


class Recorder(L.Callback):
    """Records after each batch whether target == online (runs after EMATarget)."""

    def __init__(self):
        self.equal = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.equal.append(torch.equal(flat(pl_module.net), flat(pl_module.net_target)))


def test_hard_copy_cadence(tmp_path):
    rec = Recorder()
    trainer(tmp_path, 7, [EMATarget.hard(every=3), rec]).fit(UserModule(), loader())
    assert rec.equal == [False, False, True, False, False, True, False]
    rec = Recorder()
    trainer(tmp_path, 4, [EMATarget.no_ema(), rec]).fit(UserModule(), loader())
    assert rec.equal == [True] * 4


def test_module_without_target_pairs_gets_a_clear_error(tmp_path):
    class NoTargets(UserModule):
        target_pairs = None

    with pytest.raises(TypeError, match="target_pairs"):
        trainer(tmp_path, 1, [EMATarget()]).fit(NoTargets(), loader())


def test_trainer_instance_takes_precedence_over_module_default(tmp_path, tiny_td3bc):
    module, dm = tiny_td3bc()
    default = module.target_update
    assert (default.tau, default.every) == (0.005, 2)
    trainer(tmp_path, 3, [EMATarget.no_ema()]).fit(module, dm)
    for online, target in module.target_pairs():
        assert torch.equal(flat(online), flat(target))
    assert module.target_update is default  # restored after fit

    module, dm = tiny_td3bc()
    critic_target0 = flat(module.critic_target)
    trainer(tmp_path, 1, []).fit(module, dm)
    assert torch.equal(flat(module.critic_target), critic_target0)  # default: every 2 updates
    module, dm = tiny_td3bc()
    trainer(tmp_path, 2, []).fit(module, dm)
    assert not torch.equal(flat(module.critic_target), critic_target0)


def test_resume_keeps_targets_and_cadence(tmp_path):
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    module = UserModule()
    trainer(tmp_path, 4, [EMATarget.hard(every=3), ckpt_cb], enable_checkpointing=True).fit(module, loader())
    saved_target = flat(module.net_target)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("EMATarget")]
    assert state["updates"] == 4

    resumed, ema, rec = UserModule(), EMATarget.hard(every=3), Recorder()
    t = trainer(tmp_path, 7, [ema, rec])
    t.fit(resumed, loader(), ckpt_path=tmp_path / "last.ckpt")
    assert ema.updates == 7
    # Hard copies at updates 6 (not 3 after the restart): updates 5, 6, 7.
    assert rec.equal == [False, True, False]
    assert not torch.equal(saved_target, flat(resumed.net_target))


def test_target_update_follows_a_replaced_target_network():
    online = nn.Linear(3, 2)
    rule = TargetUpdate(tau=1.0)
    first, second = nn.Linear(3, 2), nn.Linear(3, 2)
    rule.apply([(online, first)])
    rule.apply([(online, second)])  # a new target for the same online network: not the cached lists
    assert torch.equal(flat(second), flat(online)) and torch.equal(flat(first), flat(online))


def test_module_with_no_target_networks_gets_a_clear_error_before_training(tmp_path):
    class Targetless(UserModule):  # declares target_pairs() but has nothing in it, as PreQN
        def target_pairs(self):
            return []

    steps = []

    class Count(L.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    with pytest.raises(ValueError, match=r"Targetless.target_pairs\(\) is empty.*remove the EMATarget"):
        trainer(tmp_path, 2, [EMATarget(tau=1.0), Count()]).fit(Targetless(), loader())
    assert steps == []


def test_preqn_has_no_target_networks_for_ema(tmp_path, chain_file):
    from lit_qlearn.algorithms import PreQN
    from lit_qlearn.data import OfflineDataModule

    dm = OfflineDataModule(str(chain_file), batch_size=8, normalize_states=False, steps_per_epoch=5)
    module = PreQN(critic_hidden=(8,), actor_hidden=(8,), eval_every=0)
    with pytest.raises(ValueError, match=r"PreQN.target_pairs\(\) is empty"):
        trainer(tmp_path, 2, [EMATarget.no_ema()]).fit(module, dm)
