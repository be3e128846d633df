"""HealthyCheckpoint on its own: an owner marks healthy steps, the component keeps the
last one's checkpoint, and restores it into the running module and optimisers (the
reuse a rollback needs). Its work inside CrashPredictor: tests/callbacks/test_crash.py."""
import copy
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_qlearn.callbacks import HealthyCheckpoint
from tests.conftest import fit


class Owner(L.Callback):
    """Marks every ``every``-th step up to ``until`` healthy; restores at ``restore_at``."""

    def __init__(self, healthy, every=5, until=15, restore_at=None):
        self.healthy, self.every, self.until, self.restore_at = healthy, every, until, restore_at
        self.restored = None

    def setup(self, trainer, pl_module, stage):
        self.healthy.attach(trainer)

    def on_train_batch_end(self, trainer, pl_module, *args):
        step = trainer.global_step
        if step == self.restore_at:
            self.restored = self.healthy.restore(trainer, pl_module)
        elif step % self.every == 0 and step <= self.until:
            self.healthy.mark(step)

    def teardown(self, trainer, pl_module, stage):
        self.healthy.detach(trainer)


class StateSpy(L.Callback):
    """Copies of the module's and every optimiser's states after every step."""

    def __init__(self):
        self.module, self.optimizers = {}, {}

    def on_train_batch_end(self, trainer, pl_module, *args):
        step = trainer.global_step
        self.module[step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.optimizers[step] = [copy.deepcopy(o.state_dict()) for o in trainer.optimizers]


def quiet_fit(module, dm, steps, callbacks, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        return fit(module, dm, steps, callbacks=callbacks, **kwargs)


def test_restore_brings_back_the_last_healthy_weights_and_optimiser_states(tiny_td3bc, tmp_path):
    """TD3+BC (twin critics, targets, actor and critic Adam): restored at step 18, the
    module and both optimisers hold exactly the state of step 15, the last marked one;
    the run goes on counting its steps and updates."""
    healthy = HealthyCheckpoint("owner", dirpath=tmp_path / "healthy")
    owner, spy = Owner(healthy, restore_at=18), StateSpy()
    module, dm = tiny_td3bc()
    trainer = quiet_fit(module, dm, 20, [owner, spy])
    assert owner.restored == 15
    assert len(spy.optimizers[15]) == 2
    for name, value in spy.module[15].items():
        assert torch.equal(spy.module[18][name], value), name
    assert any(not torch.equal(spy.module[17][n], v) for n, v in spy.module[15].items())  # it did move back
    for restored, kept in zip(spy.optimizers[18], spy.optimizers[15]):
        assert restored["state"].keys() == kept["state"].keys()
        for index, state in kept["state"].items():
            for key, value in state.items():
                assert torch.equal(restored["state"][index][key], value), (index, key)
    assert trainer.global_step == module.updates == 20
    assert healthy.step is None and list((tmp_path / "healthy").iterdir()) == []  # none kept: removed at teardown


def test_keep_names_the_file_of_the_last_finite_marked_step(tiny_td3bc, tmp_path):
    healthy = HealthyCheckpoint("owner", dirpath=tmp_path / "healthy")

    class KeepAtEnd(Owner):
        def on_train_end(self, trainer, pl_module):
            self.path = self.healthy.keep(trainer)

    owner = KeepAtEnd(healthy, until=10)
    quiet_fit(*tiny_td3bc(), 14, [owner])
    assert owner.path == tmp_path / "healthy" / "last-healthy-step=10.ckpt" == healthy.path and healthy.kept
    assert sorted(p.name for p in (tmp_path / "healthy").iterdir()) == ["last-healthy-step=10.ckpt"]
    assert torch.load(owner.path, weights_only=True)["global_step"] == 10  # tensors and plain values only


def test_it_holds_the_last_keep_marked_steps_with_their_values_and_restores_any(tiny_td3bc, tmp_path):
    """keep=3, steps 5..20 marked with value step/100: held are 10, 15, 20 (three files, the
    older removed), and restore(index=0) at step 22 brings back step 10's weights; keep()
    leaves only the newest, named."""
    healthy = HealthyCheckpoint("owner", dirpath=tmp_path / "healthy", keep=3)
    files = {}

    class Ring(Owner):
        def on_train_batch_end(self, trainer, pl_module, *args):
            step = trainer.global_step
            files[step] = sorted(p.name for p in (tmp_path / "healthy").glob(".last-healthy-*"))
            if step == 22:
                self.held = list(self.healthy.held)
                self.restored = self.healthy.restore(trainer, pl_module, 0)
            elif step % 5 == 0 and step <= 20:
                self.healthy.mark(step, step / 100)

        def on_train_end(self, trainer, pl_module):
            self.path = self.healthy.keep(trainer)

    owner, spy = Ring(healthy), StateSpy()
    quiet_fit(*tiny_td3bc(), 24, [owner, spy])
    assert [(h.step, h.value) for h in owner.held] == [(10, 0.1), (15, 0.15), (20, 0.2)]
    assert [len(files[t]) for t in (6, 11, 16, 21)] == [1, 2, 3, 3]  # (seen before the step's own capture)
    assert owner.restored == 10
    for name, value in spy.module[10].items():
        assert torch.equal(spy.module[22][name], value), name
    assert sorted(p.name for p in (tmp_path / "healthy").iterdir()) == ["last-healthy-step=20.ckpt"]
    with pytest.raises(ValueError, match="keep must be an integer >= 1, got 0"):
        HealthyCheckpoint("owner", keep=0)


def test_attach_goes_before_the_checkpoint_callbacks_and_detach_leaves(tmp_path):
    first, ordinary = L.Callback(), ModelCheckpoint(dirpath=tmp_path)
    trainer = L.Trainer(callbacks=[first, ordinary], logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    healthy = HealthyCheckpoint("owner", dirpath=tmp_path / "healthy")
    healthy.attach(trainer)
    healthy.attach(trainer)  # once only
    assert trainer.callbacks.index(healthy) == trainer.callbacks.index(first) + 1 < trainer.callbacks.index(ordinary)
    assert trainer.callbacks.count(healthy) == 1
    healthy.detach(trainer)
    assert healthy not in trainer.callbacks


def test_nothing_held_is_named(tiny_td3bc, tmp_path):
    healthy = HealthyCheckpoint("owner", dirpath=tmp_path / "healthy")

    class Ask(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            self.kept = healthy.keep(trainer)
            with pytest.raises(RuntimeError, match="no healthy checkpoint is held"):
                healthy.restore(trainer, pl_module)
            with pytest.raises(ValueError, match="pl_module must be the module the trainer fits"):
                healthy.restore(trainer, torch.nn.Linear(1, 1))
            trainer.should_stop = True

    ask = Ask()
    quiet_fit(*tiny_td3bc(), 3, [ask])
    assert ask.kept is None and healthy.step is None and not (tmp_path / "healthy").exists()
