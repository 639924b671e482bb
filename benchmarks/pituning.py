"""PITuning vs its ablations and LightGBM on one split (paper Table 2), the long tail (Fig. 8), and
the on-device student's size and CPU latency.

Simulates an intent cohort (skipped when it already exists in --work_dir), then times, in this
process: population tuning of the first SmolLM2 blocks, distillation into the 4-layer student,
and, on the same individual users and the same time-based split,

- ``pituning``: unlearning (Eq. 8-11) + per-user fine-tuning of the student;
- ``no_unlearning``: per-user fine-tuning only;
- ``focal_loss`` / ``oversampling``: per-user fine-tuning with focal loss / class-balanced
  sampling instead of unlearning (the usual long-tail remedies);
- ``scratch_transformer``: a transformer of the student's size trained from scratch on the
  population data (no pretrained LM, no distillation), then per-user fine-tuning;
- ``population_teacher``: the population model without individual tuning;
- ``lightgbm``: one LightGBM per individual user (appendix E features, Table 5 settings, small-data
  fallback); ``lightgbm_pooled``: one LightGBM on population + individual training data.

Metrics are computed on the individual users' pooled test points. Targets: student <= 3 ms per
prediction on CPU (1 thread, batch 1); PITuning beats LightGBM on prec_m; unlearning improves the
recall of the three rarest population intents.

    python -m benchmarks.pituning [--users 150 --individual_users 10 --work_dir /tmp/uscope-bench-pituning]
"""

import argparse
import os
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import emit, peak_rss_mb
from recipes.pituning import parse
from scope.pituning.baselines import lightgbm_individual, lightgbm_pooled
from scope.pituning.data import INTENT_TRACE_FILE
from scope.pituning.evaluate import METRIC_KEYS, individual_test, pooled, rarest_intents, results_table, score
from scope.pituning.export import cpu_latency_ms, export_student
from scope.pituning.individual import tune_individuals
from scope.pituning.losses import supervised_loss
from scope.pituning.model import IntentPredictor, student_config
from scope.pituning.simulate import IntentCohortConfig, simulate_intent_cohort
from scope.pituning.stages import distilled_student, population_model, prepare_data
from scope.pituning.train import StageConfig, fit, predict


