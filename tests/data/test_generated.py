"""Generated D4RL-style datasets from shipped SAC actors (here: small stand-in actors)."""

import numpy as np
import pytest
import torch

from lit_qlearn.data import OfflineDataModule, read_d4rl
from lit_qlearn.data.d4rl import DatasetError, read_d4rl_metadata
from lit_qlearn.data.names import ENV_IDS, LEVELS, dataset_names, parse_name
from lit_qlearn.datasets import generated
from lit_qlearn.networks import SquashedGaussianActor


@pytest.fixture
def policies(tmp_path, monkeypatch):
    """A policy file written by write_policy_file from a stand-in run: three small random
    SAC actors on a curve whose middle point is nearest a third of the final return."""
    monkeypatch.setenv("LIT_QLEARN_POLICY_DIR", str(tmp_path / "policies"))
    monkeypatch.setenv("LIT_QLEARN_DATA_DIR", str(tmp_path / "data"))
    from lit_qlearn.data.types import DataSpec
    from lit_qlearn.datasets import BehaviourRun

    curve = [{"env_steps": 1000 * (k + 1), "return": r, "seconds": 0.0} for k, r in enumerate((10.0, 100.0, 300.0))]
    actors = {}
    for k, point in enumerate(curve):
        torch.manual_seed(k)
        actors[point["env_steps"]] = SquashedGaussianActor(11, 3, hidden=(256, 256)).state_dict()
    run = BehaviourRun({}, curve, actors, DataSpec.continuous(11, 3, -1.0, 1.0).to_dict(), None)
    return generated.write_policy_file(run, episodes=2, command="python make_it.py --test")


def test_names_and_errors(policies):
    assert dataset_names() == [f"hopper-{level}-v5" for level in LEVELS]
    assert generated.dataset_names is dataset_names  # the making side lists the names the reading side knows
    assert parse_name("hopper-medium-expert-v5") == ("hopper", "medium-expert")
    assert parse_name("walker2d-medium-replay-v5") == ("walker2d", "medium-replay")
    assert parse_name("hopper-medium-v2") is None and parse_name("ant-medium-v5") is None
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


def test_offline_datamodule_reads_a_generated_dataset_once_made(policies, tmp_path):
    # made explicitly (as `lit-qlearn datasets make hopper-random-v5 --steps 200` does), then read by name
    path = generated.make_dataset("hopper-random-v5", steps=200)
    assert path == tmp_path / "data" / "hopper-random-v5.hdf5"
    dm = OfflineDataModule("hopper-random-v5")
    dm.prepare_data()
    dm.setup("fit")
    assert dm.env_id == "Hopper-v5" and dm.num_transitions == len(read_d4rl(path)["rewards"])
    entry = torch.load(policies, weights_only=True)
    assert dm.ref_scores == (entry["random_return"], entry["expert"]["return"])


def test_default_is_made_by_name_like_the_generated_datasets(policies, tmp_path, capsys):
    from lit_qlearn.cli import main
    from lit_qlearn.data.names import default_dataset_path

    assert generated.total_steps("default") == generated.DEFAULT_STEPS == 100_000
    main(["datasets", "make", "default", "--steps", "150"])
    path = default_dataset_path()
    assert capsys.readouterr().out.strip().endswith(f"wrote {path}")
    meta = read_d4rl_metadata(path)
    assert meta["dataset"] == "hopper-medium-v5" and meta["steps"] == 150 and meta["env_id"] == "Hopper-v5"
    dm = OfflineDataModule("default")
    dm.prepare_data()
    assert dm.num_transitions == len(read_d4rl(path)["rewards"])


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
    monkeypatch.setitem(ENV_IDS, "pendulum", "Pendulum-v1")
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
    from lit_qlearn.data.replay import ReplayBuffer
    from lit_qlearn.datasets import replay_arrays

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


# ------------------------------------------------------------ errors before work


def _no_generation(monkeypatch):
    """Make every way of generating data fail loudly: a check that comes too late shows
    as this AssertionError instead of the DatasetError the tests expect."""
    import importlib

    collect_module = importlib.import_module("lit_qlearn.datasets.collect")  # (lit_qlearn.datasets.collect: the function)

    def started(*args, **kwargs):
        raise AssertionError("data generation started before the output directory was checked")

    monkeypatch.setattr(generated, "collect", started)
    monkeypatch.setattr(generated, "train_sac", started)
    monkeypatch.setattr(collect_module, "make_vector_env", started)


