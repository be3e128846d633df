"""Shared fixtures for the data tests: isolated dataset directories, hand-made files."""
from __future__ import annotations

import hashlib
import pathlib
from typing import Callable

import h5py
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch) -> pathlib.Path:
    """Every dataset directory the package looks in points into tmp_path, so no test
    reads or writes ~/.d4rl, ~/.minari or ~/.cache."""
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setenv("LIT_QLEARN_DATA_DIR", str(tmp_path / "lit"))
    return tmp_path


def random_arrays(n: int = 200, ds: int = 3, da: int = 2, seed: int = 0, episode: int = 25) -> dict:
    """D4RL-style arrays with unique observation rows, a timeout every ``episode`` rows
    and a few terminals."""
    rng = np.random.default_rng(seed)
    timeouts = np.zeros(n, bool)
    timeouts[episode - 1 :: episode] = True
    terminals = np.zeros(n, bool)
    terminals[[i for i in (7, 40) if i < n]] = True
    return {
        # per-dimension scales and offsets, so normalisation has something to do
        "observations": (rng.normal(size=(n, ds)) * np.geomspace(0.1, 10, ds) + np.arange(ds)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, da)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminals": terminals,
        "timeouts": timeouts,
    }


@pytest.fixture
def arrays() -> Callable[..., dict]:
    return random_arrays


@pytest.fixture
def h5_file(tmp_path) -> Callable[..., pathlib.Path]:
    """Write datasets with raw h5py (no validation), to make broken files too."""

    def make(name: str, arrays: dict, metadata: dict | None = None) -> pathlib.Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            for k, v in arrays.items():
                f.create_dataset(k, data=v)
            for k, v in (metadata or {}).items():
                f.create_dataset(f"metadata/{k}", data=v)
        return path

    return make


@pytest.fixture
def sha256() -> Callable[[pathlib.Path], str]:
    return lambda path: hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
