"""Algorithm 1: the joint objective, EMA, repeatable seeds, and exact resume from safetensors."""

import math

import pytest
import torch

from completion.model import ModelConfig, build_model
from completion.tasks import TaskConfig
from completion.train import CHECKPOINT, TrainConfig, checkpoint_configs, info_nce, load_model, train

TASKS = TaskConfig(short_horizon=2, long_horizon=4, cold_revealed=3)


def setup(make_batch):
    data = make_batch(B=8, C=2, T=8, H=2, W=3)
    model_config = ModelConfig(channels=2, T=8, cell_dim=4, entity_dim=7, patch_size=(2, 1, 3),
                               diffusion_steps=50, umask=dict(d=16, bank_size=8))
    return data, model_config


def test_info_nce_is_zero_for_matched_pairs_and_log_b_for_uninformative_ones():
    a = torch.eye(4)
    assert info_nce(a, a, temperature=0.01).item() == pytest.approx(0.0, abs=1e-6)
    assert info_nce(a, torch.ones(4, 4), temperature=0.1).item() == pytest.approx(math.log(4))


def test_same_seed_same_run(make_batch):
    data, model_config = setup(make_batch)
    config = TrainConfig(steps=3, batch_size=4, seed=7)
    first, _, logs_a = train(model_config, data, TASKS, config, progress=False)
    second, _, logs_b = train(model_config, data, TASKS, config, progress=False)
    assert logs_a == logs_b
    for p, q in zip(first.parameters(), second.parameters()):
        assert torch.equal(p, q)


def test_resume_continues_exactly_where_the_checkpoint_left_off(make_batch, tmp_path):
    data, model_config = setup(make_batch)
    straight, ema_straight, logs = train(model_config, data, TASKS,
                                         TrainConfig(steps=4, batch_size=4, checkpoint_every=2),
                                         out_dir=tmp_path / "a", progress=False)
    train(model_config, data, TASKS, TrainConfig(steps=2, batch_size=4), out_dir=tmp_path / "b",
          progress=False)
    resumed, ema_resumed, resumed_logs = train(model_config, data, TASKS,
                                               TrainConfig(steps=4, batch_size=4),
                                               out_dir=tmp_path / "b", progress=False)
    assert resumed_logs == logs[2:]
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ema_straight.state_dict().values(), ema_resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_ema_weights_are_saved_and_reloaded_for_evaluation(make_batch, tmp_path):
    data, model_config = setup(make_batch)
    model, ema, _ = train(model_config, data, TASKS, TrainConfig(steps=2, batch_size=4, ema_decay=0.5),
                          out_dir=tmp_path, progress=False)
    loaded = load_model(tmp_path / CHECKPOINT)
    assert not loaded.training
    for a, b in zip(ema.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(ema.parameters(), model.parameters()))
    assert loaded.umask.bank_seen.sum() == 2 * 4  # the bank travels with the weights


def test_a_crash_mid_write_leaves_the_previous_checkpoint_loadable(make_batch, tmp_path, monkeypatch):
    import scope.io as train_module

    data, model_config = setup(make_batch)
    train(model_config, data, TASKS, TrainConfig(steps=2, batch_size=4), out_dir=tmp_path, progress=False)
    before = (tmp_path / CHECKPOINT).read_bytes()

    def dies_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is interrupted while writing

    monkeypatch.setattr(train_module, "save_file", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        train(model_config, data, TASKS, TrainConfig(steps=4, batch_size=4, checkpoint_every=1), out_dir=tmp_path,
              progress=False)
    assert (tmp_path / CHECKPOINT).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]  # no temporary file left behind
    assert load_model(tmp_path / CHECKPOINT) is not None


def test_the_checkpoint_stores_every_config(make_batch, tmp_path):
    data, model_config = setup(make_batch)
    config = TrainConfig(steps=1, batch_size=4, mask="tube", mask_ratio=0.5, history_dropout=(0.5,))
    train(model_config, data, TASKS, config, out_dir=tmp_path, progress=False)
    stored_model, stored_train, stored_tasks = checkpoint_configs(tmp_path / CHECKPOINT)
    assert (stored_model, stored_train, stored_tasks) == (model_config, config, TASKS)


def test_history_dropout_and_the_regression_objective_train(make_batch):
    data, model_config = setup(make_batch)
    assert build_model(model_config).dit.final_layer.linear.weight.abs().sum() == 0  # adaLN-Zero start
    for config in (TrainConfig(steps=2, batch_size=4, history_dropout=(0.5, 0.9)),
                   TrainConfig(steps=2, batch_size=4, objective="regression")):
        model, _, logs = train(model_config, data, TASKS, config, progress=False)
        assert all(math.isfinite(log["loss"]) for log in logs)
        assert model.dit.final_layer.linear.weight.abs().sum() > 0  # the residual head moved
    with pytest.raises(ValueError, match="unknown objective"):
        TrainConfig(objective="gan")
    with pytest.raises(ValueError, match="history_dropout"):
        TrainConfig(history_dropout=(1.0,))


@pytest.mark.gpu
def test_training_on_cuda_saves_a_checkpoint_that_loads_on_the_cpu(make_batch, tmp_path):
    data, model_config = setup(make_batch)
    _, ema, logs = train(model_config, data, TASKS, TrainConfig(steps=2, batch_size=4, device="cuda"),
                         out_dir=tmp_path, progress=False)
    assert len(logs) == 2 and all(math.isfinite(r["loss"]) for r in logs)
    restored = load_model(tmp_path / CHECKPOINT)
    for p, q in zip(ema.parameters(), restored.parameters()):
        assert torch.equal(p.detach().cpu(), q)
