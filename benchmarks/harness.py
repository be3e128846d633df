"""What every benchmark shares, in one place: the command line (``--smoke``, ``--out``), a
quiet Trainer, one clock, evaluation (through :mod:`lit_qlearn.evaluation`), the series a
run logs, and the one results writer.

Every benchmark writes ``<out>/<name>.json`` through :func:`write_result`: ``benchmark``,
a top-level ``claims`` list of ``{"claim", "published", "measured", "holds"}`` (``holds``
computed from the measurement by :func:`claim`'s caller, never typed in), the benchmark's
own keys, ``wall_time_s``; a figure or table beside it under benchmarks/results/ (or
``--out``). Reference implementations the benchmarks compare with (CORL-style loops, the
authors' NTK recipe, Stable-Baselines3 runs) live in benchmarks/baselines/.

``--smoke`` runs the benchmark's own code end to end (train, measure, compute the claims,
write the JSON, draw the figure) at sizes that take seconds, so that the test suite
(tests/test_benchmarks.py) notices a benchmark that no longer runs. Its numbers mean
nothing; its results go to ``--out`` (by default a new temporary directory), never to
benchmarks/results/; and its data directory is a separate cache of tiny datasets
(``SMOKE_DATA_STEPS`` steps each), because a tiny file in the real data directory would be
reused by every later real run (an existing dataset file is reused whatever its size)."""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import platform
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import lightning as L
import torch

from lit_qlearn.evaluation import EnvStepEvaluation
from lit_qlearn.loggers import SeriesLogger

__all__ = ["RESULTS", "ROOT", "SMOKE_DATA_STEPS", "EnvStepEvaluation", "SeriesLogger", "Stored", "TrainClock",
           "argument_parser", "baseline_available", "claim", "environment", "full_dataset", "git_info", "interleaved",
           "parse_args", "quiet", "quiet_trainer", "save_figure", "smoke_data_dir", "smoke_dataset", "stored_runs",
           "timed_hook", "write_result"]

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
#: environment steps of each generated dataset a smoke run reads: enough for a probe set of
#: 2560 and for a batch of 256 from a 5% fraction (demo_plasticity), made in a few seconds
SMOKE_DATA_STEPS = 6000


