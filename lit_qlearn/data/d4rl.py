"""D4RL-format HDF5 files: validation, reading with ``qlearning_dataset`` semantics, writing.

The ``d4rl`` package cannot be imported next to current gymnasium / numpy / mujoco
(docs/design.md section 6), so the files are read directly with h5py. A file holds the
top-level arrays

======================= ============ ==========================================
``observations``        ``(N, ds)``  state before step i
``actions``             ``(N, da)``  action taken (``(N,)`` integers: discrete)
``rewards``             ``(N,)``     reward of step i
``terminals``           ``(N,)``     the environment *terminated* after step i
``timeouts``            ``(N,)``     the episode was *truncated* after step i
``next_observations``   ``(N, ds)``  optional; ignored by ``qlearning_dataset``
``metadata/*``                       datasets or attributes (env id, scores, ...)
======================= ============ ==========================================

Every bad input raises :class:`DatasetError` with a one-line message naming the
file, the key or argument, and what was expected.
"""
from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Any, Iterable, Mapping

import h5py
import numpy as np

__all__ = [
    "DatasetError",
    "resolve_dataset_path",
    "load_d4rl_raw",
    "read_d4rl_metadata",
    "qlearning_dataset",
    "read_d4rl",
    "write_d4rl",
    "validate_arrays",
    "check_finite",
    "check_output_dir",
    "check_output_path",
]

# key -> (expected shape, quoted in error messages; allowed ranks)
REQUIRED_KEYS = {
    "observations": ("(N, ds)", (2,)),
    "actions": ("(N, da) or (N,)", (1, 2)),
    "rewards": ("(N,)", (1,)),
    "terminals": ("(N,)", (1,)),
}
OPTIONAL_KEYS = {"timeouts": ("(N,)", (1,)), "next_observations": ("(N, ds)", (2,))}
# NaN/inf here would silently poison every TD target, so they are rejected at load.
FINITE_KEYS = ("observations", "actions", "rewards", "next_observations")


class DatasetError(ValueError):
    """Bad dataset input: a missing file or key, inconsistent arrays, non-finite values,
    a bad argument. The message is one line naming the file / key / argument."""


def one_line(text: object) -> str:
    """``text`` with its whitespace runs, newlines included, collapsed to single spaces."""
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- paths


def looks_like_path(text: str) -> bool:
    """Whether a dataset argument holds a directory separator: a path the user typed,
    never a dataset name to look up."""
    return os.sep in text or bool(os.altsep and os.altsep in text)


def _os_reason(error: OSError) -> str:
    """An OS error's reason in a few words ("Permission denied"), else its one-line text."""
    return error.strerror or one_line(error)


def d4rl_dataset_dirs() -> list[pathlib.Path]:
    """Where ``d4rl`` keeps its downloads: ``$D4RL_DATASET_DIR`` or ``~/.d4rl/datasets``."""
    env = os.environ.get("D4RL_DATASET_DIR")
    return [pathlib.Path(env).expanduser() if env else pathlib.Path("~/.d4rl/datasets").expanduser()]


def _d4rl_file_names(name: str) -> list[str]:
    """Candidate file names for a dataset name: ``<name>.hdf5`` and d4rl's own download
    name, the last part of its URL, e.g. ``hopper-medium-replay-v2`` ->
    ``hopper_medium_replay-v2.hdf5``."""
    stem = name[: -len(".hdf5")] if name.endswith(".hdf5") else name
    names = [f"{stem}.hdf5"]
    base, sep, version = stem.rpartition("-v")
    if sep and version.isdigit():
        names.append(f"{base.replace('-', '_')}-v{version}.hdf5")
    return list(dict.fromkeys(names))


