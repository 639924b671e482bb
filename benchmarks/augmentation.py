"""RQ5: does mixing synthetic users into SFT help cold-start users? Two short SFT runs of the CPU
default recipe (``recipes/sft.py``, same steps and seed), without and with the synthetic cohort of
``benchmarks/synthesis.py`` (``synthetic_cohort_dir``, ``synthetic_ratio``), each student scored by
``scope.evaluation.evaluate_student`` on users never trained on:

- ``cold``: users with very few records (the corpus's ``cold`` split);
- ``test``: the held-out test users.

Per group: ``grounding@3`` and its parts ``grounding_apps@3`` / ``grounding_places@3`` (precision@3
of the profile's top app categories / place areas against the user's real top 3: the cold-start
app and location recommendation accuracy), ``schema_valid`` and ``field_agreement``.

    python -m benchmarks.synthesis                      # first: the real + synthetic cohorts
    python -m benchmarks.augmentation [--steps 20 --ratio 1.0 --threads 2]
"""

import argparse
import os
import time
from pathlib import Path

import torch

from benchmarks.common import emit

ROOT = Path(__file__).resolve().parents[1]


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ratio", type=float, default=1.0, help="synthetic users per real training user")
    parser.add_argument("--synthesis_dir", default=str(ROOT / "runs" / "bench" / "synthesis"))
    parser.add_argument("--work_dir", default=str(ROOT / "runs" / "bench" / "augmentation"))
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--groups", nargs="+", default=["cold", "test"], help="held-out user groups to score")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from trl import ModelConfig, SFTConfig, TrlParser

    from recipes import sft
    from scope.corpus import build_corpus
    from scope.evaluation import evaluate_student
    from scope.models import load_student, load_tokenizer

    synthesis = Path(args.synthesis_dir)
    synthetic = synthesis / "stage" / "cohort"
    if not (synthetic / "profiles.jsonl").exists():
        raise SystemExit(f"no synthetic cohort in {synthetic}: run `python -m benchmarks.synthesis` first")
    figures, start = {"steps": args.steps, "ratio": args.ratio}, time.perf_counter()
    for variant, ratio in (("baseline", 0.0), ("augmented", args.ratio)):
        out = Path(args.work_dir) / variant
        argv = ["--config", str(ROOT / "recipes" / "configs" / "sft_cpu.yaml"),
                "--cohort_dir", str(synthesis / "cohort"), "--teacher_cache_dir", str(synthesis / "teacher_cache"),
                "--output_dir", str(out), "--max_steps", str(args.steps), "--save_strategy", "no", "--report_to", "none",
                "--resume", "false", "--eval_users", "0", "--cpu_threads", str(args.threads),
                "--synthetic_cohort_dir", str(synthetic) if ratio > 0 else "", "--synthetic_ratio", str(ratio)]
        script, training, model_args = TrlParser((sft.SFTScriptArguments, SFTConfig, ModelConfig)).parse_args_and_config(args=argv)
        t0 = time.perf_counter()
        metrics = sft.main(script, training, model_args)
        figures[f"{variant}_train_users"] = metrics["train_users"]
        figures[f"{variant}_train_s"] = round(time.perf_counter() - t0, 1)
        corpus = build_corpus(script)
        model = load_student(model_args.model_name_or_path, [str(out)])
        tokenizer = load_tokenizer(str(out))
        for group in args.groups:
            users = corpus.profiled(group)
            if not users:
                continue
            summary, _, _ = evaluate_student(model, tokenizer, [corpus.prompts[u] for u in users],
                                             [corpus.results[u].profile for u in users], max_new_tokens=args.max_new_tokens)
            for key in ("users", "schema_valid", "field_agreement", "grounding_apps@3", "grounding_places@3", "grounding@3"):
                figures[f"{variant}_{group}_{key}"] = summary[key]
    figures["wall_s"] = round(time.perf_counter() - start, 1)
    figures.update({"threads": args.threads, "load_avg_1m": os.getloadavg()[0]})
    return emit("augmentation", figures)


if __name__ == "__main__":
    main()
