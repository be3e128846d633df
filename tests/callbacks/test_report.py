"""HealthReport: the end-of-run table and JSON hold the monitors' own numbers, a missing
monitor's rows are absent, an exception still writes the report, and the progress bar
shows the critic's Q and crash/q_bound_ratio while training."""
import json
import re
import statistics
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from lit_qlearn.callbacks import CrashPredictor, HealthReport, PlasticityMonitor, ScaleLearningRate, SEEMMonitor
from lit_qlearn.callbacks.report import SEEM_POSITIVE
from lit_qlearn.loggers import SeriesLogger
from lit_qlearn.toys import RandomWalkDataModule, RandomWalkQ
from tests.conftest import run_ddp_script

EVERY, PROBE = 5, 64
BOUND = 50.0  # q_bound: the toy's rewards are 0, so its own Bellman bound is absent


def same(values):
    """What the report reads: trainer.callback_metrics holds the published numbers as float32
    tensors (lit_qlearn.probe.publish), the loggers as Python floats."""
    return pytest.approx(values, rel=1e-6, abs=0)


def walk_fit(callbacks, max_steps=400, lr=0.02, tmp_path=None, logger=True, ckpt_path=None, **options):
    """The R1 toy (diverges at lr 0.02) with ``callbacks``; return (module, trainer, series)."""
    L.seed_everything(0, verbose=False)
    series = SeriesLogger()
    loggers = [CSVLogger(tmp_path), series] if logger else False
    settings = dict(max_steps=max_steps, logger=loggers, log_every_n_steps=1, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                    default_root_dir=tmp_path, accelerator="cpu")
    settings.update(options)
    trainer = L.Trainer(**settings)
    module = RandomWalkQ(lr=lr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(CrashPredictor|does not have many workers|Checkpoint dir).*")
        trainer.fit(module, RandomWalkDataModule(seed=0), ckpt_path=ckpt_path)
    return module, trainer, series


def monitors(bound=BOUND, **crash):
    return [CrashPredictor(every_n_steps=EVERY, probe_size=PROBE, q_bound=bound, **crash),
            SEEMMonitor(every_n_steps=EVERY, probe_size=PROBE),
            PlasticityMonitor(every_n_steps=EVERY, probe_size=PROBE)]


def test_report_holds_the_monitors_numbers(tmp_path, capsys):
    # The report first: it sees each measurement at the next batch start or at the fit's end.
    crash, seem, plasticity = attached = monitors(action="stop")
    report = HealthReport()
    module, trainer, series = walk_fit([report, *attached], tmp_path=tmp_path)
    path = Path(trainer.log_dir) / "health.json"
    got = json.loads(path.read_text())
    assert report.written == path and crash.stopped_step is not None  # the forecast stopped the run

    steps, ratio = series.series("crash/q_bound_ratio")
    assert got["step"] == trainer.global_step == crash.stopped_step == steps[-1]
    assert got["ended"] == "finished"
    c = got["crash"]
    assert c["bound"] == BOUND and c["measurements"] == len(ratio) > 10
    assert c["peak_q_bound_ratio"] == same(max(ratio)) and c["peak_step"] == steps[ratio.index(max(ratio))]
    assert c["last_q_bound_ratio"] == same(ratio[-1])
    assert c["forecast"] == crash.forecast and "crash/predicted_step" in c["forecast"]
    assert c["forecast_text"] == f"crash at update {crash.forecast['crash/predicted_step']:.0f}"
    assert c["stopped_step"] == crash.stopped_step and c["action"] == "stop"
    assert c["rollbacks"] == [] and "checkpoint_path" not in c
    # By hand: the run stopped at its last measurement, so the final critic is the one measured:
    # max|Q| over the probe's (s, a) and its bootstrap points (s', greedy(s')), over the bound.
    data = RandomWalkDataModule(seed=0).data
    with torch.no_grad():
        q = module.q_value(data.obs, data.act).abs().max()
        q_next = module.q_value(data.next_obs, module.greedy_action(data.next_obs)).abs().max()
    assert c["last_q_bound_ratio"] == pytest.approx(max(q, q_next).item() / BOUND, rel=1e-6)

    _, values = series.series("seem/max_eig_normalized")
    participation = [series.rows[s]["seem/participation"] for s in series.series("seem/max_eig_normalized")[0]]
    s = got["seem"]
    assert s["measurements"] == len(values)
    assert [s["min"], s["max"], s["last"]] == same([min(values), max(values), values[-1]])
    positive = [p for v, p in zip(values, participation) if v > SEEM_POSITIVE]
    assert 0 < s["positive"] == len(positive) < len(values)  # some measurements below, some above
    assert s["carried_by"] == same(statistics.median(positive))
    assert s["q_probe_mean"] == same(series.series("seem/q_data_mean")[1][-1])

    dormant, rank = series.series("plasticity/dormant_fraction")[1], series.series("plasticity/feature_rank")[1]
    assert got["plasticity"] == {"measurements": len(dormant), "dormant_fraction": same(dormant[-1]),
                                 "dormant_fraction_max": same(max(dormant)), "feature_rank": same(rank[-1]),
                                 "feature_rank_min": same(min(rank))}

    printed = capsys.readouterr().out
    assert f"{c['peak_q_bound_ratio']:.3g} (update {c['peak_step']})" in printed 
    assert re.search(rf"^stopped by CrashPredictor +update {crash.stopped_step}$", printed, re.M)
    assert f"{s['positive']} of {len(values)}" in printed and str(path) in printed


def test_rollbacks_and_the_peak_before_them(tmp_path):
    """After a rollback max|Q|/bound falls back: the peak is the excursion's, not the last value,
    and the rollbacks are the predictor's own record."""
    crash, *rest = attached = monitors(bound=5.0, action="rollback", remedy=ScaleLearningRate(0.1), max_rollbacks=2,
                                       rollback_ratio=1.0)
    report = HealthReport(verbose=False)
    _, trainer, series = walk_fit([report, *attached], tmp_path=tmp_path)  # the report first, as above
    got = json.loads((Path(trainer.log_dir) / "health.json").read_text())["crash"]
    steps, ratio = series.series("crash/q_bound_ratio")
    assert len(crash.rollbacks) == 2 and got["rollbacks"] == crash.rollbacks
    assert max(ratio) > ratio[-1] and got["peak_step"] == steps[ratio.index(max(ratio))]
    assert got["peak_q_bound_ratio"] == same(max(ratio)) and got["last_q_bound_ratio"] == same(ratio[-1])
    assert got["stopped_step"] == crash.stopped_step == steps[-1]
    assert got["checkpoint_path"] == crash.checkpoint_path and got["healthy_step"] == crash.healthy_step


def test_missing_monitors_are_absent_and_path_is_used(tmp_path):
    target = tmp_path / "elsewhere" / "report.json"
    report = HealthReport(path=target, verbose=False)
    _, trainer, _ = walk_fit([SEEMMonitor(every_n_steps=EVERY, probe_size=PROBE), report], max_steps=20,
                             tmp_path=tmp_path, logger=False)
    got = json.loads(target.read_text())
    assert set(got) == {"step", "ended", "seem"} and got["seem"]["measurements"] == 4
    assert not (tmp_path / "health.json").exists()
    from lit_qlearn.callbacks.report import table

    text = table(got)
    assert "SEEM" in text and "bound" not in text and "dormant" not in text and "rollbacks" not in text
    assert "crash/q_bound_ratio" not in trainer.progress_bar_metrics


def test_an_exception_still_writes_the_report(tmp_path):
    class Boom(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 12:
                raise RuntimeError("boom")

    report = HealthReport(verbose=False)
    seem = SEEMMonitor(every_n_steps=EVERY, probe_size=PROBE)
    with pytest.raises(RuntimeError, match="boom"):
        walk_fit([seem, Boom(), report], tmp_path=tmp_path, logger=False)
    got = json.loads((tmp_path / "health.json").read_text())
    assert got["ended"] == "RuntimeError: boom" and got["step"] == 12
    assert got["seem"]["measurements"] == 2  # steps 5 and 10


class RecordingBar(TQDMProgressBar):
    """Lightning's bar, keeping what it showed after each training batch."""

    def __init__(self):
        super().__init__()
        self.shown = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.shown[trainer.global_step] = dict(self.get_metrics(trainer, pl_module))


def test_progress_bar_shows_q_and_the_bound_ratio(tmp_path):
    bar = RecordingBar()
    crash, seem, _ = monitors(action="warn")
    _, trainer, series = walk_fit([crash, seem, HealthReport(verbose=False), bar], max_steps=30, tmp_path=tmp_path,
                                  enable_progress_bar=True)
    steps, ratio = series.series("crash/q_bound_ratio")
    q = series.series("seem/q_data_mean")[1]
    assert steps == [5, 10, 15, 20, 25, 30]
    for k, step in enumerate(steps):  # shown while training, from the measurement's step on
        assert [bar.shown[step]["crash/q_bound_ratio"], bar.shown[step]["seem/q_data_mean"]] == same([ratio[k], q[k]])
    assert "crash/q_bound_ratio" not in bar.shown[4]
    assert trainer.progress_bar_metrics["crash/q_bound_ratio"] == same(ratio[-1])


def test_progress_bar_prefers_the_modules_q_on_its_batch(tiny_td3bc, tmp_path):
    module, dm = tiny_td3bc()
    series = SeriesLogger()
    trainer = L.Trainer(max_steps=6, logger=series, log_every_n_steps=2, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        callbacks=[HealthReport(verbose=False)], default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, dm)
    assert trainer.progress_bar_metrics == {"q/data_mean": same(series.series("q/data_mean")[1][-1])}


def test_path_must_be_a_path():
    with pytest.raises(TypeError, match="HealthReport: path must be a str, an os.PathLike or None, got int"):
        HealthReport(path=3)


def test_ddp_rank_zero_writes_what_every_rank_collected(tmp_path):
    """Two CPU processes: the same report on both ranks, one file (rank zero's), no hang at the
    path's broadcast."""
    run_ddp_script(Path(__file__).with_name("ddp_report.py"), tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["summary"] == r1["summary"] and r0["summary"]["crash"]["stopped_step"] is not None
    assert r0["written"] == str(Path(r0["log_dir"]) / "health.json") and r1["written"] is None
    assert json.loads(Path(r0["written"]).read_text()) == r0["summary"]


def test_a_resumed_fit_reports_the_whole_run(tmp_path):
    seem = SEEMMonitor(every_n_steps=EVERY, probe_size=PROBE)
    _, first, series = walk_fit([seem, HealthReport(verbose=False)], max_steps=20, tmp_path=tmp_path)
    first.save_checkpoint(tmp_path / "at20.ckpt")
    report = HealthReport(verbose=False)
    _, second, more = walk_fit([SEEMMonitor(every_n_steps=EVERY, probe_size=PROBE), report], max_steps=40,
                               tmp_path=tmp_path, ckpt_path=tmp_path / "at20.ckpt")
    values = series.series("seem/max_eig_normalized")[1] + more.series("seem/max_eig_normalized")[1]
    assert len(values) == 8 and report.summary["seem"]["measurements"] == 8
    assert [report.summary["seem"]["min"], report.summary["seem"]["max"]] == same([min(values), max(values)])
