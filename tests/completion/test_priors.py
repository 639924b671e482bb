"""The deterministic prior and the residual path: values of the carry rule, and an engine that
learned nothing reproduces the prior exactly."""

import pytest
import torch

from completion.baselines import Persistence
from completion.model import ModelConfig, build_model
from completion.evaluate import choose_prior
from completion.priors import carry_prior, compute_prior, resample_profile, shrunk_mean, slot_profile
from completion.tasks import TaskConfig, make_regions


def series(values, revealed):
    """One series as a [1, 1, T, 1, 1] tensor and its evidence mask."""
    x = torch.tensor(values, dtype=torch.float32).reshape(1, 1, -1, 1, 1)
    e = torch.tensor(revealed, dtype=torch.bool).reshape(1, 1, -1, 1, 1)
    return x, e


def test_carry_interpolates_between_evidence_and_persists_after_it():
    x, e = series([9., 2., 9., 9., 6., 9.], [0, 1, 0, 0, 1, 0])
    assert carry_prior(x, e).flatten().tolist() == pytest.approx([2., 2., 10 / 3, 14 / 3, 6., 6.])


def test_damping_pulls_the_forecast_toward_the_series_mean():
    x, e = series([2., 6., 0., 0., 0.], [1, 1, 0, 0, 0])  # evidence mean 4, last value 6
    out = carry_prior(x, e, damping=0.5).flatten()
    assert out[2:].tolist() == pytest.approx([4 + 0.5 * 2, 4 + 0.25 * 2, 4 + 0.125 * 2])


def test_a_cell_without_evidence_takes_the_other_cells_and_a_channel_without_any_is_zero():
    x = torch.tensor([[1., 2., 3.], [7., 7., 7.]]).T.reshape(1, 1, 3, 1, 2)  # cell 0: 1,2,3; cell 1 hidden
    e = torch.zeros_like(x, dtype=torch.bool)
    e[..., 0] = True
    assert carry_prior(x, e)[..., 1].flatten().tolist() == [1., 2., 3.]
    assert carry_prior(x, torch.zeros_like(e)).abs().sum() == 0


def test_the_seasonal_profile_is_removed_and_added_back():
    x, e = series([10., 11., 0., 0.], [1, 1, 0, 0])
    season = torch.tensor([0., 1., 5., -5.]).reshape(1, 1, 4, 1, 1)
    # de-seasonalised evidence is 10, 10 -> carried 10 -> plus the profile
    assert carry_prior(x, e, 1.0, season).flatten().tolist() == [10., 11., 15., 5.]


def test_only_evidence_entries_are_read():
    x, e = series([1., 5., 3., 8.], [1, 0, 1, 0])
    changed = x.clone()
    changed[~e] = 1000.0
    assert torch.equal(carry_prior(x, e), carry_prior(changed, e))


def test_unknown_prior_is_an_error():
    with pytest.raises(ValueError, match="unknown prior 'median'"):
        compute_prior("median", torch.zeros(1, 1, 2, 1, 1), torch.ones(1, 1, 2, 1, 1))
    with pytest.raises(ValueError, match="unknown prior"):
        build_model(ModelConfig(channels=1, T=4, cell_dim=2, entity_dim=2, prior="median"))


def test_slot_profile_and_its_resampling():
    x = torch.zeros(2, 1, 4, 1, 1)
    x[:, 0, :, 0, 0] = torch.tensor([1., 3., 1., 3.])  # mean 2: deviations -1, +1 at slots 0 and 1
    ts = torch.stack([torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 0, 1])], -1).expand(2, 4, 2)
    profile = slot_profile(x, torch.ones(2, 4, 1, 1, dtype=torch.bool), ts, slots_per_day=2)
    assert profile.tolist() == [[-1.0, 1.0]]
    with pytest.raises(ValueError, match="slots_per_day"):
        slot_profile(x, torch.ones(2, 4, 1, 1, dtype=torch.bool), ts * 3, slots_per_day=2)
    four = torch.tensor([[0., 2., 4., 6.]])
    assert resample_profile(four, 2).tolist() == [[1.0, 5.0]]  # the mean of each pair of slots
    assert torch.equal(resample_profile(four, 4), four)


def test_persistence_is_the_last_available_value(make_batch):
    batch = make_batch(B=2, C=1, T=6, H=1, W=2)
    task = torch.tensor([0, 0])
    regions = make_regions(task, batch.observed, 1, TaskConfig(short_horizon=2, long_horizon=3))
    pred = Persistence().predict(batch, task, regions)
    assert torch.equal(pred[:, :, 4:], batch.x[:, :, 3:4].expand(-1, -1, 2, -1, -1))


