"""What the data layer knows by name, and where each named dataset lives.

D4RL's normalised-score reference returns; the data directory and the default dataset's
file; the datasets lit_qlearn makes itself (``{hopper,halfcheetah,walker2d}-{random,
medium,medium-replay,expert,medium-expert}-v5``, docs/design.md section 6). Nothing here
makes data, that is :mod:`lit_qlearn.datasets`' job: :func:`resolve` returns a file that
is on disk or raises a one-line :class:`DatasetError` naming the command that makes it.
"""
from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from lit_qlearn.data.d4rl import DatasetError, looks_like_path, resolve_dataset_path

__all__ = [
    "REF_SCORES", "D4RL_ENV_IDS", "env_family", "reference_scores", "normalized_score",
    "DATA_DIR_HINT", "data_dir", "default_dataset_path",
    "LEVELS", "ENV_IDS", "parse_name", "policy_dir", "dataset_names", "dataset_path", "how_to_make", "resolve",
]

# D4RL's published reference returns (d4rl/infos.py REF_MIN_SCORE / REF_MAX_SCORE,
# identical for every dataset of a family): (random policy, expert policy).
REF_SCORES: dict[str, tuple[float, float]] = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}
# The gymnasium environment a D4RL locomotion family is evaluated in here. The v5
# envs keep the v2 observation layout for hopper / halfcheetah / walker2d; Ant-v5
# has 105 dims where D4RL's ant has 111, which the env check reports.
D4RL_ENV_IDS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5", "ant": "Ant-v5"}


def env_family(name: str | os.PathLike | None) -> str | None:
    """The D4RL family in a dataset name, env id or file name (``Hopper-v5``,
    ``hopper-medium-v2``, ``hopper_medium-v2.hdf5``, ``mujoco/hopper/expert-v0``):
    the first ``-``/``_``/``/``-separated token that is a key of :data:`REF_SCORES`,
    else None (so ``antmaze-umaze-v2`` is not ``ant``)."""
    if name is None:
        return None
    tokens = re.split(r"[-_/.\s]+", os.fspath(name).lower())
    return next((t for t in tokens if t in REF_SCORES), None)


def reference_scores(
    env_id_or_name: str | os.PathLike | None, metadata: Mapping[str, Any] | None = None
) -> tuple[float, float] | None:
    """``(ref_min, ref_max)`` returns for the normalised score
    ``100 * (return - ref_min) / (ref_max - ref_min)``.

    ``metadata['ref_min_score']`` / ``['ref_max_score']`` (as a file stores them) win;
    a missing one comes from the D4RL family table; None if either is still unknown.
    Random-policy datasets made by :func:`lit_qlearn.datasets.collect` store the measured
    mean return of the random policy as ``ref_min_score`` and D4RL's expert reference of
    the family as ``ref_max_score``.
    """
    metadata = metadata or {}
    table = REF_SCORES.get(env_family(env_id_or_name) or "", (None, None))
    lo = metadata.get("ref_min_score", table[0])
    hi = metadata.get("ref_max_score", table[1])
    if lo is None or hi is None:
        return None
    return float(lo), float(hi)


def normalized_score(returns: float | np.ndarray, ref: tuple[float, float]) -> float | np.ndarray:
    """D4RL's normalised score, ``100 * (return - ref_min) / (ref_max - ref_min)``."""
    lo, hi = ref
    return 100.0 * (np.asarray(returns, dtype=np.float64) - lo) / (hi - lo)


# ------------------------------------------------------------------- where data lives

DATA_DIR_HINT = "set LIT_QLEARN_DATA_DIR to a writable data directory"


def data_dir() -> pathlib.Path:
    """``$LIT_QLEARN_DATA_DIR``, else ``~/.cache/lit_qlearn/datasets``: where the datasets
    lit_qlearn makes are kept."""
    return pathlib.Path(os.environ.get("LIT_QLEARN_DATA_DIR") or "~/.cache/lit_qlearn/datasets").expanduser()


def default_dataset_path() -> pathlib.Path:
    """``<data dir>/default-hopper-medium-v5-100k.hdf5``: the ``"default"`` dataset (100k
    steps of the shipped medium SAC policy in Hopper-v5) that ``lit-qlearn demo`` trains on."""
    return data_dir() / "default-hopper-medium-v5-100k.hdf5"


