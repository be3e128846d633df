"""D4RL-style datasets that lit_qlearn makes itself, from behaviour policies it trained
itself with SAC (docs/design.md section 6): nothing is downloaded.

``{hopper,halfcheetah,walker2d}-{random,medium,medium-replay,expert,medium-expert}-v5``:
``random`` rolls uniform actions, ``medium`` / ``expert`` the shipped SAC actors
(deterministic, ``tanh(mean)``), ``medium-expert`` is the two concatenated, as D4RL's,
and ``medium-replay`` is the SAC run's own replay buffer up to the medium policy (every
transition it trained on, the random warm-up included), remade by rerunning that run
with its recorded settings (:func:`lit_qlearn.datasets.behaviour.train_sac`, bit for bit
on a CPU; the file records whether the rerun reproduced the shipped medium actor).
``"default"`` is ``hopper-medium-v5`` at a tenth of its size
(:func:`ensure_default_dataset`).

The actors live in ``lit_qlearn/policies/<family>-v5-sac.pt`` with the command that
trained them (``lit-qlearn datasets train FAMILY``), the run's settings and learning
curve, their measured returns and the random policy's; those two returns are the
datasets' reference scores for the normalised score (``ref_min_score`` = random,
``ref_max_score`` = expert). The names, paths and reference scores are
:mod:`lit_qlearn.data.names`' (reading needs them, making is here).
"""
from __future__ import annotations

import os
import pathlib
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_qlearn import __version__
from lit_qlearn.data.d4rl import DatasetError, check_output_path, load_d4rl_raw, read_d4rl_metadata, write_d4rl
from lit_qlearn.data.names import (DATA_DIR_HINT, ENV_IDS, data_dir, dataset_names, dataset_path, default_dataset_path,
                                   parse_name, policy_dir)
from lit_qlearn.data.rollout import make_vector_env, run_episodes
from lit_qlearn.data.types import DataSpec
from lit_qlearn.datasets.behaviour import BehaviourRun, replay_arrays, train_sac
from lit_qlearn.datasets.collect import collect
from lit_qlearn.networks import SquashedGaussianActor

# dataset_names is lit_qlearn.data.names' (reading lists what can be made), re-exported with the makers
__all__ = ["DEFAULT_NAME", "DEFAULT_STEPS", "dataset_names", "check_request", "make_dataset", "ensure_dataset",
           "ensure_default_dataset", "shipped_actor", "check_train", "train_policy", "write_policy_file",
           "write_replay", "total_steps"]

# "default": the shipped medium Hopper actor, rolled for a tenth of D4RL's million steps
DEFAULT_NAME, DEFAULT_STEPS = "hopper-medium-v5", 100_000


def _target(name: str, steps: int | None, path: str | os.PathLike | None
            ) -> tuple[str, int | None, pathlib.Path]:
    """``(generated name, steps, output path)`` of a request: ``"default"`` is
    :data:`DEFAULT_NAME` with :data:`DEFAULT_STEPS` steps (unless ``steps``) at
    :func:`~lit_qlearn.data.names.default_dataset_path`; any other name is written to
    :func:`~lit_qlearn.data.names.dataset_path` unless ``path``."""
    if name == "default":
        name, steps = DEFAULT_NAME, DEFAULT_STEPS if steps is None else steps
        return name, steps, pathlib.Path(path).expanduser() if path is not None else default_dataset_path()
    return name, steps, pathlib.Path(path).expanduser() if path is not None else dataset_path(name)


def check_request(name: str, steps: int | None = None, seed: int | None = None,
                  path: str | os.PathLike | None = None) -> pathlib.Path:
    """Everything :func:`make_dataset` needs before its first environment step, checked in
    milliseconds: a name it makes, the family's policy file, options that apply, and an
    output path a file can be written to (the package's data directory is created if
    absent; a directory the user named is not). Returns that path; raises :class:`DatasetError`."""
    name, steps, path = _target(name, steps, path)
    parsed = parse_name(name)
    if parsed is None:
        raise DatasetError(f"dataset {name!r} is not one lit_qlearn makes; these are: {', '.join(dataset_names())}")
    family, level = parsed
    entry = _policy_file(family)
    if level == "medium-replay":
        for option, value in (("steps", steps), ("seed", seed)):
            if value is not None:
                raise DatasetError(f"{name}: --{option} does not apply: medium-replay is the SAC run's own buffer "
                                   f"(up to its medium step {entry['medium']['env_steps']}, training seed "
                                   f"{entry.get('train', {}).get('seed')})")
    elif steps is not None and (isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2):
        raise DatasetError(f"{name}: steps must be an integer >= 2 (one transition), got {steps!r}")
    own = os.path.abspath(path.parent) == os.path.abspath(data_dir())
    return check_output_path(path, create_dir=own, hint=DATA_DIR_HINT if own else "")


