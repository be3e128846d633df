"""The probe protocol's helpers and the monitors' bookkeeping against hand computations.

Written by mutation testing (issue 19): each test catches a planted single-line bug that
the other callback tests let through, named in its docstring. The monitors' ``measure``
is called directly on plain modules (no Trainer) where the bookkeeping is the point, so
every file here runs in about a second.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from lit_qlearn.callbacks import CrashPredictor, NTKGramCallback, PreQNLineSearch, SEEMMonitor
from lit_qlearn.callbacks.crash import _actions_moved, _data_rewards
from lit_qlearn.monitoring import CrashMeter
from lit_qlearn.data import OfflineDataModule, Transitions
from lit_qlearn.ntk import DiscreteQ, PreconditionedStep, preconditioned_step
from lit_qlearn.probe import Cadence, bootstrap_target, critic_members
from lit_qlearn.targets import TargetUpdate, make_target
from tests.callbacks.test_crash import MemoryLogger
from tests.callbacks.test_monitors import UserModule, run


# ------------------------------------------------------------ bootstrap_target


class HandModule:
    """gamma = 0.8, Q(s, a) = 2 sum(s) + a_0^2, greedy_action(s) = 3 s_0: every value by hand."""

    gamma = 0.8

    def q_value(self, obs, act):
        return 2 * obs.sum(1) + act[:, 0] ** 2

    def greedy_action(self, obs):
        return 3 * obs[:, :1]


def hand_batch(discount=None):
    return Transitions(
        obs=torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]),
        act=torch.tensor([[5.0], [5.0], [5.0]]),
        rew=torch.tensor([1.0, -1.0, 0.5]),
        next_obs=torch.tensor([[0.0, 1.0], [3.0, 0.0], [1.0, -1.0]]),
        terminated=torch.tensor([0.0, 1.0, 0.0]),
        discount=discount,
    )


def test_bootstrap_target_by_hand():
    """y = r + gamma (1 - d) Q(s', greedy_action(s')) with the module's own gamma, the batch's
    n-step discount when present, a given next action when passed. Catches the greedy action
    taken at s instead of s', and a gamma other than the module's."""
    module = HandModule()
    # a* = 3 s'_0 = (0, 9, 3); Q(s', a*) = 2 sum(s') + a*^2 = (2, 87, 9); row 1 is terminal
    y = bootstrap_target(module, hand_batch())
    torch.testing.assert_close(y, torch.tensor([1 + 0.8 * 2, -1.0, 0.5 + 0.8 * 9]))
    # n-step rows: discount gamma^k per row replaces gamma
    y = bootstrap_target(module, hand_batch(discount=torch.tensor([0.5, 0.5, 0.25])))
    torch.testing.assert_close(y, torch.tensor([1 + 0.5 * 2, -1.0, 0.5 + 0.25 * 9]))
    # a given next action: Q(s', 1) = 2 sum(s') + 1 = (3, 7, 1)
    y = bootstrap_target(module, hand_batch(), next_act=torch.ones(3, 1))
    torch.testing.assert_close(y, torch.tensor([1 + 0.8 * 3, -1.0, 0.5 + 0.8 * 1]))


def test_critic_members_lists_every_critic():
    """``q_networks()`` when the module has it (twin critics), else ``[q_network()]``. Catches a
    helper that always returns ``[q_network()]`` (the second twin then escapes PreQN's step and
    CrashPredictor's guard)."""
    first, second = nn.Linear(2, 1), nn.Linear(2, 1)

    class Twin:
        def q_network(self):
            return first

        def q_networks(self):
            return [first, second]

    class Single:
        def q_network(self):
            return second

    members = critic_members(Twin())
    assert len(members) == 2 and members[0] is first and members[1] is second
    assert len(critic_members(Single())) == 1 and critic_members(Single())[0] is second


# ------------------------------------------------- SEEMMonitor's action cosine


class ScriptedPolicy(nn.Module):
    """A probe-protocol module whose greedy actions are set by the test (one per state)."""

    gamma = 0.9

    def __init__(self, critic: nn.Module):
        super().__init__()
        self.critic = critic
        self.actions: torch.Tensor | None = None

    def q_value(self, obs, act):
        return self.critic(obs, act)

    def greedy_action(self, obs):
        return self.actions

    def q_network(self):
        return self.critic


def probe_rows(n=6, obs_dim=3, act=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    obs, next_obs = torch.randn(n, obs_dim, generator=gen), torch.randn(n, obs_dim, generator=gen)
    act = torch.randn(n, 2, generator=gen) if act is None else act
    return Transitions(obs, act, torch.zeros(n), next_obs, torch.zeros(n))


class TanhCritic(nn.Module):
    """Q(s, a) = MLP([s, a]) with one tanh hidden layer, (obs (N, 3), act (N, 2)) -> (N,); its
    weights are drawn right after ``torch.manual_seed(seed)``."""

    def __init__(self, seed: int, hidden: int = 16):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, obs, act):
        return self.net(torch.cat([obs, act], -1)).squeeze(-1)


def test_action_similarity_against_the_previous_measurement_discrete():
    """Discrete actions: ``seem/action_cos_prev`` is the share of probe states whose greedy action
    equals the previous measurement's. Catches the share that differ, and a previous set that is
    never replaced (the third measurement compared with the first)."""
    torch.manual_seed(0)
    module = ScriptedPolicy(DiscreteQ(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))))
    probe = probe_rows(act=torch.tensor([0, 1, 2, 0, 1, 2]))
    cb = SEEMMonitor(every_n_steps=1, probe_size=6, solver="dense")
    scripted = ([0, 1, 2, 1, 0, 2], [0, 1, 1, 1, 2, 2], [0, 1, 1, 0, 2, 2])
    shares = []
    for actions in scripted:
        module.actions = torch.tensor(actions)
        shares.append(cb.measure(None, module, probe)["seem/action_cos_prev"])
    assert np.isnan(shares[0])
    assert shares[1] == pytest.approx(4 / 6)  # states 0, 1, 3, 5 unchanged
    assert shares[2] == pytest.approx(5 / 6)  # against the second set (3/6 against the first)


