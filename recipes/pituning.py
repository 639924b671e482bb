"""PITuning end to end: population tuning -> distillation -> unlearning -> individual tuning -> evaluation.

    accelerate launch recipes/pituning.py                      # the CPU default (recipes/configs/pituning_cpu.yaml)
    python recipes/pituning.py --config recipes/configs/pituning_gpt2_gpu.yaml   # paper scale, one GPU
    python recipes/pituning.py --population.steps 80 --individual.unlearning false   # override one setting

The YAML has one section per library config (``cohort``, ``samples``, ``predictor``,
``population``, ``distillation``, ``individual``) and the run's own keys at the top
(:class:`PITuningRun`); ``seed`` and ``individual_fraction`` at the top reach every section that
has them. Every stage writes its artifact atomically under ``output_dir`` and is skipped when that
artifact exists (population/model.safetensors, student/model.safetensors); inside a stage,
training resumes from its checkpoint. TensorBoard logs go to ``output_dir/tb``. Outputs:
``report.json`` (metrics of every model, forgotten sets, student size and CPU latency),
``results.md`` and one exported student per individual user (``users/user-<id>/student.safetensors``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from scope.cli import parse_sections, run_recipe
from scope.io import write_json, write_text
from scope.pituning.data import SampleConfig
from scope.pituning.evaluate import individual_test, pooled, rarest_intents, results_table, score
from scope.pituning.export import cpu_latency_ms
from scope.pituning.individual import IndividualConfig, tune_individuals
from scope.pituning.model import PredictorConfig
from scope.pituning.simulate import IntentCohortConfig
from scope.pituning.stages import (DistillationConfig, PopulationConfig, distilled_student, population_model,
                                   prepare_data)
from scope.pituning.train import predict

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "recipes" / "configs" / "pituning_cpu.yaml"
SECTIONS = {"cohort": IntentCohortConfig, "samples": SampleConfig, "predictor": PredictorConfig,
            "population": PopulationConfig, "distillation": DistillationConfig, "individual": IndividualConfig}


@dataclass
class PITuningRun:
    """The run's own settings (the library's configs are the sections of the YAML)."""

    output_dir: str = "runs/pituning"
    cohort_dir: str | None = None          # an intent-format directory; None: simulate into output_dir/cohort
    max_individual_users: int | None = None  # evaluate the first k individual users (None: all)
    threads: int | None = None
    device: str = "auto"                   # auto | cpu | cuda
    progress: bool = True
    tensorboard: bool = True


@dataclass
class PITuningConfig:
    run: PITuningRun
    cohort: IntentCohortConfig
    samples: SampleConfig
    predictor: PredictorConfig
    population: PopulationConfig
    distillation: DistillationConfig
    individual: IndividualConfig


def _device(run: PITuningRun) -> torch.device:
    if run.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(run.device)


def main(cfg: PITuningConfig) -> dict:
    run_args = cfg.run
    if run_args.threads:
        torch.set_num_threads(run_args.threads)
    run = Path(run_args.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    writer = None
    if run_args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run / "tb"))
    device, progress = _device(run_args), run_args.progress
    timings, start = {}, time.perf_counter()
    data = prepare_data(run_args.cohort_dir, run, cfg.cohort, cfg.samples, run_args.max_individual_users, progress)
    write_json(run / "data_summary.json", data.summary())
    timings["data_s"] = time.perf_counter() - start

    t = time.perf_counter()
    teacher = population_model(data, cfg.predictor, cfg.population, run / "population", device, writer, progress)
    timings["population_s"] = time.perf_counter() - t
    t = time.perf_counter()
    student = distilled_student(data, teacher, cfg.distillation, run / "student", device, writer, progress)
    timings["distillation_s"] = time.perf_counter() - t
    t = time.perf_counter()
    results = tune_individuals(student, data, cfg.individual, export_dir=run / "users", progress=progress)
    timings["individual_s"] = time.perf_counter() - t

    test = individual_test(data)
    rows = {"population model (no individual tuning)": score(predict(teacher, test), test.intent, data),
            "distilled student (no individual tuning)": score(predict(student, test), test.intent, data),
            "PITuning" if cfg.individual.unlearning else "PITuning w/o unlearning": score(*pooled(results), data)}
    cpu_student = student.cpu()
    sizes = [Path(r.path).stat().st_size for r in results if r.path]
    report = {
        "config": asdict(cfg), "data": data.summary(), "metrics": rows,
        "rarest_intents": [data.intents[i] for i in rarest_intents(data)],
        "forgotten_sets": {r.user_id: {"static": r.static, "dynamic": r.dynamic, "unlearn_steps": r.unlearn_steps}
                           for r in results},
        "teacher_params": teacher.num_parameters(), "student_params": cpu_student.num_parameters(),
        "student_file_mb": round(float(np.mean(sizes)) / 2**20, 3) if sizes else None,
        "student_ms_per_prediction": round(cpu_latency_ms(cpu_student, test, repeats=200), 3),
        "latency_threads": torch.get_num_threads(),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    write_json(run / "report.json", report)
    write_text(run / "results.md", "# PITuning results (pooled test sets of the individual users)\n\n"
               + results_table(rows) + f"\n\nstudent: {report['student_params']:,} parameters, "
               f"{report['student_file_mb']} MB per user, {report['student_ms_per_prediction']} ms per prediction "
               f"on CPU ({report['latency_threads']} thread(s))\n")
    if writer is not None:
        writer.close()
    print(results_table(rows))
    print(f"student: {report['student_params']:,} parameters, {report['student_ms_per_prediction']} ms/prediction; "
          f"report: {run / 'report.json'}")
    return report


def parse(argv: list[str] | None = None) -> PITuningConfig:
    """Parse the command line; without ``--config`` the CPU default config is used."""
    run, sections = parse_sections(SECTIONS, argv, DEFAULT_CONFIG, top=PITuningRun,
                                   shared=("seed", "individual_fraction"))
    return PITuningConfig(run, **sections)


if __name__ == "__main__":
    sys.exit(run_recipe(main, parse()))
