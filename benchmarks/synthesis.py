"""Synthesis benchmark (U-SCOPE section 5.2, Eq. 25-26) on a simulated cohort: the CPU default
recipe end to end (train the trace LM, generate, report), plus the throughput of constrained vs
unconstrained sampling on the same prompts and the same model.

    python -m benchmarks.synthesis [--users 100 --days 7 --generate_users 60 --threads 2 --work_dir runs/bench/synthesis]
    # any other --key value goes to recipes/synthesize.py (e.g. --max_steps 200)

The simulator writes two weeks of the same users; the recipe sees the first (the real cohort),
the second is the *reference*: ``reference_pearson_r`` / ``reference_r2`` are the Eq. 26 agreement
of that independent real week with the real one, i.e. what a perfect generator would score at
this sample size (sampling noise alone keeps it below 1; it grows with the number of users).

Last stdout line: one JSON object with ``pearson_r``, ``r2`` (Eq. 26 agreement of synthetic vs real
``Corr(a, p)``; paper Fig. 5: r = 0.952, R^2 = 0.906), the reference, ``dominant_pearson_r`` /
``dominant_r2`` (the same generated lines written back with ``within_slot: dominant``),
``well_formed_rate`` (generated lines that parse under the grammar), ``constrained_tokens_per_s`` /
``unconstrained_tokens_per_s`` (one batch of ``generation_batch_size`` prompts, same seed; both
count tokens up to each row's eos), ``unconstrained_well_formed_rate`` (what the LM alone
achieves), ``tstr_accuracy`` / ``trtr_accuracy`` (next-app-category prediction, same real test
users), ``hour_jsd``, ``app_jsd``, the ceiling of the grammar's coarsening and wall times per
stage. Targets: r >= 0.95, R^2 >= 0.91, well-formed = 1.0, constrained >= 0.5 x unconstrained
throughput.
"""

import argparse
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import torch

from benchmarks.common import RESULTS, emit, filtered_cohort, peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--users", type=int, default=100, help="simulated users (two weeks are simulated, see above)")
    parser.add_argument("--days", type=int, default=7, help="days of the real cohort (and of the reference)")
    parser.add_argument("--generate_users", type=int, default=60, help="source users to synthesise (train split)")
    parser.add_argument("--config", default=str(ROOT / "recipes" / "configs" / "synthesize_cpu.yaml"))
    parser.add_argument("--work_dir", default=str(ROOT / "runs" / "bench" / "synthesis"))
    parser.add_argument("--throughput_tokens", type=int, default=64, help="max new tokens of the throughput probe")
    parser.add_argument("--keep", action="store_true", help="reuse a trained model / generated cohort in work_dir")
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from recipes import synthesize
    from scope.profiles.corpus import build_corpus
    from scope.profiles.llms import load_student, load_tokenizer
    from scope.synthesis.fidelity import compare
    from scope.synthesis.generation import (
        RecordPools,
        conditioning_prompt,
        load_grammar,
        parse_generated,
        plan_requests,
        read_profiles,
        read_shards,
        sample_windows,
        written_back_events,
    )
    from scope.synthesis.traces import GrammarTokens, TraceWindow

    work = Path(args.work_dir)
    stage = work / "stage"
    if stage.exists() and not args.keep:
        shutil.rmtree(stage)
    cohort_dir, reference = two_week_cohort(work, args.users, args.days)
    argv = ["--config", args.config, "--cohort_dir", str(cohort_dir), "--teacher_cache_dir", str(work / "teacher_cache"),
            "--output_dir", str(stage), "--report_to", "none", "--threads", str(args.threads),
            "--n_users", str(args.users), "--days", str(args.days), "--generate_users", str(args.generate_users), *overrides]
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
    (RESULTS / "figures").mkdir(parents=True, exist_ok=True)   # the report's figures, for the README
    for png in (stage / "report").glob("*.png"):
        shutil.copyfile(png, RESULTS / "figures" / f"synthesis_{png.name}")

    # the reference (an independent real week of the same source users) and the dominant-pair write-back
    _, script, training, model_args = synthesize.parse(["report", *argv])
    corpus = build_corpus(script)
    cohort, n_a = corpus.cohort, len(corpus.cohort.categories)
    sources = sorted(int(u) for u in read_profiles(stage / "cohort")["source_user_id"])
    real = cohort.events[cohort.events["user_id"].isin(sources)]
    scores = compare(real, reference[reference["user_id"].isin(sources)], cohort.base_poi, n_a)
    figures.update({"reference_pearson_r": scores["pearson_r"], "reference_r2": scores["r2"],
                    "reference_records": scores["synthetic_records"], "real_records": scores["real_records"],
                    "source_users": len(sources)})
    grammar = load_grammar(stage / "model" / "grammar.json")
    pools = RecordPools(cohort.events, corpus.clusters.of, cohort.app_category, cohort.base_poi.index.to_numpy(), n_a,
                        grammar, within_slot="dominant")
    dominant = written_back_events(read_shards(stage / "cohort" / "shards", grammar), grammar, pools, cohort.app_category,
                                   seed=script.synthesis_seed, offset=script.synthetic_user_offset)
    scores = compare(real, dominant, cohort.base_poi, n_a)
    figures.update({"dominant_pearson_r": scores["pearson_r"], "dominant_r2": scores["r2"]})

    # throughput: the same prompts and model, constrained vs free sampling (same seed, same token cap)
    model_dir = stage / "model"
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


def two_week_cohort(work: Path, users: int, days: int) -> tuple[Path, pd.DataFrame]:
    """Simulate ``users`` x ``2 * days`` days; write the first ``days`` days as the real cohort
    (once) and return its folder and the events of the other days (the reference week)."""
    from scope.data.simulate import CohortConfig, simulate_cohort
    from scope.data.tsinghua import TRACE_FILE, load_cohort

    simulated, cohort = work / f"simulated-{users}x{2 * days}", work / f"cohort-{users}x{days}"
    if not (simulated / TRACE_FILE).exists():
        simulate_cohort(CohortConfig(n_users=users, days=2 * days), simulated, progress=False)
    events = load_cohort(simulated).events
    cut = events["timestamp"].min().normalize() + pd.Timedelta(days=days)
    if not (cohort / TRACE_FILE).exists():
        filtered_cohort(simulated, cohort, lambda trace: trace[1] < cut.strftime("%Y%m%d%H%M%S"))
    return cohort, events[events["timestamp"] >= cut]


if __name__ == "__main__":
    main()
