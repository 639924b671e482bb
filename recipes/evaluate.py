"""Student evaluation table on held-out users: before SFT / after SFT / after DPO.

    python recipes/evaluate.py                            # CPU default: recipes/configs/evaluate.yaml

Each stage is the base model with a list of adapters (none; SFT; SFT then DPO); metrics are in
scope/profiles/evaluation.py. Writes ``evaluation.md`` (the table), ``evaluation.json`` and each stage's
raw answers under ``output_dir``.
"""

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from scope.cli import parse_config, run_recipe, use_threads
from scope.io import write_json, write_text
from scope.profiles.corpus import ProfileDataArguments, build_corpus
from scope.profiles.evaluation import evaluate_student, evaluation_table
from scope.profiles.llms import load_student, load_tokenizer
from scope.profiles.sft import set_stop_token

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "evaluate.yaml"
log = logging.getLogger("recipes.evaluate")


@dataclass
class EvaluateArguments(ProfileDataArguments):
    output_dir: str = "runs/uscope/evaluation"
    model_name_or_path: str = "smollm2-135m-instruct"
    sft_adapter: str = "runs/uscope/sft"
    dpo_adapter: str = "runs/uscope/dpo"
    eval_splits: list[str] = field(default_factory=lambda: ["val", "test"])
    max_users: int = 8
    max_new_tokens: int = 512
    batch_size: int = 4
    stages: list[str] = field(default_factory=lambda: ["before SFT", "after SFT", "after DPO"])
    threads: int = 0


def main(args: EvaluateArguments) -> dict:
    use_threads(args.threads, True)
    corpus = build_corpus(args, report_dir=args.output_dir)
    users = corpus.profiled(*args.eval_splits)[: args.max_users]
    if not users:
        raise ValueError(f"no held-out users in splits {args.eval_splits}")
    prompts = [corpus.prompts[u] for u in users]
    teacher = [corpus.results[u].profile for u in users]
    known = {"before SFT": [], "after SFT": [args.sft_adapter], "after DPO": [args.sft_adapter, args.dpo_adapter]}
    unknown = [s for s in args.stages if s not in known]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; expected some of {list(known)}")
    tokenizer = load_tokenizer(args.model_name_or_path)
    out = Path(args.output_dir)
    previous = json.loads((out / "evaluation.json").read_text()) if (out / "evaluation.json").exists() else {}
    rows = {s: r for s, r in previous.items() if s in known and r.get("user_ids") == users}  # same users: keep
    for stage in args.stages:
        adapters = known[stage]
        start = time.perf_counter()
        model = load_student(args.model_name_or_path, adapters)
        set_stop_token(model, tokenizer)
        summary, scores, answers = evaluate_student(model, tokenizer, prompts, teacher,
                                                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        rows[stage] = {**summary, "seconds": round(time.perf_counter() - start, 1), "user_ids": users}
        write_text(out / f"answers_{stage.replace(' ', '_').lower()}.jsonl",
                   "".join(json.dumps({"user_id": s.user_id, "valid": s.schema_valid, "error": s.error, "answer": a}) + "\n"
                           for s, a in zip(scores, answers)))
        log.info("%s: %s", stage, rows[stage])
    if (out / "evaluation.json").exists():  # rows another run wrote meanwhile (same users) are kept
        latest = json.loads((out / "evaluation.json").read_text())
        rows = {**{s: r for s, r in latest.items() if s in known and r.get("user_ids") == users}, **rows}
    rows = {s: rows[s] for s in known if s in rows}
    table = evaluation_table(rows)
    write_text(out / "evaluation.md", f"Held-out users: {len(users)} ({', '.join(args.eval_splits)} splits), "
                                      f"teacher {corpus.teacher_name}, greedy decoding, max {args.max_new_tokens} new tokens.\n\n{table}\n")
    write_json(out / "evaluation.json", rows)
    print(table)
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(run_recipe(main, *parse_config((EvaluateArguments,), default_config=DEFAULT_CONFIG)))
