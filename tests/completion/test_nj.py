"""The real NJ loader: shapes, train-only normalisation, inverse transform, POI side information."""

import pytest
import torch

from completion.nj import load_nj


@pytest.fixture(scope="module")
def nj(nj_path):
    return load_nj(nj_path)


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
