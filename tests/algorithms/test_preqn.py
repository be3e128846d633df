"""PreQN's preconditioned step, the PreQN module and the PreQNLineSearch callback."""
import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.func import functional_call, jacrev, vmap

from lit_qlearn.algorithms import TD3, TD3BC, PreQN
from lit_qlearn.callbacks import PreQNLineSearch
from lit_qlearn.data import Transitions
from lit_qlearn.networks import StateActionQ, mlp
from lit_qlearn.ntk import preconditioned_step
from lit_qlearn.probe import critic_members
from lit_qlearn.toys import RandomWalkDataModule, RandomWalkQ
from tests.conftest import CHAIN_STATES, chain_q, run_ddp_script


def sin_critic(seed=0, hidden=(64, 64)):
    torch.manual_seed(seed)
    return StateActionQ(mlp(5, 1, hidden=hidden, activation="sin"))


def batch(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g), torch.randn(n, generator=g)


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def pinv_direction(net: StateActionQ, obs: torch.Tensor, act: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``J^T K^+ delta`` (P,) in float64, with ``J`` (N, P) the per-sample gradients of Q(obs_i, act_i)
    from torch.func (an independent Jacobian) and ``K = J J^T``."""
    names = [n for n, _ in net.named_parameters()]
    params = {n: p.detach().double() for n, p in net.named_parameters()}
    net64 = copy.deepcopy(net).double()
    single = lambda p, o, a: functional_call(net64, p, (o[None], a[None]))[0]  # noqa: E731
    jac = vmap(jacrev(single), in_dims=(None, 0, 0))(params, obs.double(), act.double())
    j = torch.cat([jac[n].reshape(len(obs), -1) for n in names], dim=1)  # (N, P)
    return j.T @ torch.linalg.pinv(j @ j.T, rtol=1e-6, hermitian=True) @ delta.double()


def flat_params(net: torch.nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(net.parameters()).detach().double()


def test_step_meets_the_line_search_criterion():
    net = sin_critic()
    obs, act, delta = batch()
    delta = 30 * delta  # large TD errors: the full step overshoots and must be shrunk
    before = net(obs, act).detach()
    result = preconditioned_step(net, (obs, act), delta)
    change = net(obs, act).detach() - before
    assert result.accepted and result.shrink_steps > 0
    assert cosine(change, delta) >= 0.9
    assert cosine(change, delta) == pytest.approx(result.cos, abs=1e-6)
    assert result.step_norm == pytest.approx(
        torch.linalg.vector_norm(torch.cat([(p1 - p0).flatten() for p0, p1 in zip(
            sin_critic().parameters(), net.parameters())])).item(), rel=1e-4)


def test_step_is_the_pseudo_inverse_direction_of_torch_func():
    """theta' - theta = lr J^T K^+ delta with J from torch.func (an independent Jacobian)."""
    net = sin_critic(hidden=(16, 16))
    obs, act, delta = batch(n=12)
    expected = 1e-3 * pinv_direction(net, obs, act, delta)
    start = flat_params(net)
    preconditioned_step(net, (obs, act), delta, lr=1e-3, max_shrinks=0)
    moved = flat_params(net) - start
    # float32 parameters: the update is exact up to float32 rounding of theta + step
    assert torch.linalg.vector_norm(moved - expected) <= 1e-4 * torch.linalg.vector_norm(expected)


def test_small_steps_move_q_like_tabular_q_learning():
    """Q_theta'(X) - Q_theta(X) = lr * delta to first order: the relative error shrinks linearly with lr."""
    obs, act, delta = batch()
    errors = []
    for lr in (1e-2, 1e-3, 1e-4):
        net = sin_critic()
        before = net(obs, act).detach().double()
        preconditioned_step(net, (obs, act), delta, lr=lr, max_shrinks=0)
        change = net(obs, act).detach().double() - before
        errors.append(float(torch.linalg.vector_norm(change - lr * delta) / torch.linalg.vector_norm(lr * delta)))
    assert errors[2] < 0.01
    assert errors[1] / errors[0] == pytest.approx(0.1, rel=0.3)
    assert errors[2] / errors[1] == pytest.approx(0.1, rel=0.3)


def test_bad_arguments_are_named():
    net = sin_critic()
    obs, act, delta = batch()
    with pytest.raises(ValueError, match="shrink"):
        preconditioned_step(net, (obs, act), delta, shrink=1.5)
    with pytest.raises(ValueError, match="31 TD errors"):
        preconditioned_step(net, (obs, act), delta[:31])
    # What PreQN fixes or has not (target networks, a critic optimiser) is not an argument at all.
    for option in ("policy_freq", "critic_lr", "target_tau", "num_q"):
        with pytest.raises(TypeError, match=option):
            PreQN(obs_dim=5, act_dim=1, **{option: 2})
    with pytest.raises(ValueError, match="ntk_method"):
        PreQN(obs_dim=5, act_dim=1, ntk_method="magic")
    with pytest.raises(ValueError, match="max_shrinks"):
        PreQNLineSearch(max_shrinks=-1)


def fit(module, dm, steps, callbacks=(), **kwargs):
    options = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    options.update(kwargs)
    trainer = L.Trainer(max_steps=steps, callbacks=list(callbacks), **options)
    trainer.fit(module, dm)
    return trainer


def test_preqn_learns_the_chain_q_without_target_networks(tiny_td3bc):
    _, dm = tiny_td3bc()
    L.seed_everything(0, verbose=False)
    module = PreQN(obs_dim=CHAIN_STATES, act_dim=1, critic_hidden=(32, 32), actor_hidden=(32, 32), eval_every=0)
    assert module.target_pairs() == [] and not hasattr(module, "critic_target")
    trainer = fit(module, dm, 200)
    assert trainer.global_step == module.updates == 200
    obs = torch.eye(CHAIN_STATES)
    with torch.no_grad():
        q = module.q_value(obs, module.actor(obs))
    torch.testing.assert_close(q, torch.as_tensor(chain_q(0.99), dtype=torch.float32), rtol=0.02, atol=0.02)


def test_preqn_logs_its_step(tiny_td3bc, tmp_path):
    _, dm = tiny_td3bc()
    module = PreQN(obs_dim=CHAIN_STATES, act_dim=1, critic_hidden=(32, 32), actor_hidden=(32, 32), eval_every=0)
    trainer = fit(module, dm, 10, logger=L.pytorch.loggers.CSVLogger(tmp_path), log_every_n_steps=5)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["preqn/accepted"] == 1.0 and metrics["preqn/cos"] >= 0.9
    assert metrics["preqn/step_norm"] > 0 and metrics["preqn/shrink_steps"] >= 0


class Recorder(L.Callback):
    """Per step: the critic members' Q on the batch before and after the update."""

    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with torch.no_grad():
            self.before = [net(batch.obs, batch.act) for net in critic_members(pl_module)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with torch.no_grad():
            after = [net(batch.obs, batch.act) for net in critic_members(pl_module)]
        self.rows.append((self.before, after))


@pytest.mark.parametrize("cls", [TD3, TD3BC])
def test_line_search_makes_every_td3_critic_step_meet_the_criterion(tiny_td3bc, cls):
    _, dm = tiny_td3bc()
    module = cls(obs_dim=CHAIN_STATES, act_dim=1, critic_hidden=(32, 32), actor_hidden=(32, 32), eval_every=0)
    targets = []
    own = module.td_target
    module.td_target = lambda b: targets.append(own(b)) or targets[-1]  # spy: TD3's call, then the callback's
    search, recorder = PreQNLineSearch(), Recorder()
    fit(module, dm, 8, callbacks=[recorder, search])
    assert len(targets) == 16 and len(recorder.rows) == 8
    for k, (before, after) in enumerate(recorder.rows):
        ours, theirs = targets[2 * k], targets[2 * k + 1]
        assert torch.equal(ours, theirs)  # the callback uses TD3's own (noisy) targets
        for b, a in zip(before, after):  # both twin critics
            assert cosine(a - b, theirs - b) >= 0.9
    assert "step" not in module.trainer.optimizers[0].__dict__  # unwrapped after fit


def test_callback_step_equals_preqns_own_step(tiny_td3bc):
    """Same critic, batch and TD errors: TD3 + PreQNLineSearch and PreQN land on the same parameters."""
    options = dict(obs_dim=CHAIN_STATES, act_dim=1, critic_hidden=(32, 32), actor_hidden=(32, 32), eval_every=0,
                   critic_activation="sin")
    td3 = TD3(num_q=1, **options)
    preqn = PreQN(**options)
    preqn.critic.load_state_dict(td3.critic.state_dict())
    start = torch.nn.utils.parameters_to_vector(td3.critic.parameters()).detach().clone()
    search = PreQNLineSearch()
    _, dm = tiny_td3bc()
    fit(td3, dm, 1, callbacks=[search])
    preqn.td_target = lambda b: search.last_targets  # the TD errors the callback used
    _, dm = tiny_td3bc()
    fit(preqn, dm, 1)
    for a, b in zip(td3.critic.parameters(), preqn.critic.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(torch.nn.utils.parameters_to_vector(td3.critic.parameters()), start)  # both moved
    assert search.last[0].accepted


def test_ddp_preqn_and_line_search_take_the_union_batch_step(chain_file, tmp_path):
    run_ddp_script(Path(__file__).with_name("ddp_preqn.py"), chain_file, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in ("preqn", "td3"):
        assert torch.equal(r0[name]["params"], r1[name]["params"])
    # Single device: PreQN's step on the union of the ranks' first batches.
    init = r0["preqn"]["init"]
    module = PreQN(obs_dim=CHAIN_STATES, act_dim=1, critic_hidden=(16, 16), actor_hidden=(16, 16), eval_every=0)
    module.load_state_dict(init)
    union = Transitions(*(torch.cat([r0["preqn"]["batch"][i], r1["preqn"]["batch"][i]]) for i in range(5)))
    y = module.td_target(union)
    with torch.no_grad():
        delta = y - module.q_value(union.obs, union.act)
    preconditioned_step(module.q_network(), (union.obs, union.act), delta)
    expected = torch.nn.utils.parameters_to_vector(module.critic.parameters())
    torch.testing.assert_close(r0["preqn"]["critic"], expected.detach(), rtol=1e-5, atol=1e-6)


class NoTargetMethod(RandomWalkQ):
    """A probe-protocol module without td_target: the callback falls back on
    r + gamma (1 - d) Q(s', greedy_action(s'))."""

    td_target = None

    def training_step(self, batch, batch_idx):
        self.updates += 1
        with torch.no_grad():
            y = self.gamma * self.all_q(batch.next_obs).max(dim=1).values
        self.optimize(self.optimizers(), (self.q_value(batch.obs, batch.act) - y).pow(2).mean())


def test_line_search_without_td_target_uses_the_protocol_target():
    L.seed_everything(0, verbose=False)
    module, dm = NoTargetMethod(lr=0.01), RandomWalkDataModule(seed=0)
    search, recorder = PreQNLineSearch(), Recorder()
    with torch.no_grad():  # reward 0, no terminals: y = gamma max_d Q(s', d) of the initial network
        expected = 0.99 * module.all_q(dm.data.next_obs).max(dim=1).values
    fit(module, dm, 1, callbacks=[recorder, search])
    torch.testing.assert_close(search.last_targets, expected)
    (before,), (after,) = recorder.rows[0]
    assert cosine(after - before, expected - before) >= 0.9


# ------------------------------------------- gaps found by planting bugs in the update lines
def test_an_unreachable_criterion_keeps_the_smallest_step_and_says_so():
    """With ``cos_threshold=1`` no step qualifies: after ``max_shrinks`` shrinks the smallest
    step ``lr shrink^max_shrinks J^T K^+ delta`` is kept, ``accepted`` is False and
    ``step_norm`` is the length of that step (not of one shrink more)."""
    net = sin_critic(hidden=(16, 16))
    obs, act, delta = batch(n=12)
    delta = 30 * delta
    expected = 0.5 * 0.25**3 * pinv_direction(net, obs, act, delta)
    start = flat_params(net)
    before = net(obs, act).detach()
    result = preconditioned_step(net, (obs, act), delta, lr=0.5, shrink=0.25, max_shrinks=3, cos_threshold=1.0)
    moved = flat_params(net) - start
    assert result.shrink_steps == 3 and not result.accepted
    assert torch.linalg.vector_norm(moved - expected) <= 1e-4 * torch.linalg.vector_norm(expected)
    assert result.step_norm == pytest.approx(float(torch.linalg.vector_norm(expected)), rel=1e-4)
    assert result.cos == pytest.approx(cosine(net(obs, act).detach() - before, delta), abs=1e-6)
    assert result.cos < 1.0


def test_the_line_search_measures_q_in_eval_mode_and_restores_train_mode():
    """A critic with dropout: the criterion ``cos(Q_theta'(X) - Q_theta(X), delta)`` is measured
    without dropout (eval mode), as a by-hand evaluation in eval mode after the step shows, and
    the model is back in train mode afterwards."""
    torch.manual_seed(0)
    net = StateActionQ(mlp(5, 1, hidden=(32, 32), activation="sin", dropout=0.5))
    net.train()
    obs, act, delta = batch(n=12)
    net.eval()
    with torch.no_grad():
        before = net(obs, act)
    net.train()
    result = preconditioned_step(net, (obs, act), 10 * delta, lr=0.5, max_shrinks=0)
    assert net.training
    net.eval()
    with torch.no_grad():
        change = net(obs, act) - before
    assert result.cos == pytest.approx(cosine(change, delta), abs=1e-6)
