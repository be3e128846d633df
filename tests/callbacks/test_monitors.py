from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lit_qlearn.callbacks import NTKGramCallback, SEEMMonitor
from lit_qlearn.data import OfflineDataModule
from lit_qlearn.probe import ProbeProtocolError
from tests.conftest import CHAIN_STATES, run_ddp_script


class LinearQ(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, 1)

    def forward(self, obs, act):
        return self.lin(torch.cat([obs, act], -1)).squeeze(-1)


class UserModule(L.LightningModule):
    """A user's module implementing the probe protocol: linear critic, fixed linear policy."""

    gamma = 0.9

    def __init__(self, obs_dim=CHAIN_STATES, act_dim=1):
        super().__init__()
        torch.manual_seed(0)
        self.q = LinearQ(obs_dim + act_dim)
        self.register_buffer("policy", torch.linspace(-1, 1, obs_dim).reshape(obs_dim, act_dim))

    def q_value(self, obs, act):
        return self.q(obs, act)

    def greedy_action(self, obs):
        return obs @ self.policy

    def q_network(self):
        return self.q

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            y = batch.rew + self.gamma * (1 - batch.terminated) * self.q(batch.next_obs, self.greedy_action(batch.next_obs))
        return (self.q(batch.obs, batch.act) - y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def assert_same_probe(a, b):
    """Equal present fields, and the same fields absent (None)."""
    for name, x, y in zip(a._fields, a, b):
        assert (x is None) == (y is None), name
        assert x is None or torch.equal(x, y), name


def run(module, dm, steps, callbacks, ckpt_path=None, **kwargs):
    options = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   accelerator="cpu")
    options.update(kwargs)
    trainer = L.Trainer(max_steps=steps, callbacks=callbacks, **options)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer


@pytest.fixture
def chain_dm(chain_file):
    return OfflineDataModule(str(chain_file), batch_size=16, normalize_states=False, steps_per_epoch=50)


OBS_DIM = 9  # with the action and the bias, 11 features: a probe of up to 11 rows has full rank


@pytest.fixture
def random_dm(tmp_path):
    """Gaussian states in R^9 (next state = the next row), uniform actions in [-1, 1]."""
    from lit_qlearn.data import write_d4rl

    rng = np.random.default_rng(0)
    n = 200
    path = write_d4rl(tmp_path / "random.hdf5", {
        "observations": rng.normal(size=(n, OBS_DIM)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, 1)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32), "terminals": np.arange(n) % 25 == 24})
    return OfflineDataModule(str(path), batch_size=16, normalize_states=False, steps_per_epoch=50)


def _linear_seem(module, probe, act_star):
    """Closed form for a linear critic Q = w.(s, a) + b: G(X', X) = F(X') F(X)^T with features
    F = (s, a, 1), so A = (gamma F(X*) F(X)^T - F(X) F(X)^T) / P (the authors' 1/P, P = d + 1)."""
    ones = np.ones((len(probe.obs), 1))
    f = np.concatenate([probe.obs.double().numpy(), probe.act.double().numpy(), ones], -1)
    f_star = np.concatenate([probe.next_obs.double().numpy(), np.asarray(act_star, dtype=float), ones], -1)
    assert np.linalg.matrix_rank(f) == len(f)  # full rank: no null space pins the top eigenvalue to 0
    a = (module.gamma * f_star @ f.T - f @ f.T) / f.shape[1]
    return a, np.linalg.eigvals(a).real.max()


