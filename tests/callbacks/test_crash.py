"""CrashPredictor on the R1 toy and TD3+BC: what it publishes, when it acts, the healthy
checkpoint it keeps (the laws' fits alone: tests/test_forecast.py)."""
import copy
import math
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

from lit_qlearn.algorithms import TD3BC
from lit_qlearn.callbacks import CrashPredictor
from lit_qlearn.data import OfflineDataModule
from lit_qlearn.forecast import predict_crash_step
from lit_qlearn.toys import RandomWalkDataModule, RandomWalkQ, compass_directions
from tests.conftest import CHAIN_STATES, fit, run_ddp_script



class MemoryLogger(Logger):
    """Keeps every logged scalar: ``rows[step][name] = value``."""

    def __init__(self):
        super().__init__()
        self.rows: dict[int, dict[str, float]] = {}

    name = "memory"
    version = 0

    def log_metrics(self, metrics, step=None):
        self.rows.setdefault(step, {}).update({k: float(v) for k, v in metrics.items()})

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def series(self, key):
        return {step: row[key] for step, row in sorted(self.rows.items()) if key in row}


class RewardedWalk(RandomWalkDataModule):
    """The R1 trajectory with a constant reward: the Bellman bound is reward / (1 - gamma)."""

    def __init__(self, reward, seed=0):
        super().__init__(seed=seed)
        self.data = self.data._replace(rew=torch.full_like(self.data.rew, reward))


