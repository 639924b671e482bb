"""Synthesis benchmark (U-SCOPE section 5.2, Eq. 25-26) on the embedded simulated cohort: the CPU
default recipe end to end (train the trace LM, generate, report), plus the throughput of
constrained vs unconstrained sampling on the same prompts and the same model.

    python -m benchmarks.synthesis [--threads 2 --work_dir runs/bench/synthesis --config recipes/configs/synthesize_cpu.yaml]

Last stdout line: one JSON object with ``pearson_r``, ``r2`` (Eq. 26 agreement of synthetic vs real
``Corr(a, p)``; paper Fig. 5: r = 0.952, R^2 = 0.906), ``well_formed_rate`` (generated lines that
parse under the grammar), ``constrained_tokens_per_s`` / ``unconstrained_tokens_per_s`` (one batch
of ``generation_batch_size`` prompts, same seed; both count tokens up to each row's eos),
``unconstrained_well_formed_rate`` (what the LM alone achieves), ``tstr_accuracy`` /
``trtr_accuracy`` (next-app-category prediction, same real test users), ``hour_jsd``, ``app_jsd``,
the ceiling of the grammar's coarsening and wall times per stage. Targets: r >= 0.95, R^2 >= 0.91,
well-formed = 1.0, constrained >= 0.5 x unconstrained throughput.
"""

import argparse
import os
import shutil
import time
from pathlib import Path

import torch

from benchmarks.common import emit, peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", default=str(ROOT / "recipes" / "configs" / "synthesize_cpu.yaml"))
    parser.add_argument("--work_dir", default=str(ROOT / "runs" / "bench" / "synthesis"))
    parser.add_argument("--throughput_tokens", type=int, default=64, help="max new tokens of the throughput probe")
    parser.add_argument("--keep", action="store_true", help="reuse a trained model / generated cohort in work_dir")
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from recipes import synthesize
    from scope.corpus import build_corpus
    from scope.models import load_student, load_tokenizer
    from scope.synthesis import load_grammar, parse_generated, plan_requests, sample_windows, conditioning_prompt
    from scope.traces import GrammarTokens, TraceWindow

    work = Path(args.work_dir)
    stage = work / "stage"
    if stage.exists() and not args.keep:
        shutil.rmtree(stage)
    argv = ["--config", args.config, "--cohort_dir", str(work / "cohort"), "--teacher_cache_dir", str(work / "teacher_cache"),
            "--output_dir", str(stage), "--report_to", "none", "--cpu_threads", str(args.threads), *overrides]
    figures, start = {}, time.perf_counter()
    for name in ("train", "generate", "report"):
        t0 = time.perf_counter()
        _, script, training, model_args = synthesize.parse([name, *argv])
        result = synthesize.STAGE_FUNCTIONS[name](script, training, model_args)
        figures[f"{name}_s"] = round(time.perf_counter() - t0, 1)
        if name == "train":
            figures.update({"train_windows": result["windows"], "train_loss": result.get("train_loss")})
        if name == "generate":
            figures.update({k: result[k] for k in ("well_formed_rate", "records", "users", "tokens") if k in result})
            figures["constrained_tokens_per_s_generate"] = result.get("constrained_tokens_per_s")
        if name == "report":
            report = result
    figures["wall_s"] = round(time.perf_counter() - start, 1)
    for key in ("pearson_r", "r2", "r2_identity", "mae", "rmse", "joint_mae", "joint_rmse", "hour_jsd", "app_jsd",
                "tstr_accuracy", "trtr_accuracy", "majority_accuracy", "test_lines", "pairs_compared", "diff_above_0.05"):
        figures[key] = report[key]
    for key in ("joint_pearson_r", "joint_r2"):
        figures[key] = report.get(key)
    figures["ceiling"] = {k: report["ceiling"][k] for k in ("pearson_r", "r2", "hour_jsd", "app_jsd")}
    if "vs_serialised_real" in report:
        figures["vs_serialised_real"] = {k: report["vs_serialised_real"][k] for k in ("pearson_r", "r2", "hour_jsd", "app_jsd")}
    figures["reused_stage"] = bool(args.keep)

    # throughput: the same prompts and model, constrained vs free sampling (same seed, same token cap)
    _, script, training, model_args = synthesize.parse(["generate", *argv])
    corpus = build_corpus(script)
    model_dir = stage / "model"
    grammar = load_grammar(model_dir / "grammar.json")
    tokens = GrammarTokens(grammar, load_tokenizer(str(model_dir)))
    model = load_student(model_args.model_name_or_path, [str(model_dir)])
    requests = plan_requests(corpus, script, grammar)[: script.generation_batch_size]
    prompts = [conditioning_prompt(r.profile, grammar, corpus.clusters.names, TraceWindow(0, r.dates[0]).weekday)
               for r in requests]
    runs = {}
    for label, constraints in (("warmup", None), ("unconstrained", None), ("constrained", [r.constraint for r in requests])):
        torch.manual_seed(0)
        texts, n_tokens, wall = sample_windows(model, tokens, prompts, constraints, temperature=script.temperature,
                                               max_new_tokens=args.throughput_tokens, history_weight=script.history_weight)
        lines = [parse_generated(grammar, t) for t in texts]
        runs[label] = (n_tokens / wall, sum(g for _, _, g in lines) / max(sum(n for _, n, _ in lines), 1))
    figures["constrained_tokens_per_s"] = round(runs["constrained"][0], 1)
    figures["unconstrained_tokens_per_s"] = round(runs["unconstrained"][0], 1)
    figures["throughput_ratio"] = round(runs["constrained"][0] / runs["unconstrained"][0], 3)
    figures["unconstrained_well_formed_rate"] = round(runs["unconstrained"][1], 4)
    figures.update({"threads": args.threads, "peak_rss_mb": round(peak_rss_mb()), "load_avg_1m": os.getloadavg()[0]})
    return emit("synthesis", figures)


if __name__ == "__main__":
    main()
