"""lit_qlearn.integrations.sb3: the meters on real Stable-Baselines3 agents (SAC on Pendulum-v1,
DQN on CartPole-v1, sb3-contrib's CrossQ), the logged SEEM and NTK checked against lit_qlearn.ntk on the same
network and probe, computed here at the step measured; the actions on an unhealthy verdict."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("stable_baselines3")

from stable_baselines3 import DDPG, DQN, PPO, SAC, TD3  # noqa: E402

from lit_qlearn.data import Transitions  # noqa: E402
from lit_qlearn.integrations.sb3 import MonitorCallback, probe_adapter  # noqa: E402
from lit_qlearn.monitoring import CrashMeter, Meter, Monitor, NTKMeter, SEEMMeter  # noqa: E402
from lit_qlearn.ntk import ntk_gram, seem  # noqa: E402


class Recording(MonitorCallback):
    """Right after each measurement: ``reference(model, probe)``, computed by the test."""

    def __init__(self, reference, **kwargs):
        super().__init__(**kwargs)
        self.reference, self.seen = reference, []

    def _on_step(self) -> bool:
        go_on = super()._on_step()
        if self.last_step == self.model.num_timesteps and (not self.seen or self.seen[-1][0] != self.last_step):
            probe = self.monitor.meters[0].probe
            self.seen.append((self.last_step, dict(self.scalars), self.reference(self.model, probe)))
        return go_on


def _events(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = [p for p in logdir.iterdir() if p.is_dir()]
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _check(seen, events, steps, rel=1e-5):
    """``rel``: SEEM's agreement with the dense solver, within the Arnoldi acceptance ``tol`` (1e-4)."""
    assert [s for s, *_ in seen] == steps
    for step, scalars, (ref, gram) in seen:
        assert scalars["seem/max_eig"] == pytest.approx(ref.value, rel=rel, abs=1e-10)
        assert scalars["seem/max_eig_normalized"] == pytest.approx(ref.normalized, rel=1e-5, abs=1e-8)
        assert scalars["ntk/diag_mean"] == pytest.approx(torch.diagonal(gram).mean().item(), rel=1e-5)
    for tag in ("seem/max_eig_normalized", "ntk/diag_mean", "crash/td_error_norm", "params/adam_slope"):
        assert [s for s, _ in events[tag]] == steps, tag
        for (_, value), (_, scalars, _) in zip(events[tag], seen):
            assert value == pytest.approx(scalars[tag], rel=1e-6), tag


class FirstCritic(nn.Module):  # SB3's q_networks[0] on (s, a): Pendulum's features are its observations
    def __init__(self, model):
        super().__init__()
        self.q = model.critic.q_networks[0]

    def forward(self, obs, act):
        return self.q(torch.cat([obs, act], 1))


def test_sac_on_pendulum_logs_seem_and_ntk_of_its_first_critic(tmp_path):
    """SAC: the probe rows are replay-buffer transitions (time-limit ends are not terminals), and
    the logged SEEM / NTK are those of ``critic.q_networks[0]`` with the actor's mean action at
    s', at SB3's num_timesteps, in SB3's TensorBoard run."""
    torch.manual_seed(0)

    def reference(model, probe):
        critic = FirstCritic(model)
        with torch.no_grad():
            next_act = model.actor(probe.next_obs, deterministic=True)
        ref = seem(critic, (probe.obs, probe.act), (probe.next_obs, next_act), model.gamma, scale_by_params=True,
                   solver="dense")
        return ref, ntk_gram(critic, (probe.obs, probe.act))

    model = SAC("MlpPolicy", "Pendulum-v1", learning_starts=200, batch_size=64, seed=0, device="cpu",
                tensorboard_log=str(tmp_path), policy_kwargs=dict(net_arch=[32, 32]))
    callback = Recording(reference, every_n_steps=150, probe_size=200)
    model.learn(450, callback=callback)
    _check(callback.seen, _events(tmp_path), [300, 450])  # 150 < learning_starts: no probe set yet
    probe, buffer = callback.monitor.meters[0].probe, model.replay_buffer
    assert len(probe.obs) == 200 and probe.terminated.sum() == 0  # Pendulum never terminates, it is cut at 200
    rows = [int(np.flatnonzero((buffer.observations[:, 0] == o.numpy()).all(1))[0]) for o in probe.obs]
    np.testing.assert_array_equal(buffer.next_observations[rows, 0], probe.next_obs.numpy())
    np.testing.assert_array_equal(buffer.rewards[rows, 0], probe.rew.numpy())
    # drawn once, when learning starts: the 200 transitions stored then, the last one the time limit's cut
    assert sorted(rows) == list(range(200)) and buffer.dones[199, 0] == buffer.timeouts[199, 0] == 1


