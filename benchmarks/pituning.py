"""PITuning vs its ablations and the paper's baselines on one split (paper Table 2), the long tail (Fig. 8),
the teacher against LightGBM before distillation, and the on-device student under ONNX Runtime.

Data: intents derived from the toolchain's Tsinghua-format cohort (``--data tsinghua``, the demo's
200-user, 7-day simulated cohort by default; :mod:`scope.pituning.derive`) or the intent simulator
(``--data intents``). One split for everything (population / individual users by a hashed id,
each individual user's records 60 / 10 / 30 % by time, as the paper's Mobile dataset).

1. The population model (first SmolLM2 blocks, Eq. 1-5) is tuned once (``--teacher_seed``) and
   compared with a population LightGBM on the held-out half of the population validation users
   (``teacher_vs_lightgbm_population``).
2. For each of ``--seeds``: distillation into the 4-layer student (Eq. 6-7), then per user
   ``pituning`` (unlearning, Eq. 8-11, + fine-tuning), ``no_unlearning``, ``focal_loss``,
   ``oversampling``; ``scratch_transformer`` (student-size, trained from scratch on the population,
   fine-tuned per user). Unlearning's ``eps`` (Eq. 8) and ``lambda`` (Eq. 11) are chosen once, on
   the individual users' validation points of the first seed.
3. Baselines: ``lightgbm`` (per user, fitted once per seed: its early-stopped fits vary from run to
   run), and, deterministic, ``lightgbm_pooled`` (Table 5 settings),
   ``lightgbm_pooled_routine`` (the same with the routine prior's columns: the control for the
   models' routine input), ``most_frequent_per_slot``, ``population_teacher``.
4. Each user's PITuning student (first seed) is exported to ONNX (fp32, dynamic int8); top-1
   agreement with eager PyTorch on the test points; batch-1 latency of the three runtimes on one
   thread, measured back to back (their ratio holds under load; the load average is recorded).

Metrics on the individual users' pooled test points; mean, std and a 95 % t-interval over seeds.

``--teacher_sweep`` instead measures population-model configurations (pretrained blocks, the
paper's Adam at lr 0.01, IAT and reconstruction off, a longer budget): the learning curve on the
first half of the population validation users every 50 steps, and the final metrics on the
held-out half next to the population LightGBM (``benchmarks/results/pituning_teacher_sweep.json``).

    python -m benchmarks.pituning [--seeds 0 1 2 --population_steps 150 --work_dir /tmp/uscope-bench-pituning]
    python -m benchmarks.pituning --teacher_sweep [--population_steps 150]
"""

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from benchmarks.common import emit, peak_rss_mb
from recipes.pituning import load_data, parse
from scope.pituning.baselines import lightgbm_individual, lightgbm_pooled, lightgbm_population, most_frequent_per_slot
from scope.pituning.evaluate import (METRIC_KEYS, individual_test, intent_metrics, pooled, rarest_intents,
                                     results_table, score)
from scope.pituning.export import on_device_figures
from scope.pituning.individual import calibrate_unlearning, tune_individuals
from scope.pituning.losses import population_loss, supervised_loss
from scope.pituning.model import IntentPredictor, student_config
from scope.pituning.stages import distilled_student, population_model
from scope.pituning.train import StageConfig, fit, predict

TEACHER_CONFIGS = {   # name -> (predictor overrides, population overrides, step multiplier)
    "smollm2_2blocks": ({}, {}, 1),
    "paper_adam_lr0.01": ({}, {"lr": 1e-2, "lm_lr": 1e-2, "weight_decay": 0.0}, 1),
    "smollm2_1block": ({"blocks": 1}, {}, 1),
    "no_reconstruction": ({}, {"mask_weight": 0.0}, 1),
    "no_iat": ({"iat": False}, {}, 1),
    "smollm2_2blocks_3x_steps": ({}, {}, 3),
}
VARIANTS = {"pituning": {}, "no_unlearning": {"unlearning": False},
            "focal_loss": {"unlearning": False, "loss": "focal"},
            "oversampling": {"unlearning": False, "oversample": True}}