def _policy_file(family: str) -> dict[str, Any]:
    path = policy_dir() / f"{family}-v5-sac.pt"
    if not path.is_file():
        raise DatasetError(f"{path}: no shipped SAC policy for {family!r} (`lit-qlearn datasets train {family}` "
                           "makes one)")
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
    spec = DataSpec.from_dict(entry["spec"])
    actor = SquashedGaussianActor(spec.obs_dim, spec.action_dim, spec.action_low, spec.action_high,
                                  **entry["actor_options"])
    actor.load_state_dict(entry[level]["state_dict"])
    actor.eval()

    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return actor(torch.as_tensor(obs, dtype=torch.float32)).numpy()

    return act


def make_dataset(name: str, steps: int | None = None, path: str | os.PathLike | None = None,
                 seed: int | None = None, progress: Callable[[int], Any] | None = None) -> pathlib.Path:
    """Write the generated dataset ``name`` (D4RL format) to ``path`` (default: the data
    directory, ``<name>.hdf5``; ``"default"``: :func:`~lit_qlearn.data.names.default_dataset_path`)
    and return the path: ``lit-qlearn datasets make NAME``.

    ``steps``: environment steps rolled (default 1M, as D4RL; ``medium-expert``: of
    each; ``"default"``: :data:`DEFAULT_STEPS`); ``seed``: the rollout's (default 0).
    ``medium-replay`` takes neither: its size is the run's medium step and its seed the
    run's recorded one. Metadata: the policy, its measured return and environment steps,
    the seed, the steps, the package version, the reference scores, the command that
    trained the policy. Every input is checked before the first step (:func:`check_request`)."""
    path = check_request(name, steps, seed, path)
    name, steps, _ = _target(name, steps, path)
    family, level = parse_name(name)
    entry = _policy_file(family)
    common = _metadata(name, entry)
    env_id = ENV_IDS[family]
    if level == "medium-replay":
        return _medium_replay(name, entry, path, progress, common)
    steps = 1_000_000 if steps is None else steps
    seed = 0 if seed is None else seed
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


