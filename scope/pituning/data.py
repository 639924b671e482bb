"""Intent-labelled event sequences for PITuning (DESIGN.md section 7): simulate, write, read, featurize.

An *event* is an app launch (``launch:<app>``) or a system event (``sys:<what>``); an *intent* is
what the user is doing (18 intents, fewer than events). One record ``x = (u, l, t, e)`` is a user,
a base station, a time and an event, labelled with the intent of the session it belongs to.

**Files** (the same format whether simulated or brought by a user), in one directory:

- ``intent_trace.txt``: ``user_id yyyymmddhhmmss base_station_id event intent`` per line, space
  separated, grouped by user and sorted by time (like the Tsinghua ``App_usage_trace.txt``);
- ``intents.txt`` / ``events.txt``: one name per line; the line order fixes the ids;
- ``base_poi.txt`` (optional, Tsinghua format): POI counts per station, clustered into location
  semantics when present.

Every line is validated; the first bad one raises :class:`scope.data.events.DataError` naming file,
line and field.

**Simulation** builds on :mod:`scope.data.simulate`: its city (zones, stations with POI profiles) and
its personas (day plans of home / work / transit / leisure). Each user has intent preferences =
the long-tailed population prior x a persona modulation x individual noise, and with some
probability a personal "passion" for one of the population's tail intents (paper Fig. 1: a user's
distribution differs from the population's). Intents also depend on the place (navigation and
taxi in transit, work at work, ...), the hour, and the previous intent (stickiness + a few
transitions such as taxi -> travel). A session emits an optional system event (shared by several
intents, hence ambiguous) and one or two launches of the intent's apps; a little noise launches a
random app.

**Samples**: a *prediction point* is an event that starts a session (its intent differs from the
previous event's, or more than ``session_gap_minutes`` passed). Its input is the ``history``
(default 30) events before it, plus a query token carrying the point's own location, weekday and
time slot (the phone knows where and when it is asked; the event itself is unknown); the label is
its intent. Users are *population* or *individual* by a seeded hash of their id (disjoint, as in
the paper); each individual user's points are split by time into train / val / test.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from scope.data.events import DataError
from scope.io import atomic_path, write_json
from scope.data.locations import cluster_locations
from scope.data.simulate import (HOME, LEISURE, PERSONAS, POI_CATEGORIES, SLOTS_PER_DAY, TRANSIT, WORK, City,
                            CohortConfig, _nearest, _plan_slots, build_city)
from scope.data.splits import _uniform_hash
from scope.data.tsinghua import BASE_POI_FILE, decode_timestamps, read_base_poi

INTENT_TRACE_FILE = "intent_trace.txt"
INTENTS_FILE = "intents.txt"
EVENTS_FILE = "events.txt"
INTENT_TRUTH_FILE = "intent_ground_truth.jsonl"
TRACE_FORMAT = "user_id yyyymmddhhmmss base_station_id event intent"

# The 18 intents and their population prior: long-tailed (head ~17%, tail < 1%).
INTENT_PRIOR: dict[str, float] = {
    "social": 0.170, "short_video": 0.130, "video": 0.100, "news": 0.080, "music": 0.070, "game": 0.065,
    "shopping": 0.060, "payment": 0.050, "navigation": 0.045, "work": 0.040, "study": 0.035,
    "weather": 0.030, "taxi": 0.022, "photo": 0.015, "audiobook": 0.008, "health": 0.004,
    "sports": 0.003, "travel": 0.002,
}
INTENTS: tuple[str, ...] = tuple(INTENT_PRIOR)

# App launches of each intent (unambiguous) and the system events that may precede a session
# (shared by several intents, so ambiguous on their own).
INTENT_APPS: dict[str, tuple[str, ...]] = {
    "social": ("chat", "microblog", "forum"), "short_video": ("clips", "reels"), "video": ("streaming", "tv_player"),
    "news": ("headlines", "newspaper"), "music": ("music_player", "radio"), "game": ("puzzle_game", "moba_game", "card_game"),
    "shopping": ("marketplace", "flash_sale"), "payment": ("wallet", "bank"), "navigation": ("maps", "transit_map"),
    "work": ("office_mail", "docs", "meeting"), "study": ("dictionary", "courses"), "weather": ("weather",),
    "taxi": ("ride_hailing", "taxi"), "photo": ("camera", "gallery"), "audiobook": ("audiobooks", "podcasts"),
    "health": ("fitness_tracker", "diet"), "sports": ("sports_scores", "running"), "travel": ("trip_booking", "hotels"),
}
INTENT_SYSTEM: dict[str, tuple[str, ...]] = {
    "social": ("screen_unlock", "notification"), "short_video": ("screen_unlock", "headphones_on"),
    "video": ("headphones_on", "wifi_home", "charging"), "news": ("alarm_off", "screen_unlock", "notification"),
    "music": ("headphones_on", "car_bluetooth"), "game": ("wifi_home", "screen_rotate", "charging"),
    "shopping": ("notification", "screen_unlock"), "payment": ("nfc_on", "notification"),
    "navigation": ("gps_on", "car_bluetooth"), "work": ("wifi_office", "calendar_reminder"),
    "study": ("calendar_reminder", "wifi_home"), "weather": ("alarm_off", "screen_unlock"),
    "taxi": ("gps_on", "notification"), "photo": ("screen_rotate", "gps_on"), "audiobook": ("headphones_on", "car_bluetooth"),
    "health": ("step_counter", "alarm_off"), "sports": ("step_counter", "headphones_on", "gps_on"),
    "travel": ("gps_on", "calendar_reminder", "notification"),
}
EVENTS: tuple[str, ...] = tuple(
    [f"launch:{app}" for intent in INTENTS for app in INTENT_APPS[intent]]
    + sorted({f"sys:{s}" for systems in INTENT_SYSTEM.values() for s in systems}))

# How a persona tilts the population prior (multiplicative), and how the place does.
PERSONA_INTENTS: dict[str, dict[str, float]] = {
    "commuter": {"work": 3.0, "news": 2.0, "navigation": 1.5, "payment": 1.5, "music": 1.5},
    "student": {"study": 4.0, "game": 2.5, "short_video": 1.5, "social": 1.3},
    "night_shift": {"game": 2.0, "video": 2.0, "music": 1.5, "work": 1.5},
    "homebody": {"shopping": 2.5, "video": 2.0, "short_video": 1.8, "payment": 1.3},
    "traveller": {"navigation": 3.0, "taxi": 3.0, "photo": 3.0, "travel": 4.0, "weather": 2.0},
    "retiree": {"news": 3.0, "health": 4.0, "weather": 2.5, "audiobook": 3.0, "game": 0.3},
}
PLACE_INTENTS: dict[int, dict[str, float]] = {
    HOME: {"video": 1.8, "game": 1.5, "shopping": 1.4, "work": 0.3, "navigation": 0.2, "taxi": 0.5},
    WORK: {"work": 4.0, "study": 3.0, "payment": 1.3, "game": 0.3, "video": 0.3},
    TRANSIT: {"navigation": 5.0, "taxi": 3.0, "music": 2.5, "audiobook": 2.5, "news": 1.5, "video": 0.4},
    LEISURE: {"photo": 3.0, "shopping": 2.0, "payment": 2.0, "sports": 3.0, "travel": 2.0, "health": 2.0, "work": 0.2},
}
HOUR_INTENTS: dict[str, dict[tuple[int, int], float]] = {  # (from hour, to hour) -> factor
    "news": {(6, 9): 3.0}, "weather": {(6, 9): 3.0}, "work": {(9, 18): 2.0, (20, 24): 0.3},
    "study": {(8, 12): 2.0, (14, 17): 2.0}, "video": {(19, 24): 2.5, (6, 12): 0.5}, "game": {(20, 24): 2.0},
    "health": {(6, 8): 3.0, (18, 20): 2.0}, "sports": {(6, 8): 2.0, (18, 21): 2.0}, "music": {(7, 9): 2.0, (17, 19): 2.0},
}
TRANSITIONS: dict[str, dict[str, float]] = {  # previous intent -> boosted next intents
    "taxi": {"travel": 4.0, "payment": 3.0}, "navigation": {"taxi": 3.0, "travel": 2.0}, "shopping": {"payment": 4.0},
    "photo": {"social": 2.5}, "sports": {"health": 3.0}, "work": {"news": 1.5}, "travel": {"weather": 2.0, "photo": 2.0},
}


@dataclass
class IntentCohortConfig:
    """Knobs of the simulated intent cohort (population + individual users, disjoint)."""

    n_users: int = 200
    individual_fraction: float = 0.15   # users held out as "individual" (on-device) users
    days: int = 28
    start_date: str = "2024-03-04"
    seed: int = 0
    sessions_per_day: float = 36.0
    n_stations: int = 800
    stickiness: float = 0.25            # probability that a session repeats the previous intent
    passion_prob: float = 0.5           # probability that a user has a personal tail-intent passion
    passion_pool: int = 8               # ... among this many rarest population intents
    passion_share: tuple[float, float] = (0.08, 0.2)  # ... mixed into its preferences with this weight
    noise_prob: float = 0.03            # a random app launch inside a session
    system_event_prob: float = 0.6
    missing_day_prob: float = 0.05

    def __post_init__(self):
        if self.n_users < 2 or self.days < 2:
            raise ValueError(f"n_users and days must be >= 2, got {self.n_users} and {self.days}")
        if not 0 < self.individual_fraction < 1:
            raise ValueError(f"individual_fraction must be in (0, 1), got {self.individual_fraction}")


def is_individual(user_ids, fraction: float, seed: int = 0) -> np.ndarray:
    """Whether each user is an *individual* (held-out, on-device) user: a seeded hash of its id."""
    return _uniform_hash(np.asarray(user_ids), seed + 1) < fraction


def _factor(names: tuple[str, ...], weights: dict[str, float]) -> np.ndarray:
    return np.array([weights.get(n, 1.0) for n in names])


def _hour_factors() -> np.ndarray:
    """[24, N_I] multiplicative hour-of-day factor per intent."""
    out = np.ones((24, len(INTENTS)))
    for name, spans in HOUR_INTENTS.items():
        for (a, b), f in spans.items():
            out[a:b, INTENTS.index(name)] *= f
    return out


# --------------------------------------------------------------------------------------------
# Simulation
# --------------------------------------------------------------------------------------------

def user_preference(persona: str, rng: np.random.Generator, cfg: IntentCohortConfig) -> tuple[np.ndarray, list[str]]:
    """Intent preference of one user: prior x persona x gamma noise, then an optional tail passion
    mixed in (``(1 - s) p + s onehot(k)``, ``s ~ U(passion_share)``)."""
    prior = np.array(list(INTENT_PRIOR.values()))
    pref = prior * _factor(INTENTS, PERSONA_INTENTS.get(persona, {})) * rng.gamma(2.0, 0.5, len(INTENTS))
    pref /= pref.sum()
    passions = []
    if rng.random() < cfg.passion_prob:
        k = int(rng.choice(np.argsort(prior)[: cfg.passion_pool]))   # one of the rarest population intents
        share = rng.uniform(*cfg.passion_share)
        pref = (1 - share) * pref + share * np.eye(len(INTENTS))[k]
        passions.append(INTENTS[k])
    return pref, passions


def simulate_intent_user(user_id: int, persona_name: str, city: City, cfg: IntentCohortConfig,
                         rng: np.random.Generator) -> tuple[pd.DataFrame, dict]:
    """Events of one user (``seconds`` since the start date, station, event, intent) and its truth."""
    persona = PERSONAS[persona_name]
    home = int(rng.choice(city.stations_in(persona.home_zone)))
    work = _nearest(city, city.stations_in(persona.work_zone or "leisure"), city.xy[home] + rng.normal(0, 4, 2), rng)
    transit = _nearest(city, city.stations_in("transport"), (city.xy[home] + city.xy[work]) / 2, rng)
    leisure_pool = np.concatenate([city.stations_in("leisure"), city.stations_in("scenic")])
    leisure = np.array([_nearest(city, leisure_pool, city.xy[home] + rng.normal(0, 3, 2), rng, spread=8)
                        for _ in range(rng.integers(2, 4))])
    pref, passions = user_preference(persona_name, rng, cfg)

    start = pd.Timestamp(cfg.start_date)
    weekend = np.array([(start + pd.Timedelta(days=d)).day_of_week >= 5 for d in range(cfg.days)])
    offset = int(rng.integers(-3, 4))
    roles = np.concatenate([_plan_slots(persona.weekend_plan if weekend[d] else persona.weekday_plan,
                                        offset + int(rng.integers(-2, 3))) for d in range(cfg.days)])
    n_slots = len(roles)
    day = np.arange(n_slots) // SLOTS_PER_DAY
    hour = np.arange(n_slots) % SLOTS_PER_DAY // 4
    place = {HOME: home, WORK: work, TRANSIT: transit}
    station = np.array([place.get(int(r), -1) for r in roles])
    daily_leisure = leisure[rng.integers(0, len(leisure), size=cfg.days)]
    station[roles == LEISURE] = daily_leisure[day[roles == LEISURE]]

    curve = np.where(weekend[day], np.array(persona.weekend_activity)[hour], np.array(persona.activity)[hour])
    rate = curve / np.mean(persona.activity) * cfg.sessions_per_day / SLOTS_PER_DAY * rng.lognormal(0, 0.25)
    rate *= (rng.random(cfg.days) >= cfg.missing_day_prob)[day]
    sessions_per_slot = rng.poisson(rate)

    place_factor = np.stack([_factor(INTENTS, PLACE_INTENTS[r]) for r in range(4)])
    hour_factor = _hour_factors()
    transition = {INTENTS.index(k): _factor(INTENTS, v) for k, v in TRANSITIONS.items()}
    apps = [[EVENTS.index(f"launch:{a}") for a in INTENT_APPS[i]] for i in INTENTS]
    systems = [[EVENTS.index(f"sys:{s}") for s in INTENT_SYSTEM[i]] for i in INTENTS]
    launches = [EVENTS.index(e) for e in EVENTS if e.startswith("launch:")]

    rows: list[tuple[int, int, int, int]] = []   # seconds, station, event, intent
    previous = None
    for slot in np.flatnonzero(sessions_per_slot):
        starts = np.sort(rng.integers(0, 900, size=sessions_per_slot[slot]))
        for s0 in starts:
            if previous is not None and rng.random() < cfg.stickiness:
                intent = previous
            else:
                p = pref * place_factor[roles[slot]] * hour_factor[hour[slot]]
                if previous in transition:
                    p = p * transition[previous]
                intent = int(rng.choice(len(INTENTS), p=p / p.sum()))
            serving = city.neighbours[station[slot], rng.choice(3, p=[0.85, 0.1, 0.05])]
            t = int(slot * 900 + s0)
            if rng.random() < cfg.system_event_prob:
                rows.append((t, serving, int(rng.choice(systems[intent])), intent))
                t += int(rng.integers(2, 30))
            for _ in range(1 + int(rng.random() < 0.35)):
                rows.append((t, serving, int(rng.choice(apps[intent])), intent))
                t += int(rng.integers(20, 240))
            if rng.random() < cfg.noise_prob:
                rows.append((t, serving, int(rng.choice(launches)), intent))
            previous = intent
    frame = pd.DataFrame(rows, columns=["seconds", "base_station_id", "event", "intent"]).sort_values("seconds", kind="stable")
    frame.insert(0, "user_id", user_id)
    truth = {"user_id": user_id, "persona": persona_name, "passions": passions,
             "intent_preference": {n: round(float(p), 5) for n, p in zip(INTENTS, pref)},
             "home_station": home, "work_station": work, "n_events": len(frame)}
    return frame, truth


def _stamp(seconds: np.ndarray, start: pd.Timestamp) -> np.ndarray:
    t = pd.to_datetime(start.value // 10**9 + seconds, unit="s")
    return (t.year.to_numpy(np.int64) * 10**10 + t.month.to_numpy(np.int64) * 10**8 + t.day.to_numpy(np.int64) * 10**6
            + t.hour.to_numpy(np.int64) * 10**4 + t.minute.to_numpy(np.int64) * 100 + t.second.to_numpy(np.int64))


def simulate_intent_cohort(cfg: IntentCohortConfig, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Write a simulated intent cohort (trace, vocabularies, ``base_poi.txt``, ground truth) to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    city_seed, persona_seed, *user_seeds = np.random.SeedSequence([cfg.seed, 6]).spawn(cfg.n_users + 2)
    city = build_city(CohortConfig(n_users=cfg.n_users, n_stations=cfg.n_stations, seed=cfg.seed),
                      np.random.default_rng(city_seed))
    names = list(PERSONAS)
    shares = np.array([PERSONAS[p].share for p in names])
    personas = np.random.default_rng(persona_seed).choice(names, size=cfg.n_users, p=shares / shares.sum())
    start = pd.Timestamp(cfg.start_date)
    individual = is_individual(np.arange(1, cfg.n_users + 1), cfg.individual_fraction, cfg.seed)

    write_vocabulary(out_dir / INTENTS_FILE, INTENTS)
    write_vocabulary(out_dir / EVENTS_FILE, EVENTS)
    poi = pd.DataFrame(city.poi, columns=list(POI_CATEGORIES)).rename_axis("BaseID")
    with atomic_path(out_dir / BASE_POI_FILE) as tmp:
        poi.to_csv(tmp, sep="\t")
    n_events = 0
    with atomic_path(out_dir / INTENT_TRACE_FILE) as trace_tmp, atomic_path(out_dir / INTENT_TRUTH_FILE) as truth_tmp, \
            open(trace_tmp, "w") as trace, open(truth_tmp, "w") as truth_out:
        for i in tqdm(range(cfg.n_users), desc="simulating intent users", unit="user", disable=not progress):
            frame, truth = simulate_intent_user(i + 1, str(personas[i]), city, cfg, np.random.default_rng(user_seeds[i]))
            truth["individual"] = bool(individual[i])
            stamps = _stamp(frame["seconds"].to_numpy(), start)
            event_names = np.array(EVENTS)[frame["event"].to_numpy()]
            intent_names = np.array(INTENTS)[frame["intent"].to_numpy()]
            trace.writelines(f"{u} {s} {b} {e} {it}\n" for u, s, b, e, it in zip(
                frame["user_id"].to_numpy(), stamps, frame["base_station_id"].to_numpy(), event_names, intent_names))
            truth_out.write(json.dumps(truth) + "\n")
            n_events += len(frame)
    summary = {"config": asdict(cfg), "events": n_events, "users": cfg.n_users,
               "individual_users": int(individual.sum()), "intents": len(INTENTS), "event_types": len(EVENTS)}
    write_json(out_dir / "intent_cohort.json", summary)
    return summary


def write_vocabulary(path: str | Path, names) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{n}\n" for n in names))


# --------------------------------------------------------------------------------------------
# Reading (validated)
# --------------------------------------------------------------------------------------------

def read_vocabulary(path: str | Path) -> list[str]:
    """One name per line (no spaces, no duplicates); the line order fixes the ids."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    names, seen = [], {}
    for line_no, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        name = text.strip()
        if not name:
            continue
        if " " in name or "\t" in name:
            raise DataError(path, line_no, "name", f"expected one name without spaces, found {text!r}")
        if name in seen:
            raise DataError(path, line_no, "name", f"{name!r} is already listed at line {seen[name]}")
        seen[name] = line_no
        names.append(name)
    if not names:
        raise DataError(path, None, None, "file lists no names")
    return names


