from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_qlearn.algorithms import TD3, TD3BC
from lit_qlearn.probe import check_probe_module, critic_members
from tests.conftest import CHAIN_STATES, chain_q, fit, run_ddp_script


def chain_grid():
    """Every chain state with 21 actions spanning [-1, 1]."""
    obs = torch.eye(CHAIN_STATES).repeat_interleave(21, 0)
    act = torch.linspace(-1, 1, 21).repeat(CHAIN_STATES)[:, None]
    return obs, act


@pytest.mark.parametrize("cls", [TD3BC, TD3])
def test_critic_learns_closed_form_q_of_chain_mdp(tiny_td3bc, cls):
    gamma = 0.9
    _, dm = tiny_td3bc()
    module = cls(obs_dim=CHAIN_STATES, act_dim=1, gamma=gamma, critic_hidden=(64, 64), actor_hidden=(64, 64),
                 critic_lr=1e-3, actor_lr=1e-3, target_tau=0.05, target_every=1, eval_every=0)
    trainer = fit(module, dm, 800)
    assert module.updates == trainer.global_step == 800
    obs, act = chain_grid()
    with torch.no_grad():
        q = module.q_value(obs, act).view(CHAIN_STATES, 21).numpy()
    # Q(s_k, a) = (1 - gamma^(K-k)) / (1 - gamma) for every action: 4.095 at k = 0.
    np.testing.assert_allclose(q, np.repeat(chain_q(gamma)[:, None], 21, 1), atol=0.1)


def test_probe_protocol(tiny_td3bc):
    module, _ = tiny_td3bc()
    check_probe_module(module)
    obs, act = chain_grid()
    with torch.no_grad():
        torch.testing.assert_close(module.q_value(obs, act), module.critic(obs, act)[0])
        torch.testing.assert_close(module.q_network()(obs, act), module.critic(obs, act)[0])
        torch.testing.assert_close(module.greedy_action(obs), module.actor(obs))
    assert {id(p) for p in module.q_network().parameters()} == {id(p) for p in module.critic.members[0].parameters()}
    assert module.gamma == 0.99
    members = critic_members(module)  # q_networks(): every twin, each the critic's own member
    assert [{id(p) for p in m.parameters()} for m in members] == [
        {id(p) for p in member.parameters()} for member in module.critic.members]
    with torch.no_grad():
        torch.testing.assert_close(torch.stack([m(obs, act) for m in members]), module.critic(obs, act))


