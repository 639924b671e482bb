"""Cold-start / novelty recommendation (U-SCOPE section 7.5, Fig. 6): recommend the app categories,
places (POI-cluster areas) and intents a user will take up: items of the hidden part of the history
that the user had not used in the visible part.

Cuts of a user's history (:class:`NoveltyConfig`):

- ``first_days``: the first ``visible_days`` days (counted from the user's first record) are
  visible, the rest is hidden;
- ``removed``: ``removed_apps`` app categories and ``removed_places`` areas (drawn per user with a
  seeded generator among those with at least ``target_share`` of the records, never the top one)
  are cut out with all their records; those records are the hidden part.

Items: an app is its category name; a place is its POI-cluster area name; an intent is the activity
of the app category at the kind of place (:func:`scope.profiles.teachers.intent_of`: app category x
place; the hour is left out, because the profile's ``likely_intents`` carry none and an
app x place x hour triple recurs too rarely in one week to count as "used"). Traces are dense
(hundreds of records a day) and a stray record is not a habit, so an item is *seen* when it makes
at least ``seen_share`` of the visible records, and a *target* when it makes at least
``target_share`` of the hidden records and is not seen: something the user took up. A case without
targets of a type is excluded from that type (counted); without any target, from everything
(counted).

Recommenders (each ranks unseen items; :func:`evaluate_recommender` scores hit@k and recall@k,
k = 1, 3, per item type):

- :class:`PopularityRecommender`: how many training users used the item (whole history);
- :class:`NeighbourRecommender`: item-kNN, the ``k`` training users most similar by cosine of
  :func:`stats_vector` (raw statistics) or of the profile's frozen SBERT encoding (Eq. 24's input);
- :class:`PersonaPrior` (the grounded teacher): per persona, the share of training users' cases
  (the same cuts) in which an unseen item turned up in the hidden part, smoothed towards all
  personas, plus the statistics-kNN evidence (so it is not independent of that baseline) and, for
  intents, the user's own app shares carried to likely places. Its answers, with a short chain of
  thought, are the SFT targets of the student's recommendation turn (:func:`teacher_answer`).

The student answers :meth:`NoveltyTask.prompt` (compact statistics of the *visible* history, what
the user already used and the candidates, ``prompts/recommend_*.jinja``) with a
:class:`Recommendation`: reasoning (its reading of the user), persona, then the three lists.
Decisions:

- the student states its profile (persona and reasoning) as the first part of the same answer
  rather than in a separate profile turn, which halves the prompt tokens a case costs;
- retrieve, then rank: the prompt lists only unused candidates, ordered by the statistics-kNN
  evidence of similar training users (:meth:`NoveltyTask.candidates`; a training user is left out
  of its own neighbours, so its hidden part never leaks into its prompt), intents cut to the first
  ``intent_candidates``. With the whole vocabulary in its fixed order, the 135M student after SFT
  scored mean hit@3 0.624 on 60 held-out users, below popularity (0.779): it had to subtract the
  used names and recall the cohort's take-up rates from 80 SFT steps (benchmarks/README.md). The
  student's job is now the reranking and the reasoning (persona), as in LLM recommenders that
  rerank a retriever's candidates.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from scope.data.statistics import UserStatistics, user_statistics
from scope.metrics import cluster_bootstrap_ci, cluster_bootstrap_means
from scope.profiles.prompts import PromptBuilder, UserPrompt
from scope.profiles.schema import ProfileError, parse_answer
from scope.profiles.teachers import infer_persona, intent_of

ITEM_TYPES = ("apps", "places", "intents")
# How every CI of this module is drawn: a user contributes up to one case per cut, so the cases of a
# user are resampled together (scope.metrics.cluster_bootstrap_ci).
CI_METHOD = "bootstrap over users (cluster)"
CUTS = ("first_days", "removed")
KS = (1, 3)


@dataclass
class NoveltyConfig:
    """How histories are cut for the novelty task, and whether SFT / DPO learn it."""

    cuts: list[str] = field(default_factory=lambda: ["first_days", "removed"])
    visible_days: int = 2             # first_days: days visible, counted from the user's first record
    removed_apps: int = 1             # removed: app categories cut out per user
    removed_places: int = 1           # removed: areas cut out per user
    seen_share: float = 0.01          # an item is seen with at least this share of the visible records
    target_share: float = 0.03        # ... and a target with this share of the hidden records (and not seen)
    novelty_seed: int = 0             # which apps / places a 'removed' cut draws
    recommend_share: float = 0.25     # share of the SFT examples that are the teacher's recommendations (0 = none)
    recommend_max_new_tokens: int = 160
    intent_candidates: int = 12       # intents listed in the prompt (by similar users' evidence)

    def __post_init__(self):
        unknown = sorted(set(self.cuts) - set(CUTS))
        if unknown or not self.cuts:
            raise ValueError(f"cuts {self.cuts}: expected a non-empty list of {list(CUTS)}")
        if self.visible_days < 1 or min(self.removed_apps, self.removed_places) < 0:
            raise ValueError("visible_days must be >= 1, removed_apps / removed_places >= 0")
        if not 0 <= self.recommend_share < 1:
            raise ValueError(f"recommend_share must be in [0, 1), got {self.recommend_share}")
        if self.intent_candidates < 1:
            raise ValueError(f"intent_candidates must be >= 1, got {self.intent_candidates}")
        if not 0 < self.seen_share <= self.target_share < 1:
            raise ValueError(f"need 0 < seen_share <= target_share < 1, got {self.seen_share}, {self.target_share}")


@dataclass
class NoveltyCase:
    """One user under one cut: the visible part's statistics, what it has seen, the hidden targets."""

    user_id: int
    cut: str
    stats: UserStatistics
    seen: dict[str, list[str]]
    targets: dict[str, list[str]]

    @property
    def key(self) -> str:
        return f"{self.user_id}/{self.cut}"


