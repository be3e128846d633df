"""Benchmarks cannot rot: every script in benchmarks/ (the harness and the ``_`` helpers
aside, found by glob, so a new script is tested the day it is added) runs end to end in its
``--smoke`` mode (tiny sizes, results into a temporary directory) and writes what its
committed results hold: a JSON whose ``claims`` each carry ``claim``, ``published``,
``measured`` and a computed ``holds`` (its truth does not matter at these sizes), beside the
same figure / table files. A script without ``--smoke`` exits 2 (argparse) and fails here.

Each script pays ~4 s of imports (torch, Lightning, matplotlib, MuJoCo) before any work;
twenty of them would spend most of this file's time importing. So the scripts run as
forks of one runner process that imported those modules once: each fork is its own
process, runs the script as ``__main__`` with its own ``sys.argv`` and exit status, and
nothing of one script's run reaches the next. ``throughput.py``, what ``make bench``
runs, goes through a fresh interpreter exactly as a user types it instead, so that the
command line itself is checked too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
#: what the scripts import, not scripts themselves
HELPERS = {"harness"}
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_") and p.stem not in HELPERS)
#: run in a fresh interpreter, as ``make bench`` runs it
FRESH = {"throughput"}
TIMEOUT_S = 120  # per script; a smoke run takes seconds, a script that ignores --smoke minutes

# The fork server: imports once, then per job forks a child that runs one script as __main__
# (its stdout and stderr into the job's log, killed by SIGALRM after the timeout) and answers
# with the child's exit status.
RUNNER = r"""
import atexit, importlib, json, os, runpy, signal, sys, traceback

