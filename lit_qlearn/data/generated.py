"""D4RL-style datasets that lit_qlearn makes itself, from behaviour policies it trained
itself with SAC (DESIGN.md section 6): nothing is downloaded.

``hopper-{random,medium,expert,medium-expert}-v5``: ``random`` rolls uniform actions,
``medium`` / ``expert`` the shipped SAC actors (deterministic, ``tanh(mean)``),
``medium-expert`` is the two concatenated, as D4RL's. The actors live in
``lit_qlearn/policies/<family>-v5-sac.pt`` with the command that trained them, their
measured returns and the random policy's; those two returns are the datasets' reference
scores for the normalised score (``ref_min_score`` = random, ``ref_max_score`` = expert).
``medium-replay`` (the training run's own buffer) is not made: it would need the SAC run
rerun up to the medium policy.
"""
from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lit_qlearn.data.collect import _data_dir, collect
from lit_qlearn.data.d4rl import DatasetError, load_d4rl_raw, read_d4rl_metadata, resolve_dataset_path, write_d4rl
from lit_qlearn.data.types import DataSpec

__all__ = ["LEVELS", "dataset_names", "parse_name", "make_dataset", "ensure_dataset", "resolve", "shipped_actor",
           "write_policy_file", "policy_dir"]

LEVELS = ("random", "medium", "expert", "medium-expert")
ENV_IDS = {"hopper": "Hopper-v5"}
_NAME = re.compile(r"^(?P<family>[a-z0-9]+)-(?P<level>random|medium-expert|medium|expert)-v5$")


def policy_dir() -> pathlib.Path:
    """``$LIT_QLEARN_POLICY_DIR``, else the policies shipped inside the package."""
    return pathlib.Path(os.environ.get("LIT_QLEARN_POLICY_DIR") or pathlib.Path(__file__).parent.parent / "policies")


def dataset_names() -> list[str]:
    """Every dataset :func:`make_dataset` can make here (families with a shipped policy)."""
    families = [f for f in ENV_IDS if (policy_dir() / f"{f}-v5-sac.pt").is_file()]
    return [f"{f}-{level}-v5" for f in families for level in LEVELS]


def parse_name(name: str) -> tuple[str, str] | None:
    """``(family, level)`` of a generated dataset name such as ``hopper-medium-v5``, else None."""
    match = _NAME.match(os.fspath(name))
    return (match["family"], match["level"]) if match and match["family"] in ENV_IDS else None


def _policy_file(family: str) -> dict[str, Any]:
    path = policy_dir() / f"{family}-v5-sac.pt"
    if not path.is_file():
        raise DatasetError(f"{path}: no shipped SAC policy for {family!r} (made by benchmarks/sac_hopper.py, "
                           "then write_policy_file)")
    return torch.load(path, map_location="cpu", weights_only=True)


def shipped_actor(family: str, level: str) -> Callable[[np.ndarray], np.ndarray]:
    """The shipped ``level`` ("medium" or "expert") actor of ``family`` as a deterministic
    policy ``obs (ds,) -> action (da,)`` on raw observations."""
    entry = _policy_file(family)
    if level not in ("medium", "expert") or entry.get(level) is None:
        raise DatasetError(f"{family}-v5-sac.pt holds no {level!r} actor (it has medium and expert)")
    act = _deterministic_actor(entry, level)
    act.__qualname__ = f"{family}-{level}-sac"
    return act


def _deterministic_actor(entry: dict[str, Any], level: str) -> Callable[[np.ndarray], np.ndarray]:
    """The actor ``entry[level]`` of a policy file as ``obs -> tanh(mean)`` scaled to the bounds."""
    from lit_qlearn.networks import SquashedGaussianActor

    spec = DataSpec.from_dict(entry["spec"])
    actor = SquashedGaussianActor(spec.obs_dim, spec.action_dim, spec.action_low, spec.action_high,
                                  **entry["actor_options"])
    actor.load_state_dict(entry[level]["state_dict"])
    actor.eval()

    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return actor(torch.as_tensor(obs, dtype=torch.float32)).numpy()

    return act


