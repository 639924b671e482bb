"""PITuning's individual level (PITuning paper, section 3.3): forgotten intents (Eq. 8-10), bounded unlearning
against the frozen population model (Eq. 11), then per-user fine-tuning of a copy of the student."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from scope.pituning.data import IntentData, IntentSamples
from scope.pituning.export import export_student
from scope.pituning.losses import supervised_loss
from scope.pituning.model import IntentPredictor
from scope.pituning.train import _device, predict


def output_share(logits: Tensor, n_intents: int) -> Tensor:
    """The model's output distribution over intents: its mean predicted probability per intent.

    Decision: the paper's "output share" could also be read as the share of top-1 predictions;
    with a population model trained on a CPU budget, top-1 predictions cover only a few head
    intents, which put almost every intent of every user into the static forgotten set (Eq. 8)
    and made unlearning rewrite most of the student. The mean probability keeps intents the
    model does consider (>= eps) out of that set.
    """
    if not len(logits):
        return torch.zeros(n_intents)
    return logits.float().softmax(-1).mean(0)


def label_share(labels: Tensor, n_intents: int) -> Tensor:
    return torch.bincount(labels, minlength=n_intents).float() / max(1, len(labels))


def forgotten_intents(population_share: Tensor, individual_share: Tensor, eps: float = 0.01
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 8-10: the intents whose population knowledge the user's student should unlearn.

    static  (Eq. 8):  the population model (almost) never outputs it on the user's data,
                      ``s_pop(k) < eps`` (and the user has it);
    dynamic (Eq. 9):  the population model under-predicts what the user does often,
                      ``s_pop(k) < 1/N_I  and  s_ind(k) > 1/N_I``;
    forgotten (Eq. 10) = static | dynamic. Shares: ``s_pop`` = the population model's mean output
    probability on the user's training samples (:func:`output_share`); ``s_ind`` = the user's label
    share there.
    """
    n = len(population_share)
    static = (population_share < eps) & (individual_share > 0)
    dynamic = (population_share < 1.0 / n) & (individual_share > 1.0 / n)
    return static, dynamic, static | dynamic


def unlearning_loss(student_logits: Tensor, teacher_probs: Tensor, forgotten: Tensor, lam: float = 1.0,
                    bound: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """Eq. 11: ``lambda * CE(retained) - CE(forgotten)``, CE against the frozen population teacher.

    ``forgotten`` [B] marks samples whose label is a forgotten intent: there the student moves away
    from the teacher's (population-biased) prediction; elsewhere it keeps agreeing with it.

    Decision (boundedness): ``-CE`` is unbounded below (the student can put zero mass on the
    teacher's choice). Each forgotten sample's CE is clamped at ``bound`` (default ``log N_I``, the
    CE of a uniform prediction): once the student is no more confident in the teacher's answer
    than chance, that sample's forgetting gradient is zero, so the loss lies in
    ``[-bound, +inf)`` and cannot diverge.
    """
    bound = math.log(student_logits.shape[-1]) if bound is None else bound
    ce = -(teacher_probs * F.log_softmax(student_logits, -1)).sum(-1)
    retained = ce[~forgotten].mean() if (~forgotten).any() else ce.sum() * 0.0
    forget = ce[forgotten].clamp(max=bound).mean() if forgotten.any() else ce.sum() * 0.0
    return lam * retained - forget, {"retained_ce": retained.item(), "forgotten_ce": forget.item()}


@dataclass
class IndividualConfig:
    unlearning: bool = True
    forget_eps: float = 0.01          # Eq. 8 threshold on the population output share
    unlearn_lambda: float = 1.0       # Eq. 11 lambda
    unlearn_steps: int = 10
    unlearn_lr: float = 3e-4
    forget_bound: float | None = None  # clamp of each forgotten CE (None: log N_I)
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    loss: str = "ce"                  # ce | focal (ablation)
    focal_gamma: float = 2.0
    oversample: bool = False          # class-balanced sampling (ablation)
    seed: int = 0

    def __post_init__(self):
        if self.batch_size < 1 or self.epochs < 0 or self.unlearn_steps < 0:
            raise ValueError(f"batch_size must be >= 1, epochs and unlearn_steps >= 0; got {self.batch_size}, "
                             f"{self.epochs} and {self.unlearn_steps}")
        if self.loss not in ("ce", "focal"):
            raise ValueError(f"loss must be 'ce' or 'focal', got {self.loss!r}")


def _batches(n: int, batch_size: int, generator: torch.Generator, weights: Tensor | None = None):
    order = torch.multinomial(weights, n, replacement=True, generator=generator) if weights is not None else \
        torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def unlearn(student: IntentPredictor, train: IntentSamples, teacher_logits: Tensor, forgotten_set: Tensor,
            cfg: IndividualConfig) -> list[dict[str, float]]:
    """Bounded Eq. 11 on one user's training samples; stops early once every forgotten CE is clamped."""
    forgotten = forgotten_set[train.intent]
    if not forgotten.any():
        return []
    teacher_probs = teacher_logits.softmax(-1)
    bound = math.log(student.n_intents) if cfg.forget_bound is None else cfg.forget_bound
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.unlearn_lr, weight_decay=0.0)
    device = _device(student)
    generator = torch.Generator().manual_seed(cfg.seed)
    logs = []
    student.train()
    for _ in range(cfg.unlearn_steps):
        # a random batch (mostly retained samples) plus up to a batch of forgotten ones
        rows = torch.randint(len(train), (min(cfg.batch_size, len(train)),), generator=generator)
        chosen = torch.nonzero(forgotten).squeeze(1)
        chosen = chosen[torch.randperm(len(chosen), generator=generator)[: cfg.batch_size]]
        rows = torch.cat([rows, chosen])
        loss, scalars = unlearning_loss(student(train[rows].inputs(device)), teacher_probs[rows].to(device),
                                        forgotten[rows].to(device), cfg.unlearn_lambda, bound)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        logs.append({"loss": loss.item(), **scalars})
        if scalars["forgotten_ce"] >= bound - 1e-6:
            break
    student.eval()
    return logs