def test_users_module_numbers_match_closed_form_linear_kernel(random_dm):
    module = UserModule(obs_dim=OBS_DIM)
    ntk_cb = NTKGramCallback(every_n_steps=3, probe_size=40)
    seem_cb = SEEMMonitor(every_n_steps=3, probe_size=8, solver="dense", dtype=torch.float64)
    trainer = run(module, random_dm, 3, [ntk_cb, seem_cb])
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    probe = random_dm.probe_batch(40, seed=0)
    x = torch.cat([probe.obs, probe.act], -1).double().numpy()
    # Linear model: G = X X^T + 1 (weight and bias), for any parameters.
    g = x @ x.T + 1
    assert m["ntk/diag_mean"] == pytest.approx(np.diag(g).mean(), rel=1e-5)
    off = np.abs(g).sum() - np.abs(np.diag(g)).sum()
    assert m["ntk/offdiag_abs_mean"] == pytest.approx(off / (40 * 39), rel=1e-5)
    assert m["ntk/row_ratio_mean"] == pytest.approx(((np.abs(g).sum(1) - np.diag(g)) / (40 * np.diag(g))).mean(),
                                                    rel=1e-5)
    p8 = random_dm.probe_batch(8, seed=0)
    a, top = _linear_seem(module, p8, (p8.next_obs @ module.policy).numpy())  # X* = (s', pi(s'))
    # far from 0 relative to A's size, so a relative tolerance means something
    assert abs(top) > 0.01 * np.linalg.norm(a)
    assert m["seem/max_eig"] == pytest.approx(top, rel=1e-6)
    assert m["seem/max_eig_normalized"] == pytest.approx(top / np.linalg.norm(a), rel=1e-6)
    # X* built from the data's action instead of the policy's: a different number, far outside the tolerance
    _, with_data_action = _linear_seem(module, p8, p8.act.numpy())
    assert abs(with_data_action - top) > 0.5 * abs(top)
    evals, evecs = np.linalg.eig(a)
    share = np.abs(evecs[:, np.argmax(evals.real)]) ** 2
    share /= share.sum()
    assert m["seem/participation"] == pytest.approx(1 / (share**2).sum(), rel=1e-5)
    np.testing.assert_allclose(seem_cb.eigenvector.abs().numpy() ** 2, share, rtol=1e-5, atol=1e-9)
    with torch.no_grad():
        assert m["seem/q_data_mean"] == pytest.approx(module.q(p8.obs, p8.act).mean().item(), rel=1e-5)
        assert m["seem/q_policy_mean"] == pytest.approx(
            module.q(p8.next_obs, p8.next_obs @ module.policy).mean().item(), rel=1e-5)
    assert "ntk/cos_prev" not in m and "seem/action_cos_prev" not in m  # one evaluation so far


class TanhQ(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, obs, act):
        return self.net(torch.cat([obs, act], -1)).squeeze(-1)


class TanhUserModule(UserModule):
    """The user's module with a tanh MLP critic: its NTK depends on the parameters."""

    gamma = 0.99

    def __init__(self, obs_dim=OBS_DIM, act_dim=1):
        super().__init__(obs_dim, act_dim)
        torch.manual_seed(0)
        self.q = TanhQ(obs_dim + act_dim)


def _jacobian(net, obs, act):
    """Per-sample gradients dQ(s_i, a_i)/dtheta ``(N, P)`` with torch.func, in float64."""
    import copy

    net = copy.deepcopy(net).double()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def q(p, o, a):
        return torch.func.functional_call(net, p, (o[None], a[None])).squeeze(0)

    jac = torch.func.vmap(torch.func.jacrev(q), in_dims=(None, 0, 0))(params, obs.double(), act.double())
    return torch.cat([jac[k].reshape(len(obs), -1) for k in params], 1)


def test_seem_uses_the_greedy_action_at_the_next_state_torch_func(random_dm):
    """SEEM's X* is (s', greedy_action(s')), not the data's action: on a tanh critic, the
    monitors' numbers against Grams of torch.func Jacobians, and the SEEM that X* = (s', a)
    would give is far from the logged one. NTKGramCallback's statistics on the same probe."""
    module = TanhUserModule()
    ntk_cb = NTKGramCallback(every_n_steps=4, probe_size=12)
    seem_cb = SEEMMonitor(every_n_steps=4, probe_size=8, solver="dense", dtype=torch.float64)
    trainer = run(module, random_dm, 4, [ntk_cb, seem_cb])
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    net = module.q_network()

    p12 = random_dm.probe_batch(12, seed=0)
    j = _jacobian(net, p12.obs, p12.act)
    g = (j @ j.T).numpy()
    n = len(g)
    off = np.abs(g).sum(1) - np.abs(np.diag(g))
    assert m["ntk/diag_mean"] == pytest.approx(np.diag(g).mean(), rel=1e-4)
    assert m["ntk/offdiag_abs_mean"] == pytest.approx(off.sum() / (n * (n - 1)), rel=1e-4)
    assert m["ntk/row_ratio_mean"] == pytest.approx((off / (n * np.diag(g))).mean(), rel=1e-4)

    p8 = random_dm.probe_batch(8, seed=0)
    pi_next = p8.next_obs @ module.policy  # the user's greedy action at s', by hand
    a = _seem_matrix(module, p8, p8.next_obs, pi_next)
    top, frob = np.linalg.eigvals(a).real.max(), np.linalg.norm(a)
    assert abs(top) > 0.01 * frob
    assert m["seem/max_eig"] == pytest.approx(top, rel=1e-6)
    assert m["seem/max_eig_normalized"] == pytest.approx(top / frob, rel=1e-6)
    with torch.no_grad():
        assert m["seem/q_policy_mean"] == pytest.approx(module.q(p8.next_obs, pi_next).mean().item(), rel=1e-6)
    # X* from the data's action, or from the current state: other numbers, far outside the tolerance
    for states, actions in ((p8.next_obs, p8.act), (p8.obs, p8.obs @ module.policy)):
        wrong = np.linalg.eigvals(_seem_matrix(module, p8, states, actions)).real.max()
        assert abs(wrong - top) > 0.1 * abs(top)


