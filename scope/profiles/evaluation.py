"""Student evaluation on held-out users (U-SCOPE section 5).

For each user the student answers the structured prompt (greedy, unconstrained: validity is what
is measured). Metrics, averaged over users:

- ``schema_valid``: the answer parses as a :class:`scope.profiles.schema.Profile`;
- ``field_agreement``: agreement with the teacher's profile, the mean of five fields: persona
  (same label), app preferences (share of the teacher's top-3 categories among the student's
  top 3), location tendencies (same for areas), temporal regularities (most active period,
  week pattern and regularity level equal) and likely intents (shared phrases / 3);
- ``grounding_apps@3`` / ``grounding_places@3``: precision@3 of the profile's top app categories /
  place areas against the user's *real* top 3 computed from the events; ``grounding@3`` is their
  mean. An invalid answer scores 0 on agreement and grounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scope.data.statistics import UserStatistics
from scope.profiles.prompts import UserPrompt
from scope.profiles.schema import Profile, ProfileError, parse_profile

METRICS = ("schema_valid", "field_agreement", "grounding_apps@3", "grounding_places@3", "grounding@3")


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[UserPrompt], *, max_new_tokens: int = 512,
                     batch_size: int = 4) -> list[str]:
    """Greedy answers of a chat model to each prompt (left-padded batches)."""
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
                     for p in prompts[i:i + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def precision_at_3(predicted: list[str], real: list[str]) -> float:
    predicted = predicted[:3]
    if not predicted:
        return 0.0
    return sum(p in real[:3] for p in predicted) / len(predicted)


def field_agreement(student: Profile, teacher: Profile) -> dict[str, float]:
    s, t = student.temporal_regularities, teacher.temporal_regularities
    overlap = lambda a, b: len(set(a[:3]) & set(b[:3])) / max(len(b[:3]), 1) if b else float(not a)
    fields = {
        "persona": float(student.persona.strip().lower() == teacher.persona.strip().lower()),
        "app_preferences": overlap(student.top_categories(), teacher.top_categories()),
        "location_tendencies": overlap(student.top_areas(), teacher.top_areas()),
        "temporal_regularities": (float(s.most_active_period == t.most_active_period) + float(s.week_pattern == t.week_pattern)
                                  + float(s.regularity == t.regularity)) / 3,
        "likely_intents": overlap(student.likely_intents, teacher.likely_intents),
    }
    fields["mean"] = sum(fields.values()) / len(fields)
    return fields


@dataclass
class UserScore:
    user_id: int
    schema_valid: bool
    error: str | None
    agreement: dict[str, float]
    grounding_apps: float
    grounding_places: float


def score_answer(user_id: int, answer: str, teacher: Profile | None, stats: UserStatistics) -> UserScore:
    try:
        profile = parse_profile(answer)
    except ProfileError as err:
        return UserScore(user_id, False, str(err), {"mean": 0.0}, 0.0, 0.0)
    agreement = field_agreement(profile, teacher) if teacher is not None else {"mean": 0.0}
    return UserScore(user_id, True, None, agreement, precision_at_3(profile.top_categories(), stats.top_apps(3)),
                     precision_at_3(profile.top_areas(), stats.top_areas(3)))


def summarize(scores: list[UserScore]) -> dict[str, float]:
    n = max(len(scores), 1)
    apps = sum(s.grounding_apps for s in scores) / n
    places = sum(s.grounding_places for s in scores) / n
    return {"users": len(scores), "schema_valid": sum(s.schema_valid for s in scores) / n,
            "field_agreement": sum(s.agreement["mean"] for s in scores) / n,
            "grounding_apps@3": apps, "grounding_places@3": places, "grounding@3": (apps + places) / 2}


def evaluate_student(model, tokenizer, prompts: list[UserPrompt], teacher_profiles: list[Profile | None], *,
                     max_new_tokens: int = 512, batch_size: int = 4) -> tuple[dict[str, float], list[UserScore], list[str]]:
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    scores = [score_answer(p.user_id, a, t, p.stats) for p, a, t in zip(prompts, answers, teacher_profiles)]
    return summarize(scores), scores, answers


def held_out_metrics(model, tokenizer, corpus, n_users: int, max_new_tokens: int) -> dict[str, float]:
    """``student_*`` metrics of ``model`` on the first ``n_users`` profiled test users of a corpus
    (empty when there are none): the check the SFT and DPO recipes run after training."""
    users = corpus.profiled("test")[:n_users]
    if not users:
        return {}
    summary, _, _ = evaluate_student(model.eval(), tokenizer, [corpus.prompts[u] for u in users],
                                     [corpus.results[u].profile for u in users], max_new_tokens=max_new_tokens)
    return {f"student_{k}": v for k, v in summary.items()}


def evaluation_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per stage (before SFT / after SFT / after DPO), one column per metric."""
    lines = ["| stage | users | " + " | ".join(METRICS) + " |", "|---|---:|" + "---:|" * len(METRICS)]
    for stage, m in rows.items():
        lines.append(f"| {stage} | {m['users']} | " + " | ".join(f"{m[k]:.3f}" for k in METRICS) + " |")
    return "\n".join(lines)
