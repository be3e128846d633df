"""The contract every algorithm shares (docs/design.md section 8), and the TD target / loss."""

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_qlearn.algorithms import DQN, TD3, TD3BC, PreQN
from lit_qlearn.callbacks import EMATarget, SEEMMonitor
from lit_qlearn.data import DataSpec, OfflineDataModule, OnlineDataModule, Transitions
from lit_qlearn.probe import ProbeProtocolError, bootstrap_target, check_probe_module
from lit_qlearn.td import td_loss, td_target
from tests.conftest import CHAIN_STATES, fit


def batch_of(n=5, discount=None, weight=None):
    g = torch.Generator().manual_seed(0)
    return Transitions(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g), torch.randn(n, generator=g),
                       torch.randn(n, 3, generator=g), torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0])[:n], discount, weight)


# ---------------------------------------------------------------- the TD target and loss
def test_td_target_by_hand():
    b = batch_of()
    v = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = [b.rew[i].item() + 0.9 * (1 - b.terminated[i].item()) * v[i].item() for i in range(5)]
    torch.testing.assert_close(td_target(b, v, 0.9), torch.tensor(expected))
    # n-step: the per-sample discount gamma^k replaces gamma; a terminated sample never bootstraps
    nstep = b._replace(discount=torch.tensor([0.9, 0.81, 0.729, 1.0, 0.5]))
    expected = [b.rew[i].item() + [0.9, 0.81, 0.729, 1.0, 0.5][i] * (1 - b.terminated[i].item()) * v[i].item()
                for i in range(5)]
    torch.testing.assert_close(td_target(nstep, v, 0.9), torch.tensor(expected))


def test_td_loss_weights_members_and_huber_by_hand():
    y = torch.tensor([0.0, 1.0, 2.0, 3.0])
    q = torch.tensor([[0.5, 1.0, 4.0, 3.0], [1.0, 0.0, 2.0, 2.0]])  # two critic members
    w = torch.tensor([1.0, 2.0, 0.5, 1.0])
    out = td_loss(q, y, w)
    member = [(w * (q[i] - y) ** 2).mean() for i in range(2)]
    torch.testing.assert_close(out.loss, member[0] + member[1])
    torch.testing.assert_close(out.td_abs, ((q - y).abs()).mean(0))
    huber = td_loss(q[0], y, kind="huber")
    # smooth L1 with threshold 1: 0.5 d^2 for |d| < 1, |d| - 0.5 beyond
    torch.testing.assert_close(huber.loss, torch.tensor([0.125, 0.0, 1.5, 0.0]).mean())
    torch.testing.assert_close(huber.td_abs, torch.tensor([0.5, 0.0, 2.0, 0.0]))
    assert not out.td_abs.requires_grad


def test_probe_bootstrap_is_the_one_td_target(tiny_td3bc):
    module, _ = tiny_td3bc()
    b = Transitions(torch.eye(CHAIN_STATES), torch.zeros(CHAIN_STATES, 1), torch.ones(CHAIN_STATES),
                    torch.eye(CHAIN_STATES).roll(1, 0), torch.tensor([0.0, 0, 0, 0, 1]),
                    discount=torch.full((CHAIN_STATES,), 0.5))
    with torch.no_grad():
        v = module.q_value(b.next_obs, module.actor(b.next_obs))
    torch.testing.assert_close(bootstrap_target(module, b), 1 + 0.5 * (1 - b.terminated) * v)


# ------------------------------------------------------------------------- the data spec
def test_spec_is_read_once_and_checked(tiny_td3bc, chain_file):
    _, dm = tiny_td3bc()
    module = TD3(eval_every=0, critic_hidden=(8,), actor_hidden=(8,))
    fit(module, dm, 1)
    assert module.spec == DataSpec.continuous(CHAIN_STATES, 1, -1.0, 1.0)
    assert module.spec.describe_actions() == "Box(-1.0, 1.0, (1,))"
    # normalisation comes from the data's spec
    dm2 = OfflineDataModule(str(chain_file), normalize_states=True)
    module2 = TD3(eval_every=0, critic_hidden=(8,), actor_hidden=(8,))
    fit(module2, dm2, 1)
    np.testing.assert_allclose(module2.obs_mean.numpy(), dm2.obs_mean)
    np.testing.assert_allclose(module2.obs_std.numpy(), dm2.obs_std)


