"""Cold-start / novelty recommendation on held-out users (U-SCOPE section 7.5, Fig. 6).

    python recipes/novelty.py                             # CPU default: recipes/configs/novelty.yaml

For each held-out user and each cut of its history (:mod:`scope.profiles.novelty`), every method
recommends up to 3 app categories, places and intents the user has not used in the visible part;
hit@k and recall@k (k = 1, 3) are scored against what the user took up in the hidden part. The
methods, on the same cases: popularity among the training users, item-kNN by raw statistics and by
``h_u`` (Sentence-BERT of the grounded profile, Eq. 24), the grounded teacher, and the student
before SFT, after SFT and after DPO (decoding constrained to the candidate names by default:
what a user gets). Writes ``novelty.json`` (means, 95% CIs by a bootstrap over users, excluded cases, unknown
names, the after-DPO minus after-SFT paired difference, and ``vs_baselines``: the final student minus
each of popularity and the kNNs, paired), ``novelty.md`` and the answers; a
rerun with the same settings reuses each stage's saved answers (resume).
"""

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from scope.cli import parse_config, run_recipe, use_threads
from scope.io import write_json, write_text
from scope.profiles.corpus import build_corpus
from scope.profiles.evaluation import HeldOutArguments, changed_share, generate, previous_pass, stage_adapters
from scope.profiles.llms import EMBEDDER, generation_model, load_embedder, load_student, load_tokenizer
from scope.profiles.novelty import (CI_METHOD, ITEM_TYPES, NoveltyTask, novelty_summary, paired_difference,
                                    recommendation_schema, score_answer)
from scope.profiles.prompts import PromptBuilder
from scope.profiles.sft import set_stop_token

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "novelty.yaml"
log = logging.getLogger("recipes.novelty")
BASELINES = ("popularity", "kNN (statistics)", "kNN (profile encoding)")   # the recommenders the student should beat


@dataclass
class NoveltyArguments(HeldOutArguments):
    output_dir: str = "runs/uscope/novelty"
    constrained: bool = True          # decode the student's answer constrained to the candidate names
    encoder: str = EMBEDDER           # Sentence-BERT of the kNN-by-h_u baseline ("" = leave that baseline out)


def table(methods: dict[str, dict]) -> str:
    cols = [f"{t}_hit@{k}" for t in ITEM_TYPES for k in (1, 3)] + ["mean_hit@3"]
    lines = ["| method | cases | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for name, m in methods.items():
        cells = [f"{m[c]['mean']:.3f} [{m[c]['ci95'][0]:.2f}, {m[c]['ci95'][1]:.2f}]" for c in cols]
        lines.append(f"| {name} | {m['cases']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args: NoveltyArguments) -> dict:
    use_threads(args.threads, True)
    adapters = stage_adapters(args.stages, args.sft_adapter, args.dpo_adapter)
    corpus = build_corpus(args, report_dir=args.output_dir)
    users = corpus.profiled(*args.eval_splits)[: args.max_users]
    if not users:
        raise ValueError(f"no held-out users in splits {args.eval_splits}")
    task = NoveltyTask.build(corpus, args, users, args.train_splits)
    if not task.cases:
        raise ValueError(f"none of the {len(users)} held-out users has anything new in the hidden part "
                         f"(excluded: {task.excluded})")
    encoder = None
    if args.encoder:
        from scope.profiles.embedding import ProfileEncoder

        encoder = ProfileEncoder(load_embedder(args.encoder))
    scores = task.baselines(corpus, encoder)
    builder, out = PromptBuilder(), Path(args.output_dir)
    prompts = task.prompts(builder)
    schema = recommendation_schema(task.vocabulary) if args.constrained else None
    tokenizer, answers, speed = load_tokenizer(args.model_name_or_path), {}, {}
    for stage, stage_adapter_list in adapters.items():
        path = out / f"answers_{stage.replace(' ', '_').lower()}.jsonl"
        fingerprint = {"cases": [c.key for c in task.cases], "adapters": stage_adapter_list,
                       "model": args.model_name_or_path, "max_new_tokens": args.recommend_max_new_tokens, "schema": schema,
                       "inference_dtype": args.inference_dtype}
        done = previous_pass(path, fingerprint)
        if done is None:
            model = generation_model(load_student(args.model_name_or_path, stage_adapter_list), args.inference_dtype)
            set_stop_token(model, tokenizer)
            start = time.perf_counter()
            generations = generate(model, tokenizer, prompts, max_new_tokens=args.recommend_max_new_tokens,
                                   batch_size=args.batch_size, schema=schema)
            done = {"seconds": time.perf_counter() - start,
                    "rows": [{"case": c.key, "cut_off": g.cut_off, "answer": g.text} for c, g in zip(task.cases, generations)]}
            write_json(path.with_suffix(".json"), {"fingerprint": fingerprint, **done})
        speed[stage] = round(len(prompts) / done["seconds"], 3)
        answers[stage] = [r["answer"] for r in done["rows"]]
        name = f"student {stage}"
        scores[name] = [score_answer(c, r["answer"], task.vocabulary, r["cut_off"]) for c, r in zip(task.cases, done["rows"])]
        write_text(path, "".join(json.dumps({"case": s.key, "valid": s.valid, "cut_off": s.cut_off, "error": s.error,
                                             "unknown": s.unknown, "answer": a}) + "\n"
                                 for s, a in zip(scores[name], answers[stage])))
        log.info("%s: %.2f cases/s", stage, speed[stage])
    methods = {name: novelty_summary(s) for name, s in scores.items()}
    result = {"users": len(users), "cases": len(task.cases), "cuts": list(args.cuts), "excluded": task.excluded,
              "train_cases": len(task.train_cases), "decoding": "constrained" if args.constrained else "unconstrained",
              "cases_per_s": speed, "ci95_method": CI_METHOD, "methods": methods}
    if "after SFT" in answers and "after DPO" in answers:
        result["dpo_effect"] = {"changed_share": changed_share(answers["after SFT"], answers["after DPO"]),
                                "mean_hit@3": paired_difference(scores["student after SFT"], scores["student after DPO"])}
    student = f"student {list(adapters)[-1]}"   # the final student against each baseline, paired on the same cases
    result["vs_baselines"] = {"student": student, "mean_hit@3": {
        name: paired_difference(scores[name], scores[student]) for name in BASELINES if name in scores}}
    text = table(methods)
    write_text(out / "novelty.md", f"Novelty recommendation: {len(task.cases)} cases of {len(users)} held-out users "
                                   f"(cuts {', '.join(args.cuts)}; excluded {task.excluded}); "
                                   f"mean over cases [95% CI, {CI_METHOD}].\n\n{text}\n")
    write_json(out / "novelty.json", result)
    print(text)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(run_recipe(main, *parse_config((NoveltyArguments,), default_config=DEFAULT_CONFIG)))
