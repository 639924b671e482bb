"""Cold-start app recommendation from a completed behaviour tensor.

The engagement of app category i in the target period is the predicted usage count of its
channel summed over the target footprint (every slot and cell with a target entry), in original
units; categories are ranked by it. The relevant categories are those actually used there
(true count > 0). Recall/NDCG/MRR@k come from `scope.metrics.ranking_metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from scope.metrics import ranking_metrics


def app_channels(channel_names: Sequence[str]) -> list[int]:
    """Indices of the app-category channels (named `app:<category>` by the tensorizer)."""
    out = [i for i, name in enumerate(channel_names) if name.startswith("app:")]
    if not out:
        raise ValueError(f"no app-category channel among {list(channel_names)}")
    return out


def engagement(values: Tensor, target: Tensor, channels: Sequence[int]) -> Tensor:
    """Sum of `values` [B, C, T, H, W] (original units) per app channel over the target footprint -> [B, I]."""
    footprint = target.any(1, keepdim=True).to(values.dtype)  # [B, 1, T, H, W]
    return (values[:, list(channels)] * footprint).sum((2, 3, 4))


def recommendation_report(pred: Tensor, truth: Tensor, target: Tensor, channels: Sequence[int],
                          inverse: Callable[[Tensor], Tensor] | None = None,
                          ks: tuple[int, ...] = (1, 3, 5)) -> dict[str, float]:
    """Rank app categories by predicted engagement; score against the categories used in the target period.

    pred, truth: [B, C, T, H, W] (normalised when `inverse` is given); target: bool, same shape.
    """
    if inverse is not None:
        pred, truth = inverse(pred), inverse(truth)
    scores = engagement(pred, target, channels)
    relevant = engagement(truth, target, channels) > 0
    return {**ranking_metrics(scores, relevant, ks), "users_scored": int(relevant.any(1).sum())}
