"""Novelty recommendation (U-SCOPE section 7.5): the cuts and their invariants, the recommenders, the
scoring (hit@k / recall@k, unknown names, cut-off answers), the teacher's SFT examples, the
on-policy DPO pairs, bootstrap CIs, and the evaluate / novelty recipes end to end on a tiny model."""

import json

import numpy as np
import pandas as pd
import pytest

from recipes import evaluate as evaluate_recipe
from recipes import novelty as novelty_recipe
from scope.metrics import bootstrap_ci
from scope.profiles.dpo import preference_dataset, recommendation_pairs, recommendation_quality
from scope.profiles.evaluation import generate
from scope.profiles.novelty import (ITEM_TYPES, NoveltyCase, NoveltyConfig, NoveltyTask, Recommendation, Vocabulary,
                                    event_items, novelty_summary, paired_difference, parse_recommendation,
                                    recommendation_schema, score_answer, teacher_answer)
from scope.profiles.prompts import PromptBuilder, UserPrompt
from scope.profiles.sft import sft_dataset
from tests.scope.conftest import data_args


@pytest.fixture(scope="module")
def task(corpus):
    return NoveltyTask.build(corpus, NoveltyConfig(), corpus.profiled("val", "test"))


def _shares(frame: pd.DataFrame, t: str) -> pd.Series:
    return frame[t].dropna().value_counts(normalize=True)


def test_targets_are_taken_up_in_the_hidden_part_and_unseen_in_the_visible(corpus, task):
    cfg = task.config
    assert task.cases and len(task.train_cases) > len(task.cases)
    events = corpus.cohort.events
    for case in task.cases + task.train_cases[:10]:
        frame = events[events["user_id"] == case.user_id]
        items = event_items(frame, corpus.cohort.categories, corpus.clusters)
        if case.cut == "first_days":
            day = pd.DatetimeIndex(frame["timestamp"]).normalize()
            visible = np.asarray((day - day.min()).days) < cfg.visible_days
        else:
            hidden_items = set(case.targets["apps"]) | set(case.targets["places"])
            visible = ~(items["apps"].isin(hidden_items) | items["places"].isin(hidden_items)).to_numpy()
        assert case.stats.n_events == visible.sum()
        for t in ITEM_TYPES:
            seen, hidden = _shares(items[visible], t), _shares(items[~visible], t)
            assert case.seen[t] == sorted(seen.index[seen >= cfg.seen_share])
            for item in case.targets[t]:
                assert item not in case.seen[t] and hidden[item] >= cfg.target_share
        assert any(case.targets.values())


def test_excluded_users_are_counted(corpus):
    cfg = NoveltyConfig(cuts=["first_days"], visible_days=30)   # longer than the cohort: nothing is hidden
    task = NoveltyTask.build(corpus, cfg, corpus.profiled("val", "test"))
    assert task.cases == [] and task.excluded == {"no_cut": len(corpus.profiled("val", "test"))}
    with pytest.raises(ValueError, match="cuts"):
        NoveltyConfig(cuts=["sideways"])
    with pytest.raises(ValueError, match="seen_share <= target_share"):
        NoveltyConfig(seen_share=0.2, target_share=0.1)


def test_recommenders_rank_only_unseen_items(corpus, task):
    for name, scores in task.baselines(corpus).items():
        assert len(scores) == len(task.cases)
        assert all(s.seen_recommended == 0 and not s.unknown for s in scores), name
    case = task.cases[0]
    ranked = task.popularity(case)
    counts = task.popularity.counts["apps"]
    unseen = [a for a in task.vocabulary.items["apps"] if a not in case.seen["apps"]]
    assert [counts[a] for a in ranked["apps"]] == sorted((counts[a] for a in unseen), reverse=True)[:len(ranked["apps"])]


def _case(targets, seen=None) -> NoveltyCase:
    seen = seen or {t: [] for t in ITEM_TYPES}
    return NoveltyCase(1, "first_days", None, seen, targets)


def test_hit_and_recall_at_k_values_unknown_names_and_cut_off():
    voc = Vocabulary(["Games", "News", "Music", "Books"], ["Residence / Life service", "Education / Culture"])
    case = _case({"apps": ["News", "Books"], "places": ["Education / Culture"], "intents": []},
                 {"apps": ["Games"], "places": [], "intents": []})
    answer = Recommendation(reasoning="r", persona="p", apps=["Music", "News", "Games"], places=["Moon base"],
                            intents=[]).to_json()
    s = score_answer(case, answer, voc)
    assert s.valid and s.scores["apps_hit@1"] == 0 and s.scores["apps_hit@3"] == 1
    assert s.scores["apps_recall@3"] == 0.5 and s.scores["places_hit@3"] == 0
    assert np.isnan(s.scores["intents_hit@3"])          # no intent target: excluded from intents
    assert s.unknown == ["places: Moon base"] and s.seen_recommended == 1
    cut = score_answer(case, answer[:30], voc, cut_off=True)
    assert not cut.valid and cut.cut_off and cut.error == "cut off at max_new_tokens"
    assert score_answer(case, "no idea", voc).error == "no JSON object in the output"
    summary = novelty_summary([s, cut])
    assert summary["apps_hit@3"]["mean"] == 0.5 and summary["cut_off"] == 1
    assert summary["intents_hit@3"]["n"] == 0 and summary["unknown_names"] == ["places: Moon base"]
    assert summary["mean_hit@3"]["mean"] == pytest.approx((0.5 + 0.0) / 2)


