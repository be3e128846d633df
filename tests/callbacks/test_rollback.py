"""CrashPredictor(action="rollback") and the remedies: after a forced rollback the state is
the healthy checkpoint's with exactly the remedy applied (hand-computed), the step axis
goes on, the window restarts, the record survives a checkpoint, and after max_rollbacks
the run stops with the healthy checkpoint as checkpoint_and_stop does."""
import copy
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from lit_qlearn.algorithms import TD3BC
from lit_qlearn.callbacks import (Compose, CrashPredictor, PreQNLineSearch, PreQNStep, ScaleLearningRate,
                                  ShrinkAndPerturb, SlowTargets)
from lit_qlearn.data import OfflineDataModule
from lit_qlearn.networks import StateActionQ, mlp
from lit_qlearn.ntk import preconditioned_step
from lit_qlearn.targets import TargetUpdate
from lit_qlearn.toys import RandomWalkDataModule, RandomWalkQ
from tests.callbacks.test_crash import r1_fit
from tests.conftest import CHAIN_STATES, fit, run_ddp_script

Q_BOUND = 4.0  # R1 at lr 0.02: max |Q| on the probe crosses 4 at about step 70 (tests/callbacks/test_crash.py)
EVERY = 5


class StateSpy(L.Callback):
    """The module's and optimisers' states at each batch end (``end[g]``, before a rollback
    of step g) and at each batch start (``start[g]``: the state training goes on from after
    step g, a rollback included)."""

    def __init__(self):
        self.end, self.start = {}, {}

    @staticmethod
    def _state(trainer, pl_module):
        return ({k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                [copy.deepcopy(o.state_dict()) for o in trainer.optimizers], copy.copy(pl_module.target_update))

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.end[trainer.global_step] = self._state(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, *args):
        self.start[trainer.global_step] = self._state(trainer, pl_module)


def rollback_r1(remedy=None, max_rollbacks=1, max_steps=120, *, tmp_path, extra=(), **kwargs):
    """R1 rolled back; by default to the last healthy state (``rollback_ratio=1``), whose
    mechanics these tests check; how far back the default goes: its own test."""
    kwargs.setdefault("rollback_ratio", 1.0)
    callback = CrashPredictor(every_n_steps=EVERY, action="rollback", remedy=remedy, max_rollbacks=max_rollbacks,
                              min_r2=1.1, threshold=math.inf, q_bound=Q_BOUND, dirpath=tmp_path, **kwargs)
    spy = StateSpy()
    module, trainer, logger = r1_fit(callback, max_steps=max_steps, extra=[spy, *extra])
    return callback, spy, module, trainer, logger


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_rollback_restores_the_healthy_state_and_scales_the_learning_rate(tmp_path):
    """SGD at lr 0.02 crosses the bound at step N: the run goes on from the state of step
    K = N - 5 (the last healthy measurement) with lr 0.02 * 0.5; global_step keeps counting,
    the scalars mark the rollback at N, and the predictor's window restarts after N."""
    callback, spy, module, trainer, logger = rollback_r1(ScaleLearningRate(0.5), max_rollbacks=1,
                                                         max_steps=60 * EVERY, tmp_path=tmp_path)
    (first, *_) = callback.rollbacks
    n, k = first["step"], first["restored_to"]
    assert 5 < k == n - EVERY and first["remedy"].startswith("learning rate of optimiser 'critic' x 0.5")
    weights, (optimizer,), _ = spy.start[n]
    assert_same(weights, spy.end[k][0])  # the healthy step's weights, not step N's
    assert not torch.equal(spy.end[n][0]["net.0.weight"], spy.end[k][0]["net.0.weight"])
    assert [g["lr"] for g in optimizer["param_groups"]] == [0.02 * 0.5]
    assert spy.end[k][1][0]["param_groups"][0]["lr"] == 0.02
    # The step axis goes on: one step after N comes N + 1, and the module's update count with it.
    assert n + 1 in spy.end and module.updates == trainer.global_step
    assert logger.series("crash/rollbacks") == {n: 1.0} and logger.series("crash/rollback_to") == {n: float(k)}
    # The window restarted: the measurements after the rollback only.
    measured = [h[0] for h in callback.history]
    assert measured and min(measured) > n
    # With lr halved the toy crosses again later: max_rollbacks=1, so it then stops with the kept
    # checkpoint, which is the last healthy state (as "checkpoint_and_stop").
    assert trainer.global_step == callback.stopped_step > n and len(callback.rollbacks) == 1
    assert callback.checkpoint_path == str(tmp_path / f"last-healthy-step={callback.healthy_step}.ckpt")
    assert n <= callback.healthy_step < callback.stopped_step


@pytest.mark.parametrize("ratio, keep", [(0.5, 8), (0.5, 3), (0.25, 20)])
def test_the_rollback_goes_back_to_the_newest_state_at_most_rollback_ratio_of_the_last_healthy(tmp_path, ratio, keep):
    """Held: the last `keep` healthy measurements. Restored: the newest whose logged max|Q| /
    bound is <= ratio x the last healthy one's (else the oldest held), found here from the
    logged series; its weights are the ones training goes on from, and only `keep` files were
    ever on disk at once (none is left after the run)."""
    seen = []

    class Files(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(len(list(tmp_path.glob(".last-healthy-*.step=*.ckpt"))))

    callback, spy, module, trainer, logger = rollback_r1(max_steps=90, tmp_path=tmp_path, rollback_ratio=ratio,
                                                         keep=keep, extra=[Files()])
    (first,) = callback.rollbacks
    n = first["step"]
    series = logger.series("crash/q_bound_ratio")
    every_healthy = [t for t in sorted(series) if t < n and series[t] <= 1]
    healthy = every_healthy[-keep:]
    assert healthy[-1] == n - EVERY and series[n] > 1
    expected = next((t for t in reversed(healthy) if series[t] <= ratio * series[healthy[-1]]), healthy[0])
    assert first["restored_to"] == expected < n - EVERY
    assert_same(spy.start[n][0], spy.end[expected][0])
    assert max(seen) == min(keep, len(every_healthy)) and not list(tmp_path.glob(".last-healthy-*"))
    assert logger.series("crash/rollback_to") == {n: float(expected)}


def test_rollback_point_never_goes_past_a_remedied_state():
    """The choice on its own: a state without a ratio (an earlier rollback's remedied state)
    stops the search; without a reference ratio, the newest is restored."""
    from lit_qlearn.callbacks.healthy import Held

    crash = CrashPredictor(action="rollback", rollback_ratio=0.5)
    held = [Held(t, Path(f"{t}"), v) for t, v in ((10, None), (15, 0.3), (20, 0.5), (25, 0.9))]
    assert crash.rollback_point(held) == 1  # 0.3 <= 0.45: step 15
    assert crash.rollback_point(held[:1] + held[2:]) == 0  # 0.5 > 0.45: back to the remedied state, not past it
    assert crash.rollback_point([Held(5, Path("5"), 0.8), Held(10, Path("10"), 0.9)]) == 0  # none: the oldest
    assert crash.rollback_point([Held(5, Path("5"), 0.1), Held(10, Path("10"), None)]) == 1


def test_after_max_rollbacks_it_stops_with_the_healthy_checkpoint_and_the_record_survives(tmp_path):
    """A plain rollback (no remedy) diverges again the same way: with max_rollbacks=2 the
    third detection stops the run and keeps the healthy checkpoint, whose predictor state
    holds both rollbacks; loaded into a new predictor, the record is the same."""
    callback, spy, _, trainer, logger = rollback_r1(None, max_rollbacks=2, max_steps=400, tmp_path=tmp_path)
    assert len(callback.rollbacks) == 2 and all(r["remedy"] == "no remedy" for r in callback.rollbacks)
    (a, b) = callback.rollbacks
    assert a["step"] < b["step"] < callback.stopped_step == trainer.global_step < 400
    # The toy diverges again before a healthy measurement: the second rollback restores the
    # state held after the first (step K's, as no remedy changed it).
    assert b["restored_to"] == a["step"] == a["restored_to"] + EVERY
    assert_same(spy.start[b["step"]][0], spy.end[a["restored_to"]][0])
    assert logger.series("crash/rollbacks") == {a["step"]: 1.0, b["step"]: 2.0}
    kept = torch.load(callback.checkpoint_path, weights_only=False)
    assert kept["global_step"] == callback.healthy_step >= b["step"]
    assert_same(kept["state_dict"], spy.start[callback.healthy_step][0])
    stored = kept["callbacks"][callback.state_key]
    assert stored["rollbacks"] == callback.rollbacks
    fresh = CrashPredictor(every_n_steps=EVERY, action="rollback", max_rollbacks=2, min_r2=1.1,
                           threshold=math.inf, q_bound=Q_BOUND, dirpath=tmp_path, rollback_ratio=1.0)
    assert fresh.state_key == callback.state_key
    fresh.load_state_dict(torch.load(callback.checkpoint_path, weights_only=True)["callbacks"][fresh.state_key])
    assert fresh.rollbacks == callback.rollbacks
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(callback.checkpoint_path).name]


@pytest.mark.parametrize("guard, seen", [(False, 25), (True, 23)])
def test_a_planted_nan_is_rolled_back_and_the_run_finishes(tmp_path, guard, seen):
    """A NaN planted in the weights after step 22 (no forecast, no bound: zero rewards)
    is seen at the measurement of step 25 (with guard, after the update of step 23 that
    the predictor's check sees first): the run goes back to step 20's state and finishes
    its 60 steps finite."""

    class Plant(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 22:
                with torch.no_grad():
                    pl_module.net[0].weight[0, 0] = math.nan

    callback = CrashPredictor(every_n_steps=EVERY, action="rollback", min_r2=1.1, threshold=math.inf,
                              dirpath=tmp_path, guard=guard)
    spy = StateSpy()
    module, trainer, _ = r1_fit(callback, lr=1e-3, max_steps=60, extra=[Plant(), spy])
    assert callback.rollbacks == [{"step": seen, "restored_to": 20, "remedy": "no remedy"}]
    assert_same(spy.start[seen][0], spy.end[20][0])
    assert trainer.global_step == 60 and callback.stopped_step is None
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_shrink_and_perturb_is_shrink_times_healthy_plus_noise_times_a_fresh_network(tmp_path):
    """theta = 0.8 theta_K + 0.01 theta_fresh, theta_fresh a new mlp(4, 1, (64,)) drawn from
    seed 7 + N (nn.Linear's own initialisation), computed here from scratch."""
    callback, spy, *_ = rollback_r1(ShrinkAndPerturb(shrink=0.8, noise=0.01, seed=7), max_steps=100,
                                    tmp_path=tmp_path)
    n, k = callback.rollbacks[0]["step"], callback.rollbacks[0]["restored_to"]
    torch.manual_seed(7 + n)
    fresh = mlp(4, 1, hidden=(64,)).state_dict()
    weights, optimizer, _ = spy.start[n]
    for name, value in fresh.items():
        expected = 0.8 * spy.end[k][0][f"net.{name}"] + 0.01 * value
        torch.testing.assert_close(weights[f"net.{name}"], expected, rtol=0, atol=1e-7, msg=name)
    assert optimizer[0]["param_groups"][0]["lr"] == 0.02  # nothing else changed
    assert_same({n_: v for n_, v in weights.items() if not n_.startswith("net.")},
                {n_: v for n_, v in spy.end[k][0].items() if not n_.startswith("net.")})


def test_shrink_and_perturb_leaves_the_global_random_stream_alone():
    module = RandomWalkQ()
    before = torch.random.get_rng_state()
    ShrinkAndPerturb().apply(SimpleNamespace(global_step=3), module)
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.fixture
def td3bc(chain_file):
    def make(**kwargs):
        L.seed_everything(0, verbose=False)
        dm = OfflineDataModule(str(chain_file), batch_size=64, normalize_states=False, seed=0, steps_per_epoch=40)
        return TD3BC(obs_dim=CHAIN_STATES, act_dim=1, critic_hidden=(32, 32), actor_hidden=(32, 32),
                     eval_every=0, **kwargs), dm
    return make


def td3bc_rollback(make, remedy, tmp_path, steps=150, **kwargs):
    callback = CrashPredictor(every_n_steps=10, probe_size=64, action="rollback", remedy=remedy, max_rollbacks=1,
                              min_r2=1.1, threshold=math.inf, q_bound=0.5, dirpath=tmp_path)
    spy = StateSpy()
    module, dm = make(**kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(CrashPredictor|does not have many workers).*")
        trainer = fit(module, dm, steps, callbacks=[callback, spy])
    return callback, spy, module, trainer


@pytest.mark.parametrize("tau, expected", [(0.005, (0.0025, 2)), (1.0, (0.005, 1))])
def test_slow_targets_on_td3bc_restores_targets_and_adam_and_changes_only_the_rule(td3bc, tmp_path, tau,
                                                                                  expected):
    """TD3+BC (twin critics, targets, two Adams; its targets move with the actor, every 2
    updates) past q_bound 0.5: the state after the rollback is step K's bit for bit,
    weights, targets and both Adams' moments, and the target rule is halved (Polyak 0.005
    every 2 -> 0.0025 every 2) or turned on (a copy every 2 -> Polyak 0.005 every update)."""
    callback, spy, module, trainer = td3bc_rollback(td3bc, SlowTargets(tau=0.005, factor=0.5), tmp_path,
                                                    target_tau=tau)
    (record,) = callback.rollbacks
    n, k = record["step"], record["restored_to"]
    weights, optimizers, rule = spy.start[n]
    assert_same(weights, spy.end[k][0])
    for got, healthy in zip(optimizers, spy.end[k][1], strict=True):
        assert got["param_groups"] == healthy["param_groups"]
        for index, state in healthy["state"].items():
            assert_same(got["state"][index], state)
    before = spy.end[k][2]
    assert (before.tau, before.every) == (tau, 2)
    assert (rule.tau, rule.every) == expected
    assert record["remedy"] == f"target rule {before!r} -> {TargetUpdate(*expected)!r}"


def test_compose_applies_each_remedy_in_turn(td3bc, tmp_path):
    remedy = [ScaleLearningRate(0.25, optimizer="actor"), ShrinkAndPerturb(shrink=0.5, noise=0.0)]
    callback, spy, *_ = td3bc_rollback(td3bc, remedy, tmp_path)
    n, k = callback.rollbacks[0]["step"], callback.rollbacks[0]["restored_to"]
    weights, optimizers, _ = spy.start[n]
    healthy = spy.end[k]
    assert optimizers[0]["param_groups"][0]["lr"] == healthy[1][0]["param_groups"][0]["lr"]  # the critic's
    assert optimizers[1]["param_groups"][0]["lr"] == 0.25 * healthy[1][1]["param_groups"][0]["lr"]
    for name, value in healthy[0].items():
        expected = 0.5 * value if name.startswith("critic.") else value  # the online critics only
        torch.testing.assert_close(weights[name], expected, rtol=0, atol=0, msg=name)
    assert callback.rollbacks[0]["remedy"].count("; ") == 1


def test_scale_learning_rate_moves_the_schedulers_base_too():
    """A closed-form schedule (LambdaLR: lr = base * lambda(t)) would undo a scaled lr at its
    next step; its base_lrs are scaled with the param groups."""
    net = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 / (1 + t))
    optimizer.step(), scheduler.step()
    trainer = SimpleNamespace(optimizers=[optimizer], lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)])
    ScaleLearningRate(0.5, optimizer=None).apply(trainer, None)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 2 * 0.5)
    optimizer.step(), scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 / 3)


