"""Metrics shared across the toolchain: ranking metrics (completion's cold-start recommendation,
PITuning's intent ranking) and the bootstrap confidence interval every evaluation table reports."""

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
