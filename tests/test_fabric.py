"""The Lightning callbacks in a hand-written Lightning Fabric TD3 loop (tests/fabric_td3.py):
``Fabric(callbacks=[...])``, ``fabric.call("on_fabric_setup" / "on_fabric_update" /
"on_fabric_end", ...)``; the numbers against lit_qlearn.ntk and hand computations, resume
through ``fabric.save`` / ``fabric.load``, the crash actions, and DDP with 2 CPU processes."""
from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric

from lit_qlearn.callbacks import CrashPredictor, NTKGramCallback, PlasticityMonitor, SEEMMonitor
from lit_qlearn.loggers import SeriesLogger
from lit_qlearn.ntk import ntk_gram, seem
from tests.conftest import run_ddp_script
from tests.fabric_td3 import Loop, make_data


def callbacks():
    return [SEEMMonitor(every_n_steps=10, probe_size=64), NTKGramCallback(every_n_steps=10, probe_size=64),
            CrashPredictor(every_n_steps=10, probe_size=64)]


def run(steps, cbs=None, data=None, **loop_kwargs):
    log = SeriesLogger()
    cbs = callbacks() if cbs is None else cbs
    fabric = Fabric(accelerator="cpu", devices=1, loggers=log, callbacks=cbs)
    loop = Loop(fabric, make_data() if data is None else data, **loop_kwargs)
    loop.run(steps)
    return loop, log, cbs


def test_the_scalars_are_those_of_the_first_critic_on_the_probe_drawn_from_the_data():
    """At each multiple of every_n_steps the callbacks (PlasticityMonitor on its own cadence)
    write their scalars through the Fabric's loggers; the probe set is the seeded draw of 64 distinct rows; at the last step
    SEEM and the NTK are lit_qlearn.ntk's on the first critic (dense solver), and the Bellman
    ratio and the TD-error norm are computed by hand."""
    data = make_data()
    plasticity = PlasticityMonitor(every_n_steps=15, probe_size=64)
    loop, log, (seem_cb, ntk_cb, crash, _) = run(30, cbs=[*callbacks(), plasticity], data=data)
    assert sorted(log.rows) == [10, 15, 20, 30]
    assert [s for s in log.rows if "plasticity/feature_rank" in log.rows[s]] == [15, 30]
    rows = torch.randperm(256, generator=torch.Generator().manual_seed(0))[:64].sort().values
    for cb in (seem_cb, ntk_cb, crash):
        assert torch.equal(cb.probe.obs, data.obs[rows]) and torch.equal(cb.probe.rew, data.rew[rows])
    agent, probe, last = loop.agent, seem_cb.probe, log.rows[30]
    with torch.no_grad():
        next_act = agent.actor(probe.next_obs)
        q_data, q_next = agent.critic.q1(probe.obs, probe.act), agent.critic.q1(probe.next_obs, next_act)
    ref = seem(agent.critic.q1, (probe.obs, probe.act), (probe.next_obs, next_act), 0.99, scale_by_params=True,
               solver="dense")
    assert last["seem/max_eig_normalized"] == pytest.approx(ref.normalized, rel=1e-3, abs=1e-4)
    assert last["seem/q_data_mean"] == pytest.approx(q_data.mean().item(), rel=1e-6)
    gram = ntk_gram(agent.critic.q1, (probe.obs, probe.act))
    assert last["ntk/diag_mean"] == pytest.approx(gram.diagonal().mean().item(), rel=1e-5)
    bound = data.rew.abs().max().item() / (1 - 0.99)  # the data's rewards, not the probe's
    assert last["crash/q_bound_ratio"] == pytest.approx(
        max(q_data.abs().max().item(), q_next.abs().max().item()) / bound, rel=1e-5)
    u = q_data - (probe.rew + 0.99 * (1 - probe.terminated) * q_next)
    assert last["crash/td_error_norm"] == pytest.approx(u.norm().item(), rel=1e-5)
    # Adam: the law's reference eta sqrt(P) from the critic optimiser given at setup
    params = sum(p.numel() for p in agent.critic.q1.parameters())
    assert last["params/adam_slope"] == pytest.approx(1e-3 * params ** 0.5, rel=1e-6)


def test_a_run_resumed_with_fabric_load_measures_as_the_uninterrupted_one(tmp_path):
    """The callbacks are stateful objects in the loop's ``fabric.save`` dict: a fresh loop and
    fresh callbacks loaded at step 20 log at step 30 exactly what the uninterrupted run logs
    (the same probe set, the previous kernel and actions, the cadence), and nothing at 20 again."""
    _, whole, _ = run(30)
    first = callbacks()
    loop, part, _ = run(20, cbs=first)
    fabric = loop.fabric
    fabric.save(tmp_path / "step20.ckpt", loop.state(seem=first[0], ntk=first[1], crash=first[2]))

    again, log = callbacks(), SeriesLogger()
    fabric = Fabric(accelerator="cpu", devices=1, loggers=log, callbacks=again)
    resumed = Loop(fabric, make_data(), seed=7)  # other initial weights and streams: all replaced by the load
    fabric.load(tmp_path / "step20.ckpt", resumed.state(seem=again[0], ntk=again[1], crash=again[2]))
    assert resumed.step == 20
    resumed.run(10)
    assert sorted(log.rows) == [30]
    assert log.rows[30] == whole.rows[30]
    assert part.rows[20] == whole.rows[20]


