"""h_u (Eq. 24) learned with the engine: the entity MLP is standardised on the training users, trained by the
completion loss, changes the predictions, and an engine refuses embeddings it was not trained on."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from completion.evaluate import complete_chunked, task_regions
from completion.model import ModelConfig, build_model
from completion.tasks import TaskConfig
from completion.tensors import BehaviourTensors
from completion.train import TrainConfig, train
from completion.users import REFERENCE_FILE, check_entity_reference, save_entity_reference
from tests.completion.test_complete_recipe import run

TASKS = TaskConfig(short_horizon=2, long_horizon=4, cold_revealed=3)
MODEL = ModelConfig(channels=2, T=8, cell_dim=4, entity_dim=7, patch_size=(2, 1, 3), diffusion_steps=50,
                    umask=dict(d=16, bank_size=8))


def users_batch(make_batch, rows_per_user=(3, 1, 2, 2)):
    """A batch whose entities repeat per user (a user has several windows), with far-from-standard rows."""
    data = make_batch(B=sum(rows_per_user), C=2, T=8, H=2, W=3)
    g = torch.Generator().manual_seed(1)
    per_user = 0.03 + 0.005 * torch.randn(len(rows_per_user), 7, generator=g)   # shared offset, small spread
    owner = torch.repeat_interleave(torch.arange(len(rows_per_user)), torch.tensor(rows_per_user))
    return replace(data, entity=per_user[owner]), per_user


def test_the_head_is_standardised_on_the_distinct_training_users(make_batch):
    data, per_user = users_batch(make_batch)
    model, _, _ = train(MODEL, data, TASKS, TrainConfig(steps=1, batch_size=4), progress=False)
    head = model.dit.entity_embedder
    assert torch.allclose(head.feature_mean, per_user.mean(0))          # each user once, not once per window
    assert torch.allclose(head.feature_scale, per_user.std(0, unbiased=False))
    standardised = (per_user - head.feature_mean) / head.feature_scale
    assert torch.allclose(standardised.std(0, unbiased=False), torch.ones(7), atol=1e-5)
    other = replace(data, entity=torch.randn_like(data.entity))          # evaluation data never refits it
    before = head.feature_mean.clone()
    task, regions = task_regions(other, "short", TASKS)
    complete_chunked(model, other, task, regions, "available", n_samples=1, steps=0)
    assert torch.equal(head.feature_mean, before)


def test_the_completion_loss_reaches_the_head_and_training_moves_it(make_batch):
    data, _ = users_batch(make_batch)
    config = TrainConfig(steps=20, batch_size=8, lr=3e-3, seed=3)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        initial = build_model(MODEL)
    model, _, _ = train(MODEL, data, TASKS, config, progress=False)
    head = model.dit.entity_embedder
    for new, old in zip(head.mlp.parameters(), initial.dit.entity_embedder.mlp.parameters()):
        assert (new - old).abs().max() > 1e-6                      # the optimiser moved every tensor of the head
    model.zero_grad()
    task, regions = task_regions(data, "long", TASKS)
    loss, _ = model.loss(data, task, regions, generator=torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in head.mlp.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert all(b.grad is None for b in head.buffers())              # the standardisation is fitted, not trained


def test_permuting_h_u_changes_a_trained_engines_predictions_and_a_constant_one_cannot(make_batch):
    data, _ = users_batch(make_batch)
    model, _, _ = train(MODEL, data, TASKS, TrainConfig(steps=20, batch_size=8, lr=3e-3), progress=False)
    model.eval()
    task, regions = task_regions(data, "long", TASKS)

    def point(batch):
        return complete_chunked(model, batch, task, regions, "available", n_samples=1, steps=0)[1]

    permutation = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])
    assert not torch.allclose(point(data), point(replace(data, entity=data.entity[permutation])), atol=1e-5)
    constant = replace(data, entity=data.entity.mean(0).expand_as(data.entity).contiguous())
    assert torch.equal(point(constant), point(replace(constant, entity=constant.entity[permutation])))


def test_the_engine_refuses_other_embeddings_of_its_training_users(user_tensors, tmp_path):
    users = np.unique(BehaviourTensors(user_tensors, "train").arrays()["user_id"])
    everyone = np.unique(np.concatenate([users, BehaviourTensors(user_tensors, "val").arrays()["user_id"]]))
    rng = np.random.default_rng(0)
    trained_on = {"user_id": everyone.astype(np.int64), "embedding": rng.normal(size=(len(everyone), 5)).astype(np.float32)}
    save_file(trained_on, str(tmp_path / "a.safetensors"))
    other = {**trained_on, "embedding": trained_on["embedding"] + 0.01}
    save_file(other, str(tmp_path / "b.safetensors"))
    cfg = ["--short_horizon", "4", "--long_horizon", "96", "--patch_size", "8", "1", "2", "--max_entities", "4",
           "--figures", "false", "--calibrate", "false"]
    engine = tmp_path / "engine"
    run("train", engine, "--steps", "1", *cfg, "--embeddings", str(tmp_path / "a.safetensors"),
        config="complete_users.yaml", data_path=user_tensors)
    assert (engine / REFERENCE_FILE).exists()
    run("evaluate", engine, *cfg, "--split", "val", "--embeddings", str(tmp_path / "a.safetensors"),
        config="complete_users.yaml", data_path=user_tensors)
    with pytest.raises(ValueError, match="differ from those the engine .* was trained on"):
        run("evaluate", engine, *cfg, "--split", "val", "--embeddings", str(tmp_path / "b.safetensors"),
            config="complete_users.yaml", data_path=user_tensors)


def test_the_reference_lets_new_users_through_and_checks_the_width(tmp_path):
    path = tmp_path / REFERENCE_FILE
    save_entity_reference(path, np.array([3, 3, 5]), np.array([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0]], np.float32))
    check_entity_reference(path, np.array([5, 9]), np.array([[0.0, 1.0], [7.0, 7.0]], np.float32), "x")   # 9 is new
    with pytest.raises(ValueError, match="differ"):
        check_entity_reference(path, np.array([3]), np.array([[1.0, 2.5]], np.float32), "x")
    with pytest.raises(ValueError, match="3-d user embeddings, but .* 2-d"):
        check_entity_reference(path, np.array([3]), np.zeros((1, 3), np.float32), "x")


def test_h_u_reaches_u_mask_budget_and_neighbours_and_the_no_entity_control_has_no_path(make_batch):
    data, _ = users_batch(make_batch)
    model, _, _ = train(MODEL, data, TASKS, TrainConfig(steps=20, batch_size=8, lr=3e-3), progress=False)
    user = model.umask.user
    assert user.weight.shape == (16, model.dit.entity_embedder.mlp[-1].out_features)
    assert user.weight.abs().max() > 0                              # zero at the start, moved by L_rec
    model.eval()
    task, regions = task_regions(data, "cold", TASKS)
    x0 = data.x - model.offset(data.x, regions)

    def mask(batch):
        return model.evidence_mask(x0, batch, regions, task, None, None)[1]

    permuted = replace(data, entity=data.entity[torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])])
    a, b = mask(data), mask(permuted)
    assert not torch.allclose(a.Z, b.Z) and not torch.allclose(a.A, b.A)      # Z -> groups A -> s_b, H(A) (Eq. 9-12)
    assert not torch.allclose(a.p, b.p)                                           # and the placement scores (Eq. 15)
    # the gradients of U-MASK's scores and budget reach the head through U-MASK alone (no DiT in this graph)
    model.train().zero_grad()
    out = model.umask(x0, regions.available, regions.visible, data.cells, task, None, model.user_embedding(data))
    ((out.p ** 2).sum() + out.rho.sum()).backward()
    assert user.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.dit.entity_embedder.mlp.parameters())
    none = build_model(replace(MODEL, entity_conditioning=False))
    assert none.umask.user is None and none.user_embedding(data) is None
