"""When the probe callbacks measure (issue 19, item 3) and how they draw the probe set
(item 5): a measurement at every multiple of ``every_n_steps`` the step counter reaches
or passes, whatever its increment per batch; one warning when the probe set is cut."""
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lit_qlearn.callbacks import CrashPredictor, NTKGramCallback, PlasticityMonitor, PreQNLineSearch, SEEMMonitor
from lit_qlearn.data import OfflineDataModule
from lit_qlearn.networks import StateActionQ, mlp
from lit_qlearn.probe import Cadence, bootstrap_target
from lit_qlearn.toys import RandomWalkDataModule, RandomWalkQ
from tests.callbacks.test_crash import MemoryLogger as CrashMemoryLogger
from tests.conftest import CHAIN_STATES


def test_cadence_by_hand():
    def due_steps(every, steps):
        cadence = Cadence(every)
        cadence.start(0)
        return [s for s in steps if cadence.due(s)]

    # Increment 1: the multiples themselves, as `step % every == 0` has it.
    assert due_steps(3, range(1, 11)) == [3, 6, 9]
    # Increment 2 (two optimisers per batch): 3 is passed at 4, 9 at 10, 15 at 16.
    assert due_steps(3, range(2, 21, 2)) == [4, 6, 10, 12, 16, 18]
    # A jump over several multiples is one measurement; the next is the first multiple after it.
    assert due_steps(2, [1, 7, 8, 9, 13]) == [7, 8, 13]
    # Resumed at step 8 with the state of a run that measured at 6: next due 9, passed at 10.
    resumed = Cadence(3)
    resumed.next_due = 9
    resumed.start(8)
    assert resumed.next_due == 9 and [s for s in (10, 12) if resumed.due(s)] == [10, 12]
    # A stale next_due (the callback reused with a fresh Trainer at step 0) is recomputed.
    stale = Cadence(3)
    stale.next_due = 21
    stale.start(0)
    assert stale.next_due == 3
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        Cadence(0)


class MemoryLogger(CrashMemoryLogger):
    """Keeps every logged scalar (``rows[step][name] = value``) and lists the steps that logged one."""

    def steps(self, key):
        return sorted(step for step, row in self.rows.items() if key in row)


class TwoOptimisers(L.LightningModule):
    """A user's module, not a QLearningModule: the probe protocol, a critic and an actor
    with an optimiser each, stepped by hand. The critic steps every batch and the actor
    every ``actor_every``-th, so ``global_step`` (which counts every optimiser step) goes
    up by 2 per batch (``actor_every=1``) or by 1 and 2 in turn (``actor_every=2``)."""

    def __init__(self, actor_every=1):
        super().__init__()
        self.automatic_optimization = False
        self.gamma = 0.9
        self.actor_every = actor_every
        torch.manual_seed(0)
        self.critic = mlp(CHAIN_STATES + 1, 1, hidden=(16, 16))
        self.actor = nn.Sequential(nn.Linear(CHAIN_STATES, 1), nn.Tanh())

    def q_value(self, obs, act):
        return self.critic(torch.cat([obs, act], dim=-1)).squeeze(-1)

    def greedy_action(self, obs):
        return self.actor(obs)

    def q_network(self):
        return StateActionQ(self.critic)

    def training_step(self, batch, batch_idx):
        critic_opt, actor_opt = self.optimizers()
        critic_loss = (self.q_value(batch.obs, batch.act) - bootstrap_target(self, batch)).pow(2).mean()
        critic_opt.zero_grad()
        self.manual_backward(critic_loss)
        critic_opt.step()
        if batch_idx % self.actor_every == self.actor_every - 1:
            actor_loss = -self.q_value(batch.obs, self.actor(batch.obs)).mean()
            actor_opt.zero_grad()
            self.manual_backward(actor_loss)
            actor_opt.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.critic.parameters(), lr=0.01), torch.optim.SGD(self.actor.parameters(), lr=0.01)]


def monitors():
    return dict(ntk=NTKGramCallback(every_n_steps=3, probe_size=16),
                seem=SEEMMonitor(every_n_steps=3, probe_size=16),
                crash=CrashPredictor(every_n_steps=5, probe_size=16, action="warn"),
                plasticity=PlasticityMonitor(every_n_steps=4, probe_size=16))


KEYS = dict(ntk="ntk/diag_mean", seem="seem/max_eig", crash="crash/td_error_norm", plasticity="plasticity/weight_norm")


def fit_user_module(chain_file, actor_every, max_steps, callbacks, ckpt_path=None, **options):
    L.seed_everything(0, verbose=False)
    dm = OfflineDataModule(str(chain_file), batch_size=32, normalize_states=False, seed=0, steps_per_epoch=100)
    logger = MemoryLogger()
    trainer = L.Trainer(max_steps=max_steps, logger=logger, log_every_n_steps=7, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        callbacks=callbacks, **options)
    trainer.fit(TwoOptimisers(actor_every), dm, ckpt_path=ckpt_path)
    return trainer, logger