class ScheduledWalk(RandomWalkQ):
    """The R1 toy whose critic lr decays as 0.02 / (1 + t / 1000) (LambdaLR, stepped by the update)."""

    def build_schedulers(self, optimizers):
        return {"critic": torch.optim.lr_scheduler.LambdaLR(optimizers["critic"], lambda t: 1 / (1 + t / 1000))}

    def update(self, batch):
        td_abs = super().update(batch)
        self.scheduler("critic").step()
        return td_abs


def test_rollback_restores_the_scheduler_and_the_remedy_moves_its_base(tmp_path):
    """With a LambdaLR the rollback takes the scheduler back to step K (last_epoch = K) and
    ScaleLearningRate halves its base: the lr after the rollback is 0.01 / (1 + K / 1000),
    and the next update's 0.01 / (1 + (K + 1) / 1000)."""
    callback = CrashPredictor(every_n_steps=EVERY, action="rollback", remedy=ScaleLearningRate(0.5),
                              max_rollbacks=1, min_r2=1.1, threshold=math.inf, q_bound=Q_BOUND, dirpath=tmp_path,
                              rollback_ratio=1.0)
    spy = StateSpy()
    L.seed_everything(0, verbose=False)
    module = ScheduledWalk(lr=0.02)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(CrashPredictor|does not have many workers).*")
        trainer = fit(module, RandomWalkDataModule(seed=0), 90, callbacks=[callback, spy])
    n, k = callback.rollbacks[0]["step"], callback.rollbacks[0]["restored_to"]
    assert k == n - EVERY and trainer.global_step > n + 1
    assert spy.start[n][1][0]["param_groups"][0]["lr"] == pytest.approx(0.01 / (1 + k / 1000), rel=1e-12)
    assert spy.start[n + 1][1][0]["param_groups"][0]["lr"] == pytest.approx(0.01 / (1 + (k + 1) / 1000), rel=1e-12)


