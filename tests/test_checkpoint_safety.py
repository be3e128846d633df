"""Checkpoints run no code (issue 19, item 2) and Ctrl-C at the command line (item 5).

Each entry point that reads a checkpoint is handed one with a payload that would touch a
marker file if it ran: ``Trainer.fit(ckpt_path=...)`` with an OnlineDataModule,
``lit-qlearn fit --ckpt_path`` and ``lit-qlearn collect --policy``. The marker must not
exist afterwards, unless the user opted in by name (``trust_checkpoint=True``,
``--policy-class``), where it must, which shows the payload was live. Broken files are
one line naming the file, never advice to load with ``weights_only=False``.
"""
from __future__ import annotations

import logging
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import cloudpickle
import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_qlearn.algorithms import DQN
from lit_qlearn.cli import main
from lit_qlearn.data import DatasetError, OnlineDataModule, make_vector_env

ROOT = Path(__file__).parents[1]
CHAIN = "lit_qlearn.toys:Chain-v0"
DM = dict(num_envs=2, learning_starts=40, batch_size=8, capacity=500, n_step=2, seed=3)
# the same run on the command line (the checkpoint's own hyper-parameters fill in the model's)
CLI_FIT = ["fit", "--model", "lit_qlearn.algorithms.DQN", "--data", "lit_qlearn.data.OnlineDataModule",
           "--data.init_args.env_id", CHAIN, "--data.init_args.num_envs", "2", "--data.init_args.learning_starts", "40",
           "--data.init_args.batch_size", "8", "--data.init_args.capacity", "500", "--data.init_args.n_step", "2",
           "--data.init_args.seed", "3", "--trainer.max_steps", "8", "--trainer.logger", "false",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false",
           "--trainer.enable_model_summary", "false"]


def _module() -> DQN:
    return DQN(gamma=0.9, critic_hidden=(8,), epsilon_steps=50, target_every=3)


def _fit(steps, dm, ckpt_path=None, callbacks=(), root=None, module=None):
    module = module or _module()
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=bool(callbacks), callbacks=list(callbacks), accelerator="cpu",
                        default_root_dir=root)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer, module


def _touch_then(marker: str, value):
    """What the payload runs when unpickled: a visible side effect, then the real value
    (so that a trusted resume still works and shows the code did run)."""
    pathlib.Path(marker).touch()
    return value


class _Payload:
    def __init__(self, marker, value):
        self.marker, self.value = str(marker), value

    def __reduce__(self):
        return _touch_then, (self.marker, self.value)


