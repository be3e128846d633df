"""Shared fixtures: a deterministic chain MDP whose Q-values are known in closed form."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# The test networks are small: one intra-op thread is faster than two, and a DDP test's two
# processes (or anything else on the machine) do not fight over the cores.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

CHAIN_STATES = 5


def chain_arrays(episodes: int = 200, states: int = CHAIN_STATES, seed: int = 0) -> dict[str, np.ndarray]:
    """Episodes s_0 -> s_1 -> ... -> s_{K-1} -> terminal, reward 1 per step, whatever the action.

    States are one-hot, actions uniform in [-1, 1] (so the critic sees the whole
    action range). For every policy Q(s_k, a) = (1 - gamma^(K-k)) / (1 - gamma).
    """
    rng = np.random.default_rng(seed)
    n = episodes * states
    obs = np.tile(np.eye(states, dtype=np.float32), (episodes, 1))
    terminals = np.tile(np.arange(states) == states - 1, episodes)
    return {
        "observations": obs,
        "actions": rng.uniform(-1, 1, size=(n, 1)).astype(np.float32),
        "rewards": np.ones(n, dtype=np.float32),
        "terminals": terminals,
        "timeouts": np.zeros(n, dtype=bool),
    }


def chain_q(gamma: float, states: int = CHAIN_STATES) -> np.ndarray:
    k = np.arange(states)
    return (1 - gamma ** (states - k)) / (1 - gamma)


@pytest.fixture
def chain_file(tmp_path):
    from lit_qlearn.data import write_d4rl

    return write_d4rl(tmp_path / "chain.hdf5", chain_arrays())


@pytest.fixture
def tiny_td3bc(chain_file):
    """Factory: a small TD3+BC module and a DataModule over the chain MDP."""
    from lit_qlearn.algorithms import TD3BC
    from lit_qlearn.data import OfflineDataModule

    def make(seed: int = 0, batch_size: int = 64, **kwargs):
        import lightning as L

        L.seed_everything(seed, verbose=False)
        dm = OfflineDataModule(str(chain_file), batch_size=batch_size, normalize_states=False, seed=seed,
                               steps_per_epoch=100)
        options = dict(obs_dim=CHAIN_STATES, act_dim=1, critic_hidden=(32, 32), actor_hidden=(32, 32), eval_every=0)
        options.update(kwargs)
        return TD3BC(**options), dm

    return make


def fit(module, dm, steps, ckpt_path=None, **trainer_options):
    """A quiet CPU ``Trainer(max_steps=steps)`` fitted on ``dm`` (resumed from ``ckpt_path`` if given)."""
    import lightning as L

    options = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu")
    options.update(trainer_options)
    trainer = L.Trainer(max_steps=steps, **options)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer


#: what gloo prints when one of its C++ threads is destroyed still running (SIGABRT, status -6)
GLOO_ABORT = "terminate called without an active exception"


def run_ddp_script(script: Path, *args: object) -> None:
    """Run a 2-process DDP script as its own program (Lightning's DDP launcher re-runs
    ``sys.argv``, which must not be pytest) and fail with its stderr if it fails.

    A run that gloo aborts (SIGABRT with ``GLOO_ABORT``, about one run in several hundred on a
    loaded 2-core machine, though every script closes its process group in order) is run once
    more from the start; any other failure, or a second abort, fails the test."""
    root = Path(__file__).parents[1]
    for _ in range(2):
        proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=root, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
        if not (proc.returncode == -6 and GLOO_ABORT in proc.stderr):
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