def _seem_matrix(module, probe, states, actions):
    """A = (gamma G(X*, X) - G(X, X)) / P with X = the probe's (s, a), X* = (states, actions),
    G from torch.func Jacobians (the authors' 1/P)."""
    net = module.q_network()
    jx, jstar = _jacobian(net, probe.obs, probe.act), _jacobian(net, states, actions)
    return ((module.gamma * jstar @ jx.T - jx @ jx.T) / jx.shape[1]).numpy()


def test_cadence_cosines_and_tensorboard(tiny_td3bc, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    module, dm = tiny_td3bc()
    logger = TensorBoardLogger(tmp_path, name="tb")
    ntk_cb = NTKGramCallback(every_n_steps=4, probe_size=32, log_heatmap=True)
    seem_cb = SEEMMonitor(every_n_steps=5, probe_size=32, log_spectrum=True)
    run(module, dm, 10, [ntk_cb, seem_cb], logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "images": 0})  # 0: keep all
    events.Reload()
    assert [e.step for e in events.Scalars("ntk/diag_mean")] == [4, 8]
    assert [e.step for e in events.Scalars("seem/max_eig")] == [5, 10]
    assert [e.step for e in events.Scalars("ntk/cos_prev")] == [8]
    assert "ntk/gram" in events.Tags()["images"]
    assert [e.step for e in events.Histograms("seem/spectrum_real")] == [5, 10]
    # The histogram holds all 32 eigenvalues; its maximum is the logged SEEM value.
    hist = events.Histograms("seem/spectrum_real")[-1].histogram_value
    assert hist.num == 32 and hist.max == pytest.approx(events.Scalars("seem/max_eig")[-1].value, rel=1e-4)
    # cos_prev at step 8 is the cosine between the Grams measured at steps 4 and 8.
    assert events.Scalars("ntk/cos_prev")[0].value == pytest.approx(
        float((ntk_cb.first * ntk_cb.previous).sum() / (ntk_cb.first.norm() * ntk_cb.previous.norm())), rel=1e-5)
    assert -1.0 <= events.Scalars("seem/action_cos_prev")[0].value <= 1.0


