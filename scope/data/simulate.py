"""The embedded default: a seeded cohort simulator that writes real Tsinghua-format files.

A synthetic city of base stations in zones (residential, business, campus, industrial, leisure,
transport, scenic) with POI profiles over the 17 POI categories of ``base_poi.txt``; an app
catalogue over the 20 app categories; users drawn from personas, each with home / work / leisure
places, a daily plan of where they are per 15-minute slot (weekday and weekend), an hour-of-day
activity curve, app-category preferences modulated by place, lognormal traffic volumes, and
irregularity (missing days, missing hours, bursts). A fraction of users are cold-start users
with very few records. Output: the four Tsinghua files, ``base_coords.txt`` and
``ground_truth.jsonl`` (persona and latent preferences per user, for evaluating profiles).

Every user is generated from its own child seed, so the files depend only on the config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from scope.data.tsinghua import APP2CATEGORY_FILE, BASE_COORDS_FILE, BASE_POI_FILE, CATEGORIES_FILE, TRACE_FILE
from scope.io import atomic_path, write_json

POI_CATEGORIES = (
    "Medical care", "Hotel", "Business affairs", "Life service", "Transportation hub", "Culture",
    "Sports", "Residence", "Entertainment and leisure", "Scenic spot", "Government", "Factory",
    "Shopping", "Restaurant", "Education", "Landmark", "Other",
)
APP_CATEGORIES = (
    "Utilities", "Games", "Entertainment", "News", "Social Networking", "Shopping", "Finance",
    "Business", "Travel", "Lifestyle", "Education", "Health & Fitness", "Infant & Mom",
    "Navigation", "Weather", "Music", "References", "Books", "Photo & Video", "Sports",
)
GROUND_TRUTH_FILE = "ground_truth.jsonl"
SLOTS_PER_DAY = 96
ROLES = ("home", "work", "transit", "leisure")
HOME, WORK, TRANSIT, LEISURE = range(4)


def _vec(names: tuple[str, ...], weights: dict[str, float], base: float) -> np.ndarray:
    out = np.full(len(names), base)
    for name, w in weights.items():
        out[names.index(name)] = w
    return out


# Zone types of the synthetic city: (share of zone centres, POI profile prior).
ZONES = {
    "residential": (0.40, {"Residence": 30, "Life service": 8, "Restaurant": 8, "Shopping": 5, "Education": 3, "Medical care": 2}),
    "business": (0.18, {"Business affairs": 25, "Restaurant": 10, "Hotel": 5, "Government": 4, "Shopping": 4, "Landmark": 2}),
    "campus": (0.08, {"Education": 25, "Culture": 6, "Sports": 5, "Residence": 6, "Restaurant": 5}),
    "industrial": (0.08, {"Factory": 25, "Other": 8, "Business affairs": 3, "Restaurant": 2}),
    "leisure": (0.14, {"Entertainment and leisure": 20, "Shopping": 15, "Restaurant": 12, "Sports": 4, "Culture": 3}),
    "transport": (0.06, {"Transportation hub": 25, "Hotel": 6, "Restaurant": 6, "Shopping": 4}),
    "scenic": (0.06, {"Scenic spot": 20, "Landmark": 10, "Culture": 8, "Hotel": 6, "Restaurant": 4}),
}
ZONE_NAMES = tuple(ZONES)


@dataclass(frozen=True)
class Persona:
    """Where a persona is (day plans of ``(role, start hour)``), when it is active, which apps it uses."""

    weekday_plan: tuple[tuple[int, float], ...]
    weekend_plan: tuple[tuple[int, float], ...]
    activity: tuple[float, ...]            # 24 hourly weights (weekday)
    weekend_activity: tuple[float, ...]    # 24 hourly weights (weekend)
    apps: dict                             # app-category weights (default 0.3)
    home_zone: str = "residential"
    work_zone: str | None = None
    share: float = 1.0


def _curve(points: dict[int, float]) -> tuple[float, ...]:
    """Piecewise-constant 24-hour curve from ``{start hour: weight}``."""
    out, current = [], points.get(0, 0.1)
    for hour in range(24):
        current = points.get(hour, current)
        out.append(current)
    return tuple(out)


PERSONAS: dict[str, Persona] = {
    "commuter": Persona(
        weekday_plan=((HOME, 0), (TRANSIT, 7.5), (WORK, 8.5), (TRANSIT, 17.5), (HOME, 18.5)),
        weekend_plan=((HOME, 0), (LEISURE, 14), (HOME, 18)),
        activity=_curve({0: 0.05, 7: 1.2, 9: 0.5, 12: 1.1, 13: 0.5, 17: 1.2, 19: 1.4, 23: 0.4}),
        weekend_activity=_curve({0: 0.1, 9: 0.8, 12: 1.0, 19: 1.3, 23: 0.5}),
        apps={"Business": 3, "Finance": 2, "News": 2.5, "Navigation": 1.5, "Social Networking": 4, "Utilities": 2, "Music": 1.2},
        work_zone="business", share=0.28),
    "student": Persona(
        weekday_plan=((HOME, 0), (WORK, 8), (LEISURE, 12), (WORK, 13), (LEISURE, 17.5), (HOME, 21)),
        weekend_plan=((HOME, 0), (LEISURE, 13), (HOME, 20)),
        activity=_curve({0: 0.5, 2: 0.1, 8: 0.6, 12: 1.3, 13: 0.6, 17: 1.2, 21: 1.6}),
        weekend_activity=_curve({0: 0.6, 3: 0.1, 10: 0.9, 20: 1.6}),
        apps={"Games": 4, "Social Networking": 4, "Education": 3, "Entertainment": 2.5, "Music": 2, "Photo & Video": 2, "References": 1.5},
        home_zone="campus", work_zone="campus", share=0.2),
    "night_shift": Persona(
        weekday_plan=((WORK, 0), (TRANSIT, 6), (HOME, 7), (LEISURE, 16), (HOME, 19), (TRANSIT, 21), (WORK, 22)),
        weekend_plan=((HOME, 0), (LEISURE, 15), (HOME, 19)),
        activity=_curve({0: 0.8, 6: 1.2, 8: 0.05, 15: 1.0, 19: 0.8, 22: 0.7}),
        weekend_activity=_curve({0: 0.6, 4: 0.1, 11: 0.7, 15: 1.0, 22: 0.8}),
        apps={"Games": 2.5, "Entertainment": 3, "Music": 2.5, "Utilities": 2, "Social Networking": 2, "Lifestyle": 1.5},
        work_zone="industrial", share=0.12),
    "homebody": Persona(
        weekday_plan=((HOME, 0), (LEISURE, 10), (HOME, 11)),
        weekend_plan=((HOME, 0), (LEISURE, 16), (HOME, 17)),
        activity=_curve({0: 0.2, 2: 0.05, 9: 0.8, 13: 1.0, 19: 1.3, 24: 0.5}),
        weekend_activity=_curve({0: 0.3, 3: 0.05, 9: 0.9, 19: 1.3}),
        apps={"Shopping": 3.5, "Entertainment": 3.5, "Infant & Mom": 2, "Lifestyle": 2.5, "Social Networking": 3, "Photo & Video": 1.5},
        share=0.16),
    "traveller": Persona(
        weekday_plan=((HOME, 0), (TRANSIT, 8), (LEISURE, 10), (TRANSIT, 18), (HOME, 20)),
        weekend_plan=((HOME, 0), (TRANSIT, 9), (LEISURE, 10.5), (TRANSIT, 17), (HOME, 19)),
        activity=_curve({0: 0.1, 7: 1.0, 10: 0.9, 18: 1.3, 23: 0.4}),
        weekend_activity=_curve({0: 0.1, 7: 1.0, 10: 0.9, 18: 1.3, 23: 0.4}),
        apps={"Navigation": 4.5, "Travel": 4.5, "Photo & Video": 3.5, "Weather": 2, "Social Networking": 2.5, "Lifestyle": 1.5},
        home_zone="transport", share=0.12),
    "retiree": Persona(
        weekday_plan=((HOME, 0), (LEISURE, 6), (HOME, 8.5), (LEISURE, 9.5), (HOME, 10.5)),
        weekend_plan=((HOME, 0), (LEISURE, 6), (HOME, 8.5)),
        activity=_curve({0: 0.02, 5: 0.6, 7: 1.2, 12: 0.6, 18: 1.0, 21: 0.1}),
        weekend_activity=_curve({0: 0.02, 5: 0.6, 7: 1.2, 12: 0.6, 18: 1.0, 21: 0.1}),
        apps={"News": 4, "Health & Fitness": 3.5, "Weather": 2.5, "Lifestyle": 2, "Books": 2, "Social Networking": 2, "Finance": 1.2},
        share=0.12),
}

# How the place modulates app-category choice (multiplicative).
PLACE_APPS = {
    HOME: {"Entertainment": 1.5, "Games": 1.5, "Photo & Video": 1.3, "Business": 0.3},
    WORK: {"Business": 3.0, "Finance": 1.5, "Education": 2.0, "Games": 0.4, "Entertainment": 0.5},
    TRANSIT: {"Navigation": 5.0, "Music": 2.0, "Travel": 2.5, "News": 1.5, "Weather": 1.5},
    LEISURE: {"Shopping": 2.5, "Photo & Video": 2.0, "Lifestyle": 2.0, "Navigation": 1.5, "Sports": 2.0, "Business": 0.3},
}
# Median bytes per record by app category (lognormal traffic).
TRAFFIC_MEDIAN = {"Entertainment": 200e3, "Photo & Video": 150e3, "Games": 60e3, "Music": 80e3, "Navigation": 20e3, "Travel": 15e3}
APP_CATEGORY_SHARE = {"Utilities": 0.14, "Games": 0.12, "Lifestyle": 0.08, "Entertainment": 0.07, "Education": 0.06, "Shopping": 0.06}


@dataclass
class CohortConfig:
    """Knobs of the simulated cohort (defaults mirror the real dataset's density: ~600 records/user/day)."""

    n_users: int = 200
    days: int = 7
    start_date: str = "2016-04-20"
    seed: int = 0
    events_per_day: float = 600.0
    n_stations: int = 2000
    n_apps: int = 1500
    city_km: float = 24.0
    cold_start_fraction: float = 0.05
    cold_start_max_events: int = 30
    missing_day_prob: float = 0.08
    missing_hour_prob: float = 0.04
    burst_prob: float = 0.03
    explore_prob: float = 0.03

    def __post_init__(self):
        if self.n_users < 1 or self.days < 1:
            raise ValueError(f"n_users and days must be >= 1, got {self.n_users} and {self.days}")
        if not 0 <= self.cold_start_fraction <= 1:
            raise ValueError(f"cold_start_fraction must be in [0, 1], got {self.cold_start_fraction}")


# --------------------------------------------------------------------------------------------
# The city and the app catalogue
# --------------------------------------------------------------------------------------------

@dataclass
class City:
    xy: np.ndarray          # [S, 2] km
    zone: np.ndarray        # [S] index into ZONE_NAMES
    poi: np.ndarray         # [S, 17] counts
    app_category: np.ndarray  # [n_apps]
    app_popularity: np.ndarray  # [n_apps]
    neighbours: np.ndarray  # [S, 3]: each station, then its two nearest (they serve the same place)

    def lat_lon(self, origin=(31.10, 121.30)) -> np.ndarray:
        lat = origin[0] + self.xy[:, 1] / 111.0
        lon = origin[1] + self.xy[:, 0] / (111.0 * np.cos(np.radians(origin[0])))
        return np.stack([lat, lon], axis=1)

    def stations_in(self, zone: str) -> np.ndarray:
        return np.flatnonzero(self.zone == ZONE_NAMES.index(zone))


def build_city(cfg: CohortConfig, rng: np.random.Generator) -> City:
    n_centres = max(20, cfg.n_stations // 40)
    shares = np.array([share for share, _ in ZONES.values()])
    centre_zone = rng.choice(len(ZONES), size=n_centres, p=shares / shares.sum())
    centre_zone[: len(ZONES)] = np.arange(len(ZONES))  # every zone type exists
    centre_xy = rng.uniform(0, cfg.city_km, size=(n_centres, 2))
    owner = rng.integers(0, n_centres, size=cfg.n_stations)
    owner[:n_centres] = np.arange(n_centres)
    xy = np.clip(centre_xy[owner] + rng.normal(0, 0.8, size=(cfg.n_stations, 2)), 0, cfg.city_km)
    zone = centre_zone[owner]
    priors = np.stack([_vec(POI_CATEGORIES, profile, 0.5) for _, profile in ZONES.values()])
    profile = np.stack([rng.dirichlet(priors[z]) for z in zone])
    total = rng.lognormal(3.5, 0.9, size=cfg.n_stations)
    poi = rng.poisson(profile * total[:, None]).astype(np.int64)

    share = _vec(APP_CATEGORIES, APP_CATEGORY_SHARE, 0.04)
    app_category = rng.choice(len(APP_CATEGORIES), size=cfg.n_apps, p=share / share.sum())
    app_category[: len(APP_CATEGORIES)] = np.arange(len(APP_CATEGORIES))
    app_popularity = rng.zipf(1.6, size=cfg.n_apps).astype(float)
    _, neighbours = cKDTree(xy).query(xy, k=3)
    return City(xy, zone, poi, app_category, app_popularity, neighbours)


# --------------------------------------------------------------------------------------------
# One user
# --------------------------------------------------------------------------------------------

def _plan_slots(plan, offset_slots: int) -> np.ndarray:
    """``((role, start hour), ...)`` -> role per 15-minute slot of one day, shifted by an offset."""
    roles = np.empty(SLOTS_PER_DAY, np.int64)
    starts = [int(round(h * 4)) for _, h in plan] + [SLOTS_PER_DAY]
    for (role, _), a, b in zip(plan, starts[:-1], starts[1:]):
        roles[a:b] = role
    return np.roll(roles, offset_slots)


def _nearest(city: City, candidates: np.ndarray, point: np.ndarray, rng, spread: int = 5) -> int:
    d = np.linalg.norm(city.xy[candidates] - point, axis=1)
    return int(candidates[np.argsort(d)[rng.integers(0, min(spread, len(candidates)))]])


def place_user(city: City, persona: Persona, rng: np.random.Generator, max_leisure: int
               ) -> tuple[int, int, int, np.ndarray]:
    """A user's home, work and transit stations (work near home, transit between them) and 2 to
    ``max_leisure`` leisure / scenic stations near home."""
    home = int(rng.choice(city.stations_in(persona.home_zone)))
    work = _nearest(city, city.stations_in(persona.work_zone or "leisure"), city.xy[home] + rng.normal(0, 4, 2), rng)
    transit = _nearest(city, city.stations_in("transport"), (city.xy[home] + city.xy[work]) / 2, rng)
    leisure_pool = np.concatenate([city.stations_in("leisure"), city.stations_in("scenic")])
    leisure = np.array([_nearest(city, leisure_pool, city.xy[home] + rng.normal(0, 3, 2), rng, spread=8)
                        for _ in range(rng.integers(2, max_leisure + 1))])
    return home, work, transit, leisure


def day_roles(persona: Persona, weekend: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """The role (home / work / transit / leisure) of every 15-minute slot of every day: the persona's
    weekday or weekend plan, shifted by a per-user offset (returned, in slots) plus a per-day jitter."""
    offset = int(rng.integers(-3, 4))
    return np.concatenate([_plan_slots(persona.weekend_plan if w else persona.weekday_plan,
                                       offset + int(rng.integers(-2, 3))) for w in weekend]), offset


def simulate_user(user_id: int, persona_name: str, cold_start: bool, city: City, cfg: CohortConfig,
                  rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict]:
    """Events of one user as column arrays (seconds since the start date), and its ground truth."""
    persona = PERSONAS[persona_name]
    home, work, transit, leisure = place_user(city, persona, rng, max_leisure=4)

    n_days, n_slots = cfg.days, cfg.days * SLOTS_PER_DAY
    start = pd.Timestamp(cfg.start_date)
    weekend = np.array([(start + pd.Timedelta(days=d)).day_of_week >= 5 for d in range(n_days)])
    roles, offset = day_roles(persona, weekend, rng)

    # Station of every slot: the place of its role; travellers move to a new area every day.
    place = {HOME: np.full(n_days, home), WORK: np.full(n_days, work), TRANSIT: np.full(n_days, transit)}
    if persona_name == "traveller":
        hotels = city.stations_in("transport")
        place[HOME] = rng.choice(hotels, size=n_days)
        place[TRANSIT] = rng.choice(hotels, size=n_days)
    day_of_slot = np.arange(n_slots) // SLOTS_PER_DAY
    station = np.empty(n_slots, np.int64)
    for role in (HOME, WORK, TRANSIT):
        sel = roles == role
        station[sel] = place[role][day_of_slot[sel]]
    sel = roles == LEISURE
    station[sel] = leisure[rng.integers(0, len(leisure), size=n_days)][day_of_slot[sel]]

    # Activity per slot: persona curve x user level, with missing days/hours and bursts.
    hour = np.arange(n_slots) % SLOTS_PER_DAY // 4
    curve = np.where(weekend[day_of_slot], np.array(persona.weekend_activity)[hour], np.array(persona.activity)[hour])
    level = rng.lognormal(0.0, 0.35)
    rate = curve / np.mean(persona.activity) * cfg.events_per_day / SLOTS_PER_DAY * level
    observed_day = rng.random(n_days) >= cfg.missing_day_prob
    observed_day[rng.integers(0, n_days)] = True
    hour_missing = np.repeat(rng.random(n_days * 24) < cfg.missing_hour_prob, 4)
    burst = np.repeat(np.where(rng.random(n_days * 24) < cfg.burst_prob, rng.uniform(3, 8, n_days * 24), 1.0), 4)
    rate = rate * observed_day[day_of_slot] * ~hour_missing * burst
    counts = rng.poisson(rate)
    if cold_start:
        keep = rng.integers(3, cfg.cold_start_max_events + 1)
        idx = np.repeat(np.arange(n_slots), counts)
        chosen = np.sort(rng.choice(idx, size=min(keep, len(idx)), replace=False)) if len(idx) else idx
        counts = np.bincount(chosen, minlength=n_slots)
    slot = np.repeat(np.arange(n_slots), counts)
    n = len(slot)

    # App category: user preference x place modulation; app: the user's own apps of that category.
    base = _vec(APP_CATEGORIES, persona.apps, 0.3)
    preference = base * rng.gamma(4.0, 0.25, size=len(APP_CATEGORIES))
    preference /= preference.sum()
    by_role = np.stack([preference * _vec(APP_CATEGORIES, PLACE_APPS[r], 1.0) for r in range(len(ROLES))])
    cdf = np.cumsum(by_role / by_role.sum(1, keepdims=True), axis=1)
    category = (rng.random(n)[:, None] > cdf[roles[slot]]).sum(1).clip(max=len(APP_CATEGORIES) - 1)
    burst_slot = burst[slot] > 1
    category[burst_slot] = np.argmax(preference * _vec(APP_CATEGORIES, {"Entertainment": 3, "Games": 2, "Photo & Video": 2}, 1))

    app_of = []
    for c in range(len(APP_CATEGORIES)):
        pool = np.flatnonzero(city.app_category == c)
        k = min(len(pool), int(rng.integers(1, 5)))
        weights = city.app_popularity[pool] / city.app_popularity[pool].sum()
        app_of.append(rng.choice(pool, size=k, replace=False, p=weights))
    apps = np.empty(n, np.int64)
    for c in np.unique(category):
        sel = category == c
        apps[sel] = rng.choice(app_of[c], size=int(sel.sum()), p=_zipf_weights(len(app_of[c])))

    # Location: the slot's place, or one of the two nearest stations serving it, sometimes elsewhere.
    serving = rng.choice(3, size=n, p=[0.8, 0.15, 0.05])
    location = city.neighbours[station[slot], serving]
    explore = rng.random(n) < cfg.explore_prob
    location[explore] = rng.integers(0, len(city.zone), size=int(explore.sum()))

    median = _vec(APP_CATEGORIES, TRAFFIC_MEDIAN, 5e3)[category]
    traffic = np.maximum(1, np.round(rng.lognormal(np.log(median), 1.1))).astype(np.int64)
    seconds = slot * 900 + rng.integers(0, 900, size=n)
    order = np.argsort(seconds, kind="stable")

    events = {"user_id": np.full(n, user_id, np.int64), "seconds": seconds[order],
              "base_station_id": location[order], "app_id": apps[order], "traffic_bytes": traffic[order]}
    truth = {
        "user_id": user_id, "persona": persona_name, "cold_start": bool(cold_start), "n_events": int(n),
        "home_station": home, "work_station": work if persona.work_zone else None, "transit_station": transit,
        "leisure_stations": leisure.tolist(), "schedule_offset_minutes": offset * 15,
        "activity_level": round(float(level), 4),
        "app_category_preference": {name: round(float(p), 5) for name, p in zip(APP_CATEGORIES, preference)},
        "top_app_categories": [APP_CATEGORIES[i] for i in np.argsort(-preference)[:3]],
        "observed_days": observed_day.astype(int).tolist(),
    }
    return events, truth


def _zipf_weights(k: int) -> np.ndarray:
    w = 1.0 / np.arange(1, k + 1)
    return w / w.sum()


# --------------------------------------------------------------------------------------------
# The cohort
# --------------------------------------------------------------------------------------------

def _yyyymmddhhmmss(seconds: np.ndarray, start: pd.Timestamp) -> np.ndarray:
    t = pd.to_datetime(start.value // 10**9 + seconds, unit="s")
    return (t.year.to_numpy(np.int64) * 10**10 + t.month.to_numpy(np.int64) * 10**8 + t.day.to_numpy(np.int64) * 10**6
            + t.hour.to_numpy(np.int64) * 10**4 + t.minute.to_numpy(np.int64) * 100 + t.second.to_numpy(np.int64))


def simulate_cohort(cfg: CohortConfig, out_dir: str | Path, *, progress: bool = True, batch_users: int = 256) -> dict:
    """Write a simulated cohort in Tsinghua format to ``out_dir``; return a small summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    city_seed, persona_seed, *user_seeds = np.random.SeedSequence(cfg.seed).spawn(cfg.n_users + 2)
    city = build_city(cfg, np.random.default_rng(city_seed))
    rng = np.random.default_rng(persona_seed)
    names = list(PERSONAS)
    shares = np.array([PERSONAS[p].share for p in names])
    personas = rng.choice(names, size=cfg.n_users, p=shares / shares.sum())
    cold = rng.random(cfg.n_users) < cfg.cold_start_fraction
    start = pd.Timestamp(cfg.start_date)

    _write_metadata(city, out_dir)
    n_events = 0
    write_options = pa_csv.WriteOptions(include_header=False, delimiter=" ", quoting_style="none")
    with atomic_path(out_dir / TRACE_FILE) as trace_tmp, atomic_path(out_dir / GROUND_TRUTH_FILE) as truth_tmp, \
            open(trace_tmp, "wb") as trace, open(truth_tmp, "w") as truth_out:
        bar = tqdm(total=cfg.n_users, desc="simulating users", unit="user", disable=not progress)
        for lo in range(0, cfg.n_users, batch_users):
            columns = []
            for i in range(lo, min(lo + batch_users, cfg.n_users)):
                events, truth = simulate_user(i + 1, str(personas[i]), bool(cold[i]), city, cfg,
                                              np.random.default_rng(user_seeds[i]))
                columns.append(events)
                truth_out.write(json.dumps(truth) + "\n")
                bar.update(1)
            batch = {k: np.concatenate([c[k] for c in columns]) for k in columns[0]}
            table = pa.table({
                "user_id": batch["user_id"], "timestamp": _yyyymmddhhmmss(batch["seconds"], start),
                "base_station_id": batch["base_station_id"], "app_id": batch["app_id"],
                "traffic_bytes": batch["traffic_bytes"]})
            pa_csv.write_csv(table, trace, write_options)
            n_events += table.num_rows
        bar.close()
    summary = {"config": asdict(cfg), "events": n_events, "users": cfg.n_users,
               "personas": pd.Series(personas).value_counts().to_dict(), "cold_start_users": int(cold.sum())}
    write_json(out_dir / "cohort.json", summary)
    return summary


def _write_metadata(city: City, out_dir: Path) -> None:
    with atomic_path(out_dir / CATEGORIES_FILE) as tmp:
        tmp.write_text("\n".join(f"{i}\t'{name}'" for i, name in enumerate(APP_CATEGORIES)) + "\n")
    with atomic_path(out_dir / APP2CATEGORY_FILE) as tmp:
        tmp.write_text("".join(f"{a} {c}\n" for a, c in enumerate(city.app_category)))
    poi = pd.DataFrame(city.poi, columns=list(POI_CATEGORIES)).rename_axis("BaseID")
    with atomic_path(out_dir / BASE_POI_FILE) as tmp:
        poi.to_csv(tmp, sep="\t")
    coords = pd.DataFrame(city.lat_lon(), columns=["lat", "lon"]).rename_axis("BaseID")
    with atomic_path(out_dir / BASE_COORDS_FILE) as tmp:
        coords.to_csv(tmp, sep="\t", float_format="%.6f")


def read_ground_truth(directory: str | Path) -> pd.DataFrame:
    """``ground_truth.jsonl`` of a simulated cohort, indexed by user id."""
    return pd.read_json(Path(directory) / GROUND_TRUTH_FILE, lines=True).set_index("user_id")