def test_action_similarity_against_the_previous_measurement_continuous():
    """Continuous actions: the cosine of the flattened greedy actions with the previous ones, by hand."""
    module = ScriptedPolicy(TanhCritic(0, hidden=8))
    probe = probe_rows()
    gen = torch.Generator().manual_seed(1)
    scripted = [torch.randn(6, 2, generator=gen) for _ in range(3)]
    cb = SEEMMonitor(every_n_steps=1, probe_size=6, solver="dense")
    got = []
    for actions in scripted:
        module.actions = actions
        got.append(cb.measure(None, module, probe)["seem/action_cos_prev"])

    def cos(a, b):
        a, b = a.numpy().ravel().astype(float), b.numpy().ravel().astype(float)
        return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))

    assert np.isnan(got[0])
    assert got[1] == pytest.approx(cos(scripted[1], scripted[0]), rel=1e-6)
    assert got[2] == pytest.approx(cos(scripted[2], scripted[1]), rel=1e-6)
    assert abs(cos(scripted[2], scripted[1]) - cos(scripted[2], scripted[0])) > 0.01  # the two differ


# ------------------------------------------------- NTKGramCallback's cosines


def _gram_by_hand(net, obs, act):
    """G = J J^T from one autograd backward per probe row (no torch.func, nothing from ntk.py)."""
    params = list(net.parameters())
    rows = []
    for i in range(len(obs)):
        g = torch.autograd.grad(net(obs[i:i + 1], act[i:i + 1]).sum(), params)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    j = torch.stack(rows).double()
    return j @ j.T


