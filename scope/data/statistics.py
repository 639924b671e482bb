"""Per-user behaviour statistics behind the structured prompt (U-SCOPE section 5.1).

From a user's history ``H_u = {(a_t, l_t, tau_t)}`` (app category, location, time):

- ``pi_time``: the hour-of-day activity distribution (24 shares), day-part shares and the
  records per active weekday vs weekend day;
- ``C_u in R^{|L| x |A|}``: the joint distribution of location cluster (POI-cluster
  label of the base station, :mod:`scope.data.locations`) and app category;
- ``sigma_u``: sessions per active day (a session ends after ``session_gap_min`` minutes
  without a record), the median gap between sessions, and the regularity ``1 - H(pi_hour) /
  log 24`` (1 = all activity in one hour, 0 = uniform over the day).

Places are ranked per user (``place 1`` = most records); a place is described by its cluster name
and when it is visited, never by its base-station id, so prompts carry no raw identifier.

The paper defines these three in the prose of section 5.1 (between Eq. 22 and Eq. 23); they
summarise the history ``H_u`` of Eq. 21.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from scope.data.locations import LocationClusters

DAY_PARTS = {"night": (0, 6), "morning": (6, 12), "afternoon": (12, 18), "evening": (18, 24)}
TINY_HISTORY = 20   # fewer records than this: the prompt says the statistics are unreliable


@dataclass
class Place:
    """One of the user's most visited locations (described without its base-station id)."""

    rank: int
    area: str                       # POI-cluster name
    share: float                    # share of the user's records
    day_parts: dict[str, float]     # share of this place's records per day part
    weekday_share: float            # share of this place's records on weekdays
    location_id: int = field(repr=False, default=-1)   # internal only: never rendered

    @property
    def main_day_part(self) -> str:
        return max(self.day_parts, key=self.day_parts.get)


