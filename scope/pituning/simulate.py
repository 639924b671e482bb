"""The simulated intent cohort, PITuning's default data (written in the :mod:`scope.pituning.data` format).

**Simulation** builds on :mod:`scope.data.simulate`: its city (zones, stations with POI profiles) and
its personas (day plans of home / work / transit / leisure). Each user has intent preferences =
the long-tailed population prior x a persona modulation x individual noise, and with some
probability a personal "passion" for one of the population's tail intents (paper Fig. 1: a user's
distribution differs from the population's). Intents also depend on the place (navigation and
taxi in transit, work at work, ...), the hour, and the previous intent (stickiness + a few
transitions such as taxi -> travel). A session emits an optional system event (shared by several
intents, hence ambiguous) and one or two launches of the intent's apps; a little noise launches a
random app.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from scope.data.simulate import (HOME, LEISURE, PERSONAS, POI_CATEGORIES, SLOTS_PER_DAY, TRANSIT, WORK, City,
                                 CohortConfig, build_city, day_roles, place_user)
from scope.data.tsinghua import BASE_POI_FILE
from scope.io import atomic_path, write_json
from scope.pituning.data import EVENTS_FILE, INTENT_TRACE_FILE, INTENTS_FILE, is_individual, write_vocabulary

INTENT_TRUTH_FILE = "intent_ground_truth.jsonl"

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
    home, work, transit, leisure = place_user(city, persona, rng, max_leisure=3)
    pref, passions = user_preference(persona_name, rng, cfg)

    start = pd.Timestamp(cfg.start_date)
    weekend = np.array([(start + pd.Timedelta(days=d)).day_of_week >= 5 for d in range(cfg.days)])
    roles, _ = day_roles(persona, weekend, rng)
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
