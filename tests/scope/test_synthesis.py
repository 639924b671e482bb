"""Synthesis end to end on a tiny random Llama (scope.synthesis, recipes/synthesize.py): a real
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
from scope.synthesis import (NoPermittedPairsError, SynthesisArguments, make_constraint, plan_requests, read_profiles)
from scope.traces import TraceGrammarError, history_pairs
from scope.tsinghua import TRACE_FILE, load_cohort

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"


def stage_args(stage, cohort, cache, out, model_dir, *extra):
    return synthesize.parse([stage, "--cohort_dir", str(cohort), "--teacher_cache_dir", str(cache),
                             "--simulate_if_missing", "false", "--output_dir", str(out),
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
    from scope.corpus import build_corpus
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
    from scope.corpus import build_corpus
    from scope.sft import sft_dataset

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