class Vocabulary:
    """The names a recommendation may use, per item type (the cohort's categories and areas)."""

    def __init__(self, categories: Sequence[str], areas: Sequence[str]):
        self.items = {"apps": list(categories), "places": list(areas),
                      "intents": sorted({intent_of(a, p) for a in categories for p in areas})}


def event_items(events: pd.DataFrame, categories: Sequence[str], clusters) -> pd.DataFrame:
    """One row per record: its ``apps``, ``places`` and ``intents`` item (records at a station
    outside every cluster have no place and no intent)."""
    area_idx = clusters.of(events["location_id"].to_numpy())
    names = np.asarray(list(clusters.names) + [None], dtype=object)
    apps = np.asarray(categories, dtype=object)[events["app_category"].to_numpy().astype(int)]
    places = names[np.where(area_idx >= 0, area_idx, len(clusters.names))]
    intents = np.array([intent_of(a, p) if p is not None else None for a, p in zip(apps, places)], dtype=object)
    return pd.DataFrame({"apps": apps, "places": places, "intents": intents}, index=events.index)


def _items(frame: pd.DataFrame, min_share: float) -> dict[str, list[str]]:
    """The items that make at least ``min_share`` of the records, per type."""
    out = {}
    for t in ITEM_TYPES:
        shares = frame[t].dropna().value_counts(normalize=True)
        out[t] = sorted(shares.index[shares >= min_share])
    return out


def cut_history(events: pd.DataFrame, items: pd.DataFrame, cut: str, cfg: NoveltyConfig,
                user_id: int) -> np.ndarray | None:
    """Boolean mask of the *visible* records of one user's events under ``cut`` (None: the cut does not
    apply, e.g. a one-day history or nothing to remove)."""
    if cut == "first_days":
        day = pd.DatetimeIndex(events["timestamp"]).normalize()
        offset = np.asarray((day - day.min()).days)
        visible = offset < cfg.visible_days
        return visible if 0 < visible.sum() < len(visible) else None
    rng = np.random.default_rng([cfg.novelty_seed, int(user_id)])
    removed = np.zeros(len(events), bool)
    for t, n in (("apps", cfg.removed_apps), ("places", cfg.removed_places)):
        shares = items[t].dropna().value_counts(normalize=True)
        candidates = sorted(shares.index[1:][shares.iloc[1:] >= cfg.target_share])
        if n and candidates:
            drop = rng.choice(candidates, size=min(n, len(candidates)), replace=False)
            removed |= items[t].isin(drop).to_numpy()
    return ~removed if 0 < removed.sum() < len(removed) else None