def _metadata(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """What every generated file records about its policy file."""
    return {"dataset": name, "lit_qlearn_version": __version__, "ref_min_score": entry["random_return"],
            "ref_max_score": entry["expert"]["return"], "policy_command": entry["command"]}


def _medium_replay(name: str, entry: dict[str, Any], path: pathlib.Path, progress: Callable[[int], Any] | None,
                   common: dict[str, Any]) -> pathlib.Path:
    """Rerun the recorded SAC run up to the medium policy and write its replay buffer."""
    train = entry.get("train")
    if not train:
        raise DatasetError(f"{name}: the shipped policy file records no training settings to rerun")
    medium = entry["medium"]["env_steps"]
    run = train_sac(**(train | {"steps": medium}), progress=progress)
    return write_replay(path, run, medium, entry, common)


def write_replay(path: pathlib.Path, run: BehaviourRun, rows: int, entry: dict[str, Any], common: dict[str, Any]
                 ) -> pathlib.Path:
    """``medium-replay``: the first ``rows`` rows of ``run``'s buffer as a D4RL file;
    ``reproduces_shipped_medium`` says whether ``run``'s actor at ``rows`` equals the
    shipped medium actor bit for bit (a warning if not: the data is then the replay of an
    equivalent run, not of the one that made the shipped policy)."""
    shipped = entry["medium"]["state_dict"]
    actor = run.actors.get(rows, {})
    same = set(actor) == set(shipped) and all(torch.equal(actor[k], v) for k, v in shipped.items())
    if not same:
        warnings.warn(f"{path.name}: the rerun's actor at step {rows} differs from the shipped medium actor "
                      "(another torch / MuJoCo build?); the file holds the rerun's replay buffer", stacklevel=2)
    arrays = replay_arrays(run.buffer, rows)
    ends = arrays["terminals"] | arrays["timeouts"]
    metadata = common | {"env_id": run.settings["env_id"], "policy": "sac replay buffer up to the medium policy",
                         "seed": run.settings["seed"], "steps": rows, "num_episodes": int(ends.sum()),
                         "policy_return": entry["medium"]["return"], "policy_env_steps": rows,
                         "reproduces_shipped_medium": bool(same), "generator": "lit_qlearn.datasets.behaviour"}
    return write_d4rl(path, arrays, metadata)


def total_steps(name: str, steps: int | None = None) -> int:
    """Environment steps :func:`make_dataset` takes for ``name`` (medium-expert rolls both,
    medium-replay reruns SAC up to the medium policy)."""
    name, steps, _ = _target(name, steps, None)
    parsed = parse_name(name)
    if parsed is not None and parsed[1] == "medium-replay":
        return int(_policy_file(parsed[0])["medium"]["env_steps"])
    steps = 1_000_000 if steps is None else steps
    return steps * (2 if parsed is not None and parsed[1] == "medium-expert" else 1)


def ensure_dataset(name: str, path: str | os.PathLike | None = None, steps: int | None = None,
                   seed: int | None = None, progress: Callable[[int], Any] | None = None) -> pathlib.Path:
    """The file of the generated dataset ``name`` (or ``"default"``; by default where
    :func:`~lit_qlearn.data.names.resolve` looks for it), made by :func:`make_dataset`
    if absent, with a progress bar unless ``progress`` is given. An existing file is
    reused whatever its size (so a read-only directory that holds it is fine); a missing
    one is checked makeable and writable (:func:`check_request`) before the bar is drawn."""
    path = _target(name, steps, path)[2]
    if not path.is_file():
        from tqdm.auto import tqdm  # here, not at the top: only a missing file draws a bar

        check_request(name, steps, seed, path)  # before the bar: a bad name or directory costs no work
        with tqdm(total=total_steps(name, steps), desc=name, unit="step") if progress is None else nullcontext() as bar:
            make_dataset(name, steps, path, seed, progress=progress or bar.update)
    return path


def ensure_default_dataset(steps: int = DEFAULT_STEPS, seed: int = 0,
                           progress: Callable[[int], Any] | None = None) -> pathlib.Path:
    """:func:`~lit_qlearn.data.names.default_dataset_path`, first made if absent
    (``lit-qlearn datasets make default``): ``steps`` steps of the shipped medium SAC actor
    in Hopper-v5 (``make_dataset("hopper-medium-v5", steps, ...)``, D4RL's medium data at
    a tenth of its size), with a progress bar unless ``progress`` is given. An existing
    file is reused whatever its size."""
    path = default_dataset_path()
    if not path.is_file():
        check_request("default", steps, seed, path)  # a data directory that cannot take it: say so first
        rank_zero_info(f"lit_qlearn: generating the default dataset ({steps} Hopper-v5 steps of the shipped medium "
                       f"SAC policy) at {path}")
    return ensure_dataset("default", path, steps, seed, progress)


def train_policy(family: str, steps: int = 300_000, seed: int = 0, *, return_episodes: int = 10,
                 on_eval: Callable[[BehaviourRun], Any] | None = None, progress: Callable[[int], Any] | None = None,
                 **options: Any) -> pathlib.Path:
    """``lit-qlearn datasets train FAMILY``: train SAC on the family's environment
    (:func:`lit_qlearn.datasets.behaviour.train_sac` with ``options``), write the policy
    file (:func:`write_policy_file`, returns measured over ``return_episodes`` episodes)
    and the run's ``medium-replay`` dataset into the data directory (so it need not be
    rerun here). Returns the policy file. Both outputs are checked writable before
    training (:func:`check_train`)."""
    _, replay = check_train(family)
    run = train_sac(ENV_IDS[family], steps, seed, on_eval=on_eval, progress=progress, **options)
    command = f"lit-qlearn datasets train {family} --steps {steps} --seed {seed}"
    target = write_policy_file(run, family, return_episodes, command)
    entry = _policy_file(family)
    name = f"{family}-medium-replay-v5"
    write_replay(replay, run, entry["medium"]["env_steps"], entry, _metadata(name, entry))
    return target


def check_train(family: str) -> tuple[pathlib.Path, pathlib.Path]:
    """What :func:`train_policy` checks before its SAC run (hours of work): a known
    family, a writable policy directory (``$LIT_QLEARN_POLICY_DIR``; the default is
    inside the installed package) and data directory. Returns (policy file, replay file)."""
    if family not in ENV_IDS:
        raise DatasetError(f"no environment for family {family!r}; these are: {', '.join(ENV_IDS)}")
    policy = check_output_path(policy_dir() / f"{family}-v5-sac.pt", create_dir=True,
                               hint="set LIT_QLEARN_POLICY_DIR to a writable policy directory")
    replay = check_output_path(dataset_path(f"{family}-medium-replay-v5"), create_dir=True, hint=DATA_DIR_HINT)
    return policy, replay


def write_policy_file(run: BehaviourRun, family: str = "hopper", episodes: int = 10, command: str | None = None
                      ) -> pathlib.Path:
    """The shipped ``<family>-v5-sac.pt`` from a :class:`~lit_qlearn.datasets.behaviour.BehaviourRun`:
    the medium (:meth:`~lit_qlearn.datasets.behaviour.BehaviourRun.medium`) and final
    ("expert") actors with their returns and the random policy's, measured here over
    ``episodes`` episodes; the run's settings (to rerun it for ``medium-replay``), its
    learning curve and ``command``."""
    medium = run.medium()
    if medium is None:
        raise ValueError("write_policy_file: the run has fewer than two evaluations, so no medium policy")
    env_id = ENV_IDS[family]
    entry: dict[str, Any] = {"command": command or f"lit-qlearn datasets train {family}", "env_id": env_id,
                             "spec": run.spec, "train": run.settings, "curve": run.curve,
                             # SAC's default actor, the one train_sac trains
                             "actor_options": {"hidden": [256, 256], "activation": "relu"}}
    env = make_vector_env(env_id)
    for level, steps in (("medium", int(medium["env_steps"])), ("expert", int(run.curve[-1]["env_steps"]))):
        entry[level] = {"env_steps": steps, "state_dict": run.actors[steps]}
        act = _deterministic_actor(entry, level)
        entry[level]["return"] = float(np.mean(run_episodes(env, act, episodes, seed=0)[0]))
    entry["random_return"] = float(np.mean(run_episodes(env, None, episodes, seed=0)[0]))
    env.close()
    target = policy_dir() / f"{family}-v5-sac.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(entry, target)
    return target
