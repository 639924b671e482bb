"""U-MASK + DiT end to end: evidence kept exactly, L_rec trains the mask, a tiny model overfits."""

import pytest
import torch

from completion.model import ModelConfig, build_model
from completion.tasks import TaskConfig, make_regions

TASKS = TaskConfig(short_horizon=2, long_horizon=4, cold_revealed=3)


def tiny(batch, center=True, seed=0):
    _, C, T, H, W = batch.x.shape
    torch.manual_seed(seed)
    return build_model(ModelConfig(channels=C, T=T, cell_dim=batch.cells.shape[-1],
                                   entity_dim=batch.entity.shape[-1], patch_size=(2, 2, 3),
                                   diffusion_steps=100, center=center, umask=dict(d=16)))


def setup(make_batch, config=TASKS):
    batch = make_batch(B=4, C=2, T=8, H=2, W=3)
    task = torch.tensor([0, 1, 2, 1])
    regions = make_regions(task, batch.observed, 2, config, torch.Generator().manual_seed(0))
    return batch, task, regions


def test_observed_evidence_is_bit_identical_after_sampling(make_batch):
    batch, task, regions = setup(make_batch)
    model = tiny(batch).eval()
    out = model.complete(batch, task, regions, n_samples=3, steps=5,
                         generator=torch.Generator().manual_seed(1))
    assert out.samples.shape == (3, *batch.x.shape)
    revealed = out.evidence.bool().expand_as(out.samples)
    assert torch.equal(out.samples[revealed], batch.x.expand_as(out.samples)[revealed])
    assert not (out.evidence.bool() & regions.target).any()
    assert torch.equal(out.mask.M, out.evidence[:, 0])  # all channels visible here


def test_an_explicit_mask_replaces_umask_but_stays_inside_the_available_region(make_batch):
    batch, task, regions = setup(make_batch)
    model = tiny(batch).eval()
    everything = torch.ones_like(regions.available)
    out = model.complete(batch, task, regions, n_samples=2, steps=3, M=everything)
    assert out.mask is None
    assert torch.equal(out.evidence.bool(), regions.evidence(regions.available.float()).bool())


def test_reconstruction_loss_reaches_rho_phi_beta_w_c(make_batch):
    batch, task, regions = setup(make_batch)
    model = tiny(batch).train()
    torch.nn.init.normal_(model.dit.final_layer.linear.weight, std=0.1)  # leave the zero start
    for block in model.dit.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    loss, _ = model.loss(batch, task, regions, generator=torch.Generator().manual_seed(0))
    loss.backward()
    for name in ("rho_logit", "phi_logit", "beta_logit", "w", "c"):
        grad = getattr(model.umask, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_a_tiny_model_overfits_one_batch(make_batch):
    batch, task, regions = setup(make_batch)
    model = tiny(batch)

    def fixed_noise_loss():
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return sum(model.loss(batch, task, regions, generator=g)[0].item() for _ in range(8)) / 8

    before = fixed_noise_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        loss, _ = model.loss(batch, task, regions, generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert fixed_noise_loss() < 0.3 * before


def test_centering_uses_only_the_available_region(make_batch):
    batch, task, regions = setup(make_batch)
    model = tiny(batch)
    shifted = batch.x + 100 * regions.target  # change every target value
    assert torch.equal(model.offset(batch.x, regions), model.offset(shifted, regions))
    assert model.offset(batch.x, regions).abs().sum() > 0
    assert not tiny(batch, center=False).offset(batch.x, regions).any()


def test_the_prior_gives_umask_a_gradient_without_changing_its_value(make_batch):
    """Straight-through: same loss value with and without the smoother path, ~100x the mask gradient."""
    batch = make_batch(B=8, C=2, T=16, H=2, W=3)
    task = torch.tensor([0, 1] * 4)
    regions = make_regions(task, batch.observed, 2, TaskConfig(2, 6, 3), torch.Generator().manual_seed(0))
    grads, losses = {}, {}
    for through_prior in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelConfig(channels=2, T=16, cell_dim=4, entity_dim=7, patch_size=(2, 1, 3),
                                        prior_gradient=through_prior, umask=dict(d=16)))
        torch.nn.init.normal_(model.dit.final_layer.linear.weight, std=0.1)
        for block in model.dit.blocks:
            torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
        loss, _ = model.loss(batch, task, regions, generator=torch.Generator().manual_seed(0))
        loss.backward()
        losses[through_prior] = loss.item()
        grads[through_prior] = model.umask.rho_logit.grad.abs().sum().item()
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    assert grads[True] > 30 * grads[False] > 0


def test_a_model_reads_data_of_another_step_length(make_batch):
    model = build_model(ModelConfig(channels=2, T=8, cell_dim=4, entity_dim=7, patch_size=(2, 1, 3),
                                    prior_damping=0.9, prior_shrinkage=8.0, umask=dict(d=8))).eval()
    model.profile.copy_(torch.arange(96.0).expand(2, 96))
    model.set_slots_per_day(24)  # hourly data
    assert model.profile.shape == (2, 24) and model.profile[0, :2].tolist() == pytest.approx([1.5, 5.5])
    assert model.prior_damping == pytest.approx(0.9 ** 4)  # one hour decays as four quarter-hours did
    assert model.prior_shrinkage == pytest.approx(2.0)  # pseudo-entries, in proportion to a day's entries
    assert model.dit.calendar_embedder.slots_per_day == 24
    batch = make_batch(B=2, C=2, T=8, H=2, W=3)
    batch = type(batch)(**{**batch.__dict__, "timestamps": batch.timestamps % 24})
    task = torch.tensor([0, 1])
    regions = make_regions(task, batch.observed, 2, TaskConfig(2, 4, 3))
    assert torch.isfinite(model.complete(batch, task, regions, n_samples=2, steps=2).point).all()


@pytest.mark.parametrize("parameterization", ["x0", "v"])
def test_samples_spread_only_when_the_estimate_reads_x_t(make_batch, parameterization):
    """The DiT's final layer starts at zero, so an untrained x0 model ignores x_t and every sample ends on
    the same point (the spread then came from calibration alone); the v-parameterisation's estimate
    follows x_t at low noise, so samples keep the reverse process's randomness."""
    from dataclasses import replace

    batch, task, regions = setup(make_batch)
    _, C, T, H, W = batch.x.shape
    config = ModelConfig(channels=C, T=T, cell_dim=batch.cells.shape[-1], entity_dim=batch.entity.shape[-1],
                         patch_size=(2, 2, 3), diffusion_steps=100, umask=dict(d=16))
    torch.manual_seed(0)
    model = build_model(replace(config, parameterization=parameterization)).eval()
    out = model.complete(batch, task, regions, n_samples=4, steps=10, eta=1.0, generator=torch.Generator().manual_seed(1))
    free = regions.target.expand_as(out.samples)
    sd = out.samples.std(0)[regions.target]
    if parameterization == "x0":
        assert sd.max() < 1e-5
    else:
        assert sd.mean() > 0.05 and torch.isfinite(out.samples[free]).all()


def test_a_checkpoint_without_the_field_reads_as_x0(tmp_path, make_batch):
    import json
    from dataclasses import asdict

    from completion.train import checkpoint_configs
    from scope import io

    batch, _, _ = setup(make_batch)
    model = tiny(batch)
    config = asdict(ModelConfig(channels=2, T=8))
    del config["parameterization"]
    path = tmp_path / "old.safetensors"
    io.save_checkpoint(path, {"model": model}, metadata={"model_config": json.dumps(config)})
    assert checkpoint_configs(path)[0].parameterization == "x0"
    assert ModelConfig().parameterization == "x0"