# ------------------------------------------------------------ the generated datasets

LEVELS = ("random", "medium", "medium-replay", "expert", "medium-expert")
ENV_IDS = {family: D4RL_ENV_IDS[family] for family in ("hopper", "halfcheetah", "walker2d")}
_NAME = re.compile(r"^(?P<family>[a-z0-9]+)-(?P<level>random|medium-expert|medium-replay|medium|expert)-v5$")


def parse_name(name: str | os.PathLike) -> tuple[str, str] | None:
    """``(family, level)`` of a generated dataset name such as ``hopper-medium-v5``, else None."""
    match = _NAME.match(os.fspath(name))
    return (match["family"], match["level"]) if match and match["family"] in ENV_IDS else None


def policy_dir() -> pathlib.Path:
    """``$LIT_QLEARN_POLICY_DIR``, else the policies shipped inside the package (one
    ``<family>-v5-sac.pt`` per family: the behaviour policies the datasets are rolled from)."""
    return pathlib.Path(os.environ.get("LIT_QLEARN_POLICY_DIR") or pathlib.Path(__file__).parent.parent / "policies")


def dataset_names() -> list[str]:
    """Every generated dataset that can be made here (the families with a shipped policy)."""
    families = [f for f in ENV_IDS if (policy_dir() / f"{f}-v5-sac.pt").is_file()]
    return [f"{f}-{level}-v5" for f in families for level in LEVELS]


def dataset_path(name: str) -> pathlib.Path:
    """Where the generated dataset ``name`` is kept: ``<data dir>/<name>.hdf5``."""
    return data_dir() / f"{name}.hdf5"


def how_to_make(name: str) -> str:
    """The command (and the Python call) that makes ``"default"`` or a generated dataset."""
    if name == "default":
        return ("make it with `lit-qlearn datasets make default` "
                "(Python: lit_qlearn.datasets.ensure_default_dataset())")
    parsed = parse_name(name)
    if parsed is not None and parsed[1] == "medium-replay":
        # the SAC run's own replay buffer: it exists only by rerunning (or redoing) that training
        return (f"it is the replay buffer of the SAC run that trained the {parsed[0]} policies: "
                f"`lit-qlearn datasets make {name}` reruns that run up to its medium policy "
                f"(Python: lit_qlearn.datasets.make_dataset({name!r})), "
                f"`lit-qlearn datasets train {parsed[0]}` trains new policies and writes it too")
    return f"make it with `lit-qlearn datasets make {name}` (Python: lit_qlearn.datasets.make_dataset({name!r}))"


def resolve(name: str | os.PathLike) -> pathlib.Path:
    """The file of a dataset argument, which must be on disk: ``"default"``
    (:func:`default_dataset_path`), a generated name (``hopper-medium-v5``:
    :func:`dataset_path`), a D4RL file path or name
    (:func:`~lit_qlearn.data.d4rl.resolve_dataset_path`). Otherwise a one-line
    :class:`DatasetError`: for a generated name, the file looked for and the command that
    makes it (:func:`how_to_make`); for a bare name found nowhere, the names lit_qlearn makes."""
    text = os.fspath(name)
    if text == "default":
        path = default_dataset_path()
        if path.is_file():
            return path
        raise DatasetError(f"{path}: the default dataset is not made yet; {how_to_make(text)}")
    try:
        return resolve_dataset_path(name)
    except DatasetError as e:
        if parse_name(text) is not None:
            path = dataset_path(text)
            if path.is_file():
                return path
            raise DatasetError(f"{path}: dataset {text!r} is not made yet; {how_to_make(text)}") from None
        if looks_like_path(text) or pathlib.Path(text).exists():
            raise  # a path the user typed: the message already names it
        # D4RL's downloads cannot exist on a machine without internet: say what can
        ours = dataset_names()
        counterpart = re.sub(r"-v\d+$", "-v5", text.removesuffix(".hdf5"))  # hopper-medium-v2 -> -v5
        alike = f" ({counterpart!r} is lit_qlearn's own counterpart)" if counterpart in ours else ""
        raise DatasetError(f"{e}; or a dataset lit_qlearn makes (`lit-qlearn datasets make NAME`){alike}: "
                           f"{', '.join(['default', *ours])}") from None
