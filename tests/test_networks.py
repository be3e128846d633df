import math

import pytest
import torch
from torch import nn

from lit_qlearn.networks import Actor, Critic, Sin, SquashedGaussianActor, mlp


def layer_types(net):
    return [type(m).__name__ for m in net]


def test_mlp_layout_with_layernorm_on_chosen_layers():
    net = mlp(4, 1, hidden=(8, 8, 8), activation="tanh", norm="layer", norm_layers=[1], dropout=0.1)
    assert layer_types(net) == [
        "Linear", "Tanh", "Dropout",
        "Linear", "LayerNorm", "Tanh", "Dropout",
        "Linear", "Tanh", "Dropout",
        "Linear",
    ]
    assert [m.out_features for m in net if isinstance(m, nn.Linear)] == [8, 8, 8, 1]


def test_mlp_options():
    net = mlp(3, 2, hidden=(5,), activation="sin", norm="batch", norm_affine=False, weight_norm_output=True)
    assert isinstance(net[1], nn.BatchNorm1d) and not net[1].affine
    assert isinstance(net[2], Sin)
    assert nn.utils.parametrize.is_parametrized(net[3], "weight")
    assert isinstance(mlp(3, 2, hidden=(), activation="elu"), nn.Sequential)  # linear model
    x = torch.randn(7, 3)
    net = mlp(3, 1, hidden=(4,), activation="mish")
    torch.testing.assert_close(net(x), net[2](torch.nn.functional.mish(net[0](x))))
    net = mlp(3, 1, hidden=(4,), norm="layer", norm_affine=False)
    assert not net[1].elementwise_affine and sum(p.numel() for p in net.parameters()) == 3 * 4 + 4 + 4 + 1


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"activation": "gelu"}, "activation"),
        ({"norm": "group"}, "norm"),
        ({"norm": "layer", "norm_layers": [2]}, "norm_layers"),
        ({"dropout": 1.0}, "dropout"),
        ({"hidden": (0,)}, "hidden"),
    ],
)
def test_mlp_bad_arguments_are_named(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        mlp(3, 1, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"activation": "sin"},
        {"norm": "layer"},
        {"norm": "layer", "norm_affine": False, "activation": "tanh"},
        {"norm": "batch"},
        {"weight_norm_output": True, "activation": "mish"},
        {"dropout": 0.3},
    ],
)
def test_ensemble_critic_equals_members_one_by_one(kwargs):
    torch.manual_seed(0)
    critic = Critic(5, 2, num_q=3, hidden=(16, 16), **kwargs).eval()
    for m in critic.modules():  # move LayerNorm/BatchNorm parameters away from 1 and 0
        if isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)
    obs, act = torch.randn(9, 5), torch.randn(9, 2)
    expected = torch.stack([critic.q_function(i)(obs, act) for i in range(3)])
    got = critic(obs, act)
    assert got.shape == (3, 9)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_ensemble_critic_gradients_match_members():
    torch.manual_seed(1)
    critic = Critic(3, 1, num_q=2, hidden=(8,), norm="layer")
    obs, act = torch.randn(6, 3), torch.randn(6, 1)
    critic(obs, act).pow(2).sum().backward()
    batched = [p.grad.clone() for p in critic.parameters()]
    critic.zero_grad()
    sum(critic.q_function(i)(obs, act).pow(2).sum() for i in range(2)).backward()
    for g, p in zip(batched, critic.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


def test_q_function_shares_member_parameters():
    critic = Critic(3, 2, num_q=2, hidden=(4,))
    q0 = critic.q_function(0)
    assert [id(p) for p in q0.parameters()] == [id(p) for p in critic.members[0].parameters()]


def test_actor_respects_action_bounds():
    torch.manual_seed(0)
    actor = Actor(4, 2, action_low=[-2.0, 0.0], action_high=[2.0, 1.0], hidden=(8,))
    with torch.no_grad():
        actor.net[-2].weight.mul_(100.0)  # saturate tanh
        a = actor(torch.randn(1000, 4) * 10)
    assert torch.all(a[:, 0] >= -2.0) and torch.all(a[:, 0] <= 2.0)
    assert torch.all(a[:, 1] >= 0.0) and torch.all(a[:, 1] <= 1.0)
    assert a[:, 0].max() > 1.99 and a[:, 1].min() < 0.01
    torch.testing.assert_close(actor.action_mid, torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(actor.action_scale, torch.tensor([2.0, 0.5]))
    with pytest.raises(ValueError, match="action_high"):
        Actor(4, 1, action_low=1.0, action_high=0.0)


# ------------------------------------------- gaps found by planting bugs in the update lines
def test_q_function_evaluates_its_member_on_state_then_action():
    """``critic.q_function(i)(s, a)`` is member i on ``cat(s, a)`` (the order the critic and the
    NTK probes share), by hand: one Linear, ReLU, one Linear."""
    torch.manual_seed(0)
    critic = Critic(3, 2, num_q=2, hidden=(4,))
    obs, act = torch.randn(5, 3), torch.randn(5, 2)
    with torch.no_grad():
        for i in range(2):
            first, last = critic.members[i][0], critic.members[i][2]
            x = torch.cat([obs, act], dim=-1)
            by_hand = ((x @ first.weight.T + first.bias).clamp(min=0) @ last.weight.T + last.bias).squeeze(-1)
            swapped = torch.cat([act, obs[:, :1], obs[:, 1:]], dim=-1)  # the other order of the 5 inputs
            assert (by_hand - ((swapped @ first.weight.T + first.bias).clamp(min=0) @ last.weight.T
                               + last.bias).squeeze(-1)).abs().max() > 0.05
            torch.testing.assert_close(critic.q_function(i)(obs, act), by_hand)
            torch.testing.assert_close(critic(obs, act)[i], by_hand)


def test_squashed_gaussian_log_prob_of_an_action_on_the_bound_is_finite_and_by_hand():
    """An action exactly on the bound (a dataset's clipped action) has a finite log-density:
    ``tanh^-1`` of the normalised action clamped to 1 - 1e-6, then the change of variables
    ``log N(u; mean, std) - sum log(scale (1 - tanh(u)^2))``, written out here in float64."""
    torch.manual_seed(0)
    low, high = torch.tensor([-2.0, 0.0]), torch.tensor([1.0, 1.0])
    actor = SquashedGaussianActor(3, 2, low.tolist(), high.tolist(), hidden=(8,))
    obs = torch.randn(4, 3)
    action = torch.stack([high, low, (low + high) / 2, torch.tensor([0.5, 0.25])])  # on the bounds, then inside
    with torch.no_grad():
        logp = actor.log_prob(obs, action)
        first, last = actor.net[0], actor.net[2]
        out = ((obs @ first.weight.T + first.bias).clamp(min=0) @ last.weight.T + last.bias).double()
    mean, raw = out[:, :2], out[:, 2:]
    log_std = -5.0 + 0.5 * 7.0 * (torch.tanh(raw) + 1.0)
    mid, scale = (high + low) / 2, (high - low) / 2
    y = ((action - mid) / scale).clamp(-1 + 1e-6, 1 - 1e-6).double()  # the clamp in float32, as the actor's
    scale = scale.double()
    u = 0.5 * torch.log((1 + y) / (1 - y))  # atanh
    gauss = -0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    expected = (gauss - torch.log(scale * (1 - torch.tanh(u) ** 2))).sum(-1)
    assert torch.isfinite(logp).all()
    torch.testing.assert_close(logp.double(), expected, rtol=1e-3, atol=1e-3)
