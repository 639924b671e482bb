"""Semantic-augmented synthesis (U-SCOPE section 5.2, Eq. 25-26): train a trace LM, generate a
synthetic cohort under the trace grammar's constraint, report its fidelity.

    python recipes/synthesize.py train    --config recipes/configs/synthesize_cpu.yaml
    python recipes/synthesize.py generate --config recipes/configs/synthesize_cpu.yaml
    python recipes/synthesize.py report   --config recipes/configs/synthesize_cpu.yaml
    # any key of the YAML can be overridden: --cohort_dir <real cohort> --output_dir <stage folder>

Under ``output_dir``: ``model/`` (LoRA adapter, tokenizer, ``grammar.json``, ``train_traces.txt``,
model card), ``cohort/`` (the synthetic Tsinghua-format files, ``profiles.jsonl``,
``generation.json``, ``shards/``), ``report/`` (``fidelity.json``, with ``vs_ceiling_pearson_r``: the
synthetic cohort's Eq. 26 r minus the grammar ceiling's, paired bootstrap CI over the source users, and
PNG figures). ``train``
resumes from its last checkpoint and ``generate`` from its last complete shard. The three stages
are also functions (:func:`train`, :func:`generate`, :func:`report`) taking the parsed dataclasses.
Keys: scope.synthesis.generation.SynthesisArguments + trl.SFTConfig + trl.ModelConfig.
"""

import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from datasets import Dataset
from trl import ModelConfig, SFTConfig, SFTTrainer, get_peft_config

from scope.cli import parse_config, run_recipe
from scope.data.tsinghua import load_cohort
from scope.io import write_json
from scope.profiles.corpus import build_corpus
from scope.profiles.llms import (LOADER_KEYS, LORA_KEYS, generation_model, load_model, load_model_tokenizer,
                                 load_student, load_tokenizer)
from scope.profiles.sft import train_and_save, write_model_card
from scope.synthesis.fidelity import fidelity_report, pearson_difference
from scope.synthesis.generation import (GRAMMAR_FILE, TRAIN_TRACES_FILE, RecordPools, SynthesisArguments,
                                        check_output_dir, generate_shards, grammar_of, load_grammar, plan_requests,
                                        read_profiles, save_grammar, serialise_cohort, trace_examples, write_cohort,
                                        written_back_events)
from scope.synthesis.traces import GrammarTokens, windows_from_events

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "synthesize_cpu.yaml"
STAGES = ("train", "generate", "report")
# The trl.ModelConfig keys this recipe honours: the loader's (scope.profiles.llms.load_model, load_student)
# and the LoRA's.
MODEL_KEYS = LOADER_KEYS + LORA_KEYS
log = logging.getLogger("recipes.synthesize")


def _threads(args: SynthesisArguments) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def _dirs(training_args: SFTConfig) -> tuple[Path, Path, Path, Path]:
    out = Path(training_args.output_dir)
    return out, out / "model", out / "cohort", out / "report"


def trace_lm(model_args: ModelConfig, training_args: SFTConfig):
    """The base model ``train`` fine-tunes (every ModelConfig key of the loader applied)."""
    return load_model(model_args, training_args)


def trained_trace_lm(model_args: ModelConfig, training_args: SFTConfig, model_dir: Path):
    """The base with the trained LoRA of ``model_dir`` merged, as ``generate`` samples it (quantized when the
    config quantizes: merged into the unquantized weights, then quantized)."""
    return load_student(model_args, [str(model_dir)], training_args=training_args)


