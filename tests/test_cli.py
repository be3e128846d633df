import math
from pathlib import Path

import numpy as np
import pytest

from lit_qlearn.algorithms import TD3
from lit_qlearn.cli import demo, main
from lit_qlearn.data import read_d4rl

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def hopper(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "hopper.hdf5"
    main(["collect", "Hopper-v5", str(path), "--steps", "300", "--seed", "1"])
    return path


def test_collect_command_writes_a_d4rl_file(hopper):
    data = read_d4rl(hopper)
    assert data["observations"].shape[1] == 11 and data["actions"].shape[1] == 3
    # 300 steps minus the dropped timeout rows (at least the final, cut-off one).
    assert 250 < len(data["rewards"]) < 300
    assert np.all(np.abs(data["actions"]) <= 1.0)


def test_fit_command_with_an_example_config(hopper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs/td3_no_ema_layernorm.yaml"), "--data.init_args.dataset", str(hopper),
          "--data.init_args.batch_size", "32", "--trainer.max_steps", "6", "--model.init_args.eval_every", "0",
          "--trainer.enable_progress_bar", "false"])
    logs = list((tmp_path / "lightning_logs" / "td3_no_ema").glob("version_*"))
    assert len(logs) == 1
    config = (logs[0] / "config.yaml").read_text()
    assert "lit_qlearn.callbacks.EMATarget" in config and "critic_norm: layer" in config
    (ckpt,) = logs[0].glob("checkpoints/*.ckpt")
    assert "step=6" in ckpt.name


def test_demo_trains_and_evaluates(hopper, tmp_path, capsys):
    result = demo(["--algo", "td3bc", "--dataset", str(hopper), "--steps", "20", "--episodes", "1", "--logdir",
                   str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert "20 updates" in out and "normalized score" in out
    assert math.isfinite(result["return"]) and math.isfinite(result["normalized_score"])
    assert list(tmp_path.glob("demo/td3bc/version_0/events.out.tfevents.*"))


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train"])
    assert exc.value.code == 2
    assert "lit-qlearn fit" in capsys.readouterr().err


def test_fit_online_dqn_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs/dqn_cartpole.yaml"), "--trainer.max_steps", "4",
          "--data.init_args.learning_starts", "64", "--model.init_args.eval_every", "0",
          "--trainer.enable_progress_bar", "false"])
    (log,) = (tmp_path / "lightning_logs" / "dqn_cartpole").glob("version_*")
    assert "lit_qlearn.data.OnlineDataModule" in (log / "config.yaml").read_text()


def test_fit_online_crossq_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs/crossq_pendulum.yaml"), "--trainer.max_steps", "4",
          "--model.init_args.eval_every", "0",
          "--trainer.enable_progress_bar", "false"])
    (log,) = (tmp_path / "lightning_logs" / "crossq_pendulum").glob("version_*")
    config = (log / "config.yaml").read_text()
    assert "lit_qlearn.algorithms.CrossQ" in config and "policy_delay: 2" in config


def test_fit_pqn_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs/pqn_cartpole.yaml"), "--trainer.max_steps", "3",
          "--data.init_args.num_steps", "8", "--model.init_args.eval_every", "0",
          "--trainer.enable_progress_bar", "false"])
    (log,) = (tmp_path / "lightning_logs" / "pqn_cartpole").glob("version_*")
    config = (log / "config.yaml").read_text()
    assert "lit_qlearn.data.OnPolicyDataModule" in config and "lit_qlearn.algorithms.PQN" in config


@pytest.mark.parametrize("argv, expected", [
    (["fit", "--model", "lit_qlearn.algorithms.TD3", "--data", "lit_qlearn.data.OnlineDataModule",
      "--trainer.max_steps", "1", "--trainer.logger", "false"],
     "TD3 needs continuous actions, the data has Discrete(2)"),
    (["fit", "--model", "lit_qlearn.algorithms.DQN", "--data", "lit_qlearn.data.OfflineDataModule",
      "--data.init_args.dataset", "/nonexistent/file.hdf5"], "/nonexistent/file.hdf5"),
    (["fit", "--model", "lit_qlearn.algorithms.TD3", "--model.init_args.gamma", "1.5", "--data",
      "lit_qlearn.data.OfflineDataModule"], "gamma"),
    (["fit", "--model.nonsense", "3"], "nonsense"),
    (["collect", "NoSuchEnv-v0", "x.hdf5", "--steps", "10"], "NoSuchEnv-v0"),
])
def test_user_errors_are_one_line_and_exit_2(argv, expected, capsys, tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "lit_qlearn.cli", *argv], capture_output=True, text=True,
                          cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


class FailsOnThirdUpdate(TD3):
    """A module with a bug that shows only once training runs."""

    def update(self, batch):
        if self.updates == 3:
            raise ValueError("a bug in update, not bad input")
        return super().update(batch)


def test_an_error_during_training_keeps_its_traceback(hopper, tmp_path, monkeypatch):
    # the same class of error at setup is a one-line input error (above); raised by the
    # third update it is a bug and must reach the user whole
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="a bug in update"):
        main(["fit", "--model", "tests.test_cli.FailsOnThirdUpdate", "--model.init_args.eval_every", "0", "--data",
              "lit_qlearn.data.OfflineDataModule", "--data.init_args.dataset", str(hopper),
              "--data.init_args.batch_size", "16", "--trainer.max_steps", "5", "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false"])
    with pytest.raises(SystemExit) as exc:  # and the next command's setup errors are one line again
        main(["fit", "--model", "lit_qlearn.algorithms.TD3", "--model.init_args.gamma", "1.5", "--data",
              "lit_qlearn.data.OfflineDataModule", "--data.init_args.dataset", str(hopper)])
    assert exc.value.code == 2


