"""Generated D4RL-style datasets from shipped SAC actors (here: small stand-in actors)."""

import numpy as np
import pytest
import torch

from lit_qlearn.data import OfflineDataModule, read_d4rl
from lit_qlearn.data import generated
from lit_qlearn.data.d4rl import DatasetError, read_d4rl_metadata
from lit_qlearn.networks import SquashedGaussianActor


@pytest.fixture
def policies(tmp_path, monkeypatch):
    """A policy file written by write_policy_file from a stand-in run: three small random
    SAC actors on a curve whose middle point is nearest a third of the final return."""
    monkeypatch.setenv("LIT_QLEARN_POLICY_DIR", str(tmp_path / "policies"))
    monkeypatch.setenv("LIT_QLEARN_DATA_DIR", str(tmp_path / "data"))
    from lit_qlearn.data.behaviour import BehaviourRun
    from lit_qlearn.data.types import DataSpec

    curve = [{"env_steps": 1000 * (k + 1), "return": r, "seconds": 0.0} for k, r in enumerate((10.0, 100.0, 300.0))]
    actors = {}
    for k, point in enumerate(curve):
        torch.manual_seed(k)
        actors[point["env_steps"]] = SquashedGaussianActor(11, 3, hidden=(256, 256)).state_dict()
    run = BehaviourRun({}, curve, actors, DataSpec.continuous(11, 3, -1.0, 1.0).to_dict(), None)
    return generated.write_policy_file(run, episodes=2, command="python make_it.py --test")


def test_names_and_errors(policies):
    assert generated.dataset_names() == [f"hopper-{level}-v5" for level in generated.LEVELS]
    assert generated.parse_name("hopper-medium-expert-v5") == ("hopper", "medium-expert")
    assert generated.parse_name("walker2d-medium-replay-v5") == ("walker2d", "medium-replay")
    assert generated.parse_name("hopper-medium-v2") is None and generated.parse_name("ant-medium-v5") is None
    with pytest.raises(DatasetError, match="not one lit_qlearn makes; these are: hopper-random-v5"):
        generated.make_dataset("ant-medium-v5", steps=10)
    with pytest.raises(DatasetError, match="no shipped SAC policy for 'walker2d' .`lit-qlearn datasets train"):
        generated.make_dataset("walker2d-medium-v5", steps=10)
    with pytest.raises(DatasetError, match="--steps does not apply: medium-replay is the SAC run's own buffer .up to its medium step 2000"):
        generated.make_dataset("hopper-medium-replay-v5", steps=10)
    with pytest.raises(DatasetError, match="--seed does not apply"):
        generated.make_dataset("hopper-medium-replay-v5", seed=3)
    with pytest.raises(DatasetError, match="records no training settings"):  # the stand-in run has none
        generated.make_dataset("hopper-medium-replay-v5")
    entry = torch.load(policies, weights_only=True)
    assert entry["medium"]["env_steps"] == 2000 and entry["expert"]["env_steps"] == 3000
    assert entry["command"] == "python make_it.py --test" and entry["curve"][1]["return"] == 100.0


def test_each_level_is_rolled_from_its_policy_with_metadata(policies, tmp_path):
    entry = torch.load(policies, weights_only=True)
    medium = generated.make_dataset("hopper-medium-v5", steps=300, path=tmp_path / "m.hdf5")
    meta = read_d4rl_metadata(medium)
    assert meta["policy_return"] == entry["medium"]["return"] and meta["policy_env_steps"] == 2000
    assert (meta["ref_min_score"], meta["ref_max_score"]) == (entry["random_return"], entry["expert"]["return"])
    assert meta["dataset"] == "hopper-medium-v5" and meta["steps"] == 300 and "lit_qlearn_version" in meta
    # the stored actions are the medium actor's deterministic actions on the stored states
    data = read_d4rl(medium)
    act = generated.shipped_actor("hopper", "medium")
    np.testing.assert_allclose(data["actions"][:50], act(data["observations"][:50]), atol=1e-6)
    both = generated.make_dataset("hopper-medium-expert-v5", steps=300, path=tmp_path / "me.hdf5")
    expert = generated.make_dataset("hopper-expert-v5", steps=300, path=tmp_path / "e.hdf5", seed=1)
    rows = len(read_d4rl(both)["rewards"])
    assert rows == len(data["rewards"]) + len(read_d4rl(expert)["rewards"])
    assert read_d4rl_metadata(both)["steps"] == 600 and not list(tmp_path.glob("me.*.hdf5"))


def test_offline_datamodule_makes_a_generated_dataset_on_first_use(policies, tmp_path, monkeypatch):
    make = generated.make_dataset
    monkeypatch.setattr(generated, "make_dataset",
                        lambda name, steps, *args, **kwargs: make(name, 200, *args, **kwargs))
    dm = OfflineDataModule("hopper-random-v5")
    dm.prepare_data()
    dm.setup("fit")
    assert (tmp_path / "data" / "hopper-random-v5.hdf5").is_file() and dm.env_id == "Hopper-v5"
    entry = torch.load(policies, weights_only=True)
    assert dm.ref_scores == (entry["random_return"], entry["expert"]["return"])


