"""Synthesis end to end on a tiny random Llama (scope.synthesis.generation, recipes/synthesize.py): a real
training step, constrained generation that never leaves the user's permitted pairs, a cohort
that ``load_cohort`` reads strictly, resumption without duplicates, and the bad inputs."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from transformers import HfArgumentParser
from trl import ModelConfig, SFTConfig

from recipes import synthesize
from scope.data.tsinghua import TRACE_FILE, load_cohort
from scope.synthesis.generation import (NoPermittedPairsError, SynthesisArguments, make_constraint, plan_requests,
                                        read_profiles)
from scope.synthesis.traces import TraceGrammarError, history_pairs

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"


def stage_args(stage, cohort, cache, out, model_dir, *extra):
    return synthesize.parse([stage, "--cohort_dir", str(cohort), "--teacher_cache_dir", str(cache),
                             "--output_dir", str(out),
                             "--model_name_or_path", str(model_dir), "--max_steps", "1", "--save_steps", "1",
                             "--report_to", "none", "--per_device_train_batch_size", "1", "--max_length", "256",
                             "--generate_users", "3", "--days_per_user", "1", "--shard_users", "1",
                             "--generation_batch_size", "2", "--max_new_tokens", "60", "--lora_r", "4", *extra])[1:]


@pytest.fixture(scope="module")
def trained(small_cohort, tiny_model_dir, tmp_path_factory):
    out, cache = tmp_path_factory.mktemp("synthesis"), tmp_path_factory.mktemp("synthesis-cache")
    metrics = synthesize.train(*stage_args("train", small_cohort, cache, out, tiny_model_dir))
    return out, cache, metrics


@pytest.mark.parametrize("name", ["synthesize_cpu.yaml", "synthesize_llama31_8b.yaml"])
def test_every_synthesis_config_parses(name, tmp_path):
    values = yaml.safe_load((CONFIGS / name).read_text())
    values["use_cpu"] = True    # GPU recipe checked on CPU
    (tmp_path / name).write_text(yaml.safe_dump(values))
    script, training, model = HfArgumentParser((SynthesisArguments, SFTConfig, ModelConfig)).parse_yaml_file(
        tmp_path / name, allow_extra_keys=False)
    assert training.completion_only_loss and model.use_peft and script.generate_splits


def test_train_writes_an_adapter_grammar_and_the_checked_trace_file(trained):
    out, _, metrics = trained
    model = out / "model"
    for name in ("adapter_config.json", "grammar.json", "train_traces.txt", "README.md"):
        assert (model / name).exists(), name
    assert metrics["windows"] > 0 and metrics["global_step"] == 1 if "global_step" in metrics else metrics["windows"] > 0


def test_generate_resumes_without_duplicates_and_writes_a_strict_cohort(trained, small_cohort, tiny_model_dir):
    out, cache, _ = trained
    args = stage_args("generate", small_cohort, cache, out, tiny_model_dir)
    first = synthesize.generate(*args, max_shards=1, progress=False)          # "interrupted" after one shard
    assert first["interrupted"] and first["shards_written"] == 1
    assert not (out / "cohort" / TRACE_FILE).exists()
    second = synthesize.generate(*args, progress=False)
    assert second["shards_resumed"] == 1 and second["shards_written"] == 2 and not second["interrupted"]

    cohort = load_cohort(out / "cohort", strict=True)
    profiles = read_profiles(out / "cohort")
    assert sorted(cohort.user_ids.tolist()) == sorted(profiles.index.tolist())       # no user missing
    assert len(profiles) == 3 and profiles.index.is_unique
    assert not cohort.events.duplicated(["user_id", "timestamp"]).any()             # no user generated twice

    # the constraint: every synthetic (category, cluster) pair occurs in its source user's real history
    from scope.profiles.corpus import build_corpus
    corpus = build_corpus(args[0])
    for synthetic_id, row in profiles.iterrows():
        real = corpus.cohort.events[corpus.cohort.events["user_id"] == row["source_user_id"]]
        allowed = history_pairs(real, corpus.clusters.of, 20, len(corpus.clusters.names))
        mine = cohort.events[cohort.events["user_id"] == synthetic_id]
        clusters = corpus.clusters.of(mine["location_id"].to_numpy())
        assert row["exploration_budget"] > 0 or allowed[mine["app_category"].to_numpy(), clusters].all()
    # every complete generated line parses (a random tiny model: only a line cut by max_new_tokens may not)
    for shard in sorted((out / "cohort" / "shards").glob("shard-*.jsonl")):
        for rec in map(json.loads, shard.read_text().splitlines()):
            for w in rec["windows"]:
                complete = w["text"][: w["text"].rfind("\n") + 1]
                synthesize.load_grammar(out / "model" / "grammar.json").parse_events(complete)


def test_report_writes_figures_and_summary(trained, small_cohort, tiny_model_dir):
    out, cache, _ = trained
    args = stage_args("report", small_cohort, cache, out, tiny_model_dir)
    if not (out / "cohort" / TRACE_FILE).exists():
        synthesize.generate(*stage_args("generate", small_cohort, cache, out, tiny_model_dir), progress=False)
    summary = synthesize.report(*args)
    for name in ("fidelity.json", "corr_difference.png", "corr_scatter.png", "distributions.png"):
        assert (out / "report" / name).exists(), name
    for key in ("pearson_r", "r2", "mae", "rmse", "hour_jsd", "app_jsd", "tstr_accuracy", "trtr_accuracy"):
        assert key in summary
    assert 0 <= summary["hour_jsd"] <= 1 and 0 <= summary["app_jsd"] <= 1


def test_a_grammar_violating_training_line_is_reported_with_its_number(trained, small_cohort, tiny_model_dir, tmp_path):
    out, cache, _ = trained
    bad = tmp_path / "traces.txt"
    bad.write_text("# user 1 2016-04-20 Wed\ns01 Games c0 t0\ns02 Games c0 t0\ns03 Gamez c0 t0\n\n")
    args = stage_args("train", small_cohort, cache, tmp_path / "stage", tiny_model_dir, "--traces_file", str(bad))
    with pytest.raises(TraceGrammarError, match=r"traces.txt:4: unknown app category 'Gamez'"):
        synthesize.train(*args)


def test_an_empty_history_is_an_error_or_falls_back_to_the_population():
    nothing, population = np.zeros((20, 6), bool), np.zeros((20, 6), bool)
    population[3, 1] = True
    with pytest.raises(NoPermittedPairsError, match="user 7: the history has no"):
        make_constraint(nothing, None, exploration_budget=2, on_no_pairs="error", population_pairs=population, user_id=7)
    constraint, fallback = make_constraint(nothing, None, exploration_budget=2, on_no_pairs="population",
                                           population_pairs=population, user_id=7)
    assert fallback == "population" and constraint.pairs[3, 1] and constraint.exploration_budget == 0


def test_plan_requests_for_a_user_without_events_uses_the_fallback(corpus):
    args = SynthesisArguments(days_per_user=1)
    grammar = synthesize.grammar_of(corpus)
    requests = plan_requests(corpus, args, grammar, users=[corpus.users("train")[0], 999999])
    assert requests[1].fallback == "population" and requests[1].constraint.pairs.any()
    assert not requests[0].fallback
    with pytest.raises(NoPermittedPairsError, match="user 999999"):
        plan_requests(corpus, SynthesisArguments(on_no_pairs="error"), grammar, users=[999999])


def test_augmentation_adds_profiled_synthetic_users_to_train_only(trained, small_cohort, tiny_model_dir, tmp_path):
    from scope.profiles.corpus import build_corpus
    from scope.profiles.sft import sft_dataset

    out, cache, _ = trained
    if not (out / "cohort" / TRACE_FILE).exists():
        synthesize.generate(*stage_args("generate", small_cohort, cache, out, tiny_model_dir), progress=False)
    script = stage_args("train", small_cohort, cache, out, tiny_model_dir)[0]
    plain = build_corpus(script)
    script.synthetic_cohort_dir, script.synthetic_ratio = str(out / "cohort"), 0.1
    mixed = build_corpus(script)
    synthetic = mixed.users("synthetic")
    assert len(synthetic) == round(0.1 * len(plain.profiled("train"))) and all(u >= 100000 for u in synthetic)
    for split in ("train", "val", "test", "cold"):
        assert mixed.users(split) == plain.users(split)          # real splits unchanged, no synthetic user in them
    train = sft_dataset(mixed, ["train"])
    assert set(train["user_id"]) == set(plain.profiled("train")) | set(mixed.profiled("synthetic"))
    assert not set(sft_dataset(mixed, ["test"])["user_id"]) & set(synthetic)


def _pools_fixture(within_slot):
    """User 1: hour 8 holds 5 records of category 2 and 2 of category 5 at station 10 (cluster 0);
    hour 9 holds 12 records of category 3 at station 20 (cluster 1)."""
    import pandas as pd

    from scope.synthesis.generation import RecordPools
    from scope.synthesis.traces import TraceGrammar

    stamps = ([f"2016-04-20 08:{m:02d}:00" for m in range(7)] + [f"2016-04-20 09:{m:02d}:00" for m in range(12)])
    categories = [2] * 5 + [5] * 2 + [3] * 12
    events = pd.DataFrame({"user_id": 1, "timestamp": pd.to_datetime(stamps), "location_id": [10] * 7 + [20] * 12,
                           "app_category": categories, "app_id": [100 + c for c in categories], "traffic_bytes": 1000})
    grammar = TraceGrammar(tuple(f"cat{i}" for i in range(6)), 2, 60)
    app_category = pd.Series(range(6), index=[100 + c for c in range(6)])
    pools = RecordPools(events, lambda ids: np.where(np.asarray(ids) == 10, 0, 1), app_category, np.array([10, 20]),
                        6, grammar, within_slot)
    return pools, grammar, app_category


@pytest.mark.parametrize("within_slot", ["mixture", "dominant"])
def test_a_line_is_written_back_with_the_users_slot_sizes_and_within_slot_co_usage(within_slot):
    from scope.synthesis.generation import events_from_windows
    from scope.synthesis.traces import TraceEvent, TraceWindow

    pools, grammar, app_category = _pools_fixture(within_slot)
    windows = [TraceWindow(1, f"2016-05-{d:02d}", [TraceEvent(8, 2, 0, 1)]) for d in range(1, 31)]
    rows = events_from_windows(101, 1, windows, grammar, pools, seed=0)
    per_day = rows.groupby(rows["timestamp"].str[:8])
    assert (per_day.size() == 7).all()                         # the user's one real slot of level t1 held 7 records
    assert (per_day["base_station_id"].nunique() == 1).all() and set(rows["base_station_id"]) == {10}
    assert rows["timestamp"].str[8:10].eq("08").all()          # inside the line's slot
    category = app_category.reindex(rows["app_id"]).to_numpy()
    if within_slot == "dominant":
        assert set(category) == {2}
    else:                                                      # 2 of 7 records of such slots were category 5
        assert set(category) == {2, 5} and abs((category == 5).mean() - 2 / 7) < 0.07
    again = events_from_windows(101, 1, windows, grammar, pools, seed=0)
    assert again.equals(rows)                                   # deterministic in (seed, user)


def test_a_user_or_pair_without_history_falls_back_to_the_cohort_then_the_catalogue():
    from scope.synthesis.generation import events_from_windows
    from scope.synthesis.traces import TraceEvent, TraceWindow, records_range

    pools, grammar, app_category = _pools_fixture("mixture")
    # source user 2 has no history; pair (4, 1) and category 4 occur nowhere; t2: the cohort's one 12-record slot
    rows = events_from_windows(102, 2, [TraceWindow(2, "2016-05-01", [TraceEvent(20, 4, 1, 2)])], grammar, pools, 0)
    assert len(rows) == 12
    assert set(app_category.reindex(rows["app_id"])) == {4} and set(rows["base_station_id"]) == {20}
    rows = events_from_windows(102, 2, [TraceWindow(2, "2016-05-01", [TraceEvent(20, 4, 1, 3)])], grammar, pools, 0)
    lo, hi = records_range(3)                                  # no slot of level t3 anywhere: the level's range
    assert lo <= len(rows) <= hi


def test_days_per_user_zero_generates_every_day_of_the_cohort(corpus):
    requests = plan_requests(corpus, SynthesisArguments(days_per_user=0, generate_users=2), synthesize.grammar_of(corpus))
    first = corpus.cohort.events["timestamp"].min()
    assert [r.dates for r in requests] == [[str((first + np.timedelta64(d, "D")).date()) for d in range(4)]] * 2


def test_the_synthetic_cohort_is_never_written_into_the_real_one(tmp_path, monkeypatch):
    from scope.synthesis.generation import check_output_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "cohort").mkdir(parents=True)
    with pytest.raises(ValueError, match="would be written into the real cohort runs/cohort"):
        check_output_dir("runs/cohort", tmp_path / "runs" / "cohort")
    check_output_dir("runs/cohort", "runs/synthesis/cohort")


def test_the_history_prior_counts_a_users_lines_and_transitions_within_each_day():
    from scope.synthesis.generation import attach_history_prior
    from scope.synthesis.traces import TraceConstraint, TraceEvent, TraceGrammar, TraceWindow

    grammar = TraceGrammar(("cat0", "cat1", "cat2"), 2, 60)
    windows = [TraceWindow(1, "2016-04-20", [TraceEvent(8, 0, 0, 0), TraceEvent(9, 1, 1, 0), TraceEvent(10, 1, 0, 1)]),
               TraceWindow(1, "2016-04-21", [TraceEvent(8, 2, 0, 0)])]
    c = attach_history_prior(TraceConstraint(np.ones((3, 2), bool), exploration_budget=1), windows, grammar)
    assert c.category_counts.tolist() == [1, 2, 1] and c.slot_counts[8] == 2 and c.slot_counts.sum() == 4
    assert c.pair_counts.tolist() == [[1, 0], [1, 1], [1, 0]] and c.exploration_budget == 1
    assert c.transition_counts.tolist() == [[0, 1, 0], [0, 1, 0], [0, 0, 0]]   # no transition across days