def test_actor_updates_every_policy_freq(tiny_td3bc):
    module, dm = tiny_td3bc(policy_freq=3)
    snapshots = []

    class Snap(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots.append(torch.nn.utils.parameters_to_vector(pl_module.actor.parameters()).clone())

    before = torch.nn.utils.parameters_to_vector(module.actor.parameters()).clone()
    fit(module, dm, 6, callbacks=[Snap()])
    changed = [not torch.equal(a, b) for a, b in zip([before] + snapshots[:-1], snapshots)]
    assert changed == [False, False, True, False, False, True]


def test_td3bc_defaults_are_the_papers():
    hp = TD3BC(obs_dim=3, act_dim=2).hparams
    assert (hp.bc_alpha, hp.policy_noise, hp.noise_clip, hp.policy_freq, hp.actor_lr, hp.critic_lr, hp.gamma) == (
        2.5, 0.2, 0.5, 2, 3e-4, 3e-4, 0.99)
    assert TD3(obs_dim=3, act_dim=2).hparams.bc_alpha is None


def test_dimension_mismatch_between_module_and_data_is_reported_at_setup(tiny_td3bc):
    _, dm = tiny_td3bc()
    module = TD3BC(obs_dim=7, act_dim=1, eval_every=0)
    with pytest.raises(ValueError, match=r"observations \(7,\)"):
        fit(module, dm, 1)


def test_dimensions_are_read_from_the_datamodule_and_checkpoint_reloads(tiny_td3bc, tmp_path):
    _, dm = tiny_td3bc()
    module = TD3BC(critic_hidden=(16,), actor_hidden=(16,), eval_every=0)
    trainer = fit(module, dm, 3, enable_checkpointing=True, default_root_dir=tmp_path)
    assert (module.spec.obs_shape, module.spec.action_dim) == ((CHAIN_STATES,), 1)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["lit_qlearn_class"] == "lit_qlearn.algorithms.td3.TD3BC" and ckpt["lit_qlearn_updates"] == 3
    loaded = TD3BC.load_from_checkpoint(path)
    assert loaded.updates == 3
    obs, act = chain_grid()
    with torch.no_grad():
        torch.testing.assert_close(loaded.critic(obs, act), module.critic(obs, act))
    np.testing.assert_allclose(loaded.act(np.eye(CHAIN_STATES)[0]), module.act(np.eye(CHAIN_STATES)[0]))


@pytest.fixture(scope="module")
def hopper_file(tmp_path_factory):
    from lit_qlearn.datasets import collect

    return collect("Hopper-v5", "random", steps=400, path=tmp_path_factory.mktemp("d") / "hopper.hdf5", seed=0)


def test_tensorboard_scalars_and_evaluation(hopper_file, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from lit_qlearn.data import OfflineDataModule

    dm = OfflineDataModule(str(hopper_file), batch_size=32, steps_per_epoch=10)
    module = TD3BC(critic_hidden=(16,), actor_hidden=(16,), eval_every=4, eval_episodes=1)
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(module, dm, 8, logger=logger, log_every_n_steps=2)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    names = {"train/critic_loss", "train/actor_loss", "q/data_mean", "q/policy_mean", "params/critic_norm",
             "eval/return", "eval/normalized_score"}
    assert names <= set(events.Tags()["scalars"])
    # One step axis: scalars land at the update count (Trainer.global_step), as the callbacks' do.
    assert [e.step for e in events.Scalars("train/critic_loss")] == [2, 4, 6, 8]
    assert [e.step for e in events.Scalars("eval/return")] == [4, 8]
    # The logged normalised score is D4RL's formula on the logged return.
    ret = events.Scalars("eval/return")[-1].value
    lo, hi = dm.ref_scores
    assert events.Scalars("eval/normalized_score")[-1].value == pytest.approx(100 * (ret - lo) / (hi - lo), rel=1e-5)
    # Parameter norm: the logged value is the critic's L2 norm at that step (last log = end of training).
    norm = torch.linalg.vector_norm(torch.nn.utils.parameters_to_vector(module.critic.parameters())).item()
    assert events.Scalars("params/critic_norm")[-1].value == pytest.approx(norm, rel=1e-5)


def test_ddp_two_cpu_processes_keep_parameters_identical(chain_file, tmp_path):
    run_ddp_script(Path(__file__).with_name("ddp_td3bc.py"), chain_file, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["updates"] == r1["updates"] == r0["global_step"] == 20
    assert torch.equal(r0["params"], r1["params"])
    # Rank zero wrote the (rank-averaged) training scalars at updates 5, 10, 15, 20.
    events = EventAccumulator(str(next((tmp_path / "tb").glob("version_*"))))
    events.Reload()
    assert [e.step for e in events.Scalars("train/critic_loss")] == [5, 10, 15, 20]


def test_ddp_evaluation_reaches_every_rank(hopper_file, tmp_path):
    # rank zero evaluates; every rank's ModelCheckpoint / EarlyStopping monitoring eval/return
    # sees its number (without it, rank one has no such metric and the monitors disagree)
    run_ddp_script(Path(__file__).with_name("ddp_eval.py"), hopper_file, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0 == r1
    assert r0["eval_return"] == pytest.approx(r0["direct"], rel=1e-6)  # the final policy's return, evaluated again
    assert r0["best_score"] >= r0["eval_return"]  # the better of the evaluations at updates 10 and 20


def test_direct_steps_and_lightnings_step_wrappers_give_identical_updates(tiny_td3bc):
    calls = []

    class Listener(L.Callback):  # listening to a step hook routes optimize() through Lightning
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            calls.append(trainer.global_step)

    direct, dm = tiny_td3bc()
    t_direct = fit(direct, dm, 6)
    wrapped, dm = tiny_td3bc()
    t_wrapped = fit(wrapped, dm, 6, callbacks=[Listener()])
    assert direct.stepper.direct and not wrapped.stepper.direct
    assert len(calls) == 6 + 3  # every critic step and every second (actor) step
    assert t_direct.global_step == t_wrapped.global_step == 6
    for a, b in zip(direct.parameters(), wrapped.parameters()):
        assert torch.equal(a, b)


def test_the_delayed_actor_is_logged_on_the_updates_it_steps(tiny_td3bc):
    """Every update logs the critic's scalars; ``train/actor_loss`` comes with the updates
    that step the actor (every ``policy_freq``), and on the others ``q/policy_mean`` is
    measured at the log: the first critic at the actor's action, after the update."""
    from tests.callbacks.test_crash import MemoryLogger

    module, dm = tiny_td3bc(policy_freq=3)
    measured = {}

    class Measure(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            with torch.no_grad():
                measured[pl_module.updates] = pl_module.q_value(batch.obs, pl_module.actor(batch.obs)).mean().item()

    logger = MemoryLogger()
    fit(module, dm, 6, logger=logger, log_every_n_steps=1, callbacks=[Measure()])
    assert sorted(logger.series("train/actor_loss")) == [3, 6]
    for name in ("train/critic_loss", "q/data_mean", "q/policy_mean", "params/critic_norm"):
        assert sorted(logger.series(name)) == [1, 2, 3, 4, 5, 6]
    policy = logger.series("q/policy_mean")
    for update in (1, 2, 4, 5):
        assert policy[update] == pytest.approx(measured[update], rel=1e-5)
    assert policy[3] != pytest.approx(measured[3], rel=1e-3)  # the actor step's own: before it moved
