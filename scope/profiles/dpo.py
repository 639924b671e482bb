"""DPO alignment data (Eq. 27): preference triplets ``(x_u, y_w, y_l)``.

``y_w`` is the grounded profile of user u (consistent with ``H_u`` by construction). ``y_l`` is one
of three kinds of profile that is *not* grounded in ``H_u``:

- ``popularity``: the profile of the whole cohort pooled (the popularity heuristic: most used
  categories and most visited areas of everybody);
- ``other_user``: the grounded profile of another user, the one whose top app categories and
  areas overlap least with u's (ties broken by a seeded draw);
- ``student``: a sample of the SFT student for u that fails grounding (invalid, or grounding@3
  below ``max_grounding``).

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
from scope.profiles.schema import Profile
from scope.profiles.teachers import grounded_profile

NEGATIVE_KINDS = ("popularity", "other_user", "student")


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


def preference_dataset(corpus: ProfileCorpus, splits=("train",), kinds=("popularity", "other_user"), *,
                       student_answers: dict[int, str] | None = None, max_grounding: float = 0.67,
                       seed: int = 0) -> Dataset:
    """Conversational preference rows: ``prompt``, ``chosen``, ``rejected`` (+ ``user_id``, ``kind``)."""
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
    if not rows:
        raise ValueError(f"no preference pairs from splits {list(splits)} with kinds {list(kinds)}")
    return Dataset.from_list(rows)
