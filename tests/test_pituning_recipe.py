"""recipes/pituning.py: every YAML config validates, and the whole pipeline runs from the command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes import intent_baselines, pituning
from scope.cli import parse_sections
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
    assert cfg.run.data == "tsinghua" and cfg.samples.train_fraction == 0.6 and cfg.samples.val_fraction == 0.1


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
    assert set(report["student_ms_per_prediction"]) == {"eager", "onnx", "onnx_int8"} and report["student_params"] > 0
    assert all(v > 0 for v in report["student_ms_per_prediction"].values())
    assert report["onnx_top1_agreement"]["fp32"] == 1.0 and report["onnx_top1_agreement"]["int8"] >= 0.9
    assert 0 < report["onnx_file_mb"]["int8"] < report["onnx_file_mb"]["fp32"]
    assert report["data"]["cohort"]["rows_without_poi"] == 0 and "skipped_users" in report["data"]
    assert set(report["teacher_population_val"]) == set(METRIC_KEYS)
    users = sorted((tmp_path / "run" / "users").glob("user-*/student.safetensors"))
    assert len(users) == 3 and all((u.parent / "student.int8.onnx").exists() for u in users)
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


def test_the_intent_simulator_stays_a_second_data_source(tmp_path):
    cfg = pituning.parse(TINY + ["--output_dir", str(tmp_path / "intents"), "--data", "intents",
                                 "--intent_cohort.n_users", "24", "--intent_cohort.days", "5"])
    data = pituning.load_data(cfg.run, cfg.cohort, cfg.intent_cohort, cfg.derive, cfg.samples)
    assert data.n_intents == 18 and (tmp_path / "intents" / "cohort" / "intent_trace.txt").exists()


def test_the_lightgbm_stage_reads_the_same_derived_data(tmp_path):
    run, sections = parse_sections(pituning.SECTIONS, TINY + ["--output_dir", str(tmp_path / "lgb")],
                                   pituning.DEFAULT_CONFIG, top=intent_baselines.IntentBaselineRun,
                                   shared=pituning.SHARED)
    intent_baselines.main(run, sections)
    report = json.loads((tmp_path / "lgb" / "lightgbm.json").read_text())
    assert set(report["metrics"]) == {"LightGBM per user", "LightGBM pooled (population + individual)",
                                      "most frequent intent per (user, slot)"}
    assert set(report["settings"]) <= {"small_data", "table5", "constant"} and len(report["individual_users"]) == 3


def test_an_unknown_key_is_named(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "recipes" / "pituning.py"), "--n_userz", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "n_userz" in done.stderr
