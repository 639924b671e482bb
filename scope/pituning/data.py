"""Intent-labelled event sequences for PITuning (PITuning paper, section 3.1): the file format, the validating reader, and the samples.

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
line and field (an unknown intent or event, a station missing from ``base_poi.txt``, ...); a
lenient read skips bad lines and counts them by field.

The simulated default cohort comes from :mod:`scope.pituning.simulate`.

Intents derived from Tsinghua-format traces (the default data) come from :mod:`scope.pituning.derive`.

**Samples**: a *prediction point* is an event that starts a session (its intent differs from the
previous event's, or more than ``session_gap_minutes`` passed); for derived traces
(``IntentCohort.next_record``) every record is one. Its input is the ``history`` (default 30)
events before it, plus a query token carrying the point's weekday and time slot and, for
sessions, its location (the phone knows where and when it is asked; the event itself is
unknown; a derived record's station is its label, so there the query's location is hidden). The
label is its intent. Each point also carries its user's *routine*, ``log p(intent | user, query
slot)`` from the user's training points (:func:`routine_prior`). Users are *population* or *individual* by a seeded hash of their id
(disjoint, as in the paper); each individual user's points are split by time into train / val /
test. A user with fewer than ``history + min_points`` events is skipped and counted
(``IntentData.skipped_users``).

**Intents absent from the individual users**: the vocabulary is every intent of the cohort, so
the population model and every student score all of them; an intent no individual user has is
never a test label, so it enters the macro metrics only where a model predicts it (precision 0,
scikit-learn's convention), and the long-tail recall (:func:`scope.pituning.evaluate.rarest_intents`)
is taken over the rarest population intents that the individual test points contain. The
intents concerned are listed in ``IntentData.summary()["intents_absent_from_individuals"]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from scope.data.events import DataError
from scope.data.locations import cluster_locations
from scope.data.splits import uniform_hash
from scope.data.tsinghua import BASE_POI_FILE, decode_timestamps, read_base_poi
from scope.io import atomic_path

INTENT_TRACE_FILE = "intent_trace.txt"
INTENTS_FILE = "intents.txt"
EVENTS_FILE = "events.txt"
TRACE_FORMAT = "user_id yyyymmddhhmmss base_station_id event intent"

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
    next_record: bool = False       # every record is a prediction point, its station hidden (derived traces)
    counts: dict = field(default_factory=dict)   # what reading / deriving skipped or kept

    @property
    def user_ids(self) -> np.ndarray:
        return self.events["user_id"].unique()


def _intent_line(raw: bytes, path: Path, line_no: int, intent_id: dict, event_id: dict) -> tuple[int, ...]:
    """One validated ``intent_trace.txt`` line -> (user, stamp, station, event id, intent id)."""
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
    return int(u), int(stamp), int(station), event_id[event], intent_id[intent]


def read_intent_trace(path: str | Path, intents: list[str], events_vocab: list[str], lenient: bool = False
                      ) -> tuple[pd.DataFrame, dict[str, int]]:
    """``intent_trace.txt`` -> (events frame, skipped lines per bad field). The first bad line raises a
    :class:`DataError`; ``lenient`` skips bad lines (counted by field: ``intent``, ``event``, ...) instead."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    intent_id = {n: i for i, n in enumerate(intents)}
    event_id = {n: i for i, n in enumerate(events_vocab)}
    rows, skipped = [], {}
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, 1):
            try:
                rows.append((line_no, *_intent_line(raw, path, line_no, intent_id, event_id)))
            except DataError as err:
                if not lenient:
                    raise
                skipped[err.field or "line"] = skipped.get(err.field or "line", 0) + 1
    lines, users, stamps, stations, events, labels = (list(c) for c in zip(*rows)) if rows else ([], [], [], [], [], [])
    if not users:
        raise DataError(path, None, None, f"file is empty; expected lines `{TRACE_FORMAT}`")
    seconds, valid = decode_timestamps(np.array(stamps, np.int64))
    if not valid.all():
        i = int(np.flatnonzero(~valid)[0])
        raise DataError(path, lines[i], "timestamp", f"expected a valid yyyymmddhhmmss time, found {stamps[i]}")
    frame = pd.DataFrame({"user_id": np.array(users, np.int64), "seconds": seconds,
                          "base_station_id": np.array(stations, np.int64),
                          "event": np.array(events, np.int64), "intent": np.array(labels, np.int64),
                          "line": np.array(lines, np.int64)})
    user = frame["user_id"].to_numpy()
    new_user = np.r_[True, user[1:] != user[:-1]]
    regrouped = pd.Series(user[new_user]).duplicated().to_numpy()
    if regrouped.any():
        i = int(np.flatnonzero(new_user)[np.flatnonzero(regrouped)[0]])
        raise DataError(path, lines[i], "user_id", f"user {user[i]} reappears after other users (rows must be grouped by user_id)")
    backwards = ~new_user & (seconds < np.r_[seconds[:1], seconds[:-1]])
    if backwards.any():
        i = int(np.flatnonzero(backwards)[0])
        raise DataError(path, lines[i], "timestamp", f"time {stamps[i]} is earlier than the previous row's {stamps[i - 1]} "
                        "(rows must be sorted by time within a user)")
    return frame, skipped


