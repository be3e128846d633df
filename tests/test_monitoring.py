"""The measuring core without Lightning: meters in a hand-written TD3-like loop (plain torch),
checked against lit_qlearn.ntk computed separately on the same network and probe, and the
scalars in a TensorBoard event file at the step they were measured (docs/design.md section 4)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from lit_qlearn.data import Transitions
from lit_qlearn.monitoring import (ActorCriticProbe, CrashMeter, DiscreteQProbe, Monitor, NTKMeter,
                                   PlasticityMeter, SEEMMeter, write)
from lit_qlearn.ntk import DiscreteQ, ntk_gram, seem
from lit_qlearn.probe import ProbeProtocolError

OBS, ACT, GAMMA = 3, 1, 0.9


class Critic(nn.Module):  # CleanRL's QNetwork: (obs, act) -> (N, 1)
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(OBS + ACT, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, obs, act):
        return self.net(torch.cat([obs, act], 1))


def transitions(n: int, seed: int) -> Transitions:
    gen = torch.Generator().manual_seed(seed)
    return Transitions(obs=torch.randn(n, OBS, generator=gen), act=torch.rand(n, ACT, generator=gen) * 2 - 1,
                       rew=torch.randn(n, generator=gen), next_obs=torch.randn(n, OBS, generator=gen),
                       terminated=(torch.rand(n, generator=gen) < 0.05).float())


def td3_loop(steps: int, every: int, monitor: Monitor | None = None, writer=None, seed: int = 0):
    """TD3 as a CleanRL single file writes it (twin critics, target policy smoothing, delayed actor,
    Polyak targets). Every ``every`` steps: the monitor's scalars, written, and what lit_qlearn.ntk
    gives on the same networks and probe at that step, computed here."""
    torch.manual_seed(seed)
    qf1, qf2 = Critic(), Critic()
    actor = nn.Sequential(nn.Linear(OBS, 32), nn.ReLU(), nn.Linear(32, ACT), nn.Tanh())
    qf1_t, qf2_t, actor_t = copy.deepcopy(qf1), copy.deepcopy(qf2), copy.deepcopy(actor)
    q_opt = torch.optim.Adam([*qf1.parameters(), *qf2.parameters()], lr=1e-3)
    a_opt = torch.optim.Adam(actor.parameters(), lr=1e-3)
    data = transitions(500, seed=1)
    agent = ActorCriticProbe(qf1, actor, GAMMA, critics=[qf1, qf2])
    seen = []
    for step in range(1, steps + 1):
        i = torch.randint(0, 500, (32,))  # the global stream: a measurement must leave it alone
        b = data.map(lambda t: t[i])
        with torch.no_grad():
            noise = (torch.randn_like(b.act) * 0.2).clamp(-0.5, 0.5)
            a2 = (actor_t(b.next_obs) + noise).clamp(-1, 1)
            q_next = torch.min(qf1_t(b.next_obs, a2), qf2_t(b.next_obs, a2)).squeeze(1)
            y = b.rew + GAMMA * (1 - b.terminated) * q_next
        loss = ((qf1(b.obs, b.act).squeeze(1) - y) ** 2).mean() + ((qf2(b.obs, b.act).squeeze(1) - y) ** 2).mean()
        q_opt.zero_grad()
        loss.backward()
        q_opt.step()
        if step % 2 == 0:
            a_loss = -qf1(b.obs, actor(b.obs)).mean()
            a_opt.zero_grad()
            a_loss.backward()
            a_opt.step()
            with torch.no_grad():
                for net, target in ((qf1, qf1_t), (qf2, qf2_t), (actor, actor_t)):
                    for p, tp in zip(net.parameters(), target.parameters()):
                        tp.mul_(0.995).add_(0.005 * p)
        if monitor is not None and step % every == 0:
            scalars = monitor.measure(agent, step)
            write(writer, scalars, step)
            p = monitor.meters[0].probe
            with torch.no_grad():
                next_act = actor(p.next_obs)
            ref = seem(qf1, (p.obs, p.act), (p.next_obs, next_act), GAMMA, scale_by_params=True, solver="dense")
            seen.append((step, scalars, ref, ntk_gram(qf1, (p.obs, p.act))))
    return [*qf1.parameters(), *qf2.parameters(), *actor.parameters()], seen


def _events(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_plain_td3_loop_logs_seem_and_ntk_equal_to_lit_qlearn_ntk(tmp_path):
    """The scalars a plain loop gets are lit_qlearn.ntk's on the same critic, actor and probe at
    that step, and the event file holds them at that step (NaNs, such as the first
    ``ntk/cos_prev``, are left out). Measuring leaves the run bit-identical."""
    probe = transitions(64, seed=2)
    monitor = Monitor([SEEMMeter(), NTKMeter(), CrashMeter()], probe)
    writer = SummaryWriter(tmp_path)
    params, seen = td3_loop(120, every=40, monitor=monitor, writer=writer)
    writer.close()
    assert [s for s, *_ in seen] == [40, 80, 120]
    grams = [g for *_, g in seen]
    for k, (step, scalars, ref, gram) in enumerate(seen):
        assert scalars["seem/max_eig"] == pytest.approx(ref.value, rel=1e-6, abs=1e-12)
        assert scalars["seem/max_eig_normalized"] == pytest.approx(ref.normalized, rel=1e-6, abs=1e-12)
        assert scalars["ntk/diag_mean"] == pytest.approx(torch.diagonal(gram).mean().item(), rel=1e-6)
        off = gram - torch.diag(torch.diagonal(gram))
        assert scalars["ntk/offdiag_abs_mean"] == pytest.approx((off.abs().sum() / (64 * 63)).item(), rel=1e-6)
        if k:
            prev = grams[k - 1]
            cos = (gram * prev).sum() / (gram.norm() * prev.norm())
            assert scalars["ntk/cos_prev"] == pytest.approx(cos.item(), rel=1e-6)
        assert math.isfinite(scalars["crash/td_error_norm"]) and monitor.reasons == []
    assert math.isnan(seen[0][1]["ntk/cos_prev"])
    events = _events(tmp_path)
    for tag in ("seem/max_eig", "seem/max_eig_normalized", "ntk/diag_mean", "crash/td_error_norm"):
        assert [s for s, _ in events[tag]] == [40, 80, 120], tag
        for (_, value), (_, scalars, *_) in zip(events[tag], seen):
            assert value == pytest.approx(scalars[tag], rel=1e-6), tag
    assert [s for s, _ in events["ntk/cos_prev"]] == [80, 120]
    untouched, _ = td3_loop(120, every=40)  # the same loop without measuring
    assert all(torch.equal(a, b) for a, b in zip(params, untouched))


def test_discrete_q_probe_seem_and_ntk_by_lit_qlearn_ntk():
    """A DQN network ``(N, 4)``: Q(s, a) is the gathered output, the greedy action its argmax;
    SEEM and the Gram equal lit_qlearn.ntk's on ``DiscreteQ(net)`` with those actions."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(OBS, 16), nn.Tanh(), nn.Linear(16, 4))
    gen = torch.Generator().manual_seed(3)
    probe = transitions(40, seed=3)._replace(act=torch.randint(0, 4, (40,), generator=gen))
    seem_meter, ntk_meter = SEEMMeter(), NTKMeter()
    monitor = Monitor([seem_meter, ntk_meter], probe)
    scalars = monitor.measure(DiscreteQProbe(net, 0.99), step=7)
    q = DiscreteQ(net)
    greedy = net(probe.next_obs).argmax(1)
    ref = seem(q, (probe.obs, probe.act), (probe.next_obs, greedy), 0.99, scale_by_params=True, solver="dense")
    assert scalars["seem/max_eig_normalized"] == pytest.approx(ref.normalized, rel=1e-6, abs=1e-12)
    assert scalars["seem/q_policy_mean"] == pytest.approx(net(probe.next_obs).max(1).values.mean().item(), rel=1e-6)
    gram = ntk_gram(q, (probe.obs, probe.act))
    assert scalars["ntk/diag_mean"] == pytest.approx(torch.diagonal(gram).mean().item(), rel=1e-6)
    assert torch.equal(seem_meter.previous_actions, greedy) and seem_meter.last_step == ntk_meter.last_step == 7