def test_ntk_cosines_against_the_previous_and_the_first_gram():
    """Three measurements of a tanh critic whose parameters move between them:
    ``ntk/cos_prev`` compares with the previous Gram, ``ntk/cos_first`` with the first. Catches
    ``cos_prev`` taken against the first Gram (two measurements cannot tell them apart)."""
    module = ScriptedPolicy(TanhCritic(0))
    probe = probe_rows(n=10)
    cb = NTKGramCallback(every_n_steps=1, probe_size=10)
    grams, metrics = [], []
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        grams.append(_gram_by_hand(copy.deepcopy(module.critic), probe.obs, probe.act))
        metrics.append(cb.measure(None, module, probe))
        with torch.no_grad():  # a large move, so that the three kernels differ
            for p in module.critic.parameters():
                p.add_(0.7 * torch.randn(p.shape, generator=gen))

    def cos(a, b):
        return float((a * b).sum() / (a.norm() * b.norm()))

    assert np.isnan(metrics[0]["ntk/cos_prev"]) and np.isnan(metrics[0]["ntk/cos_first"])
    assert metrics[1]["ntk/cos_prev"] == pytest.approx(cos(grams[1], grams[0]), rel=1e-5)
    assert metrics[2]["ntk/cos_prev"] == pytest.approx(cos(grams[2], grams[1]), rel=1e-5)
    assert metrics[2]["ntk/cos_first"] == pytest.approx(cos(grams[2], grams[0]), rel=1e-5)
    assert abs(cos(grams[2], grams[1]) - cos(grams[2], grams[0])) > 1e-3  # the two cosines differ
    assert metrics[2]["ntk/diag_mean"] == pytest.approx(torch.diagonal(grams[2]).mean().item(), rel=1e-5)


# ------------------------------------------- probe set from training batches


def test_probe_from_batches_is_the_first_rows_seen(chain_file):
    """``probe_source="batches"``: the probe set is the first ``probe_size`` training rows, in order.
    Catches the last ``probe_size`` rows of the collected batches (20 of 32 here)."""
    dm = OfflineDataModule(str(chain_file), batch_size=16, normalize_states=False, steps_per_epoch=50)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch.map(lambda t: t.detach().clone()))

    cb = NTKGramCallback(every_n_steps=1, probe_size=20, probe_source="batches")
    run(UserModule(), dm, 3, [Spy(), cb])
    rows = Transitions.cat(seen[:2])
    for name in ("obs", "act", "rew", "next_obs", "terminated"):
        assert torch.equal(getattr(cb.probe, name), getattr(rows, name)[:20]), name
    assert not torch.equal(rows.act[:20], rows.act[-20:])  # first and last rows differ


# ------------------------------------------------------------ CrashPredictor
# The laws' bookkeeping is driven through the meter's record (which fits lit_qlearn.forecast.forecast) with hand-made ||u|| series; no
# Trainer is needed for them (law and L given, so nothing is resolved at fit start).


def _sgd_predictor(**kwargs):
    options = dict(every_n_steps=10, window=6, min_points=3, num_layers=2, law="sgd", min_r2=0.9)
    options.update(kwargs)
    return CrashPredictor(**options)