def test_checkpoint_rebuilds_any_algorithm_without_sizes(tmp_path):
    L.seed_everything(0, verbose=False)
    module = DQN(eval_every=0, critic_hidden=(8,))
    trainer = fit(module, OnlineDataModule("lit_qlearn.toys:Chain-v0", learning_starts=64, batch_size=32), 3)
    trainer.save_checkpoint(tmp_path / "dqn.ckpt")
    loaded = DQN.load_from_checkpoint(tmp_path / "dqn.ckpt")
    assert loaded.spec == module.spec and loaded.updates == 3
    obs = np.eye(5, dtype=np.float32)
    np.testing.assert_array_equal(loaded.act(obs), module.act(obs))
    # where it was trained is known too: evaluate() needs no DataModule
    assert loaded.env_id == module.env_id == "lit_qlearn.toys:Chain-v0"
    assert loaded.evaluate(2) == module.evaluate(2)


# --------------------------------------------------------------- update and step counting
def test_updates_and_global_step_agree_for_every_algorithm(tiny_td3bc):
    _, dm = tiny_td3bc()
    for module in (TD3BC(eval_every=0, critic_hidden=(8,), actor_hidden=(8,), policy_freq=3),
                   PreQN(eval_every=0, critic_hidden=(8,), actor_hidden=(8,))):
        trainer = fit(module, dm, 6)
        assert module.updates == trainer.global_step == 6
    assert module.counted_optimizer == "actor"  # PreQN's critic has no optimiser
    with pytest.raises(KeyError, match="not 'critic'"):
        module.optimizer("critic")


def _round_trip(module, tmp_path):
    """Save ``module`` as a checkpoint and load it with its class's load_from_checkpoint."""
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    return type(module).load_from_checkpoint(tmp_path / "m.ckpt")


def test_no_silently_ignored_arguments(tmp_path):
    for option in ("critic_lr", "target_tau", "target_every", "policy_noise", "critic_weight_decay"):
        with pytest.raises(TypeError, match=option):
            PreQN(obs_dim=3, act_dim=1, **{option: 0.3})
    torch.manual_seed(0)
    module = PreQN(obs_dim=3, act_dim=1, preqn_lr=0.05, critic_hidden=(8,), actor_hidden=(8,))
    loaded = _round_trip(module, tmp_path)  # the hparams PreQN does not take are not passed back
    assert loaded.preqn["lr"] == 0.05 and loaded.critic.num_q == 1 and loaded.target_pairs() == []
    for a, b in zip(module.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_ema_target_on_a_module_without_targets_says_so(tiny_td3bc):
    _, dm = tiny_td3bc()
    with pytest.raises(ValueError, match="no target"):
        fit(PreQN(eval_every=0, critic_hidden=(8,), actor_hidden=(8,)), dm, 1, callbacks=[EMATarget()])


# ------------------------------------------------------------------------- exact resume
def _resume_equals_uninterrupted(make, tmp_path, steps=20, cut=10, callbacks=()):
    L.seed_everything(0, verbose=False)
    module, dm = make()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=cut, save_top_k=-1, filename="{step}")
    fit(module, dm, steps, callbacks=[ckpt, *[c() for c in callbacks]], enable_checkpointing=True)
    straight = [p.detach().clone() for p in module.state_dict().values()]

    L.seed_everything(12345, verbose=False)  # a different global RNG: the checkpoint must restore it
    module2, dm2 = make()
    fit(module2, dm2, steps, ckpt_path=tmp_path / f"step={cut}.ckpt", callbacks=[c() for c in callbacks])
    resumed = [p.detach() for p in module2.state_dict().values()]
    assert module2.updates == steps
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    return module2


@pytest.mark.parametrize("ema", [False, True])
def test_td3_resumed_mid_run_is_bit_identical(tiny_td3bc, tmp_path, ema):
    def make():
        _, dm = tiny_td3bc()
        return TD3(obs_dim=CHAIN_STATES, act_dim=1, critic_hidden=(16,), actor_hidden=(16,), eval_every=0,
                   policy_noise=0.2), dm

    _resume_equals_uninterrupted(make, tmp_path, callbacks=[lambda: EMATarget(tau=0.3)] if ema else [])