def test_measurements_leave_no_trace_in_training(tiny_td3bc):
    modes = []

    class Modes(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            modes.append(all(m.training for m in pl_module.modules()))

    watched, dm = tiny_td3bc(critic_dropout=0.1)  # dropout: the module's train mode and the RNG matter
    run(watched, dm, 6, [NTKGramCallback(every_n_steps=1, probe_size=16), SEEMMonitor(every_n_steps=2, probe_size=16),
                         Modes()])
    reference, dm = tiny_td3bc(critic_dropout=0.1)
    run(reference, dm, 6, [])
    assert modes == [True] * 6  # train mode restored after every measurement
    for a, b in zip(watched.parameters(), reference.parameters()):  # RNG and gradients untouched
        assert torch.equal(a, b)


def test_missing_protocol_member_is_named_at_setup(chain_dm):
    class NoGreedy(UserModule):
        greedy_action = None

    steps = []

    class Count(L.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    with pytest.raises(ProbeProtocolError, match="greedy_action"):
        run(NoGreedy(), chain_dm, 2, [SEEMMonitor(every_n_steps=1, probe_size=8), Count()])
    assert steps == []


def test_datamodule_without_probe_batch_is_named_at_setup(chain_dm):
    class PlainDM(L.LightningDataModule):
        def train_dataloader(self):
            return chain_dm.train_dataloader()

    chain_dm.setup("fit")
    with pytest.raises(ProbeProtocolError, match="probe_batch"):
        run(UserModule(), PlainDM(), 2, [NTKGramCallback(every_n_steps=1, probe_size=8)])


def test_probe_from_training_batches(chain_dm):
    cb = NTKGramCallback(every_n_steps=1, probe_size=40, probe_source="batches")
    trainer = run(UserModule(), chain_dm, 5, [cb])
    # 16 per batch: the probe is complete after 3 batches, so steps 4 and 5 are measured.
    assert cb.probe.obs.shape == (40, CHAIN_STATES) and cb.last_step == 5
    x = torch.cat([cb.probe.obs, cb.probe.act], -1).double()
    assert float(trainer.callback_metrics["ntk/diag_mean"]) == pytest.approx(((x * x).sum(1) + 1).mean().item(),
                                                                           rel=1e-5)


def test_state_survives_checkpoint_and_resume(tiny_td3bc, tmp_path):
    module, dm = tiny_td3bc()
    ntk_cb, seem_cb = NTKGramCallback(every_n_steps=2, probe_size=24), SEEMMonitor(every_n_steps=2, probe_size=24)
    trainer = run(module, dm, 4, [ntk_cb, seem_cb])
    path = tmp_path / "c.ckpt"
    trainer.save_checkpoint(path)

    module2, dm2 = tiny_td3bc()
    ntk2, seem2 = NTKGramCallback(every_n_steps=2, probe_size=24), SEEMMonitor(every_n_steps=2, probe_size=24)
    first_after_resume = []

    class Spy(L.Callback):  # runs before the monitors: sees the restored state
        def on_train_batch_end(self, trainer, pl_module, *args):
            if not first_after_resume:
                first_after_resume.append((ntk2.previous.clone(), seem2.previous_actions.clone(), ntk2.last_step))

    run(module2, dm2, 6, [Spy(), ntk2, seem2], ckpt_path=path)
    assert_same_probe(ntk_cb.probe, ntk2.probe)
    prev, actions, last = first_after_resume[0]
    assert torch.equal(prev, ntk_cb.previous) and torch.equal(actions, seem_cb.previous_actions) and last == 4
    assert torch.equal(ntk2.first, ntk_cb.first) and ntk2.last_step == 6


@pytest.mark.parametrize("bad", [dict(every_n_steps=0), dict(probe_size=-1), dict(probe_source="replay"),
                                 dict(method="exact")])
def test_bad_arguments_are_named(bad):
    (name,) = bad
    with pytest.raises(ValueError, match=name):
        NTKGramCallback(**bad)


def test_ddp_two_processes_give_the_single_device_numbers(chain_file, tmp_path):
    run_ddp_script(Path(__file__).with_name("ddp_monitors.py"), chain_file, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["metrics"].keys() == r1["metrics"].keys() and len(r0["metrics"]) >= 8
    for key in r0["metrics"]:
        assert r0["metrics"][key] == r1["metrics"][key], key
    # The same measurement on one device, from the final parameters and the same probe set.
    for key, value in r0["single_device"].items():
        assert r0["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_two_monitors_differing_in_one_option_keep_separate_state(chain_dm, tmp_path):
    """state_key names every option: SEEMMonitors with different probe seeds get one
    checkpoint slot each, and each gets its own probe set and actions back on resume."""
    monitors = [SEEMMonitor(every_n_steps=2, probe_size=8, probe_seed=seed) for seed in (0, 1)]
    assert monitors[0].state_key != monitors[1].state_key
    trainer = run(UserModule(), chain_dm, 4, monitors)
    path = tmp_path / "two.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"]
    assert {monitors[0].state_key, monitors[1].state_key} <= saved.keys()
    # The probe sets really differ, and each is the DataModule's draw with its own seed.
    assert not torch.equal(monitors[0].probe.obs, monitors[1].probe.obs)
    for m in monitors:
        assert torch.equal(m.probe.obs, chain_dm.probe_batch(8, seed=m.probe_seed).obs)

    resumed = [SEEMMonitor(every_n_steps=2, probe_size=8, probe_seed=seed) for seed in (0, 1)]
    restored = []

    class Spy(L.Callback):  # runs before the monitors: sees the state loaded from the checkpoint
        def on_train_batch_end(self, trainer, pl_module, *args):
            if not restored:
                restored.extend((m.probe.map(torch.clone), m.previous_actions.clone()) for m in resumed)

    run(UserModule(), chain_dm, 6, [Spy(), *resumed], ckpt_path=path)
    for original, (probe, actions) in zip(monitors, restored):
        assert_same_probe(original.probe, probe)
        assert torch.equal(actions, original.previous_actions)
    assert not torch.equal(restored[0][1], restored[1][1])  # the greedy actions on two different probe sets


def test_state_key_names_every_option():
    base = dict(every_n_steps=5, probe_size=8)
    for cls, options in [(NTKGramCallback, dict(probe_seed=1, probe_source="batches", method="jacobian",
                                                 dtype=torch.float64, log_heatmap=True)),
                         (SEEMMonitor, dict(probe_seed=1, scale_by_params=False, solver="dense", tol=1e-3,
                                            log_spectrum=True, participation=False))]:
        reference = cls(**base).state_key
        for name, value in options.items():
            assert cls(**base, **{name: value}).state_key != reference, (cls.__name__, name)
