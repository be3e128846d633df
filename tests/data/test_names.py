"""lit_qlearn.data reads and never makes: a named dataset that is not on disk is a one-line
error naming the command that makes it, raised before any environment is made."""
from __future__ import annotations

import gymnasium as gym
import pytest

from lit_qlearn.data import DatasetError, OfflineDataModule, write_d4rl
from lit_qlearn.data.names import data_dir, dataset_path, default_dataset_path, how_to_make, resolve
from lit_qlearn.datasets import generated


def _nothing_may_start(monkeypatch):
    """Every way data could be made, or an environment started, fails the test loudly."""
    import importlib

    def started(*args, **kwargs):
        raise AssertionError("reading a missing dataset started making it")

    for target, name in ((gym, "make"), (gym, "make_vec"), (generated, "make_dataset"), (generated, "collect"),
                         (generated, "train_sac"),
                         (importlib.import_module("lit_qlearn.datasets.collect"), "make_vector_env")):
        monkeypatch.setattr(target, name, started)


EXPECTED = {
    "default": "{path}: the default dataset is not made yet; make it with `lit-qlearn datasets make default` "
               "(Python: lit_qlearn.datasets.ensure_default_dataset())",
    "hopper-medium-v5": "{path}: dataset 'hopper-medium-v5' is not made yet; make it with `lit-qlearn datasets make "
                        "hopper-medium-v5` (Python: lit_qlearn.datasets.make_dataset('hopper-medium-v5'))",
    "walker2d-medium-replay-v5": "{path}: dataset 'walker2d-medium-replay-v5' is not made yet; it is the replay "
                                 "buffer of the SAC run that trained the walker2d policies: `lit-qlearn datasets make "
                                 "walker2d-medium-replay-v5` reruns that run up to its medium policy (Python: "
                                 "lit_qlearn.datasets.make_dataset('walker2d-medium-replay-v5')), `lit-qlearn datasets "
                                 "train walker2d` trains new policies and writes it too",
}


@pytest.mark.parametrize("name", list(EXPECTED))
@pytest.mark.parametrize("stage", ["prepare_data", "setup"])
def test_a_missing_named_dataset_is_an_error_naming_its_command(name, stage, isolated_dirs, monkeypatch):
    _nothing_may_start(monkeypatch)
    path = default_dataset_path() if name == "default" else dataset_path(name)
    assert path.parent == isolated_dirs / "lit"
    dm = OfflineDataModule(name)
    with pytest.raises(DatasetError) as e:
        dm.prepare_data() if stage == "prepare_data" else dm.setup("fit")
    assert str(e.value) == EXPECTED[name].format(path=path) and "\n" not in str(e.value)
    assert not data_dir().exists()  # nothing written, not even the directory
    # the command it names is the one that makes the file
    assert f"`lit-qlearn datasets make {name}`" in how_to_make(name)


def test_a_dataset_on_disk_is_read_and_the_checks_before_it_still_apply(isolated_dirs, arrays, monkeypatch):
    _nothing_may_start(monkeypatch)
    path = dataset_path("hopper-medium-v5")
    path.parent.mkdir(parents=True)
    write_d4rl(path, arrays(n=50, ds=11, da=3), {"env_id": "Hopper-v5"})
    assert resolve("hopper-medium-v5") == path
    dm = OfflineDataModule("hopper-medium-v5", check_env=False)  # (check_env would make the env: patched away)
    dm.prepare_data()
    assert dm.num_transitions == 50 - 2  # qlearning_dataset drops each of the two timeouts' rows
    write_d4rl(default_dataset_path(), arrays(n=30, ds=11, da=3), {"env_id": "Hopper-v5"})
    assert resolve("default") == default_dataset_path()


def test_the_cli_reports_a_missing_dataset_in_one_line(isolated_dirs, capsys, monkeypatch):
    from lit_qlearn.cli import main

    _nothing_may_start(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--model", "lit_qlearn.algorithms.TD3BC", "--data", "lit_qlearn.data.OfflineDataModule",
              "--data.dataset", "hopper-expert-v5", "--trainer.max_steps", "1", "--trainer.logger", "false",
              "--trainer.enable_checkpointing", "false"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "lit-qlearn fit: error: " + EXPECTED["hopper-medium-v5"].format(
        path=dataset_path("hopper-expert-v5")).replace("medium", "expert")
    assert not data_dir().exists()
