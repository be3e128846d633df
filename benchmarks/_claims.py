"""The shape every reproduction benchmark writes: a top-level ``claims`` list of
``{"claim", "published", "measured", "holds"}`` where ``holds`` is computed from the
measurement, a JSON beside a PNG under benchmarks/results/ (or ``--out``), and a summary
table; and the command line every benchmark shares, ``--smoke`` and ``--out``.

``--smoke`` runs the benchmark's own code end to end (train, measure, compute the claims,
write the JSON, draw the figure) at sizes that take seconds, so that the test suite
(tests/test_benchmarks.py) notices a benchmark that no longer runs. Its numbers mean
nothing; its results go to ``--out`` (by default a new temporary directory), never to
benchmarks/results/; and its data directory is a separate cache of tiny datasets
(``SMOKE_DATA_STEPS`` steps each), because a tiny file in the real data directory would be
reused by every later real run (an existing dataset file is reused whatever its size)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from _common import git_info

RESULTS = Path(__file__).parent / "results"
#: environment steps of each generated dataset a smoke run reads: enough for a probe set of
#: 2560 and for a batch of 256 from a 5% fraction (demo_plasticity), made in a few seconds
SMOKE_DATA_STEPS = 6000


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
    giving them) made before the run. Without it ``args.out`` defaults to benchmarks/results/.
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
        for name in data(args) if callable(data) else data:
            smoke_dataset(name)
        print(f"smoke run (tiny sizes, the numbers mean nothing): results -> {args.out}", flush=True)
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
    from lit_qlearn.data import ensure_default_dataset
    from lit_qlearn.data.generated import ensure_dataset, parse_name

    def quiet(steps: int) -> None:  # no progress bar: a few seconds
        pass

    if name == "default":
        return ensure_default_dataset(steps=SMOKE_DATA_STEPS, progress=quiet)
    if Path(name).is_file():  # the user's own file: nothing to shrink
        return Path(name)
    parsed = parse_name(name)
    if parsed is None or parsed[1] == "medium-replay":
        # medium-replay is the SAC run's own buffer: it has no size to shrink
        raise SystemExit(f"--smoke: no tiny copy of the dataset {name!r}; a smoke run reads 'default' or "
                         "<family>-{random,medium,expert,medium-expert}-v5")
    return ensure_dataset(name, steps=SMOKE_DATA_STEPS, progress=quiet)


def baseline_available(module: str) -> bool:
    """Whether the library a benchmark compares with (``module``, e.g. ``stable_baselines3``)
    can be imported; if not, one line saying that its runs are skipped."""
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        return True
    print(f"{module} is not installed (pip install -e '.[bench]'): its runs are skipped and the claims comparing "
          "with it do not hold", flush=True)
    return False


def save_figure(fig: Any, path: Path, title: str | None = None, dpi: int = 100) -> None:
    """Title, lay out, write ``path`` and close ``fig`` (a matplotlib figure)."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def claim(text: str, published: Any, measured: Any, holds: bool) -> dict[str, Any]:
    """One claim; ``holds`` must be computed from ``measured`` by the caller, never typed in."""
    return {"claim": text, "published": published, "measured": measured, "holds": bool(holds)}


def environment(sources: dict[str, Path]) -> dict[str, Any]:
    """Machine, versions and the git state of the measured source files."""
    return {"torch": torch.__version__, "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "git": git_info(sources)}


def write_result(name: str, result: dict[str, Any], started: float, out: Path) -> Path:
    """Write ``<out>/<name>.json`` (``claims`` first; ``out`` is ``args.out`` of
    :func:`parse_args`, never implicit, so that a smoke run cannot write into
    benchmarks/results/) and print the claims table."""
    result = {"benchmark": name, "claims": result.pop("claims"), **result,
              "wall_time_s": round(time.perf_counter() - started, 1)}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=_json_value) + "\n")
    width = max(len(c["claim"]) for c in result["claims"])
    print(f"\n{name}: {sum(c['holds'] for c in result['claims'])}/{len(result['claims'])} claims hold "
          f"({result['wall_time_s']:.0f} s) -> {path}")
    for c in result["claims"]:
        print(f"  [{'holds' if c['holds'] else 'FAILS'}] {c['claim']:<{width}}  measured: {_short(c['measured'])}")
    return path


def _json_value(value: Any) -> Any:
    """What JSON cannot write itself: paths (the settings' ``out``) as text, numbers
    (numpy scalars, 0-d tensors) as floats."""
    return str(value) if isinstance(value, Path) else float(value)


def _short(value: Any) -> str:
    text = json.dumps(value, default=_json_value)
    return text if len(text) <= 90 else text[:87] + "..."