# ------------------------------------------------------------------------ command line


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """The benchmark's command line, described by its docstring's first line, with the two
    options every benchmark has; parse it with :func:`parse_args`."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (seconds): checks that the benchmark runs end to end; its numbers mean "
                             "nothing. Results go to --out (default: a new temporary directory), never to "
                             "benchmarks/results/")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"directory for the results (default: {RESULTS.relative_to(RESULTS.parent.parent)}/)")
    return parser


def parse_args(parser: argparse.ArgumentParser, smoke: dict[str, Any],
               data: Iterable[str] | Callable[[argparse.Namespace], Iterable[str]] = ()) -> argparse.Namespace:
    """Parse the command line of a parser made by :func:`argument_parser`.

    With ``--smoke``, ``smoke`` (option dest -> value) replaces the defaults (an option given
    on the command line still wins), ``args.out`` is a new temporary directory unless given,
    and lit_qlearn's data directory is the smoke cache (:func:`smoke_data_dir`), holding tiny
    copies of the generated datasets ``data`` (names, or a function of the parsed arguments
    giving them) made before the run. Without it ``args.out`` defaults to benchmarks/results/
    and the datasets ``data`` are made at full size if absent (:func:`full_dataset`).
    """
    dests = {action.dest for action in parser._actions}
    unknown = sorted(set(smoke) - dests)
    if unknown:  # a typo here would silently leave a full-size default in the smoke run
        raise ValueError(f"parse_args: smoke sizes for options the parser does not have: {unknown}")
    args = parser.parse_args()
    if args.out is not None and args.out.suffix == ".json":  # --out named a results file before it named a directory
        parser.error(f"--out is the directory the results are written into, got the file name {args.out}")
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args()
        if args.out is not None and args.out.resolve() == RESULTS.resolve():
            parser.error(f"--smoke writes no results to {RESULTS} (they are the committed measurements): "
                         "give another --out or none")
        args.out = args.out or Path(tempfile.mkdtemp(prefix="lit_qlearn-bench-smoke-"))
        os.environ["LIT_QLEARN_DATA_DIR"] = str(smoke_data_dir())
        print(f"smoke run (tiny sizes, the numbers mean nothing): results -> {args.out}", flush=True)
    for name in data(args) if callable(data) else data:
        smoke_dataset(name) if args.smoke else full_dataset(name)
    args.out = args.out or RESULTS
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def smoke_data_dir() -> Path:
    """Where smoke runs keep their tiny datasets: a per-user directory under the system's
    temporary directory (``$TMPDIR``), shared by smoke runs, read by no real run."""
    return Path(tempfile.gettempdir()) / f"lit_qlearn-bench-smoke-data-{os.getuid()}"


def smoke_dataset(name: str) -> Path:
    """The generated dataset ``name`` (``"default"`` or ``<family>-<level>-v5``) in the smoke
    cache, made there with ``SMOKE_DATA_STEPS`` steps if absent; an existing file, itself."""
    from lit_qlearn.data.names import parse_name
    from lit_qlearn.datasets import ensure_dataset, ensure_default_dataset

    def no_progress(steps: int) -> None:  # no progress bar: a few seconds
        pass

    if name == "default":
        return ensure_default_dataset(steps=SMOKE_DATA_STEPS, progress=no_progress)
    if Path(name).is_file():  # the user's own file: nothing to shrink
        return Path(name)
    parsed = parse_name(name)
    if parsed is None or parsed[1] == "medium-replay":
        # medium-replay is the SAC run's own buffer: it has no size to shrink
        raise SystemExit(f"--smoke: no tiny copy of the dataset {name!r}; a smoke run reads 'default' or "
                         "<family>-{random,medium,expert,medium-expert}-v5")
    return ensure_dataset(name, steps=SMOKE_DATA_STEPS, progress=no_progress)


def full_dataset(name: str) -> Path:
    """The dataset ``name`` a real run reads: ``"default"`` and ``<family>-<level>-v5`` made
    if absent (with a progress bar), a file as it is; ``<family>-medium-replay-v5`` (the SAC
    run's buffer) only if already on disk, else one line naming the command that trains it."""
    from lit_qlearn.data import DatasetError, resolve
    from lit_qlearn.data.names import parse_name
    from lit_qlearn.datasets import ensure_dataset, ensure_default_dataset

    if name == "default":
        return ensure_default_dataset()
    parsed = parse_name(name)
    try:
        return resolve(name) if parsed is None or parsed[1] == "medium-replay" else ensure_dataset(name)
    except DatasetError as error:  # a missing file or a run to train first: one line, no traceback
        raise SystemExit(str(error)) from None


def baseline_available(module: str) -> bool:
    """Whether the library a benchmark compares with (``module``, e.g. ``stable_baselines3``)
    can be imported; if not, one line saying that its runs are skipped."""
    if importlib.util.find_spec(module) is not None:
        return True
    print(f"{module} is not installed (pip install -e '.[bench]'): its runs are skipped and the claims comparing "
          "with it do not hold", flush=True)
    return False


# ----------------------------------------------------------------------------- running


def quiet() -> None:
    """Silence what Lightning says on every fit of a benchmark (its banners, the DataLoader
    worker hint, the monitors' one-time notes): a sweep of hundreds of runs prints only its
    own lines."""
    for message in (".*does not have many workers.*", ".*IterableDataset.*", ".*LeafSpec.*", ".*CrashPredictor.*",
                    ".*TensorBoard support.*", ".*GPU available.*"):
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


#: the Trainer arguments that make a fit write and print nothing of its own
QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}


def quiet_trainer(**options: Any) -> L.Trainer:
    """``L.Trainer(**options)`` with no logger, no checkpoints, no progress bar and no model
    summary unless ``options`` say otherwise (e.g. ``logger=SeriesLogger()``), after
    :func:`quiet`."""
    quiet()
    return L.Trainer(**(QUIET | options))