def test_crash_forecast_from_min_points_and_window_restart_by_hand():
    """1/||u|| = 1 - t/1000 (L = 2): the forecast is step 1000 from the ``min_points``-th measurement
    on, not one later. When the greedy actions move (relative change > action_rtol) the window
    restarts keeping the last ``min_points - 1`` measurements; a change below action_rtol *relative
    to the actions' norm* is no move. Catches ``len < min_points`` turned into ``<=``, a restart
    that keeps nothing, and an absolute instead of relative action change."""
    cb = _sgd_predictor()
    big = torch.full((3,), 100.0)
    plan = [(10, big), (20, big), (30, big), (40, 2 * big), (50, 2 * big + 0.5)]  # moved at 40 only
    metrics = {}
    for step, actions in plan:
        metrics[step] = cb.core.record(step, 1.0 / (1.0 - step / 1000), 1.0, actions)
        if step == 20:
            assert "crash/predicted_step" not in metrics[step]  # 2 points < min_points = 3
        if step == 30:
            assert metrics[step]["crash/predicted_step"] == pytest.approx(1000.0, rel=1e-9)
            assert metrics[step]["crash/steps_left"] == pytest.approx(970.0, rel=1e-9)
            assert metrics[step]["crash/fit_r2"] == pytest.approx(1.0, abs=1e-9)
        if step == 40:
            assert [h[0] for h in cb.history] == [20, 30, 40]  # restarted: last min_points - 1 kept
    assert [h[0] for h in cb.history] == [20, 30, 40, 50]  # 2 * big + 0.5: relative change 0.0025, no move
    assert metrics[50]["crash/steps_left"] == pytest.approx(950.0, rel=1e-9)
    assert cb.forecast["crash/predicted_step"] == pytest.approx(1000.0, rel=1e-9)
    assert not _actions_moved(2 * big + 0.5, 2 * big, rtol=0.01)
    assert _actions_moved(torch.tensor([0.0, 0.02]), torch.tensor([0.0, 1.0]), rtol=0.01)
    assert _actions_moved(torch.tensor([0, 1]), torch.tensor([0, 2]), rtol=0.5)  # discrete: any change counts
    assert not _actions_moved(torch.tensor([0, 1]), torch.tensor([0, 1]), rtol=0.0)


def test_threshold_already_crossed_is_a_zero_steps_forecast():
    """``||u|| >= threshold`` at a measurement: ``crash/threshold_step`` is that step and
    ``crash/threshold_steps_left`` 0, whatever the log-log line says. Catches a shifted threshold."""
    cb = CrashPredictor(every_n_steps=10, min_points=2, num_layers=2, law="adam", threshold=100.0)
    for step, u in ((10, 10.0), (20, 50.0)):
        cb.core.record(step, u, 1.0, torch.zeros(2))
    m = cb.core.record(30, 150.0, 1.0, torch.zeros(2))
    assert m["crash/threshold_step"] == 30.0 and m["crash/threshold_steps_left"] == 0.0
    # log ||u|| against log t by hand: the slope of the least-squares line through the three points
    t, u = np.log([10.0, 20.0, 30.0]), np.log([10.0, 50.0, 150.0])
    assert m["crash/loglog_slope"] == pytest.approx(np.polyfit(t, u, 1)[0], rel=1e-9)
    assert CrashPredictor(every_n_steps=7).horizon == 70  # default horizon: 10 measurements
    assert CrashPredictor(every_n_steps=7, horizon=3).horizon == 3


def test_adam_reference_is_the_critic_optimisers():
    """``params/adam_slope`` = eta sqrt(P) of the optimiser holding the *critic's* parameters;
    an SGD critic beside an Adam actor has no Adam law. Catches taking the first Adam-like
    optimiser (the actor's)."""
    torch.manual_seed(0)
    critic, actor = nn.Linear(4, 3), nn.Linear(4, 1)  # P = 15 for the critic
    adam_both = SimpleNamespace(optimizers=[torch.optim.Adam(actor.parameters(), lr=1e-2),
                                            torch.optim.Adam(critic.parameters(), lr=1e-3)])
    assert CrashMeter.adam_reference(adam_both.optimizers, critic) == pytest.approx(1e-3 * 15**0.5)
    sgd_critic = SimpleNamespace(optimizers=[torch.optim.Adam(actor.parameters(), lr=1e-2),
                                             torch.optim.SGD(critic.parameters(), lr=1e-3)])
    assert CrashMeter.adam_reference(sgd_critic.optimizers, critic) is None


