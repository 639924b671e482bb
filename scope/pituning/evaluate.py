"""Scoring of intent predictions (PITuning paper, section 4.1 and Table 2): weighted and macro
precision / recall of the top-1 intent, NDCG@k of the ranking, and the recall of the rarest
population intents (the long tail of Fig. 8)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from scope.metrics import bootstrap_weights, ranking_metrics
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


def user_class_counts(scores: Tensor, labels: Tensor, users: Tensor, n_classes: int) -> dict[str, dict[str, list[int]]]:
    """Per user id: true positives, top-1 predictions and support of every intent, from which any
    resample of the users recomputes the pooled macro precision (:func:`macro_precision_difference`)."""
    predictions = scores.argmax(1)
    out = {}
    for user in users.unique().tolist():
        y, p = labels[users == user], predictions[users == user]
        out[str(user)] = {"tp": torch.bincount(y[y == p], minlength=n_classes).tolist(),
                          "predicted": torch.bincount(p, minlength=n_classes).tolist(),
                          "support": torch.bincount(y, minlength=n_classes).tolist()}
    return out


def macro_precision_difference(a: dict, b: dict, n_boot: int = 2000, seed: int = 0) -> dict:
    """``prec_m`` of ``a`` minus that of ``b`` (:func:`user_class_counts` of two methods) on the users
    both scored, with a percentile bootstrap 95% CI that resamples users with all their test points."""
    users = sorted(set(a) & set(b))
    if not users:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "users": 0}
    weights = bootstrap_weights(len(users), n_boot, seed)

    def prec_m(counts: dict) -> np.ndarray:
        tp, predicted, support = (weights @ np.array([counts[u][k] for u in users], float)
                                  for k in ("tp", "predicted", "support"))
        present = (predicted + support) > 0     # scikit-learn's classes: in the labels or the predictions
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        return (precision * present).sum(1) / present.sum(1)

    diff = prec_m(a) - prec_m(b)
    lo, hi = np.quantile(diff[1:], [0.025, 0.975])
    return {"mean": float(diff[0]), "ci95": [float(lo), float(hi)], "users": len(users)}


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
