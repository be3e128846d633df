"""BatchRenorm1d against its definition (Ioffe 2017, Algorithm 1), computed independently in
numpy: running statistics after k passes, r and d with their clips inactive and active, the
warm-up boundary, eval mode, and no gradient through r and d; then the layer inside the one
MLP builder, the batched ensemble critic and the structured NTK engine."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from lit_qlearn.networks import BatchRenorm1d, Critic, EvalModeQ, StateActionQ, mlp, training_mode
from lit_qlearn.ntk import ntk_gram, supports_structured

EPS, MOM = 1e-3, 0.3


def batch_stats(x: np.ndarray, eps: float = EPS) -> tuple[np.ndarray, np.ndarray]:
    """Ioffe's mu_B and sigma_B = sqrt(biased variance + eps), in float64."""
    x = x.astype(np.float64)
    return x.mean(0), np.sqrt(((x - x.mean(0)) ** 2).mean(0) + eps)


def renorm_by_hand(x, mu, sigma, r_max, d_max, weight, bias, warm):
    """Algorithm 1: y = ((x - mu_B) / sigma_B * r + d) * weight + bias and the new running
    statistics; r = 1, d = 0 while not ``warm``."""
    mu_b, sigma_b = batch_stats(x)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max) if warm else np.ones_like(mu_b)
    d = np.clip((mu_b - mu) / sigma, -d_max, d_max) if warm else np.zeros_like(mu_b)
    y = ((x - mu_b) / sigma_b * r + d) * weight + bias
    return y, mu + MOM * (mu_b - mu), sigma + MOM * (sigma_b - sigma), r, d


def layer(num_features=3, **kwargs):
    torch.manual_seed(0)
    options = dict(eps=EPS, momentum=MOM, r_max=1.5, d_max=0.5, warmup_steps=2)
    options.update(kwargs)
    brn = BatchRenorm1d(num_features, **options)
    with torch.no_grad():
        brn.weight.copy_(torch.tensor([1.5, -0.5, 2.0][:num_features]))
        brn.bias.copy_(torch.tensor([0.1, 0.2, -0.3][:num_features]))
    return brn


def draw(k: int, n: int = 8, scale=(1.0, 3.0, 0.2), shift=(0.0, 2.0, -1.0)) -> np.ndarray:
    rng = np.random.default_rng(k)
    return (rng.normal(size=(n, 3)) * np.array(scale) + np.array(shift)).astype(np.float32)


