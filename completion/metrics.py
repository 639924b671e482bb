"""Every metric of the completion benchmark, computed on target entries only.

Point errors (RMSE, MAE) are per channel and pooled over all target entries of the batch; the
probabilistic scores (CRPS, interval coverage) read the samples of the sampler; ranking scores
(Recall, NDCG, MRR at k) serve cold-start recommendation. `completion_report` gathers the point
and probabilistic scores in normalised and, through the loader's inverse transform, original
units.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _per_channel_mean(values: Tensor, target: Tensor) -> Tensor:
    """Mean of `values` [B, C, ...] over target entries, per channel -> [C] (NaN where none)."""
    dims = [0] + list(range(2, values.dim()))
    w = target.to(values.dtype)
    return (values * w).sum(dims) / w.sum(dims)


def rmse_mae(pred: Tensor, truth: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """RMSE and MAE per channel over target entries; all inputs [B, C, T, H, W]."""
    err = pred - truth
    return _per_channel_mean(err**2, target).sqrt(), _per_channel_mean(err.abs(), target)


def crps(samples: Tensor, truth: Tensor, target: Tensor) -> Tensor:
    """Sample CRPS per channel: E|X - y| - E|X - X'| / 2, samples [S, B, C, T, H, W].

    The pairwise term uses sorted samples: sum_ij |x_i - x_j| = 2 sum_i (2i - S + 1) x_(i).
    """
    S = samples.shape[0]
    spread = (samples - truth).abs().mean(0)
    ordered = samples.sort(dim=0).values
    i = torch.arange(S, dtype=samples.dtype, device=samples.device)
    weight = (2 * i - S + 1).reshape(S, *([1] * (samples.dim() - 1)))
    pairwise = 2 * (weight * ordered).sum(0) / S**2
    return _per_channel_mean(spread - pairwise / 2, target)


def prediction_interval(samples: Tensor, level: float = 0.9) -> tuple[Tensor, Tensor]:
    """Central interval of the sample distribution: quantiles (1 - level)/2 and (1 + level)/2."""
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=samples.dtype, device=samples.device)
    lo, hi = torch.quantile(samples, q, dim=0)
    return lo, hi


def coverage(samples: Tensor, truth: Tensor, target: Tensor, level: float = 0.9) -> Tensor:
    """Share of target entries inside the central `level` prediction interval, per channel."""
    lo, hi = prediction_interval(samples, level)
    inside = ((truth >= lo) & (truth <= hi)).to(samples.dtype)
    return _per_channel_mean(inside, target)


def completion_report(samples: Tensor, truth: Tensor, target: Tensor,
                      inverse: Callable[[Tensor], Tensor] | None = None,
                      level: float = 0.9, point: Tensor | None = None) -> dict[str, list[float]]:
    """RMSE/MAE of the point prediction, CRPS and interval coverage, per channel.

    The point prediction is `point` (default: the sample mean) in normalised units; `_orig` keys
    score that same prediction after `inverse` (original units), and the CRPS of the
    inverse-transformed samples. Taking the point before the inverse keeps a few heavy-tailed
    samples of a log-scaled channel from dominating it. Coverage does not depend on the units
    (monotone inverse).
    """
    pred = samples.mean(0) if point is None else point
    rmse, mae = rmse_mae(pred, truth, target)
    report = {"rmse": rmse.tolist(), "mae": mae.tolist(), "crps": crps(samples, truth, target).tolist()}
    if inverse is not None:
        rmse, mae = rmse_mae(inverse(pred), inverse(truth), target)
        report |= {"rmse_orig": rmse.tolist(), "mae_orig": mae.tolist(),
                   "crps_orig": crps(inverse(samples), inverse(truth), target).tolist()}
    report[f"coverage{round(level * 100)}"] = coverage(samples, truth, target, level).tolist()
    return report


def ranking_metrics(scores: Tensor, relevant: Tensor, ks: tuple[int, ...] = (1, 3, 5)
                    ) -> dict[str, float]:
    """Recall@k, NDCG@k and MRR@k (binary relevance), averaged over rows with a relevant item.

    scores: float [B, I], higher ranks first; relevant: bool [B, I].
    """
    rows = relevant.any(1)
    scores, relevant = scores[rows], relevant[rows].to(scores.dtype)
    order = scores.argsort(dim=1, descending=True, stable=True)
    hits = relevant.gather(1, order)  # [B, I], relevance in ranked order
    discount = 1.0 / torch.log2(torch.arange(hits.shape[1], dtype=scores.dtype) + 2)
    ideal = relevant.sort(dim=1, descending=True).values
    first_hit = torch.where(hits.any(1), hits.argmax(1), hits.shape[1])
    out = {}
    for k in ks:
        out[f"recall@{k}"] = (hits[:, :k].sum(1) / relevant.sum(1)).mean().item()
        dcg = (hits[:, :k] * discount[:k]).sum(1)
        idcg = (ideal[:, :k] * discount[:k]).sum(1)
        out[f"ndcg@{k}"] = (dcg / idcg).mean().item()
        out[f"mrr@{k}"] = torch.where(first_hit < k, 1.0 / (first_hit + 1), 0.0).mean().item()
    return out


# --------------------------------------------------------------------------------------------
# Classification (intent prediction, PITuning appendix D)
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Distribution and agreement scores (synthesis fidelity, U-SCOPE Eq. 26)
# --------------------------------------------------------------------------------------------

def js_divergence(p, q, eps: float = 0.0) -> float:
    """Jensen-Shannon divergence of two histograms (normalised here), base 2: 0 = equal, 1 = disjoint."""
    p, q = torch.as_tensor(p, dtype=torch.float64).flatten(), torch.as_tensor(q, dtype=torch.float64).flatten()
    if p.shape != q.shape or (p < 0).any() or (q < 0).any() or p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("js_divergence needs two non-negative histograms of the same length with positive mass")
    p, q = (p + eps) / (p + eps).sum(), (q + eps) / (q + eps).sum()
    m = (p + q) / 2

    def kl(a: Tensor) -> Tensor:
        keep = a > 0
        return (a[keep] * torch.log2(a[keep] / m[keep])).sum()

    return float((kl(p) + kl(q)) / 2)


def agreement(reference, estimate) -> dict[str, float]:
    """How well ``estimate`` reproduces ``reference`` entry by entry (both flattened):

    ``pearson_r``; ``r2`` = r^2, the R^2 of the least-squares line through the scatter (what a
    scatter plot's R^2 reports); ``r2_identity`` = 1 - SS_res / SS_tot against the identity line
    (penalises any bias or scale error); ``mae`` and ``rmse`` of the differences."""
    x = torch.as_tensor(reference, dtype=torch.float64).flatten()
    y = torch.as_tensor(estimate, dtype=torch.float64).flatten()
    if x.shape != y.shape or len(x) < 2:
        raise ValueError("agreement needs two arrays of the same size with at least two entries")
    xc, yc = x - x.mean(), y - y.mean()
    denom = (xc.norm() * yc.norm()).item()
    r = float((xc * yc).sum() / denom) if denom > 0 else float("nan")
    ss_tot = float((xc**2).sum())
    err = y - x
    return {"pearson_r": r, "r2": r * r, "r2_identity": 1 - float((err**2).sum()) / ss_tot if ss_tot > 0 else float("nan"),
            "mae": float(err.abs().mean()), "rmse": float(err.pow(2).mean().sqrt())}
