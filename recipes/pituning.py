"""PITuning end to end: population tuning -> distillation -> unlearning -> individual tuning -> evaluation.

    accelerate launch recipes/pituning.py                      # the CPU default (recipes/configs/pituning_cpu.yaml)
    python recipes/pituning.py --config recipes/configs/pituning_gpt2_gpu.yaml   # paper scale, one GPU

Every stage writes its artifact atomically under ``run_dir`` and is skipped when that artifact
exists (population/model.safetensors, student/model.safetensors); inside a stage, training resumes
from its checkpoint. TensorBoard logs go to ``run_dir/tb``. Outputs: ``report.json`` (metrics of
every model, forgotten sets, student size and CPU latency), ``results.md`` and one exported
student per individual user (``users/user-<id>/student.safetensors``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from trl import TrlParser

from completion.metrics import intent_metrics, recall_per_class
from scope.pituning.data import (INTENT_TRACE_FILE, IntentCohortConfig, IntentData, IntentSamples, SampleConfig,
                           build_samples, load_intent_cohort, simulate_intent_cohort)
from scope.io import write_json, write_text
from scope.pituning.model import (BackboneConfig, IndividualConfig, IntentPredictor, PredictorConfig, StageConfig,
                            UserResult, cpu_latency_ms, distill_loss, export_student, fit, load_weights,
                            population_loss, predict, student_config, tune_individuals, with_teacher_logits)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "recipes" / "configs" / "pituning_cpu.yaml"
METRIC_KEYS = ("prec_w", "rec_w", "prec_m", "rec_m", "ndcg3", "ndcg5")


@dataclass
class PITuningArguments:
    run_dir: str = "runs/pituning"
    cohort_dir: str | None = None          # an intent-format directory; None: simulate into run_dir/cohort
    # simulated cohort (when cohort_dir is None)
    n_users: int = 120
    days: int = 21
    sessions_per_day: float = 36.0
    individual_fraction: float = 0.15
    seed: int = 0
    # samples
    history: int = 30
    slot_minutes: int = 60
    location_clusters: int = 6
    train_fraction: float = 0.6
    val_fraction: float = 0.2
    max_individual_users: int | None = None
    # population model: pretrained LM blocks + embeddings + IAT + head
    lm: str = "smollm2-135m-instruct"
    lm_blocks: int | None = 2
    lm_gguf_file: str | None = None
    local_files_only: bool = False
    lm_hidden: int = 64                    # only for lm = random:<type> / compact
    lm_layers: int = 2
    lm_heads: int = 2
    lm_intermediate: int = 128
    embed_dim: int = 64
    attention_dim: int = 128
    head_hidden: int = 256
    dropout: float = 0.1
    population_steps: int = 200
    population_batch_size: int = 32
    population_lr: float = 1e-3
    lm_lr: float = 1e-4
    mask_ratio: float = 0.15
    mask_weight: float = 0.5
    # distillation (Eq. 6-7)
    student_family: str = "compact"
    student_layers: int = 4
    student_hidden: int = 128
    student_heads: int = 4
    student_intermediate: int = 256
    distill_steps: int = 200
    distill_batch_size: int = 32
    distill_lr: float = 1e-3
    distill_samples: int | None = 2000     # score this many population samples once (None: logits on the fly)
    alpha: float = 0.5
    temperature: float = 1.0
    # individual level (Eq. 8-11, then fine-tuning)
    unlearning: bool = True
    forget_eps: float = 0.01
    unlearn_lambda: float = 1.0
    unlearn_steps: int = 10
    unlearn_lr: float = 3e-4
    forget_bound: float | None = None
    individual_epochs: int = 4
    individual_batch_size: int = 32
    individual_lr: float = 5e-4
    individual_loss: str = "ce"
    oversample: bool = False
    # run
    warmup_steps: int = 20
    checkpoint_every: int = 100
    eval_every: int = 100
    threads: int | None = None
    device: str = "auto"                   # auto | cpu | cuda
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self):
        if self.individual_loss not in ("ce", "focal"):
            raise ValueError(f"individual_loss must be 'ce' or 'focal', got {self.individual_loss!r}")


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------

def prepare_data(args: PITuningArguments) -> IntentData:
    """Simulate (unless ``cohort_dir`` is given), read back through the validating reader, featurize."""
    cohort_dir = Path(args.cohort_dir) if args.cohort_dir else Path(args.run_dir) / "cohort"
    if args.cohort_dir is None and not (cohort_dir / INTENT_TRACE_FILE).exists():
        simulate_intent_cohort(IntentCohortConfig(n_users=args.n_users, days=args.days, seed=args.seed,
                                                  sessions_per_day=args.sessions_per_day,
                                                  individual_fraction=args.individual_fraction),
                               cohort_dir, progress=args.progress)
    cohort = load_intent_cohort(cohort_dir)
    data = build_samples(cohort, SampleConfig(
        history=args.history, slot_minutes=args.slot_minutes, location_clusters=args.location_clusters,
        individual_fraction=args.individual_fraction, train_fraction=args.train_fraction,
        val_fraction=args.val_fraction, seed=args.seed))
    if args.max_individual_users is not None:   # evaluate the first k individual users only
        data.individual_users = data.individual_users[: args.max_individual_users]
        keep = torch.tensor(data.individual_users)
        data.individual = {k: v[torch.isin(v.user, keep)] for k, v in data.individual.items()}
    return data


def _device(args: PITuningArguments) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def _stage(args: PITuningArguments, steps: int, batch_size: int, lr: float) -> StageConfig:
    return StageConfig(steps=steps, batch_size=batch_size, lr=lr, lm_lr=args.lm_lr, warmup_steps=args.warmup_steps,
                       checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, seed=args.seed)


def _logger(writer, prefix: str):
    if writer is None:
        return None
    return lambda step, scalars: [writer.add_scalar(f"{prefix}/{k}", v, step) for k, v in scalars.items()]


def _val_accuracy(samples, n: int = 300):
    val = samples[:n]
    return lambda model: {"val_acc": (predict(model, val).argmax(1) == val.intent).float().mean().item()}


def population_model(args: PITuningArguments, data: IntentData, writer=None) -> IntentPredictor:
    """Population-level tuning of the LM blocks + embeddings + IAT + head (Eq. 1-5)."""
    cfg = PredictorConfig(backbone=BackboneConfig(name=args.lm, blocks=args.lm_blocks, gguf_file=args.lm_gguf_file,
                                                  local_files_only=args.local_files_only, hidden=args.lm_hidden,
                                                  layers=args.lm_layers, heads=args.lm_heads,
                                                  intermediate=args.lm_intermediate),
                          embed_dim=args.embed_dim, attention_dim=args.attention_dim, head_hidden=args.head_hidden,
                          dropout=args.dropout)
    torch.manual_seed(args.seed)
    model = IntentPredictor(cfg, data.vocab_sizes(), data.n_intents).to(_device(args))
    out = Path(args.run_dir) / "population"
    if (out / "model.safetensors").exists():
        return load_weights(out / "model.safetensors", model)
    pretrained = not (args.lm.startswith("random:") or args.lm == "compact")
    fit(model, population_loss(args.mask_ratio, args.mask_weight), data.population_train,
        _stage(args, args.population_steps, args.population_batch_size, args.population_lr), pretrained=pretrained,
        checkpoint=out / "checkpoint.safetensors", desc="population tuning", progress=args.progress,
        log=_logger(writer, "population"), evaluate=_val_accuracy(data.population_val))
    export_student(model, out / "model.safetensors", {"stage": "population"})
    return model.eval()


def distilled_student(args: PITuningArguments, data: IntentData, teacher: IntentPredictor, writer=None,
                      name: str = "student") -> IntentPredictor:
    """Eq. 6-7: a 4-layer student distilled from the frozen population model."""
    torch.manual_seed(args.seed + 1)
    cfg = student_config(teacher, args.student_layers, args.student_hidden, args.student_heads,
                         args.student_intermediate, args.student_family)
    student = IntentPredictor(cfg, data.vocab_sizes(), data.n_intents).to(_device(args))
    out = Path(args.run_dir) / name
    if (out / "model.safetensors").exists():
        return load_weights(out / "model.safetensors", student)
    distill_set = data.population_train
    if args.distill_samples is not None:
        distill_set = with_teacher_logits(teacher, distill_set, args.distill_samples, args.seed)
    fit(student, distill_loss(teacher, args.alpha, args.temperature), distill_set,
        _stage(args, args.distill_steps, args.distill_batch_size, args.distill_lr),
        checkpoint=out / "checkpoint.safetensors", desc="distillation", progress=args.progress,
        log=_logger(writer, "distillation"), evaluate=_val_accuracy(data.population_val))
    export_student(student, out / "model.safetensors", {"stage": "distillation"})
    return student.eval()


def individual_config(args: PITuningArguments, **overrides) -> IndividualConfig:
    cfg = IndividualConfig(unlearning=args.unlearning, forget_eps=args.forget_eps, unlearn_lambda=args.unlearn_lambda,
                           unlearn_steps=args.unlearn_steps, unlearn_lr=args.unlearn_lr, forget_bound=args.forget_bound,
                           epochs=args.individual_epochs, batch_size=args.individual_batch_size, lr=args.individual_lr,
                           loss=args.individual_loss, oversample=args.oversample, seed=args.seed)
    return IndividualConfig(**{**asdict(cfg), **overrides})


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

def rarest_intents(data: IntentData, k: int = 3) -> list[int]:
    """The ``k`` intents with the fewest population training samples (paper Fig. 8's long tail)."""
    return np.argsort(data.population_intent_counts(), kind="stable")[:k].tolist()


def score(scores: torch.Tensor, labels: torch.Tensor, data: IntentData) -> dict:
    """Table-2 metrics plus the recall of the three rarest population intents."""
    out = {k: round(v, 4) for k, v in intent_metrics(scores, labels).items()}
    recall = recall_per_class(labels, scores.argmax(1), data.n_intents)
    out["rare_recall"] = {data.intents[i]: (None if np.isnan(recall[i].item()) else round(recall[i].item(), 4))
                          for i in rarest_intents(data)}
    return out


def pooled(results: list[UserResult]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([r.logits for r in results]), torch.cat([r.labels for r in results])


def individual_test(data: IntentData) -> IntentSamples:
    """The pooled test points of the evaluated individual users."""
    test = data.individual["test"]
    return test[torch.isin(test.user, torch.tensor(data.individual_users))]


def results_table(rows: dict[str, dict]) -> str:
    lines = ["| method | " + " | ".join(METRIC_KEYS) + " |", "|---" * (len(METRIC_KEYS) + 1) + "|"]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in METRIC_KEYS) + " |")
    return "\n".join(lines)


