"""UoMo's published protocol (Chai et al., KDD 2025; code: tsinghua-fib-lab/UoMo), to compare with peers.

Tasks on 64-step windows (`UOMO_TASKS`): short-term masks the last 16 steps (48 of history),
long-term the last 48 (16 of history), and generation hides 25% of the cells at every step (our
`cold` task with `cold_hidden_cells=0.25`).

Scale (`UoMoScaler`): per channel, values are clipped at the training split's 99.99th
percentile, divided by it, then min-max scaled to [-1, 1] with the training split's minimum and
maximum; `load_city(..., normalization="uomo")` gives every model that scale, so it is trained
on the metric's own scale (a model trained in log units and scored in linear ones is penalised for
every over-estimate of a large value, which the generation task exposes). Errors are computed after undoing the min-max step, i.e. on `min(x, clip) / clip`, and
on masked (target) entries only. UoMo's released code instead averages squared errors over *all*
entries of a window with the observed ones filled in from the truth, which divides the error by
the share of masked entries; `uomo_errors` reports that diluted variant as `*_all`, for
reference only. Its loader also scores what its data files call `X_val` (it swaps the val and
test loaders), so its published NJ numbers are on the split this project calls `val`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from completion.tasks import TaskConfig

UOMO_TASKS = TaskConfig(short_horizon=16, long_horizon=48, cold_hidden_cells=0.25)
UOMO_TASK_NAMES = {"short": "short-term", "long": "long-term", "cold": "generation"}


@dataclass(frozen=True)
class UoMoScaler:
    clip: Tensor  # [C], 99.99th percentile of the training split
    low: Tensor  # [C], min of the clipped, divided training values
    high: Tensor  # [C], max of the same

    @classmethod
    def fit(cls, x_train: Tensor, percentile: float = 99.99) -> UoMoScaler:
        """Statistics of x_train [N, C, ...] in original units, per channel, from the train split only."""
        flat = x_train.transpose(0, 1).reshape(x_train.shape[1], -1).double().numpy()
        clip = torch.from_numpy(np.percentile(flat, percentile, axis=1)).float()
        if (clip <= 0).any():
            raise ValueError(f"the {percentile}th percentile of a training channel is {clip.tolist()}: "
                             "UoMo's scale divides by it, so it must be positive")
        scaled = torch.minimum(x_train.transpose(0, 1).reshape(x_train.shape[1], -1), clip[:, None]) / clip[:, None]
        return cls(clip=clip, low=scaled.min(1).values, high=scaled.max(1).values)

    def _shape(self, v: Tensor, x: Tensor, channel_axis: int) -> Tensor:
        shape = [1] * x.dim()
        shape[channel_axis] = -1
        return v.to(x).reshape(shape)

    def clipped(self, x: Tensor, channel_axis: int = 1) -> Tensor:
        """Original units -> UoMo's metric scale, min(x, clip) / clip."""
        clip = self._shape(self.clip, x, channel_axis)
        return torch.minimum(x, clip) / clip

    def transform(self, x: Tensor, channel_axis: int = 1) -> Tensor:
        """Original units -> [-1, 1] (what UoMo's model reads)."""
        lo, hi = (self._shape(v, x, channel_axis) for v in (self.low, self.high))
        return 2 * (self.clipped(x, channel_axis) - lo) / (hi - lo) - 1

    def inverse(self, z: Tensor, channel_axis: int = 1) -> Tensor:
        """[-1, 1] -> the metric scale (undoes the min-max step exactly)."""
        lo, hi = (self._shape(v, z, channel_axis) for v in (self.low, self.high))
        return (z + 1) / 2 * (hi - lo) + lo

    def inverse_transform(self, z: Tensor, channel_axis: int = 1) -> Tensor:
        """[-1, 1] -> original units (values above the clip come back as the clip)."""
        return self.inverse(z, channel_axis) * self._shape(self.clip, z, channel_axis)


def uomo_errors(pred: Tensor, truth: Tensor, target: Tensor, scaler: UoMoScaler) -> dict[str, list[float]]:
    """RMSE / MAE per channel in UoMo's metric scale, from predictions and truth in original units
    [B, C, T, H, W]: on target entries (`rmse`, `mae`, what methods are ranked on) and, as UoMo's
    released code averages, over all entries with the non-target ones counted as exact (`*_all`)."""
    err = scaler.clipped(pred) - scaler.clipped(truth)
    w = target.to(err.dtype)
    dims = [0, 2, 3, 4]
    n_target, n_all = w.sum(dims), torch.full((err.shape[1],), err[:, 0].numel(), dtype=err.dtype)
    sq, ab = (err**2 * w).sum(dims), (err.abs() * w).sum(dims)
    return {"rmse": (sq / n_target).sqrt().tolist(), "mae": (ab / n_target).tolist(),
            "rmse_all": (sq / n_all).sqrt().tolist(), "mae_all": (ab / n_all).tolist()}