def novelty_cases(events: pd.DataFrame, categories: Sequence[str], clusters, users: Sequence[int],
                  cfg: NoveltyConfig) -> tuple[list[NoveltyCase], dict[str, int]]:
    """The cases of ``users`` under every configured cut, and the exclusion counts
    (``no_cut``: the cut does not apply; ``no_targets``: nothing new in the hidden part)."""
    groups = {int(u): g for u, g in events[events["user_id"].isin(list(users))].groupby("user_id", sort=True)}
    cases, excluded = [], Counter()
    for u in users:
        frame = groups.get(int(u))
        if frame is None:
            excluded["no_cut"] += len(cfg.cuts)
            continue
        items = event_items(frame, categories, clusters)
        for cut in cfg.cuts:
            visible = cut_history(frame, items, cut, cfg, u)
            if visible is None:
                excluded["no_cut"] += 1
                continue
            seen = _items(items[visible], cfg.seen_share)
            hidden = _items(items[~visible], cfg.target_share)
            targets = {t: [i for i in hidden[t] if i not in set(seen[t])] for t in ITEM_TYPES}
            if not any(targets.values()):
                excluded["no_targets"] += 1
                continue
            stats = user_statistics(int(u), frame[visible], list(categories), clusters)
            cases.append(NoveltyCase(int(u), cut, stats, seen, targets))
    return cases, dict(excluded)


def user_item_sets(events: pd.DataFrame, categories, clusters, users, min_share: float) -> dict[int, dict[str, set]]:
    """Each user's items over the whole history (at least ``min_share`` of the records)."""
    frame = events[events["user_id"].isin(list(users))]
    items = event_items(frame, categories, clusters)
    return {int(u): {t: set(v) for t, v in _items(items.loc[g.index], min_share).items()}
            for u, g in frame.groupby("user_id", sort=True)}


# ------------------------------------------------------------------------------------------------
# Recommenders: case -> {item type: ranked unseen items}
# ------------------------------------------------------------------------------------------------

def _rank(scores: dict[str, float], exclude, k: int, tie: dict[str, float] | None = None) -> list[str]:
    tie = tie or {}
    pool = [i for i in scores if i not in exclude]
    return sorted(pool, key=lambda i: (-scores[i], -tie.get(i, 0.0), i))[:k]


class PopularityRecommender:
    """Items ranked by how many training users used them (whole history), seen items left out."""

    name = "popularity"

    def __init__(self, train_items: dict[int, dict[str, set]], vocabulary: Vocabulary):
        self.counts = {t: {i: float(sum(i in s[t] for s in train_items.values())) for i in vocabulary.items[t]}
                       for t in ITEM_TYPES}

    def __call__(self, case: NoveltyCase, k: int = 3) -> dict[str, list[str]]:
        return {t: _rank(self.counts[t], set(case.seen[t]), k) for t in ITEM_TYPES}


def stats_vector(stats: UserStatistics) -> np.ndarray:
    """Raw-statistics vector of a user: app-category shares, area shares and day-part shares,
    each block L2-normalised (the kNN baseline's similarity space)."""
    apps = np.array([stats.app_share.get(a, 0.0) for a in stats.app_names])
    areas = np.array([stats.area_share.get(a, 0.0) for a in stats.area_names])
    parts = np.array(list(stats.day_part_share.values()))
    return np.concatenate([b / max(np.linalg.norm(b), 1e-12) for b in (apps, areas, parts)])


