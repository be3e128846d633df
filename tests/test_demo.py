"""The demo on a tiny run: its table's numbers are the runs' and agree with independent
computations on the data and the kept checkpoint."""
import re
import statistics

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_qlearn.cli import main
from lit_qlearn.data import read_d4rl
from lit_qlearn.datasets import collect


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``lit-qlearn demo`` on 1000 random Hopper steps with 64x64 networks: (runs, stdout, root)."""
    root = tmp_path_factory.mktemp("demo")
    path = collect("Hopper-v5", "random", steps=1000, path=root / "hopper.hdf5", seed=1)
    lines = []
    from lit_qlearn.demo import divergence_demo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is fastest, and immune to a busy machine
    try:
        runs = divergence_demo(str(path), fraction=1.0, steps=400, every=20, probe_size=128, hidden=(64, 64),
                               logdir=root / "logs", progress=False, out=lines.append)
    finally:
        torch.set_num_threads(threads)
    return runs, "\n".join(lines), root, path


def table_row(text, label):
    """The three cells (plain, LayerNorm, plain + rollback) of a table row."""
    (line,) = [ln for ln in text.splitlines() if ln.startswith(label)]
    return re.split(r"\s{2,}", line[len(label):].strip())


def test_plain_critic_leaves_the_bound_and_layernorm_stays_within(demo_run):
    runs, text, _, path = demo_run
    plain, layer = runs["plain"], runs["layernorm"]
    rewards = read_d4rl(path)["rewards"]
    bound = np.abs(rewards).max() / (1 - 0.99)  # computed here from the file
    assert plain.bound == pytest.approx(bound, rel=1e-6) and layer.bound == pytest.approx(bound, rel=1e-6)
    assert float(table_row(text, "Bellman bound max|r|/(1-gamma)")[0]) == pytest.approx(bound, rel=1e-3)
    # Plain: stopped by the predictor once max |Q| passed the bound; LayerNorm: the whole run, within it.
    assert plain.stopped_step is not None and plain.updates == plain.stopped_step < 400
    # (max |Q| over the probe's (s, a) and its bootstrap points (s', mu(s')), where it blows up first)
    assert plain.q_bound_ratio[-1] > 1 and max(plain.q_bound_ratio[:-1]) <= 1
    assert plain.q_data_max > 10 * layer.q_data_max
    assert layer.stopped_step is None and layer.updates == 400 and layer.q_data_max < bound
    assert max(layer.q_bound_ratio) < 1
    assert max(plain.seem) > 0.1 > max(layer.seem)  # self-excitation only in the plain critic
    # ... and it is the critic's, spread over many probe transitions, not one transition's
    positive = [p for s, p in zip(plain.seem, plain.participation) if s > 0.05]
    assert table_row(text, "positive SEEM carried by (median)")[0] == f"{statistics.median(positive):.0f} transitions"
    assert statistics.median(positive) > 5
    assert table_row(text, "stopped by CrashPredictor") == [f"update {plain.stopped_step} (Q beyond the bound)", "no",
                                                            "no"]
    cells = table_row(text, "Q on the data: max |Q|")
    assert [float(c) for c in cells] == pytest.approx([plain.q_data_max, layer.q_data_max, runs["rollback"].q_data_max],
                                                      rel=1e-3)


def test_the_rolled_back_critic_diverges_like_the_plain_one_then_trains_on_within_the_bound(demo_run):
    runs, text, root, _ = demo_run
    plain, rolled = runs["plain"], runs["rollback"]
    # The same seed, networks and minibatches as the plain run up to its stop: the same first unhealthy step.
    assert rolled.rollbacks and rolled.rollbacks[0]["step"] == plain.stopped_step
    # ... and goes back to the newest of the last 8 healthy measurements whose max|Q|/bound is at most
    # half the last healthy one's (CrashPredictor's rollback_ratio=0.5, keep=8), read off the plain run
    ratios = dict(zip(plain.steps, plain.q_bound_ratio))
    held = [t for t in plain.steps if t < plain.stopped_step][-8:]
    assert held[-1] == plain.checkpoint_step
    expected = next(t for t in reversed(held) if ratios[t] <= 0.5 * ratios[held[-1]])
    assert rolled.rollbacks[0]["restored_to"] == expected < plain.checkpoint_step
    assert rolled.steps[:len(plain.steps)] == plain.steps
    assert rolled.q_bound_ratio[:len(plain.steps)] == pytest.approx(plain.q_bound_ratio)
    # The remedy divided the critic's learning rate (3e-4) by ten, and the run trained to the end within the bound.
    assert rolled.rollbacks[0]["remedy"] == "learning rate of optimiser 'critic' x 0.1 (now 3e-05)"
    assert rolled.stopped_step is None and rolled.updates == 400 and len(rolled.rollbacks) <= 3
    # Each rollback took effect (the next measurement is below the one that triggered it), and the
    # remedied critic ends within the bound, on the probe and on the whole data.
    for b in rolled.rollbacks:
        at = rolled.steps.index(b["step"])
        if at + 1 < len(rolled.steps):
            assert rolled.q_bound_ratio[at + 1] < rolled.q_bound_ratio[at]
    assert rolled.q_bound_ratio[-1] <= 1 and rolled.q_data_max < rolled.bound
    assert table_row(text, "rolled back: update -> state of") == [
        "-", "-", ", ".join(f"{b['step']} -> {b['restored_to']}" for b in rolled.rollbacks)]
    assert f"remedy (plain + rollback, update {rolled.rollbacks[0]['step']}): {rolled.rollbacks[0]['remedy']}" in text
    # TensorBoard shows the rollback at its step.
    events = EventAccumulator(rolled.log_dir)
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("crash/rollbacks")] == [
        (b["step"], i + 1) for i, b in enumerate(rolled.rollbacks)]


def test_the_kept_checkpoint_is_healthy_and_the_logs_agree(demo_run):
    runs, text, root, path = demo_run
    plain = runs["plain"]
    assert plain.checkpoint_step == plain.stopped_step - 20  # the measurement before the stop
    from lit_qlearn.algorithms import TD3
    from lit_qlearn.data import OfflineDataModule

    kept = TD3.load_from_checkpoint(plain.checkpoint_path, map_location="cpu")
    data = OfflineDataModule(str(path)).data  # the same normalisation as the demo's
    with torch.no_grad():
        q = kept.q_value(data.obs, data.act).double()
    assert q.mean().item() == pytest.approx(plain.checkpoint_q_mean, rel=1e-5)
    assert q.abs().max().item() == pytest.approx(plain.checkpoint_q_max, rel=1e-5)
    assert q.abs().max().item() <= plain.bound  # healthy: within the Bellman bound on the data
    assert float(table_row(text, "  its Q on the data: max |Q|")[0]) == pytest.approx(plain.checkpoint_q_max, rel=1e-3)
    assert plain.checkpoint_path in text
    # TensorBoard holds the same curves as the table and the figure.
    events = EventAccumulator(plain.log_dir)
    events.Reload()
    ratios = events.Scalars("crash/q_bound_ratio")
    assert ratios[-1].step == plain.stopped_step and ratios[-1].value == pytest.approx(plain.q_bound_ratio[-1])
    assert [e.step for e in events.Scalars("seem/max_eig_normalized")] == plain.steps
    assert (root / "logs" / "demo" / "version_0" / "demo.png").stat().st_size > 10_000
    assert f"tensorboard --logdir {root / 'logs' / 'demo' / 'version_0'}" in text


def test_cli_errors_are_one_line_with_status_2(capsys, tmp_path):
    for argv, needle in [(["demo", "--steps", "0"], "--steps: must be an integer >= 1"),
                         (["demo", "--algo", "sac"], "--algo: invalid choice"),
                         (["demo", "--fraction", "2"], "--fraction: must be in (0, 1]"),
                         (["demo", "--dataset", str(tmp_path / "missing.hdf5"), "--no-progress"], "missing.hdf5")]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2, argv
        assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, err


def test_help_goes_to_stdout(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    out = capsys.readouterr()
    assert exc.value.code == 0 and "--algo" in out.out and "td3bc" in out.out and not out.err
