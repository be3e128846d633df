"""Build D4RL-format datasets by rolling a policy in a gymnasium environment.

Datasets cannot be downloaded on machines without internet (docs/design.md section 6),
so the package builds its own, as D4RL did: a random policy, a callable, or a policy
trained by one of the package's algorithms (rebuilt from its checkpoint).
"""
from __future__ import annotations

import importlib
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from lightning.pytorch import LightningModule

import lit_qlearn.algorithms as algorithms
from lit_qlearn.data.checkpoint import CheckpointError, read_checkpoint
from lit_qlearn.data.d4rl import DatasetError, check_output_dir, check_output_path, one_line, write_d4rl
from lit_qlearn.data.names import DATA_DIR_HINT, REF_SCORES, data_dir, env_family
from lit_qlearn.data.rollout import Rollout, make_vector_env

__all__ = ["Policy", "load_policy", "policy_classes", "collect"]

Policy = Callable[[np.ndarray], np.ndarray]


# ------------------------------------------------------------------------- policies


def policy_classes() -> dict[str, type]:
    """The classes a checkpoint's ``lit_qlearn_class`` may name for :func:`collect` to
    rebuild: lit_qlearn's own algorithms (the names :mod:`lit_qlearn.algorithms` exports),
    under both of their dotted paths (``lit_qlearn.algorithms.TD3``, ``lit_qlearn.algorithms.td3.TD3``)."""
    classes: dict[str, type] = {}
    for name in algorithms.__all__:
        cls = getattr(algorithms, name)
        classes[f"lit_qlearn.algorithms.{name}"] = classes[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return classes


def _class_named(spec: str | type) -> type:
    """The class a user names (a class, or ``"package.module:Class"``): importing it is the
    user's choice, made on the command line or in code, never a file's."""
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
        check_output_dir(data_dir(), create=True, hint=DATA_DIR_HINT)
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
        "generator": "lit_qlearn.datasets.collect",
    }
    if description == "random" and returns:
        metadata["ref_min_score"] = mean_return
        family = env_family(env_id)
        if family is not None:
            metadata["ref_max_score"] = REF_SCORES[family][1]
    metadata.update(extra or {})
    if path is None:
        kind = description.split(":")[0]
        path = data_dir() / f"{env_id.replace('/', '_')}-{kind}-s{seed}.hdf5"
    arrays = {
        "observations": observations,
        "actions": actions,
        "rewards": rewards.astype(np.float32),
        "terminals": terminals,
        "timeouts": timeouts,
        "next_observations": next_observations,
    }
    return write_d4rl(path, arrays, metadata)