class NeighbourRecommender:
    """Item-kNN: an unseen item scores the summed cosine similarity of the ``k`` nearest training
    users who used it (ties: popularity)."""

    def __init__(self, name: str, train_vectors: np.ndarray, train_items: list[dict[str, set]],
                 popularity: PopularityRecommender, k: int = 10):
        norms = np.linalg.norm(train_vectors, axis=1, keepdims=True)
        self.name, self.vectors, self.items = name, train_vectors / np.maximum(norms, 1e-12), train_items
        self.popularity, self.k = popularity, k

    def scores(self, vector: np.ndarray, leave_out: int | None = None) -> dict[str, dict[str, float]]:
        """Per type, each item's summed similarity over the nearest training users who used it
        (``leave_out``: the index of a training user who is not its own neighbour)."""
        sims = self.vectors @ (vector / max(np.linalg.norm(vector), 1e-12))
        if leave_out is not None:
            sims[leave_out] = -np.inf
        nearest = np.argsort(-sims, kind="stable")[: self.k]
        out = {}
        for t in ITEM_TYPES:
            out[t] = dict.fromkeys(self.popularity.counts[t], 0.0)
            for n in nearest:
                for i in self.items[n][t]:
                    out[t][i] = out[t].get(i, 0.0) + float(sims[n])
        return out

    def __call__(self, case: NoveltyCase, vector: np.ndarray, k: int = 3) -> dict[str, list[str]]:
        return {t: _rank(v, set(case.seen[t]), k, self.popularity.counts[t]) for t, v in self.scores(vector).items()}


class PersonaPrior:
    """The grounded teacher's recommender. Its score of an unseen item is the persona rate
    ``(hits + alpha * global rate) / (cases + alpha)`` over training cases in which the item was
    unseen, plus, with ``neighbours``, the item's mean similarity-weighted use among the user's
    nearest training users by raw statistics (what users like this one use)."""

    name = "grounded teacher"

    def __init__(self, train_cases: Sequence[NoveltyCase], vocabulary: Vocabulary,
                 neighbours: NeighbourRecommender | None = None, alpha: float = 2.0):
        self.vocabulary, self.neighbours, self.alpha = vocabulary, neighbours, alpha
        self.hits, self.trials = defaultdict(Counter), defaultdict(Counter)
        for case in train_cases:
            persona = self.persona(case)[0]
            for t in ITEM_TYPES:
                seen, targets = set(case.seen[t]), set(case.targets[t])
                for i in vocabulary.items[t]:
                    if i not in seen:
                        for key in ((persona, t), ("*", t)):
                            self.trials[key][i] += 1
                            self.hits[key][i] += i in targets

    @staticmethod
    def persona(case: NoveltyCase) -> tuple[str, str]:
        return infer_persona(case.stats)

    def rates(self, persona: str, t: str) -> dict[str, float]:
        glob = {i: self.hits["*", t][i] / max(self.trials["*", t][i], 1) for i in self.vocabulary.items[t]}
        return {i: (self.hits[persona, t][i] + self.alpha * glob[i]) / (self.trials[persona, t][i] + self.alpha)
                for i in self.vocabulary.items[t]}

    def scores(self, case: NoveltyCase) -> dict[str, dict[str, float]]:
        """Per type, every item's score; an intent ``a at p`` also gets the user's visible share of app
        ``a`` times (visible share + persona rate) of place ``p``: frequent apps follow the user to
        new kinds of place."""
        persona = self.persona(case)[0]
        out = {t: self.rates(persona, t) for t in ITEM_TYPES}
        stats = case.stats
        for app in self.vocabulary.items["apps"]:
            for area in self.vocabulary.items["places"]:
                out["intents"][intent_of(app, area)] += (stats.app_share.get(app, 0.0)
                                                         * (stats.area_share.get(area, 0.0) + out["places"][area]))
        if self.neighbours is not None:
            for t, near in self.neighbours.scores(stats_vector(case.stats)).items():
                for i, v in near.items():
                    out[t][i] += v / self.neighbours.k
        return out

    def __call__(self, case: NoveltyCase, k: int = 3) -> dict[str, list[str]]:
        return {t: _rank(v, set(case.seen[t]), k) for t, v in self.scores(case).items()}


