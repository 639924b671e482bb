"""DPO alignment data (Eq. 27): preference triplets ``(x_u, y_w, y_l)``.

``y_w`` is the grounded profile of user u (consistent with ``H_u`` by construction). ``y_l`` is one
of these kinds of answer that is *not* grounded in ``H_u``:

- ``popularity``: the profile of the whole cohort pooled (the popularity heuristic: most used
  categories and most visited areas of everybody);
- ``other_user``: the grounded profile of another user, the one whose top app categories and
  areas overlap least with u's (ties broken by a seeded draw);
- ``student``: a sample of the SFT student for u that fails grounding (invalid, or grounding@3
  below ``max_grounding``);
- ``student_recommendation`` (on-policy, the novelty task of :mod:`scope.profiles.novelty`): the
  SFT student samples n answers for one of u's cuts; each is scored against the hidden part (known
  for training users): invalid, unknown or already-used names, mean hit@3. ``y_l`` is the worst
  sample; ``y_w`` is the best sample when it scores higher (kind ``student_ranked``: both answers
  are the student's own, so the pair contrasts only the names picked), else the teacher's answer
  when that scores higher (kind ``student_recommendation``). With one sample per case every pair is
  (teacher, sample): measured on 60 held-out users, those pairs moved every answer but lowered
  novelty hit@3 (benchmarks/README.md).

Each user yields one triplet per kind it has. ``recipes/dpo.py`` trains a new LoRA with TRL's
``DPOTrainer`` on top of the SFT student (the SFT adapter merged into the base weights), so the
reference policy is simply the adapter-disabled model, i.e. the SFT student itself.

Decision: the SFT adapter is merged into the base weights and a new LoRA is trained; with
``ref_model=None`` TRL's reference is the adapter-disabled model, i.e. the SFT student.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset

from scope.profiles.corpus import ProfileCorpus
from scope.profiles.evaluation import score_answer
from scope.profiles.novelty import teacher_answer
from scope.profiles.novelty import score_answer as score_recommendation
from scope.profiles.schema import Profile
from scope.profiles.teachers import grounded_profile

NEGATIVE_KINDS = ("popularity", "other_user", "student", "student_recommendation")


def popularity_profile(corpus: ProfileCorpus) -> Profile:
    return grounded_profile(corpus.population)


def _overlap(a: Profile, b: Profile) -> int:
    return len(set(a.top_categories()) & set(b.top_categories())) + len(set(a.top_areas()) & set(b.top_areas()))


def mismatched_user(corpus: ProfileCorpus, user: int, pool: list[int], rng: np.random.Generator) -> int | None:
    """The user of ``pool`` whose profile overlaps least with ``user``'s."""
    others = [v for v in pool if v != user]
    if not others:
        return None
    mine = corpus.results[user].profile
    scores = np.array([_overlap(mine, corpus.results[v].profile) for v in others], float)
    scores += rng.random(len(others)) * 0.5  # seeded tie-break
    return others[int(np.argmin(scores))]


def _mean_hit(score) -> float:
    values = [v for k, v in score.scores.items() if k.endswith("_hit@3") and not np.isnan(v)]
    return float(np.mean(values)) if values else 0.0


def recommendation_quality(score) -> float:
    """One answer's quality for ranking samples: -1 when invalid, else its mean hit@3 less 1/9 per
    unknown or already-used name (a wasted slot of the 3 x 3)."""
    if not score.valid:
        return -1.0
    return _mean_hit(score) - (len(score.unknown) + score.seen_recommended) / 9


def recommendation_pairs(task, builder, student_answers: dict[str, list[str]]) -> list[dict]:
    """On-policy preference rows of the novelty task from the student's sampled answers per training
    case (``{case key: [text, ...]}``): the worst sample is ``rejected``; ``chosen`` is the best
    sample if it scores higher, else the teacher's answer if that scores higher; a case whose
    answers all tie gives no row."""
    rows = []
    for case in task.train_cases:
        samples = [a.strip() for a in student_answers.get(case.key, [])]
        if not samples:
            continue
        quality = [recommendation_quality(score_recommendation(case, a, task.vocabulary)) for a in samples]
        worst, best = int(np.argmin(quality)), int(np.argmax(quality))
        if quality[best] > quality[worst]:
            chosen, kind = samples[best], "student_ranked"
        else:   # all samples tie: the teacher's answer, only when it is better
            chosen, kind = teacher_answer(case, task.teacher).to_json(), "student_recommendation"
            if recommendation_quality(score_recommendation(case, chosen, task.vocabulary)) <= quality[worst]:
                continue
        rows.append({"prompt": task.prompt(case, builder).messages,
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": samples[worst]}],
                     "user_id": case.user_id, "kind": kind})
    return rows


def preference_dataset(corpus: ProfileCorpus, splits=("train",), kinds=("popularity", "other_user"), *,
                       student_answers: dict[int, str] | None = None, max_grounding: float = 0.67,
                       seed: int = 0, recommendation_rows: list[dict] = ()) -> Dataset:
    """Conversational preference rows: ``prompt``, ``chosen``, ``rejected`` (+ ``user_id``, ``kind``);
    ``recommendation_rows`` (:func:`recommendation_pairs`) are appended."""
    unknown = set(kinds) - set(NEGATIVE_KINDS)
    if unknown:
        raise ValueError(f"unknown negative kinds {sorted(unknown)}; expected some of {NEGATIVE_KINDS}")
    rng = np.random.default_rng(seed)
    users = [u for u in corpus.profiled(*splits) if not corpus.stats[u].empty]
    popular = popularity_profile(corpus).to_json()
    rows = []
    for u in users:
        chosen = corpus.results[u].profile.to_json()
        negatives = []
        if "popularity" in kinds and popular != chosen:
            negatives.append(("popularity", popular))
        if "other_user" in kinds and (v := mismatched_user(corpus, u, users, rng)) is not None:
            negatives.append(("other_user", corpus.results[v].profile.to_json()))
        if "student" in kinds and student_answers and u in student_answers:
            score = score_answer(u, student_answers[u], corpus.results[u].profile, corpus.stats[u])
            grounding = (score.grounding_apps + score.grounding_places) / 2
            if not score.schema_valid or grounding < max_grounding:
                negatives.append(("student", student_answers[u].strip()))
        for kind, rejected in negatives:
            rows.append({"prompt": corpus.prompts[u].messages, "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}], "user_id": u, "kind": kind})
    rows += list(recommendation_rows)
    if not rows:
        raise ValueError(f"no preference pairs from splits {list(splits)} with kinds {list(kinds)}")
    return Dataset.from_list(rows)