def load_intent_cohort(directory: str | Path, lenient: bool = False) -> IntentCohort:
    """Read and validate an intent cohort directory (see the module docstring for the files); ``lenient``
    skips bad trace lines and counts them (``IntentCohort.counts["skipped_lines"]``)."""
    directory = Path(directory)
    intents = read_vocabulary(directory / INTENTS_FILE)
    events_vocab = read_vocabulary(directory / EVENTS_FILE)
    events, skipped = read_intent_trace(directory / INTENT_TRACE_FILE, intents, events_vocab, lenient)
    base_poi = read_base_poi(directory / BASE_POI_FILE) if (directory / BASE_POI_FILE).exists() else None
    if base_poi is not None:   # a station must have a POI profile: named, or skipped and counted
        unknown = ~np.isin(events["base_station_id"].to_numpy(), base_poi.index.to_numpy())
        if unknown.any() and not lenient:
            i = int(np.flatnonzero(unknown)[0])
            raise DataError(directory / INTENT_TRACE_FILE, int(events["line"].iat[i]), "base_station_id",
                            f"base station {events['base_station_id'].iat[i]} is not listed in {BASE_POI_FILE}")
        if unknown.any():
            skipped["base_station_id"] = skipped.get("base_station_id", 0) + int(unknown.sum())
            events = events[~unknown].reset_index(drop=True)
    return IntentCohort(directory, intents, events_vocab, events, base_poi, counts={"skipped_lines": skipped})