# ------------------------------------------------------------------------------------------------
# The student's turn: prompt, answer schema, the teacher's answer, scoring
# ------------------------------------------------------------------------------------------------

class Recommendation(BaseModel):
    """The answer of the recommendation turn: the reading of the user (CoT), then three lists."""

    model_config = ConfigDict(extra="forbid")
    reasoning: str = Field(min_length=1, max_length=400)
    persona: str = Field(min_length=1, max_length=60)
    apps: list[str] = Field(max_length=3)
    places: list[str] = Field(max_length=3)
    intents: list[str] = Field(max_length=3)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), ensure_ascii=False, separators=(", ", ": "))


def parse_recommendation(text: str) -> Recommendation:
    return parse_answer(text, Recommendation)


def recommendation_schema(vocabulary: Vocabulary, max_chars: int = 300) -> dict:
    """JSON schema for constrained decoding: every list an enum of the vocabulary's names."""
    enum = lambda t: {"type": "array", "maxItems": 3, "items": {"type": "string", "enum": vocabulary.items[t]}}
    return {"type": "object", "additionalProperties": False,
            "required": ["reasoning", "persona", *ITEM_TYPES],
            "properties": {"reasoning": {"type": "string", "minLength": 1, "maxLength": max_chars},
                           "persona": {"type": "string", "minLength": 1, "maxLength": 40},
                           **{t: enum(t) for t in ITEM_TYPES}}}


def teacher_answer(case: NoveltyCase, prior: PersonaPrior) -> Recommendation:
    """The grounded teacher's recommendation with its chain of thought (the SFT target)."""
    persona, why = prior.persona(case)
    ranked = prior(case)
    cite = lambda t: " and ".join(ranked[t][:1]) or f"no new {t}"
    top_app = next(iter(case.stats.app_share), "its main apps")
    reasoning = (f"A {persona}: {why}. Users like this took up {cite('apps')} and {cite('places')}; "
                 f"{top_app} will follow the user to new places.")
    return Recommendation(reasoning=reasoning[:400], persona=persona, **ranked)


@dataclass
class CaseScore:
    """Scores of one recommendation for one case (NaN: no target of that type)."""

    key: str
    user_id: int
    cut: str
    valid: bool
    cut_off: bool
    error: str | None
    scores: dict[str, float]                        # "<type>_hit@k", "<type>_recall@k"
    unknown: list[str] = field(default_factory=list)   # names outside the vocabulary (scored 0)
    seen_recommended: int = 0                          # recommended items the user already has


def score_lists(case: NoveltyCase, ranked: dict[str, list[str]], vocabulary: Vocabulary) -> tuple[dict, list, int]:
    scores, unknown, seen_hits = {}, [], 0
    for t in ITEM_TYPES:
        known = set(vocabulary.items[t])
        recs = list(ranked.get(t, []))[: max(KS)]
        unknown += [f"{t}: {i}" for i in recs if i not in known]
        seen_hits += sum(i in set(case.seen[t]) for i in recs)
        targets = set(case.targets[t])
        for k in KS:
            hits = len(set(recs[:k]) & targets) if targets else None
            scores[f"{t}_hit@{k}"] = float(hits > 0) if targets else float("nan")
            scores[f"{t}_recall@{k}"] = hits / len(targets) if targets else float("nan")
    return scores, unknown, seen_hits


def score_case(case: NoveltyCase, ranked: dict[str, list[str]], vocabulary: Vocabulary) -> CaseScore:
    scores, unknown, seen_hits = score_lists(case, ranked, vocabulary)
    return CaseScore(case.key, case.user_id, case.cut, True, False, None, scores, unknown, seen_hits)


def score_answer(case: NoveltyCase, answer: str, vocabulary: Vocabulary, cut_off: bool = False) -> CaseScore:
    """Score a model's answer: invalid (or cut off at ``max_new_tokens``) answers score 0 everywhere."""
    try:
        rec = parse_recommendation(answer)
    except ProfileError as err:
        zero, _, _ = score_lists(case, {}, vocabulary)
        error = "cut off at max_new_tokens" if cut_off else str(err)
        return CaseScore(case.key, case.user_id, case.cut, False, cut_off, error, zero)
    return score_case(case, rec.model_dump(), vocabulary)


