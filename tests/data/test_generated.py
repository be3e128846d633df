"""Generated D4RL-style datasets from shipped SAC actors (here: small stand-in actors)."""
import functools

import numpy as np
import pytest
import torch

from lit_qlearn.data import OfflineDataModule, read_d4rl
from lit_qlearn.data import generated
from lit_qlearn.data.d4rl import DatasetError, read_d4rl_metadata
from lit_qlearn.networks import SquashedGaussianActor


@pytest.fixture
def policies(tmp_path, monkeypatch):
    """A policy file written by write_policy_file from two small random SAC actors."""
    monkeypatch.setenv("LIT_QLEARN_POLICY_DIR", str(tmp_path / "policies"))
    monkeypatch.setenv("LIT_QLEARN_DATA_DIR", str(tmp_path / "data"))
    from lit_qlearn.data.types import DataSpec

    spec = DataSpec.continuous(11, 3, -1.0, 1.0)
    actors = {}
    for k, name in enumerate(("medium", "final")):
        torch.manual_seed(k)
        actors[name] = {"env_steps": 1000 * (k + 1),
                        "state_dict": SquashedGaussianActor(11, 3, hidden=(256, 256)).state_dict()}
    torch.save({"command": "python benchmarks/sac_hopper.py --test", "spec": spec.to_dict(), **actors},
               tmp_path / "actors.pt")
    return generated.write_policy_file(tmp_path / "actors.pt", episodes=2)


def test_names_and_errors(policies):
    assert generated.dataset_names() == [f"hopper-{level}-v5" for level in generated.LEVELS]
    assert generated.parse_name("hopper-medium-expert-v5") == ("hopper", "medium-expert")
    assert generated.parse_name("hopper-medium-v2") is None and generated.parse_name("walker2d-medium-v5") is None
    with pytest.raises(DatasetError, match="not one lit_qlearn makes; these are: hopper-random-v5"):
        generated.make_dataset("hopper-medium-replay-v5", steps=10)


def test_each_level_is_rolled_from_its_policy_with_metadata(policies, tmp_path):
    entry = torch.load(policies, weights_only=True)
    medium = generated.make_dataset("hopper-medium-v5", steps=300, path=tmp_path / "m.hdf5")
    meta = read_d4rl_metadata(medium)
    assert meta["policy_return"] == entry["medium"]["return"] and meta["policy_env_steps"] == 1000
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
    monkeypatch.setattr(generated, "make_dataset", functools.partial(generated.make_dataset, steps=200))
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