def test_bootstrap_ci_and_paired_difference():
    mean, lo, hi = bootstrap_ci([0, 1, 1, 1])
    assert mean == 0.75 and 0 <= lo <= mean <= hi <= 1
    assert bootstrap_ci([0.4] * 5) == (0.4, 0.4, 0.4)
    voc = Vocabulary(["Games", "News"], ["Residence / Life service"])
    case = _case({"apps": ["News"], "places": [], "intents": []})
    worse = score_answer(case, Recommendation(reasoning="r", persona="p", apps=["Games"], places=[], intents=[]).to_json(), voc)
    better = score_answer(case, Recommendation(reasoning="r", persona="p", apps=["News"], places=[], intents=[]).to_json(), voc)
    diff = paired_difference([worse], [better])
    assert diff["mean"] == 1.0 and diff["n"] == 1


def test_teacher_answers_are_valid_recommendations_and_join_the_sft_data(corpus, task):
    builder = PromptBuilder()
    examples = task.teacher_examples(builder)
    assert len(examples) == len(task.train_cases)
    prompt, answer = examples[0]
    rec = parse_recommendation(answer)
    case = task.train_cases[0]
    assert rec == teacher_answer(case, task.teacher) and rec.persona in rec.reasoning
    for t in ITEM_TYPES:
        assert set(getattr(rec, t)) <= set(task.vocabulary.items[t]) - set(case.seen[t])
    assert "Recommend new apps" in prompt.user
    candidates = task.candidates(case)
    for t, label in (("apps", "Apps: "), ("places", "Places: ")):   # the unused names, ranked
        assert prompt.user.split(label, 1)[1].split(".\n", 1)[0] == (", ".join(candidates[t]) or "none")
        assert sorted(candidates[t]) == sorted(set(task.vocabulary.items[t]) - set(case.seen[t]))
    assert len(candidates["intents"]) == min(task.config.intent_candidates,
                                             len(set(task.vocabulary.items["intents"]) - set(case.seen["intents"])))
    assert not set(candidates["intents"]) & set(case.seen["intents"])
    assert str(case.user_id) not in prompt.user.split("\n")[0].split(":")[0]
    ds = sft_dataset(corpus, ["train"], examples)
    assert ds["task"].count("recommend") == len(examples) and ds["task"].count("profile") == len(corpus.profiled("train"))
    assert ds[len(ds) - 1]["completion"][0]["content"] == examples[-1][1]


def test_candidates_follow_similar_users_and_leave_a_training_user_out_of_its_own_neighbours(task):
    from scope.profiles.novelty import NeighbourRecommender, _rank, stats_vector

    case = task.train_cases[0]
    i = task.train_users.index(case.user_id)
    keep = [j for j in range(len(task.train_users)) if j != i]
    without = NeighbourRecommender("loo", task.knn_stats.vectors[keep], [task.knn_stats.items[j] for j in keep],
                                   task.popularity)
    scores = without.scores(stats_vector(case.stats))
    got = task.candidates(case)
    for t in ("apps", "places"):
        assert got[t] == _rank(scores[t], set(case.seen[t]), 99, task.popularity.counts[t])
    held_out = task.cases[0]                                  # not a training user: its nearest are all used
    knn_top = task.knn_stats(held_out, stats_vector(held_out.stats))
    assert all(task.candidates(held_out)[t][:3] == knn_top[t] for t in ITEM_TYPES)


def test_on_policy_pairs_rank_the_students_samples_and_fall_back_to_the_teacher(corpus, task):
    builder = PromptBuilder()
    a, b, c, d = task.train_cases[:4]
    seen_item = next(t for t in ITEM_TYPES if a.seen[t])
    repeat = Recommendation(reasoning="r", persona="p", **{t: a.seen[t][:1] if t == seen_item else []
                                                           for t in ITEM_TYPES}).to_json()
    good_d = teacher_answer(d, task.teacher).to_json()
    samples = {a.key: [repeat], b.key: ["not json at all", "nor this"], c.key: [teacher_answer(c, task.teacher).to_json()],
               d.key: ["not json", good_d, "{}"]}
    rows = recommendation_pairs(task, builder, samples)
    assert [r["user_id"] for r in rows] == [a.user_id, b.user_id, d.user_id]   # c: its one sample is the teacher's
    assert [r["kind"] for r in rows] == ["student_recommendation", "student_recommendation", "student_ranked"]
    assert rows[1]["chosen"][0]["content"] == teacher_answer(b, task.teacher).to_json()
    assert rows[1]["rejected"][0]["content"] == "not json at all"   # ties: the first worst sample
    assert rows[2]["chosen"][0]["content"] == good_d and rows[2]["rejected"][0]["content"] == "not json"
    ds = preference_dataset(corpus, kinds=("popularity",), recommendation_rows=rows)
    assert ds["kind"].count("student_recommendation") == 2 and ds["kind"].count("student_ranked") == 1


