"""U-MASK + DiT end to end: evidence kept exactly, L_rec trains the mask, a tiny model overfits."""

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
    for _ in range(100):
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