def train(script_args: SynthesisArguments, training_args: SFTConfig, model_args: ModelConfig) -> dict:
    """Fine-tune the trace LM (LoRA, next-token loss on the event lines) on the real users' windows."""
    start = time.perf_counter()
    _threads(script_args)
    out, model_dir, _, _ = _dirs(training_args)
    corpus = build_corpus(script_args, report_dir=out)
    grammar = grammar_of(corpus, script_args.slot_minutes)
    traces_path = model_dir / TRAIN_TRACES_FILE
    if script_args.traces_file:
        windows = grammar.read_windows(script_args.traces_file)          # strict: a bad line names its number
    else:
        users = corpus.profiled(*script_args.train_splits)
        users = users[:script_args.train_user_limit] if script_args.train_user_limit else users
        windows = serialise_cohort(corpus, users, grammar)
        traces_path.parent.mkdir(parents=True, exist_ok=True)
        traces_path.write_text(grammar.format_windows(windows))
        windows = grammar.read_windows(traces_path)                      # the file is what is trained on
    if not windows:
        raise ValueError("no training windows: the users of train_splits have no events")
    tokenizer = load_model_tokenizer(model_args, training_args)
    tokens = GrammarTokens(grammar, tokenizer)
    profiles = {u: r.profile for u, r in corpus.results.items()}
    rows = trace_examples(windows, profiles, tokens, corpus.clusters.names, training_args.max_length)
    dataset = Dataset.from_list(rows)

    model = trace_lm(model_args, training_args)
    training_args.output_dir = str(model_dir)
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=get_peft_config(model_args))
    result, resume = train_and_save(trainer, tokenizer, model_dir, script_args.resume)
    save_grammar(grammar, model_dir / GRAMMAR_FILE)
    training_args.output_dir = str(out)
    lengths = [len(r["input_ids"]) for r in rows]
    metrics = {"windows": len(rows), "users": len({w.user_id for w in windows}), "mean_tokens": sum(lengths) / len(lengths),
               "resumed_from": Path(resume).name if resume else "none", **result.metrics,
               "wall_s": round(time.perf_counter() - start, 1)}
    if trainer.is_world_process_zero():
        write_model_card(model_dir, title="U-SCOPE trace LM (synthesis, LoRA)", base_model=model_args.model_name_or_path,
                         stage="synthesis", metrics=metrics,
                         configs={"script": asdict(script_args), "model": asdict(model_args), "training": training_args},
                         notes="Generates a user-day of event lines `sNN Category cK tL` (scope.synthesis.traces) conditioned on "
                               "a profile; decode with scope.synthesis.traces.TraceLogitsProcessor.")
    log.info("trace LM saved to %s (%s s)", model_dir, metrics["wall_s"])
    return metrics


def generate(script_args: SynthesisArguments, training_args: SFTConfig, model_args: ModelConfig, *,
             max_shards: int | None = None, progress: bool = True) -> dict:
    """Generate the synthetic cohort shard by shard (resumable) and write it in Tsinghua format.

    ``max_shards`` stops after that many new shards (simulates an interruption; no cohort is written)."""
    start = time.perf_counter()
    _threads(script_args)
    out, model_dir, cohort_dir, _ = _dirs(training_args)
    if not (model_dir / GRAMMAR_FILE).exists():
        raise FileNotFoundError(f"no trained trace LM in {model_dir}: run `recipes/synthesize.py train` first")
    corpus = build_corpus(script_args)
    check_output_dir(corpus.cohort.directory, cohort_dir)
    grammar = load_grammar(model_dir / GRAMMAR_FILE)
    if grammar != grammar_of(corpus, grammar.slot_minutes):
        raise ValueError(f"the trace LM in {model_dir} was trained on other app categories / location clusters than "
                         f"the cohort {corpus.cohort.directory}")
    tokenizer = load_tokenizer(str(model_dir))
    model = generation_model(trained_trace_lm(model_args, training_args, model_dir), script_args.inference_dtype)
    tokens = GrammarTokens(grammar, tokenizer)
    requests = plan_requests(corpus, script_args, grammar)
    stats = generate_shards(model, tokens, requests, corpus.clusters.names, cohort_dir / "shards",
                            shard_users=script_args.shard_users, batch_size=script_args.generation_batch_size,
                            temperature=script_args.temperature, seed=script_args.synthesis_seed,
                            max_new_tokens=script_args.max_new_tokens or None, stop_after_shards=max_shards,
                            progress=progress, history_weight=script_args.history_weight)
    stats["users"] = len(requests)
    stats["fallback_users"] = sum(bool(r.fallback) for r in requests)
    stats["exploring_users"] = sum(r.constraint.exploration_budget > 0 for r in requests)
    if stats["interrupted"]:
        return stats
    stats.update(write_cohort(corpus, requests, cohort_dir / "shards", cohort_dir, grammar, seed=script_args.synthesis_seed,
                              within_slot=script_args.within_slot))
    load_cohort(cohort_dir, strict=True)   # every loader must accept it unchanged
    stats["well_formed_rate"] = stats["well_formed_lines"] / max(stats["lines"], 1)
    if stats["generate_s"] > 0:
        stats["constrained_tokens_per_s"] = stats["tokens"] / stats["generate_s"]
    stats["wall_s"] = round(time.perf_counter() - start, 1)
    previous = cohort_dir / "generation.json"
    if stats["shards_written"] == 0 and previous.exists():   # a no-op rerun keeps the measured figures
        stats = {**json.loads(previous.read_text()), "shards_resumed": stats["shards_resumed"], "shards_written": 0}
    write_json(previous, stats)
    return stats


