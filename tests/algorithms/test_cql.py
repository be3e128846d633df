import math

import lightning as L
import numpy as np
import pytest
import torch

from lit_qlearn.algorithms import CQL, SAC
from lit_qlearn.data import OfflineDataModule, Transitions, write_d4rl
from tests.algorithms.test_td3 import chain_grid
from tests.conftest import CHAIN_STATES, chain_arrays, chain_q, fit

SMALL = dict(critic_hidden=(64, 64), actor_hidden=(64, 64), critic_lr=1e-3, actor_lr=1e-3, alpha_lr=1e-3,
             target_tau=0.05, eval_every=0)


def tiny_batch(b=3, obs_dim=3, low=(-2.0, 0.0), high=(1.0, 3.0), seed=0):
    g = torch.Generator().manual_seed(seed)
    low_t, high_t = torch.tensor(low), torch.tensor(high)
    act = low_t + (high_t - low_t) * torch.rand(b, len(low), generator=g)
    return Transitions(torch.randn(b, obs_dim, generator=g), act, torch.ones(b), torch.randn(b, obs_dim, generator=g),
                       torch.zeros(b))


def tiny_cql(**kwargs):
    torch.manual_seed(0)
    return CQL(obs_dim=3, act_dim=2, action_low=(-2.0, 0.0), action_high=(1.0, 3.0), critic_hidden=(8,),
               actor_hidden=(8,), eval_every=0, **kwargs)


def test_sampled_actions_and_their_log_densities():
    module, batch, n = tiny_cql(num_samples=4), tiny_batch(), 4
    actions, log_density = module.cql_actions(batch)
    assert actions.shape == (3, 12, 2) and log_density.shape == (3, 12)
    # the box (-2, 1) x (0, 3): uniform density 1/9 in it
    low, high = torch.tensor([-2.0, 0.0]), torch.tensor([1.0, 3.0])
    assert torch.all(actions >= low) and torch.all(actions <= high)
    torch.testing.assert_close(log_density[:, :n], torch.full((3, n), -math.log(9.0)))
    # then N actions of pi(.|s), then N of pi(.|s'), each with the policy's own log-density there
    with torch.no_grad():
        for b in range(3):
            for states, cols in ((batch.obs, slice(n, 2 * n)), (batch.next_obs, slice(2 * n, 3 * n))):
                own = module.actor.log_prob(states[b].expand(n, 3), actions[b, cols])
                torch.testing.assert_close(log_density[b, cols], own, atol=1e-3, rtol=1e-4)
    assert not actions.requires_grad and not log_density.requires_grad


def test_cql_penalty_matches_a_direct_logsumexp():
    module, batch, temp = tiny_cql(num_samples=2, cql_temp=0.5), tiny_batch(), 0.5
    torch.manual_seed(7)
    actions, log_density = module.cql_actions(batch)
    torch.manual_seed(7)  # the same draw inside cql_penalty
    penalty = module.cql_penalty(batch)
    assert penalty.shape == (2,) and penalty.requires_grad
    # per critic i: mean over s_b of T log sum_j exp((Q_i(s_b, a_bj) - log mu_bj) / T) - Q_i(s_b, a_b),
    # one Q evaluation at a time, in float64
    direct = []
    with torch.no_grad():
        for i in range(2):
            q_i = module.critic.q_function(i)
            per_state = []
            for b in range(3):
                terms = [(q_i(batch.obs[b:b + 1], actions[b, j:j + 1]).item() - log_density[b, j].item()) / temp
                         for j in range(6)]
                peak = max(terms)
                soft_max = temp * (peak + math.log(sum(math.exp(t - peak) for t in terms)))
                per_state.append(soft_max - q_i(batch.obs[b:b + 1], batch.act[b:b + 1]).item())
            direct.append(sum(per_state) / 3)
    np.testing.assert_allclose(penalty.detach().numpy(), direct, rtol=1e-5)
    # importance weights scale each state's term
    weighted = module.cql_penalty(batch._replace(weight=torch.tensor([1.0, 0.0, 2.0])), actions=actions,
                                  log_density=log_density)
    unweighted_terms = [module.cql_penalty(batch._replace(obs=batch.obs[b:b + 1], act=batch.act[b:b + 1]),
                                           actions=actions[b:b + 1], log_density=log_density[b:b + 1])
                        for b in range(3)]
    torch.testing.assert_close(weighted, (unweighted_terms[0] + 2 * unweighted_terms[2]) / 3)


def test_lagrange_multiplier_gradient_sign():
    module = tiny_cql(lagrange=True, target_action_gap=1.0)
    assert module.log_cql_alpha.item() == 1.0 and module.log_cql_alpha.requires_grad  # CORL's start
    assert module.cql_weight.item() == pytest.approx(10.0 * math.e)  # alpha' cql_alpha
    for gap, sign in ((torch.tensor([3.0, 2.0]), -1.0), (torch.tensor([0.5, 0.0]), 1.0),
                      (torch.tensor([1.5, 0.5]), 0.0)):
        module.log_cql_alpha.grad = None
        module.lagrange_loss(gap).backward()
        grad = module.log_cql_alpha.grad.item()
        # d/d log alpha' of -alpha' c (mean gap - target) = -alpha' c (mean gap - target): descent raises
        # alpha' while the gap (2.5) is above the target 1, lowers it below (0.25), stays at the target (1)
        assert grad == pytest.approx(-math.e * 10.0 * (gap.mean().item() - 1.0))
        assert np.sign(round(grad, 6)) == sign
    fixed = tiny_cql()
    assert fixed.cql_weight.item() == 10.0 and not fixed.log_cql_alpha.requires_grad
    assert "cql_alpha" in module.build_optimizers() and "cql_alpha" not in fixed.build_optimizers()