def test_dqn_on_cartpole_logs_seem_and_ntk_and_warns(tmp_path):
    """DQN: Q(s, a) gathered from ``q_net(s)``, the greedy action its argmax; an unhealthy verdict
    with ``action="warn"`` warns once and training goes on."""
    torch.manual_seed(0)

    class Gathered(nn.Module):
        def __init__(self, q_net):
            super().__init__()
            self.q_net = q_net

        def forward(self, obs, act):
            return self.q_net(obs).gather(1, act.reshape(-1, 1)).squeeze(1)

    def reference(model, probe):
        critic = Gathered(model.q_net)
        with torch.no_grad():
            greedy = model.q_net(probe.next_obs).argmax(1)
        ref = seem(critic, (probe.obs, probe.act), (probe.next_obs, greedy), model.gamma, scale_by_params=True,
                   solver="dense")
        return ref, ntk_gram(critic, (probe.obs, probe.act))

    model = DQN("MlpPolicy", "CartPole-v1", learning_starts=500, seed=0, device="cpu", tensorboard_log=str(tmp_path),
                policy_kwargs=dict(net_arch=[32, 32]))
    callback = Recording(reference, every_n_steps=500, probe_size=128,
                         meters=[SEEMMeter(), NTKMeter(), CrashMeter(), Planted(from_step=1500)])
    with pytest.warns(UserWarning, match="MonitorCallback at step 1500: planted") as caught:
        model.learn(2000, callback=callback)
    assert sum("MonitorCallback" in str(w.message) for w in caught) == 1 and model.num_timesteps == 2000
    _check(callback.seen, _events(tmp_path), [1000, 1500, 2000])
    assert callback.monitor.meters[0].probe.act.dtype == torch.int64


@pytest.mark.parametrize("algo, members", [(TD3, 2), (DDPG, 1)])
def test_td3_and_ddpg_adapters_measure_the_first_critic_with_the_deterministic_actor(algo, members):
    """TD3 / DDPG (not trained: the adapter is the point): SEEM of ``critic.q_networks[0]`` with
    ``actor(s')``, ``q_networks()`` every member, gamma the model's."""
    torch.manual_seed(0)
    model = algo("MlpPolicy", "Pendulum-v1", gamma=0.95, seed=0, device="cpu", policy_kwargs=dict(net_arch=[16, 16]))
    gen = torch.Generator().manual_seed(1)
    probe = Transitions(obs=torch.randn(24, 3, generator=gen), act=torch.rand(24, 1, generator=gen) * 2 - 1,
                        rew=torch.randn(24, generator=gen), next_obs=torch.randn(24, 3, generator=gen),
                        terminated=torch.zeros(24))
    agent = probe_adapter(model)
    scalars = Monitor([SEEMMeter()], probe).measure(agent, 0)
    with torch.no_grad():
        next_act = model.actor(probe.next_obs)
    ref = seem(FirstCritic(model), (probe.obs, probe.act), (probe.next_obs, next_act), 0.95, scale_by_params=True,
               solver="dense")
    assert scalars["seem/max_eig_normalized"] == pytest.approx(ref.normalized, rel=1e-5, abs=1e-8)
    assert agent.gamma == 0.95 and len(agent.q_networks()) == members


def test_sb3_contrib_crossq_is_measured_in_eval_mode_with_its_batch_renorm_statistics(tmp_path):
    """sb3-contrib's CrossQ (BatchRenorm in the critic, no target network): the same adapter
    measures ``critic.q_networks[0]`` in eval mode, with the running statistics, the function
    CrossQ's actor loss evaluates; SEEM and the NTK equal lit_qlearn.ntk's on that network in
    eval mode at the step measured, and the measurement leaves the critic in train mode and its
    running statistics untouched."""
    sb3_contrib = pytest.importorskip("sb3_contrib")
    torch.manual_seed(0)

    def reference(model, probe):
        critic, actor = model.critic, model.actor
        modes = [(m, m.training) for m in [*critic.modules(), *actor.modules()]]
        critic.eval(), actor.eval()
        with torch.no_grad():
            next_act = actor(probe.next_obs, deterministic=True)
        ref = seem(FirstCritic(model), (probe.obs, probe.act), (probe.next_obs, next_act), model.gamma,
                   scale_by_params=True, solver="dense")
        gram = ntk_gram(FirstCritic(model), (probe.obs, probe.act))
        for m, mode in modes:
            m.train(mode)
        return ref, gram

    model = sb3_contrib.CrossQ("MlpPolicy", "Pendulum-v1", learning_starts=200, batch_size=64, seed=0, device="cpu",
                               tensorboard_log=str(tmp_path), policy_kwargs=dict(net_arch=dict(pi=[32, 32], qf=[64, 64])))
    norm = model.critic.q_networks[0][0]
    assert type(norm).__name__ == "BatchRenorm1d"
    callback = Recording(reference, every_n_steps=150, probe_size=200)
    stats = norm.ra_mean.clone()
    model.learn(450, callback=callback)
    _check(callback.seen, _events(tmp_path), [300, 450], rel=1e-4)
    assert not torch.equal(norm.ra_mean, stats)  # training moved them; the measurements did not (below)
    model.critic.train()
    before, mode = norm.ra_mean.clone(), model.critic.training
    callback.monitor.measure(callback.agent, 450)
    assert torch.equal(norm.ra_mean, before) and model.critic.training == mode