def resolve_dataset_path(path_or_name: str | os.PathLike) -> pathlib.Path:
    """An existing file path is returned as is; a bare name such as ``hopper-medium-v2``
    is looked up as ``<dir>/<name>.hdf5`` (or d4rl's ``hopper_medium-v2.hdf5``) in
    :func:`d4rl_dataset_dirs`. Raises :class:`DatasetError` naming what was searched."""
    path = pathlib.Path(path_or_name).expanduser()
    try:
        if path.is_file():
            return path
        exists = path.exists()
    except OSError as e:  # e.g. a directory on the way that this user may not search
        raise DatasetError(f"{path}: cannot be looked up ({_os_reason(e)}; expected a readable "
                           "D4RL-format .hdf5 file)") from None
    if exists:
        raise DatasetError(f"{path}: is not a file (expected a D4RL-format .hdf5 file)")
    text = os.fspath(path_or_name)
    if looks_like_path(text):
        raise DatasetError(f"{path}: dataset file not found")
    dirs = d4rl_dataset_dirs()
    candidates = _d4rl_file_names(text)
    for d in dirs:
        for c in candidates:
            if (d / c).is_file():
                return d / c
    raise DatasetError(
        f"dataset {text!r} not found: no file {' or '.join(candidates)} in "
        f"{', '.join(map(str, dirs))} (set D4RL_DATASET_DIR or pass a file path)"
    )


def check_output_dir(directory: str | os.PathLike, create: bool = False, hint: str = "",
                     holds: str = "the output") -> pathlib.Path:
    """``directory`` (expanded) once it is known to accept a new file, checked before any
    data is made: it exists (``create``: is created, for the package's own data directory;
    a directory a user named is theirs to create) and a file can be written in it. Raises
    :class:`DatasetError` naming the directory and what was expected; ``hint`` (e.g. the
    variable that sets the directory) ends the message, ``holds`` says what goes there."""
    directory = pathlib.Path(directory).expanduser()
    expected = f"expected a writable directory to hold {holds}" + (f"; {hint}" if hint else "")
    if create:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatasetError(f"{directory}: cannot create the directory ({_os_reason(e)}); "
                               f"{expected}") from None
    elif not directory.is_dir():
        what = "is not a directory" if directory.exists() else "directory does not exist (create it first)"
        raise DatasetError(f"{directory}: {what}; {expected}")
    try:
        # a real write, not os.access(): root passes every permission bit but not a
        # read-only mount, and a full or quota-bound disk fails here too
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise DatasetError(f"{directory}: cannot write a file there ({_os_reason(e)}); {expected}") from None
    return directory


def check_output_path(path: str | os.PathLike, create_dir: bool = False, hint: str = "") -> pathlib.Path:
    """``path`` (expanded) once a file is known to be writable there: not a directory, in a
    directory that passes :func:`check_output_dir` (``create_dir`` as its ``create``)."""
    path = pathlib.Path(path).expanduser()
    if path.is_dir():
        raise DatasetError(f"{path}: is a directory (expected the path of an .hdf5 file to write)")
    check_output_dir(path.parent, create_dir, hint, holds=path.name)
    return path


# ---------------------------------------------------------------------- validation


def check_finite(arrays: Mapping[str, np.ndarray], keys: Iterable[str], source: str) -> None:
    """Raise if a float array under one of ``keys`` holds NaN/inf, naming the key and the
    first bad row."""
    for key in keys:
        x = arrays.get(key)
        if x is None or not np.issubdtype(x.dtype, np.floating):
            continue
        ok = np.isfinite(x).reshape(len(x), -1).all(axis=1)
        if not ok.all():
            row = int(np.flatnonzero(~ok)[0])
            bad = np.asarray(x[row]).ravel()
            kind = "nan" if np.isnan(bad).any() else "inf"
            raise DatasetError(f"{source}: key {key!r} has a non-finite value ({kind}) at row {row}")


def validate_arrays(arrays: Mapping[str, Any], source: str) -> None:
    """The checks shared by every reader and the writer: required keys present, numeric
    arrays of the expected rank, one length N for all, finite observations / actions /
    rewards. ``source`` (a file, or an argument) starts every message."""
    for key, (shape, _) in REQUIRED_KEYS.items():
        if arrays.get(key) is None:
            raise DatasetError(f"{source}: required key {key!r} is missing (expected a {shape} array)")
    n = len(arrays["observations"])
    if n == 0:
        raise DatasetError(f"{source}: holds no rows (key 'observations' has length 0; expected at least one "
                           "transition)")
    for key, (shape, ranks) in {**REQUIRED_KEYS, **OPTIONAL_KEYS}.items():
        x = arrays.get(key)
        if x is None:
            continue
        if not isinstance(x, np.ndarray) or x.dtype.kind not in "biuf":
            raise DatasetError(f"{source}: key {key!r} is not a numeric array (expected a {shape} array)")
        if x.ndim not in ranks:
            raise DatasetError(f"{source}: key {key!r} has shape {x.shape} (expected a {shape} array)")
        if len(x) != n:
            raise DatasetError(
                f"{source}: key {key!r} has {len(x)} rows but 'observations' has {n} "
                f"(all arrays must have the same length N)"
            )
    obs, nxt = arrays.get("observations"), arrays.get("next_observations")
    if obs is not None and nxt is not None and nxt.shape != obs.shape:
        raise DatasetError(
            f"{source}: key 'next_observations' has shape {nxt.shape} but 'observations' has {obs.shape}"
        )
    check_finite(arrays, FINITE_KEYS, source)