class TrainClock(L.Callback):
    """Wall time of a fit, the Trainer's set-up excluded: from the start of training, or
    with ``warmup`` from the end of update ``warmup`` (first-call costs, compilation), to the
    end of training. ``count`` (default: the updates) is what :attr:`rate` divides by the
    time, e.g. ``lambda: dm.rollout.env_steps`` for environment steps per second. On a GPU
    both ends wait for the device first.

    After ``fit``: ``seconds``, ``counted`` (what ``count`` advanced by) and ``rate``."""

    def __init__(self, warmup: int = 0, count: Callable[[], float] | None = None) -> None:
        if warmup < 0:
            raise ValueError(f"TrainClock: warmup must be >= 0 updates, got {warmup}")
        self.warmup, self.count = warmup, count
        self.start: float | None = None
        self.end: float | None = None

    def _now(self, trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _counter(self, trainer: L.Trainer) -> float:
        return self.count() if self.count is not None else trainer.global_step

    def _begin(self, trainer: L.Trainer) -> None:
        self.start, self.counted_from = self._now(trainer), self._counter(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = self.end = None
        if self.warmup == 0:
            self._begin(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.start is None and trainer.global_step >= self.warmup:  # global_step counts updates
            self._begin(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.start is None:
            raise RuntimeError(f"TrainClock: the fit ended at update {trainer.global_step}, before the end of "
                               f"its warm-up ({self.warmup} updates): nothing was timed")
        self.end = self._now(trainer)
        self.counted = self._counter(trainer) - self.counted_from

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def rate(self) -> float:
        """What ``count`` counted (updates by default) per second of the timed part."""
        return self.counted / self.seconds


def timed_hook(callback: L.Callback) -> L.Callback:
    """Accumulate the wall time ``callback.on_train_batch_end`` takes in ``hook_seconds``."""
    hook = callback.on_train_batch_end
    callback.hook_seconds = 0.0

    def timed(*args, **kwargs):
        start = time.perf_counter()
        hook(*args, **kwargs)
        callback.hook_seconds += time.perf_counter() - start

    callback.on_train_batch_end = timed
    return callback


def interleaved(configs: Sequence[T], repeats: int) -> Iterator[tuple[int, T]]:
    """``(repeat, config)`` for every config, ``repeats`` times, the order rotated each
    repeat (A B, B A, ...), so that a drift of the machine hits every config alike."""
    order = list(configs)
    for r in range(repeats):
        k = r % len(order)
        for config in order[k:] + order[:k]:
            yield r, config


# ----------------------------------------------------------------------------- results


class Stored(NamedTuple):
    """What a resumable benchmark starts from (:func:`stored_runs`)."""

    runs: list[dict[str, Any]]  # the stored run records kept
    jobs: list[dict[str, Any]]  # the jobs still to run
    stored: dict[str, Any]  # the whole stored results file ({} when none was read)

    @property
    def spent_s(self) -> float:
        """The stored file's ``wall_time_s``: a caller's ``started -= spent_s`` makes the
        results' wall time add up over the processes that made them."""
        return float(self.stored.get("wall_time_s", 0.0))


def stored_runs(path: Path, jobs: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any], resume: bool,
                report_only: bool, keep: Callable[[dict[str, Any]], bool] | None = None) -> Stored:
    """The run records a resumable benchmark starts from, and its jobs still to run.

    Such a benchmark keeps one record per finished run in the ``"runs"`` list of its
    results file ``path`` (``<out>/<name>.json``), rewritten (:func:`write_result`) after
    every run, so that a study cut short keeps what it finished; ``key(record)`` is
    ``key(job)`` of the job that made it (e.g. algorithm, seed and sizes).

    * ``report_only``: every stored record, no job (e.g. runs merged from several files);
      no file at ``path`` is an error (``SystemExit``).
    * ``resume`` with a file at ``path``: the stored records some job of ``jobs`` would
      make (and those ``keep(record)`` accepts, e.g. the runs of the same sizes that another
      part of the study made), and the jobs no stored record answers.
    * otherwise: no record, every job (a new study; the file is overwritten).
    """
    if report_only:
        if not path.exists():
            raise SystemExit(f"--report-only: {path} does not exist")
        stored = json.loads(path.read_text())
        return Stored(list(stored["runs"]), [], stored)
    if not (resume and path.exists()):
        return Stored([], list(jobs), {})
    stored = json.loads(path.read_text())
    wanted = {key(j) for j in jobs}
    runs = [r for r in stored["runs"] if key(r) in wanted or (keep is not None and keep(r))]
    done = {key(r) for r in runs}
    left = [j for j in jobs if key(j) not in done]
    print(f"resuming {path}: {len(runs)} runs kept, {len(left)} to run", flush=True)
    return Stored(runs, left, stored)



def late_mean(env_steps: Sequence[float], returns: Sequence[float], steps: int) -> float | None:
    """The mean of a run's evaluation ``returns`` taken at ``env_steps`` in the last fifth of
    its ``steps`` (``>= steps - steps // 5``): its final score, read over several evaluations
    since one of a few episodes swings by hundreds on a MuJoCo task; None when none fell there."""
    late = [v for x, v in zip(env_steps, returns) if x >= steps - steps // 5]
    return statistics.fmean(late) if late else None


def claim(text: str, published: Any, measured: Any, holds: bool) -> dict[str, Any]:
    """One claim; ``holds`` must be computed from ``measured`` by the caller, never typed in."""
    return {"claim": text, "published": published, "measured": measured, "holds": bool(holds)}


def git_info(files: dict[str, Path]) -> dict[str, Any]:
    """The HEAD commit and, per measured source file, whether it differs from HEAD and its sha256."""

    def run(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    info: dict[str, Any] = {"commit": run("rev-parse", "HEAD")}
    for name, path in files.items():
        path = path.resolve()
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        info[f"{name}_modified_vs_head"] = bool(run("status", "--porcelain", str(rel)))
        info[f"{name}_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return info


def environment(sources: dict[str, Path]) -> dict[str, Any]:
    """Machine, versions and the git state of the measured source files."""
    return {"torch": torch.__version__, "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "git": git_info(sources)}


def save_figure(fig: Any, path: Path, title: str | None = None, dpi: int = 100) -> None:
    """Title, lay out, write ``path`` and close ``fig`` (a matplotlib figure)."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def write_result(name: str, result: dict[str, Any], started: float, out: Path) -> Path:
    """Write ``<out>/<name>.json`` and print the claims table; the one writer of results.

    The file holds ``benchmark`` (``name``, unless ``result`` describes itself there),
    ``claims`` (``result["claims"]``: a non-empty list of :func:`claim`), the rest of
    ``result`` in its order, and ``wall_time_s`` since ``started`` (``time.perf_counter()``).
    ``out`` is ``args.out`` of :func:`parse_args`, never implicit, so that a smoke run
    cannot write into benchmarks/results/."""
    result = dict(result)  # the caller's dict is left as it was
    claims = result.pop("claims", None)
    if not isinstance(claims, list) or not claims:
        raise ValueError(f"write_result({name!r}): result['claims'] must be a non-empty list of claim(...), "
                         f"got {claims!r}")
    for c in claims:
        if not isinstance(c, dict) or set(c) != {"claim", "published", "measured", "holds"} \
                or type(c["holds"]) is not bool:
            raise ValueError(f"write_result({name!r}): every claim must be claim(text, published, measured, holds) "
                             f"with a computed bool holds, got {c!r}")
    result = {"benchmark": name, "claims": claims, **result, "wall_time_s": round(time.perf_counter() - started, 1)}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    # written whole, then renamed over the old file: a study killed while writing keeps its last complete file
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(result, indent=2, default=_json_value) + "\n")
    os.replace(partial, path)
    width = max(len(c["claim"]) for c in claims)
    print(f"\n{name}: {sum(c['holds'] for c in claims)}/{len(claims)} claims hold "
          f"({result['wall_time_s']:.0f} s) -> {path}")
    for c in claims:
        print(f"  [{'holds' if c['holds'] else 'FAILS'}] {c['claim']:<{width}}  measured: {_short(c['measured'])}")
    if out.resolve() == RESULTS.resolve():  # the committed results: their table in benchmarks/README.md follows
        import _tables

        _tables.main([])
    return path


def _json_value(value: Any) -> Any:
    """What JSON cannot write itself: paths (the settings' ``out``) as text, numbers
    (numpy scalars, 0-d tensors) as floats."""
    return str(value) if isinstance(value, Path) else float(value)


def _short(value: Any) -> str:
    text = json.dumps(value, default=_json_value)
    return text if len(text) <= 90 else text[:87] + "..."
