"""The profile corpus: cohort -> per-user statistics -> prompts -> teacher profiles, per split.

Every U-SCOPE stage (SFT, DPO, evaluation, embeddings) starts here, configured by
:class:`ProfileDataArguments` (a dataclass the recipes extend, so each recipe's YAML shows these
keys). ``cohort_dir`` names a Tsinghua-format folder, which is read (never written) and must
exist; without it the embedded default cohort is simulated once into ``simulated_cohort_dir``, so a
fresh clone runs end to end. Users are split with
:class:`scope.data.splits.UserSplitter` (train / val / test by a hash of the id; users with few
records are ``cold``); the student is evaluated on ``test`` users, never trained on them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from scope.data.locations import LocationClusters, cluster_locations
from scope.data.simulate import CohortConfig, simulate_cohort
from scope.data.splits import SPLITS, UserSplitter
from scope.data.statistics import UserStatistics, cohort_statistics, population_statistics
from scope.data.tsinghua import TRACE_FILE, Cohort, load_cohort
from scope.io import write_text
from scope.profiles.novelty import NoveltyConfig
from scope.profiles.prompts import PromptBuilder, UserPrompt
from scope.profiles.teachers import EndpointTeacher, GroundedTeacher, Teacher, TeacherCache, TeacherResult, run_teacher

log = logging.getLogger(__name__)


class TeacherFailure(RuntimeError):
    """More users than allowed got no valid profile from the teacher."""


@dataclass
class ProfileDataArguments(NoveltyConfig):
    """Where the users come from and which teacher profiles them (shared by the U-SCOPE recipes), and
    how their histories are cut for the novelty task (the :class:`NoveltyConfig` keys)."""

    cohort_dir: str | None = None              # your Tsinghua-format folder (must exist); null: the embedded default
    simulated_cohort_dir: str = "runs/uscope/cohort"  # where the embedded default is simulated (once)
    n_users: int = 40                          # simulated cohort only
    days: int = 3                              # simulated cohort only
    cohort_seed: int = 0                       # simulated cohort only
    lenient: bool = False                      # skip bad trace rows (counted) instead of stopping
    location_clusters: int = 6
    cold_start_max_events: int = 50
    split_seed: int = 0
    teacher: str = "grounded"                  # grounded | endpoint | local
    teacher_model: str = ""                    # endpoint: served model name; local: registry name / path
    teacher_base_url: str = "http://127.0.0.1:8000/v1"
    teacher_api_key_env: str = "OPENAI_API_KEY"
    teacher_concurrency: int = 4
    teacher_timeout_s: float = 120.0
    teacher_max_retries: int = 2
    teacher_max_new_tokens: int = 768
    teacher_cache_dir: str = "runs/uscope/teacher_cache"
    max_teacher_failure_fraction: float = 0.1  # more failed users than this stops the run
    train_splits: list[str] = field(default_factory=lambda: ["train"])
    synthetic_cohort_dir: str = ""             # a synthetic cohort (recipes/synthesize.py generate) to mix into training
    synthetic_ratio: float = 0.0               # synthetic users added per real training user (0 = none)


@dataclass
class ProfileCorpus:
    """Everything the U-SCOPE stages need about the users of one cohort."""

    cohort: Cohort
    clusters: LocationClusters
    split_of: dict[int, str]
    stats: dict[int, UserStatistics]
    prompts: dict[int, UserPrompt]
    results: dict[int, TeacherResult]
    population: UserStatistics
    teacher_name: str

    def users(self, *splits: str) -> list[int]:
        return [u for u in sorted(self.stats) if self.split_of[u] in splits]

    def profiled(self, *splits: str) -> list[int]:
        """Users of these splits with a valid teacher profile."""
        return [u for u in self.users(*splits) if self.results[u].ok]

    def failures(self) -> list[TeacherResult]:
        return [r for r in self.results.values() if not r.ok]


def ensure_cohort(args: ProfileDataArguments) -> Path:
    """The cohort folder: ``cohort_dir`` as given (a missing one is an error, never simulated), or
    the embedded default, simulated into ``simulated_cohort_dir`` unless it is already there."""
    if args.cohort_dir is not None:
        directory = Path(args.cohort_dir)
        if not (directory / TRACE_FILE).exists():
            raise FileNotFoundError(f"{directory / TRACE_FILE} not found: cohort_dir must hold a Tsinghua-format "
                                    "cohort (leave cohort_dir unset for the embedded default)")
        return directory
    directory = Path(args.simulated_cohort_dir)
    if not (directory / TRACE_FILE).exists():
        log.info("simulating the embedded default cohort (%d users x %d days) into %s", args.n_users, args.days,
                 directory)
        simulate_cohort(CohortConfig(n_users=args.n_users, days=args.days, seed=args.cohort_seed), directory)
    return directory


def make_teacher(args: ProfileDataArguments, clusters: LocationClusters | None = None,
                 categories: list[str] | None = None) -> Teacher:
    if args.teacher == "grounded":
        return GroundedTeacher()
    if args.teacher == "endpoint":
        if not args.teacher_model:
            raise ValueError("teacher: endpoint needs teacher_model (the served model's name)")
        return EndpointTeacher(args.teacher_base_url, args.teacher_model, api_key=os.environ.get(args.teacher_api_key_env),
                               concurrency=args.teacher_concurrency, timeout_s=args.teacher_timeout_s,
                               max_retries=args.teacher_max_retries, max_tokens=args.teacher_max_new_tokens)
    if args.teacher == "local":
        from scope.profiles.llms import load_causal_lm, load_tokenizer
        from scope.profiles.teachers import LocalTeacher

        name = args.teacher_model or "smollm2-135m-instruct"
        return LocalTeacher(load_causal_lm(name), load_tokenizer(name), model_name=name,
                            max_new_tokens=args.teacher_max_new_tokens, categories=categories,
                            areas=clusters.names if clusters else None)
    raise ValueError(f"unknown teacher '{args.teacher}': expected grounded, endpoint or local")


def cohort_and_clusters(args: ProfileDataArguments, cohort: Cohort | None = None) -> tuple[Cohort, LocationClusters]:
    """The configured cohort (loaded, or simulated first) and its location clusters."""
    if cohort is None:
        cohort = load_cohort(ensure_cohort(args), strict=not args.lenient)
    if not len(cohort.events):
        raise ValueError(f"cohort {cohort.directory} has no events: nothing to profile")
    return cohort, cluster_locations(cohort.base_poi, k=args.location_clusters, seed=args.split_seed)


def build_corpus(args: ProfileDataArguments, teacher: Teacher | None = None, *, cohort: Cohort | None = None,
                 report_dir: str | Path | None = None) -> ProfileCorpus:
    """Load (or simulate) the cohort and profile every user with the (cached) teacher."""
    cohort, clusters = cohort_and_clusters(args, cohort)
    splitter = UserSplitter(cold_start_max_events=args.cold_start_max_events, seed=args.split_seed)
    split_of = {u: s for s, users in splitter.split(cohort.events).items() for u in users}
    stats = cohort_statistics(cohort.events, cohort.categories, clusters)
    builder = PromptBuilder()
    prompts = {u: builder(s) for u, s in stats.items()}
    teacher = teacher or make_teacher(args, clusters, cohort.categories)
    order = sorted(prompts)
    results = run_teacher(teacher, [prompts[u] for u in order], TeacherCache(args.teacher_cache_dir))
    corpus = ProfileCorpus(cohort, clusters, split_of, stats, prompts, dict(zip(order, results)),
                           population_statistics(cohort.events, cohort.categories, clusters), teacher.name)
    if args.synthetic_cohort_dir and args.synthetic_ratio > 0:
        add_synthetic_users(corpus, args, teacher, builder)
    failures = corpus.failures()
    if report_dir is not None and failures:
        write_text(Path(report_dir) / "teacher_failures.jsonl",
                   "".join(json.dumps({"user_id": r.user_id, "error": r.error, "attempts": r.attempts, "raw": r.raw[:2000]}) + "\n"
                           for r in failures))
    if len(failures) > args.max_teacher_failure_fraction * len(results):
        raise TeacherFailure(f"teacher {teacher.name} gave no valid profile for {len(failures)} of {len(results)} users "
                             f"(allowed: {args.max_teacher_failure_fraction:.0%}); first: user {failures[0].user_id}: "
                             f"{failures[0].error}")
    log.info("profiled %d users (%s), %d failed; splits %s", len(results), teacher.name, len(failures),
             {s: len(corpus.users(s)) for s in SPLITS})
    return corpus


def add_synthetic_users(corpus: ProfileCorpus, args: ProfileDataArguments, teacher: Teacher,
                        builder: PromptBuilder | None = None) -> list[int]:
    """Augmentation (RQ5): add ``round(synthetic_ratio * #profiled train users)`` users of a synthetic
    cohort (the lowest ids first), profiled by the same teacher, under split ``synthetic``. They are
    never in val / test / cold; :func:`scope.profiles.sft.sft_dataset` adds them to ``train``."""
    synthetic = load_cohort(args.synthetic_cohort_dir, strict=True)
    if not synthetic.base_poi.index.equals(corpus.cohort.base_poi.index):
        raise ValueError(f"synthetic cohort {args.synthetic_cohort_dir} has other base stations than {corpus.cohort.directory}: "
                         "it was synthesised from another cohort")
    clash = sorted(set(synthetic.user_ids.tolist()) & set(corpus.stats))
    if clash:
        raise ValueError(f"synthetic cohort {args.synthetic_cohort_dir} reuses real user ids (first: {clash[0]})")
    n = round(args.synthetic_ratio * len(corpus.profiled("train")))
    users = sorted(int(u) for u in synthetic.user_ids)[:n]
    if n > len(users):
        log.warning("synthetic_ratio %.2f asks for %d synthetic users, %s holds %d", args.synthetic_ratio, n,
                    args.synthetic_cohort_dir, len(users))
    stats = cohort_statistics(synthetic.events, synthetic.categories, corpus.clusters, user_ids=users)
    builder = builder or PromptBuilder()
    prompts = {u: builder(s) for u, s in stats.items()}
    results = run_teacher(teacher, [prompts[u] for u in users], TeacherCache(args.teacher_cache_dir))
    for u, r in zip(users, results):
        corpus.stats[u], corpus.prompts[u], corpus.results[u], corpus.split_of[u] = stats[u], prompts[u], r, "synthetic"
    log.info("added %d synthetic users from %s", len(users), args.synthetic_cohort_dir)
    return users
