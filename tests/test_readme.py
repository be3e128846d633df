"""Every ```python block of README.md runs as written.

What the tests change around the text, never in it:

* ``lightning.Trainer`` is a subclass that caps ``max_steps`` at ``STEPS`` (the README's
  100,000 updates, or no limit, would take hours) and records itself, so that a test can
  check the run really trained;
* ``$LIT_QLEARN_DATA_DIR`` is a temporary directory holding the ``"default"`` dataset at
  5,000 steps (the real one is 100k, made by ``lit-qlearn datasets make default``; an
  existing file is reused whatever its size, so the quick start's ``ensure_default_dataset()``
  and ``OfflineDataModule("default")`` find this one);
* the working directory is a temporary one (``lightning_logs`` goes there).
"""
import builtins
import re
import symtable
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

README = (Path(__file__).parents[1] / "README.md").read_text()
Trainer = L.Trainer  # the real one, for the tests' own runs
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
STEPS = 3
DEFAULT_STEPS = 5_000

# A block that uses names it does not define continues the block before it, as a reader
# running the README top to bottom would. Only this one may: every other block runs in a
# fresh namespace, so a missing import in it fails.
CONTINUATIONS = {"crash = CrashPredictor(": {"L", "model", "dm"}}


def free_names(code: str) -> set[str]:
    """Names ``code`` reads (at top level or in its functions and classes) that it neither
    assigns, imports nor defines, and that are not builtins."""
    top = symtable.symtable(code, "README.md", "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    used, tables = set(), [top]
    while tables:
        table = tables.pop()
        tables.extend(table.get_children())
        used |= {s.get_name() for s in table.get_symbols()
                 if s.is_referenced() and (table is top or s.is_global())}
    return used - defined - set(dir(builtins))


def block(marker: str) -> int:
    """The index of the one block that contains ``marker``."""
    found = [i for i, code in enumerate(BLOCKS) if marker in code]
    assert len(found) == 1, f"README.md: {len(found)} python blocks contain {marker!r}, expected 1"
    return found[0]


QUICK_START, CRASH, MY_ALGORITHM, ONLINE, ON_POLICY, PLAIN_LOOP, SB3, FABRIC, CROSSQ = (block(m) for m in (
    "OfflineDataModule(\"default\"", "crash = CrashPredictor(", "class MyDQN", "OnlineDataModule(\"CartPole-v1\"",
    "OnPolicyDataModule(\"CartPole-v1\"", "monitor = Monitor(", "MonitorCallback(", "fabric = Fabric(",
    "model = CrossQ("))


def block_id(code: str) -> str:
    return next(line for line in code.splitlines() if line.strip() and not line.startswith(("import", "from")))[:40]


@pytest.fixture(scope="module")
def readme_env(tmp_path_factory):
    """The temporary data directory with a small "default" dataset, made once."""
    from lit_qlearn.datasets import ensure_default_dataset

    data_dir = tmp_path_factory.mktemp("readme_data")
    mp = pytest.MonkeyPatch()
    mp.setenv("LIT_QLEARN_DATA_DIR", str(data_dir))
    path = ensure_default_dataset(steps=DEFAULT_STEPS, progress=lambda n: None)
    yield path
    mp.undo()


@pytest.fixture
def trainers(monkeypatch, tmp_path, readme_env):
    """Every Trainer a block makes, with max_steps capped at STEPS."""
    monkeypatch.setenv("LIT_QLEARN_DATA_DIR", str(readme_env.parent))
    monkeypatch.chdir(tmp_path)
    made = []

    class CappedTrainer(L.Trainer):
        def __init__(self, *args, max_steps: int = -1, **kwargs):
            kwargs.setdefault("enable_progress_bar", False)
            super().__init__(*args, max_steps=STEPS if max_steps < 0 else min(max_steps, STEPS), **kwargs)
            made.append(self)

    monkeypatch.setattr(L, "Trainer", CappedTrainer)
    return made


def run_block(index: int, namespaces: dict[int, dict]) -> dict:
    """Run block ``index`` as written (after the block it continues, if it is a continuation)."""
    code = BLOCKS[index]
    free = free_names(code)
    if not free:
        namespace: dict = {}
    else:
        allowed = [names for marker, names in CONTINUATIONS.items() if marker in code]
        assert allowed and free <= allowed[0], f"README block {index} ({block_id(code)!r}) uses {free} undefined"
        namespace = dict(namespaces.get(index - 1) or run_block(index - 1, namespaces))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        warnings.simplefilter("always", DeprecationWarning)
        exec(compile(code, f"README.md block {index}", "exec"), namespace)
    # a renamed argument warns at its caller: the README teaches the current names only
    deprecated = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
                  and str(w.filename).startswith("README.md")]
    assert not deprecated, f"README block {index} ({block_id(code)!r}) uses deprecated names: {deprecated}"
    namespaces[index] = namespace
    return namespace


