"""The shape every reproduction benchmark writes: a top-level ``claims`` list of
``{"claim", "published", "measured", "holds"}`` where ``holds`` is computed from the
measurement, a JSON beside a PNG under benchmarks/results/, and a summary table."""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from _common import git_info

RESULTS = Path(__file__).parent / "results"


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """The benchmark's command line, described by its docstring's first line."""
    return argparse.ArgumentParser(description=doc.split("\n")[0])


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


def write_result(name: str, result: dict[str, Any], started: float) -> Path:
    """Write ``benchmarks/results/<name>.json`` (``claims`` first) and print the claims table."""
    result = {"benchmark": name, "claims": result.pop("claims"), **result,
              "wall_time_s": round(time.perf_counter() - started, 1)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    width = max(len(c["claim"]) for c in result["claims"])
    print(f"\n{name}: {sum(c['holds'] for c in result['claims'])}/{len(result['claims'])} claims hold "
          f"({result['wall_time_s']:.0f} s) -> {path}")
    for c in result["claims"]:
        print(f"  [{'holds' if c['holds'] else 'FAILS'}] {c['claim']:<{width}}  measured: {_short(c['measured'])}")
    return path


def _short(value: Any) -> str:
    text = json.dumps(value, default=float)
    return text if len(text) <= 90 else text[:87] + "..."
