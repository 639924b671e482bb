"""Baselines behind one interface: exact historical averages, ARIMA on a clean daily sinusoid,
a masked patch transformer that learns, DiT controls that read the whole available region."""

import math
from dataclasses import replace

import pytest
import torch

from completion.baselines import (ARIMA, DiTForecaster, HistoricalAverage, MaskedPatchTransformer, PatchTSTForecaster,
                                  UserKNN, fourier_terms, make_baseline,
                                  train_patch_transformer)
from completion.batch import Batch
from completion.model import ModelConfig, build_model
from completion.tasks import TaskConfig, make_regions

SHORT, LONG = torch.tensor([0]), torch.tensor([1])


def regions_for(batch, task, config):
    return make_regions(task.expand(len(batch)), batch.observed, batch.x.shape[1], config,
                        torch.Generator().manual_seed(0))


def sinusoid_batch(B=2, T=64, noise=0.0, seed=0) -> Batch:
    """A daily sine in every series (slots of 15 minutes, starting at slot 10), plus noise."""
    g = torch.Generator().manual_seed(seed)
    slot = (10 + torch.arange(T)) % 96
    wave = torch.sin(2 * math.pi * slot / 96)
    x = wave[None, None, :, None, None].expand(B, 1, T, 2, 1).clone() + noise * torch.randn(B, 1, T, 2, 1, generator=g)
    return Batch(x=x, observed=torch.ones(B, T, 2, 1, dtype=torch.bool), entity=torch.zeros(B, 3),
                 cells=torch.zeros(B, 2, 1, 4), timestamps=torch.stack([torch.zeros(T, dtype=torch.long), slot], -1).expand(B, T, 2))


def test_historical_average_is_the_per_cell_mean_of_the_available_slots():
    x = torch.arange(2 * 1 * 6 * 1 * 2, dtype=torch.float32).reshape(2, 1, 6, 1, 2)
    batch = Batch(x=x, observed=torch.ones(2, 6, 1, 2, dtype=torch.bool), entity=torch.zeros(2, 1),
                  cells=torch.zeros(2, 1, 2, 1))
    regions = regions_for(batch, LONG, TaskConfig(short_horizon=1, long_horizon=2))
    pred = HistoricalAverage().predict(batch, LONG.expand(2), regions)
    # entity 0, cell (0, 0): slots 0..3 hold 0, 2, 4, 6 -> mean 3; cell (0, 1): 1, 3, 5, 7 -> 4
    assert pred[0, 0, 4:, 0, 0].tolist() == [3.0, 3.0] and pred[0, 0, 4:, 0, 1].tolist() == [4.0, 4.0]
    assert pred[1, 0, 5, 0, 0].item() == 15.0  # 12, 14, 16, 18


def test_a_cell_without_history_falls_back_to_the_entity_mean():
    batch = sinusoid_batch(B=1, T=8)
    observed = batch.observed.clone()
    observed[0, :, 1, 0] = False
    observed[0, 6:, 1, 0] = True  # cell (1, 0) is observed only in the target slots
    batch = Batch(batch.x, observed, batch.entity, batch.cells, batch.timestamps)
    regions = regions_for(batch, LONG, TaskConfig(short_horizon=1, long_horizon=2))
    pred = HistoricalAverage().predict(batch, LONG, regions)
    assert torch.allclose(pred[0, 0, 6:, 1, 0], batch.x[0, 0, :6, 0, 0].mean().expand(2))


def test_the_slot_of_day_profile_recovers_a_shared_daily_shape():
    train = sinusoid_batch(B=4, T=96)
    ha = HistoricalAverage(profile=True).fit(train)
    slot = torch.arange(96)
    assert torch.allclose(ha.profile[0], torch.sin(2 * math.pi * slot / 96), atol=1e-5)
    test = sinusoid_batch(B=2, T=64)
    regions = regions_for(test, LONG, TaskConfig(long_horizon=32))
    plain = HistoricalAverage().predict(test, LONG.expand(2), regions)
    shaped = ha.predict(test, LONG.expand(2), regions)
    t = regions.target
    assert ((shaped - test.x)[t] ** 2).mean() < 1e-8 < ((plain - test.x)[t] ** 2).mean()


def test_arima_forecasts_a_clean_daily_sinusoid_far_better_than_the_average():
    train, test = sinusoid_batch(B=4, T=96), sinusoid_batch(B=2, T=64, noise=0.05, seed=1)
    regions = regions_for(test, LONG, TaskConfig(long_horizon=16))
    t = regions.target
    arima = ARIMA(order=(1, 0, 0), fourier=2).fit(train)
    pred, ha = arima.predict(test, LONG.expand(2), regions), HistoricalAverage().predict(test, LONG.expand(2), regions)
    assert ((pred - test.x)[t] ** 2).mean() < 0.1 * ((ha - test.x)[t] ** 2).mean()
    assert torch.equal(pred[~t], ha[~t])  # only target slots are forecast


def test_arima_refuses_scattered_history_and_an_unfitted_season():
    batch = sinusoid_batch(B=1, T=16)
    cold = make_regions(torch.tensor([2]), batch.observed, 1, TaskConfig(cold_revealed=3), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="prefix"):
        ARIMA(fourier=0).predict(batch, torch.tensor([2]), cold)
    with pytest.raises(ValueError, match="fitted"):
        ARIMA(fourier=2).predict(batch, SHORT, regions_for(batch, SHORT, TaskConfig()))


