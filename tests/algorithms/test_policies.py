"""``act``, ``explore`` and ``evaluate`` of every algorithm on normalised data.

The networks are trained on states normalised by the DataModule, ``(s - mean) / std``; the
policies receive raw environment states. Each algorithm is fitted one step on a D4RL file
whose states are far from mean 0 / std 1 (so the normalisation reaches the module the way
it does in use: OfflineDataModule -> DataSpec -> ``setup``), then its three policies are
compared with the networks applied by hand (``tests.algorithms.test_formulas.forward``) to
states normalised by hand from the file's own arrays. Each test also checks that the raw
state would have given a different answer, so feeding raw states to the networks fails it.
``evaluate`` runs through the real rollout loop on a registered recording environment.
"""
from __future__ import annotations

import itertools

import gymnasium as gym
import lightning as L
import numpy as np
import pytest
import torch

from lit_qlearn.algorithms import CQL, DDPG, DQN, IQL, SAC, TD3, TD3BC, CrossQ, PreQN
from lit_qlearn.data import OfflineDataModule, write_d4rl
from tests.algorithms.test_formulas import ACT_DIM, HIGH, LOW, MID, OBS_DIM, SCALE, forward, mu, squashed_sample

STATE_MEAN = np.array([5.0, -3.0, 10.0])
STATE_STD = np.array([2.0, 0.5, 4.0])
NUM_ACTIONS = 3
EPISODE = 4  # steps per episode of the recording environment
SEEN: list[tuple[np.ndarray, np.ndarray]] = []  # (observation, action) of every recording env step