def test_cql_defaults_are_corls():
    hp = CQL(obs_dim=3, act_dim=2).hparams
    assert (hp.cql_alpha, hp.num_samples, hp.cql_temp, hp.lagrange, hp.target_action_gap, hp.backup_entropy,
            hp.actor_lr, hp.alpha_lr, hp.critic_lr, hp.cql_alpha_lr, hp.target_tau, hp.gamma, hp.init_alpha) == (
        10.0, 10, 1.0, False, -1.0, False, 3e-5, 3e-5, 3e-4, 3e-4, 5e-3, 0.99, 1.0)
    assert tuple(hp.critic_hidden) == tuple(hp.actor_hidden) == (256, 256, 256)


def test_cql_without_the_penalty_and_with_the_entropy_backup_is_sac(chain_file):
    runs = {}
    for cls, extra in ((SAC, {}), (CQL, dict(cql_alpha=0.0, backup_entropy=True))):
        L.seed_everything(0, verbose=False)
        dm = OfflineDataModule(str(chain_file), batch_size=16, normalize_states=False, seed=0, steps_per_epoch=50)
        module = cls(obs_dim=CHAIN_STATES, act_dim=1, **SMALL, **extra)
        fit(module, dm, 20)
        runs[cls] = module.state_dict()
    sac, cql = runs[SAC], runs[CQL]
    assert set(cql) - set(sac) == {"log_cql_alpha"}
    for key in sac:
        assert torch.equal(sac[key], cql[key]), key


def chain_module(path, **kwargs):
    L.seed_everything(0, verbose=False)
    dm = OfflineDataModule(str(path), batch_size=64, normalize_states=False, seed=0, steps_per_epoch=100)
    module = CQL(obs_dim=CHAIN_STATES, act_dim=1, gamma=0.9, **SMALL, **kwargs)
    fit(module, dm, 800)
    obs, act = chain_grid()
    with torch.no_grad():
        q = module.q_value(obs, act).view(CHAIN_STATES, 21).numpy()
    return module, q


@pytest.mark.parametrize("cql_alpha", [0.0, 10.0])
def test_on_uniform_actions_cql_keeps_the_chains_q(chain_file, cql_alpha):
    """The chain's data actions are uniform in [-1, 1] and its Q is the same for every action.
    For a Q constant in a the gap does not depend on its level (the logsumexp and Q(s, a_data)
    move together), so the penalty leaves the TD fixed point's level where it is: the mean of Q
    over the data's actions stays at (1 - gamma^(K-k)) / (1 - gamma). It reshapes Q across
    actions by its finite-sample estimate (tabular CQL(H): Q - y = (alpha/2)(1 - p_Q(a) / beta(a))
    with beta the data's empirical action density): about 0.45 at the bounds, where the
    data thin out, at alpha 10; nothing at alpha 0 (SAC without the entropy backup)."""
    module, q = chain_module(chain_file, cql_alpha=cql_alpha)
    data = chain_arrays()
    states = data["observations"].argmax(1)
    with torch.no_grad():
        q_data = module.q_value(torch.as_tensor(data["observations"]), torch.as_tensor(data["actions"])).numpy()
    per_state = np.array([q_data[states == k].mean() for k in range(CHAIN_STATES)])
    np.testing.assert_allclose(per_state, chain_q(0.9), atol=0.1 if cql_alpha else 0.02)
    np.testing.assert_allclose(q, np.repeat(chain_q(0.9)[:, None], 21, 1), atol=0.6 if cql_alpha else 0.05)


def test_cql_pushes_q_down_off_the_data(tmp_path):
    """Data actions uniform in [0, 1] only: the penalty drives Q on [-1, -0.6] far below the
    chain's Q (by more than 5, and more than 10 at a = -1, after 800 updates; it keeps
    falling), keeps Q on the data's actions (a in [0.1, 1]) within 0.75 of it, and the
    policy stays on the data. Without the penalty nothing pushes Q down off the data: it
    extrapolates at or above the chain's value (up to about 0.9 above it here)."""
    arrays = chain_arrays()
    arrays["actions"] = (arrays["actions"] + 1) / 2
    path = write_d4rl(tmp_path / "half.hdf5", arrays)
    expected = chain_q(0.9)[:, None]
    module, q = chain_module(path)
    assert np.all(q[:, :5] < expected - 5.0) and np.all(q[:, 0] < chain_q(0.9) - 10.0)
    np.testing.assert_allclose(q[:, 11:], np.repeat(expected, 10, 1), atol=0.75)
    with torch.no_grad():
        greedy = module.greedy_action(torch.eye(CHAIN_STATES))
    assert torch.all((greedy > 0.2) & (greedy < 1.0))
    _, q_free = chain_module(path, cql_alpha=0.0)
    assert np.all(q_free > expected - 0.1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_samples=0), "num_samples must be an integer >= 1"),
    (dict(num_samples=2.5), "num_samples"),
    (dict(cql_alpha=-1.0), "cql_alpha must be a number >= 0"),
    (dict(cql_temp=0.0), "cql_temp must be a number > 0"),
    (dict(cql_alpha_lr=-1e-3), "cql_alpha_lr must be a number > 0"),
    (dict(target_action_gap="big"), "target_action_gap must be a number"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=f"CQL: {match}"):
        CQL(obs_dim=3, act_dim=1, **kwargs)
