"""PITuning's stages as library functions (paper section 3, Fig. 2): read (or simulate) the data,
tune the population model (Eq. 1-5), distil it into the on-device student (Eq. 6-7). The
individual level is :func:`scope.pituning.individual.tune_individuals`. Each stage writes its
model atomically under its output folder and returns the saved one when it exists; inside a
stage, training resumes from its checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from scope.data.simulate import CohortConfig, simulate_cohort
from scope.data.tsinghua import TRACE_FILE
from scope.pituning.data import INTENT_TRACE_FILE, IntentData, SampleConfig, build_samples, load_intent_cohort
from scope.pituning.derive import DeriveConfig, load_derived_cohort
from scope.pituning.export import export_student, load_weights
from scope.pituning.losses import distill_loss, population_loss
from scope.pituning.model import IntentPredictor, PredictorConfig, StudentConfig, student_config
from scope.pituning.simulate import IntentCohortConfig, simulate_intent_cohort
from scope.pituning.train import StageConfig, fit, predict, with_teacher_logits


@dataclass
class PopulationConfig(StageConfig):
    """Population-level tuning: the optimisation stage plus the Eq. 5 reconstruction objective."""

    event_mask_ratio: float = 0.15    # share of history events replaced by [MASK] (Eq. 5)
    mask_weight: float = 0.5          # mu of L = CE + mu * L_rec


@dataclass
class DistillationConfig(StageConfig):
    """Distillation into the student (Eq. 6-7)."""

    student: StudentConfig = field(default_factory=StudentConfig)   # the student's shape
    samples: int | None = 2000        # score this many population samples once (None: teacher logits on the fly)
    alpha: float = 0.5
    temperature: float = 1.0


DATA_SOURCES = ("tsinghua", "intents")


def prepare_data(source: str, cohort_dir: str | Path | None, output_dir: str | Path,
                 simulation: CohortConfig | IntentCohortConfig, derive: DeriveConfig, samples: SampleConfig,
                 max_individual_users: int | None = None, progress: bool = True) -> IntentData:
    """Read ``cohort_dir`` and featurize; keep the first ``max_individual_users`` individual users.

    ``source``: ``tsinghua`` (a Tsinghua-format cohort, intents derived by
    :mod:`scope.pituning.derive`; the default) or ``intents`` (an intent-format directory of
    :mod:`scope.pituning.data`); ``derive.lenient`` skips and counts bad input of either. Without ``cohort_dir``, ``simulation`` (``CohortConfig`` /
    ``IntentCohortConfig``) is simulated once into ``output_dir/cohort``.
    """
    if source not in DATA_SOURCES:
        raise ValueError(f"data must be one of {DATA_SOURCES}, got {source!r}")
    directory = Path(cohort_dir) if cohort_dir else Path(output_dir) / "cohort"
    if source == "tsinghua":
        if cohort_dir is None and not (directory / TRACE_FILE).exists():
            simulate_cohort(simulation, directory, progress=progress)
        cohort = load_derived_cohort(directory, derive, progress)
    else:
        if cohort_dir is None and not (directory / INTENT_TRACE_FILE).exists():
            simulate_intent_cohort(simulation, directory, progress=progress)
        cohort = load_intent_cohort(directory, derive.lenient)
    data = build_samples(cohort, samples, progress=progress)
    if max_individual_users is not None:   # evaluate the first k individual users only
        data.individual_users = data.individual_users[:max_individual_users]
        keep = torch.tensor(data.individual_users)
        data.individual = {k: v[torch.isin(v.user, keep)] for k, v in data.individual.items()}
    return data


def _logger(writer, prefix: str):
    if writer is None:
        return None
    return lambda step, scalars: [writer.add_scalar(f"{prefix}/{k}", v, step) for k, v in scalars.items()]


def _val_accuracy(samples, n: int = 300):
    val = samples[:n]
    return lambda model: {"val_acc": (predict(model, val).argmax(1) == val.intent).float().mean().item()}


def population_model(data: IntentData, predictor: PredictorConfig, cfg: PopulationConfig, output_dir: str | Path,
                     device: torch.device, writer=None, progress: bool = True) -> IntentPredictor:
    """Population-level tuning of the LM blocks + embeddings + IAT + head (Eq. 1-5), saved to
    ``output_dir/model.safetensors``."""
    torch.manual_seed(cfg.seed)
    model = IntentPredictor(predictor, data.vocab_sizes(), data.n_intents).to(device)
    out = Path(output_dir)
    if (out / "model.safetensors").exists():
        return load_weights(out / "model.safetensors", model)
    name = predictor.backbone.name
    pretrained = not (name.startswith("random:") or name == "compact")
    fit(model, population_loss(cfg.event_mask_ratio, cfg.mask_weight), data.population_train, cfg,
        pretrained=pretrained, checkpoint=out / "checkpoint.safetensors", desc="population tuning", progress=progress,
        log=_logger(writer, "population"), evaluate=_val_accuracy(data.population_val))
    export_student(model, out / "model.safetensors", {"stage": "population"})
    return model.eval()


def distilled_student(data: IntentData, teacher: IntentPredictor, cfg: DistillationConfig, output_dir: str | Path,
                      device: torch.device, writer=None, progress: bool = True) -> IntentPredictor:
    """Eq. 6-7: a student of ``cfg.student``'s shape distilled from the frozen population model,
    saved to ``output_dir/model.safetensors``."""
    torch.manual_seed(cfg.seed + 1)
    student = IntentPredictor(student_config(teacher, **asdict(cfg.student)), data.vocab_sizes(),
                              data.n_intents).to(device)
    out = Path(output_dir)
    if (out / "model.safetensors").exists():
        return load_weights(out / "model.safetensors", student)
    distill_set = data.population_train
    if cfg.samples is not None:
        distill_set = with_teacher_logits(teacher, distill_set, cfg.samples, cfg.seed)
    fit(student, distill_loss(teacher, cfg.alpha, cfg.temperature), distill_set, cfg,
        checkpoint=out / "checkpoint.safetensors", desc="distillation", progress=progress,
        log=_logger(writer, "distillation"), evaluate=_val_accuracy(data.population_val))
    export_student(student, out / "model.safetensors", {"stage": "distillation"})
    return student.eval()
