"""Read a locally present Minari dataset directly with h5py (no ``minari`` import needed).

Layout written by minari 0.5 (``minari/dataset/_storages/hdf5_storage.py``)::

    <root>/<dataset_id>/data/main_data.hdf5   one group ``episode_<k>`` per episode:
        observations (T+1, ds)   actions (T, da)   rewards, terminations, truncations (T,)
    <root>/<dataset_id>/data/metadata.json    env_spec, ref_min_score, ref_max_score, ...

where ``dataset_id`` is ``(namespace/)name-vN`` (the namespace may itself contain
slashes, e.g. ``mujoco/hopper/expert-v0``) and root is ``$MINARI_DATASETS_PATH`` or
``~/.minari/datasets``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
from typing import Any

import h5py
import numpy as np

from lit_qlearn.data.d4rl import (DatasetError, as_transitions, check_output_dir, load_d4rl_raw, one_line, open_hdf5,
                                  validate_arrays)

__all__ = ["minari_root", "minari_data_dir", "read_minari", "read_minari_metadata", "check_minari_output",
           "write_minari"]

_EPISODE_KEYS = ("observations", "actions", "rewards", "terminations", "truncations")
# minari's own DATASET_ID_RE (minari/dataset/minari_dataset.py), with the version it requires
_DATASET_ID = re.compile(r"^(?:[-_\w][-_\w/]*[-_\w]+/)?[-_\w]+?-v\d+$")


def minari_root(root: str | os.PathLike | None = None) -> pathlib.Path:
    """``root``, else ``$MINARI_DATASETS_PATH``, else ``~/.minari/datasets`` (as minari)."""
    if root is None:
        root = os.environ.get("MINARI_DATASETS_PATH") or "~/.minari/datasets"
    return pathlib.Path(root).expanduser()


def minari_data_dir(dataset_id: str, root: str | os.PathLike | None = None) -> pathlib.Path:
    """The ``data`` directory of ``dataset_id``. Without a ``-vN`` suffix the highest
    local version is used."""
    base = minari_root(root)
    if not dataset_id or dataset_id.startswith("/") or ".." in dataset_id.split("/"):
        raise DatasetError(f"minari dataset id {dataset_id!r} is malformed (expected '(namespace/)name-vN')")
    if re.search(r"-v\d+$", dataset_id) is None:
        parent, _, name = dataset_id.rpartition("/")
        versions = sorted(
            (int(m.group(1)), p.name)
            for p in (base / parent).glob(f"{name}-v*")
            if (m := re.fullmatch(re.escape(name) + r"-v(\d+)", p.name))
        )
        if versions:
            dataset_id = f"{parent}/{versions[-1][1]}" if parent else versions[-1][1]
    return base / dataset_id / "data"


def read_minari_metadata(dataset_id: str, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """``metadata.json`` as a dict, plus ``env_id`` taken from ``eval_env_spec`` or
    ``env_spec`` when present. Empty when the file is absent."""
    path = minari_data_dir(dataset_id, root) / "metadata.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise DatasetError(f"{path}: not valid JSON ({one_line(e)})") from None
    for key in ("eval_env_spec", "env_spec"):
        spec = meta.get(key)
        if isinstance(spec, str):
            try:
                meta.setdefault("env_id", json.loads(spec)["id"])
            except (ValueError, KeyError, TypeError):
                pass
    return meta


def _episode_arrays(group: h5py.Group, source: str) -> dict[str, np.ndarray]:
    for key in _EPISODE_KEYS:
        if key not in group:
            raise DatasetError(f"{source}: required key {key!r} is missing")
        if isinstance(group[key], h5py.Group):
            raise DatasetError(
                f"{source}: key {key!r} is a dict/tuple space with keys {sorted(group[key])} "
                f"(unsupported: only flat Box/Discrete observations and actions can be read)"
            )
    ep = {k: group[k][()] for k in _EPISODE_KEYS}
    steps = len(ep["rewards"])
    if len(ep["observations"]) != steps + 1:
        raise DatasetError(
            f"{source}: key 'observations' has {len(ep['observations'])} rows "
            f"(expected T+1={steps + 1}, one more than 'rewards')"
        )
    obs = ep["observations"]
    return {
        "observations": obs[:-1],
        "next_observations": obs[1:],
        "actions": ep["actions"],
        "rewards": ep["rewards"],
        "terminals": ep["terminations"],
        "timeouts": ep["truncations"],
    }


def read_minari(dataset_id: str, root: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Read Minari dataset ``dataset_id`` into the dict :func:`read_d4rl` returns.

    Every step is a transition ``(obs[t], act[t], rew[t], obs[t+1], terminations[t])``:
    Minari stores the final observation of each episode, so unlike D4RL no step is
    dropped, truncated ones included. ``episode_ends`` is True on each episode's last
    step. Episodes are concatenated in id order.
    """
    path = minari_data_dir(dataset_id, root) / "main_data.hdf5"
    if not path.is_file():
        raise DatasetError(
            f"minari dataset {dataset_id!r} not found: no file {path} "
            f"(set MINARI_DATASETS_PATH or pass root=)"
        )
    episodes = []
    with open_hdf5(path) as f:
        names = sorted(
            (k for k in f if k.startswith("episode_") and k[8:].isdigit()), key=lambda k: int(k[8:])
        )
        if not names:
            raise DatasetError(f"{path}: no 'episode_<k>' groups (expected a minari main_data.hdf5)")
        for name in names:
            source = f"{path} [{name}]"
            ep = _episode_arrays(f[name], source)
            validate_arrays(ep, source)
            episodes.append(ep)
    cat = {k: np.concatenate([ep[k] for ep in episodes]) for k in episodes[0]}
    ends = np.zeros(len(cat["rewards"]), dtype=bool)
    ends[np.cumsum([len(ep["rewards"]) for ep in episodes]) - 1] = True
    return as_transitions(
        cat["observations"], cat["actions"], cat["rewards"], cat["next_observations"], cat["terminals"], ends
    )


