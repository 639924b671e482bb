"""Student evaluation on held-out users (U-SCOPE section 5).

For each user the student answers the structured prompt, greedily: unconstrained (what the student
learnt: validity is measured) and constrained to the profile schema (what a user gets: always valid
unless cut off). Metrics, averaged over users, each with a bootstrap 95% CI over users
(:func:`summarize_with_ci`):

- ``schema_valid``: the answer parses as a :class:`scope.profiles.schema.Profile`;
- ``field_agreement``: agreement with the teacher's profile, the mean of five fields: persona
  (same label), app preferences (share of the teacher's top-3 categories among the student's
  top 3), location tendencies (same for areas), temporal regularities (most active period,
  week pattern and regularity level equal) and likely intents (shared phrases / 3);
- ``grounding_apps@3`` / ``grounding_places@3``: precision@3 of the profile's top app categories /
  place areas against the user's *real* top 3 computed from the events; ``grounding@3`` is their
  mean. An invalid answer scores 0 on agreement and grounding; one cut off at ``max_new_tokens``
  is counted as ``cut_off``, not as a schema error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scope.data.statistics import UserStatistics
from scope.metrics import bootstrap_ci
from scope.profiles.corpus import ProfileDataArguments
from scope.profiles.prompts import UserPrompt
from scope.profiles.schema import Profile, ProfileError, parse_profile

METRICS = ("schema_valid", "field_agreement", "grounding_apps@3", "grounding_places@3", "grounding@3")


@dataclass
class Generation:
    """One answer: its text, whether ``max_new_tokens`` cut it off, and its length in tokens."""

    text: str
    cut_off: bool
    new_tokens: int


def shared_prefix_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, repeats: int):
    """The KV cache of every left-padded prompt but its last token, computed once and repeated
    ``repeats`` times per prompt (rows in ``repeat_interleave`` order): ``generate`` then prefills only
    the last token of each copy, so n samples of one prompt cost one prefill, not n."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)   # as generate numbers them
    cache = model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], position_ids=positions[:, :-1],
                  use_cache=True, logits_to_keep=1).past_key_values   # the LM head on one position, not all
    cache.batch_repeat_interleave(repeats)
    return cache