def finetune(student: IntentPredictor, train: IntentSamples, val: IntentSamples, cfg: IndividualConfig
             ) -> list[dict[str, float]]:
    """Per-user fine-tuning (CE, or the focal / oversampling ablations); keeps the best epoch on ``val``."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    device = _device(student)
    generator = torch.Generator().manual_seed(cfg.seed)
    weights = None
    if cfg.oversample:
        counts = torch.bincount(train.intent, minlength=student.n_intents).float()
        weights = (1.0 / counts.clamp(min=1))[train.intent]
    objective = supervised_loss(cfg.loss, cfg.focal_gamma)

    def val_loss() -> float:
        return F.cross_entropy(predict(student, val), val.intent).item() if len(val) else 0.0

    best, best_state, logs = val_loss(), copy.deepcopy(student.state_dict()), []
    for epoch in range(cfg.epochs):
        student.train()
        for rows in _batches(len(train), cfg.batch_size, generator, weights):
            loss, _ = objective(student, train[rows].to(device), generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
        current = val_loss()
        logs.append({"epoch": epoch + 1, "val_ce": current})
        if current < best:
            best, best_state = current, copy.deepcopy(student.state_dict())
    student.load_state_dict(best_state)
    student.eval()
    return logs


@dataclass
class UserResult:
    user_id: int
    logits: Tensor                    # test logits [n_test, N_I]
    labels: Tensor
    val_logits: Tensor                # validation logits [n_val, N_I] (calibration)
    val_labels: Tensor
    forgotten: list[str]
    static: list[str]
    dynamic: list[str]
    unlearn_steps: int
    path: str | None = None


def tune_individual(user_id: int, student: IntentPredictor, population_logits: Tensor, data: IntentData,
                    cfg: IndividualConfig, export_dir: str | Path | None = None) -> UserResult:
    """Unlearning (optional) then fine-tuning of a copy of the population student for one user.

    ``population_logits``: the frozen population model's logits on the user's training samples.
    """
    train, val, test = (data.individual[s].of_user(user_id) for s in ("train", "val", "test"))
    model = copy.deepcopy(student)
    pop_share = output_share(population_logits, data.n_intents)
    ind_share = label_share(train.intent, data.n_intents)
    static, dynamic, forgotten = forgotten_intents(pop_share, ind_share, cfg.forget_eps)
    steps = len(unlearn(model, train, population_logits, forgotten, cfg)) if cfg.unlearning else 0
    finetune(model, train, val, cfg)
    path = None
    if export_dir is not None:
        path = str(Path(export_dir) / f"user-{user_id}" / "student.safetensors")
        export_student(model, path, {"user_id": user_id, "forgotten": _names(forgotten, data.intents)})
    names = lambda m: _names(m, data.intents)  # noqa: E731
    return UserResult(user_id, predict(model, test), test.intent, predict(model, val), val.intent, names(forgotten),
                      names(static), names(dynamic), steps, path)


def _names(mask: Tensor, intents: list[str]) -> list[str]:
    return [intents[i] for i in torch.nonzero(mask).flatten().tolist()]


def tune_individuals(student: IntentPredictor, data: IntentData, cfg: IndividualConfig,
                     population: IntentPredictor | None = None, export_dir: str | Path | None = None,
                     progress: bool = True) -> list[UserResult]:
    """Every individual user, one after the other (on a phone, each would run on its own device).

    Decision: the frozen population teacher of Eq. 8 and Eq. 11 is, by default, the frozen
    distilled population student itself: on the device only the distilled model exists, and the
    large population model never leaves the server. Pass ``population`` to use another one.
    """
    train = data.individual["train"]
    population_logits = predict(population if population is not None else student, train)
    results = []
    for user_id in tqdm(data.individual_users, desc="individual tuning", unit="user", disable=not progress):
        rows = train.user == user_id
        torch.manual_seed(cfg.seed + user_id)
        results.append(tune_individual(user_id, student, population_logits[rows], data, cfg, export_dir))
    return results


def calibrate_unlearning(student: IntentPredictor, data: IntentData, cfg: IndividualConfig, eps_grid: list[float],
                         lambda_grid: list[float], metric=None) -> tuple[IndividualConfig, list[dict]]:
    """The forgetting threshold ``eps`` (Eq. 8) and ``lambda`` (Eq. 11) chosen on the individual users'
    *validation* points: each pair tunes every user, ``metric(logits, labels)`` (default: the mean of
    macro precision and recall, the long-tail measures) scores the pooled validation predictions;
    returns ``cfg`` with the best pair and one row per pair."""
    from scope.pituning.evaluate import precision_recall
    if metric is None:
        def metric(logits: Tensor, labels: Tensor) -> float:
            m = precision_recall(labels, logits.argmax(1))
            return (m["prec_m"] + m["rec_m"]) / 2
    rows = []
    for eps in eps_grid:
        for lam in lambda_grid:
            trial = replace(cfg, unlearning=True, forget_eps=eps, unlearn_lambda=lam)
            results = tune_individuals(student, data, trial, progress=False)
            value = metric(torch.cat([r.val_logits for r in results]), torch.cat([r.val_labels for r in results]))
            rows.append({"forget_eps": eps, "unlearn_lambda": lam, "val_score": round(value, 4)})
    best = max(rows, key=lambda r: r["val_score"])
    return replace(cfg, forget_eps=best["forget_eps"], unlearn_lambda=best["unlearn_lambda"]), rows
