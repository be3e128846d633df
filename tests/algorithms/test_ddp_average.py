from pathlib import Path

import lightning as L
import pytest
import torch

from lit_qlearn.data import Transitions
from tests.algorithms.ddp_sgd_average import STEPS, NormLogger, make_batches, make_module
from tests.conftest import run_ddp_script


@pytest.mark.parametrize("path", ["direct", "lightning"])
def test_ddp_averages_gradients_where_sgd_shows_the_scale(tmp_path, path):
    """Two ranks on their own batches under SGD end where one process ends on the
    concatenated batches: the base all-reduces the gradients and divides by the world size.
    A sum instead of the mean doubles every SGD step, which Adam's scale-free step hides
    (the other DDP tests use Adam). Both step paths (lit_qlearn.algorithms.optim): direct,
    and through Lightning's wrappers (a callback listens to a step hook), where DDP's own
    reducer must stay out of the backward."""
    run_ddp_script(Path(__file__).with_name("ddp_sgd_average.py"), tmp_path, path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["direct"] == r1["direct"] == (path == "direct")
    assert r0["updates"] == r1["updates"] == STEPS
    assert torch.equal(r0["params"], r1["params"])

    module = make_module()
    initial = torch.nn.utils.parameters_to_vector(module.q_net.parameters()).detach().clone()
    module.batches = [Transitions.cat([a, b]) for a, b in zip(make_batches(0), make_batches(1))]
    logger = NormLogger()
    L.Trainer(max_steps=STEPS, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, accelerator="cpu").fit(module)
    single = torch.nn.utils.parameters_to_vector(module.q_net.parameters()).detach()
    # the steps are large (a doubled step would land far off), and the two runs agree
    assert (single - initial).norm() > 0.1
    torch.testing.assert_close(r0["params"], single, rtol=1e-5, atol=1e-6)
    # train/critic_grad_norm is the norm of the averaged gradient (the union batch's), the same on
    # both ranks; a norm taken before the all-reduce would be each rank's own
    assert sorted(logger.norms) == sorted(r0["norms"]) == sorted(r1["norms"]) == list(range(1, STEPS + 1))
    for step, norm in logger.norms.items():
        assert r0["norms"][step] == r1["norms"][step] == pytest.approx(norm, rel=1e-5)