def test_bellman_bound_from_the_datamodules_absolute_rewards():
    """The bound is ``max|r| / (1 - gamma)`` over the DataModule's rewards when it exposes them
    (negative rewards count by their size), else over the probe set's. Catches ``max r`` and a
    bound always taken from the probe."""
    cb = CrashPredictor(every_n_steps=10)
    module = SimpleNamespace(gamma=0.9, q_network=lambda: nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)))
    probe = probe_rows(n=2)._replace(rew=torch.tensor([0.5, 1.0]))

    def bound(trainer, probe):  # the predictor's own path: the DataModule's rewards into the meter at fit start
        cb.core.setup(module, rewards=_data_rewards(trainer))
        return cb.core.bound_for(module.gamma, probe)

    with_data = SimpleNamespace(datamodule=SimpleNamespace(data=SimpleNamespace(rew=torch.tensor([-3.0, 1.0, 0.5]))))
    assert bound(with_data, probe) == pytest.approx(3.0 / 0.1)
    without = SimpleNamespace(datamodule=None)
    assert bound(without, probe) == pytest.approx(1.0 / 0.1)
    negative_probe = probe._replace(rew=torch.tensor([-2.0, 1.0]))
    assert bound(without, negative_probe) == pytest.approx(2.0 / 0.1)


def test_guard_watches_every_twin_and_params_norm_is_the_critics(tiny_td3bc):
    """TD3+BC has twin critics: the guard stops at the step the *second* twin's weights become
    non-finite; ``params/norm`` is ``||theta||`` of ``q_network()`` only (not the actor's).
    Catches a guard over ``q_network()`` alone and a norm over every parameter of the module."""
    module, dm = tiny_td3bc()
    assert len(module.q_networks()) == 2
    norms = {}

    class Spy(L.Callback):  # before the predictor: poisons twin 1 at step 3, records the critic norm
        def on_train_batch_end(self, trainer, pl_module, *args):
            step = trainer.global_step
            params = [p.detach().double() for p in pl_module.q_network().parameters()]
            norms[step] = float(torch.sqrt(sum((p**2).sum() for p in params)))
            if step == 3:
                with torch.no_grad():
                    next(pl_module.q_networks()[1].parameters()).fill_(float("nan"))

    cb = CrashPredictor(every_n_steps=2, probe_size=16, guard=True, action="stop", min_points=2)
    logger = MemoryLogger()
    trainer = L.Trainer(max_steps=8, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Spy(), cb])
    with pytest.warns(UserWarning, match="non-finite"):
        trainer.fit(module, dm)
    assert cb.stopped_step == 3 and trainer.global_step == 3
    assert logger.rows[2]["params/norm"] == pytest.approx(norms[2], rel=1e-6)
    actor = sum(p.numel() for p in module.parameters()) - sum(p.numel() for p in module.q_network().parameters())
    assert actor > 0  # the module has parameters beyond the critic, so the two norms differ


# ------------------------------------------------------------ PreQNLineSearch


class TwinProtocol(nn.Module):
    """Probe protocol with two critics and an actor: gamma 0.9, greedy action = tanh(actor(s))."""

    gamma = 0.9

    def __init__(self):
        super().__init__()
        self.critics = nn.ModuleList([TanhCritic(0), TanhCritic(1)])
        torch.manual_seed(2)
        self.actor = nn.Linear(3, 2)

    def q_value(self, obs, act):
        return self.critics[0](obs, act)

    def greedy_action(self, obs):
        return torch.tanh(self.actor(obs))

    def q_network(self):
        return self.critics[0]

    def q_networks(self):
        return list(self.critics)


