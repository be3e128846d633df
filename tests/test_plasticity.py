"""lit_qlearn.plasticity against hand computations."""
import math

import pytest
import torch
from torch import nn

from lit_qlearn.networks import Sin, StateActionQ, mlp
from lit_qlearn.plasticity import (dormant_fraction, dormant_scores, effective_rank, penultimate_features,
                                   plasticity_metrics, preactivation_stats, weight_norm)

# The four corners of [-1, 1]^2.
CORNERS = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])


def hand_net(inplace: bool = False) -> nn.Sequential:
    """2 -> 4 (ReLU) -> 2 (Tanh) -> 1 with weights set so that, on the corners,

    layer 1: h0 = relu(x0), h1 = relu(-x0 - 100) (never fires), h2 = relu(0.01 x1), h3 = relu(2 x1);
             E|h| = (0.5, 0, 0.005, 1), layer mean 0.37625, scores (1.329, 0, 0.0133, 2.658);
    layer 2: g0 = tanh(h0), g1 = tanh(0) = 0 (never fires); E|g| = (tanh(1)/2, 0), scores (2, 0).
    """
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(inplace=inplace), nn.Linear(4, 2), nn.Tanh(), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.01], [0.0, 2.0]]))
        net[0].bias.copy_(torch.tensor([0.0, -100.0, 0.0, 0.0]))
        net[2].weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
        net[2].bias.zero_()
        net[4].weight.copy_(torch.tensor([[3.0, -4.0]]))
        net[4].bias.fill_(12.0)
    return net


def test_dormant_scores_and_fraction_match_hand_computation():
    net = hand_net()
    scores = dormant_scores(net, CORNERS)
    layer_mean = (0.5 + 0 + 0.005 + 1) / 4
    assert list(scores) == ["1", "3"]
    assert scores["1"].tolist() == pytest.approx([0.5 / layer_mean, 0.0, 0.005 / layer_mean, 1 / layer_mean])
    assert scores["3"].tolist() == pytest.approx([2.0, 0.0])
    # tau = 0.025: h1, h2 (score 0.0133) and g1 are dormant, 3 of 6 units.
    assert dormant_fraction(net, CORNERS) == 0.5
    assert dormant_fraction(net, CORNERS, tau=0.0) == 2 / 6  # only the units that never fire
    assert dormant_fraction(net, CORNERS, tau=1.5) == 4 / 6  # h0 (1.33) too; h3 (2.66) and g0 (2) not


def test_two_input_critic_and_every_activation_type():
    torch.manual_seed(0)
    obs, act = torch.randn(64, 3), torch.randn(64, 2)
    for activation in ("relu", "tanh", "sin", "elu", "mish"):
        q = StateActionQ(mlp(5, 1, hidden=(8, 6), activation=activation))
        scores = dormant_scores(q, (obs, act))
        assert list(scores) == ["net.1", "net.3"]
        h1 = q.net[:2](torch.cat([obs, act], -1)).detach()
        expected = h1.abs().mean(0) / h1.abs().mean()
        assert torch.allclose(scores["net.1"], expected.double(), rtol=1e-5), activation
    assert isinstance(mlp(2, 1, hidden=(3,), activation="sin")[1], Sin)


def test_a_dead_layer_is_all_dormant_and_no_activation_is_nan():
    net = hand_net()
    with torch.no_grad():
        net[0].bias.fill_(-1000.0)  # every unit of layer 1 dead, and so g = tanh(0) = 0 too
    assert dormant_fraction(net, CORNERS) == 1.0
    assert math.isnan(dormant_fraction(nn.Linear(2, 1), CORNERS))


def test_output_activation_is_not_a_hidden_layer():
    net = mlp(2, 1, hidden=(4,), output_activation="tanh")
    assert list(dormant_scores(net, CORNERS)) == ["1"]