@dataclass
class UserStatistics:
    """``pi_time``, ``C_u`` and ``sigma_u`` of one user (what the prompt ``x_u`` of Eq. 23 summarises), plus summaries."""

    user_id: int
    n_events: int
    active_days: int
    span_days: int
    hour_share: np.ndarray               # [24] pi_time over hours
    day_part_share: dict[str, float]
    weekday_rate: float                  # records per active weekday
    weekend_rate: float                  # records per active weekend day
    app_share: dict[str, float]          # marginal of C_u over places, sorted descending
    area_share: dict[str, float]         # marginal of C_u over app categories, sorted descending
    co_occurrence: np.ndarray            # [|L|, |A|] C_u (joint shares)
    area_names: list[str]
    app_names: list[str]
    places: list[Place]
    sessions_per_day: float
    median_session_gap_min: float
    regularity: float                    # 1 - normalised entropy of hour_share
    app_entropy: float                   # normalised entropy of app categories
    distinct_places: int

    @property
    def empty(self) -> bool:
        return self.n_events == 0

    @property
    def tiny(self) -> bool:
        return 0 < self.n_events < TINY_HISTORY

    def top_apps(self, k: int = 3) -> list[str]:
        return list(self.app_share)[:k]

    def top_areas(self, k: int = 3) -> list[str]:
        return list(self.area_share)[:k]

    def peak_hours(self, k: int = 3) -> list[int]:
        if self.empty:
            return []
        return [int(h) for h in np.argsort(-self.hour_share, kind="stable")[:k]]

    def top_pairs(self, k: int = 5) -> list[tuple[str, str, float]]:
        """The ``k`` largest entries of ``C_u``: (area, app category, share)."""
        flat = self.co_occurrence.ravel()
        order = np.argsort(-flat, kind="stable")[:k]
        n_apps = len(self.app_names)
        return [(self.area_names[i // n_apps], self.app_names[i % n_apps], float(flat[i])) for i in order if flat[i] > 0]


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _sorted_shares(counts: pd.Series) -> dict[str, float]:
    total = counts.sum()
    if total == 0:
        return {}
    counts = counts[counts > 0].sort_values(ascending=False, kind="stable")
    return {str(k): float(v / total) for k, v in counts.items()}


def user_statistics(user_id: int, events: pd.DataFrame, categories: list[str], clusters: LocationClusters, *,
                    session_gap_min: float = 10.0, n_places: int = 3) -> UserStatistics:
    """Statistics of one user's events (any number of rows, zero included)."""
    areas = list(clusters.names)
    n = len(events)
    co = np.zeros((len(areas), len(categories)))
    if n == 0:
        return UserStatistics(user_id, 0, 0, 0, np.zeros(24), dict.fromkeys(DAY_PARTS, 0.0), 0.0, 0.0, {}, {}, co,
                              areas, list(categories), [], 0.0, 0.0, 0.0, 0.0, 0)
    t = pd.DatetimeIndex(events["timestamp"])
    hour, day = t.hour.to_numpy(), t.normalize()
    weekend = t.day_of_week.to_numpy() >= 5
    hour_share = np.bincount(hour, minlength=24) / n
    parts = {name: float(hour_share[a:b].sum()) for name, (a, b) in DAY_PARTS.items()}
    day_weekend = pd.Series(weekend, index=day).groupby(level=0).first()
    per_day = pd.Series(1, index=day).groupby(level=0).size()
    weekday_rate = float(per_day[~day_weekend.to_numpy()].mean()) if (~day_weekend).any() else 0.0
    weekend_rate = float(per_day[day_weekend.to_numpy()].mean()) if day_weekend.any() else 0.0

    cluster = clusters.of(events["location_id"].to_numpy())
    app = events["app_category"].to_numpy().astype(np.int64)
    known = cluster >= 0
    np.add.at(co, (cluster[known].astype(np.int64), app[known]), 1.0)
    co /= max(known.sum(), 1)
    app_share = _sorted_shares(pd.Series(np.bincount(app, minlength=len(categories)), index=list(categories)))
    area_share = _sorted_shares(pd.Series(co.sum(axis=1), index=areas))

    places = []
    location = events["location_id"].to_numpy()
    top = pd.Series(location).value_counts(sort=True)
    for rank, (loc, count) in enumerate(top.iloc[:n_places].items(), 1):
        at = location == loc
        h = np.bincount(hour[at], minlength=24) / count
        c = int(clusters.of([loc])[0])
        places.append(Place(rank, areas[c] if c >= 0 else "unknown area", float(count / n),
                            {p: float(h[a:b].sum()) for p, (a, b) in DAY_PARTS.items()},
                            float((~weekend[at]).mean()), int(loc)))

    seconds = events["timestamp"].to_numpy().astype("datetime64[s]").astype(np.int64)
    gaps = np.diff(np.sort(seconds)) / 60.0
    breaks = gaps > session_gap_min
    sessions = 1 + int(breaks.sum())
    app_p = np.bincount(app, minlength=len(categories)) / n
    return UserStatistics(
        user_id=int(user_id), n_events=n, active_days=len(per_day),
        span_days=int((day.max() - day.min()).days) + 1,
        hour_share=hour_share, day_part_share=parts, weekday_rate=weekday_rate, weekend_rate=weekend_rate,
        app_share=app_share, area_share=area_share, co_occurrence=co, area_names=areas, app_names=list(categories),
        places=places, sessions_per_day=sessions / len(per_day),
        median_session_gap_min=float(np.median(gaps[breaks])) if breaks.any() else 0.0,
        regularity=1.0 - _entropy(hour_share) / np.log(24), app_entropy=_entropy(app_p) / np.log(len(categories)),
        distinct_places=int(len(top)))


def cohort_statistics(events: pd.DataFrame, categories: list[str], clusters: LocationClusters,
                      user_ids=None, **kwargs) -> dict[int, UserStatistics]:
    """Statistics of every user (or of ``user_ids``, which may include users without events)."""
    groups = {int(u): g for u, g in events.groupby("user_id", sort=True)}
    ids = sorted(groups) if user_ids is None else [int(u) for u in user_ids]
    empty = events.iloc[:0]
    return {u: user_statistics(u, groups.get(u, empty), categories, clusters, **kwargs) for u in ids}


def population_statistics(events: pd.DataFrame, categories: list[str], clusters: LocationClusters) -> UserStatistics:
    """The whole cohort pooled as one pseudo-user: the popularity baseline of Eq. 27's ``y_l``."""
    return user_statistics(-1, events, categories, clusters)
