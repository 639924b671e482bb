"""Loader for UoMo-format city files (`uomo-nj/nj_traffic_users_64.npz` and any other city).

A file holds, per split s in train / val / test: `X_s` [N, C, T, H, W] (C = 2 on NJ: traffic
volume, user count), `timestamps_s` [N, T, 2] (weekday 0-6, slot of day) and `poi_s`
[N, P, H, W] (POI counts of P categories per cell). Each sample is an *entity* (a patch of H x W
grid cells over T slots); its POI profile is its side information: flattened it is the entity
vector (what h_u is for a user), and per cell it is the source of E_pos.

Cities differ in step length and POI categories. The slots per day come from the timestamps (the
slot index wraps to 0 after the last slot of a day) or from the caller; when both exist and
disagree, loading stops and says so. Entities of another POI width than a checkpoint expects are
refused with both widths named; `pad_poi=True` is the documented mapping instead: categories are
matched by position and missing trailing ones read as zero counts.

Normalisation, fitted on X_train only: log1p, then per-channel standardisation. NJ's val and
test splits are not other areas: each is one of the 6 training areas (the same POI patch), seen at
other hours. The test area is a small one (traffic mean ~508 there, ~610 in its own training
windows, ~32,400 over the whole training split); in log space that level is an additive offset,
and the completion model also shifts each entity by the mean of its available region.

NJ's file is not shipped: `python -m completion.uomo convert` builds it from UoMo's release
(`completion.uomo`); a missing file is an error that says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from completion.batch import Batch
from completion.normalization import Log1pStandardizer
from completion.uomo import CITY_FILE_HELP, UoMoScaler
from scope.io import atomic_path

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class CityData:
    batches: dict[str, Batch]  # normalised, one Batch per split
    raw: dict[str, Tensor]  # X_{split} in original units [N, C, T, H, W]
    scaler: Log1pStandardizer | UoMoScaler  # of the behaviour channels, fitted on X_train
    slots_per_day: int

    def inverse(self, z: Tensor) -> Tensor:
        """Normalised [..., C, T, H, W] (a batch or a stack of samples) -> original units."""
        return self.scaler.inverse_transform(z, channel_axis=z.dim() - 4)


def infer_slots_per_day(timestamps: np.ndarray, where: str = "timestamps") -> tuple[int, bool]:
    """Slots per day from [N, T, 2] (weekday, slot) rows -> (slots per day, exact).

    The slot after a day's last wraps to 0, which gives the number exactly; every step must
    advance the slot by one (modulo the day) and the weekday at each wrap. Without any wrap only a
    lower bound is known (the largest slot + 1), returned with exact=False.
    """
    slot = timestamps[..., 1].astype(np.int64)
    day = timestamps[..., 0].astype(np.int64)
    wraps = slot[:, 1:] < slot[:, :-1]
    lasts = np.unique(slot[:, :-1][wraps])
    if len(lasts) > 1:
        raise ValueError(f"{where}: the slot of day wraps to 0 after different slots {lasts[:5].tolist()}; "
                         "the steps are not of one length")
    spd = int(lasts[0]) + 1 if len(lasts) else int(slot.max()) + 1
    bad = np.argwhere(slot[:, 1:] != (slot[:, :-1] + 1) % spd)
    if len(bad):
        n, t = bad[0]
        raise ValueError(f"{where}: sample {n}, step {t + 1}: slot {slot[n, t + 1]} does not follow slot "
                         f"{slot[n, t]} with {spd} slots per day")
    if ((day[:, 1:] != day[:, :-1]) != wraps).any():
        raise ValueError(f"{where}: the weekday must change exactly when the slot of day wraps to 0")
    return spd, bool(len(lasts))


def _slots_per_day(arrays: dict[str, np.ndarray], path: Path, given: int) -> int:
    """The data's slots per day, checked against the configuration's (0 = not given)."""
    found = [infer_slots_per_day(arrays[f"timestamps_{s}"], f"{path}: timestamps_{s}") for s in SPLITS]
    exact = {spd for spd, is_exact in found if is_exact}
    bound = max(spd for spd, _ in found)
    if len(exact) > 1:
        raise ValueError(f"{path}: the splits' timestamps disagree on the slots per day: {sorted(exact)}")
    spd = next(iter(exact)) if exact else bound
    if given and (given != spd if exact else given < bound):
        raise ValueError(f"{path}: the timestamps have {spd} slots per day, the configuration says {given}")
    return given or spd


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise ValueError(f"{path}: no such city file. {CITY_FILE_HELP}")
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as err:  # a missing, truncated or foreign file: BadZipFile, OSError, EOFError, ...
        raise ValueError(f"{path}: not a readable .npz city file ({type(err).__name__}: {err})") from None
    missing = [f"{k}_{s}" for s in SPLITS for k in ("X", "timestamps", "poi") if f"{k}_{s}" not in arrays]
    if missing:
        raise ValueError(f"{path}: missing arrays {missing}; a city file holds X_, timestamps_ and poi_ of "
                         f"each split {list(SPLITS)}")
    for s in SPLITS:
        X, ts, poi = arrays[f"X_{s}"], arrays[f"timestamps_{s}"], arrays[f"poi_{s}"]
        if X.ndim != 5 or ts.shape != (X.shape[0], X.shape[2], 2) or poi.ndim != 4 \
                or poi.shape[0] != X.shape[0] or poi.shape[2:] != X.shape[3:]:
            raise ValueError(f"{path}: split {s!r}: expected X [N, C, T, H, W], timestamps [N, T, 2] and "
                             f"poi [N, P, H, W]; got {X.shape}, {ts.shape} and {poi.shape}")
        for key in (f"X_{s}", f"poi_{s}"):
            values = arrays[key]
            finite = np.isfinite(values)
            if not finite.all() or (values < 0).any():
                where = tuple(int(i) for i in np.argwhere(~finite | (values < 0))[0])
                raise ValueError(f"{path}: {key}{list(where)} = {float(values[where])}: values must be finite "
                                 "and non-negative")
    return arrays


NORMALIZATIONS = ("log1p", "uomo")


def load_city(path: str | Path, slots_per_day: int = 0, poi_width: int | None = None,
              pad_poi: bool = False, normalization: str = "log1p") -> CityData:
    """Read the file, fit every normaliser on the train split, and build one Batch per split.

    `slots_per_day` 0 = from the timestamps; `poi_width`: the POI categories a checkpoint expects;
    `normalization`: log1p + standardisation (default) or UoMo's clipped min-max scale
    (`completion.uomo`), for its published protocol.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")
    path = Path(path)
    arrays = _read(path)
    spd = _slots_per_day(arrays, path, slots_per_day)
    raw = {s: torch.from_numpy(arrays[f"X_{s}"]).float() for s in SPLITS}
    poi = {s: torch.from_numpy(arrays[f"poi_{s}"]).float() for s in SPLITS}  # [N, P, H, W]
    width = poi["train"].shape[1]
    if poi_width is not None and width != poi_width:
        if width > poi_width or not pad_poi:
            raise ValueError(f"{path}: {width} POI categories, the model expects {poi_width}"
                             + ("" if width > poi_width else "; pad_poi=True reads the missing trailing "
                                                               "categories as zero counts"))
        poi = {s: torch.nn.functional.pad(p, (0, 0, 0, 0, 0, poi_width - width)) for s, p in poi.items()}
    scaler = Log1pStandardizer.fit(raw["train"].numpy()) if normalization == "log1p" else UoMoScaler.fit(raw["train"])
    poi_scaler = Log1pStandardizer.fit(poi["train"].numpy())
    poi_scaler.std[poi_scaler.std <= 1e-3] = 1.0  # a category absent from every training cell stays 0
    batches = {}
    for s in SPLITS:
        cells = poi_scaler.transform(poi[s]).permute(0, 2, 3, 1)  # [N, H, W, P]
        N, C, T, H, W = raw[s].shape
        batches[s] = Batch(
            x=scaler.transform(raw[s]),
            observed=torch.ones(N, T, H, W, dtype=torch.bool),
            entity=cells.flatten(1),
            cells=cells,
            timestamps=torch.from_numpy(arrays[f"timestamps_{s}"]).long(),
        )
    return CityData(batches=batches, raw=raw, scaler=scaler, slots_per_day=spd)