@dataclass
class IntentCohort:
    """A validated intent cohort: events (one row per record) with integer ids, and the vocabularies."""

    directory: Path
    intents: list[str]
    events_vocab: list[str]
    events: pd.DataFrame            # user_id, seconds (since 1970), base_station_id, event, intent
    base_poi: pd.DataFrame | None

    @property
    def user_ids(self) -> np.ndarray:
        return self.events["user_id"].unique()


def read_intent_trace(path: str | Path, intents: list[str], events_vocab: list[str]) -> pd.DataFrame:
    """``intent_trace.txt`` -> events frame; the first bad line raises a :class:`DataError`."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    intent_id = {n: i for i, n in enumerate(intents)}
    event_id = {n: i for i, n in enumerate(events_vocab)}
    users, stamps, stations, events, labels = [], [], [], [], []
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, 1):
            try:
                parts = raw.decode("utf-8").split()
            except UnicodeDecodeError as err:
                raise DataError(path, line_no, None, f"byte {raw[err.start]:#04x} is not valid UTF-8") from None
            if not parts:
                raise DataError(path, line_no, None, f"blank line; expected `{TRACE_FORMAT}`")
            if len(parts) != 5:
                raise DataError(path, line_no, None, f"expected 5 space-separated fields `{TRACE_FORMAT}`, found {len(parts)}")
            u, stamp, station, event, intent = parts
            for name, value in (("user_id", u), ("timestamp", stamp), ("base_station_id", station)):
                if not value.isdigit():
                    raise DataError(path, line_no, name, f"expected a non-negative integer, found {value!r}")
            if event not in event_id:
                raise DataError(path, line_no, "event", f"{event!r} is not listed in {EVENTS_FILE}")
            if intent not in intent_id:
                raise DataError(path, line_no, "intent", f"{intent!r} is not listed in {INTENTS_FILE}")
            users.append(int(u))
            stamps.append(int(stamp))
            stations.append(int(station))
            events.append(event_id[event])
            labels.append(intent_id[intent])
    if not users:
        raise DataError(path, None, None, f"file is empty; expected lines `{TRACE_FORMAT}`")
    seconds, valid = decode_timestamps(np.array(stamps, np.int64))
    if not valid.all():
        i = int(np.flatnonzero(~valid)[0])
        raise DataError(path, i + 1, "timestamp", f"expected a valid yyyymmddhhmmss time, found {stamps[i]}")
    frame = pd.DataFrame({"user_id": np.array(users, np.int64), "seconds": seconds,
                          "base_station_id": np.array(stations, np.int64),
                          "event": np.array(events, np.int64), "intent": np.array(labels, np.int64)})
    user = frame["user_id"].to_numpy()
    new_user = np.r_[True, user[1:] != user[:-1]]
    regrouped = pd.Series(user[new_user]).duplicated().to_numpy()
    if regrouped.any():
        i = int(np.flatnonzero(new_user)[np.flatnonzero(regrouped)[0]])
        raise DataError(path, i + 1, "user_id", f"user {user[i]} reappears after other users (rows must be grouped by user_id)")
    backwards = ~new_user & (seconds < np.r_[seconds[:1], seconds[:-1]])
    if backwards.any():
        i = int(np.flatnonzero(backwards)[0])
        raise DataError(path, i + 1, "timestamp", f"time {stamps[i]} is earlier than the previous row's {stamps[i - 1]} "
                        "(rows must be sorted by time within a user)")
    return frame


def load_intent_cohort(directory: str | Path) -> IntentCohort:
    """Read and validate an intent cohort directory (see the module docstring for the files)."""
    directory = Path(directory)
    intents = read_vocabulary(directory / INTENTS_FILE)
    events_vocab = read_vocabulary(directory / EVENTS_FILE)
    events = read_intent_trace(directory / INTENT_TRACE_FILE, intents, events_vocab)
    base_poi = read_base_poi(directory / BASE_POI_FILE) if (directory / BASE_POI_FILE).exists() else None
    if base_poi is not None:
        unknown = ~np.isin(events["base_station_id"].to_numpy(), base_poi.index.to_numpy())
        if unknown.any():
            i = int(np.flatnonzero(unknown)[0])
            raise DataError(directory / INTENT_TRACE_FILE, i + 1, "base_station_id",
                            f"base station {events['base_station_id'].iat[i]} is not listed in {BASE_POI_FILE}")
    return IntentCohort(directory, intents, events_vocab, events, base_poi)


# --------------------------------------------------------------------------------------------
# Samples: history of events + query context -> intent
# --------------------------------------------------------------------------------------------

PAD, MASK, QUERY = 0, 1, 2          # special event tokens; real events are shifted by 3
N_SPECIAL = 3
FEATURES = ("location", "cluster", "weekday", "slot", "event")


@dataclass
class SampleConfig:
    history: int = 30                 # input length: events before the prediction point
    slot_minutes: int = 60            # time-slot width of the time embedding
    session_gap_minutes: float = 10.0
    location_ranks: int = 8           # a user's top-K stations get their own location token
    location_clusters: int = 6        # k-means clusters of POI profiles (0 = none)
    individual_fraction: float = 0.15
    train_fraction: float = 0.6       # time-based split of each individual user's points
    val_fraction: float = 0.2
    population_val_fraction: float = 0.1   # last share of each population user's points (model selection)
    seed: int = 0


@dataclass
class IntentSamples:
    """Model inputs ``[N, history + 1]`` per feature (the last position is the query) and labels."""

    location: torch.Tensor
    cluster: torch.Tensor
    weekday: torch.Tensor
    slot: torch.Tensor
    event: torch.Tensor
    intent: torch.Tensor             # [N]
    user: torch.Tensor               # [N] user id
    seconds: torch.Tensor            # [N] time of the prediction point
    teacher_logits: torch.Tensor | None = None   # [N, N_I] cached soft targets (distillation), if any

    def __len__(self) -> int:
        return len(self.intent)

    def _map(self, fn) -> "IntentSamples":
        return IntentSamples(*(None if getattr(self, f) is None else fn(getattr(self, f)) for f in self.__dataclass_fields__))

    def __getitem__(self, rows) -> "IntentSamples":
        return self._map(lambda t: t[rows])

    def with_teacher_logits(self, logits: torch.Tensor) -> "IntentSamples":
        return IntentSamples(**{**{f: getattr(self, f) for f in self.__dataclass_fields__}, "teacher_logits": logits})

    def inputs(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        return {f: getattr(self, f).to(device=device, dtype=torch.long) for f in FEATURES}

    def to(self, device: torch.device | str) -> "IntentSamples":
        return self._map(lambda t: t.to(device))

    def of_user(self, user_id: int) -> "IntentSamples":
        return self[self.user == user_id]

    @staticmethod
    def concat(parts: list["IntentSamples"]) -> "IntentSamples":
        return IntentSamples(*(None if any(getattr(p, f) is None for p in parts) else torch.cat([getattr(p, f) for p in parts])
                               for f in IntentSamples.__dataclass_fields__))


@dataclass
class IntentData:
    """Everything a PITuning run consumes: the splits, the vocabulary sizes, the intent names."""

    population_train: IntentSamples
    population_val: IntentSamples
    individual: dict[str, IntentSamples]          # train / val / test (all individual users)
    intents: list[str]
    n_events: int                                  # event vocabulary incl. the special tokens
    n_locations: int
    n_clusters: int
    n_slots: int
    config: SampleConfig
    population_users: list[int] = field(default_factory=list)
    individual_users: list[int] = field(default_factory=list)

    @property
    def n_intents(self) -> int:
        return len(self.intents)

    def vocab_sizes(self) -> dict[str, int]:
        return {"location": self.n_locations, "cluster": self.n_clusters, "weekday": 7, "slot": self.n_slots,
                "event": self.n_events}

    def population_intent_counts(self) -> np.ndarray:
        return np.bincount(self.population_train.intent.numpy(), minlength=self.n_intents)

    def summary(self) -> dict:
        return {"population_users": len(self.population_users), "individual_users": len(self.individual_users),
                "population_train": len(self.population_train), "population_val": len(self.population_val),
                **{f"individual_{k}": len(v) for k, v in self.individual.items()},
                "intents": self.n_intents, "event_vocab": self.n_events,
                "population_intent_share": dict(zip(self.intents, np.round(
                    self.population_intent_counts() / max(1, len(self.population_train)), 4).tolist()))}


def prediction_points(user_events: pd.DataFrame, gap_minutes: float) -> np.ndarray:
    """Rows that start a session: the intent changes, or more than ``gap_minutes`` passed."""
    intent = user_events["intent"].to_numpy()
    seconds = user_events["seconds"].to_numpy()
    start = np.r_[True, (intent[1:] != intent[:-1]) | (np.diff(seconds) > gap_minutes * 60)]
    return np.flatnonzero(start)


def _time_split(n: int, train: float, val: float) -> np.ndarray:
    """Split labels 0 = train, 1 = val, 2 = test for ``n`` time-ordered points."""
    a, b = int(round(n * train)), int(round(n * (train + val)))
    return np.repeat([0, 1, 2], [a, b - a, n - b])


def build_samples(cohort: IntentCohort, cfg: SampleConfig, *, progress: bool = False) -> IntentData:
    """Featurize every user's prediction points and split them (population vs individual, then by time)."""
    L = cfg.history
    clusters = None
    if cohort.base_poi is not None and cfg.location_clusters > 0:
        clusters = cluster_locations(cohort.base_poi, k=cfg.location_clusters, seed=cfg.seed)
    n_slots = 24 * 60 // cfg.slot_minutes
    individual = set(cohort.user_ids[is_individual(cohort.user_ids, cfg.individual_fraction, cfg.seed)].tolist())
    buckets: dict[str, list[IntentSamples]] = {k: [] for k in ("pop_train", "pop_val", "train", "val", "test")}
    for user_id, ev in tqdm(cohort.events.groupby("user_id", sort=False), desc="featurizing users",
                            disable=not progress, unit="user"):
        points = prediction_points(ev, cfg.session_gap_minutes)
        points = points[points >= L]
        if len(points) < 5:
            continue
        is_ind = user_id in individual
        split = _time_split(len(points), cfg.train_fraction, cfg.val_fraction) if is_ind else \
            _time_split(len(points), 1 - cfg.population_val_fraction, cfg.population_val_fraction)
        seconds = ev["seconds"].to_numpy()
        # Location tokens: rank among the user's stations counted on its *training* period only.
        cutoff = seconds[points[split == 0][-1]] if (split == 0).any() else seconds[-1]
        station = ev["base_station_id"].to_numpy()
        counts = pd.Series(station[seconds <= cutoff]).value_counts()
        rank = {s: r + 1 for r, s in enumerate(counts.index[: cfg.location_ranks])}
        location = np.array([rank.get(s, cfg.location_ranks + 1) for s in station], np.int64)
        cluster = (clusters.of(station).astype(np.int64) + 1) if clusters is not None else np.zeros(len(ev), np.int64)
        days = seconds // 86400
        weekday = ((days + 3) % 7).astype(np.int64)  # 1970-01-01 was a Thursday (weekday 3)
        slot = (seconds % 86400 // (cfg.slot_minutes * 60)).astype(np.int64)
        event = ev["event"].to_numpy() + N_SPECIAL
        windows = points[:, None] + np.arange(-L, 1)[None, :]          # history + the query position
        feats = {"location": location[windows], "cluster": cluster[windows], "weekday": weekday[windows],
                 "slot": slot[windows], "event": event[windows].copy()}
        feats["event"][:, -1] = QUERY
        samples = IntentSamples(
            *(torch.from_numpy(feats[f].astype(np.int16 if f != "event" else np.int32)) for f in FEATURES),
            intent=torch.from_numpy(ev["intent"].to_numpy()[points]),
            user=torch.full((len(points),), int(user_id), dtype=torch.int64),
            seconds=torch.from_numpy(seconds[points].astype(np.int64)))
        names = ("train", "val", "test") if is_ind else ("pop_train", "pop_val")
        for code, name in enumerate(names):
            buckets[name].append(samples[torch.from_numpy(split == code)])
    empty = lambda parts: IntentSamples.concat(parts) if parts else None  # noqa: E731
    if not buckets["pop_train"] or not buckets["train"]:
        raise ValueError(f"{cohort.directory}: need both population and individual users with >= {L + 5} events "
                         f"(individual_fraction={cfg.individual_fraction})")
    return IntentData(
        population_train=empty(buckets["pop_train"]), population_val=empty(buckets["pop_val"]),
        individual={k: empty(buckets[k]) for k in ("train", "val", "test")},
        intents=list(cohort.intents), n_events=len(cohort.events_vocab) + N_SPECIAL,
        n_locations=cfg.location_ranks + 2, n_clusters=(cfg.location_clusters + 1) if clusters is not None else 1,
        n_slots=n_slots, config=cfg,
        population_users=sorted({int(s.user[0]) for s in buckets["pop_train"]}),
        individual_users=sorted({int(s.user[0]) for s in buckets["train"]}))