def log(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:7.1f} s] {message}", file=sys.stderr, flush=True)


def summarize(values: list[float]) -> dict:
    """Mean, sample std and the 95 % t-interval of the mean over seeds."""
    v = np.asarray(values, float)
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    half = float(stats.t.ppf(0.975, len(v) - 1) * std / np.sqrt(len(v))) if len(v) > 1 else 0.0
    return {"mean": round(float(v.mean()), 4), "std": round(std, 4),
            "ci95": [round(float(v.mean()) - half, 4), round(float(v.mean()) + half, 4)], "runs": len(v)}


def rare_mean(row: dict) -> float:
    values = [v for v in row["rare_recall"].values() if v is not None]
    return float(np.mean(values)) if values else float("nan")


def teacher_sweep(base, data, steps: int, start: float) -> dict:
    """Each of :data:`TEACHER_CONFIGS`: learning curve (every 50 steps, first half of the population
    validation users) and final metrics on the held-out half, against the population LightGBM."""
    select, held_out = data.population_val_halves()
    lgb = {k: round(v, 4) for k, v in intent_metrics(lightgbm_population(data), held_out.intent).items()}
    rows = {}
    for name, (predictor, population, multiplier) in TEACHER_CONFIGS.items():
        blocks = predictor.get("blocks", base.predictor.backbone.blocks)
        cfg = replace(base.predictor, backbone=replace(base.predictor.backbone, blocks=blocks),
                      **{k: v for k, v in predictor.items() if k != "blocks"})
        stage = replace(base.population, steps=steps * multiplier, eval_every=50, checkpoint_every=10**9, **population)
        torch.manual_seed(stage.seed)
        model = IntentPredictor(cfg, data.vocab_sizes(), data.n_intents)
        curve = []
        t = time.perf_counter()
        fit(model, population_loss(stage.event_mask_ratio, stage.mask_weight), data.population_train, stage,
            pretrained=True, progress=False,
            evaluate=lambda m: {k: round(v, 4) for k, v in intent_metrics(predict(m, select), select.intent).items()},
            log=lambda step, x: curve.append({"step": step, **{k: x[k] for k in ("loss", "prec_w", "prec_m", "rec_m")}})
            if "prec_m" in x else None)
        final = {k: round(v, 4) for k, v in intent_metrics(predict(model, held_out), held_out.intent).items()}
        rows[name] = {"steps": stage.steps, "lr": stage.lr, "lm_lr": stage.lm_lr, "blocks": blocks,
                      "iat": cfg.iat, "mask_weight": stage.mask_weight, "curve": curve, "held_out": final,
                      "beats_lightgbm_prec_m": final["prec_m"] > lgb["prec_m"],
                      "beats_lightgbm_rec_m": final["rec_m"] > lgb["rec_m"], "train_s": round(time.perf_counter() - t)}
        log(f"teacher {name}: held-out prec_m {final['prec_m']:.4f} rec_m {final['rec_m']:.4f} "
            f"(LightGBM {lgb['prec_m']:.4f} / {lgb['rec_m']:.4f})", start)
    return {"lightgbm_population": lgb, "configs": rows, "held_out_points": len(held_out),
            "select_points": len(select)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="tsinghua", choices=["tsinghua", "intents"])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher_seed", type=int, default=0)
    parser.add_argument("--population_steps", type=int, default=150)
    parser.add_argument("--distill_steps", type=int, default=300)
    parser.add_argument("--distill_samples", type=int, default=3000)
    parser.add_argument("--individual_epochs", type=int, default=3)
    parser.add_argument("--eps_grid", type=float, nargs="+", default=[0.01, 0.05])
    parser.add_argument("--lambda_grid", type=float, nargs="+", default=[0.5, 2.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no_routine", action="store_true",
                        help="ablation: every model without the user's routine prior (PredictorConfig.routine)")
    parser.add_argument("--teacher_sweep", action="store_true", help="measure population-model configurations only")
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/uscope-bench-pituning"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result_name = ("pituning" if args.data == "tsinghua" else "pituning_intents") + ("_no_routine" if args.no_routine else "")
    run_dir = args.work_dir / result_name
    cohort = "intent_cohort" if args.data == "intents" else "cohort"
    base = parse(["--output_dir", str(run_dir), "--data", args.data, f"--{cohort}.n_users", str(args.users),
                  f"--{cohort}.days", str(args.days), "--max_individual_users", "null", "--population.steps", str(args.population_steps),
                  "--population.seed", str(args.teacher_seed), "--distillation.steps", str(args.distill_steps),
                  "--distillation.samples", str(args.distill_samples), "--individual.epochs",
                  str(args.individual_epochs), "--threads", str(args.threads), "--progress", "false",
                  "--tensorboard", "false", "--predictor.routine", str(not args.no_routine).lower()])
    device = torch.device("cpu")
    start = time.perf_counter()
    data = load_data(base.run, base.cohort, base.intent_cohort, base.derive, base.samples)
    test = individual_test(data)
    _, held_out = data.population_val_halves()
    log(f"data: {data.summary()['population_train']:,} population points, {len(data.individual_users)} individual "
        f"users, {len(test):,} test points", start)

    if args.teacher_sweep:
        figures = teacher_sweep(base, data, args.population_steps, start)
        emit("pituning_teacher_sweep", {**figures, "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                                 for k, v in vars(args).items()},
                                        "wall_s": round(time.perf_counter() - start, 1)})
        return
    stage_s = {}
    t = time.perf_counter()
    teacher = population_model(data, base.predictor, base.population, run_dir / "population", device, progress=False)
    stage_s["population"] = round(time.perf_counter() - t, 1)
    teacher_pop = intent_metrics(predict(teacher, held_out), held_out.intent)
    lgb_pop = intent_metrics(lightgbm_population(data), held_out.intent)
    lgb_pop_routine = intent_metrics(lightgbm_population(data, routine=True), held_out.intent)
    log(f"teacher prec_m {teacher_pop['prec_m']:.4f} vs population LightGBM {lgb_pop['prec_m']:.4f} "
        f"({lgb_pop_routine['prec_m']:.4f} with the routine features)", start)

    runs: dict[str, list[dict]] = {}
    calibration, individual = None, base.individual
    for seed in args.seeds:
        t = time.perf_counter()
        distill = replace(base.distillation, seed=seed)
        student = distilled_student(data, teacher, distill, run_dir / f"student-{seed}", device, progress=False)
        if calibration is None:
            individual, calibration = calibrate_unlearning(student, data, replace(individual, seed=seed),
                                                           args.eps_grid, args.lambda_grid)
            log(f"unlearning calibrated on validation users: {calibration}", start)
        for name, overrides in VARIANTS.items():
            results = tune_individuals(student, data, replace(individual, seed=seed, **overrides), progress=False,
                                       export_dir=run_dir / "users" if (name == "pituning" and seed == args.seeds[0])
                                       else None)
            runs.setdefault(name, []).append(score(*pooled(results), data))
            if name == "pituning" and seed == args.seeds[0]:
                export_dirs, student_params = [Path(r.path).parent for r in results], student.num_parameters()
        torch.manual_seed(seed + 2)
        scratch = IntentPredictor(student_config(teacher, **asdict(distill.student)), data.vocab_sizes(), data.n_intents)
        fit(scratch, supervised_loss("ce"), data.population_train,
            StageConfig(steps=args.distill_steps, batch_size=distill.batch_size, lr=distill.lr,
                        warmup_steps=distill.warmup_steps, seed=seed), progress=False)
        runs.setdefault("scratch_transformer", []).append(score(*pooled(tune_individuals(
            scratch, data, replace(individual, seed=seed, unlearning=False), progress=False)), data))
        stage_s[f"seed_{seed}"] = round(time.perf_counter() - t, 1)
        log(f"seed {seed}: " + ", ".join(f"{k} {v[-1]['prec_m']:.4f}" for k, v in runs.items()), start)

    for _ in args.seeds:   # per-user LightGBM varies from fit to fit (see scope.pituning.baselines): repeated
        lgb_scores, lgb_labels, modes = lightgbm_individual(data)
        runs.setdefault("lightgbm", []).append(score(lgb_scores, lgb_labels, data))
    fixed = {"lightgbm_pooled": score(lightgbm_pooled(data, test)[0], test.intent, data),
             "lightgbm_pooled_routine": score(lightgbm_pooled(data, test, routine=True)[0], test.intent, data),
             "most_frequent_per_slot": score(most_frequent_per_slot(data, test), test.intent, data),
             "population_teacher": score(predict(teacher, test), test.intent, data)}
    for name, row in fixed.items():
        runs[name] = [row] * len(args.seeds)   # deterministic given the data (measured): std 0
    log(f"baselines ({modes})", start)
    wall = time.perf_counter() - start

    device_figures = on_device_figures(export_dirs, data)
    methods = {name: {k: summarize([r[k] for r in rows]) for k in METRIC_KEYS} for name, rows in runs.items()}
    rare = {name: summarize([rare_mean(r) for r in runs[name]]) for name in VARIANTS}
    baselines = [n for n in methods if n not in VARIANTS and n != "population_teacher"]   # the teacher is a stage
    best_baseline = {k: max(baselines,
                            key=lambda n: methods[n][k]["mean"]) for k in ("prec_m", "rec_m")}
    pit = methods["pituning"]
    figures = {
        "data": args.data,
        "methods": methods,
        "rare_intents": [data.intents[i] for i in rarest_intents(data)],
        "rare_test_points": {data.intents[i]: int((test.intent == i).sum()) for i in rarest_intents(data)},
        "rare_recall": rare,
        "rare_recall_per_intent": {name: [r["rare_recall"] for r in runs[name]] for name in VARIANTS},
        "teacher_vs_lightgbm_population": {
            "teacher": {k: round(v, 4) for k, v in teacher_pop.items()},
            "lightgbm": {k: round(v, 4) for k, v in lgb_pop.items()},
            "lightgbm_routine": {k: round(v, 4) for k, v in lgb_pop_routine.items()},
            "teacher_beats_lightgbm_prec_m": teacher_pop["prec_m"] > lgb_pop["prec_m"],
            "held_out_points": len(held_out)},
        "unlearning_calibration": calibration,
        "unlearning_chosen": {"forget_eps": individual.forget_eps, "unlearn_lambda": individual.unlearn_lambda},
        **device_figures,
        "student_params": student_params,
        "teacher_params": teacher.num_parameters(),
        "teacher": f"{base.predictor.backbone.name}, first {base.predictor.backbone.blocks} blocks, "
                   f"{args.population_steps} steps, seed {args.teacher_seed}",
        "routine_prior": base.predictor.routine,
        "lightgbm_settings": modes,
        "data_summary": data.summary(),
        "wall_s": round(wall, 1), "stage_s": stage_s, "peak_rss_mb": round(peak_rss_mb(), 1),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "best_baseline": best_baseline,
        "targets": {
            **{f"pituning_{k}>=1.1x_{best_baseline[k]}_ci_disjoint":
               pit[k]["ci95"][0] > methods[best_baseline[k]][k]["ci95"][1] and
               pit[k]["mean"] >= 1.1 * methods[best_baseline[k]][k]["mean"] for k in ("prec_m", "rec_m")},
            "unlearning_raises_rare_recall": rare["pituning"]["mean"] > rare["no_unlearning"]["mean"],
            "student_eager_ms<=3": device_figures["student_ms_per_prediction"].get("eager", 1e9) <= 3.0,
            "student_onnx_ms<=1": device_figures["student_ms_per_prediction"].get("onnx", 1e9) <= 1.0,
            "onnx_int8_agreement>=0.99": (device_figures["onnx_top1_agreement"]["int8"] or 0) >= 0.99},
    }
    print(results_table({n: {k: m[k]["mean"] for k in METRIC_KEYS} for n, m in methods.items()}), file=sys.stderr)
    emit(result_name, figures)


if __name__ == "__main__":
    main()