def main(args: PITuningArguments) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    writer = None
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run / "tb"))
    timings, start = {}, time.perf_counter()
    data = prepare_data(args)
    write_json(run / "data_summary.json", data.summary())
    timings["data_s"] = time.perf_counter() - start

    t = time.perf_counter()
    teacher = population_model(args, data, writer)
    timings["population_s"] = time.perf_counter() - t
    t = time.perf_counter()
    student = distilled_student(args, data, teacher, writer)
    timings["distillation_s"] = time.perf_counter() - t
    t = time.perf_counter()
    results = tune_individuals(student, data, individual_config(args), export_dir=run / "users", progress=args.progress)
    timings["individual_s"] = time.perf_counter() - t

    test = individual_test(data)
    rows = {"population model (no individual tuning)": score(predict(teacher, test), test.intent, data),
            "distilled student (no individual tuning)": score(predict(student, test), test.intent, data),
            "PITuning" if args.unlearning else "PITuning w/o unlearning": score(*pooled(results), data)}
    cpu_student = student.cpu()
    sizes = [Path(r.path).stat().st_size for r in results if r.path]
    report = {
        "config": asdict(args), "data": data.summary(), "metrics": rows,
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


def parse(argv: list[str] | None = None) -> PITuningArguments:
    """Parse the command line; without ``--config`` the CPU default config is used."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    (args,) = TrlParser((PITuningArguments,)).parse_args_and_config(argv)
    return args


if __name__ == "__main__":
    main(parse())
