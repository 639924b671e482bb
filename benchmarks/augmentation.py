"""RQ5: does mixing synthetic users into SFT help cold-start users? Students of the CPU default SFT
recipe (``recipes/sft.py``), trained with and without the synthetic cohort of
``benchmarks/synthesis.py``, over several seeds, scored on users never trained on.

    python -m benchmarks.synthesis                      # first: the real + synthetic cohorts
    python -m benchmarks.augmentation [--steps 32 --ratio 1.0 --seeds 42 43 44 --cold_records 30 --threads 1]

Training data. The real training users are the synthesis benchmark's source users (the cohort's
other train users are left out), so ``augmented`` adds each real user's synthetic twin: with
``--ratio 1.0`` half of its examples are synthetic. Two variants per seed, the same number of steps:

- ``real_long``: the real training users only;
- ``augmented``: the real training users plus ``round(ratio x real)`` synthetic users.

The students learn profiles only (``recommend_share: 0``): RQ5 scores profiles, and with the
recommendation turns mixed into 32 steps the students wrote hybrids of the two answers (schema-valid
0 for every user in a run that was stopped).

The earlier shorter ``baseline`` (fewer steps, real users only) is not rerun: each student costs
its SFT steps plus about 5 s of greedy decoding per scored user on one CPU thread, and the steps
go to the seeds. Scored users (greedy, ``scope.profiles.evaluation.evaluate_student``):

- ``cold``: the cohort's own cold-start users (fewer than 50 records in the week);
- ``cold_sim``: every val + test user cut to its first ``--cold_records`` records (simulated cold
  start): the prompt is built from those records only, the answer is scored against the user's
  *whole* week, so ``grounding_apps@3`` / ``grounding_places@3`` are the cold-start app and place
  recommendation accuracy (precision@3 against the user's real top 3) and ``field_agreement``
  compares with the teacher's profile of the whole week;
- ``all``: both groups together (the headline, >= 40 users).

Statistics: each user's metric is averaged over the seeds, then the mean over users gets a
percentile bootstrap 95% CI (``scope.metrics.bootstrap_ci``); ``delta`` is the paired per-user
difference ``augmented - real_long`` (same seed, then averaged over seeds) with its CI; ``per_seed``
lists the seed means. A finished (variant, seed) run is reused from ``work_dir`` when its settings
match (a killed benchmark resumes there).

Last stdout line: one JSON object with ``variants.<variant>.<group>.<metric>`` = ``{mean, ci,
per_seed}``, ``delta.<group>.<metric>`` = ``{mean, ci, per_seed}``, group sizes, steps and wall times.
"""

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.common import emit, filtered_cohort, peak_rss_mb
from scope.io import write_json

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("schema_valid", "field_agreement", "grounding_apps@3", "grounding_places@3", "grounding@3")
VARIANTS = ("real_long", "augmented")


def cold_start_cohort(cohort_dir: Path, out: Path, users: list[int], records: int) -> Path:
    """A copy of the cohort where ``users`` keep only their first ``records`` records."""
    return filtered_cohort(cohort_dir, out, lambda trace: ~trace[0].astype(int).isin(users)
                           | (trace.groupby(0).cumcount() < records))


def user_metrics(score) -> dict[str, float]:
    """One user's metrics from a ``scope.profiles.evaluation.UserScore``."""
    return {"schema_valid": float(score.schema_valid), "field_agreement": score.agreement["mean"],
            "grounding_apps@3": score.grounding_apps, "grounding_places@3": score.grounding_places,
            "grounding@3": (score.grounding_apps + score.grounding_places) / 2}