def report(script_args: SynthesisArguments, training_args: SFTConfig, model_args: ModelConfig) -> dict:
    """Fidelity of the synthetic cohort against the real source users (Eq. 26) + TSTR utility."""
    _threads(script_args)
    out, model_dir, cohort_dir, report_dir = _dirs(training_args)
    corpus = build_corpus(script_args)
    grammar = load_grammar(model_dir / GRAMMAR_FILE)
    synthetic = load_cohort(cohort_dir, strict=True)
    profiles = read_profiles(cohort_dir)
    sources = sorted(int(u) for u in profiles["source_user_id"])
    real_events = corpus.cohort.events
    real = real_events[real_events["user_id"].isin(sources)]
    train_real = serialise_cohort(corpus, sources, grammar)
    train_synthetic = windows_from_events(synthetic.events, corpus.clusters.of, grammar)
    test_users = [u for u in corpus.users(*script_args.tstr_test_splits) if u not in set(sources)]
    test_real = serialise_cohort(corpus, test_users, grammar)
    pools = RecordPools(real_events, corpus.clusters.of, corpus.cohort.app_category,
                        corpus.cohort.base_poi.index.to_numpy(), len(corpus.cohort.categories), grammar,
                        script_args.within_slot)
    by_user: dict[int, list] = {}
    for w in train_real:
        by_user.setdefault(w.user_id, []).append(w)
    ceiling = written_back_events(by_user, grammar, pools, corpus.cohort.app_category, seed=script_args.synthesis_seed)
    extra = {"synthetic_users": len(profiles), "source_users": len(sources), "test_users": len(test_users)}
    if len(ceiling):   # the synthetic cohort's r minus the ceiling's, paired over the source users
        as_sources = synthetic.events.assign(
            user_id=profiles["source_user_id"].reindex(synthetic.events["user_id"].to_numpy()).to_numpy())
        extra["vs_ceiling_pearson_r"] = pearson_difference(real, as_sources, ceiling, corpus.cohort.base_poi,
                                                           len(corpus.cohort.categories), sources)
    generation = cohort_dir / "generation.json"
    if generation.exists():
        g = json.loads(generation.read_text())
        extra.update({k: g[k] for k in ("well_formed_rate", "constrained_tokens_per_s") if k in g})
    summary = fidelity_report(real, synthetic.events, corpus.cohort.base_poi, corpus.cohort.categories, report_dir,
                              grammar=grammar, train_real=train_real, train_synthetic=train_synthetic,
                              test_real=test_real, ceiling=ceiling, extra=extra)
    log.info("fidelity: r = %.3f, R^2 = %.3f, TSTR %.3f vs TRTR %.3f", summary["pearson_r"], summary["r2"],
             summary["tstr_accuracy"], summary["trtr_accuracy"])
    return summary


def parse(argv: list[str]) -> tuple[str, SynthesisArguments, SFTConfig, ModelConfig]:
    """``[stage, --config ..., --key value ...]`` -> the stage and the three parsed dataclasses."""
    if not argv or argv[0] not in STAGES:
        raise SystemExit(f"usage: recipes/synthesize.py {{{','.join(STAGES)}}} [--config YAML] [--key value ...]")
    return (argv[0], *parse_config((SynthesisArguments, SFTConfig, ModelConfig), argv[1:], DEFAULT_CONFIG))


STAGE_FUNCTIONS = {"train": train, "generate": generate, "report": report}


def main(argv: list[str] | None = None) -> dict:
    stage, *args = parse(sys.argv[1:] if argv is None else argv)
    result = STAGE_FUNCTIONS[stage](*args)
    print(json.dumps({"stage": stage, **{k: v for k, v in result.items() if not isinstance(v, (dict, list))}}, default=str))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(run_recipe(main))
