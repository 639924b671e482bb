"""UoMo's protocol: scale statistics from the train split only, an exact inverse, errors on masked
entries and the diluted all-entries variant."""

import pytest
import torch

from completion.uomo import UOMO_TASKS, UoMoScaler, uomo_errors


def test_statistics_come_from_train_only_and_the_inverse_is_exact():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(50, 2, 8, 2, 2, generator=g) * torch.tensor([1000.0, 10.0])[None, :, None, None, None]
    scaler = UoMoScaler.fit(train)
    other = torch.rand(5, 2, 8, 2, 2, generator=g) * 1e6  # another split, far larger: must not move the statistics
    assert torch.equal(UoMoScaler.fit(train).clip, scaler.clip)
    assert scaler.clip[0] == pytest.approx(torch.quantile(train[:, 0].flatten().double(), 0.9999).item(), rel=1e-5)
    z = scaler.transform(train)
    assert z.min() >= -1 - 1e-6 and z.max() <= 1 + 1e-6
    assert torch.allclose(scaler.inverse(scaler.transform(other)), scaler.clipped(other), atol=1e-6)
    assert torch.allclose(scaler.inverse(z), scaler.clipped(train), atol=1e-6)
    assert (scaler.clipped(other) <= 1).all()  # values above the train clip are clipped
    with pytest.raises(ValueError, match="must be positive"):
        UoMoScaler.fit(torch.zeros(3, 1, 4, 1, 1))


def test_errors_on_masked_entries_and_the_diluted_variant():
    scaler = UoMoScaler(clip=torch.tensor([10.0]), low=torch.tensor([0.0]), high=torch.tensor([1.0]))
    truth = torch.zeros(1, 1, 4, 1, 1)
    pred = torch.tensor([0.0, 0.0, 2.0, 4.0]).reshape(1, 1, 4, 1, 1)  # errors 0.2 and 0.4 on the last two
    target = torch.tensor([False, False, True, True]).reshape(1, 1, 4, 1, 1)
    err = uomo_errors(pred, truth, target, scaler)
    assert err["rmse"][0] == pytest.approx(((0.04 + 0.16) / 2) ** 0.5)
    assert err["mae"][0] == pytest.approx(0.3)
    assert err["rmse_all"][0] == pytest.approx(((0.04 + 0.16) / 4) ** 0.5)  # divided by every entry


def test_the_tasks_are_uomos():
    assert (UOMO_TASKS.short_horizon, UOMO_TASKS.long_horizon, UOMO_TASKS.cold_hidden_cells) == (16, 48, 0.25)


def test_a_city_in_uomos_scale(nj_path):
    from completion.city import load_city

    city = load_city(nj_path, normalization="uomo")
    x = city.batches["train"].x
    assert x.min() == -1 and x.max() == 1
    raw = city.raw["val"][:4]
    back = city.inverse(city.batches["val"].x[:4])
    assert torch.allclose(city.scaler.clipped(back), city.scaler.clipped(raw), atol=1e-6)  # float32 of ~1e6
    with pytest.raises(ValueError, match="unknown normalization"):
        load_city(nj_path, normalization="zscore")