def check_minari_output(dataset_id: str) -> pathlib.Path:
    """What :func:`write_minari` needs before any data is read or made, checked in
    milliseconds: the minari package, a well-formed ``dataset_id`` (``(namespace/)name-vN``),
    no dataset of that id yet (minari never overwrites one) and a datasets root
    (:func:`minari_root`) that takes a new file. Returns the dataset's future directory;
    raises a one-line :class:`DatasetError` naming what is wrong."""
    if importlib.util.find_spec("minari") is None:
        raise DatasetError("writing a Minari dataset needs the minari package: pip install 'lit-qlearn[minari]'")
    if not _DATASET_ID.match(dataset_id) or ".." in dataset_id.split("/"):
        raise DatasetError(f"minari dataset id {dataset_id!r} is malformed (expected '(namespace/)name-vN')")
    root = minari_root()
    target = root / dataset_id
    if target.exists():
        raise DatasetError(f"{target}: minari dataset {dataset_id!r} already exists (minari never overwrites one: "
                           "remove it or choose another id or version)")
    check_output_dir(root, create=True, hint="set MINARI_DATASETS_PATH to a writable directory",
                     holds=f"the minari dataset {dataset_id!r}")
    return target


def write_minari(d4rl_path: str | os.PathLike, dataset_id: str, env_id: str | None = None) -> pathlib.Path:
    """Write a D4RL-format file as the Minari dataset ``dataset_id`` with Minari's own API
    (``minari.create_dataset_from_buffers``, in ``$MINARI_DATASETS_PATH`` or
    ``~/.minari/datasets``), so users of the maintained format can load it.

    Episodes are cut at terminals and timeouts; each keeps its final observation (the
    row's ``next_observations``). The file must hold ``next_observations`` and every
    step (as :func:`lit_qlearn.datasets.collect` writes). Returns the dataset's directory.
    The output is checked first (:func:`check_minari_output`).
    """
    check_minari_output(dataset_id)
    # here, not at the top: minari is an optional dependency (the readers above need none)
    import minari
    from minari.data_collector import EpisodeBuffer

    arrays, metadata = load_d4rl_raw(d4rl_path)
    if "next_observations" not in arrays:
        raise DatasetError(f"{d4rl_path}: write_minari needs 'next_observations' (every step's next state)")
    env_id = env_id or metadata.get("env_id")
    if not env_id:
        raise DatasetError(f"{d4rl_path}: no metadata/env_id; pass env_id=")
    ends = np.flatnonzero(arrays["terminals"] | arrays["timeouts"])
    if len(ends) == 0 or ends[-1] != len(arrays["rewards"]) - 1:
        ends = np.append(ends, len(arrays["rewards"]) - 1)
    buffers, start = [], 0
    for k, end in enumerate(ends):
        rows = slice(start, end + 1)
        buffers.append(EpisodeBuffer(
            id=k, observations=np.concatenate([arrays["observations"][rows], arrays["next_observations"][end:end + 1]]),
            actions=arrays["actions"][rows], rewards=arrays["rewards"][rows],
            terminations=arrays["terminals"][rows], truncations=~arrays["terminals"][rows] & (np.arange(
                start, end + 1) == end)))
        start = end + 1
    refs = {k: float(metadata[k]) for k in ("ref_min_score", "ref_max_score") if k in metadata}
    dataset = minari.create_dataset_from_buffers(dataset_id, buffers, env=env_id,
                                                 algorithm_name=str(metadata.get("policy", "lit_qlearn")),
                                                 description=f"written by lit_qlearn from {pathlib.Path(d4rl_path).name}",
                                                 **refs)
    del dataset
    return minari_data_dir(dataset_id)
