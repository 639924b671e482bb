"""UoMo's published protocol (Chai et al., KDD 2025; code and data: GitHub tsinghua-fib-lab/UoMo,
MIT licence), its data files, and the two readings of its metric.

Tasks on 64-step windows (`UOMO_TASKS`): short-term masks the last 16 steps (48 of history),
long-term the last 48 (16 of history), and generation hides 25% of the cells at every step (our
`cold` task with `cold_hidden_cells=0.25`).

Scale (`UoMoScaler`, as UoMo's `DataLoader.py`): per channel, values are clipped at the training
split's 99.99th percentile, divided by it, then min-max scaled to [-1, 1] with the training
split's minimum and maximum; `load_city(..., normalization="uomo")` gives every model that scale.

Metric (`uomo_errors`). The paper's Table 1 does not say how its RMSE is averaged nor on which
scale, and the released code computes two different things, neither a forecast error as the
project reads one:
- its validation score (`train.py: Sample`, which also picks the checkpoint) is the masked MSE on
  [-1, 1] of the denoiser's x_0 estimate at a random diffusion step, given a noised copy of the
  target (at small steps nearly the target itself); for a forecaster, which gets no such copy,
  the same formula on its prediction is `rmse_masked_pm1`;
- its sampling evaluation (`train.py: run_loop`) fills the observed entries from the truth and
  averages squared errors over *all* entries on [-1, 1], batch by batch (summed MSE / batch size,
  with the task cycling from batch to batch); per task that is `rmse_all_pm1`.
The project's reading (`rmse`, `mae`, what methods are ranked on) is the error on target entries
only, on `min(x, clip) / clip`. UoMo's loader also swaps its val and test loaders, so its
published numbers are on the split the data files call `X_val`.

NJ's split: train holds 6 areas (POI patches) as windows starting at every slot of one week; val
and test are each one of those 6 areas (val: the 5th, test: the 6th, a small one), seen at other
hours. No val or test patch is unseen: `SameAreaLookup` copies the same area's training window,
and its generation task hides cells whose own training windows every model has read.

Data (`convert`, `python -m completion.uomo convert --source DIR --output FILE`): UoMo ships
`dataset64time/24_{city}_short64.rar` (traffic), `{city}_user64.rar` (user counts) and
`{city}_poi64.rar` (POI counts), each a JSON file once extracted; `convert` packs one city into the
npz this project reads (`completion.city`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from completion.batch import Batch
from completion.tasks import Regions, TaskConfig
from scope.io import atomic_path

UOMO_TASKS = TaskConfig(short_horizon=16, long_horizon=48, cold_hidden_cells=0.25)
UOMO_TASK_NAMES = {"short": "short-term", "long": "long-term", "cold": "generation"}
UOMO_FILES = {"traffic": "24_{city}_short64.json", "users": "{city}_user64.json", "poi": "{city}_poi64.json"}
CITY_FILE_HELP = ("NJ's city file is built from UoMo's release (GitHub tsinghua-fib-lab/UoMo, MIT licence): "
                  "extract its dataset64time/24_TrafficNJ_short64.rar, TrafficNJ_user64.rar and TrafficNJ_poi64.rar "
                  "into a folder DIR (unrar x, or bsdtar -xf), then run `python -m completion.uomo convert "
                  "--source DIR --output nj_traffic_users_64.npz` and point --data / --data_path at that file")


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
    """Per channel, from predictions and truth in original units [B, C, T, H, W]: the project's
    reading (`rmse`, `mae` on target entries, scale min(x, clip) / clip) and UoMo's code's two
    (module docstring): `rmse_masked_pm1` (target entries, [-1, 1]) and `rmse_all_pm1` (every
    entry, the non-target ones taken from the truth, [-1, 1])."""
    w = target.to(pred.dtype)
    dims = [0, 2, 3, 4]
    n_target, n_all = w.sum(dims), float(w[:, 0].numel())
    err = scaler.clipped(pred) - scaler.clipped(truth)
    sq_pm1 = ((scaler.transform(pred) - scaler.transform(truth)) ** 2 * w).sum(dims)
    return {"rmse": ((err**2 * w).sum(dims) / n_target).sqrt().tolist(),
            "mae": ((err.abs() * w).sum(dims) / n_target).tolist(),
            "rmse_masked_pm1": (sq_pm1 / n_target).sqrt().tolist(),
            "rmse_all_pm1": (sq_pm1 / n_all).sqrt().tolist()}


class SameAreaLookup:
    """x^ = the training window of the same area (the same entity vector, i.e. POI patch) that
    starts at the same slot of day, on the nearest weekday; no fitting, no evidence read.

    On NJ, val and test are training areas at other hours, so this is what a model that memorised
    the training split could copy: the floor a gain on NJ must clear before it means anything."""

    def fit(self, train: Batch, slots_per_day: int) -> SameAreaLookup:
        self.train, self.slots_per_day = train, slots_per_day
        return self

    def predict(self, batch: Batch, task: Tensor, regions: Regions) -> Tensor:
        start = self.train.timestamps[:, 0]  # (weekday, slot) of each training window's first step
        out = []
        for entity, (day, slot) in zip(batch.entity, batch.timestamps[:, 0]):
            same = (self.train.entity == entity).all(1).nonzero().squeeze(1)
            if not len(same):
                raise ValueError("no training window of this entity's area: the same-area lookup needs the "
                                 "scored split's areas to be training areas (as NJ's val and test are)")
            d_slot = (start[same, 1] - slot).abs()
            d_day = (start[same, 0] - day).abs()
            distance = torch.minimum(d_slot, self.slots_per_day - d_slot) * 7 + torch.minimum(d_day, 7 - d_day)
            out.append(self.train.x[same[distance.argmin()]])
        return torch.stack(out)


def time_halves(timestamps: Tensor, slots_per_day: int) -> tuple[Tensor, Tensor]:
    """Rows of a split of windows that start at every slot of one week [N, T, 2] -> (fit, report):
    the windows starting in the first half of the week, and those starting after the last fit
    window ends, so that no step of a reported window is in a fit window."""
    T = timestamps.shape[1]
    start = timestamps[:, 0, 0].long() * slots_per_day + timestamps[:, 0, 1].long()
    cut = (7 * slots_per_day - T + 1) // 2
    return (start < cut).nonzero().squeeze(1), (start >= cut + T - 1).nonzero().squeeze(1)


def convert(source: str | Path, output: str | Path, city: str = "TrafficNJ") -> Path:
    """UoMo's released JSON files of `city` in `source` -> the city npz `output`.

    Traffic and user files: {"X_train": [array N x T x H x W], "X_val", "X_test", "timestamps":
    {"train": N x T x 2 (weekday, slot of day), ...}}; POI file: {"X_train": N x P x H x W, ...}.
    Written: X_{split} [N, 2, T, H, W] float32 (channel 0 traffic, 1 users), timestamps_{split}
    [N, T, 2] int16 and poi_{split} [N, P, H, W] float32, as `completion.city` reads them."""
    paths = {kind: Path(source) / name.format(city=city) for kind, name in UOMO_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"missing {missing}: extract {city}'s files of dataset64time/ in UoMo's release "
                                "(24_<city>_short64.rar, <city>_user64.rar, <city>_poi64.rar) into that folder")
    traffic, users, poi = (json.loads(paths[kind].read_text()) for kind in ("traffic", "users", "poi"))
    out = {}
    for s in ("train", "val", "test"):
        channels = [np.asarray(data[f"X_{s}"][0], np.float32) for data in (traffic, users)]
        times = [np.asarray(data["timestamps"][s], np.int16) for data in (traffic, users)]
        if channels[0].shape != channels[1].shape or not np.array_equal(*times):
            raise ValueError(f"{city} {s}: the traffic and user files disagree on their windows "
                             f"({channels[0].shape} vs {channels[1].shape}, or their timestamps)")
        out[f"X_{s}"] = np.stack(channels, axis=1)
        out[f"timestamps_{s}"] = times[0]
        out[f"poi_{s}"] = np.asarray(poi[f"X_{s}"], np.float32)
    with atomic_path(output) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **out)
    return Path(output)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m completion.uomo", description="UoMo's data files")
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("convert", help="UoMo's released JSON files of one city -> the project's city npz")
    c.add_argument("--source", type=Path, required=True, help="folder of the extracted dataset64time/*.rar files")
    c.add_argument("--output", type=Path, required=True, help="the npz to write, e.g. nj_traffic_users_64.npz")
    c.add_argument("--city", default="TrafficNJ", help="UoMo's city name: TrafficNJ (default), TrafficNC, TrafficSD")
    args = parser.parse_args(argv)
    print(convert(args.source, args.output, args.city))


if __name__ == "__main__":
    main()