def test_checkpoint_target_is_not_one_step_stale(tiny_td3bc, tmp_path):
    _, dm = tiny_td3bc()
    module = TD3(obs_dim=CHAIN_STATES, act_dim=1, critic_hidden=(16,), actor_hidden=(16,), eval_every=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    fit(module, dm, 4, callbacks=[ckpt, EMATarget.no_ema()], enable_checkpointing=True)
    state = torch.load(tmp_path / "step=4.ckpt", weights_only=True)["state_dict"]
    for name, value in state.items():
        if name.startswith("critic_target."):  # target = current network after update 4
            assert torch.equal(value, state[name.replace("critic_target.", "critic.")])


def test_online_dqn_resumed_mid_run_is_bit_identical(tmp_path):
    def make():
        # trust_checkpoint: the environments' episodes continue exactly (our own checkpoint)
        dm = OnlineDataModule("lit_qlearn.toys:Chain-v0", learning_starts=64, batch_size=32, capacity=200,
                              prioritized=True, n_step=2, trust_checkpoint=True)
        return DQN(gamma=0.9, critic_hidden=(16,), target_every=3, epsilon_steps=30), dm

    module = _resume_equals_uninterrupted(make, tmp_path, steps=30, cut=15, callbacks=[lambda: SEEMMonitor(
        every_n_steps=10, probe_size=32)])
    assert module.trainer.datamodule.rollout.env_steps == 64 + 30


# ---------------------------------------------------------------- the probe protocol checked
class _Column(torch.nn.Module):
    gamma = 0.9

    def __init__(self, shape_bug=False, gamma=0.9):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.shape_bug, self.gamma = shape_bug, gamma

    def q_value(self, obs, act):
        out = self.net(torch.cat([obs, act], -1))
        return out if self.shape_bug else out.squeeze(-1)

    def greedy_action(self, obs):
        return torch.zeros(obs.shape[0], 1)

    def q_network(self):
        return self.net  # takes one input, not (obs, act)


def test_probe_protocol_is_checked_not_trusted():
    probe = Transitions(torch.randn(8, 3), torch.randn(8, 1), torch.zeros(8), torch.randn(8, 3), torch.zeros(8))
    with pytest.raises(ProbeProtocolError, match=r"q_value\(obs, act\) must return a Tensor of shape \(N,\) = "
                                                 r"\(4,\), got \(4, 1\)"):
        check_probe_module(_Column(shape_bug=True), probe=probe)
    with pytest.raises(ProbeProtocolError, match=r"q_network\(\)\(obs, act\) failed"):
        check_probe_module(_Column(), probe=probe)
    for bad in (torch.tensor(0.9), "0.9", 1.5):
        with pytest.raises(ProbeProtocolError, match=r"gamma must be a number in \[0, 1\), got"):
            check_probe_module(_Column(gamma=bad))


# ----------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("name", ["DQN", "TD3", "TD3BC", "DDPG", "SAC", "PreQN"])
def test_cli_help_documents_every_argument(name, capsys):
    import inspect
    import re

    import lit_qlearn.algorithms as algorithms
    from lit_qlearn.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.help", f"lit_qlearn.algorithms.{name}"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    # every argument of the class and of the classes its **kwargs reach has its own help text
    params = set()
    for cls in getattr(algorithms, name).__mro__:
        if "__init__" not in vars(cls):
            continue
        signature = inspect.signature(cls.__init__).parameters
        params |= {p for p, v in signature.items() if p != "self" and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)}
        if not any(v.kind == v.VAR_KEYWORD for v in signature.values()):
            break  # its parents' arguments are not this class's
    for param in params:
        match = re.search(rf"--model\.{param} \S+\n?\s+(.+)", out)
        assert match and not match.group(1).startswith("(type"), f"{name}.{param} has no help text"


def test_target_networks_without_a_rule_are_an_error_at_fit_start(tiny_td3bc):
    _, dm = tiny_td3bc()
    module = TD3(eval_every=0, critic_hidden=(8,), actor_hidden=(8,))
    module.target_update = None
    with pytest.raises(ValueError, match="has target networks .* but no rule"):
        fit(module, dm, 1)


def test_a_monitor_checks_the_protocol_on_the_probe_at_fit_start(tiny_td3bc):
    _, dm = tiny_td3bc()
    module = TD3(eval_every=0, critic_hidden=(8,), actor_hidden=(8,))
    module.q_value = lambda obs, act: module.critic.members[0](torch.cat([obs, act], -1))  # (N, 1): a bug
    with pytest.raises(ProbeProtocolError, match=r"q_value\(obs, act\) must return a Tensor of shape \(N,\)"):
        fit(module, dm, 1, callbacks=[SEEMMonitor(probe_size=16)])


def test_denormals_are_flushed_while_fitting_on_cpu(tiny_td3bc):
    _, dm = tiny_td3bc()
    seen = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(float(torch.tensor(1e-40) * 1.0))  # a denormal float32 times one

    fit(TD3(eval_every=0, critic_hidden=(8,), actor_hidden=(8,)), dm, 2, callbacks=[Probe()])
    assert seen == [0.0, 0.0]
    assert float(torch.tensor(1e-40) * 1.0) > 0  # the process default is back after fit


