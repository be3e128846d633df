"""What every benchmark records about the code it measured."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git_info(files: dict[str, Path]) -> dict:
    """The HEAD commit and, per measured source file, whether it differs from HEAD and its sha256."""

    def run(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    info: dict = {"commit": run("rev-parse", "HEAD")}
    for name, path in files.items():
        path = path.resolve()
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        info[f"{name}_modified_vs_head"] = bool(run("status", "--porcelain", str(rel)))
        info[f"{name}_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return info