def test_line_search_step_uses_its_lr_on_every_twin_and_wraps_the_critics_optimiser():
    """The callback's step is ``preconditioned_step`` with *its* lr (0.02 here) on each twin's own
    TD errors ``y - Q_m``, y the protocol target; the optimiser it wraps is the one holding the
    critics' parameters (the actor's comes first). Catches a hard-coded lr and the first optimiser."""
    module = TwinProtocol()
    expected = copy.deepcopy(module)
    batch = probe_rows(n=12)._replace(rew=torch.linspace(-1, 1, 12), terminated=(torch.arange(12) % 4 == 3).float())
    actor_opt = torch.optim.Adam(module.actor.parameters(), lr=1e-3)
    critic_opt = torch.optim.SGD([p for c in module.critics for p in c.parameters()], lr=1.0)
    cb = PreQNLineSearch(lr=0.02)
    trainer = SimpleNamespace(optimizers=[actor_opt, critic_opt], world_size=1)
    cb.on_fit_start(trainer, module)
    try:
        assert cb._optimizer is critic_opt
        cb.on_train_batch_start(trainer, module, batch, 0)
        steps = cb.precondition(trainer, module, batch)
    finally:
        cb._unwrap()
    with torch.no_grad():  # by hand: y = r + 0.9 (1 - d) Q_0(s', tanh(actor(s')))
        y = batch.rew + 0.9 * (1 - batch.terminated) * expected.critics[0](batch.next_obs,
                                                                             torch.tanh(expected.actor(batch.next_obs)))
    torch.testing.assert_close(cb.last_targets, y)
    assert len(steps) == 2
    for ours, theirs in zip(module.critics, expected.critics):
        with torch.no_grad():
            delta = y - theirs(batch.obs, batch.act)
        preconditioned_step(theirs, (batch.obs, batch.act), delta, lr=0.02)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    moved = [torch.nn.utils.parameters_to_vector(c.parameters()) for c in module.critics]
    start = [torch.nn.utils.parameters_to_vector(c.parameters()) for c in TwinProtocol().critics]
    assert all(not torch.equal(m, s) for m, s in zip(moved, start))  # both twins moved


def test_line_search_logged_scalars_by_hand():
    """``preqn/cos`` is the worst (smallest) member's cosine, ``preqn/shrink_steps`` the most
    shrinks, ``preqn/step_norm`` the joint norm sqrt(sum ||step_m||^2), ``preqn/accepted`` the
    share of members accepted. Catches max for min, a summed norm, and all-or-nothing acceptance."""
    cb = PreQNLineSearch()
    cb.last = [PreconditionedStep(cos=0.95, shrink_steps=1, step_norm=3.0, accepted=True),
               PreconditionedStep(cos=0.5, shrink_steps=4, step_norm=4.0, accepted=False)]
    cb._log_cadence = Cadence(1)
    logger = MemoryLogger()
    trainer = SimpleNamespace(global_step=1, logger=logger, loggers=[logger], callback_metrics={})
    cb.on_train_batch_end(trainer, None, None, None, 0)
    assert logger.rows[1] == {"preqn/cos": 0.5, "preqn/shrink_steps": 4.0, "preqn/step_norm": 5.0,
                              "preqn/accepted": 0.5}


# ------------------------------------------------------------ TargetUpdate


def test_polyak_below_one_averages_and_buffers_are_copied():
    """tau = 0.5 averages (a copy only at tau = 1); BatchNorm statistics follow the online network
    exactly. Catches a copy for tau >= 0.5 and buffers left behind."""
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    target = make_target(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn(p.shape))
    online.train()(torch.randn(16, 3) * 3 + 1)  # moves the running statistics
    before = [p.detach().clone() for p in target.parameters()]
    for tau in (0.5, 0.75):
        TargetUpdate(tau=tau).apply([(online, target)])
        for t, b, o in zip(target.parameters(), before, online.parameters()):
            torch.testing.assert_close(t, (1 - tau) * b + tau * o.detach())
        before = [p.detach().clone() for p in target.parameters()]
    for t, o in zip(target.buffers(), online.buffers()):
        assert torch.equal(t, o)
    assert not torch.equal(online[1].running_mean, torch.zeros(4))