def test_crash_meter_judges_without_a_trainer():
    """The verdict is the meter's: healthy within the bound; ``reasons`` names the bound when
    max|Q| exceeds it, and a non-finite critic; Monitor.reasons gathers them."""
    torch.manual_seed(0)
    critic, actor = Critic(), nn.Sequential(nn.Linear(OBS, ACT), nn.Tanh())
    agent = ActorCriticProbe(critic, actor, GAMMA)
    probe = transitions(32, seed=4)
    healthy = Monitor([CrashMeter(), NTKMeter()], probe)
    scalars = healthy.measure(agent, 10)
    bound = probe.rew.abs().max().item() / (1 - GAMMA)  # the probe's rewards: no others were given
    assert healthy.meters[0].bound == pytest.approx(bound, rel=1e-6) and healthy.reasons == []
    with torch.no_grad():
        q_max = max(critic(probe.obs, probe.act).abs().max(), critic(probe.next_obs, actor(probe.next_obs)).abs().max())
    assert scalars["crash/q_bound_ratio"] == pytest.approx(q_max.item() / bound, rel=1e-5)
    tight = CrashMeter(q_bound=1e-6)
    tight.set_probe(probe)
    tight.measure(agent, 10)
    assert not tight.healthy and "beyond q_bound" in tight.reasons[0]
    with torch.no_grad():
        critic.net[0].weight[0, 0] = math.nan
    healthy.measure(agent, 20)
    assert healthy.reasons == ["the critic is non-finite on the probe set"]