def test_help_goes_to_stdout():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "lit_qlearn.cli", "--help"], capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0 and "lit-qlearn fit" in proc.stdout and not proc.stderr.strip()


# ------------------------------------------------------------ errors before work


def test_datasets_make_rejects_an_unknown_name_before_drawing_a_bar(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["datasets", "make", "unknown-name-v5"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    # one line, no tqdm bar before it ("unknown-name-v5:   0%|" would be the bar's first frame)
    assert err.count("\n") == 1 and "%|" not in err and "\r" not in err
    assert err.startswith("lit-qlearn datasets: error: dataset 'unknown-name-v5' is not one lit_qlearn makes; these "
                          "are:")
    from lit_qlearn.data.names import dataset_names

    assert "hopper-medium-v5" in dataset_names() and all(name in err for name in dataset_names())


@pytest.mark.parametrize("command", [["collect", "Hopper-v5"], ["datasets", "make", "hopper-random-v5", "--path"]])
def test_an_output_in_a_missing_directory_is_an_error_and_creates_nothing(command, tmp_path, capsys, monkeypatch):
    import importlib

    def rolled(*args, **kwargs):
        raise AssertionError("an environment was made before the output directory was checked")

    monkeypatch.setattr(importlib.import_module("lit_qlearn.datasets.collect"), "make_vector_env", rolled)
    target = tmp_path / "no-such-dir" / "out.hdf5"
    with pytest.raises(SystemExit) as exc:
        main([*command, str(target), "--steps", "100"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "%|" not in err
    assert f"error: {tmp_path / 'no-such-dir'}: directory does not exist (create it first)" in err
    assert "out.hdf5" in err and not (tmp_path / "no-such-dir").exists()


def _minari_case(case, tmp_path, monkeypatch):
    """(minari dataset id, expected error) for each way --minari's output can be wrong."""
    root = tmp_path / "minari"
    if case == "malformed id":
        monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
        return "lit_qlearn/hopper/random", "minari dataset id 'lit_qlearn/hopper/random' is malformed " \
                                           "(expected '(namespace/)name-vN')"
    if case == "id taken":
        monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
        (root / "mine" / "walk-v0" / "data").mkdir(parents=True)
        return "mine/walk-v0", f"{root / 'mine' / 'walk-v0'}: minari dataset 'mine/walk-v0' already exists"
    blocker = tmp_path / "a-file"  # a datasets root under a file: no directory can be made there
    blocker.write_text("")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(blocker / "minari"))
    return "mine/walk-v0", f"{blocker / 'minari'}: cannot create the directory"


@pytest.mark.parametrize("case", ["malformed id", "id taken", "unwritable root"])
def test_datasets_make_checks_the_minari_output_before_making_anything(case, tmp_path, capsys, monkeypatch):
    import importlib.util

    import lit_qlearn.datasets.generated as generated

    def made(*args, **kwargs):
        raise AssertionError("the dataset was made before the --minari output was checked")

    monkeypatch.setattr(generated, "make_dataset", made)
    dataset_id, expected = _minari_case(case, tmp_path, monkeypatch)
    if importlib.util.find_spec("minari") is None:  # the first check of all
        expected = "writing a Minari dataset needs the minari package: pip install 'lit-qlearn[minari]'"
    with pytest.raises(SystemExit) as exc:
        main(["datasets", "make", "hopper-random-v5", "--steps", "100", "--path", str(tmp_path / "r.hdf5"),
              "--minari", dataset_id])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "%|" not in err  # one line, before any bar
    assert err.startswith(f"lit-qlearn datasets: error: {expected}")
    assert not (tmp_path / "r.hdf5").exists()


def test_fit_prints_no_lightningcli_args_warning(capsys, monkeypatch):
    # As the console script runs it: sys.argv holds the same command line main() is given,
    # which LightningCLI (handed it as `args`) used to warn about on every `lit-qlearn fit`.
    import warnings

    monkeypatch.setattr("sys.argv", ["lit-qlearn", "fit", "--help"])
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as exc:
        warnings.simplefilter("always")
        main(["fit", "--help"])
    assert exc.value.code == 0 and "--trainer.max_steps" in capsys.readouterr().out
    assert not [w for w in caught if "args parameter" in str(w.message)]


def test_a_fit_with_step_checkpoints_prints_none_of_lightnings_inapplicable_warnings(tmp_path):
    # A real `lit-qlearn fit` as a user types it (its own process, the console script's
    # sys.argv), with a ModelCheckpoint every 10 updates of a manually optimised module:
    # neither LightningCLI's "args parameter" warning, nor ModelCheckpoint's 15 lines on
    # manual optimisation, nor torch's LeafSpec note to Lightning reach the console.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    argv = ["fit", "--model", "lit_qlearn.algorithms.DQN", "--model.hidden", "[8]", "--data",
            "lit_qlearn.data.OnlineDataModule", "--data.env_id", "CartPole-v1", "--data.learning_starts", "64",
            "--data.batch_size", "32", "--trainer.max_steps", "30", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=10",
            "--trainer.callbacks.save_top_k=-1"]
    code = "import sys; from lit_qlearn.cli import main; sys.argv = ['lit-qlearn', *sys.argv[1:]]; main()"
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = sorted(p.name for p in tmp_path.rglob("*.ckpt"))
    assert saved == ["epoch=0-step=10.ckpt", "epoch=0-step=20.ckpt", "epoch=0-step=30.ckpt"]  # the checkpoints were written
    console = proc.stdout + proc.stderr
    for message in ("args parameter", "manual optimization", "LeafSpec"):
        assert message not in console, console[-2000:]