def test_preqn_step_takes_over_the_critic_after_the_rollback(tmp_path):
    """After the rollback at N the critic's update N + 1 is PreQN's preconditioned step from
    the restored state on the batch's TD errors, not SGD's: the change of Q on the batch
    points along the TD errors (cosine >= 0.9). The callback is gone after the fit."""
    callback, spy, module, trainer, _ = rollback_r1(PreQNStep(lr=0.1), max_rollbacks=1, max_steps=90,
                                                    tmp_path=tmp_path)
    n, k = callback.rollbacks[0]["step"], callback.rollbacks[0]["restored_to"]
    assert callback.rollbacks[0]["remedy"].startswith("critic steps with PreQN's line search")
    assert_same(spy.start[n][0], spy.end[k][0])
    by_hand = RandomWalkQ(lr=0.02)
    by_hand.load_state_dict(spy.start[n][0])
    batch = RandomWalkDataModule(seed=0).data
    with torch.no_grad():
        y = by_hand.td_target(batch)
        before = by_hand.q_value(batch.obs, batch.act)
    step = preconditioned_step(StateActionQ(by_hand.net), (batch.obs, batch.act), y - before, lr=0.1)
    for name, value in by_hand.state_dict().items():
        torch.testing.assert_close(spy.end[n + 1][0][name], value, rtol=1e-6, atol=1e-7, msg=name)
    with torch.no_grad():
        change = by_hand.q_value(batch.obs, batch.act) - before
    assert step.accepted and torch.nn.functional.cosine_similarity(change, y - before, dim=0) >= 0.9
    assert not any(isinstance(cb, PreQNLineSearch) for cb in trainer.callbacks)
    assert "step" not in trainer.optimizers[0].__dict__  # unwrapped at fit end