class Planted(Meter):
    """A scripted verdict: unhealthy from ``from_step`` on."""

    def __init__(self, from_step):
        super().__init__()
        self.from_step = from_step

    def compute(self, module, probe, step):
        self.reasons = ["planted"] if step >= self.from_step else []
        return {}


def test_checkpoint_and_stop_keeps_the_last_healthy_model(tmp_path):
    """Healthy at 600 and 800, unhealthy at 1000: training stops there, and the file is the model
    of step 800 (model.save), loadable by SB3; the temporary file is gone."""
    torch.manual_seed(0)
    weights = {}

    class Watch(MonitorCallback):
        def _on_step(self):
            if self.model.num_timesteps in (600, 800):
                weights[self.model.num_timesteps] = [p.detach().clone() for p in self.model.q_net.parameters()]
            return super()._on_step()

    model = DQN("MlpPolicy", "CartPole-v1", learning_starts=500, seed=0, device="cpu",
                policy_kwargs=dict(net_arch=[16]))
    callback = Watch(meters=[Planted(from_step=1000)], every_n_steps=200, probe_size=32,
                     action="checkpoint_and_stop", dirpath=tmp_path)
    with pytest.warns(UserWarning, match="training stops"):
        model.learn(3000, callback=callback)
    assert model.num_timesteps == 1000 and callback.stopped_step == 1000 and callback.healthy_step == 800
    assert callback.checkpoint_path == str(tmp_path / "last-healthy-step=800.zip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last-healthy-step=800.zip"]
    kept = DQN.load(callback.checkpoint_path, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(kept.q_net.parameters(), weights[800]))
    assert not all(torch.equal(a, b) for a, b in zip(weights[600], weights[800]))  # it trained in between


def test_a_forced_divergence_is_stopped_with_a_finite_saved_model(tmp_path):
    """TD3 made to diverge (tau = 1: the target is the critic itself; lr 3e-2, gamma 0.999,
    10 updates per step on a 500-transition buffer): max|Q| on the probe set leaves the Bellman
    bound within 40 steps of learning; training stops there and the kept model, the last
    healthy measurement's, is finite and within the bound on the probe set."""
    torch.manual_seed(0)
    model = TD3("MlpPolicy", "Pendulum-v1", learning_starts=500, buffer_size=500, gradient_steps=10,
                learning_rate=3e-2, tau=1.0, gamma=0.999, batch_size=64, seed=0, device="cpu",
                policy_kwargs=dict(net_arch=[32, 32]))
    crash, stored = CrashMeter(), []

    class Watch(MonitorCallback):
        def _draw_probe(self):
            stored.append(self.model.replay_buffer.rewards.copy())  # full: 500 rewards at learning_starts
            super()._draw_probe()

    callback = Watch(meters=[crash], every_n_steps=20, probe_size=64, action="checkpoint_and_stop", dirpath=tmp_path)
    with pytest.warns(UserWarning, match="beyond the Bellman bound"):
        model.learn(2000, callback=callback)
    assert callback.stopped_step == model.num_timesteps < 700 and callback.scalars["crash/q_bound_ratio"] > 2
    bound = np.abs(stored[0]).max() / (1 - 0.999)  # every reward stored when the probe was drawn
    assert crash.bound == pytest.approx(bound, rel=1e-6)
    kept = TD3.load(callback.checkpoint_path, device="cpu")
    assert all(torch.isfinite(p).all() for p in kept.policy.parameters())
    probe = callback.monitor.meters[0].probe
    with torch.no_grad():
        q = kept.critic.q_networks[0](torch.cat([probe.obs, probe.act], 1))
    assert q.abs().max().item() <= bound


def test_misuse_is_named_and_lit_qlearn_does_not_import_sb3():
    with pytest.raises(ValueError, match="MonitorCallback: action"):
        MonitorCallback(action="rollback")
    with pytest.raises(ValueError, match="MonitorCallback: every_n_steps"):
        MonitorCallback(every_n_steps=0)
    with pytest.raises(TypeError, match="neither policy.q_net"):
        probe_adapter(PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, device="cpu"))
    code = ("import sys, lit_qlearn, lit_qlearn.monitoring, lit_qlearn.callbacks; "
            "assert 'stable_baselines3' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
