"""Semantic-augmented synthesis (U-SCOPE section 5.2, Eq. 25): a trace LM learns
``p(a_t, l_t | P_u, tau_t)`` from real users' serialised traces and generates synthetic users under
the grammar constraint of :mod:`scope.synthesis.traces`; the result is written as a Tsinghua-format cohort.

Data. Each training example is one user-day (:class:`scope.synthesis.traces.TraceWindow`): the prompt is a
compact text of the user's teacher profile (:func:`conditioning_prompt`: persona, top app
categories, places as location clusters, active period, peak hours) plus the weekday; the
completion is the window's event lines, then the tokenizer's eos. Token ids are assembled from the
grammar's own token sequences (:class:`scope.synthesis.traces.GrammarTokens`), the loss is on the completion
only, and training is TRL ``SFTTrainer`` + a peft LoRA (pre-tokenized ``input_ids`` +
``completion_mask``). Training reads the windows back through the strict grammar parser from
``model/train_traces.txt`` (or from a user-supplied ``traces_file``), so a grammar-violating
training line stops the run with its line number.

Generation. One sequence per (synthetic user, day), sampled in batches with
:class:`scope.synthesis.traces.TraceLogitsProcessor`: every line is well-formed, slots strictly increase,
and only (app category, location cluster) pairs of the source user's history are permitted,
unless the profile implies exploration (:func:`implies_exploration`: a ``traveller`` persona or
``low`` regularity), which grants ``exploration_budget`` unseen-pair events per window. With
``history_weight`` > 0 the LM is guided by the source user's own line counts per slot, category
given the previous line's category, and (category, cluster) (:func:`attach_history_prior`, a
product of experts in the processor): a short CPU fine-tune alone under-fits the per-user
distributions. A user
whose constraint permits no pair at all (an empty history) follows ``on_no_pairs``: ``population``
(default: the pairs of the whole real cohort, recorded as ``fallback`` in ``profiles.jsonl``) or
``error`` (:class:`NoPermittedPairsError`).

Users are generated shard by shard (``shard_users`` per shard, ``shards/shard-NNNNN.jsonl``,
each written atomically and seeded by its index), so an interrupted run resumes at the first
missing shard and produces exactly the same cohort: no user twice, none missing. A plan file
(``shards/plan.json``) refuses to mix shards of a different configuration.

Writing back (:func:`events_from_windows`, :class:`RecordPools`): a line becomes records at
distinct seconds inside its slot, drawn from the source user's real slots (else the cohort's): as
many records as one of the user's real slots of that level held, one station of the line's
cluster, and (``within_slot: mixture``, default) app categories from the user's within-slot
co-usage of slots dominated by the line's pair, since a line holds only its slot's dominant pair;
then apps of those categories and lognormal byte counts. All is drawn from a generator seeded by
``(seed, user)``. The cohort directory gets the real cohort's metadata files,
``App_usage_trace.txt`` and ``profiles.jsonl`` (one line per synthetic user: source user, profile,
constraint, fallback); synthetic user ids are ``synthetic_user_offset + source id``.

Decisions, measured:

- ``history_weight`` (default 1.0) multiplies the LM's probabilities by the user's own slot,
  category and pair counts (a product of experts); the chance of ending the day stays the LM's.
  Without it a short CPU fine-tune under-fits the per-user distributions (r = 0.49 against 0.68
  with it, on the earlier 3-day benchmark).
- The category prior follows the user's own category transitions (backed off to the user's
  category counts), not the counts alone: a prior blind to the previous line breaks the
  day's sequence. Measured on the synthesis benchmark's 60 source users, with each week-1 line's
  category redrawn from the user's history: next-app-category accuracy on week 2 of a classifier
  trained on the redrawn lines is 0.373 with independent draws, 0.397 with transitions, 0.404
  with the real lines.
- Writing a line back to records draws from the source user's real slots (record count, station
  of the cluster, within-slot co-usage with ``within_slot: mixture``, then an app and a byte
  count), falling back to the cohort, then to the catalogue. ``within_slot: dominant`` lowers r
  from 0.94 to 0.86 on the benchmark's lines (benchmarks/README.md, "Synthetic cohorts").
- ``days_per_user: 0`` generates every day of the real cohort, so synthetic and real users have
  the same weekday mix: three real weekdays scored against the same users' weekend reach only
  r = 0.71, while two halves of the week that each mix weekdays and weekend days reach 0.94-0.99.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from scope.data.tsinghua import APP2CATEGORY_FILE, BASE_COORDS_FILE, BASE_POI_FILE, CATEGORIES_FILE, TRACE_FILE
from scope.io import atomic_path, write_json, write_text
from scope.profiles.corpus import ProfileCorpus, ProfileDataArguments
from scope.profiles.schema import Profile
from scope.synthesis.traces import (GrammarTokens, TraceConstraint, TraceEvent, TraceGrammar, TraceLogitsProcessor,
                                    TraceWindow, history_pairs, level_of, records_range, slot_records,
                                    windows_from_events)

log = logging.getLogger(__name__)

PROFILES_FILE = "profiles.jsonl"
GRAMMAR_FILE = "grammar.json"
TRAIN_TRACES_FILE = "train_traces.txt"
WITHIN_SLOT = ("mixture", "dominant")       # how a line's records get their app categories (RecordPools)


class NoPermittedPairsError(ValueError):
    """A user whose constraint permits no (app category, location cluster) pair (``on_no_pairs: error``)."""


@dataclass
class SynthesisArguments(ProfileDataArguments):
    """Knobs of ``recipes/synthesize.py`` (besides trl's SFTConfig and ModelConfig)."""

    slot_minutes: int = 60                     # one event line per active slot of this length (divides 1440)
    traces_file: str = ""                      # train on this trace file instead of serialising the cohort
    train_user_limit: int = 0                  # 0 = every profiled user of train_splits
    generate_splits: list[str] = field(default_factory=lambda: ["train"])
    generate_users: int = 20                   # source users (first by id); 0 = all of generate_splits
    days_per_user: int = 0                     # days per synthetic user from the cohort's first (0 = as many as the cohort)
    within_slot: str = "mixture"               # write-back of a line's records: mixture (user's co-usage) | dominant
    generation_batch_size: int = 8
    inference_dtype: str = "float32"          # float32 | bfloat16: weights in bf16, attention in fp32 (scope.profiles.llms.generation_model)
    shard_users: int = 5                       # users per shard (the unit of resumption)
    temperature: float = 1.0
    history_weight: float = 1.0                # p ~ p_LM * p_history ** w over slots, categories, clusters (0 = LM only)
    exploration_budget: int = 2                # unseen-pair events per window, when the profile implies exploration
    on_no_pairs: str = "population"            # population | error
    synthetic_user_offset: int = 100000
    synthesis_seed: int = 0
    max_new_tokens: int = 0                    # 0 = the grammar's bound (a full day of lines)
    tstr_test_splits: list[str] = field(default_factory=lambda: ["val", "test"])
    threads: int = 0                       # torch threads (0 = leave as is)
    resume: bool = True

    def __post_init__(self):
        if self.within_slot not in WITHIN_SLOT:
            raise ValueError(f"within_slot must be one of {WITHIN_SLOT}, got {self.within_slot!r}")
        if self.on_no_pairs not in ("population", "error"):
            raise ValueError(f"on_no_pairs must be 'population' or 'error', got {self.on_no_pairs!r}")
        if self.days_per_user < 0 or self.shard_users < 1 or self.generation_batch_size < 1:
            raise ValueError("days_per_user must be >= 0, shard_users and generation_batch_size >= 1")


def grammar_of(corpus: ProfileCorpus, slot_minutes: int = 30) -> TraceGrammar:
    return TraceGrammar(tuple(corpus.cohort.categories), len(corpus.clusters.names), slot_minutes)


def save_grammar(grammar: TraceGrammar, path: str | Path) -> None:
    write_json(path, {"categories": list(grammar.categories), "n_clusters": grammar.n_clusters,
                      "slot_minutes": grammar.slot_minutes})


def load_grammar(path: str | Path) -> TraceGrammar:
    obj = json.loads(Path(path).read_text())
    return TraceGrammar(tuple(obj["categories"]), int(obj["n_clusters"]), int(obj["slot_minutes"]))


# --------------------------------------------------------------------------------------------
# Conditioning prompt and training data
# --------------------------------------------------------------------------------------------

def conditioning_prompt(profile: Profile | None, grammar: TraceGrammar, area_names: list[str], weekday: str) -> str:
    """The compact profile text ``P_u`` and the day ``tau`` the trace LM is conditioned on."""
    if profile is None:
        body = "Persona: unknown."
    else:
        t = profile.temporal_regularities
        apps = ", ".join(f"{a.category.replace(' ', '_')} {a.share_pct}%" for a in profile.app_preferences[:4]) or "none"
        places = ", ".join(
            f"{p.role} {grammar.cluster_token(area_names.index(p.area)) if p.area in area_names else 'c?'} {p.share_pct}%"
            for p in profile.location_tendencies) or "none"
        hours = ", ".join(str(h) for h in t.peak_hours) or "none"
        body = (f"Persona: {profile.persona}. Apps: {apps}. Places: {places}. Active: {t.most_active_period}, "
                f"peak hours {hours}, {t.week_pattern}, {t.regularity} regularity.")
    return f"Synthetic app-usage day.\n{body}\nDay: {weekday}\n"


def serialise_cohort(corpus: ProfileCorpus, users: list[int], grammar: TraceGrammar) -> list[TraceWindow]:
    """The windows of these users' real events."""
    events = corpus.cohort.events
    events = events[events["user_id"].isin(users)]
    return windows_from_events(events, corpus.clusters.of, grammar)


def trace_examples(windows: list[TraceWindow], profiles: dict[int, Profile | None], tokens: GrammarTokens,
                   area_names: list[str], max_length: int | None = None) -> list[dict]:
    """Pre-tokenized prompt-completion examples (``input_ids`` + ``completion_mask``) of each window.

    A window longer than ``max_length`` is cut at its last whole line that fits (eos dropped)."""
    tokenizer, grammar = tokens.tokenizer, tokens.grammar
    rows = []
    for w in windows:
        prompt = tokenizer(conditioning_prompt(profiles.get(w.user_id), grammar, area_names, w.weekday),
                           add_special_tokens=False)["input_ids"]
        completion = tokens.encode_events(w.events) + [tokens.eos]
        if max_length is not None and len(prompt) + len(completion) > max_length:
            lines, budget = [], max_length - len(prompt)
            for e in w.events:
                ids = tokens.encode_events([e])
                if len(ids) > budget:
                    break
                lines += ids
                budget -= len(ids)
            completion = lines
        if completion:
            rows.append({"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)})
    return rows


# --------------------------------------------------------------------------------------------
# Constraints of the users to synthesise
# --------------------------------------------------------------------------------------------

def implies_exploration(profile: Profile | None) -> bool:
    """A profile that implies exploring new app-location pairs: a traveller, or low regularity."""
    if profile is None:
        return False
    return "travel" in profile.persona.lower() or profile.temporal_regularities.regularity == "low"


@dataclass
class SynthesisRequest:
    source_user_id: int
    user_id: int
    profile: Profile | None
    constraint: TraceConstraint
    dates: list[str]
    fallback: str = ""


def make_constraint(pairs: np.ndarray, profile: Profile | None, *, exploration_budget: int, on_no_pairs: str,
                    population_pairs: np.ndarray, user_id: int) -> tuple[TraceConstraint, str]:
    """The user's :class:`TraceConstraint` and the fallback used (``""`` if none)."""
    budget = exploration_budget if implies_exploration(profile) else 0
    if pairs.any():
        return TraceConstraint(pairs, budget), ""
    if on_no_pairs == "error":
        raise NoPermittedPairsError(
            f"user {user_id}: the history has no (app category, location cluster) pair, so the constraint permits "
            "nothing (set on_no_pairs: population to use the whole cohort's pairs instead)")
    if not population_pairs.any():
        raise NoPermittedPairsError(f"user {user_id}: neither the user nor the cohort has any app-location pair")
    return TraceConstraint(population_pairs, budget), "population"


def attach_history_prior(constraint: TraceConstraint, windows: list[TraceWindow], grammar: TraceGrammar) -> TraceConstraint:
    """The constraint with the user's line counts per slot, category, (category, cluster) and
    (category, next line's category within a day) as priors."""
    n_a = len(grammar.categories)
    slots, cats = np.zeros(grammar.slots_per_day), np.zeros(n_a)
    pairs, transitions = np.zeros((n_a, grammar.n_clusters)), np.zeros((n_a, n_a))
    for w in windows:
        for e in w.events:
            slots[e.slot] += 1
            cats[e.category] += 1
            pairs[e.category, e.cluster] += 1
        for prev, nxt in zip(w.events[:-1], w.events[1:]):
            transitions[prev.category, nxt.category] += 1
    return TraceConstraint(constraint.pairs, constraint.exploration_budget, slot_counts=slots, category_counts=cats,
                           pair_counts=pairs, transition_counts=transitions)


def plan_requests(corpus: ProfileCorpus, args: SynthesisArguments, grammar: TraceGrammar,
                  users: list[int] | None = None) -> list[SynthesisRequest]:
    """One request per source user (default: the first ``generate_users`` profiled users of ``generate_splits``)."""
    if users is None:
        users = corpus.profiled(*args.generate_splits)
        users = users[:args.generate_users] if args.generate_users else users
    if not users:
        raise ValueError(f"no profiled users in generate_splits {args.generate_splits} to synthesise from")
    events = corpus.cohort.events
    n_a, n_k = len(grammar.categories), grammar.n_clusters
    population = history_pairs(events, corpus.clusters.of, n_a, n_k)
    start = pd.Timestamp(events["timestamp"].min()).normalize()
    days = args.days_per_user or (pd.Timestamp(events["timestamp"].max()).normalize() - start).days + 1
    dates = [(start + pd.Timedelta(days=d)).strftime("%Y-%m-%d") for d in range(days)]
    groups = {int(u): g for u, g in events[events["user_id"].isin(users)].groupby("user_id")}
    requests = []
    for u in users:
        result = corpus.results.get(u)
        profile = result.profile if result is not None else None
        history = groups.get(u, events.iloc[:0])
        pairs = history_pairs(history, corpus.clusters.of, n_a, n_k)
        constraint, fallback = make_constraint(pairs, profile, exploration_budget=args.exploration_budget,
                                               on_no_pairs=args.on_no_pairs, population_pairs=population, user_id=u)
        if not fallback:
            constraint = attach_history_prior(constraint, windows_from_events(history, corpus.clusters.of, grammar), grammar)
        if fallback:
            log.warning("user %d: empty history, using the cohort's app-location pairs (%s fallback)", u, fallback)
        requests.append(SynthesisRequest(u, args.synthetic_user_offset + u, profile, constraint, dates, fallback))
    return requests


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------

def default_max_new_tokens(tokens: GrammarTokens) -> int:
    longest = sum(max(len(s) for s in f) for f in tokens.fields) + len(tokens.newline)
    return tokens.grammar.slots_per_day * longest + 1


@torch.no_grad()
def sample_windows(model, tokens: GrammarTokens, prompts: list[str], constraints: list[TraceConstraint] | None, *,
                   temperature: float = 1.0, max_new_tokens: int | None = None, history_weight: float = 0.0) -> tuple[list[str], int, float]:
    """Sample one completion per prompt in one left-padded batch; ``constraints=None`` samples freely.

    Returns the decoded completions, the number of generated tokens (up to and including each
    row's eos) and the wall time."""
    tokenizer = tokens.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    finally:
        tokenizer.padding_side = side
    kwargs = dict(max_new_tokens=max_new_tokens or default_max_new_tokens(tokens), do_sample=True, top_k=0, top_p=1.0,
                  eos_token_id=tokens.eos, pad_token_id=tokenizer.pad_token_id)
    if constraints is None:
        kwargs["temperature"] = max(temperature, 1e-5)
    else:
        kwargs["temperature"] = 1.0   # the processor applies it after masking
        kwargs["logits_processor"] = [TraceLogitsProcessor(tokens, constraints, temperature, history_weight)]
    start = time.perf_counter()
    out = model.generate(**batch, **kwargs)
    wall = time.perf_counter() - start
    new = out[:, batch["input_ids"].shape[1]:]
    texts, n_tokens = [], 0
    for row in new.tolist():
        n = row.index(tokens.eos) + 1 if tokens.eos in row else len(row)
        n_tokens += n
        texts.append(tokenizer.decode(row[:n], skip_special_tokens=True))
    return texts, n_tokens, wall


def parse_generated(grammar: TraceGrammar, text: str) -> tuple[list[TraceEvent], int, int]:
    """Events of a generated completion, lines total, lines well-formed. A line that breaks the grammar
    (or the increasing slots) is counted and dropped; a last line without its newline (cut by
    ``max_new_tokens``) is counted as not well-formed."""
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]
    events, good = [], 0
    for i, line in enumerate(complete, 1):
        try:
            e = grammar.parse_event(line, i)
        except ValueError:
            continue
        if events and e.slot <= events[-1].slot:
            continue
        events.append(e)
        good += 1
    return events, len(complete) + (1 if tail.strip() else 0), good


def _plan_key(requests: list[SynthesisRequest], settings: dict) -> str:
    plan = {"users": [(r.source_user_id, r.user_id, r.dates, r.constraint.pairs.sum().item(),
                       r.constraint.exploration_budget) for r in requests], **settings}
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def generate_shards(model, tokens: GrammarTokens, requests: list[SynthesisRequest], area_names: list[str],
                    shards_dir: str | Path, *, shard_users: int = 5, batch_size: int = 8, temperature: float = 1.0,
                    seed: int = 0, max_new_tokens: int | None = None, stop_after_shards: int | None = None,
                    progress: bool = True, history_weight: float = 0.0) -> dict:
    """Generate every request's windows into ``shards_dir``, skipping shards already written.

    ``stop_after_shards`` stops after writing that many new shards (what an interruption leaves)."""
    shards_dir = Path(shards_dir)
    shards_dir.mkdir(parents=True, exist_ok=True)
    settings = {"shard_users": shard_users, "batch_size": batch_size, "temperature": temperature, "seed": seed,
                "history_weight": history_weight,
                "max_new_tokens": max_new_tokens, "grammar": asdict(tokens.grammar)}
    key = _plan_key(requests, settings)
    plan_path = shards_dir / "plan.json"
    if plan_path.exists() and json.loads(plan_path.read_text())["key"] != key:
        raise ValueError(f"{shards_dir} holds shards of a different synthesis plan (other users, seed or settings): "
                         "remove it or choose another output_dir")
    write_json(plan_path, {"key": key, "users": len(requests), **settings})
    chunks = [requests[i:i + shard_users] for i in range(0, len(requests), shard_users)]
    stats = {"shards": len(chunks), "shards_resumed": 0, "shards_written": 0, "tokens": 0, "generate_s": 0.0,
             "lines": 0, "well_formed_lines": 0, "interrupted": False}
    bar = tqdm(total=len(requests), desc="synthesising users", unit="user", disable=not progress)
    with bar:
        for index, chunk in enumerate(chunks):
            path = shards_dir / f"shard-{index:05d}.jsonl"
            if path.exists():
                stats["shards_resumed"] += 1
                bar.update(len(chunk))
                continue
            if stop_after_shards is not None and stats["shards_written"] >= stop_after_shards:
                stats["interrupted"] = True
                break
            torch.manual_seed(seed * 100003 + index)
            rows = [(r, d) for r in chunk for d in r.dates]
            texts = []
            for lo in range(0, len(rows), batch_size):
                part = rows[lo:lo + batch_size]
                prompts = [conditioning_prompt(r.profile, tokens.grammar, area_names, TraceWindow(0, d).weekday)
                           for r, d in part]
                out, n_tokens, wall = sample_windows(model, tokens, prompts, [r.constraint for r, _ in part],
                                                     temperature=temperature, max_new_tokens=max_new_tokens,
                                                     history_weight=history_weight)
                texts += out
                stats["tokens"] += n_tokens
                stats["generate_s"] += wall
            records, k = [], 0
            for r in chunk:
                windows = []
                for d in r.dates:
                    _, n_lines, n_good = parse_generated(tokens.grammar, texts[k])
                    stats["lines"] += n_lines
                    stats["well_formed_lines"] += n_good
                    windows.append({"date": d, "text": texts[k]})
                    k += 1
                records.append({"user_id": r.user_id, "source_user_id": r.source_user_id, "windows": windows})
            write_text(path, "".join(json.dumps(rec) + "\n" for rec in records))
            stats["shards_written"] += 1
            bar.update(len(chunk))
    return stats


def read_shards(shards_dir: str | Path, grammar: TraceGrammar) -> dict[int, list[TraceWindow]]:
    """Every synthetic user's windows from the shard files (parsed under the grammar)."""
    users: dict[int, list[TraceWindow]] = {}
    for path in sorted(Path(shards_dir).glob("shard-*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec["user_id"] in users:
                raise ValueError(f"{path}: user {rec['user_id']} appears in two shards")
            users[rec["user_id"]] = [TraceWindow(rec["user_id"], w["date"], parse_generated(grammar, w["text"])[0])
                                     for w in rec["windows"]]
    return users


# --------------------------------------------------------------------------------------------
# Windows -> Tsinghua-format records
# --------------------------------------------------------------------------------------------

class RecordPools:
    """Where the records of a synthetic line come from: the real cohort's empirical distributions.

    A generated line says what dominated a slot: (app category ``a``, location cluster ``k``) and
    the level of its record count. Writing it back draws, for the source user (falling back to
    the cohort, then to the catalogue):

    - the number of records from the user's record counts of real slots at that level;
    - one base station of cluster ``k`` (the user is at one place in a slot);
    - with ``within_slot="mixture"`` (default) each record's app category from the categories of
      the records in the user's real slots dominated by ``(a, k)`` (within-slot co-usage: the
      line holds the slot's dominant pair only, the rest of the slot is decoded from it); with
      ``"dominant"`` every record gets category ``a``;
    - an app of the record's category and a byte count, lognormal around the category's median.
    """

    def __init__(self, events: pd.DataFrame, cluster_of_location, app_category: pd.Series, base_ids: np.ndarray,
                 n_categories: int, grammar: TraceGrammar, within_slot: str = "mixture"):
        if within_slot not in WITHIN_SLOT:
            raise ValueError(f"within_slot must be one of {WITHIN_SLOT}, got {within_slot!r}")
        self.within_slot = within_slot
        events = events.assign(cluster=cluster_of_location(events["location_id"].to_numpy()))
        self.user_apps = {k: g.value_counts() for k, g in events.groupby(["user_id", "app_category"])["app_id"]}
        self.user_stations = {k: g.value_counts() for k, g in events.groupby(["user_id", "cluster"])["location_id"]}
        self.cohort_apps = {int(k): g.value_counts() for k, g in events.groupby("app_category")["app_id"]}
        self.cohort_stations = {int(k): g.value_counts() for k, g in events.groupby("cluster")["location_id"]}
        self.catalogue_apps = {int(c): pd.Series(1, index=g.index) for c, g in app_category.groupby(app_category)}
        stations = pd.Series(np.asarray(cluster_of_location(base_ids)), index=base_ids)
        self.catalogue_stations = {int(k): pd.Series(1, index=g.index) for k, g in stations.groupby(stations)}
        log_bytes = np.log(np.maximum(events["traffic_bytes"].to_numpy(np.float64), 1.0))
        by_cat = pd.Series(log_bytes).groupby(events["app_category"].to_numpy())
        overall = (float(np.mean(log_bytes)), float(np.std(log_bytes)) or 1.0)
        self.byte_params = {c: (float(by_cat.mean().get(c, overall[0])), float(by_cat.std().fillna(overall[1]).get(c, overall[1])))
                            for c in range(n_categories)}
        slots = slot_records(events, cluster_of_location, grammar)
        dominant = ["dominant_category", "dominant_cluster"]
        self.user_mix = {k: g.value_counts() for k, g in slots.groupby(["user_id", *dominant])["category"]}
        self.cohort_mix = {k: g.value_counts() for k, g in slots.groupby(dominant)["category"]}
        counts = slots.drop_duplicates(["user_id", "date", "slot"])
        counts = counts.assign(level=level_of(counts["records"].to_numpy(np.int64)))
        self.user_counts = {k: g.value_counts() for k, g in counts.groupby(["user_id", "level"])["records"]}
        self.cohort_counts = {int(k): g.value_counts() for k, g in counts.groupby("level")["records"]}

    @staticmethod
    def _draw(pool: pd.Series, rng: np.random.Generator, size: int | None = None):
        p = pool.to_numpy(np.float64)
        return rng.choice(pool.index.to_numpy(), size=size, p=p / p.sum())

    @staticmethod
    def _pool(user: int, key, own: dict, cohort: dict, catalogue: dict | None = None) -> pd.Series | None:
        for source in (own.get((user, *np.atleast_1d(key).tolist())), cohort.get(key),
                       catalogue.get(key) if catalogue is not None else None):
            if source is not None and len(source):
                return source
        return None

    def records(self, user: int, level: int, rng: np.random.Generator) -> int:
        pool = self._pool(user, level, self.user_counts, self.cohort_counts)
        if pool is None:
            lo, hi = records_range(level)
            return int(rng.integers(lo, hi + 1))
        return int(self._draw(pool, rng))

    def categories(self, user: int, category: int, cluster: int, rng: np.random.Generator, size: int) -> np.ndarray:
        pool = self._pool(user, (category, cluster), self.user_mix, self.cohort_mix) if self.within_slot == "mixture" else None
        return np.full(size, category) if pool is None else self._draw(pool, rng, size).astype(np.int64)

    def app(self, user, category, rng, size):
        pool = self._pool(user, category, self.user_apps, self.cohort_apps, self.catalogue_apps)
        if pool is None:
            raise ValueError(f"no app of category {category} in the real cohort to write a synthetic record with")
        return self._draw(pool, rng, size)

    def station(self, user, cluster, rng):
        pool = self._pool(user, cluster, self.user_stations, self.cohort_stations, self.catalogue_stations)
        if pool is None:
            raise ValueError(f"no base station in cluster {cluster} in the real cohort to write a synthetic record with")
        return self._draw(pool, rng)

    def traffic(self, category, rng, size):
        mu, sd = self.byte_params[category]
        return np.maximum(1, np.round(rng.lognormal(mu, sd, size))).astype(np.int64)


def events_from_windows(user_id: int, source_user_id: int, windows: list[TraceWindow], grammar: TraceGrammar,
                        pools: RecordPools, seed: int) -> pd.DataFrame:
    """Tsinghua trace rows of one synthetic user (deterministic in ``seed`` and the user; see :class:`RecordPools`)."""
    rng = np.random.default_rng([seed, source_user_id])
    slot_s = grammar.slot_minutes * 60
    rows = []
    for w in windows:
        day = pd.Timestamp(w.date)
        for e in w.events:
            n = min(pools.records(source_user_id, e.level, rng), slot_s)
            seconds = np.sort(rng.choice(slot_s, size=n, replace=False)) + e.slot * slot_s
            station = pools.station(source_user_id, e.cluster, rng)
            categories = pools.categories(source_user_id, e.category, e.cluster, rng, n)
            apps, traffic = np.empty(n, np.int64), np.empty(n, np.int64)
            for c in np.unique(categories):
                at = categories == c
                apps[at] = pools.app(source_user_id, int(c), rng, int(at.sum()))
                traffic[at] = pools.traffic(int(c), rng, int(at.sum()))
            stamps = (day + pd.to_timedelta(seconds, unit="s")).strftime("%Y%m%d%H%M%S")
            rows.append(pd.DataFrame({"user_id": user_id, "timestamp": stamps, "base_station_id": station,
                                      "app_id": apps, "traffic_bytes": traffic}))
    if not rows:
        return pd.DataFrame(columns=["user_id", "timestamp", "base_station_id", "app_id", "traffic_bytes"])
    return pd.concat(rows, ignore_index=True)


def written_back_events(windows: dict[int, list[TraceWindow]], grammar: TraceGrammar, pools: RecordPools,
                        app_category: pd.Series, *, seed: int = 0, offset: int = 0) -> pd.DataFrame:
    """Each user's windows written back (:func:`events_from_windows`) as an event frame with the
    loader's columns; user ``u`` draws from source user ``u - offset``."""
    rows = pd.concat([events_from_windows(u, u - offset, ws, grammar, pools, seed) for u, ws in windows.items()],
                     ignore_index=True)
    return rows.assign(app_category=app_category.reindex(rows["app_id"].to_numpy()).to_numpy(),
                       location_id=rows["base_station_id"],
                       timestamp=pd.to_datetime(rows["timestamp"], format="%Y%m%d%H%M%S"))


def check_output_dir(real_dir: str | Path, out_dir: str | Path) -> None:
    """Refuse to write a synthetic cohort into the real cohort's folder (it would overwrite its trace)."""
    if Path(out_dir).resolve() == Path(real_dir).resolve():
        raise ValueError(f"the synthetic cohort would be written into the real cohort {real_dir}: choose an "
                         "output_dir whose cohort/ folder is not the real cohort_dir")


def write_cohort(corpus: ProfileCorpus, requests: list[SynthesisRequest], shards_dir: str | Path,
                 out_dir: str | Path, grammar: TraceGrammar, *, seed: int = 0, within_slot: str = "mixture") -> dict:
    """Assemble the shards into a Tsinghua-format cohort directory (+ ``profiles.jsonl``)."""
    check_output_dir(corpus.cohort.directory, out_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    windows = read_shards(shards_dir, grammar)
    missing = [r.user_id for r in requests if r.user_id not in windows]
    if missing:
        raise ValueError(f"{len(missing)} synthetic users have no shard yet (first: {missing[0]}): run generate again")
    real = corpus.cohort
    for name in (CATEGORIES_FILE, APP2CATEGORY_FILE, BASE_POI_FILE, BASE_COORDS_FILE):
        if (real.directory / name).exists():
            shutil.copyfile(real.directory / name, out_dir / name)
    pools = RecordPools(real.events, corpus.clusters.of, real.app_category, real.base_poi.index.to_numpy(),
                        len(real.categories), grammar, within_slot)
    frames, empty_users = [], []
    for r in sorted(requests, key=lambda r: r.user_id):
        frame = events_from_windows(r.user_id, r.source_user_id, windows[r.user_id], grammar, pools, seed)
        if frame.empty:
            empty_users.append(r.user_id)
        frames.append(frame)
    trace = pd.concat(frames, ignore_index=True)
    with atomic_path(out_dir / TRACE_FILE) as tmp:
        trace.to_csv(tmp, sep=" ", header=False, index=False)
    lines = []
    for r in sorted(requests, key=lambda r: r.user_id):
        lines.append(json.dumps({
            "user_id": r.user_id, "source_user_id": r.source_user_id, "synthetic": True,
            "profile": r.profile.model_dump(mode="json") if r.profile else None,
            "profile_text": r.profile.to_text() if r.profile else "",
            "permitted_pairs": int(r.constraint.pairs.sum()), "exploration_budget": r.constraint.exploration_budget,
            "fallback": r.fallback, "days": len(r.dates), "events": int((trace["user_id"] == r.user_id).sum())}) + "\n")
    write_text(out_dir / PROFILES_FILE, "".join(lines))
    summary = {"users": len(requests), "records": len(trace), "users_without_records": empty_users}
    write_json(out_dir / "synthesis.json", summary)
    return summary


def read_profiles(cohort_dir: str | Path) -> pd.DataFrame:
    """``profiles.jsonl`` of a synthetic cohort, indexed by synthetic user id."""
    return pd.read_json(Path(cohort_dir) / PROFILES_FILE, lines=True).set_index("user_id")