def test_bad_arguments_and_modules_are_named():
    for kwargs, match in [(dict(action="stop", remedy=ScaleLearningRate()), "remedy"),
                          (dict(action="rollback", max_rollbacks=-1), "max_rollbacks"),
                          (dict(action="rollback", remedy=object()), "remedy")]:
        with pytest.raises(ValueError, match=match):
            CrashPredictor(**kwargs)
    for make, match in [(lambda: ScaleLearningRate(0), "factor"), (lambda: SlowTargets(tau=1.0), "tau"),
                        (lambda: ShrinkAndPerturb(shrink=0), "shrink"), (lambda: ShrinkAndPerturb(noise=-1), "noise"),
                        (lambda: Compose(), "at least one"), (lambda: PreQNStep(lr=0), "PreQNStep")]:
        with pytest.raises(ValueError, match=match):
            make()
    for remedy, others, match in [(SlowTargets(), [], "no target networks"),
                                  (ScaleLearningRate(optimizer="actor"), [], "actor"),
                                  (PreQNStep(), [PreQNLineSearch()], "already")]:
        with pytest.raises(ValueError, match=match):
            L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[CrashPredictor(action="rollback", remedy=remedy), *others]).fit(
                          RandomWalkQ(), RandomWalkDataModule())


def test_state_key_names_the_rollback_options_only_for_rollback():
    assert "remedy" not in CrashPredictor(action="stop").options()
    reference = CrashPredictor(action="rollback").state_key
    assert CrashPredictor(action="rollback", max_rollbacks=1).state_key != reference
    assert CrashPredictor(action="rollback", remedy=ScaleLearningRate()).state_key != reference

    class Mine:  # a user's remedy without a repr of its own: its name, the same in every process
        def apply(self, trainer, pl_module):
            return "mine"

    assert CrashPredictor(action="rollback", remedy=[Mine(), ScaleLearningRate()]).options()["remedy"] == (
        "Compose(test_state_key_names_the_rollback_options_only_for_rollback.<locals>.Mine, "
        "ScaleLearningRate(factor=0.5, optimizer='critic'))")
    assert CrashPredictor(action="rollback", remedy=Mine()).state_key == CrashPredictor(
        action="rollback", remedy=Mine()).state_key


def test_ddp_ranks_roll_back_identically(tmp_path):
    """Two CPU processes: both ranks roll back at the same steps to the same steps and end
    with the same weights, those of the single-device run."""
    single, _, module, *_ = rollback_r1(ShrinkAndPerturb(seed=3), max_rollbacks=2, max_steps=120,
                                        tmp_path=tmp_path / "s", rollback_ratio=0.5)  # the default, as the script
    run_ddp_script(Path(__file__).with_name("ddp_rollback.py"), tmp_path, Q_BOUND)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert ranks[0]["rollbacks"] == ranks[1]["rollbacks"] == single.rollbacks and single.rollbacks
    assert single.rollbacks[0]["restored_to"] < single.rollbacks[0]["step"] - 5  # further back than the last healthy
    assert_same(ranks[0]["state_dict"], ranks[1]["state_dict"])
    for name, value in module.state_dict().items():
        torch.testing.assert_close(ranks[0]["state_dict"][name], value, rtol=1e-5, atol=1e-6, msg=name)
