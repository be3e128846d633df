import lightning as L
import numpy as np
import pytest
import torch

from lit_qlearn.algorithms import DDPG, SAC, TD3
from lit_qlearn.callbacks import CrashPredictor, SEEMMonitor
from lit_qlearn.data import OnlineDataModule
from lit_qlearn.networks import SquashedGaussianActor
from lit_qlearn.probe import check_probe_module
from tests.algorithms.test_td3 import chain_grid
from tests.conftest import CHAIN_STATES, chain_q, fit


def test_squashed_gaussian_log_prob_matches_the_sampled_density():
    torch.manual_seed(0)
    actor = SquashedGaussianActor(3, 1, -2.0, 2.0, hidden=(8,))
    obs = torch.randn(1, 3).expand(200_000, 3)
    with torch.no_grad():
        actions, logp = actor.sample(obs)
        # the log-density the sampler reports is that of the action it returned
        torch.testing.assert_close(logp[:1000], actor.log_prob(obs[:1000], actions[:1000]), rtol=1e-4, atol=1e-4)
        counts, edges = np.histogram(actions.numpy().ravel(), bins=80, range=(-2, 2))
        centres = torch.tensor((edges[:-1] + edges[1:]) / 2, dtype=torch.float32)[:, None]
        density = actor.log_prob(obs[:80], centres).exp().numpy()
    empirical = counts / counts.sum() / (edges[1] - edges[0])
    # where the density is not tiny, the histogram agrees to sampling and binning error
    mask = density > 0.05
    assert mask.sum() > 10
    np.testing.assert_allclose(empirical[mask], density[mask], rtol=0.1)
    assert actions.abs().max() < 2.0 and torch.allclose(actor(obs[:1]), 2 * torch.tanh(actor.net(obs[:1])[:, :1]))


def test_temperature_gradient_sign_and_fixed_point():
    sac = SAC(obs_dim=3, act_dim=2)
    assert sac.target_entropy == -2.0  # -|A|
    for logp, sign in ((torch.full((8,), 5.0), -1), (torch.full((8,), -5.0), 1), (torch.full((8,), 2.0), 0)):
        sac.log_alpha.grad = None
        sac.temperature_loss(logp).backward()
        grad = sac.log_alpha.grad.item()
        # entropy -E[log pi] = -5 < -2: alpha must grow (negative gradient); = 5 > -2: shrink; = -2: fixed point
        assert np.sign(round(grad, 6)) == sign
        assert grad == pytest.approx(-(logp.mean().item() + sac.target_entropy))


def test_sac_with_vanishing_temperature_learns_the_closed_form_q(tiny_td3bc):
    _, dm = tiny_td3bc()
    # with alpha -> 0 the soft Q is the ordinary Q: (1 - gamma^(K-k)) / (1 - gamma) for every action
    module = SAC(obs_dim=CHAIN_STATES, act_dim=1, gamma=0.9, critic_hidden=(64, 64), actor_hidden=(64, 64),
                 critic_lr=1e-3, actor_lr=1e-3, init_alpha=1e-6, learn_alpha=False, target_tau=0.05, eval_every=0)
    fit(module, dm, 800)
    obs, act = chain_grid()
    with torch.no_grad():
        q = module.q_value(obs, act).view(CHAIN_STATES, 21).numpy()
    np.testing.assert_allclose(q, np.repeat(chain_q(0.9)[:, None], 21, 1), atol=0.1)
    assert module.updates == 800 and "alpha" not in module._optimizer_names


def test_ddpg_is_td3_with_ddpgs_defaults():
    td3, ddpg = TD3(obs_dim=3, act_dim=1), DDPG(obs_dim=3, act_dim=1)
    assert (td3.num_q, td3.policy_noise, td3.policy_freq, td3.target_update.every) == (2, 0.2, 2, 2)
    assert (ddpg.num_q, ddpg.policy_noise, ddpg.policy_freq, ddpg.target_update.every) == (1, 0.0, 1, 1)
    assert DDPG(obs_dim=3, act_dim=1, num_q=2).critic.num_q == 2  # still an argument, not a rejected one
    assert {id(online) for online, _ in ddpg.target_pairs()} == {id(ddpg.critic), id(ddpg.actor)}


@pytest.mark.parametrize("cls", [SAC, TD3, DDPG])
def test_online_actor_critics_under_the_monitors(cls, tmp_path):
    L.seed_everything(0, verbose=False)
    dm = OnlineDataModule("Pendulum-v1", learning_starts=128, batch_size=32, capacity=1000)
    module = cls(critic_hidden=(32, 32), actor_hidden=(32, 32), eval_every=0)
    monitors = [SEEMMonitor(every_n_steps=10, probe_size=64), CrashPredictor(every_n_steps=10, probe_size=64)]
    from lightning.pytorch.loggers import CSVLogger

    trainer = fit(module, dm, 20, callbacks=monitors, logger=CSVLogger(tmp_path), log_every_n_steps=10)
    assert module.updates == trainer.global_step == 20 and dm.rollout.env_steps == 128 + 20
    check_probe_module(module, probe=dm.probe_batch(8))
    assert {"seem/max_eig_normalized", "crash/td_error_norm", "train/critic_loss", "train/actor_loss",
            "rollout/env_steps"} <= set(trainer.callback_metrics)
    actions = module.explore(dm.rollout.obs, 0)
    assert actions.shape == (1, 1) and np.all(np.abs(actions) <= 2.0)
    greedy = module.act(dm.rollout.obs)
    assert np.allclose(greedy, module.act(dm.rollout.obs))  # act is deterministic
    if cls is SAC:  # alpha moved by its own optimiser, which does not count in global_step
        assert float(trainer.callback_metrics["train/alpha"]) != 1.0


@pytest.mark.slow
def test_sac_improves_on_pendulum():
    from lit_qlearn.data.rollout import make_vector_env, run_episodes

    L.seed_everything(0, verbose=False)
    dm = OnlineDataModule("Pendulum-v1", learning_starts=1000, batch_size=256)
    module = SAC(obs_dim=3, act_dim=1, action_low=-2.0, action_high=2.0, eval_every=0)
    env = make_vector_env("Pendulum-v1")
    before = np.mean(run_episodes(env, module.act, 5, seed=1)[0])
    fit(module, dm, 8000)
    after = np.mean(run_episodes(env, module.act, 5, seed=1)[0])
    assert after > -400 and after > before + 500
