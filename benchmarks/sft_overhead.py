"""Overhead of recipes/sft.py over a minimal plain-TRL script: same model (SmolLM2-135M-Instruct),
same LoRA, same data (the grounded teacher's chat examples of the train users), same number of
steps, run alternately (recipe, plain, recipe, plain, ...) as fresh processes; wall time of each
whole process (imports, data, model load, training, saving) is compared by the median.
Target: ratio = recipe_s / plain_trl_s <= 1.10.

    python -m benchmarks.sft_overhead [--steps 10 --rounds 2 --max_length 1024 --work_dir /tmp/uscope-sft-bench]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import emit

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="registry name or model folder")
    parser.add_argument("--work_dir", default="/tmp/uscope-sft-bench")
    args = parser.parse_args()
    work = Path(args.work_dir)

    from scope.profiles.corpus import ProfileDataArguments, build_corpus
    from scope.profiles.llms import load_tokenizer, resolve_model
    from scope.profiles.sft import sft_dataset

    data_args = ProfileDataArguments(cohort_dir=str(work / "cohort"), teacher_cache_dir=str(work / "cache"))
    train = sft_dataset(build_corpus(data_args))
    data = work / "sft.jsonl"
    train.remove_columns("user_id").to_json(str(data))
    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(args.model)
    lengths = [min(len(tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=True)["input_ids"]), args.max_length)
               for r in train]
    tokens = statistics.mean(lengths) * args.steps

    recipe = [sys.executable, "recipes/sft.py", "--config", "recipes/configs/sft_cpu.yaml", "--model_name_or_path", args.model, "--cohort_dir", data_args.cohort_dir,
              "--teacher_cache_dir", data_args.teacher_cache_dir, "--max_steps", str(args.steps), "--max_length",
              str(args.max_length), "--eval_users", "0", "--save_strategy", "no", "--report_to", "none",
              "--logging_steps", "5", "--threads", str(args.threads), "--resume", "false"]
    times = {"recipe": [], "plain": []}
    for r in range(args.rounds):
        times["recipe"].append(timed(recipe + ["--output_dir", str(work / f"recipe-{r}")]))
        times["plain"].append(timed([sys.executable, "benchmarks/plain_trl_sft.py", str(data), model_dir,
                                     str(work / f"plain-{r}"), str(args.steps), str(args.max_length), str(args.threads)]))
        print(f"round {r}: recipe {times['recipe'][-1]:.1f} s, plain TRL {times['plain'][-1]:.1f} s", flush=True)
    recipe_s, plain_s = statistics.median(times["recipe"]), statistics.median(times["plain"])
    runtimes = [json.loads((work / f"recipe-{r}" / "metrics.json").read_text())["train_runtime"] for r in range(args.rounds)]
    return emit("sft_overhead", {
        "recipe_s": round(recipe_s, 2), "plain_trl_s": round(plain_s, 2), "ratio": round(recipe_s / plain_s, 3),
        "tokens_per_s": round(tokens / statistics.median(runtimes), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "model": args.model, "steps": args.steps, "rounds": args.rounds, "max_length": args.max_length, "threads": args.threads,
        "runs_s": {k: [round(t, 1) for t in v] for k, v in times.items()},
        "load_average_1m_at_end": round(__import__("os").getloadavg()[0], 2)})


if __name__ == "__main__":
    main()
