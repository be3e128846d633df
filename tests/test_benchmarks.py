"""Benchmarks cannot rot: every script in benchmarks/ (the ``_`` helpers aside, found by glob,
so a new script is tested the day it is added) runs end to end in its ``--smoke`` mode (tiny
sizes, results into a temporary directory) and writes what its committed results hold: a
JSON whose ``claims`` each carry ``claim``, ``published``, ``measured`` and a computed
``holds`` (its truth does not matter at these sizes), beside the same figure / table files.
A script without ``--smoke`` exits 2 (argparse) and fails here.

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
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))
#: benchmarks that report targets (``"target": {..., "meets"}``), not a claims list; every
#: other script, and every new one, must write ``claims``
NO_CLAIMS = {"ntk_speed", "plasticity_cost", "throughput"}
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
             "lit_qlearn.data", "lit_qlearn.demo", "lit_qlearn.ntk", "lit_qlearn.toys"):
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
    assert not NO_CLAIMS - set(SCRIPTS) and not FRESH - set(SCRIPTS)


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
        if script in NO_CLAIMS:
            continue
        claims = result.get("claims")
        assert isinstance(claims, list) and claims, f"{path.name} has no claims list"
        for c in claims:
            assert set(c) == {"claim", "published", "measured", "holds"}, f"{path.name}: claim keys {sorted(c)}"
            assert isinstance(c["claim"], str) and c["claim"]
            assert type(c["holds"]) is bool, f"{path.name}: holds {c['holds']!r} of {c['claim']!r} is not a bool"


def test_smoke_refuses_to_write_into_the_committed_results(bench, tmp_path):
    run, _ = bench
    committed = _snapshot(RESULTS)
    status = run("r9_baird", ["--smoke", "--out", str(RESULTS)], tmp_path / "log.txt")
    assert status == 2 and "--smoke writes no results to" in (tmp_path / "log.txt").read_text()
    assert _snapshot(RESULTS) == committed