#################################################################################
#            Other resolutions and scales, for transfer tests (from NJ)          #
#################################################################################

def area_series(X: np.ndarray, timestamps: np.ndarray, poi: np.ndarray, slots_per_day: int
                ) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """The contiguous series behind the windows of each area (same POI patch): [(series [C, L, H, W],
    poi [P, H, W], first slot of the week)]; NJ's windows start at every slot of one week."""
    out = []
    keys = {}
    for i in range(len(poi)):
        keys.setdefault(poi[i].tobytes(), []).append(i)
    week = 7 * slots_per_day
    for rows in keys.values():
        start = {int(timestamps[i, 0, 0]) * slots_per_day + int(timestamps[i, 0, 1]): i for i in rows}
        first = min(start)
        T = X.shape[2]
        length = max(start) - first + T
        series = np.full((X.shape[1], length) + X.shape[3:], np.nan, np.float64)
        for s, i in start.items():
            series[:, s - first:s - first + T] = X[i]
        keep = ~np.isnan(series).any((0, 2, 3))
        cut = int(np.argmin(keep)) if not keep.all() else length  # the contiguous part from the first window
        out.append((series[:, :cut], poi[rows[0]], first % week))
    return out


def resample_city(src: str | Path, dst: str | Path, steps_per_slot: int = 1, scale: float = 1.0,
                  drop_poi: tuple[int, ...] = (), slots_per_day: int = 0) -> Path:
    """Write a UoMo-format file of coarser steps and another scale, built from `src`'s areas.

    `steps_per_slot` source steps make one slot (traffic summed, user counts averaged: a count of
    users present is a level, not a flow); values are multiplied by `scale`; POI categories
    `drop_poi` are removed. Windows keep T slots and start at every slot of each area's series.
    """
    arrays = _read(Path(src))
    spd = _slots_per_day(arrays, Path(src), slots_per_day)
    if spd % steps_per_slot:
        raise ValueError(f"steps_per_slot {steps_per_slot} must divide the {spd} slots of a day")
    new_spd = spd // steps_per_slot
    out = {}
    for s in SPLITS:
        X = arrays[f"X_{s}"]
        T = X.shape[2]
        xs, ts, ps = [], [], []
        for series, poi, first in area_series(X, arrays[f"timestamps_{s}"], arrays[f"poi_{s}"], spd):
            offset = (-first) % steps_per_slot  # align slots to the day
            series = series[:, offset:]
            L = series.shape[1] // steps_per_slot
            blocks = series[:, :L * steps_per_slot].reshape(series.shape[0], L, steps_per_slot, *series.shape[2:])
            coarse = np.concatenate([blocks[:1].sum(2), blocks[1:].mean(2)]) * scale
            start_slot = (first + offset) // steps_per_slot
            for w in range(L - T + 1):
                abs_slot = start_slot + w + np.arange(T)
                xs.append(coarse[:, w:w + T])
                ts.append(np.stack([(abs_slot // new_spd) % 7, abs_slot % new_spd], -1))
                ps.append(np.delete(poi, list(drop_poi), axis=0))
        out[f"X_{s}"] = np.stack(xs).astype(np.float32)
        out[f"timestamps_{s}"] = np.stack(ts).astype(np.int16)
        out[f"poi_{s}"] = np.stack(ps).astype(np.float32)
    with atomic_path(dst) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **out)
    return Path(dst)