class RecordingEnv(gym.Env):
    """States ``STATE_MEAN + STATE_STD * pattern[t]``; records each (state, action) it is stepped with."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)
    PATTERN = np.array([[1.2, -0.7, 0.3], [-1.5, 1.1, -0.4], [0.4, 0.9, 1.6], [-0.6, -1.3, -1.1]])

    def __init__(self, discrete: bool = False) -> None:
        self.action_space = (gym.spaces.Discrete(NUM_ACTIONS) if discrete
                             else gym.spaces.Box(LOW.numpy(), HIGH.numpy(), dtype=np.float32))
        self.t = 0

    def _obs(self) -> np.ndarray:
        return (STATE_MEAN + STATE_STD * self.PATTERN[self.t % EPISODE]).astype(np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        SEEN.append((self._obs(), np.array(action)))
        self.t += 1
        return self._obs(), 1.0, self.t == EPISODE, False, {}


ENVS = {False: "LitQlearnTestRecording-v0", True: "LitQlearnTestRecordingDiscrete-v0"}
for _discrete, _env_id in ENVS.items():
    if _env_id not in gym.registry:
        gym.register(_env_id, entry_point=RecordingEnv, kwargs=dict(discrete=_discrete))


def data_file(path, discrete: bool, n: int = 64, seed: int = 0):
    """A D4RL file of ``n`` rows; returns its path and the observations it serves: D4RL's
    ``qlearning_dataset`` drops the final row (it has no row i+1 to be its next state)."""
    rng = np.random.default_rng(seed)
    obs = (STATE_MEAN + STATE_STD * rng.standard_normal((n, OBS_DIM))).astype(np.float32)
    if discrete:
        act = rng.integers(0, NUM_ACTIONS, n).astype(np.int64)
    else:
        low, high = LOW.numpy(), HIGH.numpy()
        act = (low + (high - low) * rng.uniform(size=(n, ACT_DIM))).astype(np.float32)
    terminals = np.zeros(n, bool)
    terminals[EPISODE - 1::EPISODE] = True
    arrays = dict(observations=obs, actions=act, rewards=rng.standard_normal(n).astype(np.float32),
                  terminals=terminals)
    return write_d4rl(path, arrays), obs[:-1]


def by_hand_normalised(raw: np.ndarray, data_obs: np.ndarray) -> torch.Tensor:
    """``(s - mean) / (std + 1e-3)`` over the file's observations (TD3+BC's normalisation)."""
    mean = data_obs.mean(axis=0, dtype=np.float64)
    std = data_obs.std(axis=0, dtype=np.float64) + 1e-3
    return torch.as_tensor((raw - mean) / std, dtype=torch.float32)


SMALL = dict(critic_hidden=(8,), actor_hidden=(8,), eval_every=0)
EXPLORATION = 0.8  # in half-ranges: large enough that explore's clamp to the box binds
SIZES = dict(obs_dim=OBS_DIM, act_dim=ACT_DIM, action_low=LOW.tolist(), action_high=HIGH.tolist())
# name -> factory(sized): sized=False reads the sizes from the DataModule, True is given them
ALGORITHMS = {
    "TD3": lambda sized: TD3(**SMALL, exploration_noise=EXPLORATION, **(SIZES if sized else {})),
    "DDPG": lambda sized: DDPG(**SMALL, exploration_noise=EXPLORATION, **(SIZES if sized else {})),
    "TD3BC": lambda sized: TD3BC(**SMALL, exploration_noise=EXPLORATION, **(SIZES if sized else {})),
    "PreQN": lambda sized: PreQN(**SMALL, exploration_noise=EXPLORATION, **(SIZES if sized else {})),
    "SAC": lambda sized: SAC(**SMALL, **(SIZES if sized else {})),
    "CQL": lambda sized: CQL(**SMALL, **(SIZES if sized else {})),
    "IQL": lambda sized: IQL(**SMALL, **(SIZES if sized else {})),
    # the actor without its norms, so that the hand-written policies apply (test_crossq.py has them)
    "CrossQ": lambda sized: CrossQ(**SMALL, actor_norm=None, **(SIZES if sized else {})),
    # epsilon_end = 0.5 after 100 environment steps
    "DQN": lambda sized: DQN(critic_hidden=(8,), epsilon_start=1.0, epsilon_end=0.5, epsilon_steps=100,
                             **(dict(obs_shape=(OBS_DIM,), num_actions=NUM_ACTIONS) if sized else {})),
}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Every algorithm fitted one step on normalised data, built from the data's sizes and from
    given sizes; ``(name, sized) -> (module, file observations, checkpoint)``."""
    root = tmp_path_factory.mktemp("policies")
    files = {discrete: data_file(root / f"data-{discrete}.hdf5", discrete) for discrete in (False, True)}
    out = {}
    for (name, make), sized in itertools.product(ALGORITHMS.items(), (False, True)):
        discrete = name == "DQN"
        path, data_obs = files[discrete]
        L.seed_everything(0, verbose=False)
        dm = OfflineDataModule(str(path), env_id=ENVS[discrete], batch_size=16, steps_per_epoch=1, seed=0,
                               normalize_states=True)
        module = make(sized)
        trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, accelerator="cpu")
        trainer.fit(module, dm)
        ckpt = root / f"{name}-{sized}.ckpt"
        trainer.save_checkpoint(ckpt)
        out[name, sized] = (module, data_obs, ckpt)
    return out