def test_running_statistics_warm_up_and_renormalised_outputs_follow_algorithm_1():
    """Passes 1-2 (warm-up) are BatchNorm; from pass 3 on r and d apply, with the clips binding
    on some features and not on others; the running mean and std after each of five passes are
    the moving averages of mu_B and sigma_B."""
    brn = layer()
    w, b = brn.weight.detach().numpy().astype(np.float64), brn.bias.detach().numpy().astype(np.float64)
    mu, sigma = np.zeros(3), np.ones(3)
    seen_r, seen_d = [], []
    for k in range(1, 6):
        x = draw(k)
        expected, mu, sigma, r, d = renorm_by_hand(x, mu, sigma, 1.5, 0.5, w, b, warm=k > 2)
        y = brn(torch.from_numpy(x))
        np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(brn.running_mean.numpy(), mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(brn.running_std.numpy(), sigma, rtol=1e-5, atol=1e-6)
        assert int(brn.num_batches_tracked) == k
        if k > 2:
            seen_r.append(r), seen_d.append(d)
    r, d = np.concatenate(seen_r), np.concatenate(seen_d)
    # the clips bind on some entries and not on others (else the test would not see them)
    assert np.isclose(np.abs(np.log(r)), np.log(1.5)).any() and (np.abs(np.log(r)) < np.log(1.5) - 0.05).any()
    assert np.isclose(np.abs(d), 0.5).any() and (np.abs(d) < 0.45).any() and (np.abs(d) > 0.05).any()


def test_the_warm_up_boundary_is_the_first_renormalised_pass():
    """With ``warmup_steps=2`` the second pass is plain BatchNorm and the third is not: the same
    input gives a different output after the boundary, by hand on both sides."""
    brn = layer()
    brn(torch.from_numpy(draw(1)))
    mu, sigma = brn.running_mean.numpy().astype(np.float64), brn.running_std.numpy().astype(np.float64)
    x = draw(7)
    w, b = brn.weight.detach().numpy(), brn.bias.detach().numpy()
    before = brn(torch.from_numpy(x)).detach().numpy()  # pass 2: still warm-up
    np.testing.assert_allclose(before, renorm_by_hand(x, mu, sigma, 1.5, 0.5, w, b, warm=False)[0], atol=1e-5)
    mu, sigma = brn.running_mean.numpy().astype(np.float64), brn.running_std.numpy().astype(np.float64)
    after = brn(torch.from_numpy(x)).detach().numpy()  # pass 3: renormalised
    np.testing.assert_allclose(after, renorm_by_hand(x, mu, sigma, 1.5, 0.5, w, b, warm=True)[0], atol=1e-5)
    assert np.abs(after - before).max() > 0.1
    with pytest.raises(ValueError, match="warmup_steps"):
        BatchRenorm1d(3, warmup_steps=-1)
    assert BatchRenorm1d(3).warmup_steps == 100_000  # the CrossQ authors' warm-up


def test_eval_mode_uses_the_running_statistics_and_moves_nothing():
    brn = layer()
    with torch.no_grad():
        brn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        brn.running_std.copy_(torch.tensor([2.0, 0.5, 1.5]))
    brn.eval()
    x = draw(3)
    y = brn(torch.from_numpy(x)).detach().numpy()
    expected = (x - [0.5, -1.0, 2.0]) / [2.0, 0.5, 1.5] * [1.5, -0.5, 2.0] + [0.1, 0.2, -0.3]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    # samples do not interact: one row alone gives its row of the batch's output
    np.testing.assert_allclose(brn(torch.from_numpy(x[2:3])).detach().numpy(), y[2:3], rtol=1e-6)
    assert brn.running_mean.tolist() == [0.5, -1.0, 2.0] and int(brn.num_batches_tracked) == 0
    brn.train()
    with pytest.raises(ValueError, match="N >= 2"):
        brn(torch.from_numpy(x[:1]))


def test_no_gradient_flows_through_r_and_d():
    """The input's gradient equals that of the formula with r and d given as constants, and
    differs from the one where r and d are functions of the batch (so the test can tell)."""
    brn = layer(warmup_steps=0, r_max=3.0, d_max=5.0)  # unclipped: r and d depend on x everywhere
    with torch.no_grad():
        brn.running_mean.copy_(torch.tensor([0.3, 1.0, -0.8]))
        brn.running_std.copy_(torch.tensor([0.7, 2.0, 0.3]))
    mu, sigma = brn.running_mean.clone(), brn.running_std.clone()
    x = torch.from_numpy(draw(5)).double().requires_grad_(True)
    g = torch.from_numpy(np.random.default_rng(9).normal(size=(8, 3)))
    (grad,) = torch.autograd.grad((brn.double()(x) * g).sum(), x)

    def formula(x, constant):
        mu_b, sigma_b = x.mean(0), (x.var(0, unbiased=False) + EPS).sqrt()
        r, d = sigma_b / sigma.double(), (mu_b - mu.double()) / sigma.double()
        assert (r > 1 / 3).all() and (r < 3).all() and (d.abs() < 5).all()  # no clip binds
        if constant:
            r, d = r.detach(), d.detach()
        return ((x - mu_b) / sigma_b * r + d) * brn.weight.detach() + brn.bias.detach()

    (by_hand,) = torch.autograd.grad((formula(x, True) * g).sum(), x)
    (through,) = torch.autograd.grad((formula(x, False) * g).sum(), x)
    torch.testing.assert_close(grad, by_hand)
    assert (through - by_hand).abs().max() > 0.1


def test_mlp_puts_the_norm_before_every_linear_and_checks_its_options():
    net = mlp(4, 1, hidden=(8, 6), norm="batchrenorm", norm_position="before_linear",
              norm_options=dict(warmup_steps=7, momentum=0.05))
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["BatchRenorm1d", "Linear", "ReLU", "BatchRenorm1d", "Linear", "ReLU", "BatchRenorm1d", "Linear"]
    assert [m.num_features for m in net if isinstance(m, BatchRenorm1d)] == [4, 8, 6]
    assert all(m.warmup_steps == 7 and m.momentum == 0.05 for m in net if isinstance(m, BatchRenorm1d))
    chosen = mlp(4, 1, hidden=(8, 6), norm="batchrenorm", norm_position="before_linear", norm_layers=[0, 2])
    assert [type(m).__name__ for m in chosen][:2] == ["BatchRenorm1d", "Linear"] and len(chosen) == 7
    pre = mlp(4, 1, hidden=(8,), norm="batchrenorm")
    assert [type(m).__name__ for m in pre] == ["Linear", "BatchRenorm1d", "ReLU", "Linear"]
    for kwargs, argument in ((dict(norm_position="after"), "norm_position"),
                             (dict(norm_options=dict(momentum=0.1)), "norm_options"),
                             (dict(norm="batchrenorm", norm_position="before_linear", norm_layers=[3]), "norm_layers")):
        with pytest.raises(ValueError, match=argument):
            mlp(4, 1, hidden=(8, 6), **kwargs)


def test_the_batched_critic_renormalises_each_member_over_its_own_rows():
    torch.manual_seed(0)
    critic = Critic(3, 2, num_q=2, hidden=(16, 16), norm="batchrenorm", norm_position="before_linear",
                    norm_options=dict(warmup_steps=1, momentum=0.2))
    members = [copy.deepcopy(m) for m in critic.members]
    obs, act = torch.randn(10, 3), torch.randn(10, 2)
    for _ in range(3):  # pass 1 warm-up, passes 2-3 renormalised
        q = critic(obs, act)
        expected = torch.stack([m(torch.cat([obs, act], -1)).squeeze(-1) for m in members])
        torch.testing.assert_close(q, expected)
    for a, b in zip(critic.state_dict().values(), (v for m in members for v in m.state_dict().values())):
        torch.testing.assert_close(a, b)
    # the members' hidden statistics are their own
    assert not torch.allclose(critic.members[0][3].running_mean, critic.members[1][3].running_mean)
    # eval mode: each member with its own running statistics, which stay
    with training_mode(critic, False):
        q = critic(obs, act)
    with training_mode(members[0], False), training_mode(members[1], False):
        expected = torch.stack([m(torch.cat([obs, act], -1)).squeeze(-1) for m in members])
    torch.testing.assert_close(q, expected)
    for a, b in zip(critic.state_dict().values(), (v for m in members for v in m.state_dict().values())):
        torch.testing.assert_close(a, b)
    # gradients through the batched pass equal the members' own
    critic(obs, act).sum().backward()
    torch.stack([m(torch.cat([obs, act], -1)).squeeze(-1) for m in members]).sum().backward()
    for a, b in zip(critic.parameters(), (p for m in members for p in m.parameters())):
        torch.testing.assert_close(a.grad, b.grad)


def test_training_mode_sets_and_restores_every_submodules_mode():
    net = mlp(3, 1, hidden=(4,), norm="batchrenorm", dropout=0.1)
    net.train()
    net[2].eval()  # a submodule with a mode of its own
    with training_mode(net, False):
        assert not any(m.training for m in net.modules())
    assert net.training and not net[2].training and net[1].training
    with training_mode(net, True):
        assert all(m.training for m in net.modules())
    assert not net[2].training


def test_eval_mode_q_and_the_structured_ntk_use_the_running_statistics():
    """An EvalModeQ gives the eval-mode Q whatever the mode around it and moves no statistic;
    the structured Gram of a BatchRenorm MLP (eval mode) equals the torch.func Jacobian's."""
    torch.manual_seed(1)
    net = mlp(5, 1, hidden=(12, 12), norm="batchrenorm", norm_position="before_linear",
              norm_options=dict(warmup_steps=0, momentum=0.5))
    for _ in range(3):  # running statistics far from (0, 1), affine parameters away from (1, 0)
        net(torch.randn(32, 5) * 2 + 1)
    with torch.no_grad():
        for m in net:
            if isinstance(m, BatchRenorm1d):
                m.weight.add_(0.3 * torch.randn_like(m.weight))
                m.bias.add_(0.3 * torch.randn_like(m.bias))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    obs, act = torch.randn(9, 3), torch.randn(9, 2)
    q = EvalModeQ(net)
    net.train()
    value = q(obs, act)
    net.eval()
    torch.testing.assert_close(value, StateActionQ(net)(obs, act))
    net.train()
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert supports_structured(q)
    other = (torch.randn(4, 3), torch.randn(4, 2))
    structured = ntk_gram(q, (obs, act), other, method="structured", dtype=torch.float64)
    jacobian = ntk_gram(q, (obs, act), other, method="jacobian", dtype=torch.float64)
    torch.testing.assert_close(structured, jacobian, rtol=1e-9, atol=1e-9)
    assert structured.abs().max() > 0.1
    assert net.training and all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    # the Gram's BatchRenorm share: dropping its parameters from the Jacobian changes the kernel
    for m in net:
        if isinstance(m, BatchRenorm1d):
            m.weight.requires_grad_(False), m.bias.requires_grad_(False)
    assert (ntk_gram(q, (obs, act), other, method="structured", dtype=torch.float64) - structured).abs().max() > 1e-3
    torch.testing.assert_close(ntk_gram(q, (obs, act), other, method="structured", dtype=torch.float64),
                               ntk_gram(q, (obs, act), other, method="jacobian", dtype=torch.float64))
