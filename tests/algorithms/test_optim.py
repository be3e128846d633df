"""Optimiser stepping (lit_qlearn.algorithms.optim): which steps Lightning counts on either
path, which path is taken, and the gradient averaging's flatten / unflatten."""
import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from lit_qlearn.algorithms.optim import Stepper, average_gradients


class TwoSteps(L.LightningModule):
    """Manual optimisation with two optimisers stepped by a :class:`Stepper`: per batch
    one counted step and one uncounted."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = nn.Linear(2, 1), nn.Linear(2, 1)
        self.batches = 0

    def configure_optimizers(self):
        return [torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)]

    def train_dataloader(self):
        return DataLoader([torch.ones(4, 2)] * 5, batch_size=None)

    def on_fit_start(self):
        self.stepper = Stepper(self)

    def training_step(self, batch, batch_idx):
        self.batches += 1
        counted, uncounted = self.optimizers()
        self.stepper.step(counted, self.a(batch).pow(2).mean(), count=True)
        self.stepper.step(uncounted, self.b(batch).pow(2).mean(), count=False)


@pytest.mark.parametrize("listen", [False, True])
def test_only_counted_steps_enter_global_step_on_either_path(listen):
    """max_steps=3 stops after 3 counted steps (3 of the 5 batches): the uncounted steps
    are not counted, directly or through Lightning's wrappers, where the step hook still
    sees every step."""
    hooked = []

    class Listener(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            hooked.append(trainer.global_step)

    module = TwoSteps()
    before = [p.detach().clone() for p in module.parameters()]
    trainer = L.Trainer(max_steps=3, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        callbacks=[Listener()] if listen else [])
    trainer.fit(module)
    assert module.stepper.direct is not listen
    assert (trainer.global_step, module.batches) == (3, 3)
    assert hooked == ([0, 1, 1, 2, 2, 3] if listen else [])
    assert all(not torch.equal(b, p) for b, p in zip(before, module.parameters()))  # both optimisers stepped


def test_average_gradients_divides_and_restores_every_shape(tmp_path):
    """One flat all-reduce over gradients of several shapes, each written back to its own
    tensor; parameters without a gradient are skipped. With one process the all-reduce is
    the identity, so ``world_size=4`` must give each gradient divided by 4, in place."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(1)),
                  nn.Parameter(torch.randn(2, 2, 2))]
        for p in params[:2] + params[3:]:
            p.grad = torch.randn_like(p)
        grads = [None if p.grad is None else p.grad for p in params]
        expected = [None if g is None else g.clone() / 4 for g in grads]
        average_gradients(params, 4)
        for p, g, e in zip(params, grads, expected):
            if e is None:
                assert p.grad is None
            else:
                assert p.grad is g  # in place: an optimiser holding the tensor sees the mean
                torch.testing.assert_close(p.grad, e, rtol=0, atol=0)
        average_gradients([nn.Parameter(torch.ones(2))], 4)  # no gradients at all: nothing to do
    finally:
        dist.destroy_process_group()


def test_a_module_hook_on_the_step_routes_through_lightning(tiny_td3bc):
    """The direct path is taken only when no hook would run: a module overriding
    on_after_backward gets every step through Lightning (and is called), with the same
    updates as the direct path (tests/algorithms/test_td3.py checks a callback's hook)."""
    from lit_qlearn.algorithms import TD3BC
    from tests.conftest import CHAIN_STATES, fit

    calls = []

    class Hooked(TD3BC):
        def on_after_backward(self):
            calls.append(self.updates)

    direct, dm = tiny_td3bc()
    fit(direct, dm, 4)
    _, dm = tiny_td3bc()
    L.seed_everything(0, verbose=False)
    hooked = Hooked(obs_dim=CHAIN_STATES, act_dim=1, critic_hidden=(32, 32), actor_hidden=(32, 32), eval_every=0)
    fit(hooked, dm, 4)
    assert direct.stepper.direct and not hooked.stepper.direct
    assert calls == [1, 2, 2, 3, 4, 4]  # critic steps every update, actor steps every second
    for a, b in zip(direct.parameters(), hooked.parameters()):
        assert torch.equal(a, b)