def log(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:7.1f} s] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=150)
    parser.add_argument("--days", type=int, default=21)
    parser.add_argument("--individual_users", type=int, default=10)
    parser.add_argument("--population_steps", type=int, default=120)
    parser.add_argument("--distill_steps", type=int, default=300)
    parser.add_argument("--distill_samples", type=int, default=2500)
    parser.add_argument("--individual_epochs", type=int, default=3)
    parser.add_argument("--scratch_steps", type=int, default=None, help="default: --distill_steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reuse", action="store_true",
                        help="keep the population model and student of a previous run in --work_dir (not timed again)")
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/uscope-bench-pituning"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cohort_dir, run_dir = args.work_dir / "cohort", args.work_dir / "run"
    if not (cohort_dir / INTENT_TRACE_FILE).exists():
        simulate_intent_cohort(IntentCohortConfig(n_users=args.users, days=args.days, seed=0), cohort_dir, progress=False)
    if not args.reuse:
        shutil.rmtree(run_dir, ignore_errors=True)
    base = parse(["--output_dir", str(run_dir), "--cohort_dir", str(cohort_dir), "--cohort.n_users", str(args.users),
                  "--cohort.days", str(args.days), "--max_individual_users", str(args.individual_users),
                  "--population.steps", str(args.population_steps), "--distillation.steps", str(args.distill_steps),
                  "--distillation.samples", str(args.distill_samples), "--threads", str(args.threads),
                  "--individual.epochs", str(args.individual_epochs),
                  "--progress", "false", "--tensorboard", "false"])
    run, device = base.run, torch.device("cpu")

    start = time.perf_counter()
    data = prepare_data(run.cohort_dir, run_dir, base.cohort, base.samples, run.max_individual_users, progress=False)
    test = individual_test(data)
    log(f"data: {data.summary()['population_train']:,} population points, {len(data.individual_users)} individual "
        f"users, {len(test):,} test points", start)
    stage_s = {}
    t = time.perf_counter()
    teacher = population_model(data, base.predictor, base.population, run_dir / "population", device, progress=False)
    stage_s["population"] = round(time.perf_counter() - t, 1)
    log("population model tuned (or reused)", start)
    t = time.perf_counter()
    student = distilled_student(data, teacher, base.distillation, run_dir / "student", device, progress=False)
    stage_s["distillation"] = round(time.perf_counter() - t, 1)
    log("student distilled (or reused)", start)
    t = time.perf_counter()

    rows, results = {}, {}
    variants = {"pituning": {}, "no_unlearning": {"unlearning": False},
                "focal_loss": {"unlearning": False, "loss": "focal"},
                "oversampling": {"unlearning": False, "oversample": True}}
    for name, overrides in variants.items():
        results[name] = tune_individuals(student, data, replace(base.individual, **overrides), progress=False,
                                         export_dir=run_dir / "users" if name == "pituning" else None)
        rows[name] = score(*pooled(results[name]), data)
        log(f"{name}: prec_m {rows[name]['prec_m']:.4f}", start)

    distill, seed = base.distillation, base.distillation.seed
    torch.manual_seed(seed + 2)
    scratch = IntentPredictor(student_config(teacher, **asdict(distill.student)), data.vocab_sizes(), data.n_intents)
    fit(scratch, supervised_loss("ce"), data.population_train,
        StageConfig(steps=args.scratch_steps or args.distill_steps, batch_size=distill.batch_size, lr=distill.lr,
                    warmup_steps=distill.warmup_steps, seed=seed), progress=False)
    rows["scratch_transformer"] = score(*pooled(tune_individuals(
        scratch, data, replace(base.individual, unlearning=False), progress=False)), data)
    stage_s["individual_variants_and_scratch"] = round(time.perf_counter() - t, 1)
    log("scratch transformer", start)
    rows["population_teacher"] = score(predict(teacher, test), test.intent, data)

    lgb_scores, lgb_labels, modes = lightgbm_individual(data, seed=seed)
    rows["lightgbm"] = score(lgb_scores, lgb_labels, data)
    rows["lightgbm_pooled"] = score(*lightgbm_pooled(data, max_population_rows=20000, seed=seed), data)
    log(f"lightgbm ({modes})", start)
    wall = time.perf_counter() - start

    torch.set_num_threads(1)
    cpu_student = student.cpu().eval()
    latency = cpu_latency_ms(cpu_student, test, repeats=300, warmup=30)
    latency_p10 = cpu_latency_ms(cpu_student, test, repeats=300, warmup=10, quantile=0.1)
    load_average = os.getloadavg()[0]
    size = export_student(cpu_student, run_dir / "student-size-check.safetensors")
    rare = [data.intents[i] for i in rarest_intents(data)]

    def rare_mean(row: dict) -> float | None:
        values = [v for v in row["rare_recall"].values() if v is not None]
        return round(float(np.mean(values)), 4) if values else None

    forgotten_users = sum(1 for r in results["pituning"] if r.forgotten)
    figures = {
        "methods": {name: {k: row[k] for k in METRIC_KEYS} for name, row in rows.items()},
        "rare_intents": rare,
        "rare_recall": {name: rows[name]["rare_recall"] for name in ("pituning", "no_unlearning", "focal_loss",
                                                                        "oversampling", "lightgbm")},
        "rare_recall_mean": {"with_unlearning": rare_mean(rows["pituning"]),
                             "without_unlearning": rare_mean(rows["no_unlearning"])},
        "rare_test_points": {data.intents[i]: int((test.intent == i).sum()) for i in rarest_intents(data)},
        "student_params": cpu_student.num_parameters(),
        "student_file_mb": round(size / 2**20, 3),
        "student_ms_per_prediction": round(latency, 3),
        "student_ms_per_prediction_p10": round(latency_p10, 3),
        "load_average_1min": round(load_average, 2),
        "teacher_params": teacher.num_parameters(),
        "teacher": f"{base.predictor.backbone.name}, first {base.predictor.backbone.blocks} blocks",
        "users_with_forgotten_intents": forgotten_users,
        "lightgbm_settings": modes,
        "population_points": len(data.population_train),
        "individual_users": len(data.individual_users),
        "individual_test_points": len(test),
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "threads": args.threads,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "stage_s": stage_s,
    }
    pit, lgbm = rows["pituning"], rows["lightgbm"]
    with_u, without_u = figures["rare_recall_mean"]["with_unlearning"], figures["rare_recall_mean"]["without_unlearning"]
    figures["targets"] = {
        "student_ms_per_prediction<=3": latency <= 3.0,
        "pituning_prec_m>lightgbm_prec_m": pit["prec_m"] > lgbm["prec_m"],
        "unlearning_improves_rare_recall": (with_u is not None and without_u is not None and with_u > without_u),
    }
    print(results_table(rows), file=sys.stderr)
    emit("pituning", figures)


if __name__ == "__main__":
    main()
