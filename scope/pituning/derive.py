"""Intents derived from Tsinghua-format traces: the paper's Mobile-dataset protocol on the toolchain's cohort.

The PITuning paper's Mobile dataset "use[s] the location category as the activity and intent type"
(sec. 4.1.1). Here, from any Tsinghua-format cohort (:func:`scope.data.tsinghua.load_cohort`, the
same files U-SCOPE and completion read):

- a **record** is one user's activity in one time slot of ``record_minutes`` (default 30): its
  station is the station that served most of the slot's app records, its **event** the app
  category used most in the slot (events = the cohort's app categories);
- its **intent** is the POI category that dominates the station's ``base_poi.txt`` profile (the
  largest count; ties go to the earlier column): Residence, Education, Business affairs, ...
  The vocabulary is the POI categories that label at least one record, in ``base_poi.txt`` order;
- every record after the first ``history`` is a prediction point (:mod:`scope.pituning.data`):
  the model sees the previous records with their stations and is asked for the next record's
  intent at its weekday and slot; the query's own station is hidden (it *is* the label).

Bad input: the trace is read by the validating reader (``lenient`` skips and counts its bad
rows). A station whose POI counts are all zero has no category: strict mode raises a
:class:`DataError` naming the trace file, line and ``base_station_id``; lenient mode drops those
app records and counts them (``rows_without_poi``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from scope.data.events import DataError
from scope.data.tsinghua import BASE_POI_FILE, TRACE_FILE, load_cohort
from scope.pituning.data import IntentCohort


@dataclass
class DeriveConfig:
    """How Tsinghua-format traces become intent records (see the module docstring)."""

    record_minutes: int = 30          # one record per user and active slot of this width
    lenient: bool = False             # skip and count bad trace rows and rows at stations without POI

    def __post_init__(self):
        if not 0 < self.record_minutes <= 24 * 60 or (24 * 60) % self.record_minutes:
            raise ValueError(f"record_minutes must divide a day (e.g. 15, 30, 60), got {self.record_minutes}")


def station_intents(base_poi: pd.DataFrame) -> pd.Series:
    """BaseID -> index of the dominant POI column (-1 where every count is zero)."""
    counts = base_poi.to_numpy(np.float64)
    return pd.Series(np.where(counts.sum(1) > 0, counts.argmax(1), -1), index=base_poi.index)


def _modal(frame: pd.DataFrame, keys: list[str], column: str) -> pd.Series:
    """The most frequent ``column`` value per ``keys`` group (ties: the smallest value)."""
    sizes = frame.groupby(keys + [column], sort=True).size()
    return sizes.groupby(level=keys, sort=False).idxmax().map(lambda key: key[-1])


def derive_intents(events: pd.DataFrame, base_poi: pd.DataFrame, cfg: DeriveConfig,
                   trace_path: str | Path = TRACE_FILE) -> tuple[pd.DataFrame, list[str], dict]:
    """Validated Tsinghua events -> (records, intent names, counts).

    ``events``: the frame of :func:`scope.data.tsinghua.load_cohort` (row ``i`` is line ``i + 1`` of
    a strictly read trace). Records: ``user_id, seconds, base_station_id, event, intent`` (ids
    into the cohort's app categories and the returned intent names), sorted by user and time.
    """
    intent_of = station_intents(base_poi)
    station_intent = intent_of.reindex(events["location_id"].to_numpy()).to_numpy()
    no_poi = station_intent < 0
    if no_poi.any() and not cfg.lenient:
        i = int(np.flatnonzero(no_poi)[0])
        raise DataError(trace_path, i + 1, "base_station_id",
                        f"base station {events['location_id'].iat[i]} has no POI counts in {BASE_POI_FILE} (all zero), "
                        "so its records have no intent; pass lenient=True (--lenient true) to skip and count them")
    kept = events[~no_poi]
    frame = pd.DataFrame({"user_id": kept["user_id"].to_numpy(),
                          "record": kept["timestamp"].to_numpy().astype("datetime64[s]").astype(np.int64)
                          // (cfg.record_minutes * 60),
                          "station": kept["location_id"].to_numpy().astype(np.int64),
                          "category": kept["app_category"].to_numpy().astype(np.int64)})
    keys = ["user_id", "record"]
    station = _modal(frame, keys, "station")
    records = pd.DataFrame({"base_station_id": station, "event": _modal(frame, keys, "category").reindex(station.index)})
    records = records.reset_index().sort_values(keys, kind="stable", ignore_index=True)
    label = intent_of.reindex(records["base_station_id"].to_numpy()).to_numpy()
    used = np.unique(label)
    remap = np.full(base_poi.shape[1], -1)
    remap[used] = np.arange(len(used))
    out = pd.DataFrame({"user_id": records["user_id"].to_numpy(np.int64),
                        "seconds": records["record"].to_numpy(np.int64) * cfg.record_minutes * 60,
                        "base_station_id": records["base_station_id"].to_numpy(np.int64),
                        "event": records["event"].to_numpy(np.int64), "intent": remap[label].astype(np.int64)})
    counts = {"app_records": len(events), "rows_without_poi": int(no_poi.sum()), "records": len(out),
              "users": int(out["user_id"].nunique())}
    return out, [str(base_poi.columns[i]) for i in used], counts


def load_derived_cohort(directory: str | Path, cfg: DeriveConfig, progress: bool = False) -> IntentCohort:
    """Read a Tsinghua-format cohort directory and derive its intent records (module docstring)."""
    cohort = load_cohort(directory, strict=not cfg.lenient, progress=progress)
    records, intents, counts = derive_intents(cohort.events, cohort.base_poi, cfg, Path(directory) / TRACE_FILE)
    counts["trace"] = cohort.report.to_dict()
    return IntentCohort(Path(directory), intents, list(cohort.categories), records, cohort.base_poi,
                        next_record=True, counts=counts)