def make_dataset(name: str, steps: int = 1_000_000, path: str | os.PathLike | None = None, seed: int = 0,
                 progress: Callable[[int], Any] | None = None) -> pathlib.Path:
    """Write the generated dataset ``name`` (D4RL format) with ``steps`` environment steps
    (``medium-expert``: ``steps`` of each) to ``path`` (default: the data directory,
    ``<name>.hdf5``); metadata: the policy, its measured return, the seed, the steps,
    the package version, the reference scores. Returns the path."""
    parsed = parse_name(name)
    if parsed is None:
        raise DatasetError(f"dataset {name!r} is not one lit_qlearn makes; these are: {', '.join(dataset_names())}")
    family, level = parsed
    from lit_qlearn import __version__

    entry = _policy_file(family)
    path = pathlib.Path(path) if path is not None else _data_dir() / f"{name}.hdf5"
    common = {"dataset": name, "lit_qlearn_version": __version__, "ref_min_score": entry["random_return"],
              "ref_max_score": entry["expert"]["return"], "policy_command": entry["command"]}
    env_id = ENV_IDS[family]
    if level == "random":
        return collect(env_id, "random", steps, path, seed, progress=progress, metadata=common)
    if level in ("medium", "expert"):
        return collect(env_id, shipped_actor(family, level), steps, path, seed, progress=progress,
                       metadata=common | {"policy_return": entry[level]["return"],
                                          "policy_env_steps": entry[level]["env_steps"]})
    parts = [make_dataset(f"{family}-{part}-v5", steps, path.with_name(f"{path.stem}.{part}.hdf5"), seed + k,
                          progress) for k, part in enumerate(("medium", "expert"))]
    raws = [load_d4rl_raw(p)[0] for p in parts]
    arrays = {key: np.concatenate([raw[key] for raw in raws]) for key in
              ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")}
    written = write_d4rl(path, arrays, read_d4rl_metadata(parts[0]) | common | {"policy": "medium+expert",
                                                                                "steps": 2 * steps})
    for p in parts:
        p.unlink()
    return written


def total_steps(name: str, steps: int = 1_000_000) -> int:
    """Environment steps :func:`make_dataset` takes for ``name`` (medium-expert rolls both)."""
    parsed = parse_name(name)
    return steps * (2 if parsed is not None and parsed[1] == "medium-expert" else 1)


def ensure_dataset(name: str) -> pathlib.Path:
    """The cached file of a generated dataset, made on first use (1M steps, with a progress bar)."""
    path = _data_dir() / f"{name}.hdf5"
    if not path.is_file():
        from tqdm.auto import tqdm

        with tqdm(total=total_steps(name), desc=name, unit="step") as bar:
            make_dataset(name, path=path, progress=bar.update)
    return path


def resolve(name: str | os.PathLike) -> pathlib.Path:
    """A D4RL file path or name (:func:`~lit_qlearn.data.d4rl.resolve_dataset_path`); a
    generated dataset's name that is not on disk yet is made and cached first."""
    try:
        return resolve_dataset_path(name)
    except DatasetError:
        if parse_name(os.fspath(name)) is None:
            raise
        return ensure_dataset(os.fspath(name))


def write_policy_file(actors_path: str | os.PathLike, family: str = "hopper", episodes: int = 10) -> pathlib.Path:
    """Turn the actors a SAC run kept (``benchmarks/sac_hopper.py``'s ``sac_hopper_actors.pt``)
    into the shipped ``<family>-v5-sac.pt``: the medium and final ("expert") actors with
    their returns and the random policy's, measured here over ``episodes`` episodes."""
    from lit_qlearn.data.rollout import make_vector_env, run_episodes

    kept = torch.load(actors_path, map_location="cpu", weights_only=True)
    env_id = ENV_IDS[family]
    entry: dict[str, Any] = {"command": kept["command"], "env_id": env_id, "spec": kept["spec"],
                             # SAC's default actor, the one benchmarks/sac_hopper.py trains
                             "actor_options": {"hidden": [256, 256], "activation": "relu"}}
    env = make_vector_env(env_id)
    for level, key in (("medium", "medium"), ("expert", "final")):
        entry[level] = {"env_steps": kept[key]["env_steps"], "state_dict": kept[key]["state_dict"]}
        act = _deterministic_actor(entry, level)
        entry[level]["return"] = float(np.mean(run_episodes(env, act, episodes, seed=0)[0]))
    entry["random_return"] = float(np.mean(run_episodes(env, None, episodes, seed=0)[0]))
    target = policy_dir() / f"{family}-v5-sac.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(entry, target)
    return target
