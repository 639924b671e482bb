"""DPO alignment data (Eq. 27): preference triplets ``(x_u, y_w, y_l)``.

``y_w`` is the grounded profile of user u (consistent with ``H_u`` by construction). ``y_l`` is one
of three kinds of profile that is *not* grounded in ``H_u``:

- ``popularity``: the profile of the whole cohort pooled (the popularity heuristic: most used
  categories and most visited areas of everybody);
- ``other_user``: the grounded profile of another user, the one whose top app categories and
  areas overlap least with u's (ties broken by a seeded draw);
- ``student``: a sample of the SFT student for u that fails grounding (invalid, or grounding@3
  below ``max_grounding``);
- ``student_recommendation`` (on-policy, the novelty task of :mod:`scope.profiles.novelty`): a
  sampled recommendation of the SFT student for one of u's cuts that is invalid, names an unknown
  or already-used item, or hits fewer hidden items (mean hit@3) than the teacher's answer, which is
  ``y_w``. The truth of training users' hidden parts is known, so the pair is only kept when the
  teacher's answer is really better.

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
from scope.profiles.novelty import recommendation_prompt, teacher_answer
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


def recommendation_pairs(task, builder, student_answers: dict[str, str]) -> list[dict]:
    """On-policy preference rows of the novelty task: for each training case with a sampled student
    answer (``{case key: text}``), the teacher's answer over the sample when the sample is invalid,
    names unknown or already-used items, or scores a lower mean hit@3 than the teacher's."""
    rows = []
    for case in task.train_cases:
        sample = student_answers.get(case.key)
        if sample is None:
            continue
        chosen = teacher_answer(case, task.teacher)
        mine = score_recommendation(case, sample, task.vocabulary)
        best = score_recommendation(case, chosen.to_json(), task.vocabulary)
        if not mine.valid or mine.unknown or mine.seen_recommended or _mean_hit(mine) < _mean_hit(best):
            rows.append({"prompt": recommendation_prompt(case, task.vocabulary, builder).messages,
                         "chosen": [{"role": "assistant", "content": chosen.to_json()}],
                         "rejected": [{"role": "assistant", "content": sample.strip()}],
                         "user_id": case.user_id, "kind": "student_recommendation"})
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
