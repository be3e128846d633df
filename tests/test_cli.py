import math
from pathlib import Path

import numpy as np
import pytest

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
    main(["fit", "--config", str(ROOT / "configs/td3_no_ema_layernorm.yaml"), "--data.dataset", str(hopper),
          "--data.batch_size", "32", "--trainer.max_steps", "6", "--model.init_args.eval_every", "0",
          "--trainer.enable_progress_bar", "false"])
    logs = list((tmp_path / "lightning_logs" / "td3_no_ema").glob("version_*"))
    assert len(logs) == 1
    config = (logs[0] / "config.yaml").read_text()
    assert "lit_qlearn.callbacks.EMATarget" in config and "critic_norm: layer" in config
    (ckpt,) = logs[0].glob("checkpoints/*.ckpt")
    assert "step=6" in ckpt.name


def test_demo_trains_and_evaluates(hopper, tmp_path, capsys):
    result = demo(["--dataset", str(hopper), "--steps", "20", "--episodes", "1", "--logdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "20 updates" in out and "normalized score" in out
    assert math.isfinite(result["return"]) and math.isfinite(result["normalized_score"])
    assert list(tmp_path.glob("demo/version_0/events.out.tfevents.*"))


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train"])
    assert exc.value.code == 2
    assert "lit-qlearn fit" in capsys.readouterr().err
