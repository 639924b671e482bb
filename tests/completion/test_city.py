"""The city loader on the real NJ file: shapes, train-only normalisation, inverse transform, POI side information."""

import pytest
import torch

from completion.city import load_city, resample_city


@pytest.fixture(scope="module")
def nj(nj_path):
    return load_city(nj_path)


def test_every_split_is_a_batch_of_patches(nj):
    for split, n in (("train", 4032), ("val", 672), ("test", 672)):
        b = nj.batches[split]
        assert b.x.shape == (n, 2, 64, 4, 4) and b.observed.all()
        assert b.cells.shape == (n, 4, 4, 21) and b.entity.shape == (n, 21 * 16)
        assert b.timestamps.shape == (n, 64, 2) and b.timestamps[..., 1].max() <= 95


def test_normalisation_is_fitted_on_train_only(nj):
    z = nj.batches["train"].x
    assert torch.allclose(z.mean((0, 2, 3, 4)), torch.zeros(2), atol=1e-3)
    assert torch.allclose(z.std((0, 2, 3, 4)), torch.ones(2), atol=1e-3)
    assert nj.batches["test"].x.mean() < -0.3  # the test areas are far smaller, as documented


def test_inverse_returns_original_units(nj):
    raw = nj.raw["test"][:8]
    back = nj.inverse(nj.batches["test"].x[:8])
    assert torch.allclose(back, raw, rtol=1e-4, atol=1e-2)
    samples = nj.batches["test"].x[:8].expand(3, -1, -1, -1, -1, -1)  # [S, B, C, T, H, W]
    assert torch.allclose(nj.inverse(samples)[2], back)


def test_slots_per_day_are_read_from_the_timestamps(nj, nj_path, tmp_path):
    assert nj.slots_per_day == 96
    hourly = load_city(resample_city(nj_path, tmp_path / "nj_60.npz", steps_per_slot=4))
    assert hourly.slots_per_day == 24
    ts = hourly.batches["train"].timestamps
    assert ts[..., 1].max() == 23 and ((ts[:, 1:, 1] - ts[:, :-1, 1]) % 24 == 1).all()
    with pytest.raises(ValueError, match="the timestamps have 24 slots per day, the configuration says 96"):
        load_city(tmp_path / "nj_60.npz", slots_per_day=96)


def test_resampling_sums_traffic_averages_users_and_keeps_the_areas(nj, nj_path, tmp_path):
    half = load_city(resample_city(nj_path, tmp_path / "nj_30.npz", steps_per_slot=2, scale=0.5))
    assert half.slots_per_day == 48 and half.raw["train"].shape[1:] == (2, 64, 4, 4)
    # one area, two 15-minute steps -> one 30-minute slot, then halved
    x15, x30 = nj.raw["test"], half.raw["test"]
    week = {tuple(t.tolist()): i for i, t in enumerate(nj.batches["test"].timestamps[:, 0])}
    i15 = week[tuple((half.batches["test"].timestamps[0, 0] * torch.tensor([1, 2])).tolist())]
    assert torch.allclose(x30[0, 0, 0], (x15[i15, 0, 0] + x15[i15, 0, 1]) * 0.5, rtol=1e-5)
    assert torch.allclose(x30[0, 1, 0], (x15[i15, 1, 0] + x15[i15, 1, 1]) / 2 * 0.5, rtol=1e-5)


def test_another_poi_width_is_refused_or_padded_on_request(nj_path, tmp_path):
    path = resample_city(nj_path, tmp_path / "nj_poi.npz", drop_poi=(3, 7))
    with pytest.raises(ValueError, match="19 POI categories, the model expects 21; pad_poi=True"):
        load_city(path, poi_width=21)
    padded = load_city(path, poi_width=21, pad_poi=True)
    assert padded.batches["test"].cells.shape[-1] == 21 and (padded.batches["test"].cells[..., 19:] == 0).all()


def test_bad_files_name_the_file_and_the_array(tmp_path):
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ValueError, match="broken.npz: not a readable .npz city file"):
        load_city(broken)
    import numpy as np
    arrays = {f"{k}_{s}": np.ones(shape, np.float32) for s in ("train", "val", "test")
              for k, shape in (("X", (2, 1, 4, 1, 1)), ("poi", (2, 3, 1, 1)))}
    arrays |= {f"timestamps_{s}": np.stack([np.zeros((2, 4)), np.tile(np.arange(4), (2, 1))], -1).astype(np.int16)
               for s in ("train", "val", "test")}
    np.savez(tmp_path / "missing.npz", **{k: v for k, v in arrays.items() if k != "poi_val"})
    with pytest.raises(ValueError, match=r"missing arrays \['poi_val'\]"):
        load_city(tmp_path / "missing.npz")
    arrays["X_train"][1, 0, 2] = np.nan
    np.savez(tmp_path / "nan.npz", **arrays)
    with pytest.raises(ValueError, match=r"nan.npz: X_train\[1, 0, 2, 0, 0\] = nan"):
        load_city(tmp_path / "nan.npz")
