"""The main job's stages by name: the folder each writes under the run folder and the file that
marks it done. One table, read by the runner (``recipes/demo.py``) and by the report
(:mod:`scope.run.report`)."""

from __future__ import annotations

from pathlib import Path

# stage -> (folder under the run folder, the output that marks it done), in the order they run
STAGES: dict[str, tuple[str, str]] = {
    "cohort": ("cohort", "cohort.json"),
    "tensors": ("tensors", "dataset.json"),
    "summary": ("summary", "summary.json"),
    "sft": ("sft", "adapter_model.safetensors"),
    "dpo": ("dpo", "adapter_model.safetensors"),
    "evaluate": ("evaluation", "evaluation.json"),
    "novelty": ("novelty", "novelty.json"),
    "synthesis": ("synthesis", "report/fidelity.json"),
    "embed": ("embeddings", "user_embeddings.safetensors"),
    "completion": ("completion", "eval_tensors_test.json"),
    "compare": ("compare", "comparison.json"),
    "pituning": ("pituning", "report.json"),
    "lightgbm": ("lightgbm", "lightgbm.json"),
    "report": ("report", "index.html"),
}


def stage_folder(run_dir: str | Path, stage: str) -> Path:
    """Where ``stage`` writes under ``run_dir``."""
    return Path(run_dir) / STAGES[stage][0]


def stage_output(run_dir: str | Path, stage: str) -> Path:
    """The file whose presence marks ``stage`` as done."""
    return stage_folder(run_dir, stage) / STAGES[stage][1]
