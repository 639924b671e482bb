"""PITuning end to end: population tuning -> distillation -> unlearning -> individual tuning -> evaluation.

    accelerate launch recipes/pituning.py                      # the CPU default (recipes/configs/pituning_cpu.yaml)
    python recipes/pituning.py --cohort_dir runs/demo/cohort   # intents derived from your Tsinghua-format cohort
    python recipes/pituning.py --config recipes/configs/pituning_gpt2_gpu.yaml   # paper scale, one GPU
    python recipes/pituning.py --population.steps 80 --individual.unlearning false   # override one setting

Data (``data``): ``tsinghua`` (default) derives intents from a Tsinghua-format cohort
(:mod:`scope.pituning.derive`; ``cohort_dir``, or the ``cohort`` section simulated by
:mod:`scope.data.simulate`); ``intents`` reads an intent-format directory (or simulates the
``intent_cohort`` section with :mod:`scope.pituning.simulate`). The YAML has one section per
library config and the run's own keys at the top (:class:`PITuningRun`); ``seed``,
``individual_fraction`` and ``lenient`` at the top reach every section that has them. Every stage
writes its artifact atomically under ``output_dir`` and is skipped when that artifact exists
(population/model.safetensors, student/model.safetensors); inside a stage, training resumes from
its checkpoint. TensorBoard logs go to ``output_dir/tb``. Outputs: ``report.json`` (metrics of
every model, each model's per-user intent counts ``class_counts`` for paired bootstraps over
users, forgotten sets, the teacher on the held-out population validation users, student
size, CPU latency of eager PyTorch and ONNX Runtime fp32 / int8, top-1 agreement), ``results.md``
and one exported student per individual user (``users/user-<id>/student.safetensors``,
``student.onnx``, ``student.int8.onnx``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from scope.cli import parse_sections, run_recipe
from scope.data.simulate import CohortConfig
from scope.io import write_json, write_text
from scope.pituning.data import SampleConfig
from scope.pituning.derive import DeriveConfig
from scope.pituning.evaluate import (individual_test, intent_metrics, pooled, rarest_intents, results_table, score,
                                     user_class_counts)
from scope.pituning.export import on_device_figures
from scope.pituning.individual import IndividualConfig, tune_individuals
from scope.pituning.model import PredictorConfig
from scope.pituning.simulate import IntentCohortConfig
from scope.pituning.stages import (DistillationConfig, PopulationConfig, distilled_student, population_model,
                                   prepare_data)
from scope.pituning.train import predict

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "recipes" / "configs" / "pituning_cpu.yaml"
SECTIONS = {"cohort": CohortConfig, "derive": DeriveConfig, "intent_cohort": IntentCohortConfig,
            "samples": SampleConfig, "predictor": PredictorConfig, "population": PopulationConfig,
            "distillation": DistillationConfig, "individual": IndividualConfig}
SHARED = ("seed", "individual_fraction", "lenient")


@dataclass
class PITuningRun:
    """The run's own settings (the library's configs are the sections of the YAML)."""

    output_dir: str = "runs/pituning"
    data: str = "tsinghua"                 # tsinghua (intents derived from traces) | intents (intent-format files)
    cohort_dir: str | None = None          # a directory of that format; None: simulate into output_dir/cohort
    max_individual_users: int | None = None  # evaluate the first k individual users (None: all)
    threads: int | None = None
    device: str = "auto"                   # auto | cpu | cuda
    progress: bool = True
    tensorboard: bool = True


@dataclass
class PITuningConfig:
    run: PITuningRun
    cohort: CohortConfig
    derive: DeriveConfig
    intent_cohort: IntentCohortConfig
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
    data = load_data(run_args, cfg.cohort, cfg.intent_cohort, cfg.derive, cfg.samples)
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
    _, held_out = data.population_val_halves()
    tuned = torch.cat([torch.full((len(r.labels),), r.user_id) for r in results])   # the user of each pooled point
    predictions = {"population model (no individual tuning)": (predict(teacher, test), test.intent, test.user),
                   "distilled student (no individual tuning)": (predict(student, test), test.intent, test.user),
                   "PITuning" if cfg.individual.unlearning else "PITuning w/o unlearning": (*pooled(results), tuned)}
    rows = {name: score(s, y, data) for name, (s, y, _) in predictions.items()}
    sizes = [Path(r.path).stat().st_size for r in results if r.path]
    device_figures = on_device_figures([Path(r.path).parent for r in results if r.path], data)
    report = {
        "config": asdict(cfg), "data": data.summary(), "metrics": rows,
        "class_counts": {name: user_class_counts(s, y, u, data.n_intents) for name, (s, y, u) in predictions.items()},
        "teacher_population_val": {k: round(v, 4) for k, v in intent_metrics(predict(teacher, held_out),
                                                                               held_out.intent).items()},
        "rarest_intents": [data.intents[i] for i in rarest_intents(data)],
        "forgotten_sets": {r.user_id: {"static": r.static, "dynamic": r.dynamic, "unlearn_steps": r.unlearn_steps}
                           for r in results},
        "teacher_params": teacher.num_parameters(), "student_params": student.num_parameters(),
        "student_file_mb": round(float(np.mean(sizes)) / 2**20, 3) if sizes else None,
        **device_figures,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    write_json(run / "report.json", report)
    write_text(run / "results.md", "# PITuning results (pooled test sets of the individual users)\n\n"
               + results_table(rows) + f"\n\nstudent: {report['student_params']:,} parameters, "
               f"{report['student_file_mb']} MB per user; ms per prediction on CPU (batch 1, 1 thread): "
               f"{report['student_ms_per_prediction']}; ONNX top-1 agreement: {report['onnx_top1_agreement']}\n")
    if writer is not None:
        writer.close()
    print(results_table(rows))
    print(f"student: {report['student_params']:,} parameters, ms/prediction {report['student_ms_per_prediction']}; "
          f"report: {run / 'report.json'}")
    return report


def load_data(run: PITuningRun, cohort: CohortConfig, intent_cohort: IntentCohortConfig, derive: DeriveConfig,
              samples: SampleConfig):
    """The run's data: its ``data`` source, read from ``cohort_dir`` or simulated into ``output_dir/cohort``."""
    simulation = cohort if run.data == "tsinghua" else intent_cohort
    return prepare_data(run.data, run.cohort_dir, run.output_dir, simulation, derive, samples,
                        run.max_individual_users, run.progress)


def parse(argv: list[str] | None = None) -> PITuningConfig:
    """Parse the command line; without ``--config`` the CPU default config is used."""
    run, sections = parse_sections(SECTIONS, argv, DEFAULT_CONFIG, top=PITuningRun, shared=SHARED)
    return PITuningConfig(run, **sections)


if __name__ == "__main__":
    sys.exit(run_recipe(main, parse()))
