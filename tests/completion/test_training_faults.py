"""Faults while training the completion engine: a non-finite loss stops the run and keeps the last
good checkpoint; a resume under other settings is refused (naming them) before anything is
written; a resumed run's TensorBoard log holds each step once; settings of the wrong kind stop
every recipe at parse time, naming the file and the key."""

from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from completion.model import ModelConfig
from completion.tasks import TaskConfig
from completion.train import CHECKPOINT, TrainConfig, train
from recipes import complete, pituning, tensorize
from scope.cli import parse_config
from scope.io import checkpoint_metadata

CONFIGS = Path(complete.__file__).parent / "configs"
TINY = ["--preset", "tiny", "--patch_size", "4", "2", "2", "--d", "8", "--bank_size", "16", "--diffusion_steps", "20",
        "--batch_size", "4", "--n_samples", "2", "--sampler_steps", "2", "--log_every", "1", "--checkpoint_every", "2",
        "--max_entities", "6", "--calibrate", "false", "--figures", "false"]


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(make_batch, tmp_path, monkeypatch):
    data = make_batch(B=8, C=2, T=8, H=2, W=3)
    model_config = ModelConfig(channels=2, T=8, cell_dim=4, entity_dim=7, patch_size=(2, 1, 3), diffusion_steps=50,
                               umask=dict(d=16, bank_size=8))
    tasks = TaskConfig(short_horizon=2, long_horizon=4, cold_revealed=3)
    train(model_config, data, tasks, TrainConfig(steps=2, batch_size=4, checkpoint_every=2), out_dir=tmp_path,
          progress=False)
    good = (tmp_path / CHECKPOINT).read_bytes()
    import completion.train as train_module
    real = train_module.train_step

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        return {**out, "loss": out["loss"] * float("nan")}

    monkeypatch.setattr(train_module, "train_step", poisoned)
    with pytest.raises(FloatingPointError, match="step 3: the loss is nan"):
        train(model_config, data, tasks, TrainConfig(steps=4, batch_size=4, checkpoint_every=1), out_dir=tmp_path,
              progress=False)
    assert (tmp_path / CHECKPOINT).read_bytes() == good


def test_a_resume_under_other_settings_is_refused_before_anything_is_written(nj_path, tmp_path):
    argv = ["train", "--config", str(CONFIGS / "complete_nj.yaml"), "--output_dir", str(tmp_path), *TINY,
            "--data_path", str(nj_path), "--steps", "2"]
    complete.main(argv)
    args_before = (tmp_path / "args.json").read_text()
    with pytest.raises(ValueError, match=r"cannot resume with other settings \(lr: 0.001 in the checkpoint, 0.002 now"):
        complete.main(argv + ["--lr", "0.002"])
    assert (tmp_path / "args.json").read_text() == args_before
    complete.main(argv[:-1] + ["4"])  # more steps is a resume, not a change
    assert checkpoint_metadata(tmp_path / CHECKPOINT)["step"] == "4"
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert sorted(steps) == [1, 2, 3, 4]


def _with(config: Path, tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(config.read_text())
    for key, value in changes.items():
        *sections, last = key.split(".")
        node = data
        for part in sections:
            node = node[part]
        node[last] = value
    path = tmp_path / config.name
    path.write_text(yaml.safe_dump(data))
    return path


BAD_SETTINGS = {  # recipe -> (config, parse, [(key, value, what the message must say)])
    "complete": ("complete_nj.yaml", complete.parse,
                 [("steps", 2.5, "'steps' must be int, got 2.5"),
                  ("checkpoint_every", 0, "checkpoint_every': 0"),
                  ("batch_size", -3, "'batch_size': -3"),
                  ("tasks", "short", "tasks and history_dropout are lists, got 'short'"),
                  ("eval_tasks", "short", "eval_tasks is a list of task names"),
                  ("lr", "fast", "argument --lr: invalid float value: 'fast'")]),
    "pituning": ("pituning_cpu.yaml", pituning.parse,
                 [("population.steps", 2.5, "section 'population': 'steps' must be int, got 2.5"),
                  ("distillation.checkpoint_every", 0, "'checkpoint_every': 0"),
                  ("individual.batch_size", -3, "batch_size must be >= 1"),
                  ("individual.unlearning", "yes", "'unlearning' must be bool, got 'yes'")]),
    "tensorize": ("tensorize.yaml",
                  lambda argv: parse_config((tensorize.TensorizeArguments, tensorize.TensorConfig,
                                             tensorize.UserSplitter), argv),
                  [("window_slots", 2.5, "'window_slots' must be int, got 2.5"),
                   ("lenient", 3, "'lenient' must be bool, got 3")]),
}


@pytest.mark.parametrize("case", [(r, i) for r, (_, _, bad) in BAD_SETTINGS.items() for i in range(len(bad))],
                         ids=lambda c: f"{c[0]}-{BAD_SETTINGS[c[0]][2][c[1]][0]}")
def test_settings_of_the_wrong_kind_stop_at_parse_time(case, tmp_path):
    recipe, index = case
    name, parse, bad = BAD_SETTINGS[recipe]
    key, value, message = bad[index]
    path = _with(CONFIGS / name, tmp_path, **{key: value})
    with pytest.raises(SystemExit) as stop:
        parse(["--config", str(path)])
    assert str(path) in str(stop.value) and message in str(stop.value), stop.value
    assert not list(tmp_path.glob("*/args.json"))