def novelty_summary(scores: Sequence[CaseScore], n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean over cases and 95% CI of every metric, the CI a bootstrap over users (cluster: a resampled
    user brings all its cases); ``mean_hit@3`` averages the three types."""
    out = {"cases": len(scores), "users": len({s.user_id for s in scores}), "ci95_method": CI_METHOD,
           "valid": float(np.mean([s.valid for s in scores])) if scores else float("nan"),
           "cut_off": int(sum(s.cut_off for s in scores)),
           "unknown_names": sorted({u for s in scores for u in s.unknown})}
    keys = [f"{t}_{m}@{k}" for t in ITEM_TYPES for m in ("hit", "recall") for k in KS]
    for key in keys:
        values = np.array([s.scores[key] for s in scores], float)
        mean, lo, hi = cluster_bootstrap_ci(values, [s.user_id for s in scores], n_boot, seed)
        out[key] = {"mean": mean, "ci95": [lo, hi], "n": int((~np.isnan(values)).sum())}
    out["mean_hit@3"] = dict(zip(("mean", "ci95"), _mean_over_types(scores, n_boot, seed)))
    return out


def _mean_over_types(scores: Sequence[CaseScore], n_boot: int, seed: int) -> tuple[float, list[float]]:
    """Mean over item types of hit@3 (each type's mean over its cases), with a CI that resamples
    users with all their cases (:func:`scope.metrics.cluster_bootstrap_means`)."""
    table = np.array([[s.scores[f"{t}_hit@3"] for t in ITEM_TYPES] for s in scores], float).reshape(-1, len(ITEM_TYPES))
    if not len(table):
        return float("nan"), [float("nan"), float("nan")]
    draws = cluster_bootstrap_means(table, [s.user_id for s in scores], n_boot, seed)   # [n_boot, types]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # a type without any target (in a resample)
        point = float(np.nanmean(np.nanmean(table, 0)))
        boots = np.nanmean(draws, 1)
    lo, hi = np.nanquantile(boots, [0.025, 0.975])
    return point, [float(lo), float(hi)]


def paired_difference(a: Sequence[CaseScore], b: Sequence[CaseScore], metric: str = "mean_hit@3",
                      n_boot: int = 2000, seed: int = 0) -> dict:
    """``b - a`` on the same cases (matched by key): mean over cases of the per-case differences of
    ``metric`` (``mean_hit@3``: the case's mean over its item types) and its 95% CI, a bootstrap over
    users (cluster: a resampled user brings all its cases' differences)."""
    def value(s):
        if metric == "mean_hit@3":
            v = [s.scores[f"{t}_hit@3"] for t in ITEM_TYPES]
            v = [x for x in v if not np.isnan(x)]
            return float(np.mean(v)) if v else float("nan")
        return s.scores[metric]
    left = {s.key: value(s) for s in a}
    pairs = [(s.user_id, value(s) - left[s.key]) for s in b
             if s.key in left and not np.isnan(value(s)) and not np.isnan(left[s.key])]
    mean, lo, hi = cluster_bootstrap_ci([d for _, d in pairs], [u for u, _ in pairs], n_boot, seed)
    return {"mean": mean, "ci95": [lo, hi], "n": len(pairs), "users": len({u for u, _ in pairs}),
            "ci95_method": CI_METHOD}


def evaluate_recommender(recommend, cases: Sequence[NoveltyCase], vocabulary: Vocabulary) -> list[CaseScore]:
    return [score_case(c, recommend(c), vocabulary) for c in cases]



def profile_vectors(stats: Sequence[UserStatistics], encoder) -> np.ndarray:
    """The frozen SBERT encoding (Eq. 24's input) of the grounded profile of each statistics (the kNN-by-profile baseline)."""
    from scope.profiles.teachers import grounded_profile

    return encoder.encode([grounded_profile(s).to_text() for s in stats])


@dataclass
class NoveltyTask:
    """The novelty task on one corpus: cases of the evaluated users, the teacher and the baselines
    fitted on the training users (their whole histories and their own cases)."""

    config: NoveltyConfig
    vocabulary: Vocabulary
    train_cases: list[NoveltyCase]
    cases: list[NoveltyCase]
    excluded: dict[str, int]
    popularity: PopularityRecommender
    knn_stats: NeighbourRecommender
    teacher: PersonaPrior
    train_users: list[int]

    @classmethod
    def build(cls, corpus, config: NoveltyConfig, eval_users: Sequence[int], train_splits=("train",)) -> "NoveltyTask":
        events, categories, clusters = corpus.cohort.events, corpus.cohort.categories, corpus.clusters
        vocabulary = Vocabulary(categories, clusters.names)
        train_users = [u for u in corpus.profiled(*train_splits) if not corpus.stats[u].empty and u in corpus.cohort.user_ids]
        train_cases, _ = novelty_cases(events, categories, clusters, train_users, config)
        cases, excluded = novelty_cases(events, categories, clusters, list(eval_users), config)
        items = user_item_sets(events, categories, clusters, train_users, config.target_share)
        popularity = PopularityRecommender(items, vocabulary)
        knn = NeighbourRecommender("kNN (statistics)", np.stack([stats_vector(corpus.stats[u]) for u in train_users]),
                                   [items[u] for u in train_users], popularity)
        return cls(config, vocabulary, train_cases, cases, excluded, popularity, knn,
                   PersonaPrior(train_cases, vocabulary, knn), train_users)

    def baselines(self, corpus, encoder=None) -> dict[str, list[CaseScore]]:
        """Scores of popularity, both kNNs (the profile encoding only with an ``encoder``) and the grounded teacher."""
        out = {"popularity": evaluate_recommender(self.popularity, self.cases, self.vocabulary),
               "kNN (statistics)": evaluate_recommender(lambda c: self.knn_stats(c, stats_vector(c.stats)),
                                                        self.cases, self.vocabulary)}
        if encoder is not None:
            train = profile_vectors([corpus.stats[u] for u in self.train_users], encoder)
            knn = NeighbourRecommender("kNN (profile encoding)", train, self.knn_stats.items, self.popularity)
            mine = profile_vectors([c.stats for c in self.cases], encoder)
            out["kNN (profile encoding)"] = [score_case(c, knn(c, v), self.vocabulary) for c, v in zip(self.cases, mine)]
        out["grounded teacher"] = evaluate_recommender(self.teacher, self.cases, self.vocabulary)
        return out

    def candidates(self, case: NoveltyCase) -> dict[str, list[str]]:
        """Per type, the unused items ranked by the statistics-kNN evidence (ties: popularity); a
        training user is left out of its own neighbours; intents cut to ``intent_candidates``."""
        leave_out = self.train_users.index(case.user_id) if case.user_id in self.train_users else None
        scores = self.knn_stats.scores(stats_vector(case.stats), leave_out)
        ranked = {t: _rank(scores[t], set(case.seen[t]), len(scores[t]), self.popularity.counts[t]) for t in ITEM_TYPES}
        ranked["intents"] = ranked["intents"][: self.config.intent_candidates]
        return ranked

    def prompt(self, case: NoveltyCase, builder: PromptBuilder) -> UserPrompt:
        """The student's recommendation turn for ``case``."""
        return builder.recommendation(case.stats, case.seen, self.candidates(case))

    def prompts(self, builder: PromptBuilder, cases: Sequence[NoveltyCase] | None = None) -> list[UserPrompt]:
        return [self.prompt(c, builder) for c in (self.cases if cases is None else cases)]

    def teacher_examples(self, builder: PromptBuilder) -> list[tuple[UserPrompt, str]]:
        """(prompt, the teacher's answer) of every training case: the recommendation SFT data."""
        return [(self.prompt(c, builder), teacher_answer(c, self.teacher).to_json()) for c in self.train_cases]