def test_the_readme_has_the_blocks_these_tests_expect():
    assert len(BLOCKS) == 9 and CRASH == QUICK_START + 1  # the crash block continues the quick start
    assert [free_names(BLOCKS[i]) for i in (QUICK_START, CRASH, MY_ALGORITHM, ONLINE, ON_POLICY, PLAIN_LOOP, SB3,
                                            FABRIC, CROSSQ)] == [
        set(), {"L", "model", "dm"}, set(), set(), set(), set(), set(), set(), set()]


def test_usage_trains_on_the_default_data(trainers, readme_env):
    ns = run_block(QUICK_START, {})
    (trainer,) = trainers
    assert trainer.global_step == STEPS and ns["model"].updates == STEPS
    # the file the block's "default" read: fraction=0.1 of its transitions (read here with h5py)
    import h5py

    with h5py.File(readme_env, "r") as f:
        timeouts = f["timeouts"][()]
    transitions = int((~timeouts[:-1]).sum())  # qlearning_dataset: no final row, no timeout rows
    assert transitions > DEFAULT_STEPS * 0.9
    assert ns["dm"].num_transitions == round(0.1 * transitions)
    # the monitors the block names are attached and got their probe sets from the data
    assert all(m in trainer.callbacks and m.probe is not None for m in ns["monitors"])


def test_crash_predictor_continues_the_usage_example(trainers):
    ns = run_block(CRASH, {})
    first, second = trainers
    assert second.global_step == STEPS and ns["crash"] in second.callbacks
    assert ns["crash"].checkpoint_path is None  # nothing unhealthy in 3 updates of a LayerNorm critic


def test_online_dqn_trains(trainers):
    ns = run_block(ONLINE, {})
    (trainer,) = trainers
    dm = ns["dm"]
    assert trainer.global_step == STEPS and ns["model"].updates == STEPS
    # 1000 random steps, then one phase of 256 environment steps before the first of its 128 updates
    # (less the at most n_step - 1 = 2 steps still pending their 3-step return)
    assert 1000 + 256 - 2 <= len(dm.buffer) <= 1000 + 256 and dm.hparams.prioritized


def test_online_crossq_trains(trainers):
    ns = run_block(CROSSQ, {})
    (trainer,) = trainers
    model, dm = ns["model"], ns["dm"]
    assert trainer.global_step == STEPS and model.updates == STEPS and model.target_pairs() == []
    # 5000 random steps, then one environment step per update; one critic pass per update
    assert len(dm.buffer) == 5000 + STEPS
    assert int(model.critic.members[0][0].num_batches_tracked) == STEPS


def test_pqn_trains_on_rollouts(trainers):
    ns = run_block(ON_POLICY, {})
    (trainer,) = trainers
    dm, model = ns["dm"], ns["model"]
    assert trainer.global_step == STEPS and model.updates == STEPS
    # one rollout of 4 x 128 steps serves the first 16 updates, in minibatches of 128
    assert dm.rollout.env_steps == 512 and len(dm.data.obs) == 512 and dm.minibatch_size == 128
    assert model.epsilon_steps == 250_000


def test_the_write_your_own_algorithm_example_trains(trainers):
    ns = run_block(MY_ALGORITHM, {})
    from lit_qlearn.data import OnlineDataModule

    torch.manual_seed(0)
    module = ns["MyDQN"]()
    dm = OnlineDataModule("lit_qlearn.toys:Chain-v0", learning_starts=32, batch_size=16, prioritized=True)
    seen = []

    class Watch(L.Callback):  # target == online after each update?
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(torch.equal(pl_module.q[0].weight, pl_module.q_target[0].weight))

    trainer = Trainer(max_steps=100, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[Watch()])
    trainer.fit(module, dm)
    assert module.updates == trainer.global_step == 100
    # the hard copy fires after update 100 only, inside the update; in between the target stays put
    assert seen == [False] * 99 + [True]


