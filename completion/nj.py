"""Loader for the real NJ city traffic data (`uomo-nj/nj_traffic_users_64.npz`).

Each sample is a 4 x 4 patch of grid cells (an *entity*) with C = 2 channels (traffic volume,
user count) over T = 64 slots of 15 minutes, its timestamps, and its POI profile [21, 4, 4].
The POI profile is the entity's side information: flattened it is the entity vector (what h_u is
for a user), and per cell it is the source of E_pos.

Normalisation, fitted on X_train only: log1p, then per-channel standardisation. The test split
comes from other areas and is ~60x smaller in scale; in log space that shift is an additive
offset and zeros (47% of entries) stay one fixed value in every split. On top of it the model
shifts each entity by the mean of its available region (`CompletionModel(center=True)`).
Measured on val with a ridge forecaster (RMSE in original units, traffic / users): without a
scale shift the per-entity shift is about neutral (next 4 slots: 20205 / 19.77 global vs
20269 / 19.79 shifted; last 32: 46050 / 59.4 vs 47077 / 60.1), while on val rescaled by 1/64
(test-like scale, test untouched) it helps the long horizon (736 / 1.22 vs 698 / 0.97; short:
316 / 0.309 vs 314 / 0.307).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from completion.data import Batch
from completion.normalization import Log1pStandardizer

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class NJData:
    batches: dict[str, Batch]  # normalised, one Batch per split
    raw: dict[str, Tensor]  # X_{split} in original units [N, 2, 64, 4, 4]
    scaler: Log1pStandardizer  # of the behaviour channels, fitted on X_train

    def inverse(self, z: Tensor) -> Tensor:
        """Normalised [..., C, T, H, W] (a batch or a stack of samples) -> original units."""
        return self.scaler.inverse_transform(z, channel_axis=z.dim() - 4)


def load_nj(path: str | Path) -> NJData:
    """Read the npz, fit every normaliser on the train split, and build one Batch per split."""
    with np.load(path) as f:
        arrays = {k: torch.from_numpy(f[k]) for k in f.files}
    raw = {s: arrays[f"X_{s}"].float() for s in SPLITS}
    poi = {s: arrays[f"poi_{s}"].float() for s in SPLITS}  # [N, 21, H, W]
    scaler = Log1pStandardizer.fit(raw["train"].numpy())
    poi_scaler = Log1pStandardizer.fit(poi["train"].numpy())
    batches = {}
    for s in SPLITS:
        cells = poi_scaler.transform(poi[s]).permute(0, 2, 3, 1)  # [N, H, W, 21]
        N, C, T, H, W = raw[s].shape
        batches[s] = Batch(
            x=scaler.transform(raw[s]),
            observed=torch.ones(N, T, H, W, dtype=torch.bool),
            entity=cells.flatten(1),
            cells=cells,
            timestamps=arrays[f"timestamps_{s}"].long(),
        )
    return NJData(batches=batches, raw=raw, scaler=scaler)
