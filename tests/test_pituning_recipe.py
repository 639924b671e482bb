"""recipes/pituning.py: every YAML config validates, and the whole pipeline runs from the command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes import pituning
from scope.pituning.evaluate import METRIC_KEYS

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--predictor.backbone.name", "random:llama", "--predictor.backbone.hidden", "32",
        "--predictor.backbone.layers", "2", "--predictor.backbone.heads", "2", "--predictor.backbone.intermediate", "64",
        "--cohort.n_users", "24", "--cohort.days", "5", "--individual_fraction", "0.25", "--max_individual_users", "3",
        "--predictor.embed_dim", "8", "--predictor.attention_dim", "16", "--predictor.head_hidden", "32",
        "--distillation.student.hidden", "32", "--distillation.student.heads", "2",
        "--distillation.student.intermediate", "64", "--population.steps", "6", "--distillation.steps", "6",
        "--population.warmup_steps", "2", "--distillation.warmup_steps", "2", "--individual.unlearn_steps", "3",
        "--individual.epochs", "1", "--threads", "1", "--progress", "false", "--device", "cpu"]


@pytest.mark.parametrize("name", ["pituning_cpu.yaml", "pituning_gpt2_gpu.yaml"])
def test_every_pituning_config_parses_into_its_dataclass(name):
    cfg = pituning.parse(["--config", str(ROOT / "recipes" / "configs" / name)])
    assert cfg.distillation.alpha == 0.5 and cfg.distillation.temperature == 1.0 and \
        cfg.distillation.student.layers == 4 and cfg.samples.history == 30


def test_no_arguments_means_the_cpu_default():
    cfg = pituning.parse([])
    assert cfg.predictor.backbone.name == "smollm2-135m-instruct" and cfg.predictor.backbone.blocks == 2 and \
        cfg.individual.unlearning


def test_the_recipe_runs_every_stage_and_resumes(tmp_path):
    torch.set_num_threads(1)
    args = pituning.parse(TINY + ["--output_dir", str(tmp_path / "run")])
    report = pituning.main(args)
    assert set(report["metrics"]) == {"population model (no individual tuning)",
                                      "distilled student (no individual tuning)", "PITuning"}
    for metrics in report["metrics"].values():
        assert set(METRIC_KEYS) <= set(metrics) and len(metrics["rare_recall"]) == 3
    assert report["student_ms_per_prediction"] > 0 and report["student_params"] > 0
    users = sorted((tmp_path / "run" / "users").glob("user-*/student.safetensors"))
    assert len(users) == 3
    for name in ("report.json", "results.md", "data_summary.json", "population/model.safetensors",
                 "student/model.safetensors"):
        assert (tmp_path / "run" / name).exists()
    assert list((tmp_path / "run" / "tb").iterdir())
    # A second run finds the finished stages and reuses them.
    again = pituning.main(args)
    assert again["metrics"]["distilled student (no individual tuning)"] == \
        report["metrics"]["distilled student (no individual tuning)"]


def test_the_command_line_entry_point(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "recipes" / "pituning.py"), *TINY,
                           "--output_dir", str(tmp_path / "cli"), "--individual.unlearning", "false"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "PITuning w/o unlearning" in done.stdout
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert report["config"]["individual"]["unlearning"] is False


def test_an_unknown_key_is_named(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "recipes" / "pituning.py"), "--n_userz", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "n_userz" in done.stderr