for name in ("numpy", "torch", "lightning", "matplotlib.pyplot", "gymnasium", "mujoco", "h5py",
             "torch.utils.tensorboard", "stable_baselines3", "lit_qlearn.algorithms", "lit_qlearn.callbacks",
             "lit_qlearn.data", "lit_qlearn.datasets", "lit_qlearn.evaluation", "lit_qlearn.demo", "lit_qlearn.ntk",
             "lit_qlearn.toys"):
    try:
        importlib.import_module(name)
    except ImportError:
        pass  # the script that needs it reports it
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(job["timeout"])
            log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            sys.argv = [job["script"], *job["args"]]
            sys.path.insert(0, os.path.dirname(job["script"]))  # what `python script.py` puts first
            runpy.run_path(job["script"], run_name="__main__")
            code = 0
        except SystemExit as exit:
            if exit.code is None or isinstance(exit.code, int):
                code = exit.code or 0
            else:  # SystemExit("message"): Python prints it and exits 1
                print(exit.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


def _environment(tmp: Path) -> dict[str, str]:
    """One thread, no display, the smoke data cache under pytest's temporary directory
    (``$TMPDIR``), and a real data directory that a smoke run must leave empty."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIT_QLEARN_")}
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg", TMPDIR=str(tmp / "tmp"),
               LIT_QLEARN_DATA_DIR=str(tmp / "user-data"))
    (tmp / "tmp").mkdir()
    (tmp / "user-data").mkdir()
    return env


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """``run(script, args, log) -> exit status``, and the environment the scripts run in."""
    tmp = tmp_path_factory.mktemp("benchmarks")
    env = _environment(tmp)
    server = subprocess.Popen([sys.executable, "-c", RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=ROOT, env=env)
    assert server.stdout.readline().strip() == "ready"

    def run(script: str, args: list[str], log: Path) -> int:
        path = BENCHMARKS / f"{script}.py"
        if script in FRESH:
            with log.open("w") as out:
                return subprocess.run([sys.executable, str(path), *args], cwd=ROOT, env=env, stdout=out,
                                      stderr=subprocess.STDOUT, timeout=TIMEOUT_S).returncode
        job = {"script": str(path), "args": args, "log": str(log), "timeout": TIMEOUT_S}
        server.stdin.write(json.dumps(job) + "\n")
        server.stdin.flush()
        return json.loads(server.stdout.readline())

    yield run, env
    server.stdin.close()
    server.wait(timeout=30)


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def test_the_glob_finds_the_benchmarks():
    # a renamed directory or pattern would otherwise make every check below vacuous
    assert len(SCRIPTS) >= 19 and {"throughput", "crash_prediction", "r2_seem_gamma"} <= set(SCRIPTS)
    assert not FRESH - set(SCRIPTS) and not HELPERS & set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_runs_in_smoke_mode(script, bench, tmp_path):
    run, env = bench
    out, log = tmp_path / "out", tmp_path / "log.txt"
    committed = _snapshot(RESULTS)
    status = run(script, ["--smoke", "--out", str(out)], log)
    text = log.read_text()
    assert status == 0, f"benchmarks/{script}.py --smoke exited with {status}:\n{text[-4000:]}"
    assert _snapshot(RESULTS) == committed, f"{script}.py --smoke changed benchmarks/results/"
    user_data = Path(env["LIT_QLEARN_DATA_DIR"])
    assert not any(user_data.iterdir()), f"{script}.py --smoke wrote into the real data directory"

    written = sorted(out.glob("*.json"))
    assert written, f"{script}.py --smoke wrote no JSON into --out; it printed:\n{text[-2000:]}"
    for path in written:
        result = json.loads(path.read_text())
        # the files a full run commits beside this JSON (figure, markdown table), the smoke run writes too
        beside = {p.suffix for p in RESULTS.glob(f"{path.stem}.*")}
        assert beside <= {p.suffix for p in out.glob(f"{path.stem}.*")}, f"{path.name}: not all of {beside} written"
        claims = result.get("claims")
        assert isinstance(claims, list) and claims, f"{path.name} has no claims list"
        for c in claims:
            assert set(c) == {"claim", "published", "measured", "holds"}, f"{path.name}: claim keys {sorted(c)}"
            assert isinstance(c["claim"], str) and c["claim"]
            assert type(c["holds"]) is bool, f"{path.name}: holds {c['holds']!r} of {c['claim']!r} is not a bool"


def test_crossq_sb3_on_hopper_writes_its_own_file_and_resumes_its_runs(bench, tmp_path):
    """``crossq_sb3.py --env Hopper-v5`` writes crossq_sb3_hopper.json; ``--resume`` keeps the
    stored timing rounds and long runs, and runs only the missing seeds; ``--merge`` joins a
    part run elsewhere, ``--report-only`` redraws without running."""
    run, _ = bench
    out = tmp_path / "out"
    args = ["--smoke", "--env", "Hopper-v5", "--out", str(out), "--speed-rounds", "1"]
    assert run("crossq_sb3", [*args, "--seeds", "1"], tmp_path / "a.txt") == 0
    first = json.loads((out / "crossq_sb3_hopper.json").read_text())
    assert not (out / "crossq_sb3.json").exists() and (out / "crossq_sb3_hopper.png").exists()
    assert first["settings"]["env"] == "Hopper-v5" and first["settings"]["algorithm"]["policy_delay"] == 3
    assert len(first["timing"]) == 1 and "Hopper-v5" in first["claims"][1]["claim"]
    assert run("crossq_sb3", [*args, "--seeds", "2", "--resume"], tmp_path / "b.txt") == 0
    second = json.loads((out / "crossq_sb3_hopper.json").read_text())
    assert "resuming" in (tmp_path / "b.txt").read_text()
    assert second["timing"] == first["timing"]  # not timed again
    for name in ("lit_qlearn", "sb3_contrib"):
        assert second["runs"][name]["0"] == first["runs"][name]["0"] and set(second["runs"][name]) == {"0", "1"}
    # other sizes are refused rather than mixed in
    assert run("crossq_sb3", [*args, "--resume", "--steps", "192"], tmp_path / "c.txt") == 2
    assert "other settings" in (tmp_path / "c.txt").read_text()
    # a part run at once elsewhere (its own --out) joins with --merge; --report-only runs nothing
    part = tmp_path / "part"
    part_args = ["--smoke", "--env", "Hopper-v5", "--out", str(part), "--speed-rounds", "1"]
    assert run("crossq_sb3", [*part_args, "--first-seed", "2", "--seeds", "1"], tmp_path / "d.txt") == 0
    other = json.loads((part / "crossq_sb3_hopper.json").read_text())
    assert {name: set(seeds) for name, seeds in other["runs"].items()} == {"lit_qlearn": {"2"}, "sb3_contrib": {"2"}}
    merge = ["--merge", str(part / "crossq_sb3_hopper.json"), "--report-only"]
    assert run("crossq_sb3", [*args, *merge], tmp_path / "e.txt") == 0
    merged = json.loads((out / "crossq_sb3_hopper.json").read_text())
    assert "merged 2 runs" in (tmp_path / "e.txt").read_text()
    assert merged["timing"] == first["timing"]  # the part's own timing round stays its own
    for name in ("lit_qlearn", "sb3_contrib"):
        assert merged["runs"][name] == {**second["runs"][name], "2": other["runs"][name]["2"]}
    finals = [merged["runs"]["lit_qlearn"][seed]["curve"][-1]["return"] for seed in ("0", "1", "2")]
    assert merged["claims"][0]["measured"]["lit_qlearn"] == finals and "3 seeds" in merged["claims"][0]["claim"]
    # a part of other settings is refused, naming the file
    assert run("crossq_sb3", [*part_args, "--steps", "192", "--seeds", "1", "--out", str(tmp_path / "odd")],
               tmp_path / "f.txt") == 0
    odd = tmp_path / "odd" / "crossq_sb3_hopper.json"
    assert run("crossq_sb3", [*args, "--merge", str(odd), "--report-only"], tmp_path / "g.txt") == 2
    assert f"{odd} holds runs of other settings" in (tmp_path / "g.txt").read_text()
    assert json.loads((out / "crossq_sb3_hopper.json").read_text())["runs"] == merged["runs"]  # left as it was


def test_smoke_refuses_to_write_into_the_committed_results(bench, tmp_path):
    run, _ = bench
    committed = _snapshot(RESULTS)
    status = run("r9_baird", ["--smoke", "--out", str(RESULTS)], tmp_path / "log.txt")
    assert status == 2 and "--smoke writes no results to" in (tmp_path / "log.txt").read_text()
    assert _snapshot(RESULTS) == committed


# ----------------------------------------------------------------------------- the harness
# benchmarks/harness.py is what every script imports: its writer, clock, quiet Trainer and
# evaluation schedule are checked here directly, against numbers counted by hand.


@pytest.fixture(scope="module")
def harness():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import harness
    finally:
        sys.path.remove(str(BENCHMARKS))
    return harness


def test_write_result_puts_the_claims_first_and_keeps_every_key(harness, tmp_path, capsys):
    claims = [harness.claim("x >= 1", "paper: 2", 0.5, 0.5 >= 1), harness.claim("y", None, {"a": 1}, True)]
    path = harness.write_result("demo", {"settings": {"out": tmp_path}, "claims": claims, "runs": [1, 2]},
                                started=0.0, out=tmp_path)
    written = json.loads(path.read_text())
    assert path == tmp_path / "demo.json"
    assert list(written) == ["benchmark", "claims", "settings", "runs", "wall_time_s"]
    assert written["benchmark"] == "demo" and written["settings"]["out"] == str(tmp_path)
    assert [c["holds"] for c in written["claims"]] == [False, True]
    assert "1/2 claims hold" in capsys.readouterr().out
    # a result that names itself keeps its own description
    described = harness.write_result("named", {"benchmark": "a description", "claims": claims[:1]}, 0.0, tmp_path)
    assert json.loads(described.read_text())["benchmark"] == "a description"


@pytest.mark.parametrize("claims", [None, [], [{"claim": "c", "published": None, "measured": 1, "holds": 1}],
                                    [{"claim": "c", "measured": 1, "holds": True}]])
def test_write_result_refuses_a_result_without_proper_claims(harness, tmp_path, claims):
    with pytest.raises(ValueError, match="write_result\\('bad'\\)"):
        harness.write_result("bad", {"claims": claims}, 0.0, tmp_path)
    assert not (tmp_path / "bad.json").exists()


def test_quiet_trainer_writes_nothing_unless_told(harness, tmp_path):
    trainer = harness.quiet_trainer(max_steps=1)
    assert trainer.loggers == [] and trainer.checkpoint_callback is None and trainer.progress_bar_callback is None
    series = harness.SeriesLogger()
    assert harness.quiet_trainer(max_steps=1, logger=series).loggers == [series]


def test_train_clock_times_the_updates_after_its_warmup(harness):
    import lightning as L

    from lit_qlearn.toys import RandomWalkDataModule, RandomWalkQ

    L.seed_everything(0, verbose=False)
    counted = []  # an independent counter of the batches: what `count` reads

    class Tick(L.Callback):
        def on_train_batch_end(self, *args):
            counted.append(1)

    tick = Tick()
    clock = harness.TrainClock(warmup=3)
    steps = harness.TrainClock(warmup=3, count=lambda: 10 * len(counted))
    harness.quiet_trainer(max_steps=8, callbacks=[tick, clock, steps]).fit(RandomWalkQ(),
                                                                           RandomWalkDataModule(num_transitions=8))
    assert clock.counted == 8 - 3 and steps.counted == 10 * (8 - 3)
    assert 0 < clock.seconds and clock.rate == pytest.approx(5 / clock.seconds)
    late = harness.TrainClock(warmup=20)
    with pytest.raises(RuntimeError, match="before the end of its warm-up"):
        harness.quiet_trainer(max_steps=4, callbacks=[late]).fit(RandomWalkQ(), RandomWalkDataModule(num_transitions=8))


def test_env_step_evaluation_runs_at_phase_ends_past_each_multiple(harness):
    """8 random steps, then phases of 4 environment steps and 2 updates: after updates 2, 4,
    ..., 10 the environment steps are 12, 16, 20, 24, 28; every 10 steps means the first
    phase end at or past 10 and 20: 12 and 20 (updates 2 and 6), with seeds 100 and 101."""
    import lightning as L

    from lit_qlearn.algorithms import DQN
    from lit_qlearn.data import OnlineDataModule
    from lit_qlearn.evaluation import evaluate_module

    L.seed_everything(0, verbose=False)
    dm = OnlineDataModule("CartPole-v1", capacity=64, learning_starts=8, batch_size=8, train_freq=4,
                          gradient_steps=2, seed=0)
    module = DQN(critic_hidden=(8,), eval_every=0)
    returns = []  # each evaluation again, from outside, with the seed it should have used
    seeds = iter((100, 101))

    def again(trainer, pl_module, entry):
        returns.append(evaluate_module(pl_module, "CartPole-v1", 2, seed=next(seeds))["return"])

    evaluation = harness.EnvStepEvaluation(dm, every=10, episodes=2, seed=100, vary_seed=True, on_result=again)
    harness.quiet_trainer(max_steps=10, callbacks=[evaluation]).fit(module, dm)
    assert [p["env_steps"] for p in evaluation.curve] == [12, 20]
    # at the phase's last update (2 and 6), not at its first (1 and 5), where the steps were taken
    assert [h["step"] for h in evaluation.history] == [2, 6] and evaluation.seed == 101
    assert [p["return"] for p in evaluation.curve] == returns
    assert all(0 < p["train_seconds"] < p["seconds"] for p in evaluation.curve)


def test_write_result_leaves_no_partial_file(harness, tmp_path):
    claims = [harness.claim("x", None, 1, True)]
    harness.write_result("demo", {"claims": claims}, 0.0, tmp_path)
    harness.write_result("demo", {"claims": claims, "runs": [1]}, 0.0, tmp_path)  # over the first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json"]
    assert json.loads((tmp_path / "demo.json").read_text())["runs"] == [1]


def test_stored_runs_resumes_reports_and_starts_over(harness, tmp_path):
    """A file of three runs, 12.5 s spent; jobs a = 1, 2, 4 at seed 0."""
    path = tmp_path / "study.json"
    stored = [{"a": 1, "seed": 0, "x": 10}, {"a": 2, "seed": 0, "x": 20}, {"a": 3, "seed": 9, "x": 30}]
    path.write_text(json.dumps({"runs": stored, "wall_time_s": 12.5, "cost": 7}))
    jobs = [{"a": a, "seed": 0} for a in (1, 2, 4)]

    def key(job):
        return job["a"], job["seed"]

    resumed = harness.stored_runs(path, jobs, key, resume=True, report_only=False)
    assert resumed.runs == stored[:2] and resumed.jobs == [{"a": 4, "seed": 0}]
    assert resumed.spent_s == 12.5 and resumed.stored["cost"] == 7
    # another part's runs (seed 9), kept when asked
    kept = harness.stored_runs(path, jobs, key, resume=True, report_only=False, keep=lambda r: r["seed"] == 9)
    assert kept.runs == stored and kept.jobs == [{"a": 4, "seed": 0}]
    everything = harness.stored_runs(path, jobs, key, resume=False, report_only=True)
    assert everything.runs == stored and everything.jobs == [] and everything.spent_s == 12.5
    fresh = harness.stored_runs(path, jobs, key, resume=False, report_only=False)
    assert fresh.runs == [] and fresh.jobs == jobs and fresh.spent_s == 0.0
    absent = harness.stored_runs(tmp_path / "none.json", jobs, key, resume=True, report_only=False)
    assert absent.runs == [] and absent.jobs == jobs
    with pytest.raises(SystemExit, match="none.json does not exist"):
        harness.stored_runs(tmp_path / "none.json", jobs, key, resume=False, report_only=True)


@pytest.fixture(scope="module")
def r10(harness):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import r10_preqn_online
    finally:
        sys.path.remove(str(BENCHMARKS))
    return r10_preqn_online


def _record(algo, seed, final, max_ratio, nonfinite=False):
    """A run of 50 steps evaluated at 20, 40 and 50: its final return (the last fifth, 40 and
    50) is ``final``; the evaluation at 20 is far off, so that a wrong window shows."""
    return {"algo": algo, "seed": seed, "steps": 50, "completed": final is not None,
            "eval": {"env_steps": [20, 40, 50], "return": [-999.0, final - 1.0, final + 1.0] if final else []},
            "max_ratio": max_ratio, "nonfinite": nonfinite, "stopped_at": None, "max_seem": 0.1,
            "seem_normalized": {"env_steps": [20], "values": [0.01]},
            "buffer_max_abs_reward": 3.0, "seconds_per_step": 0.01}


def test_r10_claims_are_computed_over_the_finished_runs(r10):
    """PreQN 1200 and 1300 (mean 1250) against TD3's 1000 and 2000 (mean 1500): 1250 >= 0.8 x
    1500 = 1200 holds, 1150 does not; one seed of three planned is missing for each."""
    planned = {algo: [0, 1, 2] for algo in r10.ALGOS}
    # at the bound is within it
    runs = [_record("preqn", 0, 1200.0, 0.5), _record("preqn", 1, 1300.0, 1.0),
            _record("td3", 0, 1000.0, 0.2), _record("td3", 1, 2000.0, 0.3),
            # within the bound until its critic turned non-finite: not within
            _record("td3-no-target", 0, 10.0, 0.5), _record("td3-no-target", 1, None, 0.5, nonfinite=True)]
    stable, leaves, comparable = r10.claims(runs, planned, 50_000)
    assert [stable["holds"], leaves["holds"], comparable["holds"]] == [True, True, True]
    assert comparable["measured"]["ratio"] == pytest.approx(1250 / 1500)
    for c in (stable, leaves, comparable):
        assert "data incomplete" in c["claim"]
    assert stable["measured"]["finished_seeds"] == 2 and stable["measured"]["planned_seeds"] == 3
    # a PreQN seed just beyond the bound, a no-target TD3 within it on every seed, a lower PreQN return
    runs[1] = _record("preqn", 1, 1100.0, 1.005)
    runs[5] = _record("td3-no-target", 1, 10.0, 0.99)
    stable, leaves, comparable = r10.claims(runs, planned, 50_000)
    assert [stable["holds"], leaves["holds"], comparable["holds"]] == [False, False, False]
    # every planned seed finished: no note
    complete = r10.claims(runs, {"preqn": [0, 1], "td3": [0, 1], "td3-no-target": [0, 1]}, 50_000)
    assert not any("incomplete" in c["claim"] for c in complete)
    # no run of an algorithm: its claims do not hold, and say so
    stable, _, comparable = r10.claims([r for r in runs if r["algo"] != "preqn"], planned, 50_000)
    assert not stable["holds"] and not comparable["holds"] and "no finished runs" in stable["claim"]
