"""Build D4RL-format datasets by rolling a policy in a gymnasium environment.

Datasets cannot be downloaded on machines without internet (DESIGN.md section 6), so
the package builds its own, as D4RL did: random policy, or a policy trained by one of
the package's algorithms. Also the normalised-score reference returns.
"""
from __future__ import annotations

import importlib
import os
import pathlib
import re
from typing import Any, Callable, Mapping

import gymnasium as gym
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_qlearn.data.checkpoint import CheckpointError, read_checkpoint
from lit_qlearn.data.d4rl import DatasetError, check_output_dir, check_output_path, one_line, write_d4rl
from lit_qlearn.data.rollout import Rollout, make_env, make_vector_env

__all__ = [
    "REF_SCORES",
    "D4RL_ENV_IDS",
    "env_family",
    "reference_scores",
    "normalized_score",
    "make_env",
    "load_policy",
    "policy_classes",
    "collect",
    "default_dataset_path",
    "ensure_default_dataset",
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

Policy = Callable[[np.ndarray], np.ndarray]


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
    Random-policy datasets made by :func:`collect` store the measured mean return of
    the random policy as ``ref_min_score`` and D4RL's expert reference of the family
    as ``ref_max_score``.
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


# ------------------------------------------------------------------------- policies


def policy_classes() -> dict[str, type]:
    """The classes a checkpoint's ``lit_qlearn_class`` may name for :func:`collect` to
    rebuild: lit_qlearn's own algorithms (the names :mod:`lit_qlearn.algorithms` exports),
    under both of their dotted paths (``lit_qlearn.algorithms.TD3``, ``lit_qlearn.algorithms.td3.TD3``)."""
    import lit_qlearn.algorithms as algorithms

    classes: dict[str, type] = {}
    for name in algorithms.__all__:
        cls = getattr(algorithms, name)
        classes[f"lit_qlearn.algorithms.{name}"] = classes[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return classes


def _class_named(spec: str | type) -> type:
    """The class a user names (a class, or ``"package.module:Class"``): importing it is the
    user's choice, made on the command line or in code, never a file's."""
    from lightning.pytorch import LightningModule

    cls: Any = spec
    if isinstance(spec, str):
        module_name, _, class_name = spec.partition(":") if ":" in spec else spec.rpartition(".")
        if not module_name or not class_name:
            raise DatasetError(f"policy class {spec!r}: expected 'package.module:Class'")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as e:
            raise DatasetError(f"policy class {spec!r} cannot be imported ({type(e).__name__}: {one_line(e)})") from e
    if not (isinstance(cls, type) and issubclass(cls, LightningModule)):
        raise DatasetError(f"policy class {spec!r} is not a LightningModule class")
    return cls


def _policy_from_checkpoint(path: pathlib.Path, policy_class: str | type | None = None) -> Policy:
    """Protocol: the checkpoint dict has ``"lit_qlearn_class"``, the dotted path of one of
    lit_qlearn's algorithms (:func:`policy_classes`; any other class only when the user
    names it as ``policy_class``); ``cls.load_from_checkpoint`` rebuilds it and its
    ``act(obs_np) -> np.ndarray`` (which normalises states itself) is the policy."""
    ckpt = read_checkpoint(path)
    class_path = ckpt.get("lit_qlearn_class")
    if policy_class is not None:
        cls = _class_named(policy_class)
    elif not isinstance(class_path, str) or not class_path:
        raise DatasetError(
            f"{path}: checkpoint has no 'lit_qlearn_class' key (expected the dotted class path "
            f"of a lit_qlearn algorithm, e.g. 'lit_qlearn.algorithms.TD3'); name its class with --policy-class"
        )
    else:
        cls = policy_classes().get(class_path)
        if cls is None:
            # importing the module a file names would run that module's code: the file may
            # only choose among the package's own classes; anything else the user names
            module_name, _, class_name = class_path.rpartition(".")
            raise CheckpointError(
                f"{path}: its lit_qlearn_class {class_path!r} is not one of lit_qlearn's algorithms and was not "
                f"imported; if you trust that code, name it: --policy-class {module_name}:{class_name} "
                "(collect(policy_class=...) in Python)")
    try:
        module = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except CheckpointError:  # already one line naming the file
        raise
    except (RuntimeError, ValueError, TypeError, KeyError) as e:  # e.g. weights of another class
        raise DatasetError(f"{path}: {cls.__name__}.load_from_checkpoint failed "
                           f"({type(e).__name__}: {one_line(e)[:300]})") from e
    if not callable(getattr(module, "act", None)):
        raise DatasetError(f"{path}: {cls.__name__} has no act(obs) -> action method to collect with")
    module.eval()

    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.asarray(module.act(obs))

    return act


def load_policy(
    policy: str | os.PathLike | Policy, env: gym.Env, policy_class: str | type | None = None
) -> tuple[Policy, str]:
    """``(callable obs -> action, description)`` for ``"random"`` (the env's seeded
    action space), a callable, or a ``.ckpt`` path (rebuilt as ``policy_class`` if given,
    see :func:`_policy_from_checkpoint`)."""
    if callable(policy):
        return policy, f"callable:{getattr(policy, '__qualname__', type(policy).__name__)}"
    if policy == "random":
        return (lambda obs: env.action_space.sample()), "random"
    path = pathlib.Path(policy).expanduser()
    if path.suffix == ".ckpt" or path.is_file():
        if not path.is_file():
            raise DatasetError(f"policy checkpoint {path} not found")
        return _policy_from_checkpoint(path, policy_class), f"checkpoint:{path}"
    raise DatasetError(f"policy {os.fspath(policy)!r} is not 'random', a callable, or a .ckpt file")


# ----------------------------------------------------------------------- collection


def collect(
    env_id: str,
    policy: str | os.PathLike | Policy = "random",
    steps: int = 100_000,
    path: str | os.PathLike | None = None,
    seed: int = 0,
    max_episode_steps: int | None = None,
    progress: Callable[[int], Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    policy_class: str | type | None = None,
) -> pathlib.Path:
    """Roll ``policy`` in ``env_id`` for ``steps`` steps and write a D4RL-format file.

    ``progress``, if given, is called with the number of steps done since its last
    call (every 1000 steps and at the end), e.g. a ``tqdm`` bar's ``update``;
    ``metadata`` is merged into the file's (and wins).

    ``policy``: ``"random"``, a callable ``obs (ds,) float32 -> action (da,)``, or a path
    to a checkpoint of a lit_qlearn algorithm (see :func:`load_policy`; a checkpoint of
    another class needs ``policy_class``, the class or ``"package.module:Class"``, since a
    file may not choose the code it is rebuilt with). Seeded: the
    first ``env.reset(seed=seed)`` and ``env.action_space.seed(seed)``; later resets
    continue the env's RNG. Row i holds the state before step i.

    ``terminals`` = gymnasium's ``terminated``. ``timeouts`` = ``truncated and not
    terminated``: a step that is both keeps its terminal flag and its transition (the
    target needs no next state). The last row, cut by ``steps``, is marked as a timeout.
    Metadata: env_id, policy, seed, steps, max_episode_steps, num_episodes (completed),
    policy_mean_return (their mean return, NaN if none), and for the random policy
    ``ref_min_score`` = that mean and ``ref_max_score`` = D4RL's expert reference of the
    family (when the family is known). Returns the file path (default:
    ``<data dir>/<env_id>-<policy>-s<seed>.hdf5``). The output is checked before the
    first step: the data directory is created if absent, but a ``path`` in a directory
    that does not exist is an error (a typo should not become a new directory tree).
    """
    if steps < 2:
        raise DatasetError(f"steps must be >= 2 to give one transition, got {steps}")
    if path is not None:
        path = check_output_path(path)
    else:
        check_output_dir(_data_dir(), create=True, hint=DATA_DIR_HINT)
    limits = {"max_episode_steps": max_episode_steps} if max_episode_steps else {}
    envs = make_vector_env(env_id, 1, **limits)
    try:
        act, description = load_policy(policy, envs.envs[0], policy_class)
        space = envs.single_action_space
        rollout = Rollout(envs, seed=seed)
        rollout.reset()
        batch_act = None if description == "random" else (lambda obs: np.asarray(act(obs[0].copy()))[None])
        obs_dim = int(np.prod(envs.single_observation_space.shape))
        discrete = isinstance(space, gym.spaces.Discrete)
        observations = np.empty((steps, obs_dim), np.float32)
        next_observations = np.empty((steps, obs_dim), np.float32)
        actions = np.empty(steps, np.int64) if discrete else np.empty((steps, *space.shape), np.float32)
        rewards = np.empty(steps, np.float64)
        terminals = np.zeros(steps, bool)
        timeouts = np.zeros(steps, bool)
        for t in range(steps):
            step = rollout.step(batch_act)
            observations[t], next_observations[t] = np.ravel(step.obs[0]), np.ravel(step.next_obs[0])
            actions[t], rewards[t] = step.act[0], step.rew[0]
            terminals[t], timeouts[t] = step.terminated[0], step.truncated[0] and not step.terminated[0]
            if progress is not None and (t + 1) % 1000 == 0:
                progress(1000)
        if progress is not None and steps % 1000:
            progress(steps % 1000)
        returns = [r for r, _ in rollout.episodes]
        timeouts[-1] |= not terminals[-1]
        spec = envs.envs[0].spec
        limit = spec.max_episode_steps if spec is not None else None
    finally:
        envs.close()

    mean_return = float(np.mean(returns)) if returns else float("nan")
    extra, metadata = metadata, {
        "env_id": env_id,
        "policy": description,
        "seed": seed,
        "steps": steps,
        "max_episode_steps": limit,
        "num_episodes": len(returns),
        "policy_mean_return": mean_return,
        "generator": "lit_qlearn.data.collect",
    }
    if description == "random" and returns:
        metadata["ref_min_score"] = mean_return
        family = env_family(env_id)
        if family is not None:
            metadata["ref_max_score"] = REF_SCORES[family][1]
    metadata.update(extra or {})
    if path is None:
        kind = description.split(":")[0]
        path = _data_dir() / f"{env_id.replace('/', '_')}-{kind}-s{seed}.hdf5"
    arrays = {
        "observations": observations,
        "actions": actions,
        "rewards": rewards.astype(np.float32),
        "terminals": terminals,
        "timeouts": timeouts,
        "next_observations": next_observations,
    }
    return write_d4rl(path, arrays, metadata)


# ------------------------------------------------------------- the embedded default


DATA_DIR_HINT = "set LIT_QLEARN_DATA_DIR to a writable data directory"


def _data_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("LIT_QLEARN_DATA_DIR") or "~/.cache/lit_qlearn/datasets").expanduser()


def default_dataset_path() -> pathlib.Path:
    """``$LIT_QLEARN_DATA_DIR/default-hopper-medium-v5-100k.hdf5`` (default dir
    ``~/.cache/lit_qlearn/datasets``): the data ``lit-qlearn demo`` trains on."""
    return _data_dir() / "default-hopper-medium-v5-100k.hdf5"


def ensure_default_dataset(steps: int = 100_000, seed: int = 0,
                           progress: Callable[[int], Any] | None = None) -> pathlib.Path:
    """Return :func:`default_dataset_path`, first generating it if it is absent: ``steps``
    steps of the shipped medium SAC actor in Hopper-v5
    (``make_dataset("hopper-medium-v5", steps, ...)``, D4RL's medium data at a tenth of
    its size; about 30 s for 100k steps on one CPU core), with a progress bar unless
    ``progress`` is given. An existing file is reused whatever its size."""
    from lit_qlearn.data.generated import check_request, ensure_dataset

    path = default_dataset_path()
    if not path.is_file():
        check_request("hopper-medium-v5", steps, seed, path)  # a data directory that cannot take it: say so first
        rank_zero_info(f"lit_qlearn: generating the default dataset ({steps} Hopper-v5 steps of the shipped medium "
                       f"SAC policy) at {path}")
    return ensure_dataset("hopper-medium-v5", path, steps, seed, progress)
