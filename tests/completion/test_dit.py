"""The DiT denoiser: 3-D patches of any size on any grid, adaLN-Zero start, conditioning."""

import pytest
import torch

from completion.dit import DIT_PRESETS, DiT, dit_from_preset, sincos_3d


def inputs(B=2, C=3, T=10, H=5, W=3, entity_dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(B, C, T, H, W, generator=g)
    M = (torch.rand(B, 1, T, H, W, generator=g) > 0.5).float().expand(B, C, T, H, W)
    slot = torch.arange(T).expand(B, T)
    return dict(x_t=x_t, t=torch.tensor([3, 40]), evidence_x=M * x_t, evidence=M,
                entity=torch.randn(B, entity_dim, generator=g), task=torch.tensor([0, 2]),
                timestamps=torch.stack([slot // 96, slot % 96], dim=-1))


def randomise_zero_layers(model):
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.05)


@pytest.mark.parametrize("patch_size", [(1, 1, 1), (3, 2, 1), (5, 3, 3), (4, 2, 2)])
def test_any_patch_size_on_a_non_square_grid_returns_the_input_shape(patch_size):
    model = dit_from_preset("tiny", channels=3, entity_dim=6, patch_size=patch_size)
    randomise_zero_layers(model)
    out = model(**inputs())
    assert out.shape == (2, 3, 10, 5, 3) and torch.isfinite(out).all()


def test_adaln_zero_makes_the_initial_model_the_zero_map():
    model = dit_from_preset("tiny", channels=3, entity_dim=6, patch_size=(3, 2, 1))
    assert torch.equal(model(**inputs()), torch.zeros(2, 3, 10, 5, 3))
    block = model.blocks[0]
    x, c = torch.randn(2, 7, 64), torch.randn(2, 64)
    assert torch.equal(block(x, c), x)  # each block starts as the identity


def test_unpatchify_places_each_output_unit_at_its_patch_offset():
    t0, h0, w0, C = 3, 2, 1, 3
    model = dit_from_preset("tiny", channels=C, entity_dim=6, patch_size=(t0, h0, w0))
    with torch.no_grad():  # output = bias: unit ((p h0 + q) w0 + r) C + c of every token
        model.final_layer.linear.bias.copy_(torch.arange(t0 * h0 * w0 * C, dtype=torch.float))
    out = model(**inputs())
    for c, t, h, w in [(0, 0, 0, 0), (2, 4, 3, 2), (1, 9, 4, 1)]:
        expected = (((t % t0) * h0 + h % h0) * w0 + w % w0) * C + c
        assert out[0, c, t, h, w].item() == expected


def test_entity_task_and_evidence_all_change_the_prediction():
    model = dit_from_preset("tiny", channels=3, entity_dim=6, patch_size=(2, 2, 1))
    randomise_zero_layers(model)
    kw = inputs()
    base = model(**kw)
    for key, value in [("entity", kw["entity"] + 1), ("task", torch.tensor([1, 1])),
                       ("evidence_x", kw["evidence_x"] * 2)]:
        assert not torch.allclose(base, model(**{**kw, key: value})), key


def test_positional_embedding_distinguishes_every_token():
    pos = sincos_3d(64, (4, 3, 2))
    assert pos.shape == (24, 64)
    assert torch.cdist(pos, pos).add(torch.eye(24)).min() > 0


def test_presets_grow_from_tiny_to_B():
    with torch.device("meta"):  # count parameters without allocating them
        models = [DiT(2, 4, **DIT_PRESETS[name]) for name in ("tiny", "S", "B")]
    sizes = [sum(p.numel() for p in model.parameters()) for model in models]
    assert sizes == sorted(sizes) and sizes[0] < 1e6 and sizes[2] > 5e7