def summarise(per_seed: list[dict[str, dict[str, float]]], users: list[int], metric: str) -> dict:
    """Mean over ``users`` of their seed-averaged ``metric``, its bootstrap 95% CI and the seed means."""
    from scope.metrics import bootstrap_ci

    by_user = [sum(run[str(u)][metric] for run in per_seed) / len(per_seed) for u in users]
    mean, lo, hi = bootstrap_ci(by_user)
    return {"mean": mean, "ci": [lo, hi],
            "per_seed": [sum(run[str(u)][metric] for u in users) / len(users) for run in per_seed]}


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32, help="SFT steps of every student")
    parser.add_argument("--ratio", type=float, default=1.0, help="synthetic users per real training user")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--synthesis_dir", default=str(ROOT / "runs" / "bench" / "synthesis"))
    parser.add_argument("--work_dir", default=str(ROOT / "runs" / "bench" / "augmentation"))
    parser.add_argument("--cold_records", type=int, default=30, help="records a simulated cold-start user keeps")
    parser.add_argument("--batch_size", type=int, default=26, help="prompts per greedy decoding batch")
    parser.add_argument("--max_new_tokens", type=int, default=384, help="profiles need ~300 (0 cut off at 384 in uscope_eval)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()

    from trl import ModelConfig, SFTConfig, TrlParser

    from recipes import sft
    from scope.profiles.corpus import build_corpus
    from scope.profiles.evaluation import evaluate_student
    from scope.profiles.llms import load_student, load_tokenizer
    from scope.synthesis.generation import read_profiles

    synthesis, work = Path(args.synthesis_dir), Path(args.work_dir)
    synthetic = synthesis / "stage" / "cohort"
    cohorts = sorted(synthesis.glob("cohort-*"))
    if not (synthetic / "profiles.jsonl").exists() or not cohorts:
        raise SystemExit(f"no synthetic cohort in {synthetic}: run `python -m benchmarks.synthesis` first")

    def parse(cohort_dir: Path, extra: list[str]):
        argv = ["--config", str(ROOT / "recipes" / "configs" / "sft_cpu.yaml"), "--cohort_dir", str(cohort_dir),
                "--teacher_cache_dir", str(synthesis / "teacher_cache"), "--save_strategy", "no", "--report_to", "none",
                "--resume", "false", "--eval_users", "0", "--threads", str(args.threads),
                "--recommend_share", "0", *extra]   # RQ5 scores profiles: no recommendation turns in the steps
        return TrlParser((sft.SFTScriptArguments, SFTConfig, ModelConfig)).parse_args_and_config(args=argv)

    # the real cohort with the synthesis sources as its only train users
    full = build_corpus(parse(cohorts[-1], [])[0])
    sources = set(int(u) for u in read_profiles(synthetic)["source_user_id"])
    dropped = set(full.users("train")) - sources
    cohort_dir = filtered_cohort(cohorts[-1], work / "real-cohort", lambda trace: ~trace[0].astype(int).isin(dropped))
    corpus = build_corpus(parse(cohort_dir, [])[0])
    held_out = corpus.profiled("val") + corpus.profiled("test")
    cut = build_corpus(parse(cold_start_cohort(cohort_dir, work / "cold-start-cohort", held_out, args.cold_records), [])[0])
    groups = {"cold": corpus.profiled("cold"), "cold_sim": [u for u in held_out if u in cut.prompts]}
    groups["all"] = groups["cold"] + groups["cold_sim"]
    # cold_sim: the prompt of the cut history, scored against the statistics of the whole week
    prompts = [corpus.prompts[u] for u in groups["cold"]] + [
        dataclasses.replace(cut.prompts[u], stats=corpus.prompts[u].stats) for u in groups["cold_sim"]]
    teachers = [corpus.results[u].profile for u in groups["all"]]
    real_train = len(corpus.profiled("train"))
    n_synthetic = min(round(args.ratio * real_train), len(read_profiles(synthetic)))
    kept = cut.cohort.events["user_id"].value_counts().reindex(groups["cold_sim"])
    figures = {"steps": args.steps, "ratio": args.ratio, "seeds": args.seeds, "cold_records": args.cold_records,
               "cohort": cohorts[-1].name, "real_train_users": real_train, "synthetic_train_users": n_synthetic,
               "users": {g: len(u) for g, u in groups.items()}, "cold_sim_mean_records_kept": float(kept.mean()),
               "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "runs": {}}
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for seed in args.seeds:
        for variant in VARIANTS:
            out = work / f"{variant}-seed{seed}"
            settings = {"steps": args.steps, "ratio": args.ratio if variant == "augmented" else 0.0, "seed": seed,
                        "users": groups["all"], "cold_records": args.cold_records, "max_new_tokens": args.max_new_tokens,
                        "synthetic": str(synthetic), "cohort": str(cohort_dir)}
            done = out / "scores.json"
            if done.exists() and json.loads(done.read_text())["settings"] == settings:
                record = json.loads(done.read_text())
            else:
                script, training, model_args = parse(cohort_dir, [
                    "--output_dir", str(out), "--max_steps", str(args.steps), "--seed", str(seed),
                    "--synthetic_cohort_dir", str(synthetic) if variant == "augmented" else "",
                    "--synthetic_ratio", str(settings["ratio"])])
                t0 = time.perf_counter()
                metrics = sft.main(script, training, model_args)
                train_s = time.perf_counter() - t0
                model, tokenizer = load_student(model_args.model_name_or_path, [str(out)]), load_tokenizer(str(out))
                t0 = time.perf_counter()
                _, scores, answers = evaluate_student(model, tokenizer, prompts, teachers,
                                                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
                record = {"settings": settings, "train_users": metrics["train_users"], "train_s": round(train_s, 1),
                          "eval_s": round(time.perf_counter() - t0, 1),
                          "users": {str(s.user_id): user_metrics(s) for s in scores},
                          "answers": {str(s.user_id): a for s, a in zip(scores, answers)}}
                write_json(done, record)
            runs[variant].append(record["users"])
            figures["runs"][f"{variant}-seed{seed}"] = {k: record[k] for k in ("train_users", "train_s", "eval_s")}
            print(f"{variant} seed {seed}: train {record['train_s']} s, eval {record['eval_s']} s", flush=True)
    figures["variants"] = {v: {g: {m: summarise(runs[v], users, m) for m in METRICS} for g, users in groups.items()}
                           for v in VARIANTS}
    deltas = [{u: {m: aug[u][m] - real[u][m] for m in METRICS} for u in aug}
              for aug, real in zip(runs["augmented"], runs["real_long"])]
    figures["delta"] = {g: {m: summarise(deltas, users, m) for m in METRICS} for g, users in groups.items()}
    figures["wall_s"] = round(time.perf_counter() - start, 1)
    figures.update({"threads": args.threads, "peak_rss_mb": round(peak_rss_mb()), "load_avg_1m": os.getloadavg()[0]})
    return emit("augmentation", figures)


if __name__ == "__main__":
    main()
