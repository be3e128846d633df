from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lit_qlearn.callbacks import PlasticityMonitor
from lit_qlearn.data import OfflineDataModule
from lit_qlearn.plasticity import plasticity_metrics
from tests.callbacks.test_monitors import assert_same_probe, run
from tests.conftest import CHAIN_STATES, run_ddp_script


class ELUQ(nn.Module):
    """A user's critic that is not an ``mlp``: ``Q = v . elu(W [s, a] + b)``."""

    def __init__(self, d: int, width: int = 12) -> None:
        super().__init__()
        self.hidden = nn.Linear(d, width)
        self.act = nn.ELU()
        self.head = nn.Linear(width, 1)

    def forward(self, obs, act):
        return self.head(self.act(self.hidden(torch.cat([obs, act], -1)))).squeeze(-1)


class UserModule(L.LightningModule):
    """A user's module implementing the probe protocol with its own critic and a fixed policy."""

    gamma = 0.9

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q = ELUQ(CHAIN_STATES + 1)

    def q_value(self, obs, act):
        return self.q(obs, act)

    def greedy_action(self, obs):
        return obs[:, :1]

    def q_network(self):
        return self.q

    def training_step(self, batch, batch_idx):  # a regression on the reward: the monitor does not care
        return (self.q(batch.obs, batch.act) - batch.rew).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def logged(trainer):
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("plasticity/")}


def test_logged_scalars_are_the_pure_functions_on_the_final_parameters(tiny_td3bc, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    module, dm = tiny_td3bc()
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = run(module, dm, 10, [PlasticityMonitor(every_n_steps=5, probe_size=64)], logger=logger)
    probe = dm.probe_batch(64, seed=0)
    # Independent of plasticity_metrics: the hidden layers of the first critic by hand.
    net = module.critic.members[0]
    x = torch.cat([probe.obs, probe.act], -1)
    with torch.no_grad():
        z1 = net[0](x)
        h1 = torch.relu(z1)
        z2 = net[2](h1)
        h2 = torch.relu(z2)
    m = logged(trainer)
    expected_dormant = sum(int((h.abs().mean(0) / h.abs().mean() <= 0.025).sum()) for h in (h1, h2)) / 64
    assert m["plasticity/dormant_fraction"] == pytest.approx(expected_dormant)
    sigma = torch.linalg.svdvals(h2.double())
    assert m["plasticity/feature_rank"] == int((torch.cumsum(sigma, 0) / sigma.sum() < 0.99).sum()) + 1
    norm = torch.sqrt(sum((p.double() ** 2).sum() for p in net.parameters()))
    assert m["plasticity/weight_norm"] == pytest.approx(norm.item(), rel=1e-6)
    for name, z in (("net.1", z1), ("net.3", z2)):
        assert m[f"plasticity/preact_mean/{name}"] == pytest.approx(z.mean().item(), rel=1e-5, abs=1e-7)
        assert m[f"plasticity/preact_scale/{name}"] == pytest.approx(z.std(unbiased=False).item(), rel=1e-5)
    # ... and every logged scalar is the pure function's value
    pure = plasticity_metrics(module.q_network(), (probe.obs, probe.act))
    assert m == pytest.approx({f"plasticity/{k}": v for k, v in pure.items()}, rel=1e-6)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    for tag in ("plasticity/dormant_fraction", "plasticity/feature_rank", "plasticity/preact_scale/net.3"):
        assert [e.step for e in events.Scalars(tag)] == [5, 10]


def test_users_module(chain_file):
    dm = OfflineDataModule(str(chain_file), batch_size=16, normalize_states=False, steps_per_epoch=50)
    module = UserModule()
    trainer = run(module, dm, 3, [PlasticityMonitor(every_n_steps=3, probe_size=40, tau=0.5, delta=0.1)])
    probe = dm.probe_batch(40, seed=0)
    with torch.no_grad():
        h = module.q.act(module.q.hidden(torch.cat([probe.obs, probe.act], -1)))
    m = logged(trainer)
    assert m["plasticity/dormant_fraction"] == pytest.approx((h.abs().mean(0) / h.abs().mean() <= 0.5).double().mean().item())
    assert set(m) == {"plasticity/dormant_fraction", "plasticity/dormant_fraction/act", "plasticity/feature_rank",
                      "plasticity/weight_norm", "plasticity/preact_mean/act", "plasticity/preact_scale/act"}


def test_measurements_leave_no_trace_in_training(tiny_td3bc):
    from lightning.pytorch.callbacks import LambdaCallback

    modes = []  # after the monitor's measurement in every step: is every submodule back in train mode?
    spy = LambdaCallback(on_train_batch_end=lambda trainer, module, *args: modes.append(
        all(m.training for m in module.modules())))
    states = []
    for callbacks in ([PlasticityMonitor(every_n_steps=1, probe_size=16), spy], []):
        module, dm = tiny_td3bc(critic_dropout=0.1)  # seeds; dropout: train mode and the RNG matter
        run(module, dm, 4, callbacks)
        states.append(module.state_dict())
    assert modes == [True] * 4
    watched, reference = states
    assert all(torch.equal(watched[k], reference[k]) for k in reference)  # RNG and gradients untouched


def test_state_survives_checkpoint_and_resume(tiny_td3bc, tmp_path):
    module, dm = tiny_td3bc()
    first = PlasticityMonitor(every_n_steps=2, probe_size=24, tau=0.1)
    trainer = run(module, dm, 4, [first])
    path = tmp_path / "c.ckpt"
    trainer.save_checkpoint(path)
    module2, dm2 = tiny_td3bc()
    dm2.probe_batch = lambda n, seed=0: OfflineDataModule.probe_batch(dm2, n, seed=seed + 7)  # another probe set
    resumed = PlasticityMonitor(every_n_steps=2, probe_size=24, tau=0.1)
    seen = []

    class Spy(L.Callback):  # runs before the monitor: sees the restored state
        def on_train_batch_end(self, trainer, pl_module, *args):
            if not seen:
                seen.append(resumed.last_step)

    run(module2, dm2, 6, [Spy(), resumed], ckpt_path=path)
    assert_same_probe(first.probe, resumed.probe)  # the checkpoint's probe set, not a fresh draw
    assert not torch.equal(dm2.probe_batch(24).obs, first.probe.obs)
    assert seen == [4] and resumed.last_step == 6


def test_state_key_tells_options_apart():
    keys = {PlasticityMonitor().state_key, PlasticityMonitor(tau=0.1).state_key, PlasticityMonitor(delta=0.05).state_key,
            PlasticityMonitor(probe_seed=1).state_key, PlasticityMonitor(every_n_steps=10).state_key}
    assert len(keys) == 5


def test_bad_arguments_are_named():
    for name, value in (("every_n_steps", 0), ("probe_size", 0), ("tau", -0.1), ("delta", 1.0),
                        ("probe_source", "replay")):
        with pytest.raises(ValueError, match=name):
            PlasticityMonitor(**{name: value})


def test_ddp_two_processes_give_the_single_device_numbers(chain_file, tmp_path):
    run_ddp_script(Path(__file__).with_name("ddp_plasticity.py"), chain_file, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["metrics"] == r1["metrics"] and len(r0["metrics"]) == 9  # 3 scalars + 3 per layer x 2 layers
    assert r0["metrics"] == pytest.approx({f"plasticity/{k}": v for k, v in r0["single_device"].items()},
                                          rel=1e-6, abs=1e-9)