def _unwritable(how, tmp_path, monkeypatch):
    """An unwritable data directory, and the directory the error must name. Tests run as
    root, whom file modes do not stop, so 'under a file' and 'is a file' are real failures
    of the file system, and 'refuses files' simulates a read-only directory by making the
    one probe write fail as it would there (EACCES)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    if how == "under a file":
        return blocker / "datasets", "Not a directory"
    if how == "is a file":
        return blocker, "File exists"
    import errno
    import tempfile

    import lit_qlearn.data.d4rl as d4rl

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(d4rl.tempfile, "TemporaryFile", refuse)
    assert tempfile.TemporaryFile is refuse  # (the one module, patched for this test only)
    (tmp_path / "read-only").mkdir()
    return tmp_path / "read-only", "Permission denied"


@pytest.mark.parametrize("how", ["under a file", "is a file", "refuses files"])
@pytest.mark.parametrize("entry", ["ensure_default_dataset", "ensure_dataset", "make_dataset", "collect"])
def test_an_unwritable_data_directory_fails_before_any_generation(how, entry, tmp_path, monkeypatch):
    from lit_qlearn.datasets import collect, ensure_default_dataset

    data_dir, reason = _unwritable(how, tmp_path, monkeypatch)
    monkeypatch.setenv("LIT_QLEARN_DATA_DIR", str(data_dir))
    _no_generation(monkeypatch)
    calls = {
        "ensure_default_dataset": lambda: ensure_default_dataset(),
        "ensure_dataset": lambda: generated.ensure_dataset("hopper-medium-v5", progress=lambda n: None),
        "make_dataset": lambda: generated.make_dataset("hopper-random-v5", steps=1000),
        "collect": lambda: collect("Hopper-v5", "random", steps=1000),  # default path: the data directory
    }
    with pytest.raises(DatasetError) as e:  # before any generation: _no_generation fails the test if one starts
        calls[entry]()
    msg = str(e.value)
    assert msg.startswith(f"{data_dir}: ") and reason in msg and "expected a writable directory" in msg
    assert "set LIT_QLEARN_DATA_DIR" in msg and "\n" not in msg
    assert not (data_dir.is_dir() and any(data_dir.iterdir()))  # nothing written


def test_a_cached_dataset_in_a_read_only_directory_is_reused(tmp_path, monkeypatch):
    # the writability check is for making a file: an existing one needs none
    monkeypatch.setenv("LIT_QLEARN_DATA_DIR", str(tmp_path / "data"))
    from lit_qlearn.datasets import ensure_default_dataset

    path = ensure_default_dataset(steps=50, progress=lambda n: None)
    _unwritable("refuses files", tmp_path, monkeypatch)
    _no_generation(monkeypatch)
    assert ensure_default_dataset() == path


def test_the_data_directory_is_created_but_a_users_directory_is_not(policies, tmp_path, monkeypatch):
    _no_generation(monkeypatch)
    monkeypatch.setenv("LIT_QLEARN_DATA_DIR", str(tmp_path / "new" / "data"))
    # the package's own cache directory: made (the check passes, then generation starts)
    with pytest.raises(AssertionError, match="data generation started"):
        generated.make_dataset("hopper-random-v5", steps=100)
    assert (tmp_path / "new" / "data").is_dir()
    # a directory the user named: an error naming it, and nothing created
    with pytest.raises(DatasetError) as e:
        generated.make_dataset("hopper-random-v5", steps=100, path=tmp_path / "typo" / "r.hdf5")
    assert str(e.value).startswith(f"{tmp_path / 'typo'}: directory does not exist (create it first)")
    assert "r.hdf5" in str(e.value) and not (tmp_path / "typo").exists()
    with pytest.raises(DatasetError, match="is a directory"):
        generated.make_dataset("hopper-random-v5", steps=100, path=tmp_path)


def test_train_checks_its_outputs_before_training(tmp_path, monkeypatch):
    _no_generation(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LIT_QLEARN_POLICY_DIR", str(blocker / "policies"))
    monkeypatch.setenv("LIT_QLEARN_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(DatasetError, match="set LIT_QLEARN_POLICY_DIR to a writable policy directory") as e:
        generated.train_policy("hopper", steps=1000)
    assert str(e.value).startswith(str(blocker / "policies"))
    monkeypatch.setenv("LIT_QLEARN_POLICY_DIR", str(tmp_path / "policies"))
    monkeypatch.setenv("LIT_QLEARN_DATA_DIR", str(blocker / "data"))
    with pytest.raises(DatasetError, match="set LIT_QLEARN_DATA_DIR"):
        generated.train_policy("hopper", steps=1000)


def test_make_checks_every_option_before_the_first_step(policies, monkeypatch):
    _no_generation(monkeypatch)
    for steps in (1, 0, 2.5, True):
        with pytest.raises(DatasetError, match=rf"hopper-random-v5: steps must be an integer >= 2 .* got {steps!r}"):
            generated.make_dataset("hopper-random-v5", steps=steps)
