"""Behaviour tensors ``X_u in R^{C x T x H x W}`` from event streams (U-MASK section 3).

Channels: one usage-count channel per app category, then ``presence`` (1 where the user was seen
at that cell in that slot) and ``traffic_bytes`` (summed bytes). Values are stored raw; the
:class:`~completion.normalization.Log1pStandardizer` fitted on training users maps them to the
model's scale (``log1p`` + per-channel z-score) and back.

Time: slots of ``slot_minutes`` (15); each user's slots count from midnight of the user's first
active day; consecutive windows of ``T`` slots (192 = two days); windows without any event are
skipped. ``available[t, h, w]`` is 1 where data exists: the slot's day has at least one record
of that user (simulated or real missing days are 0), and the cell is a real place.

Space, ``H x W`` cells:

- ``grid`` (when events carry ``lat, lon``): a geographic grid of ``cell_m`` (500 m) cells on a
  local equirectangular projection, cropped around the user's most visited cell (placed at
  ``(H // 2, W // 2)``). ``cell_cluster`` is the most common location cluster among the stations
  inside each cell (-1 if none).
- ``topk`` (otherwise): the user's ``H * W`` most visited locations, rank ``r`` at
  ``(r // W, r % W)``; unused cells are padding (unavailable, cluster -1).

Events outside the layout (beyond the crop, or below the top ``H * W`` locations) are counted per
window in ``dropped_events`` and never placed elsewhere.

Tensorization is vectorised (``np.bincount`` over flat indices, no Python loop over events) and
streams: it buffers ``shard_users`` complete users of a user-grouped event stream, writes them as
one safetensors shard, and moves on, so memory stays bounded for any cohort size. The
normaliser's statistics accumulate over training users' shards as they are written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from completion.normalization import Log1pStandardizer
from scope.io import atomic_path, write_json

DATASET_FILE = "dataset.json"
SPLIT_NAMES = ["train", "val", "test", "cold"]
FORMAT_VERSION = 1
_KM_PER_DEG = 111.32


@dataclass
class TensorConfig:
    slot_minutes: int = 15
    window_slots: int = 192
    height: int = 4
    width: int = 4
    spatial: str = "topk"          # "topk", "grid" (500 m cells) or "auto" (grid when coordinates exist)
    cell_m: float = 500.0
    shard_users: int = 128

    def __post_init__(self):
        if 1440 % self.slot_minutes:
            raise ValueError(f"slot_minutes must divide a day (1440 minutes), got {self.slot_minutes}")
        if self.spatial not in ("auto", "grid", "topk"):
            raise ValueError(f"spatial must be 'auto', 'grid' or 'topk', got {self.spatial!r}")
        if min(self.window_slots, self.height, self.width, self.shard_users) < 1:
            raise ValueError("window_slots, height, width and shard_users must be >= 1")

    @property
    def slots_per_day(self) -> int:
        return 1440 // self.slot_minutes


def channel_names(categories: list[str]) -> list[str]:
    return [f"app:{name}" for name in categories] + ["presence", "traffic_bytes"]


# --------------------------------------------------------------------------------------------
# Spatial layouts
# --------------------------------------------------------------------------------------------

@dataclass
class Grid:
    """A city-wide grid of ``cell_m`` cells on a local equirectangular projection."""

    lat0: float
    lon0: float
    cell_m: float

    def cells(self, lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        y_km = (np.asarray(lat) - self.lat0) * _KM_PER_DEG
        x_km = (np.asarray(lon) - self.lon0) * _KM_PER_DEG * np.cos(np.radians(self.lat0))
        return np.floor(y_km * 1000 / self.cell_m).astype(np.int64), np.floor(x_km * 1000 / self.cell_m).astype(np.int64)


class GridLayout:
    """Grid cell of every station, and the dominant location cluster of every cell."""

    def __init__(self, stations: pd.DataFrame, location_cluster: pd.Series, cell_m: float):
        lat, lon = stations["lat"].to_numpy(), stations["lon"].to_numpy()
        self.grid = Grid(float(lat.min()), float(lon.min()), cell_m)
        gy, gx = self.grid.cells(lat, lon)
        packed = gy << 32 | gx
        ids = stations.index.to_numpy()
        self.station_cell = np.full(int(ids.max()) + 1, -1, np.int64)
        self.station_cell[ids] = packed
        clusters = location_cluster.reindex(stations.index).fillna(-1).to_numpy(np.int64)
        keys, modes = _group_mode(packed, clusters)
        self.cell_cluster = dict(zip(keys.tolist(), modes.tolist()))

    def cells_of(self, location: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        known = (location >= 0) & (location < len(self.station_cell))
        packed = np.where(known, self.station_cell[np.where(known, location, 0)], -1)
        if (packed < 0).any():
            raise ValueError(f"location {location[packed < 0][0]} has no coordinates: the grid layout needs "
                             "coordinates for every station (base_coords.txt), or use spatial='topk'")
        return packed >> 32, packed & 0xFFFFFFFF

    def cluster_of(self, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
        return np.array([self.cell_cluster.get(k, -1) for k in (gy << 32 | gx).ravel().tolist()],
                        np.int16).reshape(np.shape(gy))


def _group_mode(group: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each distinct ``group`` (non-negative ints), its most frequent ``value`` (ties: smallest)."""
    value = np.asarray(value, np.int64)
    offset = value.min() if len(value) else 0
    span = int(value.max() - offset + 1) if len(value) else 1
    pairs, counts = np.unique(group * span + (value - offset), return_counts=True)
    g, v = pairs // span, pairs % span + offset
    order = np.lexsort((v, -counts, g))
    g, v = g[order], v[order]
    first = np.r_[True, g[1:] != g[:-1]]
    return g[first], v[first]