# The steps after each batch, and the measured ones, written out by hand:
# actor_every=1: 2, 4, 6, ..., 20. every 3 -> 3 passed at 4, 6, 9 at 10, 12, 15 at 16, 18;
#   every 5 -> 6, 10, 16, 20; every 4 -> 4, 8, ..., 20; logging every 7 -> 8, 14.
# actor_every=2: 1, 3, 4, 6, 7, 9, 10, 12, 13, 15, 16, 18, 19, 21 (max_steps 20 is passed at 21).
#   every 3 -> 3, 6, ..., 21 (each hit); every 5 -> 6, 10, 15, 21; every 4 -> 4, 9, 12, 16, 21;
#   logging every 7 -> 7, 15, 21.
# `step % every == 0` would have measured [6, 12, 18], [10, 20], [4, 8, 12, 16, 20], [14] for
# actor_every=1 and [3, ..., 21], [10, 15], [4, 12, 16], [7, 21] for actor_every=2.
EXPECTED = {
    1: dict(ntk=[4, 6, 10, 12, 16, 18], seem=[4, 6, 10, 12, 16, 18], crash=[6, 10, 16, 20],
            plasticity=[4, 8, 12, 16, 20], preqn=[8, 14]),
    2: dict(ntk=[3, 6, 9, 12, 15, 18, 21], seem=[3, 6, 9, 12, 15, 18, 21], crash=[6, 10, 15, 21],
            plasticity=[4, 9, 12, 16, 21], preqn=[7, 15, 21]),
}


@pytest.mark.parametrize("actor_every", [1, 2])
def test_monitors_measure_at_every_multiple_a_users_two_optimiser_module_passes(chain_file, actor_every):
    callbacks = monitors()
    preqn = PreQNLineSearch()
    trainer, logger = fit_user_module(chain_file, actor_every, 20, [*callbacks.values(), preqn])
    expected = EXPECTED[actor_every]
    assert trainer.global_step == {1: 20, 2: 21}[actor_every]  # the increments written out above
    for name, key in KEYS.items():
        # Written at the step the measurement was taken: the Trainer's global_step.
        assert logger.steps(key) == expected[name], name
        assert callbacks[name].last_step == expected[name][-1]
    assert logger.steps("preqn/cos") == expected["preqn"]


def test_cadence_survives_checkpoint_and_resume(chain_file, tmp_path):
    """Stopped at step 8 (increment 2) and resumed to 20: together the two runs measure at
    the steps of one run; also from a checkpoint written before next_due was saved."""
    first = monitors()
    trainer, before = fit_user_module(chain_file, 1, 8, list(first.values()))
    path = tmp_path / "step8.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert {state["next_due"] for state in checkpoint["callbacks"].values()} == {9, 10, 12}
    old = {**checkpoint, "callbacks": {key: {k: v for k, v in state.items() if k != "next_due"}
                                       for key, state in checkpoint["callbacks"].items()}}
    torch.save(old, tmp_path / "old.ckpt")
    for ckpt in (path, tmp_path / "old.ckpt"):
        resumed = monitors()
        _, after = fit_user_module(chain_file, 1, 20, list(resumed.values()), ckpt_path=ckpt)
        for name, key in KEYS.items():
            assert before.steps(key) + after.steps(key) == EXPECTED[1][name], (ckpt.name, name)


# ------------------------------------------------------------------ the probe set (item 5)


def test_a_cut_probe_set_is_one_warning_naming_both_sizes():
    """The random walk has 64 transitions: asking for 100 gives one warning saying so (not
    one per measurement), and the measurements run on the 64; asking for 64 gives none."""
    for size, expected in ((100, 1), (64, 0)):
        L.seed_everything(0, verbose=False)
        monitor = NTKGramCallback(every_n_steps=1, probe_size=size)
        trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[monitor])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(RandomWalkQ(), RandomWalkDataModule(seed=0))
        cut = [str(w.message) for w in caught if "probe set is cut" in str(w.message)]
        assert len(cut) == expected, cut
        assert monitor.probe.obs.shape[0] == 64 and monitor.last_step == 3
        if expected:
            assert "NTKGramCallback: probe_size=100 transitions requested" in cut[0]
            assert "RandomWalkDataModule has only 64" in cut[0]


# ------------------------------------------------- Lightning's manual-optimisation warning (item 7)


def test_model_checkpoint_every_n_train_steps_is_quiet_on_a_qlearning_module(tmp_path):
    """Lightning warns on every ModelCheckpoint save of a manually optimised module; for a
    QLearningModule (global_step = updates) that advice does not apply and is silenced.
    The checkpoints are written at the steps asked for, holding those steps' counters."""
    L.seed_everything(0, verbose=False)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(max_steps=6, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[checkpoints])
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", append=True)  # every other warning is recorded, repeats too
        trainer.fit(RandomWalkQ(), RandomWalkDataModule(seed=0))
        # the filter lives from fit start to teardown only: another module fitted later in the
        # process (a user's own manually optimised one) still hears the warning
        assert not [f for f in warnings.filters if f[1] is not None and "manual optimization" in f[1].pattern]
    assert not [w for w in caught if "ModelCheckpoint with manual optimization" in str(w.message)]
    saved = sorted(tmp_path.glob("*.ckpt"))
    assert [p.name for p in saved] == [f"epoch=0-step={k}.ckpt" for k in (2, 4, 6)]
    for path, k in zip(saved, (2, 4, 6)):
        checkpoint = torch.load(path, weights_only=False)
        assert checkpoint["global_step"] == checkpoint["lit_qlearn_updates"] == k
