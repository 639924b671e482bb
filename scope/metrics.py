"""Metrics shared across the toolchain: ranking metrics (completion's cold-start recommendation,
PITuning's intent ranking) and the bootstrap confidence intervals every evaluation table reports:
always over users, one value per user (:func:`bootstrap_ci`) or, when a user contributes several
cases, a cluster bootstrap that resamples users with all their cases (:func:`cluster_bootstrap_ci`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


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


def bootstrap_ci(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-unit ``values`` (one per user) and its percentile bootstrap ``level`` interval:
    ``(mean, lo, hi)``. A paired difference is the CI of the per-user differences. Empty input
    gives NaNs."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_boot, values.size))].mean(1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(values.mean()), float(lo), float(hi)


def cluster_bootstrap_means(values, clusters, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """Bootstrap draws of the mean over cases of ``values`` when cases come in clusters.

    ``values``: one row per case, ``[cases]`` or ``[cases, columns]`` (NaN: the case has no value
    there); ``clusters``: one label per case (the user id). Each draw resamples the clusters with
    replacement and takes all their cases; its statistic is the mean over the cases of the drawn
    clusters (a cluster drawn twice counts twice), per column. Returns ``[n_boot]`` or
    ``[n_boot, columns]``, NaN where a draw holds no value of a column. The clusters are drawn as
    :func:`bootstrap_ci` draws values, so with one case per cluster the draws are the same."""
    values = np.asarray(values, dtype=float)
    index: dict = {}
    ids = np.array([index.setdefault(c, len(index)) for c in clusters], dtype=int)
    if len(ids) != len(values):
        raise ValueError(f"{len(values)} values but {len(ids)} cluster labels")
    flat = values.reshape(len(values), -1)
    present = ~np.isnan(flat)
    sums, counts = np.zeros((len(index), flat.shape[1])), np.zeros((len(index), flat.shape[1]))
    np.add.at(sums, ids, np.where(present, flat, 0.0))
    np.add.at(counts, ids, present)
    draws = np.random.default_rng(seed).integers(0, len(index), size=(n_boot, len(index)))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums[draws].sum(1) / counts[draws].sum(1)
    return means.reshape((n_boot, *values.shape[1:]))


def cluster_bootstrap_ci(values, clusters, n_boot: int = 2000, seed: int = 0, level: float = 0.95
                         ) -> tuple[float, float, float]:
    """Mean over cases of ``values`` and its percentile cluster-bootstrap ``level`` interval,
    ``(mean, lo, hi)``: the users (``clusters``, one label per case) are resampled with replacement,
    each with all its cases (:func:`cluster_bootstrap_means`). Use it instead of :func:`bootstrap_ci`
    when a user contributes several cases, which are not independent. NaN values are left out;
    no value gives NaNs."""
    values = np.asarray(values, dtype=float)
    keep = ~np.isnan(values)
    if not keep.any():
        return float("nan"), float("nan"), float("nan")
    means = cluster_bootstrap_means(values[keep], np.asarray(clusters, dtype=object)[keep], n_boot, seed)
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(values[keep].mean()), float(lo), float(hi)


def bootstrap_weights(n: int, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """``[1 + n_boot, n]``: how often each of ``n`` users is in the sample itself (row 0, all ones)
    and in each of ``n_boot`` resamples with replacement (drawn as :func:`bootstrap_ci` draws). For a
    statistic that is not a mean of per-user values (a pooled RMSE, a macro precision): compute it
    from the per-user sums weighted by each row."""
    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    weights = np.vstack([np.ones(n), np.zeros((n_boot, n))])
    np.add.at(weights, (1 + np.arange(n_boot)[:, None], draws), 1)
    return weights