def test_an_algorithm_without_importance_weights_refuses_prioritised_data():
    dm = OnlineDataModule("Pendulum-v1", learning_starts=64, batch_size=32, prioritized=True)
    with pytest.raises(ValueError, match="PreQN does not use importance weights"):
        fit(PreQN(eval_every=0, critic_hidden=(8,), actor_hidden=(8,)), dm, 1)


# ------------------------------------------- gaps found by planting bugs in the update lines
def test_target_rule_by_hand_with_tau_above_one_half_every_third_update_and_batchnorm_statistics():
    """``target <- (1 - tau) target + tau online`` for a tau above 1/2 (a rule that treated a
    large tau as a hard copy would land on the online weights), only after updates 3 and 6
    of ``every=3``, and BatchNorm's running statistics copied exactly (they are buffers, not
    parameters, and a target critic with stale statistics evaluates differently)."""
    from torch import nn

    from lit_qlearn.targets import TargetUpdate, make_target

    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1))
    target = make_target(online)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(1.0)
        for _ in range(10):  # train mode: the online running statistics move away from the target's
            online(3.0 * torch.randn(32, 3) + 2.0)
    t0 = [p.detach().clone() for p in target.parameters()]
    o = [p.detach().clone() for p in online.parameters()]
    stats = {k: v.clone() for k, v in online[1].named_buffers()}  # running_mean, running_var, num_batches_tracked
    assert (stats["running_mean"] - target[1].running_mean).abs().min() > 0.05, stats
    rule = TargetUpdate(tau=0.75, every=3)
    fired = [rule.step([(online, target)], k) for k in range(1, 8)]
    assert fired == [False, False, True, False, False, True, False]
    # two moves: t1 = 0.25 t0 + 0.75 o, t2 = 0.25 t1 + 0.75 o = 0.0625 t0 + 0.9375 o
    for p, a, b in zip(target.parameters(), t0, o):
        torch.testing.assert_close(p.detach(), 0.0625 * a + 0.9375 * b, rtol=0, atol=1e-6)
        assert (p - b).abs().max() > 0.03  # not a hard copy
    for key, value in target[1].named_buffers():  # copied, not averaged
        assert torch.equal(value, stats[key]), key


def test_td_loss_sends_no_gradient_into_its_target():
    """The loss is a semi-gradient: ``y`` is a constant of the step even when the caller's
    ``y`` carries a graph (e.g. computed from a network that has gradients)."""
    x = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    y = 2.0 * x  # (2, -4, 1), with a graph back to x
    q = torch.tensor([[0.0, 1.0, 3.0], [1.0, -1.0, 0.0]], requires_grad=True)
    loss = td_loss(q, y).loss
    grad_q, grad_x = torch.autograd.grad(loss, [q, x], allow_unused=True)
    assert grad_x is None
    # d/dq_ij of sum_i mean_j (q_ij - y_j)^2 = 2 (q_ij - y_j) / 3
    expected = 2.0 * torch.tensor([[-2.0, 5.0, 2.0], [-1.0, 3.0, -1.0]]) / 3.0
    torch.testing.assert_close(grad_q, expected)


@pytest.mark.parametrize("name", ["IQL", "PreQN"])
def test_td_target_carries_no_graph_even_when_v_comes_from_trained_networks(name):
    """IQL's V(s') and PreQN's Q(s', mu(s')) come from networks with gradients: the target a
    callback or a loss receives is a constant (no graph, so no gradient can leak into those
    networks through it)."""
    from lit_qlearn.algorithms import IQL

    torch.manual_seed(0)
    cls = IQL if name == "IQL" else PreQN
    module = cls(obs_dim=3, act_dim=1, critic_hidden=(8,), actor_hidden=(8,), eval_every=0)
    y = module.td_target(batch_of())
    assert not y.requires_grad and y.grad_fn is None


