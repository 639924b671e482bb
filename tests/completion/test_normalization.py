"""log1p + per-channel standardisation: statistics over available entries only, exact inverse."""

import numpy as np
import pytest
import torch

from completion.normalization import Log1pStandardizer


def test_statistics_are_over_available_entries_and_streaming_equals_one_pass():
    rng = np.random.default_rng(0)
    x = rng.poisson(0.7, size=(6, 3, 8, 2, 2)).astype(np.float32) * np.array([1, 10, 1000])[None, :, None, None, None]
    available = rng.random((6, 8, 2, 2)) < 0.7
    x[~np.broadcast_to(available[:, None], x.shape)] = 1e6      # must not leak into the statistics
    logs = np.log1p(x.astype(np.float64)).transpose(1, 0, 2, 3, 4)[:, available]
    fitted = Log1pStandardizer.fit(x, available)
    np.testing.assert_allclose(fitted.mean, logs.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(fitted.std, logs.std(axis=1), rtol=1e-9)
    streamed = Log1pStandardizer()
    streamed.update(x[:2], available[:2])
    streamed.update(x[2:], available[2:])
    streamed.finalize()
    np.testing.assert_allclose(streamed.mean, fitted.mean, rtol=1e-12)


def test_inverse_undoes_transform_for_numpy_and_torch_and_any_channel_axis():
    rng = np.random.default_rng(1)
    x = rng.lognormal(2, 2, size=(4, 3, 5)).astype(np.float32)
    norm = Log1pStandardizer.fit(x)
    z = norm.transform(x)
    np.testing.assert_allclose(z.mean(axis=(0, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(norm.inverse_transform(z), x, rtol=1e-4)
    zt = norm.transform(torch.from_numpy(x))
    np.testing.assert_allclose(zt.numpy(), z, rtol=1e-5, atol=1e-5)
    last = norm.transform(np.moveaxis(x, 1, -1), channel_axis=-1)
    np.testing.assert_allclose(np.moveaxis(last, -1, 1), z, rtol=1e-6)
    assert (norm.inverse_transform(np.full_like(z, -50.0)) == 0).all()    # clamped at zero
    again = Log1pStandardizer.from_dict(norm.to_dict())
    np.testing.assert_array_equal(again.mean, norm.mean)


def test_errors_are_explained():
    with pytest.raises(ValueError, match="no available training entry"):
        Log1pStandardizer.fit(np.ones((2, 2, 3)), np.zeros((2, 3), bool))
    with pytest.raises(ValueError, match="unknown normalisation 'minmax'"):
        Log1pStandardizer.from_dict({"transform": "minmax"})