@pytest.fixture(scope="module")
def online_ckpt(tmp_path_factory):
    """A 6-update online DQN checkpoint (its buffer and pickled environments inside), and
    a copy whose environments blob carries a payload."""
    root = tmp_path_factory.mktemp("online")
    L.seed_everything(0, verbose=False)
    trainer, _ = _fit(6, OnlineDataModule(CHAIN, **DM), root=root)
    good = root / "good.ckpt"
    trainer.save_checkpoint(good)
    ckpt = torch.load(good, weights_only=True)
    # what `lit-qlearn fit` stores beside the model's arguments (LightningCLI's resume reads them)
    ckpt["hyper_parameters"].update(_class_path="lit_qlearn.algorithms.DQN",
                                    _instantiator="lightning.pytorch.cli.instantiate_module")
    torch.save(ckpt, good)
    state = ckpt["OnlineDataModule"]["ranks"][0]
    envs, obs, ret, length = pickle.loads(state["envs"].numpy().tobytes())  # our own file, just written
    marker = root / "payload-ran"
    blob = cloudpickle.dumps((_Payload(marker, envs), obs, ret, length))
    state["envs"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    evil = root / "payload.ckpt"
    torch.save(ckpt, evil)
    return good, evil, marker, obs


def _trust_warnings(caught):
    return [w for w in caught if "trust_checkpoint" in str(w.message)]


# ------------------------------------------------------------------ Trainer.fit(ckpt_path=...)
def test_resume_restores_buffer_and_counters_and_resets_the_environments(online_ckpt, tmp_path):
    good, evil, marker, saved_obs = online_ckpt
    saved = torch.load(good, weights_only=True)["OnlineDataModule"]["ranks"][0]
    seen = {}

    class Restored(L.Callback):  # the state the checkpoint left, before the first resumed update
        def on_train_start(self, trainer, pl_module):
            dm = trainer.datamodule
            seen.update(env_steps=dm.rollout.env_steps, buffer=dm.buffer.state_dict(), obs=dm.rollout.obs.copy(),
                        generator=dm._generator.get_state().clone(), since_phase=dm._since_phase)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(8, OnlineDataModule(CHAIN, **DM), ckpt_path=evil, callbacks=[Restored()], root=tmp_path)
    assert not marker.exists(), "the checkpoint's pickled environments were unpickled without trust_checkpoint"
    (warning,) = _trust_warnings(caught)  # one warning, naming the option
    assert "restart from a reset" in str(warning.message)
    # the buffer, sampler, phase and step count are the file's
    assert seen["env_steps"] == saved["env_steps"] == 40 + 6 * 2
    assert seen["since_phase"] == saved["since_phase"] and torch.equal(seen["generator"], saved["generator"])
    assert seen["buffer"]["size"] == saved["buffer"]["size"] > 0
    for name, rows in saved["buffer"]["data"].items():
        assert torch.equal(seen["buffer"]["data"][name], rows), name
    # the environments: a fresh episode seeded seed + env_steps (what a fresh vector env resets to),
    # not the pickled ones' state
    fresh, _ = make_vector_env(CHAIN, 2).reset(seed=DM["seed"] + saved["env_steps"])
    np.testing.assert_array_equal(seen["obs"], fresh)
    assert not np.array_equal(fresh, saved_obs)  # so the comparison above tells the two apart


def test_trusted_resume_continues_the_environments_exactly(online_ckpt, tmp_path):
    # an uninterrupted run of 12 updates, checkpointed at 6
    L.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1, filename="{step}")
    dm = OnlineDataModule(CHAIN, **DM)
    _, module = _fit(12, dm, callbacks=[ckpt])
    straight = dm.buffer.state_dict()["data"]

    def resumed(trust):
        L.seed_everything(99, verbose=False)  # the checkpoint must restore every RNG
        dm2 = OnlineDataModule(CHAIN, **DM, trust_checkpoint=trust)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, module2 = _fit(12, dm2, ckpt_path=tmp_path / "step=6.ckpt")
        return dm2.buffer.state_dict()["data"], module2, _trust_warnings(caught)

    rows, module2, caught = resumed(True)
    assert not caught
    for name in straight:  # every transition, those stepped after the resume included
        assert torch.equal(rows[name], straight[name]), name
    for (key, a), b in zip(module.state_dict().items(), module2.state_dict().values()):
        assert torch.equal(a, b), key
    # without trust the environments restart: the transitions after the resume differ
    rows, _, caught = resumed(False)
    assert len(caught) == 1 and not torch.equal(rows["obs"], straight["obs"])

    # and trust_checkpoint=True does unpickle: the planted payload runs
    good, evil, marker, _ = online_ckpt
    _fit(8, OnlineDataModule(CHAIN, **DM, trust_checkpoint=True), ckpt_path=evil)
    assert marker.exists()
    marker.unlink()


def test_a_checkpoint_cannot_grant_itself_trust(online_ckpt, tmp_path):
    # trust is an argument, never a stored hyper-parameter: a file claiming it changes nothing
    good, evil, marker, _ = online_ckpt
    ckpt = torch.load(evil, weights_only=True)
    assert "trust_checkpoint" not in ckpt["datamodule_hyper_parameters"]
    ckpt["datamodule_hyper_parameters"]["trust_checkpoint"] = True
    torch.save(ckpt, tmp_path / "claims-trust.ckpt")
    dm = OnlineDataModule.load_from_checkpoint(tmp_path / "claims-trust.ckpt")
    assert dm.trust_checkpoint is False
    with pytest.warns(UserWarning, match="trust_checkpoint"):
        _fit(8, dm, module=_module())
    assert not marker.exists()