def test_datasets_command(policies, tmp_path, capsys, monkeypatch):
    from lit_qlearn.cli import main

    main(["datasets", "list"])
    assert "hopper-medium-v5" in capsys.readouterr().out
    main(["datasets", "make", "hopper-expert-v5", "--steps", "120", "--path", str(tmp_path / "x.hdf5")])
    assert read_d4rl_metadata(tmp_path / "x.hdf5")["steps"] == 120
    for argv, needle in ((["datasets", "train", "ant"], "invalid choice: 'ant'"),
                         (["datasets", "make", "hopper-medium-replay-v5", "--steps", "5"], "--steps does not apply")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and needle in err and "Traceback" not in err
    if __import__("importlib").util.find_spec("minari") is not None:
        monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
        with pytest.warns(UserWarning):
            main(["datasets", "make", "hopper-random-v5", "--steps", "120", "--path", str(tmp_path / "r.hdf5"),
                  "--minari", "lit_qlearn/hopper/random-v5"])
        assert (tmp_path / "minari" / "lit_qlearn" / "hopper" / "random-v5" / "data" / "main_data.hdf5").is_file()


def test_a_generated_dataset_written_as_minari_reads_back_the_same(policies, tmp_path, monkeypatch):
    pytest.importorskip("minari")
    from lit_qlearn.data import read_minari
    from lit_qlearn.data.d4rl import load_d4rl_raw
    from lit_qlearn.data.minari import write_minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    path = generated.make_dataset("hopper-medium-v5", steps=400, path=tmp_path / "m.hdf5")
    with pytest.warns(UserWarning):  # minari's own notes about optional fields
        write_minari(path, "lit_qlearn/hopper/medium-v5")
    theirs, raw = read_minari("lit_qlearn/hopper/medium-v5"), load_d4rl_raw(path)[0]
    # every step comes back: Minari keeps each episode's final observation
    for key in ("observations", "actions", "rewards", "next_observations"):
        np.testing.assert_allclose(theirs[key], raw[key], rtol=1e-6)
    np.testing.assert_array_equal(theirs["terminals"], raw["terminals"])
    np.testing.assert_array_equal(np.flatnonzero(theirs["episode_ends"]), np.flatnonzero(raw["terminals"] | raw["timeouts"]))


def test_medium_replay_is_the_runs_buffer_and_a_rerun_remakes_it(tmp_path, monkeypatch):
    """train_policy on a short Pendulum run: the policy file, and medium-replay = the
    buffer's first rows (episode ends recovered); deleting the file and making it again
    reruns SAC with the recorded settings and reproduces the shipped medium actor."""
    from lit_qlearn.data.d4rl import load_d4rl_raw

    monkeypatch.setenv("LIT_QLEARN_POLICY_DIR", str(tmp_path / "policies"))
    monkeypatch.setenv("LIT_QLEARN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setitem(generated.ENV_IDS, "pendulum", "Pendulum-v1")
    options = dict(learning_starts=256, eval_every=150, episodes=1)
    path = generated.train_policy("pendulum", steps=706, seed=2, return_episodes=1, **options)
    entry = torch.load(path, weights_only=True)
    assert entry["train"] == {"env_id": "Pendulum-v1", "steps": 706, "seed": 2, "threads": 1, **options}
    assert [p["env_steps"] for p in entry["curve"]] == [406, 556, 706]
    medium = entry["medium"]["env_steps"]
    assert medium in (406, 556) and entry["expert"]["env_steps"] == 706
    replay = tmp_path / "data" / "pendulum-medium-replay-v5.hdf5"
    first, meta = load_d4rl_raw(replay)[0], read_d4rl_metadata(replay)
    assert len(first["rewards"]) == medium == meta["steps"] and meta["reproduces_shipped_medium"]
    # Pendulum's episodes are 200 steps, all truncated; the cut at the end is a timeout too
    np.testing.assert_array_equal(np.flatnonzero(first["timeouts"]),
                                  [*range(199, medium, 200), *([medium - 1] if medium % 200 else [])])
    assert not first["terminals"].any() and meta["num_episodes"] == first["timeouts"].sum()
    inside = ~first["timeouts"][:-1]
    np.testing.assert_array_equal(first["next_observations"][:-1][inside], first["observations"][1:][inside])
    replay.unlink()
    assert generated.total_steps("pendulum-medium-replay-v5") == medium
    again = generated.make_dataset("pendulum-medium-replay-v5")
    assert read_d4rl_metadata(again)["reproduces_shipped_medium"]
    for key, value in load_d4rl_raw(again)[0].items():
        np.testing.assert_array_equal(value, first[key], err_msg=key)


def test_replay_arrays_marks_terminations_and_truncations():
    from lit_qlearn.data.behaviour import replay_arrays
    from lit_qlearn.data.replay import ReplayBuffer

    buf = ReplayBuffer(10, 1)
    # episode 1: states 0 -> 1 -> 2 (terminates); episode 2: 5 -> 6 -> 7 (truncated); episode 3: 9 -> 10 (cut)
    for s, s2, term, trunc in ((0, 1, 0, 0), (1, 2, 1, 0), (5, 6, 0, 0), (6, 7, 0, 1), (9, 10, 0, 0)):
        buf.add([[s]], [0.0], [1.0], [[s2]], [term], [trunc])
    arrays = replay_arrays(buf, 5)
    np.testing.assert_array_equal(arrays["terminals"], [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(arrays["timeouts"], [0, 0, 0, 1, 1])
    assert replay_arrays(buf, 2)["timeouts"].tolist() == [False, False]
    with pytest.raises(ValueError, match="rows must be in"):
        replay_arrays(buf, 6)