def test_effective_rank_of_known_singular_values():
    torch.manual_seed(0)
    sigma = torch.tensor([50.0, 30.0, 15.0, 4.5, 0.3, 0.2], dtype=torch.float64)  # sum 100
    u, _ = torch.linalg.qr(torch.randn(40, 6, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    x = (u * sigma) @ v.T
    # Cumulative shares 0.50, 0.80, 0.95, 0.995, 0.998, 1.
    assert effective_rank(x, delta=0.01) == 4
    assert effective_rank(x, delta=0.06) == 3
    assert effective_rank(x, delta=0.3) == 2
    assert effective_rank(x, delta=0.6) == 1
    assert effective_rank(x.float(), delta=0.0) == 6
    low = torch.randn(30, 2) @ torch.randn(2, 5)  # rank 2 in a 5-d space
    assert effective_rank(low, delta=1e-4) == 2
    assert effective_rank(torch.zeros(5, 3)) == 0
    with pytest.raises(ValueError, match="delta"):
        effective_rank(x, delta=1.0)


def test_penultimate_features_weight_norm_and_preactivations():
    net = hand_net(inplace=True)  # in place: the recorded pre-activation must be the value before the ReLU
    z1 = CORNERS @ net[0].weight.T.detach() + net[0].bias.detach()
    h = torch.relu(z1)
    z2 = h @ net[2].weight.T.detach()
    assert torch.equal(penultimate_features(net, CORNERS), torch.tanh(z2))
    stats = preactivation_stats(net, CORNERS)
    assert stats["1"] == pytest.approx((z1.mean().item(), z1.std(unbiased=False).item()))
    assert stats["3"] == pytest.approx((z2.mean().item(), z2.std(unbiased=False).item()))
    # ||theta||^2: layer 1: 1 + 1 + 1e-4 + 4 + 100^2, layer 2: 1, output: 9 + 16 + 144.
    assert weight_norm(net) == pytest.approx(math.sqrt(6.0001 + 1e4 + 1 + 169), rel=1e-6)  # float32 per-tensor norms
    metrics = plasticity_metrics(net, CORNERS, tau=0.025, delta=0.01)
    assert metrics["dormant_fraction"] == 0.5
    assert metrics["dormant_fraction/1"] == 0.5 and metrics["dormant_fraction/3"] == 0.5
    assert metrics["feature_rank"] == 1  # g1 = 0: the features span one direction
    assert (metrics["preact_mean/1"], metrics["preact_scale/1"]) == pytest.approx(stats["1"])
    with pytest.raises(ValueError, match="no nn.Linear"):
        penultimate_features(nn.Tanh(), CORNERS)


def test_measurements_leave_no_trace():
    torch.manual_seed(0)
    net = mlp(2, 1, hidden=(16, 16), dropout=0.5).train()
    x = torch.randn(32, 2)
    rng = torch.get_rng_state()
    metrics = plasticity_metrics(net, x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in net.modules())
    assert all(p.grad is None for p in net.parameters())
    # measured in eval mode: dropout off, so the features are deterministic
    assert metrics["feature_rank"] == effective_rank(net.eval()[:-1](x).detach())


# ------------------------------- mutation-testing additions (issue 19)
# Each test below catches a planted single-line bug the tests above let through (named in its docstring).


def test_per_layer_fractions_count_a_score_equal_to_tau():
    """``dormant_fraction/<layer>`` counts ``s_i <= tau`` like the pooled fraction: with tau = 0
    exactly the units that never fire (h1 of 4 in layer 1, g1 of 2 in layer 3). Catches ``<``."""
    metrics = plasticity_metrics(hand_net(), CORNERS, tau=0.0)
    assert metrics["dormant_fraction/1"] == 1 / 4
    assert metrics["dormant_fraction/3"] == 1 / 2
    assert metrics["dormant_fraction"] == 2 / 6


def test_effective_rank_share_exactly_one_minus_delta():
    """srank is the smallest k with share_k >= 1 - delta: a share landing exactly on 1 - delta
    counts. Singular values (2, 1, 1), sum 4, shares 0.5, 0.75, 1 (exact in binary)."""
    x = torch.diag(torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64))
    assert effective_rank(x, delta=0.25) == 2
    assert effective_rank(x, delta=0.5) == 1
    assert effective_rank(x, delta=0.2) == 3


def test_weight_norm_skips_frozen_parameters_and_metrics_use_delta():
    """``weight_norm`` is over trainable parameters only (the frozen bias -100 of layer 1 is out),
    and ``plasticity_metrics`` passes its ``delta`` to the feature rank (the penultimate features
    of a lone Linear are its inputs, whose singular values are known)."""
    net = hand_net()
    net[0].bias.requires_grad_(False)
    # ||theta||^2 without layer 1's bias: 1 + 1 + 1e-4 + 4 (layer 1 weights) + 1 (layer 2) + 9 + 16 + 144
    assert weight_norm(net) == pytest.approx(math.sqrt(6.0001 + 1 + 169), rel=1e-6)
    assert plasticity_metrics(net, CORNERS)["weight_norm"] == pytest.approx(math.sqrt(6.0001 + 1 + 169), rel=1e-6)
    torch.manual_seed(0)
    sigma = torch.tensor([50.0, 30.0, 15.0, 4.5, 0.3, 0.2], dtype=torch.float64)  # shares 0.5, 0.8, 0.95, 0.995, ...
    u, _ = torch.linalg.qr(torch.randn(40, 6, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    x = (u * sigma) @ v.T
    head = nn.Linear(6, 1).double()
    for delta, rank in ((0.01, 4), (0.06, 3), (0.3, 2), (0.6, 1)):
        assert plasticity_metrics(head, x, delta=delta)["feature_rank"] == rank