class StateSpy(L.Callback):
    """Copies of the module's and the optimiser's states after every step."""

    def __init__(self):
        self.module, self.optimizer = {}, {}

    def on_train_batch_end(self, trainer, pl_module, *args):
        step = trainer.global_step
        self.module[step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.optimizer[step] = copy.deepcopy(trainer.optimizers[0].state_dict())


def r1_fit(callback, lr=0.02, seed=0, max_steps=2000, optimizer="sgd", logger=None, dm=None, extra=(),
           **trainer_kwargs):
    """Train the R1 toy (docs/design.md section 7) with ``callback`` (and ``extra`` callbacks after it);
    return (module, trainer, logger)."""
    L.seed_everything(seed, verbose=False)
    logger = logger or MemoryLogger()
    module, dm = RandomWalkQ(lr=lr, optimizer=optimizer), dm or RandomWalkDataModule(seed=seed)
    options = dict(max_steps=max_steps, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, *extra])
    options.update(trainer_kwargs)
    trainer = L.Trainer(**options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(CrashPredictor|does not have many workers).*")
        trainer.fit(module, dm)
    return module, trainer, logger


def nan_step(logger):
    """The first step whose probe TD error is not finite: one past the last finite measurement."""
    return max(logger.series("crash/td_error_norm")) + 1


@pytest.fixture(scope="module")
def r1_crash():
    """The R1 run at lr 0.02 measured every step until it diverges."""
    _, trainer, logger = r1_fit(CrashPredictor(every_n_steps=1, action="warn"), max_steps=400)
    return nan_step(logger), logger


def test_r1_diverges_and_td_error_grows(r1_crash):
    crash, logger = r1_crash
    norms = logger.series("crash/td_error_norm")
    assert 100 < crash < 400  # lr 0.02 diverges in a few hundred steps
    assert norms[crash - 1] > 1e3 * norms[1]
    loss = logger.series("train/critic_loss")
    first_bad = min(step for step, value in loss.items() if not math.isfinite(value))
    assert abs(first_bad - crash) <= 1  # the training loss overflows at the same step


def test_logged_norms_are_the_probe_td_error_and_critic_norms():
    """crash/td_error_norm = ||Q(X) - gamma max_d Q(s', d)|| on the whole trajectory
    (reward 0, no terminals), params/norm = ||theta||, computed here from scratch."""
    module, _, logger = r1_fit(CrashPredictor(every_n_steps=5), max_steps=40)
    data = RandomWalkDataModule(seed=0).data
    with torch.no_grad():
        q = module.net(torch.cat([data.obs, data.act], dim=1)).squeeze(1).double()
        dirs = compass_directions()
        next_q = torch.stack([module.net(torch.cat([data.next_obs, d.expand(len(data.obs), 2)], dim=1)).squeeze(1)
                              for d in dirs], dim=1).max(dim=1).values.double()
    row = logger.rows[40]
    assert row["crash/td_error_norm"] == pytest.approx(float(torch.linalg.vector_norm(q - 0.99 * next_q)), rel=1e-5)
    theta = torch.cat([p.detach().flatten().double() for p in module.net.parameters()])
    assert row["params/norm"] == pytest.approx(float(torch.linalg.vector_norm(theta)), rel=1e-6)
    assert sorted(logger.series("crash/td_error_norm")) == list(range(5, 45, 5))


@pytest.mark.parametrize("restart", [False, True])
def test_r1_forecast_at_80_percent_within_10_percent(r1_crash, restart):
    """docs/design.md section 7, R1: a fit over 10% of the run ending at 80% of the NaN step predicts it
    within 10% (restart=False is the paper's plain window; True the callback's default)."""
    crash, _ = r1_crash
    window = round(0.1 * crash)
    callback = CrashPredictor(every_n_steps=1, window=window, restart_on_action_change=restart)
    _, _, logger = r1_fit(callback, max_steps=int(0.8 * crash))
    at = int(0.8 * crash)
    row = logger.rows[at]
    assert row["crash/predicted_step"] == pytest.approx(crash, rel=0.10)
    assert row["crash/steps_left"] == pytest.approx(row["crash/predicted_step"] - at)
    assert row["crash/fit_r2"] >= 0.9
    # The callback's fit is predict_crash_step on the logged norms of its window.
    norms = logger.series("crash/td_error_norm")
    if not restart:
        steps = list(range(at - window + 1, at + 1))
        fit = predict_crash_step(steps, [norms[s] for s in steps])
        assert fit.step == pytest.approx(row["crash/predicted_step"], rel=1e-9)


def test_checkpoint_and_stop_keeps_the_measurement_before_the_forecast(r1_crash, tmp_path):
    crash, _ = r1_crash
    callback = CrashPredictor(every_n_steps=1, action="checkpoint_and_stop", horizon=20, dirpath=tmp_path)
    spy = StateSpy()
    module, trainer, logger = r1_fit(callback, extra=[spy])
    stop = trainer.global_step
    assert stop < crash and callback.stopped_step == stop
    assert logger.rows[stop]["crash/steps_left"] <= 20 < logger.rows[stop - 1].get("crash/steps_left", math.inf)
    assert callback.healthy_step == stop - 1  # the last measurement before the forecast fired
    path = callback.checkpoint_path
    assert path is not None and path.endswith(f"last-healthy-step={stop - 1}.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    restored = RandomWalkQ.load_from_checkpoint(path)
    for name, value in restored.state_dict().items():
        torch.testing.assert_close(value, spy.module[stop - 1][name], rtol=0, atol=0)
    for name, value in module.state_dict().items():  # the run itself ends in the state it reached
        torch.testing.assert_close(value, spy.module[stop][name], rtol=0, atol=0)
    # The file is the state of the healthy step: counters and this callback's own state
    # included (it had not fired yet; its window ends at that step).
    assert checkpoint["global_step"] == checkpoint["lit_qlearn_updates"] == stop - 1
    kept = checkpoint["callbacks"][callback.state_key]
    assert kept["fired"] is False and kept["history"][-1][0] == stop - 1 and kept["next_due"] == stop


def test_bellman_bound_stops_and_keeps_the_last_healthy_state(tmp_path):
    """Issue 14: |Q| beyond max|r| / (1 - gamma) is divergence for certain. With forecasts
    off, the bound alone stops the run, and the checkpoint is the measurement before it
    was crossed: its Q on the data is within the bound, its parameters and Adam moments
    those of that step."""
    reward, every = 0.1, 5
    bound = reward / (1 - 0.99)
    callback = CrashPredictor(every_n_steps=every, action="checkpoint_and_stop", min_r2=1.1, threshold=math.inf,
                              dirpath=tmp_path)  # no fit reaches R^2 1.1: never a forecast
    spy = StateSpy()
    module, trainer, logger = r1_fit(callback, lr=1e-3, optimizer="adam", max_steps=3000, dm=RewardedWalk(reward),
                                     extra=[spy])
    data = RewardedWalk(reward).data
    assert callback.bound == pytest.approx(bound)

    def max_abs_q(state):  # over the probe's (s, a) and (s', greedy action), from scratch
        net = RandomWalkQ()
        net.load_state_dict(state)
        with torch.no_grad():
            q = net.q_value(data.obs, data.act)
            q_next = net.all_q(data.next_obs).max(1).values  # Q at the greedy direction
        return max(q.abs().max().item(), q_next.abs().max().item()), q

    ratios = logger.series("crash/q_bound_ratio")
    stop = trainer.global_step
    assert stop < 3000 and stop % every == 0 and callback.stopped_step == stop
    assert ratios[stop] > 1 and all(r <= 1 for s, r in ratios.items() if s < stop)
    for step in (stop - every, stop):
        assert ratios[step] == pytest.approx(max_abs_q(spy.module[step])[0] / bound, rel=1e-5)
    healthy = stop - every
    assert callback.healthy_step == healthy and callback.checkpoint_path.endswith(f"last-healthy-step={healthy}.ckpt")
    restored = RandomWalkQ.load_from_checkpoint(callback.checkpoint_path)
    for name, value in restored.state_dict().items():
        torch.testing.assert_close(value, spy.module[healthy][name], rtol=0, atol=0)
    _, q = max_abs_q(restored.state_dict())
    assert q.abs().mean() <= q.abs().max() <= bound  # healthy: within the bound on the data
    _, q_stop = max_abs_q(module.state_dict())
    assert q_stop.abs().max() > q.abs().max()
    saved = torch.load(callback.checkpoint_path, weights_only=False)["optimizer_states"][0]["state"]
    for index, state in spy.optimizer[healthy]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(saved[index][key], state[key], rtol=0, atol=0)


def _same(a, b, where="checkpoint"):
    """Recursive bit-for-bit equality of two checkpoint entries."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, set(a) ^ set(b))
        for key in a:
            _same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided.*")
def test_last_healthy_checkpoint_is_an_ordinary_checkpoint_of_its_step(chain_file, tmp_path):
    """Issue 19, item 4. TD3+BC on the chain (Adam, twin critics and their targets, the
    actor's delayed steps, target-policy noise from the global RNG, a DataModule sampling
    with its own generator, 40 batches an epoch) stopped by the q_bound at a detection
    step D: last-healthy-step=K.ckpt equals, entry for entry and bit for bit, the file a
    ModelCheckpoint writes at step K of the same run without the callback (only the
    callbacks' slots differ), and fit(ckpt_path=...) from either ends in the same state."""
    def make():
        L.seed_everything(0, verbose=False)
        dm = OfflineDataModule(str(chain_file), batch_size=64, normalize_states=False, seed=0, steps_per_epoch=40)
        return TD3BC(obs_dim=CHAIN_STATES, act_dim=1, critic_hidden=(32, 32), actor_hidden=(32, 32),
                     eval_every=0), dm

    class Batches(L.Callback):  # a callback listed after the predictor, with a state of its own
        def __init__(self):
            self.batches = 0

        def on_train_batch_end(self, *args):
            self.batches += 1

        def state_dict(self):
            return {"batches": self.batches}

    every = 10
    crash = CrashPredictor(every_n_steps=every, probe_size=64, action="checkpoint_and_stop", min_r2=1.1,
                           threshold=math.inf, q_bound=0.5, dirpath=tmp_path / "healthy")
    trainer = fit(*make(), 400, callbacks=[crash, Batches()])
    detected, k = trainer.global_step, crash.healthy_step
    assert detected == crash.stopped_step < 400 and k == detected - every and k > 40  # past an epoch's end
    assert crash.checkpoint_path.endswith(f"last-healthy-step={k}.ckpt")

    fit(*make(), k, callbacks=[Batches(), ModelCheckpoint(dirpath=tmp_path / "ordinary", every_n_train_steps=k,
                                                          save_top_k=-1)], enable_checkpointing=True)
    (ordinary,) = (tmp_path / "ordinary").glob(f"*step={k}.ckpt")
    healthy_ckpt = torch.load(crash.checkpoint_path, weights_only=False)
    ordinary_ckpt = torch.load(ordinary, weights_only=False)
    assert healthy_ckpt["global_step"] == healthy_ckpt["lit_qlearn_updates"] == k and healthy_ckpt["epoch"] == k // 40
    assert healthy_ckpt["loops"]["fit_loop"]["epoch_loop.manual_optimization.optim_step_progress"]["total"][
        "completed"] == k
    # Every callback's state is of step k too, the ones after the predictor included.
    key = Batches().state_key
    assert healthy_ckpt["callbacks"][key] == ordinary_ckpt["callbacks"][key] == {"batches": k}
    assert healthy_ckpt["callbacks"][crash.state_key]["history"][-1][0] == k
    healthy_ckpt.pop("callbacks"), ordinary_ckpt.pop("callbacks")
    _same(healthy_ckpt, ordinary_ckpt)  # weights, targets, Adam moments, loops, RNG, DataModule, ...

    class Start(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.at = (trainer.global_step, pl_module.updates, trainer.current_epoch)

    ends = []
    for path in (crash.checkpoint_path, ordinary):
        start = Start()
        module, dm = make()
        trainer = fit(module, dm, detected + 20, ckpt_path=path, callbacks=[start])
        assert start.at == (k, k, k // 40) and trainer.global_step == module.updates == detected + 20
        ends.append(({n: v.clone() for n, v in module.state_dict().items()},
                     [o.state_dict() for o in trainer.optimizers]))
    _same(ends[0], ends[1], "resumed run")


def test_user_bound_overrides_and_zero_rewards_give_none(tmp_path):
    # R1's rewards are 0: no information, no bound; a user's q_bound is taken as given.
    plain = CrashPredictor(every_n_steps=5)
    _, _, logger = r1_fit(plain, max_steps=10)
    assert plain.bound is None and not logger.series("crash/q_bound_ratio")
    given = CrashPredictor(every_n_steps=5, q_bound=2.5)
    module, _, logger = r1_fit(given, max_steps=10)
    data = RandomWalkDataModule(seed=0).data
    with torch.no_grad():
        q = module.q_value(data.obs, data.act).abs().max()
        q_next = module.all_q(data.next_obs).max(1).values.abs().max()  # Q at the greedy direction
    assert given.bound == 2.5
    assert logger.rows[10]["crash/q_bound_ratio"] == pytest.approx(max(q, q_next).item() / 2.5, rel=1e-5)


def test_stop_action_stops_without_writing(r1_crash, tmp_path):
    crash, _ = r1_crash
    callback = CrashPredictor(every_n_steps=1, action="stop", horizon=20, dirpath=tmp_path)
    _, trainer, _ = r1_fit(callback)
    assert 0.8 * crash <= trainer.global_step < crash  # forecast within 20 steps, a few % early
    assert callback.checkpoint_path is None and not list(tmp_path.iterdir())


def test_guard_stops_at_the_nan_step_and_writes_nothing_without_a_healthy_measurement(r1_crash, tmp_path):
    crash, _ = r1_crash
    callback = CrashPredictor(every_n_steps=10_000, action="checkpoint_and_stop", guard=True, dirpath=tmp_path)
    module, trainer, _ = r1_fit(callback)
    assert trainer.global_step == crash  # stopped at the step the weights blew up
    norms = torch.stack([torch.linalg.vector_norm(p) for p in module.parameters()])
    assert not norms.isfinite().all()
    assert callback.checkpoint_path is None and not list(tmp_path.iterdir())


@pytest.mark.parametrize("action", ["stop", "checkpoint_and_stop"])
def test_without_guard_the_next_measurement_stops(r1_crash, tmp_path, action):
    crash, _ = r1_crash
    every = 7
    callback = CrashPredictor(every_n_steps=every, action=action, horizon=0, min_r2=1.1, threshold=math.inf,
                              guard=False, dirpath=tmp_path)  # no fit reaches R^2 1.1: never a forecast
    module, trainer, _ = r1_fit(callback)
    assert trainer.global_step == every * math.ceil(crash / every)  # the first measurement at or after the NaN
    if action == "stop":
        assert callback.checkpoint_path is None and not list(tmp_path.iterdir())
        return
    # The measurement before the NaN was healthy (no forecasts here, no bound with zero rewards): kept.
    assert callback.healthy_step == trainer.global_step - every
    (written,) = tmp_path.iterdir()
    assert str(written) == callback.checkpoint_path
    state = torch.load(written, weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())


def test_state_survives_checkpoint_and_resume(tmp_path):
    whole = CrashPredictor(every_n_steps=5, window=8)
    r1_fit(whole, max_steps=100)
    first = CrashPredictor(every_n_steps=5, window=8)
    r1_fit(first, max_steps=50, default_root_dir=tmp_path, enable_checkpointing=True)
    (ckpt,) = tmp_path.rglob("*.ckpt")
    resumed = CrashPredictor(every_n_steps=5, window=8)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=100, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[resumed])
    trainer.fit(RandomWalkQ(lr=0.02), RandomWalkDataModule(seed=0), ckpt_path=ckpt)
    assert first.history[-1][0] == 50 and first.previous_actions is not None
    assert [h[0] for h in resumed.history] == [h[0] for h in whole.history]
    np.testing.assert_allclose(np.array(resumed.history), np.array(whole.history), rtol=1e-6)
    assert resumed.forecast.keys() == whole.forecast.keys()


def test_adam_law_logs_the_polynomial_diagnostics():
    """Section 5.4: under Adam ||theta|| grows by about eta sqrt(P) per step and log||u||
    grows like L log t; there is no finite crash step, only a threshold crossing."""
    callback = CrashPredictor(every_n_steps=50, window=10)
    module, trainer, logger = r1_fit(callback, lr=1e-3, optimizer="adam", max_steps=1500)
    params = sum(p.numel() for p in module.net.parameters())
    row = logger.rows[1500]
    assert row["params/adam_slope"] == pytest.approx(1e-3 * math.sqrt(params))
    assert 0.5 < row["params/norm_slope"] / row["params/adam_slope"] < 2.0
    assert 1.0 < row["crash/loglog_slope"] < 3.0  # L = 2
    assert row["crash/threshold_step"] > 1500 and "crash/predicted_step" not in row
    assert not logger.series("crash/predicted_step")


def test_bad_arguments_and_modules_are_named():
    for kwargs, match in [(dict(action="explode"), "action"), (dict(window=1), "window"),
                          (dict(min_points=30, window=20), "min_points"), (dict(num_layers=1), "num_layers"),
                          (dict(threshold=0), "threshold"), (dict(law="rmsprop"), "law"),
                          (dict(q_bound=0.0), "q_bound")]:
        with pytest.raises(ValueError, match=match):
            CrashPredictor(**kwargs)

    class OneLayer(RandomWalkQ):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 1))

    with pytest.raises(ValueError, match="nn.Linear"):
        L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[CrashPredictor()]).fit(OneLayer(), RandomWalkDataModule())


def test_same_numbers_under_ddp(tmp_path):
    single = CrashPredictor(every_n_steps=5, window=10)
    _, _, logger = r1_fit(single, max_steps=120)
    run_ddp_script(Path(__file__).with_name("ddp_crash.py"), tmp_path, "forecast")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        np.testing.assert_allclose(np.array(got["history"]), np.array(single.history), rtol=1e-5)
        for key, value in single.forecast.items():
            assert got["forecast"][key] == pytest.approx(value, rel=1e-4), key


DDP_Q_BOUND = 4.0  # R1 at lr 0.02: max |Q| on the probe crosses 4 at about step 70 of 120


def test_ddp_stop_and_checkpoint_decisions_are_reduced(tmp_path):
    """One rank alone sees the Bellman bound crossed: both ranks stop at that step, and
    rank zero writes the last healthy state, the single-device run's checkpoint."""
    q_bound = DDP_Q_BOUND
    single = CrashPredictor(every_n_steps=5, action="checkpoint_and_stop", min_r2=1.1, threshold=math.inf,
                            q_bound=q_bound, dirpath=tmp_path / "single")
    _, trainer, _ = r1_fit(single, max_steps=120)
    assert 5 < trainer.global_step < 120  # the bound is crossed mid-run
    run_ddp_script(Path(__file__).with_name("ddp_crash.py"), tmp_path, "bound", q_bound)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for got in ranks:
        assert got["global_step"] == got["stopped_step"] == single.stopped_step
        assert got["healthy_step"] == single.healthy_step == single.stopped_step - 5
        assert Path(got["checkpoint_path"]).name == Path(single.checkpoint_path).name
    checkpoint = torch.load(ranks[0]["checkpoint_path"], weights_only=False)
    # The healthy step's counters, and every rank's random state of that step (gathered in the dump).
    assert checkpoint["global_step"] == checkpoint["lit_qlearn_updates"] == single.healthy_step
    assert len(checkpoint["lit_qlearn_rng"]) == 2
    written = checkpoint["state_dict"]
    reference = torch.load(single.checkpoint_path, weights_only=False)["state_dict"]
    for name, value in reference.items():
        torch.testing.assert_close(written[name], value, rtol=1e-5, atol=1e-6)


def test_state_key_names_every_option():
    reference = CrashPredictor().state_key
    for name, value in dict(probe_seed=1, window=10, min_points=3, num_layers=3, min_r2=0.5, threshold=1e3,
                            action="stop", horizon=7, restart_on_action_change=False, action_rtol=0.1,
                            dirpath="somewhere", law="sgd", guard=True, q_bound=10.0).items():
        assert CrashPredictor(**{name: value}).state_key != reference, name


class DirectorySpy(L.Callback):
    """At each batch start (``global_step`` = g updates done): the files in ``directory`` and
    the ``global_step`` each holds, ``seen[g] = {name: step}``; raises at step ``fail_at``."""

    def __init__(self, directory, fail_at=None):
        self.directory, self.fail_at, self.seen = Path(directory), fail_at, {}

    def on_train_batch_start(self, trainer, *args):
        files = sorted(self.directory.iterdir()) if self.directory.exists() else []
        self.seen[trainer.global_step] = {f.name: torch.load(f, weights_only=False)["global_step"] for f in files}

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.fail_at:
            raise RuntimeError("planted failure")


@pytest.mark.parametrize("ending", ["no detection", "detection", "exception"])
def test_the_healthy_checkpoint_is_one_file_on_disk_and_no_temporary_file_is_left(tmp_path, ending):
    """checkpoint_and_stop keeps the last healthy step's checkpoint as one hidden file in
    dirpath, replaced at every healthy measurement; a run with detection ends with exactly
    last-healthy-step=K.ckpt, one without (or one that raises) with an empty directory."""
    every, steps = 5, 40 if ending != "detection" else 120
    # R1 at lr 0.02: max |Q| on the probe crosses DDP_Q_BOUND at about step 70, 4e3 never before 120.
    callback = CrashPredictor(every_n_steps=every, action="checkpoint_and_stop", min_r2=1.1, threshold=math.inf,
                              q_bound=DDP_Q_BOUND if ending == "detection" else 4e3, dirpath=tmp_path / "ckpt")
    spy = DirectorySpy(tmp_path / "ckpt", fail_at=23 if ending == "exception" else None)
    if ending == "exception":
        with pytest.raises(RuntimeError, match="planted failure"):
            r1_fit(callback, max_steps=steps, extra=[spy])
    else:
        _, trainer, _ = r1_fit(callback, max_steps=steps, extra=[spy])
    # While the run goes on: one hidden file, holding the last multiple of `every` done.
    for g, files in spy.seen.items():
        if g < every:
            assert files == {}, g
        else:
            ((name, step),) = files.items()
            assert name.startswith(".") and step == every * (g // every), (g, files)
    assert max(spy.seen) == (22 if ending == "exception" else trainer.global_step - 1)  # the last batch start
    left = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    if ending != "detection":
        assert left == [] and callback.checkpoint_path is None and callback.stopped_step is None
        return
    k = trainer.global_step - every
    assert trainer.global_step == callback.stopped_step < steps and callback.healthy_step == k
    assert left == [f"last-healthy-step={k}.ckpt"] and callback.checkpoint_path == str(tmp_path / "ckpt" / left[0])
    assert torch.load(callback.checkpoint_path, weights_only=False)["global_step"] == k


def test_a_healthy_measurement_with_a_non_finite_state_is_not_kept(tmp_path):
    """The probe is finite at step 10 but Adam's second moment holds a NaN (planted after
    the measurement): that state is not kept. The NaN reaches the weights at step 11, the
    measurement at 15 is non-finite, and the file written is that of step 5, finite."""
    every = 5

    class PoisonAdam(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2 * every:
                state = next(iter(trainer.optimizers[0].state.values()))
                state["exp_avg_sq"].view(-1)[0] = math.nan

    callback = CrashPredictor(every_n_steps=every, action="checkpoint_and_stop", min_r2=1.1, threshold=math.inf,
                              dirpath=tmp_path)
    _, trainer, logger = r1_fit(callback, lr=1e-3, optimizer="adam", max_steps=40, extra=[PoisonAdam()])
    assert logger.series("crash/td_error_norm").keys() == {5, 10}  # 15: non-finite, not recorded
    assert trainer.global_step == callback.stopped_step == 3 * every and callback.healthy_step == every
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"last-healthy-step={every}.ckpt"]
    checkpoint = torch.load(callback.checkpoint_path, weights_only=False)
    assert checkpoint["global_step"] == every
    assert all(torch.isfinite(t).all() for s in checkpoint["optimizer_states"][0]["state"].values() for t in s.values())


def test_two_predictors_sharing_a_directory_keep_their_own_healthy_checkpoint(tmp_path):
    """Each predictor's temporary file is named after its state_key: predictor A (every 5,
    detects at about step 70) writes the checkpoint of its own last healthy step K, not the
    one B (every 3, never detects) captured into the same directory between K and the
    detection (of K+1 .. K+4 one is a multiple of 3)."""
    a = CrashPredictor(every_n_steps=5, action="checkpoint_and_stop", min_r2=1.1, threshold=math.inf,
                       q_bound=DDP_Q_BOUND, dirpath=tmp_path)
    b = CrashPredictor(every_n_steps=3, action="checkpoint_and_stop", min_r2=1.1, threshold=math.inf,
                       q_bound=4e3, dirpath=tmp_path)
    _, trainer, _ = r1_fit(a, max_steps=120, extra=[b])
    k = trainer.global_step - 5
    assert trainer.global_step == a.stopped_step < 120 and a.healthy_step == k
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"last-healthy-step={k}.ckpt"]
    assert torch.load(a.checkpoint_path, weights_only=False)["global_step"] == k