# ----------------------------------------------------------------------- the build order
def test_a_subclass_sets_its_options_anywhere_and_builds_once(tiny_td3bc):
    """The networks are built once, after the most-derived constructor returned: an option
    set after super().__init__() is there when build() runs (sizes given), a parent's
    default rule reads the subclass's option (TD3's target period is its policy_freq), and
    a subclass without its own __init__ builds the same way."""
    from torch import nn

    builds = []

    class WithHead(TD3):
        def __init__(self, *args, head_width=3, **kwargs):
            self.before = "set before super().__init__()"  # allowed too: nothing is built yet
            super().__init__(*args, **kwargs)
            self.head_width = head_width

        def build(self, spec):
            super().build(spec)
            builds.append(self.head_width)
            self.head = nn.Linear(spec.obs_dim, self.head_width)

    class Same(WithHead):
        pass

    module = WithHead(obs_dim=CHAIN_STATES, act_dim=1, critic_hidden=(8,), actor_hidden=(8,), head_width=7,
                      policy_freq=3, eval_every=0)
    assert builds == [7] and module.head.out_features == 7
    assert module.target_update.every == 3 and len(module.target_pairs()) == 2
    assert module.hparams["head_width"] == 7 and module.hparams["policy_freq"] == 3
    Same(obs_dim=CHAIN_STATES, act_dim=1, critic_hidden=(8,), actor_hidden=(8,), eval_every=0)
    assert builds == [7, 3]
    # sizes from the data: built once, at setup
    _, dm = tiny_td3bc()
    lazy = WithHead(critic_hidden=(8,), actor_hidden=(8,), eval_every=0, head_width=2)
    assert builds == [7, 3] and lazy.spec is None
    fit(lazy, dm, 1)
    assert builds == [7, 3, 2] and lazy.head.in_features == CHAIN_STATES
    # a checkpoint rebuilds it from its own arguments
    import inspect

    assert list(inspect.signature(WithHead).parameters)[-1] == "kwargs"  # the constructor's, not __call__'s


class Fixed(TD3):
    """A user's subclass that fixes some of TD3's options (module level: checkpoints load it)."""

    def __init__(self, obs_dim=None, act_dim=None, width=8):
        super().__init__(obs_dim, act_dim, critic_hidden=(width,), actor_hidden=(width,), num_q=1, eval_every=0)

    def configure_optimizers(self):  # reads a parent's hyper-parameter, as user code may
        assert self.hparams.actor_lr == 3e-4
        return super().configure_optimizers()


def test_a_subclass_fixing_a_parents_option_keeps_lightnings_hparams_and_loads(tmp_path):
    """Hyper-parameters are Lightning's (every constructor level's arguments, which the
    subclass may read); load_from_checkpoint passes back only the class's own."""
    module = Fixed(3, 1, width=4)
    assert {k: module.hparams[k] for k in ("obs_dim", "act_dim", "width", "num_q")} == \
        {"obs_dim": 3, "act_dim": 1, "width": 4, "num_q": 1}
    module.configure_optimizers()
    loaded = _round_trip(module, tmp_path)
    assert loaded.critic.num_q == 1 and loaded.critic.members[0][0].out_features == 4


def test_a_checkpoint_keeps_only_the_arguments_the_class_takes(tmp_path):
    """PreQN fixes ActorCritic's num_q and has no critic optimiser or target rule: its
    checkpoint's hyper-parameters are its own arguments (what `lit-qlearn fit --ckpt_path`
    and load_from_checkpoint pass back), while the live hparams stay Lightning's."""
    import inspect

    module = PreQN(obs_dim=3, act_dim=1, critic_hidden=(8,), actor_hidden=(8,))
    assert {"num_q", "critic_lr", "target_tau"} <= set(module.hparams)  # every constructor level's
    _round_trip(module, tmp_path)
    saved = torch.load(tmp_path / "m.ckpt", weights_only=True)["hyper_parameters"]
    assert set(saved) == set(inspect.signature(PreQN).parameters)
    PreQN(**saved)


def test_a_hook_of_an_earlier_release_is_an_error_at_class_creation():
    with pytest.raises(TypeError, match=r"Old\.add_targets: .*build_targets"):
        class Old(TD3):
            def add_targets(self):
                pass


def test_a_constructor_may_set_no_target_rule_on_purpose():
    class NoRule(TD3):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.target_update = None  # e.g. an EMATarget callback always moves the targets

    assert NoRule(obs_dim=3, act_dim=1).target_update is None
    assert TD3(obs_dim=3, act_dim=1, policy_freq=3).target_update.every == 3


def test_optimize_works_when_a_subclass_on_fit_start_skips_super(tiny_td3bc):
    class Forgets(TD3BC):
        def on_fit_start(self):
            pass

    _, dm = tiny_td3bc()
    forgets = Forgets(obs_dim=CHAIN_STATES, act_dim=1, critic_hidden=(16,), actor_hidden=(16,), eval_every=0)
    trainer = fit(forgets, dm, 2)
    assert trainer.global_step == 2 and forgets.stepper is not None  # made at its first step