def test_an_engine_whose_residual_is_zero_reproduces_the_prior_exactly(make_batch):
    """adaLN-Zero: a fresh DiT outputs zero, so point and every sample are the prior (+ evidence)."""
    batch = make_batch(B=3, C=2, T=8, H=2, W=3)
    task = torch.tensor([0, 1, 2])
    regions = make_regions(task, batch.observed, 2, TaskConfig(2, 4, 3), torch.Generator().manual_seed(0))
    model = build_model(ModelConfig(channels=2, T=8, cell_dim=4, entity_dim=7, patch_size=(2, 1, 3),
                                    diffusion_steps=50, prior_damping=0.9, prior_shrinkage=2.0,
                                    umask=dict(d=16))).eval()
    model.profile.normal_()  # a seasonal profile, so that path is exercised too
    M = regions.available.float()
    out = model.complete(batch, task, regions, n_samples=3, steps=5, M=M, generator=torch.Generator().manual_seed(1))
    evidence = regions.evidence(M)
    offset = shrunk_mean(batch.x, evidence, 2.0)
    assert torch.equal(model.offset(batch.x, regions), offset)
    expected = carry_prior(batch.x - offset, evidence, 0.9, model.seasonal(batch.timestamps), 2.0) + offset
    expected = torch.where(evidence.bool(), batch.x, expected)
    assert torch.allclose(out.point, expected, atol=1e-5)
    assert torch.allclose(out.samples, expected.expand_as(out.samples), atol=1e-5)


def test_the_residual_scale_is_fitted_on_training_targets(make_batch):
    batch = make_batch(B=16, C=2, T=8, H=2, W=3)
    model = build_model(ModelConfig(channels=2, T=8, cell_dim=4, entity_dim=7, patch_size=(2, 1, 3), umask=dict(d=8)))
    model.fit_statistics(batch, TaskConfig(2, 4, 3), ("short", "long"), torch.Generator().manual_seed(0))
    assert (model.residual_scale > 0.3).all() and (model.residual_scale < 3).all()  # white noise: order 1
    assert model.profile.abs().sum() > 0
    zero = build_model(ModelConfig(channels=2, T=8, cell_dim=4, entity_dim=7, prior="zero", umask=dict(d=8)))
    zero.fit_statistics(batch, TaskConfig(2, 4, 3), ("short",), torch.Generator().manual_seed(0))
    assert torch.equal(zero.residual_scale, torch.ones(2))  # the plain DiT: no rescaling


def test_damped_interpolation_is_a_mean_reverting_bridge():
    x, e = series([0., 0., 0., 0., 0., 8.], [1, 0, 0, 0, 0, 1])  # level 4
    out = carry_prior(x, e, damping=0.5).flatten()
    # t=1: l = 0.2, 4 + 0.8 * 0.5 * (0 - 4) + 0.2 * 0.5**4 * (8 - 4)
    assert out[1].item() == pytest.approx(4 + 0.8 * 0.5 * -4 + 0.2 * 0.5**4 * 4)
    assert out[[0, 5]].tolist() == [0., 8.]  # evidence is reproduced
    assert carry_prior(x, e, damping=0.0).flatten()[1:5].tolist() == [4.] * 4  # the mean
    x, e = series([0., 0., 6., 2.], [0, 0, 1, 1])  # before the first entry: damped toward the level 4
    assert carry_prior(x, e, damping=0.5).flatten().tolist() == pytest.approx([4.5, 5., 6., 2.])


def test_shrinkage_pulls_evidence_means_toward_the_training_mean():
    x, e = series([2., 6., 0., 0., 0.], [1, 1, 0, 0, 0])
    assert torch.equal(carry_prior(x, e, 0.5, shrinkage=0.0), carry_prior(x, e, 0.5))
    # damping 0: the level, 8 / (2 entries + 2 pseudo-entries at 0)
    assert carry_prior(x, e, 0.0, shrinkage=2.0).flatten()[2:].tolist() == pytest.approx([2., 2., 2.])
    assert shrunk_mean(x, e, 2.0).item() == pytest.approx(2.0)
    # a hidden cell: the revealed cell's value 4 at slot 0, shrunk by one pseudo-entry, carried on
    x = torch.tensor([[4., 0., 0.], [9., 9., 9.]]).T.reshape(1, 1, 3, 1, 2)
    e = torch.zeros_like(x, dtype=torch.bool)
    e[0, 0, 0, 0, 0] = True
    assert carry_prior(x, e, 1.0, shrinkage=1.0)[..., 1].flatten().tolist() == [2., 2., 2.]


def test_choose_prior_persistence_for_smooth_series_shrinkage_for_sparse_cold_starts(make_batch):
    config = TaskConfig(short_horizon=2, long_horizon=4, cold_revealed=2)
    smooth = make_batch(B=8, C=1, T=16, H=2, W=2)
    walk = smooth.x.cumsum(2)  # random walks: the last value is the best forecast
    smooth = type(smooth)(**{**smooth.__dict__, "x": walk})
    damping, shrinkage, scores = choose_prior(smooth, smooth, ("short",), config, 96, seasonal=False)
    assert (damping, shrinkage) == (1.0, 0.0) and len(scores) == 24
    # zero-inflated bursts: a few revealed entries say little about the empty cells
    sparse = make_batch(B=32, C=1, T=16, H=3, W=3, seed=1)
    bursts = torch.where(sparse.x > 1.5, 3 * sparse.x, torch.zeros_like(sparse.x))
    sparse = type(sparse)(**{**sparse.__dict__, "x": bursts})
    _, shrinkage, scores = choose_prior(sparse, sparse, ("cold",), config, 96, seasonal=False)
    assert shrinkage > 0 and scores[f"0/{shrinkage:g}"] < scores["0/0"]
