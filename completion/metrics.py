"""Every metric of the completion benchmark, computed on target entries only.

Point errors (RMSE, MAE) are per channel and pooled over all target entries of the batch; the
probabilistic scores (CRPS, interval coverage) read the samples of the sampler (ranking scores for
cold-start recommendation are :func:`scope.metrics.ranking_metrics`). `completion_report` gathers the point
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


def point_errors(pred: Tensor, truth: Tensor, target: Tensor,
                 inverse: Callable[[Tensor], Tensor] | None = None) -> dict[str, list[float]]:
    """RMSE/MAE of a point prediction per channel, and (given `inverse`) in original units."""
    rmse, mae = rmse_mae(pred, truth, target)
    report = {"rmse": rmse.tolist(), "mae": mae.tolist()}
    if inverse is not None:
        rmse, mae = rmse_mae(inverse(pred), inverse(truth), target)
        report |= {"rmse_orig": rmse.tolist(), "mae_orig": mae.tolist()}
    return report


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
    report = point_errors(samples.mean(0) if point is None else point, truth, target, inverse)
    report["crps"] = crps(samples, truth, target).tolist()
    if inverse is not None:
        report["crps_orig"] = crps(inverse(samples), inverse(truth), target).tolist()
    report[f"coverage{round(level * 100)}"] = coverage(samples, truth, target, level).tolist()
    return report