def test_recommendation_quality_charges_wasted_slots(task):
    case = next(c for c in task.train_cases if c.seen["apps"])
    rank = lambda **lists: recommendation_quality(score_answer(case, Recommendation(
        reasoning="r", persona="p", **{t: lists.get(t, []) for t in ITEM_TYPES}).to_json(), task.vocabulary))
    assert recommendation_quality(score_answer(case, "no", task.vocabulary)) == -1.0
    assert rank() == 0.0
    assert rank(apps=case.seen["apps"][:1]) == pytest.approx(-1 / 9)
    assert rank(apps=["Not an app"]) == pytest.approx(-1 / 9)


def test_generate_reports_cut_off_and_constrained_output_follows_the_schema(tiny_model_dir, tokenizer):
    from scope.profiles.llms import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    prompts = [UserPrompt(i, "Answer.", f"Question {i}", None) for i in range(3)]
    free = generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=2)
    assert len(free) == 3 and all(g.new_tokens <= 5 for g in free)
    assert all(g.cut_off == (g.new_tokens == 5) for g in free)
    voc = Vocabulary(["Games", "News"], ["Residence / Life service"])
    schema = recommendation_schema(voc, max_chars=3)
    tight = generate(model, tokenizer, prompts[:2], max_new_tokens=200, batch_size=2, schema=schema)
    for g in tight:
        assert g.text.lstrip("{ ").startswith('"reasoning"')   # the schema's order: the reasoning comes first
        if not g.cut_off:
            rec = parse_recommendation(g.text)
            assert set(rec.apps) <= {"Games", "News"} and len(rec.reasoning) <= 3


def test_evaluate_and_novelty_recipes_end_to_end(small_cohort, tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapters = {}
    for name in ("sft", "dpo"):
        lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM", init_lora_weights=False)
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora).save_pretrained(tmp_path / name)
        adapters[f"{name}_adapter"] = str(tmp_path / name)
    common = dict(vars(data_args(small_cohort, tmp_path / "cache")), model_name_or_path=str(tiny_model_dir),
                  max_users=3, batch_size=3, threads=1, recommend_max_new_tokens=8, **adapters)
    ev = evaluate_recipe.main(evaluate_recipe.EvaluateArguments(**common, output_dir=str(tmp_path / "eval"),
                                                                max_new_tokens=6, constrained_max_chars=8))
    stages = ev["stages"]
    assert list(stages) == ["before SFT", "after SFT", "after DPO"]
    for row in stages.values():
        assert row["users"] == 3 and row["constrained"]["cut_off"] == 3     # 6 tokens never close a profile
        assert row["unconstrained"]["schema_valid"]["mean"] == 0 and row["unconstrained"]["users_per_s"] > 0
    assert 0 <= ev["dpo_effect"]["unconstrained"]["changed_share"] <= 1
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["decodings"] == ["unconstrained", "constrained"]
    again = evaluate_recipe.main(evaluate_recipe.EvaluateArguments(**common, output_dir=str(tmp_path / "eval"),
                                                                   max_new_tokens=6, constrained_max_chars=8,
                                                                   constrained_stages=["after DPO"]))
    assert "constrained" not in again["stages"]["after SFT"] and "constrained" in again["stages"]["after DPO"]
    for stage, row in again["stages"].items():   # every pass resumed from the saved answers: identical
        assert row["unconstrained"] == stages[stage]["unconstrained"]
    assert set(again["dpo_effect"]) == {"unconstrained"}
    nov = novelty_recipe.main(novelty_recipe.NoveltyArguments(**common, output_dir=str(tmp_path / "novelty"),
                                                              encoder=""))
    methods = nov["methods"]
    assert {"popularity", "kNN (statistics)", "grounded teacher", "student after DPO"} <= set(methods)
    assert methods["student after SFT"]["cut_off"] == nov["cases"] and methods["student after SFT"]["mean_hit@3"]["mean"] == 0
    assert methods["grounded teacher"]["valid"] == 1.0
    assert "dpo_effect" in nov and (tmp_path / "novelty" / "novelty.md").exists()