def raw_states(n: int = 32, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (STATE_MEAN + STATE_STD * rng.standard_normal((n, OBS_DIM))).astype(np.float32)


def hand_act(module, x: torch.Tensor) -> torch.Tensor:
    """The evaluation policy applied by hand to network inputs ``x``."""
    with torch.no_grad():
        if isinstance(module, DQN):
            return forward(module.q_net.head, x).argmax(dim=1)
        if isinstance(module, (SAC, CrossQ)):  # tanh(mean), scaled to the box
            return MID + SCALE * torch.tanh(forward(module.actor.net, x)[:, :ACT_DIM])
        return mu(module.actor.net, x)  # TD3 family, PreQN, IQL's Gaussian mean


def hand_explore(module, x: torch.Tensor, seed: int) -> torch.Tensor:
    """The behaviour policy by hand, the torch generator seeded with ``seed`` as before the module's call."""
    torch.manual_seed(seed)
    with torch.no_grad():
        if isinstance(module, DQN):  # epsilon-greedy at epsilon_end = 0.5: uniform draws, random actions, greedy
            explore = torch.rand(x.shape[0]) < 0.5
            return torch.where(explore, torch.randint(NUM_ACTIONS, (x.shape[0],)), hand_act(module, x))
        if isinstance(module, (SAC, CrossQ)):
            return squashed_sample(module.actor.net, x, torch.randn(x.shape[0], ACT_DIM))[0]
        if isinstance(module, IQL):
            return hand_act(module, x)
        noisy = mu(module.actor.net, x) + torch.randn(x.shape[0], ACT_DIM) * EXPLORATION * SCALE
        assert ((noisy < LOW) | (noisy > HIGH)).any()  # the clamp binds
        return torch.max(torch.min(noisy, HIGH), LOW)


def assert_policy_equal(got: np.ndarray, expected: torch.Tensor, raw_answer: torch.Tensor) -> None:
    got = torch.as_tensor(np.asarray(got))
    if expected.dtype == torch.int64:
        assert torch.equal(got.long(), expected)
        assert not torch.equal(raw_answer, expected)  # the raw state would have acted differently
    else:
        torch.testing.assert_close(got.float(), expected, rtol=1e-5, atol=1e-5)
        assert (raw_answer - expected).abs().max() > 0.05


NAMES = list(ALGORITHMS)


@pytest.mark.parametrize("sized", [False, True], ids=["sizes-from-data", "sizes-given"])
@pytest.mark.parametrize("name", NAMES)
def test_act_normalises_raw_states(fitted, name, sized):
    module, data_obs, _ = fitted[name, sized]
    raw = raw_states()
    # the module holds the file's statistics (from the DataModule's spec)
    np.testing.assert_allclose(module.obs_mean.numpy(), data_obs.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(module.obs_std.numpy(), data_obs.std(axis=0) + 1e-3, rtol=1e-5)
    x = by_hand_normalised(raw, data_obs)
    raw_answer = hand_act(module, torch.as_tensor(raw))
    assert_policy_equal(module.act(raw), hand_act(module, x), raw_answer)
    # one state without a batch axis
    single = module.act(raw[0])
    assert np.shape(single) == (() if name == "DQN" else (ACT_DIM,))
    assert_policy_equal(np.asarray(single)[None], hand_act(module, x[:1]), hand_act(module, torch.as_tensor(raw)))


@pytest.mark.parametrize("name", NAMES)
def test_explore_normalises_raw_states(fitted, name):
    module, data_obs, _ = fitted[name, False]
    raw = raw_states(seed=2)
    x = by_hand_normalised(raw, data_obs)
    torch.manual_seed(7)
    got = module.explore(raw, env_step=10_000)
    expected = hand_explore(module, x, seed=7)
    assert_policy_equal(got, expected, hand_explore(module, torch.as_tensor(raw), seed=7))
    if name == "DQN":  # both branches of epsilon-greedy occur
        torch.manual_seed(7)
        explored = torch.rand(len(raw)) < 0.5
        assert explored.any() and (~explored).any()


@pytest.mark.parametrize("name", NAMES)
def test_evaluate_feeds_normalised_states_to_the_networks(fitted, name):
    module, data_obs, _ = fitted[name, False]
    SEEN.clear()
    result = module.evaluate(episodes=2)
    assert result["length"] == EPISODE and result["return"] == EPISODE
    assert len(SEEN) == 2 * EPISODE
    raw = np.stack([obs for obs, _ in SEEN])
    actions = np.stack([act for _, act in SEEN]).reshape(len(SEEN), *(() if name == "DQN" else (ACT_DIM,)))
    x = by_hand_normalised(raw, data_obs)
    expected = hand_act(module, x)
    raw_answer = hand_act(module, torch.as_tensor(raw))
    assert_policy_equal(actions, expected, raw_answer)
    module.teardown("fit")


@pytest.mark.parametrize("sized", [False, True], ids=["sizes-from-data", "sizes-given"])
@pytest.mark.parametrize("name", NAMES)
def test_a_reloaded_checkpoint_acts_on_normalised_states(fitted, name, sized):
    # sizes given: the constructor builds for a spec without normalisation, the checkpoint's says otherwise
    module, data_obs, ckpt = fitted[name, sized]
    loaded = type(module).load_from_checkpoint(ckpt, weights_only=True)
    raw = raw_states(seed=3)
    torch.testing.assert_close(loaded.obs_mean, module.obs_mean)
    assert_policy_equal(loaded.act(raw), hand_act(module, by_hand_normalised(raw, data_obs)),
                        hand_act(module, torch.as_tensor(raw)))
