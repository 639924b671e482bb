"""U-MASK (Eq. 5-18): exact budgets, binary masks inside the available region, a cold-start
distribution that sums to one, and gradients that reach every mask parameter."""

import math

import pytest
import torch

from completion.masks import UMask, UMaskConfig, soft_top_k
from completion.tasks import TaskConfig, make_regions, task_index

CONFIG = TaskConfig(short_horizon=2, long_horizon=8, cold_revealed=5)
MIXED = torch.tensor([0, 0, 1, 1, 2, 2])  # short, short, long, long, cold, cold


def umask_for(batch, **kwargs):
    torch.manual_seed(0)
    return UMask(batch.x.shape[1], batch.x.shape[2], batch.cells.shape[-1], UMaskConfig(d=16, **kwargs))


def run(umask, batch, task=MIXED, config=CONFIG, seed=0):
    """U-MASK on fixed task regions; `seed` drives only the mask's own randomness."""
    regions = make_regions(task, batch.observed, batch.x.shape[1], config,
                           torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    return umask(batch.x, regions.available, regions.visible, batch.cells, task, g), regions


@pytest.mark.parametrize("training", [True, False])
def test_budget_is_exactly_floor_of_rho_times_available_count(batch, training):
    umask = umask_for(batch).train(training)
    out, regions = run(umask, batch)
    N = regions.available.flatten(1).sum(1)
    assert torch.equal(out.k, torch.floor(out.rho.detach() * N).long())
    assert torch.equal(out.M.detach().flatten(1).sum(1).long(), out.k)


def test_masks_are_binary_and_reveal_only_available_non_target_entries(batch):
    for config in (CONFIG, TaskConfig(short_horizon=2, long_horizon=8, cold_hidden_channels=(1,))):
        out, regions = run(umask_for(batch).train(), batch, config=config)
        M = out.M.detach()
        assert set(M.unique().tolist()) <= {0.0, 1.0}
        assert not (M.bool() & ~regions.available).any()
        assert not (regions.evidence(M).bool() & regions.target).any()


def test_scores_are_a_distribution_over_the_available_region(batch):
    out, regions = run(umask_for(batch), batch)
    assert torch.allclose(out.p.flatten(1).sum(1), torch.ones(len(MIXED)))
    assert not (out.p > 0)[~regions.available].any()


def test_cold_start_mixing_sums_to_one_and_keeps_eps_over_n_everywhere(batch):
    eps = 0.25
    umask = umask_for(batch, cold_eps=eps)
    cold = torch.full((6,), task_index("cold"))
    out, regions = run(umask, batch, task=cold, config=TaskConfig(cold_revealed=7))
    assert torch.allclose(out.p.flatten(1).sum(1), torch.ones(6))
    assert (out.p[regions.available] >= eps / 7 - 1e-7).all()


def test_gumbel_noise_only_in_training(batch):
    umask = umask_for(batch).eval()
    first, _ = run(umask, batch, seed=1)
    second, _ = run(umask, batch, seed=2)
    assert torch.equal(first.M, second.M)
    umask.train()
    first, _ = run(umask, batch, seed=1)
    again, _ = run(umask, batch, seed=1)
    other, _ = run(umask, batch, seed=2)
    assert torch.equal(first.M, again.M) and not torch.equal(first.M, other.M)


def test_reconstruction_gradient_reaches_rho_phi_beta_w_c_through_the_relaxation(batch):
    umask = umask_for(batch).train()
    out, _ = run(umask, batch)
    weights = torch.randn(out.M.shape, generator=torch.Generator().manual_seed(3))
    (out.M * weights).sum().backward()  # any loss of the hard mask, as L_rec is
    for name in ("rho_logit", "phi_logit", "beta_logit", "w", "c"):
        grad = getattr(umask, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_soft_top_k_matches_the_budget_and_grows_with_it():
    g = torch.randn(3, 20, generator=torch.Generator().manual_seed(0), requires_grad=True)
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[0, 10:] = False
    K = torch.tensor([4.0, 7.5, 12.0], requires_grad=True)
    soft = soft_top_k(g, K, valid, temperature=0.5)
    assert torch.allclose(soft.sum(1), K.detach(), atol=1e-4)
    assert not soft[0, 10:].any()
    soft.sum().backward()  # d(sum soft)/dK = 1 by construction of theta
    assert torch.allclose(K.grad, torch.ones(3), atol=1e-4)


def test_rho_starts_at_rho_tau_times_gamma(batch):
    umask = umask_for(batch, rho_init=0.8)
    out, _ = run(umask, batch)
    assert torch.allclose(out.gamma, torch.full((6,), 0.8))  # w = 0, c = logit(0.8)
    assert torch.allclose(out.rho, torch.full((6,), 0.64))


def test_one_entity_at_evaluation_draws_neighbours_from_the_training_bank(make_batch):
    batch = make_batch(B=8, seed=4)
    umask = umask_for(batch, bank_size=16).train()
    task = torch.zeros(8, dtype=torch.long)
    run(umask, batch, task=task)  # fills the bank with the training entities' Z
    assert umask.bank_seen[0] == 8 and umask.bank_seen[1:].sum() == 0
    umask.eval()
    with torch.no_grad():
        umask.w.fill_(1.0)  # make gamma depend on the neighbour similarity
        alone, _ = run(umask, batch[:1], task=task[:1])
        together, _ = run(umask, batch, task=task)
    assert torch.allclose(alone.gamma, together.gamma[:1])
    # the entity itself is in the bank: its nearest neighbour is itself, S = alpha |A|^2 + (1 - alpha)
    A = together.A[0]
    s_self = 0.5 * (A @ A) + 0.5
    e = torch.stack([s_self, together.Z[0].norm() / math.sqrt(16), -(A * A.log()).sum()])
    assert torch.allclose(together.gamma[0], torch.sigmoid(e.sum() + umask.c), atol=1e-5)