def test_checkpoint_and_stop_keeps_the_last_healthy_state_for_fabric_load(tmp_path):
    """TD3 made to diverge (tau = 1: the target is the critic itself, lr 1e-2, 16 transitions)
    leaves the Bellman bound at update 50: the loop breaks on ``should_stop`` there, and the
    kept file is the state of update 40, which ``fabric.load`` puts back, finite and within
    the bound; no hidden file is left."""
    crash, seen = CrashPredictor(every_n_steps=10, probe_size=16, action="checkpoint_and_stop",
                                 dirpath=tmp_path), {}
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[crash])
    loop = Loop(fabric, make_data(n=16), lr=1e-2, tau=1.0)

    def record(loop):
        seen[loop.step] = {k: v.clone() for k, v in loop.agent.state_dict().items()}

    with pytest.warns(UserWarning, match="beyond the Bellman bound"):
        loop.run(500, crash=crash, state=loop.state(), on_step=record)
    assert crash.should_stop and crash.stopped_step == loop.step == 50 and crash.healthy_step == 40
    assert [p.name for p in tmp_path.iterdir()] == ["last-healthy-step=40.ckpt"]
    assert crash.checkpoint_path == str(tmp_path / "last-healthy-step=40.ckpt")

    fresh = Loop(Fabric(accelerator="cpu", devices=1), make_data(n=16), seed=3)
    fresh.fabric.load(crash.checkpoint_path, fresh.state())
    assert fresh.step == 40
    for key, value in fresh.agent.state_dict().items():
        assert torch.equal(value, seen[40][key]), key
    with torch.no_grad():
        q = fresh.agent.critic.q1(crash.probe.obs, crash.probe.act)
    assert torch.isfinite(q).all() and q.abs().max() <= crash.bound


def test_warn_goes_on_and_stop_stops_without_a_file(tmp_path):
    """The same divergence under "warn": one warning at update 50 and the loop goes on; under
    "stop": the loop breaks at 50 and nothing is written."""
    data = make_data(n=16)
    warn = CrashPredictor(every_n_steps=10, probe_size=16)
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[warn])
    loop = Loop(fabric, data, lr=1e-2, tau=1.0)
    with pytest.warns(UserWarning, match="beyond the Bellman bound"):
        loop.run(80, crash=warn)
    assert warn.fired and not warn.should_stop and loop.step == 80 and warn.stopped_step == 50

    stop = CrashPredictor(every_n_steps=10, probe_size=16, action="stop", dirpath=tmp_path)
    loop = Loop(Fabric(accelerator="cpu", devices=1, callbacks=[stop]), data, lr=1e-2, tau=1.0)
    with pytest.warns(UserWarning, match="training stops"):
        loop.run(80, crash=stop)
    assert stop.should_stop and loop.step == 50 and list(tmp_path.iterdir()) == []


def test_misuse_is_named_at_setup():
    data, fabric = make_data(), Fabric(accelerator="cpu", devices=1)
    loop = Loop(fabric, data)
    with pytest.raises(ValueError, match="action='rollback'.*Trainer"):
        CrashPredictor(action="rollback").on_fabric_setup(fabric, loop.agent, data)
    with pytest.raises(ValueError, match="checkpoint_and_stop.*state="):
        CrashPredictor(action="checkpoint_and_stop").on_fabric_setup(fabric, loop.agent, data)
    with pytest.raises(ValueError, match="dirpath"):
        CrashPredictor(action="checkpoint_and_stop").on_fabric_setup(fabric, loop.agent, data, state=loop.state())
    with pytest.raises(TypeError, match="data must be a lit_qlearn.data.Transitions"):
        SEEMMonitor().on_fabric_setup(fabric, loop.agent, {"obs": data.obs})
    with pytest.raises(RuntimeError, match="before on_fabric_setup"):
        SEEMMonitor().on_fabric_update(fabric, loop.agent, 1)
    with pytest.warns(UserWarning, match="probe set is cut to 256"):
        SEEMMonitor().on_fabric_setup(fabric, loop.agent, data)


def test_under_ddp_two_processes_log_what_one_device_logs(tmp_path):
    """DDP, 2 CPU processes, each rank training on its half of the global minibatch: both ranks
    log the same scalars, equal to the one-device run on the whole minibatch; a diverging run
    stops on both ranks at the same update and rank zero keeps one file."""
    run_ddp_script(Path(__file__).with_name("fabric_ddp.py"), tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["rows"] == r1["rows"] and r0["diverging"] == r1["diverging"]
    _, single, _ = run(30)
    assert sorted(r0["rows"]) == [10, 20, 30]
    for step, row in single.rows.items():
        for key, value in row.items():
            assert r0["rows"][step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
    assert r0["stopped"] == r1["stopped"] == 50 and r0["healthy_step"] == 40
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["last-healthy-step=40.ckpt"]