# ------------------------------------------------------------------------- reading


def _to_python(value: Any) -> Any:
    """HDF5 scalars / strings -> Python values; arrays stay arrays."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO" and value.ndim == 0:
        return _to_python(value.item())
    if isinstance(value, (np.generic, np.ndarray)) and np.ndim(value) == 0:
        return value.item()
    return value


def _read_metadata(f: h5py.File) -> dict[str, Any]:
    """``metadata/*`` datasets and attributes as a flat dict; nested groups give keys
    like ``policy/fc0/weight``."""
    meta: dict[str, Any] = {}
    group = f.get("metadata")
    if not isinstance(group, h5py.Group):
        return meta
    meta.update({k: _to_python(v) for k, v in group.attrs.items()})

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            meta[name] = _to_python(obj[()])
        elif isinstance(obj, h5py.Group):
            meta.update({f"{name}/{k}": _to_python(v) for k, v in obj.attrs.items()})

    group.visititems(visit)
    return meta


def open_hdf5(path: pathlib.Path) -> h5py.File:
    """Open ``path`` read-only, or raise :class:`DatasetError` naming it."""
    try:
        # read-only: a failed load must leave the user's file untouched
        return h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(f"{path}: not a readable HDF5 file ({one_line(e)})") from None


def load_d4rl_raw(path_or_name: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a D4RL-format file as stored, validated.

    Returns ``(arrays, metadata)``: ``arrays`` holds observations ``(N, ds)``, actions
    ``(N, da)``, rewards, terminals, timeouts ``(N,)`` (all False when an old v0 file has
    none; d4rl then guessed them from the env's step limit) and ``next_observations``
    when present, in their stored dtypes; ``metadata`` the flat ``metadata/*`` dict.
    ``infos/*`` is not loaded.
    """
    path = resolve_dataset_path(path_or_name)
    arrays: dict[str, np.ndarray] = {}
    with open_hdf5(path) as f:
        for key in (*REQUIRED_KEYS, *OPTIONAL_KEYS):
            if key not in f:
                continue
            if not isinstance(f[key], h5py.Dataset):
                raise DatasetError(f"{path}: key {key!r} is a group, not an array")
            arrays[key] = f[key][()]
        metadata = _read_metadata(f)
    validate_arrays(arrays, str(path))
    if "timeouts" not in arrays:
        arrays["timeouts"] = np.zeros(len(arrays["rewards"]), dtype=bool)
    return arrays, metadata


def read_d4rl_metadata(path_or_name: str | os.PathLike) -> dict[str, Any]:
    """Only the ``metadata/*`` dict of a file (cheap: no arrays are read)."""
    path = resolve_dataset_path(path_or_name)
    with open_hdf5(path) as f:
        return _read_metadata(f)


def as_transitions(
    obs: np.ndarray,
    act: np.ndarray,
    rew: np.ndarray,
    next_obs: np.ndarray,
    terminals: np.ndarray,
    episode_ends: np.ndarray,
) -> dict[str, np.ndarray]:
    """The dict every reader returns, in its dtypes: float32 arrays (int64 actions for
    discrete data), bool flags."""
    act = act.astype(np.int64) if act.dtype.kind in "biu" else act.astype(np.float32)
    return {
        "observations": obs.astype(np.float32),
        "actions": act,
        "next_observations": next_obs.astype(np.float32),
        "rewards": rew.astype(np.float32),
        "terminals": terminals.astype(bool),
        "episode_ends": episode_ends.astype(bool),
    }


def qlearning_dataset(raw: Mapping[str, np.ndarray], source: str = "dataset") -> dict[str, np.ndarray]:
    """``d4rl.qlearning_dataset`` (default ``terminate_on_end=False``), vectorised.

    Like d4rl, transition i is ``(obs[i], act[i], rew[i], obs[i+1], terminals[i])`` for
    i < N-1: the stored ``next_observations`` are *not* used (d4rl ignores them), the
    final row is dropped (no row i+1), and every row whose ``timeouts`` flag is set is
    dropped (its row i+1 starts a new episode, so there is no valid next state), even if
    it is also terminal. After a terminal row, ``obs[i+1]`` is the next episode's first
    state; the terminal flag cuts the bootstrap, so that is harmless.

    Extra key ``episode_ends (M,)``: True where the kept transition is the last kept one
    of its trajectory: it is terminal, or row i+1 is dropped (a timeout, or the final
    row). Segments between ends are the trajectories whose returns IQL's reward scaling
    uses.
    """
    timeouts = np.asarray(raw["timeouts"]).astype(bool)
    terminals = np.asarray(raw["terminals"]).astype(bool)
    n = len(timeouts)
    if n < 2 or timeouts[:-1].all():
        raise DatasetError(
            f"{source}: no transitions left after dropping the final row and timeout rows (N={n})"
        )
    keep = ~timeouts[:-1]
    next_dropped = np.append(timeouts[1:-1], True)  # row i+1 is a timeout or the final row
    ends = terminals[:-1] | next_dropped
    obs = np.asarray(raw["observations"])
    return as_transitions(
        obs[:-1][keep],
        np.asarray(raw["actions"])[:-1][keep],
        np.asarray(raw["rewards"])[:-1][keep],
        obs[1:][keep],
        terminals[:-1][keep],
        ends[keep],
    )


def read_d4rl(path_or_name: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a D4RL-format file with ``qlearning_dataset`` semantics (see there).

    Returns observations ``(M, ds)``, actions ``(M, da)`` float32 (int64 ``(M,)`` for
    discrete data), next_observations ``(M, ds)``, rewards ``(M,)`` float32, terminals
    ``(M,)`` bool and episode_ends ``(M,)`` bool.
    """
    path = resolve_dataset_path(path_or_name)
    raw, _ = load_d4rl_raw(path)
    return qlearning_dataset(raw, str(path))


# ------------------------------------------------------------------------- writing


def _write_metadata(f: h5py.File, metadata: Mapping[str, Any]) -> None:
    for key, value in metadata.items():
        if value is None:
            continue
        if isinstance(value, str):
            f.create_dataset(f"metadata/{key}", data=value, dtype=h5py.string_dtype("utf-8"))
        else:
            f.create_dataset(f"metadata/{key}", data=np.asarray(value))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_d4rl(
    path: str | os.PathLike,
    arrays: Mapping[str, np.ndarray],
    metadata: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Write ``arrays`` (the keys of the module docstring; ``timeouts`` defaults to all
    False) and ``metadata`` (``metadata/<key>`` datasets) as a D4RL-format file.

    The input is validated like a file being read. The file is written to a temporary
    name in the target directory and moved into place with ``os.replace``, so a crash
    never leaves a half-written file and readers never see one. Parent directories are
    created; the caller's arrays are not modified (h5py copies them).
    """
    path = pathlib.Path(path).expanduser()
    source = f"write_d4rl(arrays) for {path}"
    arrays = {k: np.asarray(v) for k, v in arrays.items() if v is not None}
    unknown = sorted(set(arrays) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise DatasetError(
            f"{source}: unknown key(s) {unknown} (expected {sorted({**REQUIRED_KEYS, **OPTIONAL_KEYS})})"
        )
    validate_arrays(arrays, source)
    arrays.setdefault("timeouts", np.zeros(len(arrays["rewards"]), dtype=bool))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise DatasetError(f"{path}: cannot write the file ({_os_reason(e)}; expected a writable "
                           f"directory {path.parent})") from None
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            for key, value in arrays.items():
                f.create_dataset(key, data=value.astype(bool) if key in ("terminals", "timeouts") else value)
            _write_metadata(f, metadata or {})
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    except BaseException as e:
        pathlib.Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full disk, or `path` an existing directory
            raise DatasetError(f"{path}: cannot write the file ({_os_reason(e)})") from None
        raise
    return path
