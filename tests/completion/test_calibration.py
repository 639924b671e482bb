"""Spread calibration: the factor that makes the central interval cover its nominal share."""

import pytest
import torch

from completion.evaluate import spread_factor
from completion.metrics import coverage


def test_too_narrow_samples_are_widened_to_nominal_coverage():
    g = torch.Generator().manual_seed(0)
    truth = 2.0 * torch.randn(400, 2, 4, 2, 2, generator=g)  # the truth varies twice as much
    samples = torch.randn(64, *truth.shape, generator=g)  # as the samples around their mean 0
    target = torch.ones_like(truth, dtype=torch.bool)
    assert coverage(samples, truth, target).max() < 0.7
    factor = spread_factor(samples, truth, target, level=0.9)
    assert factor.tolist() == pytest.approx([2.0, 2.0], rel=0.1)
    mean = samples.mean(0)
    widened = mean + factor[None, None, :, None, None, None] * (samples - mean)
    assert coverage(widened, truth, target).tolist() == pytest.approx([0.9, 0.9], abs=0.01)


def test_only_target_entries_count():
    truth = torch.zeros(10, 1, 4, 1, 1)
    truth[:, :, 0] = 100.0  # far outside, but not a target
    samples = torch.randn(32, *truth.shape, generator=torch.Generator().manual_seed(1)) * 0.01
    target = torch.zeros_like(truth, dtype=torch.bool)
    target[:, :, 1:] = True
    assert spread_factor(samples, truth, target).item() < 1.0  # zero truth: the interval may shrink


def test_the_residual_weight_is_the_least_squares_shrinkage_toward_the_prior(make_batch):
    from completion.evaluate import calibrate
    from completion.model import ModelConfig, build_model
    from completion.tasks import TaskConfig

    batch = make_batch(B=8, C=2, T=8, H=2, W=3)
    model = build_model(ModelConfig(channels=2, T=8, cell_dim=4, entity_dim=7, patch_size=(2, 1, 3),
                                    diffusion_steps=20, umask=dict(d=8))).eval()
    torch.nn.init.normal_(model.dit.final_layer.linear.weight, std=1.0)  # a residual of pure noise
    for block in model.dit.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    out = calibrate(model, batch, ("short", "long"), TaskConfig(2, 4, 3), "available", n_samples=4, steps=3)
    assert all(0 <= out[t]["alpha"] < 0.5 for t in ("short", "long"))  # noise is mostly switched off
    assert model.residual_weight[2] == 1.0  # a task not calibrated keeps its weight
    restored = build_model(ModelConfig(channels=2, T=8, cell_dim=4, entity_dim=7, patch_size=(2, 1, 3), umask=dict(d=8)))
    restored.load_calibration(model.calibration())
    assert torch.equal(restored.residual_weight, model.residual_weight) and torch.equal(restored.spread, model.spread)