def is_individual(user_ids, fraction: float, seed: int = 0) -> np.ndarray:
    """Whether each user is an *individual* (held-out, on-device) user: a seeded hash of its id."""
    return uniform_hash(np.asarray(user_ids), seed + 1) < fraction


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
    min_points: int = 5               # a user needs history + min_points events, else it is skipped and counted
    routine_backoff: float = 1.0      # pseudo-count of the user's overall intent shares in each slot's routine prior
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
    routine: torch.Tensor | None = None          # [N, N_I] log p(intent | user, query slot) (:func:`routine_prior`)

    def __len__(self) -> int:
        return len(self.intent)

    def _map(self, fn) -> "IntentSamples":
        return IntentSamples(*(None if getattr(self, f) is None else fn(getattr(self, f)) for f in self.__dataclass_fields__))

    def __getitem__(self, rows) -> "IntentSamples":
        return self._map(lambda t: t[rows])

    def with_teacher_logits(self, logits: torch.Tensor) -> "IntentSamples":
        return IntentSamples(**{**{f: getattr(self, f) for f in self.__dataclass_fields__}, "teacher_logits": logits})

    def inputs(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The model's inputs: the int64 features [N, L + 1], and the float routine prior [N, N_I] when present."""
        x = {f: getattr(self, f).to(device=device, dtype=torch.long) for f in FEATURES}
        if self.routine is not None:
            x["routine"] = self.routine.to(device=device, dtype=torch.float32)
        return x

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
    skipped_users: int = 0                         # fewer than history + min_points events
    counts: dict = field(default_factory=dict)     # the cohort's read / derivation counts

    @property
    def n_intents(self) -> int:
        return len(self.intents)

    def vocab_sizes(self) -> dict[str, int]:
        return {"location": self.n_locations, "cluster": self.n_clusters, "weekday": 7, "slot": self.n_slots,
                "event": self.n_events}

    def population_val_halves(self) -> tuple[IntentSamples, IntentSamples]:
        """The population validation points of the first / second half of the population users: models
        are selected (early stopping, checkpoints) on the first and compared on the second."""
        users = self.population_val.user
        first = torch.isin(users, torch.tensor(self.population_users[: len(self.population_users) // 2]))
        return self.population_val[first], self.population_val[~first]

    def population_intent_counts(self) -> np.ndarray:
        return np.bincount(self.population_train.intent.numpy(), minlength=self.n_intents)

    def summary(self) -> dict:
        individual = torch.cat([s.intent for s in self.individual.values() if s is not None]).unique().tolist()
        return {"population_users": len(self.population_users), "individual_users": len(self.individual_users),
                "skipped_users": self.skipped_users, "cohort": self.counts,
                "intents_absent_from_individuals": [n for i, n in enumerate(self.intents) if i not in individual],
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


def routine_prior(labels: np.ndarray, slots: np.ndarray, days: np.ndarray, train: np.ndarray, n_intents: int,
                  n_slots: int, backoff: float = 1.0) -> np.ndarray:
    """One user's routine: ``log p(intent | user, query slot)`` [N, N_I] for each of its points, from the
    intents of its *training* points in the same time slot, backed off to its overall intent shares::

        p = (c_slot + backoff * q_user) / (n_slot + backoff),   q_user = (c_user + 1/2) / (n_user + N_I/2)

    A training point's own day is left out of its counts (leave-one-day-out): a point's neighbours of
    the same day share its intent, and a validation or test point never sees its own day either. This
    is the information of the most-frequent-intent-per-(user, slot) baseline, as one model input
    (:class:`scope.pituning.model.IntentPredictor` adds it to its logits).
    """
    onehot = np.eye(n_intents)[labels] * train[:, None]
    _, day = np.unique(days, return_inverse=True)
    per_day = np.zeros((day.max() + 1 if len(day) else 0, n_slots, n_intents))
    np.add.at(per_day, (day, slots), onehot)
    slot_counts = per_day.sum(0)[slots] - per_day[day, slots] * train[:, None]
    user_counts = per_day.sum((0, 1))[None] - per_day.sum(1)[day] * train[:, None]
    q = (user_counts + 0.5) / (user_counts.sum(1, keepdims=True) + 0.5 * n_intents)
    p = (slot_counts + backoff * q) / (slot_counts.sum(1, keepdims=True) + backoff)
    return np.log(p).astype(np.float32)


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
    skipped = 0
    for user_id, ev in tqdm(cohort.events.groupby("user_id", sort=False), desc="featurizing users",
                            disable=not progress, unit="user"):
        points = np.arange(len(ev)) if cohort.next_record else prediction_points(ev, cfg.session_gap_minutes)
        points = points[points >= L]
        if len(points) < cfg.min_points:
            skipped += 1
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
        labels = ev["intent"].to_numpy()[points]
        routine = routine_prior(labels, slot[points], days[points], split == 0, len(cohort.intents), n_slots,
                                cfg.routine_backoff)
        if cohort.next_record:   # the record's station is its label: the query does not know it
            feats["location"][:, -1] = 0
            feats["cluster"][:, -1] = 0
        samples = IntentSamples(
            *(torch.from_numpy(feats[f].astype(np.int16 if f != "event" else np.int32)) for f in FEATURES),
            intent=torch.from_numpy(labels),
            user=torch.full((len(points),), int(user_id), dtype=torch.int64),
            seconds=torch.from_numpy(seconds[points].astype(np.int64)), routine=torch.from_numpy(routine))
        names = ("train", "val", "test") if is_ind else ("pop_train", "pop_val")
        for code, name in enumerate(names):
            buckets[name].append(samples[torch.from_numpy(split == code)])
    empty = lambda parts: IntentSamples.concat(parts) if parts else None  # noqa: E731
    if not buckets["pop_train"] or not buckets["train"]:
        raise ValueError(f"{cohort.directory}: need both population and individual users with >= {L + cfg.min_points} "
                         f"events (individual_fraction={cfg.individual_fraction}; {skipped} user(s) had fewer)")
    return IntentData(
        population_train=empty(buckets["pop_train"]), population_val=empty(buckets["pop_val"]),
        individual={k: empty(buckets[k]) for k in ("train", "val", "test")},
        intents=list(cohort.intents), n_events=len(cohort.events_vocab) + N_SPECIAL,
        n_locations=cfg.location_ranks + 2, n_clusters=(cfg.location_clusters + 1) if clusters is not None else 1,
        n_slots=n_slots, config=cfg,
        population_users=sorted({int(s.user[0]) for s in buckets["pop_train"]}),
        individual_users=sorted({int(s.user[0]) for s in buckets["train"]}), skipped_users=skipped,
        counts=dict(cohort.counts))
