"""U-SCOPE measured on enough held-out users to trust: the profile student (unconstrained and
constrained decoding), novelty recommendation against its baselines (paper section 7.5, Fig. 6),
and what DPO with on-policy negatives changes.

    python -m benchmarks.uscope_eval                      # ~1 h on 2 idle cores
    python -m benchmarks.uscope_eval --quick              # smoke run: tiny sizes, numbers mean nothing

One simulated cohort (``--users`` x ``--days``); the demo's recipes and YAMLs
(``recipes/configs/demo_{sft,dpo,evaluate,novelty}.yaml``) run on it with the sizes below, one after
another: SFT (profiles + the teacher's recommendations), DPO (``--dpo_samples`` recommendations the SFT
student samples per training case, ranked against the hidden part: its worst as ``y_l``, its best, or else
the teacher's, as ``y_w``), then ``recipes/novelty.py`` and ``recipes/evaluate.py`` on the
first ``--eval_users`` held-out (val + test) users. A finished step is reused with ``--keep``.

Last stdout line (and ``benchmarks/results/uscope_eval.json``): ``novelty`` ({method: {apps_hit@3,
places_hit@3, intents_hit@3, mean}}, each ``{"mean", "ci95"}``), ``dpo_changed_share``,
``after_sft`` / ``after_dpo`` ({grounding@3, field_agreement, schema_valid_unconstrained,
schema_valid_constrained}, with CIs), ``dpo_effect`` (paired after-DPO minus after-SFT
differences with CIs), throughput and sizes.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import emit

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"


def run(step: str, argv: list[str], done: Path, keep: bool) -> float:
    """Run one recipe (unless ``keep`` and its output exists); its wall time in seconds."""
    if keep and done.exists():
        print(f"[{step}] kept {done}", flush=True)
        return 0.0
    start = time.perf_counter()
    print(f"[{step}] {' '.join(argv)}", flush=True)
    subprocess.run([sys.executable, *argv], cwd=ROOT, check=True)
    return round(time.perf_counter() - start, 1)


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=400, help="simulated users (80/10/10 split: ~80 held out)")
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval_users", type=int, default=60)
    parser.add_argument("--sft_steps", type=int, default=80)
    parser.add_argument("--dpo_steps", type=int, default=48)
    parser.add_argument("--dpo_cases", type=int, default=48, help="training cases the SFT student samples for DPO")
    parser.add_argument("--dpo_samples", type=int, default=4, help="answers sampled per case (ranked into pairs)")
    parser.add_argument("--batch_size", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work_dir", default=str(ROOT / "runs" / "bench" / "uscope_eval"))
    parser.add_argument("--keep", action="store_true", help="reuse finished steps in work_dir")
    parser.add_argument("--stages", nargs="+", default=["before SFT", "after SFT", "after DPO"],
                        help="student stages evaluated (before SFT only shows the base model cannot answer: 0 valid)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.users, args.days, args.eval_users, args.sft_steps, args.dpo_steps, args.dpo_cases = 40, 4, 4, 2, 1, 4

    from scope.data.simulate import CohortConfig, simulate_cohort
    from scope.data.tsinghua import TRACE_FILE

    work = Path(args.work_dir)
    cohort = work / "cohort"
    if not (cohort / TRACE_FILE).exists():
        simulate_cohort(CohortConfig(n_users=args.users, days=args.days, seed=args.seed), cohort)
    data = ["--cohort_dir", str(cohort), "--teacher_cache_dir", str(work / "teacher_cache"), "--threads", str(args.threads)]
    d = {name: work / name for name in ("sft", "dpo", "evaluation", "novelty")}
    seconds = {
        "sft": run("sft", ["recipes/sft.py", "--config", str(CONFIGS / "demo_sft.yaml"), *data, "--output_dir", str(d["sft"]),
                           "--max_steps", str(args.sft_steps), "--save_steps", str(max(args.sft_steps // 2, 1)),
                           "--eval_users", "0", "--report_to", "none"],
                   d["sft"] / "adapter_model.safetensors", args.keep),
        "dpo": run("dpo", ["recipes/dpo.py", "--config", str(CONFIGS / "demo_dpo.yaml"), *data, "--sft_adapter", str(d["sft"]),
                           "--output_dir", str(d["dpo"]), "--max_steps", str(args.dpo_steps),
                           "--save_steps", str(max(args.dpo_steps // 2, 1)), "--student_negative_cases", str(args.dpo_cases),
                           "--student_samples", str(args.dpo_samples),
                           "--eval_users", "0", "--report_to", "none"],
                   d["dpo"] / "adapter_model.safetensors", args.keep),
    }
    held_out = ["--sft_adapter", str(d["sft"]), "--dpo_adapter", str(d["dpo"]), "--max_users", str(args.eval_users),
                "--batch_size", str(args.batch_size), "--stages", *args.stages]
    constrained = ["--constrained_stages", "after SFT", "after DPO"]   # the base model forced into the schema says little
    seconds["novelty"] = run("novelty", ["recipes/novelty.py", "--config", str(CONFIGS / "demo_novelty.yaml"), *data,
                                         *held_out, "--output_dir", str(d["novelty"])],
                             d["novelty"] / "novelty.json", args.keep)
    seconds["evaluate"] = run("evaluate", ["recipes/evaluate.py", "--config", str(CONFIGS / "demo_evaluate.yaml"), *data,
                                           *held_out, *constrained, "--output_dir", str(d["evaluation"])],
                              d["evaluation"] / "evaluation.json", args.keep)

    ev = json.loads((d["evaluation"] / "evaluation.json").read_text())
    nov = json.loads((d["novelty"] / "novelty.json").read_text())
    dpo = json.loads((d["dpo"] / "metrics.json").read_text())
    pick = lambda m: {"mean": m["mean"], "ci95": m["ci95"]}

    def student(stage: str) -> dict:
        """The stage's figures (constrained ones only where that stage was decoded constrained)."""
        if stage not in ev["stages"]:
            return None
        row, out = ev["stages"][stage], {}
        if "unconstrained" in row:
            out.update({"grounding@3": pick(row["unconstrained"]["grounding@3"]),
                        "field_agreement": pick(row["unconstrained"]["field_agreement"]),
                        "schema_valid_unconstrained": pick(row["unconstrained"]["schema_valid"])})
        if "constrained" in row:
            out.update({"schema_valid_constrained": pick(row["constrained"]["schema_valid"]),
                        "grounding@3_constrained": pick(row["constrained"]["grounding@3"])})
        decoded = [d for d in ev["decodings"] if d in row]
        return {**out, "cut_off": {d: row[d]["cut_off"] for d in decoded},
                "users_per_s": {d: row[d]["users_per_s"] for d in decoded}}

    result = {
        "users": ev["stages"]["after SFT"]["users"], "novelty_cases": nov["cases"], "novelty_excluded": nov["excluded"],
        "novelty": {name: {**{f"{t}_hit@3": pick(m[f"{t}_hit@3"]) for t in ("apps", "places", "intents")},
                           "mean": pick(m["mean_hit@3"]), "valid": m["valid"]}
                    for name, m in nov["methods"].items()},
        "dpo_changed_share": {**{f"profiles_{d}": e["changed_share"] for d, e in ev["dpo_effect"].items()},
                              "recommendations": nov.get("dpo_effect", {}).get("changed_share")},
        "after_sft": student("after SFT"), "after_dpo": student("after DPO"), "before_sft": student("before SFT"),
        "dpo_effect": {"grounding@3": ev["dpo_effect"]["unconstrained"]["grounding@3"],
                       "novelty_mean_hit@3": nov.get("dpo_effect", {}).get("mean_hit@3")},
        "dpo_pairs": dpo.get("pairs_by_kind"), "dpo_train_reward_accuracy": dpo.get("train_reward_accuracy"),
        "novelty_cases_per_s": nov["cases_per_s"], "seconds": seconds,
        "settings": {k: v for k, v in vars(args).items() if k not in ("work_dir", "keep")},
    }
    return emit("uscope_eval_quick" if args.quick else "uscope_eval", result)


if __name__ == "__main__":
    main()
