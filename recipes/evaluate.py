"""Student evaluation table on held-out users: before SFT / after SFT / after DPO.

    python recipes/evaluate.py                            # CPU default: recipes/configs/evaluate.yaml

Each stage is the base model with a list of adapters (none; SFT; SFT then DPO); metrics are in
scope/profiles/evaluation.py. Every stage answers twice, greedily: unconstrained (what the student
learnt) and constrained to the profile schema (what a user gets); each metric carries a bootstrap
95% CI over users, and the throughput (users/s) of both decodings is logged. Each (stage, decoding)
pass saves its answers as it ends; a rerun with the same settings reuses them (resume). With both the SFT and
the DPO stage, ``dpo_effect`` holds the share of answers DPO changed and the paired after-DPO minus
after-SFT difference of grounding@3 and field agreement, with CIs. The teacher's profiles are scored
the same way (``teacher_scores``), and ``vs_teacher`` holds the final student (unconstrained when decoded
so) minus the teacher, paired per user, for schema_valid and grounding@3. Writes ``evaluation.md`` (the
tables), ``evaluation.json`` and each stage's answers under ``output_dir``.
"""

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from scope.cli import parse_config, run_recipe, use_threads
from scope.io import write_json, write_text
from scope.profiles.corpus import build_corpus
from scope.profiles.evaluation import (HeldOutArguments, changed_share, evaluation_table, generate, paired_difference,
                                       previous_pass, score_answer, stage_adapters, summarize_with_ci)
from scope.profiles.llms import generation_model, load_student, load_tokenizer
from scope.profiles.schema import generation_schema
from scope.profiles.sft import set_stop_token

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "evaluate.yaml"
DECODINGS = ("unconstrained", "constrained")
log = logging.getLogger("recipes.evaluate")


@dataclass
class EvaluateArguments(HeldOutArguments):
    max_new_tokens: int = 512
    decodings: list[str] = field(default_factory=lambda: list(DECODINGS))
    constrained_max_chars: int = 400      # cap of every free string under constrained decoding
    constrained_stages: list[str] | None = None   # stages also decoded constrained (null: every stage)


def main(args: EvaluateArguments) -> dict:
    use_threads(args.threads, True)
    unknown = sorted(set(args.decodings) - set(DECODINGS))
    if unknown or not args.decodings:
        raise ValueError(f"decodings {args.decodings}: expected some of {list(DECODINGS)}")
    adapters = stage_adapters(args.stages, args.sft_adapter, args.dpo_adapter)
    corpus = build_corpus(args, report_dir=args.output_dir)
    users = corpus.profiled(*args.eval_splits)[: args.max_users]
    if not users:
        raise ValueError(f"no held-out users in splits {args.eval_splits}")
    prompts = [corpus.prompts[u] for u in users]
    teacher = [corpus.results[u].profile for u in users]
    schema = generation_schema(corpus.cohort.categories, corpus.clusters.names, args.constrained_max_chars)
    tokenizer = load_tokenizer(args.model_name_or_path)
    out = Path(args.output_dir)
    constrained_stages = set(args.stages if args.constrained_stages is None else args.constrained_stages)
    rows, scores, answers = {}, {}, {}
    for stage, stage_adapter_list in adapters.items():
        model = None
        rows[stage] = {"users": len(users), "user_ids": users}
        for decoding in args.decodings:
            if decoding == "constrained" and stage not in constrained_stages:
                continue
            path = out / f"answers_{stage.replace(' ', '_').lower()}_{decoding}.jsonl"
            fingerprint = {"users": users, "adapters": stage_adapter_list, "model": args.model_name_or_path,
                           "max_new_tokens": args.max_new_tokens,
                           "inference_dtype": args.inference_dtype, "schema": schema if decoding == "constrained" else None}
            done = previous_pass(path, fingerprint)
            if done is None:
                if model is None:
                    model = generation_model(load_student(args.model_name_or_path, stage_adapter_list),
                                             args.inference_dtype)
                    set_stop_token(model, tokenizer)
                start = time.perf_counter()
                generations = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                       batch_size=args.batch_size, schema=schema if decoding == "constrained" else None)
                done = {"seconds": time.perf_counter() - start,
                        "rows": [{"user_id": u, "cut_off": g.cut_off, "answer": g.text} for u, g in zip(users, generations)]}
                write_json(path.with_suffix(".json"), {"fingerprint": fingerprint, **done})
            else:
                log.info("%s, %s: answers reused from %s", stage, decoding, path.with_suffix(".json"))
            answers[stage, decoding] = [r["answer"] for r in done["rows"]]
            scores[stage, decoding] = [score_answer(p.user_id, r["answer"], t, p.stats, r["cut_off"])
                                       for p, r, t in zip(prompts, done["rows"], teacher)]
            rows[stage][decoding] = {**summarize_with_ci(scores[stage, decoding]), "seconds": round(done["seconds"], 1),
                                     "users_per_s": round(len(users) / done["seconds"], 3)}
            write_text(path, "".join(json.dumps({"user_id": s.user_id, "valid": s.schema_valid, "cut_off": s.cut_off,
                                                 "error": s.error, "answer": a}) + "\n"
                                     for s, a in zip(scores[stage, decoding], answers[stage, decoding])))
            log.info("%s, %s: %s", stage, decoding, rows[stage][decoding])
    result = {"stages": rows, "decodings": list(args.decodings), "teacher": corpus.teacher_name}
    # the teacher's own profiles scored the same way, and the final student against them (paired, per user)
    teacher_scores = [score_answer(p.user_id, t.to_json(), t, p.stats) for p, t in zip(prompts, teacher)]
    result["teacher_scores"] = summarize_with_ci(teacher_scores)
    final = list(adapters)[-1]
    final_decoding = next((d for d in DECODINGS if (final, d) in scores), None)
    if final_decoding:
        result["vs_teacher"] = {"stage": final, "decoding": final_decoding, **{
            metric: paired_difference(teacher_scores, scores[final, final_decoding], metric)
            for metric in ("schema_valid", "grounding@3")}}
    both = [d for d in args.decodings if ("after SFT", d) in answers and ("after DPO", d) in answers]
    if both:
        result["dpo_effect"] = {decoding: {
            "changed_share": changed_share(answers["after SFT", decoding], answers["after DPO", decoding]),
            **{metric: paired_difference(scores["after SFT", decoding], scores["after DPO", decoding], metric)
               for metric in ("grounding@3", "field_agreement", "schema_valid")}} for decoding in both}
    tables = "\n\n".join(f"**{decoding} decoding** (mean [bootstrap 95% CI]; users/s: "
                         + ", ".join(f"{s} {r[decoding]['users_per_s']}" for s, r in rows.items() if decoding in r) + ")\n\n"
                         + evaluation_table({s: {"users": r["users"], **r[decoding]} for s, r in rows.items() if decoding in r})
                         for decoding in args.decodings)
    write_text(out / "evaluation.md", f"Held-out users: {len(users)} ({', '.join(args.eval_splits)} splits), teacher "
                                      f"{corpus.teacher_name}, greedy decoding, max {args.max_new_tokens} new tokens.\n\n{tables}\n")
    write_json(out / "evaluation.json", result)
    print(tables)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(run_recipe(main, *parse_config((EvaluateArguments,), default_config=DEFAULT_CONFIG)))
