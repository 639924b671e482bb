"""The DiT controls of the benchmark: training with a fixed mask (no U-MASK involved) and a DiT
whose condition ignores the entity vector."""

import pytest
import torch

from completion.model import ModelConfig, build_model
from completion.tasks import TaskConfig
from completion.train import TrainConfig, train

TASKS = TaskConfig(short_horizon=2, long_horizon=4, cold_revealed=3)


def model_config(**kwargs):
    return ModelConfig(channels=2, T=8, cell_dim=4, entity_dim=7, patch_size=(2, 1, 3), diffusion_steps=50,
                       umask=dict(d=16, bank_size=8), **kwargs)


@pytest.mark.parametrize("mask", ["random", "tube", "temporal"])
def test_fixed_mask_training_leaves_umask_untouched(make_batch, mask):
    data = make_batch(B=8, C=2, T=8, H=2, W=3)
    model, _, logs = train(model_config(), data, TASKS, TrainConfig(steps=3, batch_size=4, mask=mask, mask_ratio=0.5),
                           progress=False)
    assert model.umask.bank_seen.sum() == 0  # U-MASK never ran
    assert all(log["rho"] == 0.5 and log["loss"] == log["L_rec"] for log in logs)
    fresh = build_model(model_config())
    assert torch.equal(model.umask.rho_logit, fresh.umask.rho_logit)


def test_unknown_mask_or_task_in_train_config_is_an_error():
    with pytest.raises(ValueError, match="unknown mask 'checkerboard'"):
        TrainConfig(mask="checkerboard")
    with pytest.raises(ValueError, match="unknown tasks"):
        TrainConfig(tasks=("short", "weekly"))


def test_without_entity_conditioning_the_denoiser_ignores_the_entity(make_batch):
    batch = make_batch(B=3, C=2, T=8, H=2, W=3)
    torch.manual_seed(0)
    dit = build_model(model_config(entity_conditioning=False, prior="zero")).dit
    for block in dit.blocks:  # leave the zero start so the condition matters
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    torch.nn.init.normal_(dit.final_layer.linear.weight, std=0.1)
    args = (batch.x, torch.tensor([3, 7, 9]), batch.x, torch.ones_like(batch.x))
    task = torch.tensor([0, 1, 0])
    a = dit(*args, batch.entity, task, batch.timestamps)
    b = dit(*args, torch.randn_like(batch.entity), task, batch.timestamps)
    assert torch.equal(a, b)
    dit.entity_conditioning = True
    torch.nn.init.normal_(dit.entity_embedder.mlp[2].weight, std=0.1)
    assert not torch.equal(dit(*args, batch.entity, task, batch.timestamps), a)


def test_mask_lr_scale_zero_freezes_umask_but_trains_the_dit(make_batch):
    data = make_batch(B=8, C=2, T=8, H=2, W=3)
    model, _, _ = train(model_config(), data, TASKS, TrainConfig(steps=2, batch_size=4, mask_lr_scale=0.0),
                        progress=False)
    torch.manual_seed(0)  # train() builds its model under TrainConfig.seed = 0
    fresh = build_model(model_config())
    assert all(torch.equal(p, q) for p, q in zip(model.umask.parameters(), fresh.umask.parameters()))
    assert not torch.equal(model.dit.final_layer.linear.weight, fresh.dit.final_layer.linear.weight)