def test_the_plain_loop_writes_the_monitors_scalars_to_tensorboard(monkeypatch, tmp_path):
    """The plain PyTorch loop runs as written (no Trainer, no data directory) and its event file
    holds the meters' scalars at the steps measured, equal at the last one to lit_qlearn.ntk's
    SEEM on the block's critic and probe."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lit_qlearn.ntk import seem

    monkeypatch.chdir(tmp_path)
    ns = run_block(PLAIN_LOOP, {})
    acc = EventAccumulator(str(tmp_path / "runs" / "my_td3"), size_guidance={"scalars": 0})
    acc.Reload()
    events = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    for tag in ("seem/max_eig_normalized", "ntk/diag_mean", "crash/td_error_norm", "params/adam_slope"):
        assert [step for step, _ in events[tag]] == [100, 200, 300], tag
    probe, qf1, actor = ns["probe"], ns["qf1"], ns["actor"]
    with torch.no_grad():
        next_act = actor(probe.next_obs)
    ref = seem(qf1, (probe.obs, probe.act), (probe.next_obs, next_act), 0.99, scale_by_params=True, solver="dense")
    assert events["seem/max_eig_normalized"][-1][1] == pytest.approx(ref.normalized, rel=1e-5, abs=1e-7)
    assert ns["monitor"].reasons == []


def test_the_stable_baselines3_example_attaches_and_draws_its_probe(monkeypatch, tmp_path):
    """The SB3 block runs as written, ``learn`` capped at 50 updates past ``learning_starts``
    (the README's 100,000 steps would take an hour): the callback drew its probe set from the
    replay buffer when learning started, and nothing was unhealthy."""
    pytest.importorskip("stable_baselines3")
    from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm

    learn = OffPolicyAlgorithm.learn

    def capped(self, total_timesteps, *args, **kwargs):
        return learn(self, min(total_timesteps, self.learning_starts + 50), *args, **kwargs)

    monkeypatch.setattr(OffPolicyAlgorithm, "learn", capped)
    monkeypatch.chdir(tmp_path)
    ns = run_block(SB3, {})
    monitor, model = ns["monitor"], ns["model"]
    assert model.num_timesteps == 1050 and monitor.monitor is not None
    assert len(monitor.monitor.meters[0].probe.obs) == 512 and monitor.checkpoint_path is None


def test_the_fabric_loop_measures_at_its_cadence(monkeypatch, tmp_path):
    """The Fabric block runs as written: both callbacks measured at updates 100, 200 and 300 on
    256 rows of the block's data, SEEM equal at the last one to lit_qlearn.ntk's on its critic,
    and the random data's critic never left the bound."""
    from lit_qlearn.ntk import seem

    monkeypatch.chdir(tmp_path)
    ns = run_block(FABRIC, {})
    crash, monitor = ns["predictor"], ns["seem_monitor"]
    assert crash.last_step == monitor.last_step == 300 and not crash.should_stop
    assert len(monitor.probe.obs) == 256 and crash.bound == pytest.approx(ns["data"].rew.abs().max().item() / 0.01)
    probe, qf1, actor = monitor.probe, ns["qf1"], ns["actor"]
    with torch.no_grad():
        next_act = actor(probe.next_obs)
    ref = seem(qf1, (probe.obs, probe.act), (probe.next_obs, next_act), 0.99, scale_by_params=True, solver="dense")
    assert monitor.core.measure(ns["agent"], 300)["seem/max_eig_normalized"] == pytest.approx(ref.normalized,
                                                                                              rel=1e-5, abs=1e-7)


def test_the_public_names_of_the_design_document_import():
    """docs/design.md section 3 lists the stable imports: every one of them exists."""
    design = (Path(__file__).parents[1] / "docs" / "design.md").read_text()
    section = design.split("## 3. Public names")[1].split("\n## ")[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    assert block.count("from lit_qlearn.") >= 10
    namespace: dict = {}
    exec(compile(block, "docs/design.md section 3", "exec"), namespace)
    assert namespace["CrashPredictor"].__module__ == "lit_qlearn.callbacks.crash"
