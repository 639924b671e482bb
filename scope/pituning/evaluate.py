"""Scoring of intent predictions (PITuning paper, section 4.1 and Table 2): weighted and macro
precision / recall of the top-1 intent, NDCG@k of the ranking, and the recall of the rarest
population intents (the long tail of Fig. 8)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from scope.metrics import ranking_metrics
from scope.pituning.data import IntentData, IntentSamples
from scope.pituning.individual import UserResult

METRIC_KEYS = ("prec_w", "rec_w", "prec_m", "rec_m", "ndcg3", "ndcg5")


def precision_recall(labels: Tensor, predictions: Tensor) -> dict[str, float]:
    """Weighted and macro precision / recall of single-label predictions, as scikit-learn computes them.

    Classes are those present in `labels` or `predictions` (scikit-learn's default); a class never
    predicted has precision 0; weighted averages weight each class by its support in `labels`.
    """
    classes, inverse = torch.unique(torch.cat([labels, predictions]), return_inverse=True)
    y, p = inverse[: len(labels)], inverse[len(labels):]
    n = len(classes)
    tp = torch.bincount(y[y == p], minlength=n).double()
    support = torch.bincount(y, minlength=n).double()
    predicted = torch.bincount(p, minlength=n).double()
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), 0.0)
    recall = torch.where(support > 0, tp / support.clamp(min=1), 0.0)
    weights = support / support.sum()
    return {"prec_w": (precision * weights).sum().item(), "rec_w": (recall * weights).sum().item(),
            "prec_m": precision.mean().item(), "rec_m": recall.mean().item()}


def recall_per_class(labels: Tensor, predictions: Tensor, n_classes: int) -> Tensor:
    """Recall of each class 0..n_classes-1 (NaN where the class has no true sample)."""
    tp = torch.bincount(labels[labels == predictions], minlength=n_classes).double()
    support = torch.bincount(labels, minlength=n_classes).double()
    return tp / support


def intent_metrics(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (3, 5)) -> dict[str, float]:
    """prec_w, rec_w, prec_m, rec_m of the top-1 intent and NDCG@k of the ranking (one relevant intent).

    scores: [N, N_I] (higher ranks first); labels: [N] intent ids.
    """
    out = precision_recall(labels, scores.argmax(1))
    relevant = torch.zeros_like(scores, dtype=torch.bool)
    relevant[torch.arange(len(labels)), labels] = True
    ranking = ranking_metrics(scores.double(), relevant, ks)
    return out | {f"ndcg{k}": ranking[f"ndcg@{k}"] for k in ks}


def rarest_intents(data: IntentData, k: int = 3) -> list[int]:
    """The ``k`` intents with the fewest population training samples among those the evaluated individual
    users' test points contain (paper Fig. 8's long tail; recall is undefined for the others)."""
    present = set(individual_test(data).intent.unique().tolist())
    order = np.argsort(data.population_intent_counts(), kind="stable")
    return [int(i) for i in order if int(i) in present][:k]


def score(scores: torch.Tensor, labels: torch.Tensor, data: IntentData) -> dict:
    """Table-2 metrics plus the recall of the three rarest population intents."""
    out = {k: round(v, 4) for k, v in intent_metrics(scores, labels).items()}
    recall = recall_per_class(labels, scores.argmax(1), data.n_intents)
    out["rare_recall"] = {data.intents[i]: (None if np.isnan(recall[i].item()) else round(recall[i].item(), 4))
                          for i in rarest_intents(data)}
    return out


def pooled(results: list[UserResult]) -> tuple[torch.Tensor, torch.Tensor]:
    """The individual users' test logits and labels, concatenated."""
    return torch.cat([r.logits for r in results]), torch.cat([r.labels for r in results])


def individual_test(data: IntentData) -> IntentSamples:
    """The pooled test points of the evaluated individual users."""
    test = data.individual["test"]
    return test[torch.isin(test.user, torch.tensor(data.individual_users))]


def results_table(rows: dict[str, dict]) -> str:
    """A markdown table of :data:`METRIC_KEYS` per method."""
    lines = ["| method | " + " | ".join(METRIC_KEYS) + " |", "|---" * (len(METRIC_KEYS) + 1) + "|"]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in METRIC_KEYS) + " |")
    return "\n".join(lines)