# ------------------------------------------------------------------ lit-qlearn fit --ckpt_path
def test_cli_fit_resume_refuses_the_payload_unless_trusted(online_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    good, evil, marker, _ = online_ckpt
    with pytest.warns(UserWarning, match="trust_checkpoint"):
        main([*CLI_FIT, "--ckpt_path", str(evil)])
    assert not marker.exists()
    # the option as the warning names it
    main([*CLI_FIT, "--data.trust_checkpoint", "true", "--ckpt_path", str(evil)])
    assert marker.exists()
    marker.unlink()


def _module_with_side_effect(tmp_path, monkeypatch, name):
    """A module on sys.path whose import touches a marker (and defines a usable class)."""
    marker = tmp_path / f"{name}-imported"
    (tmp_path / f"{name}.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).touch()\n"
        "from lit_qlearn.algorithms import DQN\n"
        "class Algo(DQN):\n"
        "    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return marker


def _one_line_error(capsys, code, *expected):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    for text in expected:
        assert text in lines[0], err
    assert "weights_only=False" not in err and "Traceback" not in err
    return lines[0]


def test_cli_fit_imports_no_class_a_checkpoint_names(online_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    marker = _module_with_side_effect(tmp_path, monkeypatch, "fit_side_effect")
    ckpt = torch.load(online_ckpt[0], weights_only=True)
    ckpt["hyper_parameters"]["_class_path"] = "fit_side_effect.Algo"  # LightningCLI would import it
    torch.save(ckpt, tmp_path / "names-a-class.ckpt")
    with pytest.raises(SystemExit) as exc:  # (--model DQN given: Lightning would replace it by the file's)
        main([*CLI_FIT, "--ckpt_path", str(tmp_path / "names-a-class.ckpt")])
    _one_line_error(capsys, exc.value.code, "names-a-class.ckpt", "'fit_side_effect.Algo'",
                    "--model fit_side_effect.Algo")
    assert not marker.exists() and "fit_side_effect" not in sys.modules


def test_cli_fit_loads_even_a_remote_checkpoint_weights_only():
    # Lightning's own default for a URL is weights_only=False (a remote pickle runs); the
    # command's is True unless the user types --weights_only false
    from lit_qlearn.cli import _check_ckpt_path

    config = {"ckpt_path": "https://example.org/run.ckpt", "weights_only": None}
    _check_ckpt_path(config)
    assert config["weights_only"] is True
    config = {"ckpt_path": "https://example.org/run.ckpt", "weights_only": False}
    _check_ckpt_path(config)
    assert config["weights_only"] is False
    with pytest.raises(DatasetError, match="trust_checkpoint must be True or False, got 'false'"):
        OnlineDataModule(CHAIN, trust_checkpoint="false")



# ------------------------------------------------------------------ load_from_checkpoint in Python
@pytest.mark.parametrize("loader", ["module", "datamodule", "collect"])
@pytest.mark.parametrize("key", ["_instantiator", "_class_path"])
def test_load_from_checkpoint_imports_nothing_a_checkpoint_names(key, loader, online_ckpt, tmp_path, monkeypatch):
    # Lightning refuses both keys itself from 2.6.6 on; an older Lightning imported them. Its
    # allowlist is widened here to the file's names, as an older Lightning would behave: the
    # refusal must be lit_qlearn's own.
    import lightning.pytorch.core.saving as saving

    name = f"{key.strip('_')}_{loader}_side_effect"
    marker = _module_with_side_effect(tmp_path, monkeypatch, name)
    ckpt = torch.load(online_ckpt[0], weights_only=True)
    hparams = ckpt["datamodule_hyper_parameters" if loader == "datamodule" else "hyper_parameters"]
    if key == "_instantiator":
        hparams["_instantiator"] = f"{name}.Algo"
        monkeypatch.setattr(saving, "_ALLOWED_INSTANTIATORS", {*saving._ALLOWED_INSTANTIATORS, f"{name}.Algo"})
    else:
        hparams["_class_path"] = f"{name}.Algo"
        monkeypatch.setattr(saving, "_is_imported_subclass", lambda *args: True, raising=False)
    path = tmp_path / "names-code.ckpt"
    torch.save(ckpt, path)
    from lit_qlearn.data.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=rf"{path}: its hyper-parameters name the \w+ '{name}.Algo'"):
        if loader == "module":
            DQN.load_from_checkpoint(path)
        elif loader == "datamodule":
            OnlineDataModule.load_from_checkpoint(path)
        else:
            from lit_qlearn.datasets import collect

            collect(CHAIN, path, steps=20, path=tmp_path / "d.hdf5")
    assert not marker.exists() and name not in sys.modules


# ------------------------------------------------------------------ lit-qlearn collect --policy
def test_collect_builds_lit_qlearns_own_class_from_a_checkpoint(online_ckpt, tmp_path):
    from lit_qlearn.data import read_d4rl

    good = online_ckpt[0]
    main(["collect", CHAIN, str(tmp_path / "d.hdf5"), "--policy", str(good), "--steps", "20"])
    data = read_d4rl(tmp_path / "d.hdf5")
    # the checkpoint's greedy policy, computed here from its weights
    module = DQN.load_from_checkpoint(good, map_location="cpu")
    np.testing.assert_array_equal(data["actions"], module.act(data["observations"]))


def test_collect_imports_no_class_a_checkpoint_names(online_ckpt, tmp_path, monkeypatch, capsys):
    marker = _module_with_side_effect(tmp_path, monkeypatch, "collect_side_effect")
    ckpt = torch.load(online_ckpt[0], weights_only=True)
    # a checkpoint of the user's class, as `lit-qlearn fit` writes it; then one naming DQN in the
    # package's key but the user's class in the hyper-parameters Lightning rebuilds from
    ckpt["lit_qlearn_class"] = ckpt["hyper_parameters"]["_class_path"] = "collect_side_effect.Algo"
    torch.save(ckpt, tmp_path / "names-a-class.ckpt")
    ckpt["lit_qlearn_class"] = "lit_qlearn.algorithms.dqn.DQN"
    torch.save(ckpt, tmp_path / "hparams-name-a-class.ckpt")
    out = tmp_path / "d.hdf5"
    with pytest.raises(SystemExit) as exc:
        main(["collect", CHAIN, str(out), "--policy", str(tmp_path / "hparams-name-a-class.ckpt"), "--steps", "20"])
    _one_line_error(capsys, exc.value.code, "hparams-name-a-class.ckpt", "'collect_side_effect.Algo'")
    with pytest.raises(SystemExit) as exc:
        main(["collect", CHAIN, str(out), "--policy", str(tmp_path / "names-a-class.ckpt"), "--steps", "20"])
    _one_line_error(capsys, exc.value.code, "names-a-class.ckpt", "'collect_side_effect.Algo'",
                    "--policy-class collect_side_effect:Algo")
    assert not marker.exists() and "collect_side_effect" not in sys.modules and not out.exists()
    # named by the user, the class is imported and used
    main(["collect", CHAIN, str(out), "--policy", str(tmp_path / "names-a-class.ckpt"), "--steps", "20",
          "--policy-class", "collect_side_effect:Algo"])
    assert marker.exists() and out.exists()


# ------------------------------------------------------------------ broken files
def _broken(kind, good, tmp_path):
    path = tmp_path / f"{kind}.ckpt"
    data = good.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("model weights: see README\n")
    elif kind == "pickled-code":  # a payload in the pickle itself: torch.load(weights_only=True) refuses it
        torch.save({"state_dict": {}, "x": _Payload(tmp_path / "ran", 1)}, path)
    return path


BROKEN = {"empty": "empty file", "truncated": "truncated or corrupt", "text": "not a checkpoint",
          "pickled-code": "holds pickled Python objects"}


@pytest.mark.parametrize("command", ["fit", "collect"])
@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_broken_checkpoint_is_one_line(kind, command, online_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = _broken(kind, online_ckpt[0], tmp_path)
    argv = ([*CLI_FIT, "--ckpt_path", str(path)] if command == "fit" else
            ["collect", CHAIN, str(tmp_path / "d.hdf5"), "--policy", str(path), "--steps", "20"])
    with pytest.raises(SystemExit) as exc:
        main(argv)
    line = _one_line_error(capsys, exc.value.code, f"{path}: ", BROKEN[kind])
    assert line.startswith(f"lit-qlearn {command}: error:")
    assert not (tmp_path / "ran").exists()



@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_broken_checkpoint_given_to_trainer_fit_is_one_line(kind, online_ckpt, tmp_path):
    # The Python route: Trainer.fit(ckpt_path=...) loads the file itself, after setup
    path = _broken(kind, online_ckpt[0], tmp_path)
    from lit_qlearn.data.checkpoint import CheckpointError

    with pytest.raises(CheckpointError) as exc:
        _fit(8, OnlineDataModule(CHAIN, **DM), ckpt_path=path, root=tmp_path)
    message = str(exc.value)
    assert message.startswith(f"{path}: ") and BROKEN[kind] in message and "\n" not in message
    assert "weights_only=False" not in message
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_broken_checkpoint_given_to_load_from_checkpoint_is_one_line(kind, online_ckpt, tmp_path):
    path = _broken(kind, online_ckpt[0], tmp_path)
    from lit_qlearn.data.checkpoint import CheckpointError

    for cls in (DQN, OnlineDataModule):
        with pytest.raises(CheckpointError) as exc:
            cls.load_from_checkpoint(path)
        message = str(exc.value)
        assert message.startswith(f"{path}: ") and BROKEN[kind] in message and "\n" not in message
        assert "weights_only=False" not in message
    assert not (tmp_path / "ran").exists()
    # the caller's own word that the file may hold objects: read by Lightning, as asked
    if kind == "pickled-code":
        with pytest.raises(Exception) as exc:
            DQN.load_from_checkpoint(path, weights_only=False)
        assert not isinstance(exc.value, CheckpointError) and (tmp_path / "ran").exists()


def test_cli_weights_only_false_is_the_users_opt_in(online_ckpt, tmp_path):
    # --weights_only false: the user trusts the file, so the command's own reading of it as
    # data steps aside and Lightning loads it as asked; without the flag it is refused
    from lit_qlearn.cli import _check_ckpt_path
    from lit_qlearn.data.checkpoint import CheckpointError

    path = _broken("pickled-code", online_ckpt[0], tmp_path)
    with pytest.raises(CheckpointError, match="holds pickled Python objects"):
        _check_ckpt_path({"ckpt_path": str(path), "weights_only": None})
    config = {"ckpt_path": str(path), "weights_only": False}
    _check_ckpt_path(config)
    assert config["weights_only"] is False and not (tmp_path / "ran").exists()

# ------------------------------------------------------------------ Ctrl-C
def _exit_status(argv):
    try:
        main(argv)
    except KeyboardInterrupt:  # (not let through: pytest would take it for its own Ctrl-C)
        pytest.fail("Ctrl-C left main() as a KeyboardInterrupt: a traceback at the command line")
    except SystemExit as exc:
        return exc.code
    pytest.fail("main() returned normally")


def test_ctrl_c_outside_training_is_one_line_and_status_130(monkeypatch, capsys):
    import lit_qlearn.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "collect_main", interrupted)
    assert _exit_status(["collect", "CartPole-v1", "x.hdf5"]) == 130
    assert capsys.readouterr().err == "lit-qlearn collect: interrupted\n"


def test_ctrl_c_in_any_commands_trainer_is_one_line_and_status_130(monkeypatch, capsys):
    # a Trainer the command does not configure, with Lightning's console quietened (as the
    # demo's): neither a callback of the CLI's nor Lightning's notice tells of the Ctrl-C
    import lit_qlearn.cli as cli

    def trains(args):
        _fit(1000, OnlineDataModule(CHAIN, **DM), module=SignalsItself(gamma=0.9, critic_hidden=(8,)))

    monkeypatch.setattr(cli, "demo", trains)
    lightning_log = logging.getLogger("lightning.pytorch")
    outer, level = signal.getsignal(signal.SIGINT), lightning_log.level
    # Python's own Ctrl-C handler, as in a terminal (a run started in the background by a
    # non-interactive shell inherits SIGINT ignored, and then no Ctrl-C arrives at all)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    lightning_log.setLevel(logging.WARNING)
    try:
        status = _exit_status(["demo"])
        after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, outer)
        lightning_log.setLevel(level)
    assert after is signal.default_int_handler  # main() put Python's handler back
    assert status == 130
    assert capsys.readouterr().err.splitlines()[-1] == "lit-qlearn demo: interrupted"


class SignalsItself(DQN):
    """A run that receives a real SIGINT during its third update, as from Ctrl-C."""

    def update(self, batch):
        if self.updates == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return super().update(batch)


def test_ctrl_c_during_fit_is_one_line_and_status_130(tmp_path):
    # a real process (the console Lightning logs to, imported as `lit-qlearn` imports it), sent
    # SIGINT during its third update: the Trainer catches the KeyboardInterrupt itself (logs a
    # notice, shuts down, exits 1); the command still says one line and exits 130
    argv = [*CLI_FIT, "--trainer.max_steps", "1000"]
    argv[argv.index("lit_qlearn.algorithms.DQN")] = "tests.test_checkpoint_safety.SignalsItself"
    # the child starts with SIGINT's default disposition, as from a terminal, even when this
    # test runs in the background of a non-interactive shell (which would hand it SIGINT ignored)
    proc = subprocess.run([sys.executable, "-m", "lit_qlearn.cli", *argv], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == "lit-qlearn fit: interrupted"
    assert "KeyboardInterrupt" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