@pytest.mark.parametrize("value", [math.nan, 1e30])
def test_a_diverged_critic_is_reported_not_raised(value):
    """Weights at NaN, or so large that the Gram overflows: the meters report NaN where there is
    nothing to compute (SEEM's eigenvalue, the feature rank) instead of raising from an
    eigen-solver, so that the crash verdict reaches the loop."""
    torch.manual_seed(0)
    critic, actor = Critic(), nn.Sequential(nn.Linear(OBS, ACT), nn.Tanh())
    with torch.no_grad():
        critic.net[0].weight.fill_(value)
    monitor = Monitor([SEEMMeter(), NTKMeter(), PlasticityMeter(), CrashMeter()], transitions(16, seed=7))
    scalars = monitor.measure(ActorCriticProbe(critic, actor, GAMMA), 5)
    assert math.isnan(scalars["seem/max_eig"]) and math.isnan(scalars["seem/max_eig_normalized"])
    assert "seem/participation" not in scalars
    if math.isnan(value):
        assert math.isnan(scalars["plasticity/feature_rank"])
    assert monitor.reasons and monitor.meters[-1].reasons == monitor.reasons


def test_the_monitors_state_resumes_the_measurements():
    """state_dict / load_state_dict: a new Monitor loaded from the state goes on as the original
    (probe set, previous Gram and actions, the crash window)."""
    torch.manual_seed(0)
    critic, actor = Critic(), nn.Sequential(nn.Linear(OBS, ACT), nn.Tanh())
    agent = ActorCriticProbe(critic, actor, GAMMA)

    def meters():
        return [SEEMMeter(), NTKMeter(), CrashMeter(min_points=2)]

    original = Monitor(meters(), transitions(24, seed=5))
    original.measure(agent, 1)
    resumed = Monitor(meters(), transitions(24, seed=6))  # another probe: the state's replaces it
    resumed.load_state_dict(original.state_dict())
    with torch.no_grad():
        for p in critic.parameters():
            p.mul_(1.1)
    a, b = original.measure(agent, 2), resumed.measure(agent, 2)
    assert a == b and not math.isnan(a["ntk/cos_prev"]) and "params/norm_slope" in a


def test_misuse_is_named():
    critic, actor = Critic(), nn.Sequential(nn.Linear(OBS, ACT), nn.Tanh())
    with pytest.raises(RuntimeError, match="set_probe"):
        SEEMMeter().measure(ActorCriticProbe(critic, actor, GAMMA), 0)
    with pytest.raises(TypeError, match="probe must be a lit_qlearn.data.Transitions"):
        SEEMMeter().set_probe({"obs": torch.zeros(2, 3)})
    with pytest.raises(TypeError, match="meters"):
        Monitor([], transitions(4, seed=0))
    with pytest.raises(ValueError, match="ActorCriticProbe: gamma must be"):
        ActorCriticProbe(critic, actor, 1.0)
    with pytest.raises(TypeError, match="actor must be an nn.Module"):
        ActorCriticProbe(critic, lambda obs: obs, GAMMA)
    with pytest.raises(ValueError, match="SEEMMeter: solver"):
        SEEMMeter(solver="qr")
    with pytest.raises(ValueError, match="CrashMeter: window"):
        CrashMeter(window=1)

    class Wide(nn.Module):  # two outputs per sample: not one Q-value
        def forward(self, obs, act):
            return torch.cat([obs, act], 1)[:, :2]

    with pytest.raises(ProbeProtocolError, match=r"q_value\(obs, act\)"):
        Monitor([NTKMeter()], transitions(8, seed=0)).measure(ActorCriticProbe(Wide(), actor, GAMMA), 0)