@torch.no_grad()
def generate(model, tokenizer, prompts: list[UserPrompt], *, max_new_tokens: int = 512, batch_size: int = 8,
             schema: dict | None = None, temperature: float = 0.0, seed: int = 0, samples: int = 1) -> list[Generation]:
    """Answers of a chat model to each prompt, in left-padded batches: greedy at ``temperature`` 0,
    sampled above; with ``schema``, constrained token by token to it (``outlines``, batched).
    ``samples`` answers per prompt (unconstrained; consecutive in the result) share one prefill of
    the prompt (:func:`shared_prefix_cache`); a batch holds ``batch_size`` answers."""
    if samples > 1 and schema is not None:
        raise ValueError("samples > 1 is for unconstrained decoding only")
    model.eval()
    torch.manual_seed(seed)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    sampling = {"do_sample": temperature > 0, **({"temperature": temperature} if temperature > 0 else {})}
    texts = [tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True) for p in prompts]
    out: list[Generation] = []
    try:
        if schema is not None:
            from scope.profiles.constrained import ChatGenerator

            generator = ChatGenerator(model, tokenizer).constrained(schema)
            for i in range(0, len(texts), batch_size):
                for answer in generator.batch(texts[i:i + batch_size], max_new_tokens=max_new_tokens, **sampling):
                    n = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
                    out.append(Generation(answer, _unfinished_json(answer), n))
            return out
        stops = {t for t in (model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
                             else [model.generation_config.eos_token_id]) if t is not None}
        step = max(1, batch_size // samples)   # prompts per batch
        for i in range(0, len(texts), step):
            batch = tokenizer(texts[i:i + step], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            if samples > 1:
                cache = shared_prefix_cache(model, batch["input_ids"], batch["attention_mask"], samples)
                batch = {k: v.repeat_interleave(samples, 0) for k, v in batch.items()}
                sampling["cache"] = cache
            ids = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
            new = ids[:, batch["input_ids"].shape[1]:]
            for row, text in zip(new, tokenizer.batch_decode(new, skip_special_tokens=True)):
                ended = any(int(t) in stops for t in row)
                length = int((row != tokenizer.pad_token_id).sum()) if tokenizer.pad_token_id not in stops else len(row)
                out.append(Generation(text, not ended and len(row) >= max_new_tokens, length))
    finally:
        tokenizer.padding_side = side
    return out


def _unfinished_json(text: str) -> bool:
    """A constrained answer that does not close its JSON object was cut off by ``max_new_tokens``."""
    try:
        json.loads(text[text.find("{"):] if "{" in text else text)
        return False
    except json.JSONDecodeError:
        return True


def generate_answers(model, tokenizer, prompts: list[UserPrompt], *, max_new_tokens: int = 512,
                     batch_size: int = 4) -> list[str]:
    """Greedy, unconstrained answers (texts only)."""
    return [g.text for g in generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)]


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
    cut_off: bool = False

    def values(self) -> dict[str, float]:
        """This user's value of each of :data:`METRICS`."""
        return {"schema_valid": float(self.schema_valid), "field_agreement": self.agreement["mean"],
                "grounding_apps@3": self.grounding_apps, "grounding_places@3": self.grounding_places,
                "grounding@3": (self.grounding_apps + self.grounding_places) / 2}


def score_answer(user_id: int, answer: str, teacher: Profile | None, stats: UserStatistics,
                 cut_off: bool = False) -> UserScore:
    """Score one answer; one cut off at ``max_new_tokens`` is reported as such, not as a schema error."""
    try:
        profile = parse_profile(answer)
    except ProfileError as err:
        return UserScore(user_id, False, "cut off at max_new_tokens" if cut_off else str(err), {"mean": 0.0}, 0.0, 0.0,
                         cut_off)
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


def summarize_with_ci(scores: list[UserScore], n_boot: int = 2000, seed: int = 0) -> dict:
    """Each of :data:`METRICS` as ``{"mean", "ci95"}`` (percentile bootstrap over users), plus the
    number of users and of answers cut off at ``max_new_tokens``."""
    out = {"users": len(scores), "cut_off": sum(s.cut_off for s in scores)}
    for key in METRICS:
        mean, lo, hi = bootstrap_ci([s.values()[key] for s in scores], n_boot, seed)
        out[key] = {"mean": mean, "ci95": [lo, hi]}
    return out


def evaluate_student(model, tokenizer, prompts: list[UserPrompt], teacher_profiles: list[Profile | None], *,
                     max_new_tokens: int = 512, batch_size: int = 4,
                     schema: dict | None = None) -> tuple[dict[str, float], list[UserScore], list[str]]:
    """Answer every prompt (greedy; constrained to ``schema`` when given) and score the answers."""
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, schema=schema)
    scores = [score_answer(p.user_id, a.text, t, p.stats, a.cut_off) for p, a, t in zip(prompts, answers, teacher_profiles)]
    return summarize(scores), scores, [a.text for a in answers]


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
    """Markdown table: one row per stage (before SFT / after SFT / after DPO), one column per metric
    (mean, and its bootstrap 95% CI when the row carries one)."""
    lines = ["| stage | users | " + " | ".join(METRICS) + " |", "|---|---:|" + "---:|" * len(METRICS)]
    for stage, m in rows.items():
        cells = [f"{m[k]['mean']:.3f} [{m[k]['ci95'][0]:.2f}, {m[k]['ci95'][1]:.2f}]" if isinstance(m[k], dict)
                 else f"{m[k]:.3f}" for k in METRICS]
        lines.append(f"| {stage} | {m['users']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


STUDENT_STAGES = ("before SFT", "after SFT", "after DPO")


@dataclass
class HeldOutArguments(ProfileDataArguments):
    """Which students answer for which held-out users (shared by ``recipes/evaluate.py`` and
    ``recipes/novelty.py``)."""

    output_dir: str = "runs/uscope/evaluation"
    model_name_or_path: str = "smollm2-135m-instruct"
    sft_adapter: str = "runs/uscope/sft"
    dpo_adapter: str = "runs/uscope/dpo"
    eval_splits: list[str] = field(default_factory=lambda: ["val", "test"])
    max_users: int = 8
    batch_size: int = 8
    stages: list[str] = field(default_factory=lambda: list(STUDENT_STAGES))
    inference_dtype: str = "float32"  # float32 | bfloat16: weights in bf16, attention in fp32 (scope.profiles.llms.generation_model)
    threads: int = 0


def stage_adapters(stages, sft_adapter: str, dpo_adapter: str) -> dict[str, list[str]]:
    """The LoRA adapters (applied in order on the base model) of each requested student stage."""
    known = {"before SFT": [], "after SFT": [sft_adapter], "after DPO": [sft_adapter, dpo_adapter]}
    unknown = [s for s in stages if s not in known]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; expected some of {list(known)}")
    return {s: known[s] for s in stages}


def changed_share(before: list[str], after: list[str]) -> float:
    """Share of answers (same prompts, same order) whose text changed."""
    return sum(a.strip() != b.strip() for a, b in zip(before, after)) / max(len(before), 1)


def paired_difference(before: list[UserScore], after: list[UserScore], metric: str = "grounding@3",
                      n_boot: int = 2000, seed: int = 0) -> dict:
    """``after - before`` of ``metric`` on the same users: mean and bootstrap 95% CI of the per-user
    differences."""
    mean, lo, hi = bootstrap_ci([a.values()[metric] - b.values()[metric] for b, a in zip(before, after)], n_boot, seed)
    return {"mean": mean, "ci95": [lo, hi], "n": len(before)}


def previous_pass(path, fingerprint: dict) -> dict | None:
    """The answers a previous run saved next to ``path`` (``<path>.json``: ``fingerprint``, ``seconds``,
    ``rows``) for the same users or cases, adapters, model, token budget and schema, so an interrupted
    evaluation resumes pass by pass; None otherwise."""
    saved = Path(path).with_suffix(".json")
    if not saved.exists():
        return None
    done = json.loads(saved.read_text())
    return done if done.get("fingerprint") == json.loads(json.dumps(fingerprint)) else None