def test_fourier_terms_are_a_constant_and_k_harmonics():
    F = fourier_terms(torch.tensor([0, 24]).numpy(), K=2, slots_per_day=96)
    assert F.shape == (2, 5)
    assert F[1].round(6).tolist() == [1.0, 1.0, 0.0, 0.0, -1.0]  # slot 24 = a quarter day


def test_the_masked_patch_transformer_learns_the_daily_shape_from_training_series():
    torch.manual_seed(0)
    train = sinusoid_batch(B=8, T=32, noise=0.02)
    config = TaskConfig(short_horizon=4, long_horizon=8)
    model = MaskedPatchTransformer(T=32, channels=1, patch_len=8, d_model=16, depth=1, num_heads=2)
    losses = train_patch_transformer(model, train, config, steps=60, batch_size=4, lr=3e-3, seed=0)
    assert sum(losses[-10:]) / 10 < 0.3 * sum(losses[:5]) / 5
    regions = regions_for(train, LONG, config)
    pred = model.predict(train, LONG.expand(8), regions)
    assert pred.shape == train.x.shape and torch.isfinite(pred).all()


def test_transformers_patchtst_trains_on_the_projects_windows_and_forecasts_only_the_horizon():
    torch.manual_seed(0)
    train = sinusoid_batch(B=8, T=32, noise=0.02)
    config = TaskConfig(short_horizon=4, long_horizon=8)
    model = PatchTSTForecaster(T=32, channels=1, horizon=8, patch_length=4, d_model=16, layers=1, heads=2)
    before = [p.detach().clone() for p in model.model.parameters()]
    losses = model.fit(train, "long", config, steps=40, batch_size=4, lr=3e-3, seed=0)
    assert all(math.isfinite(v) for v in losses) and sum(losses[-5:]) < sum(losses[:5])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.model.parameters()))
    regions = regions_for(train, LONG, config)
    pred = model.predict(train, LONG.expand(8), regions, chunk=3)
    assert pred.shape == train.x.shape
    assert torch.equal(pred[:, :, :24], train.x[:, :, :24])             # only the horizon is forecast
    assert ((pred - train.x)[:, :, 24:] ** 2).mean() < 0.5 * (train.x[:, :, 24:] ** 2).mean()


def test_user_knn_borrows_the_profile_of_the_nearest_training_users():
    T, S = 8, 4
    slot = torch.arange(T) % S
    stamps = torch.stack([torch.zeros(T, dtype=torch.long), slot], -1)[None].expand(4, T, 2)
    shapes = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, -1.0, -1.0, -1.0]])      # user A's slot profile, user B's
    x = torch.stack([shapes[0][slot], shapes[0][slot], shapes[1][slot], shapes[1][slot]])[:, None, :, None, None]
    entity = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    train = Batch(x=x, observed=torch.ones(4, T, 1, 1, dtype=torch.bool), entity=entity, cells=torch.zeros(4, 1, 1, 1),
                  timestamps=stamps)
    knn = UserKNN(lambda e: e, k=1, slots_per_day=S).fit(train)
    query = Batch(x=torch.zeros(1, 1, T, 1, 1), observed=torch.ones(1, T, 1, 1, dtype=torch.bool),
                  entity=torch.tensor([[0.9, 0.2]]), cells=torch.zeros(1, 1, 1, 1), timestamps=stamps[:1])
    regions = regions_for(query, SHORT, TaskConfig(short_horizon=2))
    assert torch.allclose(knn.predict(query, SHORT, regions).flatten(), shapes[0][slot])   # nearest: user A
    shifted = UserKNN(lambda e: e, k=1, slots_per_day=S, own_level=True).fit(train)
    query = replace(query, x=torch.full((1, 1, T, 1, 1), 10.0))
    pred = shifted.predict(query, SHORT, regions).flatten()
    assert torch.allclose(pred - pred.mean(), shapes[0][slot] - shapes[0][slot].mean())   # A's shape ...
    assert torch.allclose(pred[:6].mean(), torch.tensor(10.0))                           # ... at its own level


def test_dit_controls_read_exactly_the_whole_available_region(make_batch):
    batch = make_batch(B=3, C=2, T=8, H=2, W=3)
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=2, T=8, cell_dim=4, entity_dim=7, patch_size=(2, 2, 3),
                                    diffusion_steps=20, umask=dict(d=8)))
    regions = regions_for(batch, SHORT, TaskConfig(short_horizon=2))
    pred = DiTForecaster(model, "available", n_samples=2, steps=3).predict(batch, SHORT.expand(3), regions)
    available = regions.evidence(regions.available.float()).bool()
    assert torch.equal(pred[available], batch.x[available])
    with pytest.raises(ValueError, match="unknown evidence"):
        DiTForecaster(model, "everything")


def test_unknown_baseline_names_are_rejected():
    assert isinstance(make_baseline("ha", profile=False), HistoricalAverage)
    with pytest.raises(ValueError, match="unknown baseline 'prophet'"):
        make_baseline("prophet")


def test_arima_fits_the_history_since_the_last_gap():
    batch = sinusoid_batch(B=1, T=64, noise=0.05, seed=2)
    x = batch.x.clone()
    x[:, :, :20] += 50.0  # a different regime before a missing stretch
    batch = type(batch)(**{**batch.__dict__, "x": x})
    observed = batch.observed.clone()
    observed[:, 20:24] = False  # a missing hour
    regions = make_regions(LONG, observed, 1, TaskConfig(long_horizon=16))
    pred = ARIMA(order=(1, 0, 0), fourier=0).predict(batch, LONG, regions)
    t = regions.target
    assert ((pred - batch.x)[t] ** 2).mean() < 1.0  # fitted on slots 24..47 only, not pulled toward +50
