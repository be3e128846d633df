"""``compile=True``: the networks' forwards compiled in place; the same numbers as eager
where no random numbers are drawn inside a compiled graph, unchanged state_dict keys, and
eager execution with a warning where torch.compile is unavailable."""
import lightning as L
import pytest
import torch

from lit_qlearn.algorithms import CQL, DDPG, DQN, IQL, SAC, TD3, TD3BC, CrossQ, PreQN
from lit_qlearn.callbacks import SEEMMonitor
from lit_qlearn.data import OfflineDataModule, OnlineDataModule

from tests.conftest import fit

SMALL = dict(critic_hidden=(16,), actor_hidden=(16,), eval_every=0)


def chain(chain_file):
    return OfflineDataModule(str(chain_file), batch_size=16, normalize_states=False, steps_per_epoch=50)


def test_compiled_ddpg_matches_eager(chain_file):
    """DDPG draws no random numbers in its update: compiled and eager runs agree to
    float rounding (the compiled kernels fuse differently)."""
    runs = {}
    for compiled in (False, True):
        L.seed_everything(0, verbose=False)
        module = DDPG(compile=compiled, **SMALL)
        fit(module, chain(chain_file), 8)
        runs[compiled] = module
    assert runs[True]._compiled and not runs[False]._compiled
    assert runs[True].critic._compiled_call_impl is not None and runs[True].actor_target._compiled_call_impl is not None
    eager, compiled = runs[False].state_dict(), runs[True].state_dict()
    assert list(eager) == list(compiled)  # checkpoints and the probe protocol see the same module
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], atol=1e-5, rtol=1e-4, msg=key)
    assert runs[True].hparams.compile is True


def test_compile_falls_back_to_eager_with_a_warning(chain_file, monkeypatch):
    def unavailable(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore lines")

    monkeypatch.setattr(torch, "compile", unavailable)
    L.seed_everything(0, verbose=False)
    module = TD3(compile=True, **SMALL)
    with pytest.warns(UserWarning, match=r"TD3\(compile=True\): torch.compile is unavailable here "
                                         r"\(RuntimeError: no C\+\+ compiler found\); running eagerly"):
        fit(module, chain(chain_file), 3)
    assert not module._compiled and module.critic._compiled_call_impl is None and module.updates == 3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["TD3", "TD3BC", "SAC", "PreQN", "CQL", "IQL", "CrossQ", "DQN"])
def test_every_algorithm_trains_compiled_under_a_monitor(name, chain_file):
    L.seed_everything(0, verbose=False)
    if name == "DQN":
        module = DQN(critic_hidden=(16,), target_every=3, epsilon_steps=20, compile=True)
        dm = OnlineDataModule("lit_qlearn.toys:Chain-v0", learning_starts=40, batch_size=16, capacity=200)
    else:
        module, dm = {"TD3": TD3, "TD3BC": TD3BC, "SAC": SAC, "PreQN": PreQN, "CQL": CQL, "IQL": IQL,
                       "CrossQ": CrossQ}[name](compile=True, **SMALL), \
            chain(chain_file)
    monitor = SEEMMonitor(every_n_steps=5, probe_size=16)
    trainer = fit(module, dm, 10, callbacks=[monitor])
    assert module._compiled and module.updates == 10
    assert torch.isfinite(trainer.callback_metrics["seem/max_eig_normalized"])


def test_a_compile_mode_reaches_torch_compile_and_a_wrong_one_is_named(chain_file, monkeypatch):
    """``compile="reduce-overhead"`` (CUDA graphs on a GPU) compiles every network with that
    mode; True compiles with torch's default mode; anything else is refused at construction."""
    modes = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, mode=None, **k: modes.append(mode))
    for value, expected in (("reduce-overhead", "reduce-overhead"), (True, None), ("max-autotune", "max-autotune")):
        modes.clear()
        module = TD3(compile=value, obs_dim=3, act_dim=1, **SMALL)
        assert module.compile_all() and modes == [expected] * 4  # actor, critic and their targets
    modes.clear()
    DQN(critic_hidden=(16,), compile="reduce-overhead", obs_shape=(3,), num_actions=2).compile_all()
    assert modes == ["reduce-overhead"] * 2  # the Q-network and its target
    for bad in ("fast", 1, "Default"):
        with pytest.raises(ValueError, match=r"TD3: compile must be True, False or a torch.compile mode"):
            TD3(compile=bad, **SMALL)
    with pytest.raises(ValueError, match=r"DQN: compile must be"):
        DQN(compile="fast")
