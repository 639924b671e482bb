"""RQ5: does mixing synthetic users into SFT help cold-start users? Two SFT runs of the CPU default
recipe (``recipes/sft.py``, same seed), without and with the synthetic cohort of
``benchmarks/synthesis.py`` (``synthetic_cohort_dir``, ``synthetic_ratio``). The augmented run gets
``steps * (real + synthetic) / real`` steps, so both students see each real user equally often; a
third run, ``real_long``, trains on the real users only for as many steps as the augmented one, to
separate the effect of the synthetic users from that of the longer training. Each student answers
(greedy, ``scope.profiles.evaluation``) for users never trained on:

- ``cold``: the cohort's own cold-start users (fewer than 50 records in the whole week);
- ``cold_sim``: held-out val + test users cut to their first ``--cold_records`` records (simulated
  cold start): the prompt is built from those records only, and the answer is scored against the
  user's *whole* week: ``grounding_apps@3`` / ``grounding_places@3`` are then the cold-start app
  and location recommendation accuracy (precision@3 against the user's real top 3), and
  ``field_agreement`` compares with the teacher's profile of the whole week;
- ``test``: held-out test users with their whole history.

    python -m benchmarks.synthesis                      # first: the real + synthetic cohorts
    python -m benchmarks.augmentation [--steps 40 --ratio 1.0 --cold_records 30 --cold_users 16]

Last stdout line: one JSON object, ``<variant>_<group>_<metric>`` for variant ``baseline`` /
``real_long`` / ``augmented``, plus ``<group>_<metric>_delta`` = augmented - real_long (same steps)
of ``grounding@3`` and ``schema_valid``.
"""

import argparse
import os
import time
from pathlib import Path

import torch

from benchmarks.common import emit, filtered_cohort

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("users", "schema_valid", "field_agreement", "grounding_apps@3", "grounding_places@3", "grounding@3")


def cold_start_cohort(cohort_dir: Path, out: Path, users: list[int], records: int) -> Path:
    """A copy of the cohort where ``users`` keep only their first ``records`` records."""
    return filtered_cohort(cohort_dir, out, lambda trace: ~trace[0].astype(int).isin(users)
                           | (trace.groupby(0).cumcount() < records))


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="SFT steps of the baseline (scaled for the augmented run)")
    parser.add_argument("--ratio", type=float, default=1.0, help="synthetic users per real training user")
    parser.add_argument("--synthesis_dir", default=str(ROOT / "runs" / "bench" / "synthesis"))
    parser.add_argument("--cohort_dir", default="", help="the real cohort (default: the synthesis benchmark's cohort-*)")
    parser.add_argument("--work_dir", default=str(ROOT / "runs" / "bench" / "augmentation"))
    parser.add_argument("--cold_records", type=int, default=30, help="records a simulated cold-start user keeps")
    parser.add_argument("--cold_users", type=int, default=16, help="held-out users cut to a cold start")
    parser.add_argument("--test_users", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from trl import ModelConfig, SFTConfig, TrlParser

    from recipes import sft
    from scope.profiles.corpus import build_corpus
    from scope.profiles.evaluation import generate_answers, score_answer, summarize
    from scope.profiles.llms import load_student, load_tokenizer
    from scope.synthesis.generation import read_profiles

    synthesis, work = Path(args.synthesis_dir), Path(args.work_dir)
    synthetic = synthesis / "stage" / "cohort"
    cohorts = sorted(synthesis.glob("cohort-*"))
    cohort_dir = Path(args.cohort_dir) if args.cohort_dir else (cohorts[-1] if cohorts else None)
    if not (synthetic / "profiles.jsonl").exists() or cohort_dir is None:
        raise SystemExit(f"no synthetic cohort in {synthetic}: run `python -m benchmarks.synthesis` first")

    def parse(extra: list[str]):
        argv = ["--config", str(ROOT / "recipes" / "configs" / "sft_cpu.yaml"), "--cohort_dir", str(cohort_dir),
                "--teacher_cache_dir", str(synthesis / "teacher_cache"), "--save_strategy", "no", "--report_to", "none",
                "--resume", "false", "--eval_users", "0", "--threads", str(args.threads), *extra]
        return TrlParser((sft.SFTScriptArguments, SFTConfig, ModelConfig)).parse_args_and_config(args=argv)

    corpus = build_corpus(parse([])[0])
    held_out = (corpus.profiled("val") + corpus.profiled("test"))[:args.cold_users]
    cold_script = parse(["--cohort_dir", str(cold_start_cohort(cohort_dir, work / "cold-start-cohort", held_out,
                                                                  args.cold_records))])[0]
    cut = build_corpus(cold_script)
    # held-out groups: cold_sim prompts come from the cut cohort, every score from the whole week
    groups = {"cold": corpus.profiled("cold"), "cold_sim": [u for u in held_out if u in cut.prompts],
              "test": corpus.profiled("test")[:args.test_users]}
    prompt_of = {"cold": corpus.prompts, "cold_sim": cut.prompts, "test": corpus.prompts}
    real_train = len(corpus.profiled("train"))
    kept = cut.cohort.events["user_id"].value_counts().reindex(groups["cold_sim"])
    figures = {"steps": args.steps, "ratio": args.ratio, "cold_records": args.cold_records, "cohort": cohort_dir.name,
               "cold_sim_mean_records_kept": float(kept.mean())}
    start = time.perf_counter()
    n_synthetic = min(round(args.ratio * real_train), len(read_profiles(synthetic)))
    long_steps = round(args.steps * (real_train + n_synthetic) / real_train)
    for variant, ratio, steps in (("baseline", 0.0, args.steps), ("real_long", 0.0, long_steps),
                                  ("augmented", args.ratio, long_steps)):
        out = work / variant
        script, training, model_args = parse(["--output_dir", str(out), "--max_steps", str(steps),
                                              "--synthetic_cohort_dir", str(synthetic) if ratio > 0 else "",
                                              "--synthetic_ratio", str(ratio)])
        t0 = time.perf_counter()
        metrics = sft.main(script, training, model_args)
        figures.update({f"{variant}_train_users": metrics["train_users"], f"{variant}_steps": steps,
                        f"{variant}_train_s": round(time.perf_counter() - t0, 1)})
        model, tokenizer = load_student(model_args.model_name_or_path, [str(out)]), load_tokenizer(str(out))
        for group, users in groups.items():
            if not users:
                continue
            prompts = [prompt_of[group][u] for u in users]
            answers = generate_answers(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=8)
            scores = [score_answer(u, a, corpus.results[u].profile, corpus.prompts[u].stats) for u, a in zip(users, answers)]
            summary = summarize(scores)
            figures.update({f"{variant}_{group}_{k}": summary[k] for k in METRICS})
    for group in groups:
        for key in ("grounding@3", "schema_valid"):
            if f"baseline_{group}_{key}" in figures:
                figures[f"{group}_{key}_delta"] = figures[f"augmented_{group}_{key}"] - figures[f"real_long_{group}_{key}"]
    figures["wall_s"] = round(time.perf_counter() - start, 1)
    figures.update({"threads": args.threads, "load_avg_1m": os.getloadavg()[0]})
    return emit("augmentation", figures)


if __name__ == "__main__":
    main()