# --------------------------------------------------------------------------------------------
# Tensorizing one batch of complete users
# --------------------------------------------------------------------------------------------

def tensorize_users(events: pd.DataFrame, categories: list[str], location_cluster: pd.Series,
                    cfg: TensorConfig, grid: GridLayout | None = None) -> dict[str, np.ndarray]:
    """Events of some complete users -> one item per (user, window) with events.

    ``location_cluster`` maps location id -> cluster id; with ``grid`` the spatial layout is the
    geographic grid, otherwise the user's top ``H * W`` locations.
    """
    T, H, W, C = cfg.window_slots, cfg.height, cfg.width, len(categories) + 2
    HW = H * W
    user_ids, u = np.unique(events["user_id"].to_numpy(), return_inverse=True)
    n_users = len(user_ids)
    seconds = events["timestamp"].to_numpy().astype("datetime64[s]").astype(np.int64)
    day = seconds // 86400
    first_day = np.full(n_users, np.iinfo(np.int64).max)
    np.minimum.at(first_day, u, day)
    slot = (seconds - first_day[u] * 86400) // (cfg.slot_minutes * 60)
    window, t = slot // T, slot % T
    rel_day = day - first_day[u]

    # Spatial cell of every event, per user.
    location = events["location_id"].to_numpy().astype(np.int64)
    cell_cluster = np.full((n_users, HW), -1, np.int16)
    cell_valid = np.ones((n_users, HW), bool)
    if grid is not None:
        gy, gx = grid.cells_of(location)
        _, anchor = _group_mode(u, gy << 32 | gx)
        ay, ax = (anchor >> 32) - H // 2, (anchor & 0xFFFFFFFF) - W // 2
        h, w = gy - ay[u], gx - ax[u]
        inside = (h >= 0) & (h < H) & (w >= 0) & (w < W)
        cell = np.where(inside, h * W + w, -1)
        hh, ww = np.divmod(np.arange(HW), W)
        cell_cluster[:] = grid.cluster_of(ay[:, None] + hh, ax[:, None] + ww)
    else:
        span = int(location.max()) + 1
        pairs, inverse, counts = np.unique(u * span + location, return_inverse=True, return_counts=True)
        pair_user, pair_location = pairs // span, pairs % span
        order = np.lexsort((pair_location, -counts, pair_user))
        first = np.r_[0, np.flatnonzero(np.diff(pair_user[order])) + 1]
        rank = np.empty(len(pairs), np.int64)
        rank[order] = np.arange(len(pairs)) - np.repeat(first, np.diff(np.r_[first, len(pairs)]))
        top = rank < HW
        cell = np.where(rank[inverse] < HW, rank[inverse], -1)
        cell_cluster[pair_user[top], rank[top]] = location_cluster.reindex(pair_location[top]).fillna(-1).to_numpy(np.int16)
        cell_valid[:] = False
        cell_valid[pair_user[top], rank[top]] = True

    # One item per (user, window) that has events.
    uw_key, uw = np.unique(u * (window.max() + 1) + window, return_inverse=True)
    n_windows = window.max() + 1
    item_user, item_window = uw_key // n_windows, uw_key % n_windows
    N = len(uw_key)
    placed = cell >= 0
    category = events["app_category"].to_numpy().astype(np.int64)

    # Scatter counts sparsely: only touched entries are written into the zero (lazily paged) array.
    x = np.zeros((N, C, T, HW), np.float32)
    at = (uw[placed] * T + t[placed]) * HW + cell[placed]           # (item, slot, cell)
    item, rest = np.divmod(at, T * HW)
    keys, n = np.unique((item * C + category[placed]) * T * HW + rest, return_counts=True)
    x.reshape(-1)[keys] = n
    cells = np.unique(at)
    x.reshape(-1)[(cells // (T * HW) * C + C - 2) * T * HW + cells % (T * HW)] = 1.0
    x[:, C - 1] = np.bincount(at, weights=events["traffic_bytes"].to_numpy()[placed],
                              minlength=N * T * HW).reshape(N, T, HW)
    dropped = np.bincount(uw[~placed], minlength=N).astype(np.int32)

    # Availability: days with any record of the user, times real cells.
    days_span = int(rel_day.max()) + 1 + T // cfg.slots_per_day + 1
    observed = np.zeros((n_users, days_span), bool)
    observed[u, rel_day] = True
    item_slots = item_window[:, None] * T + np.arange(T)[None, :]
    day_of_slot = item_slots // cfg.slots_per_day
    available = observed[item_user[:, None], np.minimum(day_of_slot, days_span - 1)] & (day_of_slot < days_span)
    available = available[:, :, None] & cell_valid[item_user][:, None, :]

    # Calendar of every slot, and the cluster of each slot's dominant location.
    start = (first_day[item_user] * 86400 + item_window * T * cfg.slot_minutes * 60)
    slot_seconds = start[:, None] + np.arange(T)[None, :] * cfg.slot_minutes * 60
    weekday = ((slot_seconds // 86400) + 3) % 7  # 1970-01-01 was a Thursday (Monday = 0)
    slot_of_day = (slot_seconds % 86400) // (cfg.slot_minutes * 60)
    slot_cluster = np.full((N, T), -1, np.int16)
    group, dominant = _group_mode(uw * T + t, location)
    slot_cluster.reshape(-1)[group] = location_cluster.reindex(dominant).fillna(-1).to_numpy(np.int16)

    return {
        "x": x.reshape(N, C, T, H, W),
        "available": available.reshape(N, T, H, W),
        "timestamps": np.stack([weekday, slot_of_day], axis=-1).astype(np.int16),
        "cell_cluster": cell_cluster[item_user].reshape(N, H, W),
        "slot_cluster": slot_cluster,
        "user_id": user_ids[item_user].astype(np.int64),
        "window": item_window.astype(np.int32),
        "start": start.astype(np.int64),
        "dropped_events": dropped,
    }


# --------------------------------------------------------------------------------------------
# Streaming a cohort into shards
# --------------------------------------------------------------------------------------------

def _user_batches(blocks: Iterable[pd.DataFrame], shard_users: int) -> Iterator[pd.DataFrame]:
    """Regroup a user-grouped stream of event blocks into frames of ``shard_users`` complete users."""
    pending = None
    for block in blocks:
        frame = block if pending is None else pd.concat([pending, block], ignore_index=True)
        ids = frame["user_id"].to_numpy()
        starts = np.flatnonzero(ids[1:] != ids[:-1]) + 1  # every user but the last is complete
        while len(starts) >= shard_users:
            cut = starts[shard_users - 1]
            yield frame.iloc[:cut]
            frame = frame.iloc[cut:].reset_index(drop=True)
            starts = starts[shard_users:] - cut
        pending = frame
    if pending is not None and len(pending):
        yield pending


def tensorize_cohort(blocks: Iterable[pd.DataFrame], out_dir: str | Path, *, categories: list[str],
                     location_cluster: pd.Series, assign_split: Callable[[np.ndarray, np.ndarray], np.ndarray],
                     cfg: TensorConfig,
                     stations: pd.DataFrame | None = None, progress: bool = True, n_users: int | None = None,
                     meta: dict | Callable[[], dict] | None = None) -> dict:
    """Tensorize a user-grouped event stream into ``out_dir``: shards, then ``dataset.json``.

    ``stations`` (index location id, columns ``lat, lon``) enables the geographic grid layout
    (``cfg.spatial`` ``auto`` or ``grid``). ``assign_split(user_ids, n_events)`` names each
    user's split as its events complete (e.g. :class:`scope.data.splits.UserSplitter`); the normaliser
    is fitted on ``train`` users only. ``meta`` (or what ``meta()`` returns once the stream is
    consumed) is stored as is in ``dataset.json``. Returns
    the ``dataset.json`` content; it is written last, so its presence marks a complete dataset.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DATASET_FILE).unlink(missing_ok=True)  # an unfinished rewrite must not look complete
    for stale in out_dir.glob("shard-*.safetensors"):
        stale.unlink()
    use_grid = cfg.spatial == "grid" or (cfg.spatial == "auto" and stations is not None)
    if use_grid and stations is None:
        raise ValueError("spatial='grid' needs station coordinates (base_coords.txt); use spatial='topk'")
    grid = GridLayout(stations, location_cluster, cfg.cell_m) if use_grid else None

    splits: dict[str, list[int]] = {}
    normalizer = Log1pStandardizer()
    shards, seen = [], set()
    totals = {"items": 0, "users": 0, "events": 0, "dropped_events": 0}
    with tqdm(total=n_users, desc="tensorizing", unit="user", disable=not progress) as bar:
        for batch in _user_batches(blocks, cfg.shard_users):
            users, n_events = np.unique(batch["user_id"].to_numpy(), return_counts=True)
            if seen.intersection(users.tolist()):
                raise ValueError("the event stream is not grouped by user_id: a user reappears in a later shard "
                                 "(sort the trace by user_id, then timestamp)")
            seen.update(users.tolist())
            names = np.asarray(assign_split(users, n_events)).astype(str)
            for name in np.unique(names):
                splits.setdefault(str(name), []).extend(users[names == name].tolist())
            items = tensorize_users(batch, categories, location_cluster, cfg, grid)
            split_of_item = names[np.searchsorted(users, items["user_id"])]
            unknown = set(split_of_item) - set(SPLIT_NAMES)
            if unknown:
                raise ValueError(f"assign_split returned unknown split names {sorted(unknown)}; expected {SPLIT_NAMES}")
            items["split_code"] = np.array([SPLIT_NAMES.index(n) for n in split_of_item], np.int8)
            train = split_of_item == "train"
            if train.any():
                normalizer.update(items["x"][train], items["available"][train])
            name = f"shard-{len(shards):05d}.safetensors"
            with atomic_path(out_dir / name) as tmp:
                save_file(items, str(tmp))
            fields = {key: {"dtype": str(v.dtype), "shape": ["N", *v.shape[1:]]} for key, v in items.items()}
            shards.append({"file": name, "items": int(len(items["user_id"])), "users": int(len(users))})
            totals["items"] += len(items["user_id"])
            totals["users"] += len(users)
            totals["events"] += len(batch)
            totals["dropped_events"] += int(items["dropped_events"].sum())
            bar.update(len(users))
    if not shards:
        raise ValueError("no events to tensorize")
    C = len(categories) + 2
    dataset = {
        "format_version": FORMAT_VERSION,
        "config": asdict(cfg),
        "shape": {"C": C, "T": cfg.window_slots, "H": cfg.height, "W": cfg.width},
        "channels": channel_names(categories),
        "fields": fields,
        "layout": "grid" if grid else "topk",
        "grid": asdict(grid.grid) if grid else None,
        "normalizer": normalizer.finalize().to_dict(),
        "split_names": SPLIT_NAMES,
        "splits": {name: sorted(splits.get(name, [])) for name in SPLIT_NAMES},
        "shards": shards,
        "totals": totals,
        "meta": (meta() if callable(meta) else meta) or {},
    }
    write_json(out_dir / DATASET_FILE, dataset)
    return dataset


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

ITEM_KEYS = ("x", "available", "timestamps", "cell_cluster", "slot_cluster", "user_id", "window", "start",
             "dropped_events")


class BehaviourTensors(torch.utils.data.Dataset):
    """Memory-mapped view of a tensorized cohort: one item per (user, window).

    ``split`` keeps one split's items; ``shards`` keeps some shards (e.g. this process's,
    :meth:`shards_for_rank`); ``normalized=True`` returns ``x`` on the model's scale.
    """

    def __init__(self, root: str | Path, split: str | None = None, *, shards: Iterable[int] | None = None,
                 normalized: bool = False):
        self.root = Path(root)
        path = self.root / DATASET_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: not a tensorized cohort (run recipes/tensorize.py), "
                                    "or tensorizing did not finish")
        self.meta = json.loads(path.read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {self.meta.get('format_version')} is not {FORMAT_VERSION}")
        if split is not None and split not in self.meta["split_names"]:
            raise ValueError(f"unknown split {split!r}; this dataset has {self.meta['split_names']}")
        self.normalizer = Log1pStandardizer.from_dict(self.meta["normalizer"])
        self.normalized = normalized
        self._files: dict[int, object] = {}
        selected = range(len(self.meta["shards"])) if shards is None else list(shards)
        code = None if split is None else self.meta["split_names"].index(split)
        index = []
        for s in selected:
            rows = np.arange(self.meta["shards"][s]["items"])
            if code is not None:
                rows = rows[self._file(s).get_tensor("split_code").numpy() == code]
            index.extend((s, int(r)) for r in rows)
        self.index = index

    @property
    def channels(self) -> list[str]:
        return self.meta["channels"]

    def shards_for_rank(self, rank: int, world_size: int) -> list[int]:
        """The shard ids process ``rank`` of ``world_size`` reads (round robin)."""
        return list(range(rank, len(self.meta["shards"]), world_size))

    def _file(self, shard: int):
        if shard not in self._files:
            self._files[shard] = safe_open(str(self.root / self.meta["shards"][shard]["file"]), framework="pt")
        return self._files[shard]

    def __getstate__(self):  # safetensors handles are reopened in DataLoader workers
        return {**self.__dict__, "_files": {}}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        shard, row = self.index[i]
        f = self._file(shard)
        item = {key: f.get_slice(key)[row] for key in ITEM_KEYS}
        if self.normalized:
            item["x"] = self.normalizer.transform(item["x"][None])[0]
        return item

    def arrays(self) -> dict[str, np.ndarray]:
        """Every selected item stacked as numpy arrays (for small cohorts, baselines and tests)."""
        by_shard: dict[int, list[int]] = {}
        for shard, row in self.index:
            by_shard.setdefault(shard, []).append(row)
        parts = [{key: self._file(s).get_tensor(key).numpy()[rows] for key in ITEM_KEYS} for s, rows in by_shard.items()]
        if not parts:
            raise ValueError("no items selected")
        return {key: np.concatenate([p[key] for p in parts]) for key in ITEM_KEYS}
