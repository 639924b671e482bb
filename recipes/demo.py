"""The main job: every stage of the toolchain on the embedded default, under one run folder, then a report.

    python recipes/demo.py --config recipes/configs/demo.yaml            # = make demo
    python recipes/demo.py --config recipes/configs/demo.yaml --only dpo    # rerun one stage
    python recipes/demo.py --config recipes/configs/demo.yaml --from completion   # rerun from a stage on
    python recipes/demo.py --config recipes/configs/demo.yaml --force true  # rerun everything
    python recipes/demo.py --config recipes/configs/demo.yaml --until summary   # the data stages only (~30 s)
    python recipes/demo.py --config recipes/configs/demo.yaml --list_stages true   # print the stages and their commands

cohort -> tensors -> summary -> sft -> dpo -> evaluate -> novelty -> synthesis -> embed -> completion -> compare
-> pituning -> lightgbm -> report. Each stage is a subprocess running its own recipe with its own
YAML (recipes/configs/demo_*.yaml), writes under ``<output_dir>/<stage>/`` and records what it
consumed in ``stage.json``; an up-to-date stage is skipped, so an interrupted run resumes where
it stopped (scope/run/pipeline.py). ``jobs`` stages that do not wait for each other run at once,
each on its share of the cores; a finished stage's results are checked against their floors
(scope/run/floors.py). The report is ``<output_dir>/report/index.html``; the measured stage
times are in ``<output_dir>/timings.json``.
"""

import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from scope.cli import parse_config
from scope.io import write_json
from scope.profiles.llms import native_bf16_cpu
from scope.run.floors import floor_violations
from scope.run.pipeline import PipelineError, Stage, run_pipeline
from scope.run.stages import STAGES, stage_folder, stage_output

ROOT = Path(__file__).resolve().parents[1]
# The chain that bounds the main job's wall time (the student's training and evaluation): with several
# jobs, the other stages run at a lower priority beside it.
CRITICAL_PATH = ("cohort", "sft", "dpo", "evaluate", "novelty", "report")
# glibc keeps freed blocks up to 32 MB in its heap instead of unmapping them: the stages allocate and free tensors of
# a few MB every step (KV caches, activations), and each fresh mapping costs page faults. Measured on a demo SFT
# step: 10-15% less wall time and a third less system time (benchmarks/README.md#the-main-job-measured).
GLIBC_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
                "MALLOC_TOP_PAD_": str(256 << 20)}


@dataclass
class DemoArguments:
    output_dir: str = "runs/demo"
    cohort_dir: str | None = None     # your Tsinghua-format folder (read in place, never written); null: simulate
    lenient: bool = False             # skip bad trace rows (counted in tensors/load_report.json) instead of stopping
    # the simulated cohort (embedded default)
    n_users: int = 200
    days: int = 7
    seed: int = 0
    jobs: int = 2                     # stages run at once (those that do not wait for each other)
    threads: int = 0                  # torch threads per stage (0 = each recipe's own default)
    # the teacher every profiling stage uses (scope.profiles.corpus.make_teacher)
    teacher: str = "grounded"         # grounded | local | endpoint
    teacher_model: str = ""           # local: registry name or path; endpoint: the served model's name
    teacher_base_url: str = ""        # endpoint: an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1
    # the LM stages' arithmetic: bfloat16 = bf16 autocast in training (sft, dpo, synthesis) and bf16 weights with fp32
    # attention in generation (scope.profiles.llms.generation_model); auto = bfloat16 on a CPU with native bf16
    # (AVX512-BF16 / AMX), float32 elsewhere (emulated bf16 is slower than float32)
    precision: str = "auto"           # auto | float32 | bfloat16
    # one YAML per stage (paths relative to the repository root)
    cohort_config: str = "recipes/configs/cohort.yaml"
    tensorize_config: str = "recipes/configs/tensorize.yaml"
    sft_config: str = "recipes/configs/demo_sft.yaml"
    dpo_config: str = "recipes/configs/demo_dpo.yaml"
    evaluate_config: str = "recipes/configs/demo_evaluate.yaml"
    novelty_config: str = "recipes/configs/demo_novelty.yaml"
    synthesize_config: str = "recipes/configs/demo_synthesize.yaml"
    embed_config: str = "recipes/configs/demo_embed.yaml"
    complete_config: str = "recipes/configs/demo_complete.yaml"
    pituning_config: str = "recipes/configs/pituning_cpu.yaml"
    # which stages run
    only: str | None = None           # rerun this stage alone (forced)
    from_stage: str | None = None     # rerun from this stage on (`--from STAGE` on the command line)
    until: str | None = None          # stop after this stage (e.g. summary: the data stages only)
    force: bool = False               # rerun every stage
    keep_going: bool = True           # after a failed stage, run the stages that do not need it, then the report
    quiet: bool = False               # do not echo each stage's output (it is in <stage>/stage.log)
    list_stages: bool = False         # print the stages and their commands, run nothing


def _in_repo(path: str) -> str:
    """Config paths are relative to the repository root (the stages run there)."""
    return str(path if Path(path).is_absolute() else ROOT / path) if path else path


def stages(args: DemoArguments, python: str = sys.executable) -> list[Stage]:
    run = Path(args.output_dir).resolve()
    for name in [f for f in DemoArguments.__dataclass_fields__ if f.endswith("_config")]:
        setattr(args, name, _in_repo(getattr(args, name)))
    d = {name: stage_folder(run, name) for name in STAGES}
    cache = str(run / "teacher_cache")
    threads = args.threads
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    if args.jobs > 1:   # stages share the cores: a thread that waits sleeps instead of spinning on a core
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    env["TQDM_MININTERVAL"] = "10"  # progress bars: a line every 10 s in the logs, not every step
    env.update(GLIBC_MALLOC)

    bf16 = resolve_precision(args.precision) == "bfloat16"
    train_precision = ["--bf16", str(bf16).lower()]
    inference_precision = ["--inference_dtype", "bfloat16" if bf16 else "float32"]

    def recipe(name: str, *argv) -> list[str]:
        return [python, f"recipes/{name}.py", *map(str, argv)]

    def opt(flag: str) -> list[str]:
        return [flag, str(threads)] if threads else []

    if args.cohort_dir is not None:  # the user's data: checked, then read in place by every stage
        cohort = Path(args.cohort_dir).resolve()
        cohort_stage = Stage("cohort", [recipe("cohort", "--source_dir", cohort, "--output_dir", d["cohort"])],
                             d["cohort"], inputs=[cohort], outputs=[stage_output(run, "cohort")],
                             description=f"check your Tsinghua-format cohort in {cohort} (read in place, never written)")
    else:
        cohort = d["cohort"]
        cohort_stage = Stage("cohort", [recipe("cohort", "--config", args.cohort_config, "--output_dir", cohort,
                                               "--n_users", args.n_users, "--days", args.days, "--seed", args.seed)],
                             cohort, configs=[args.cohort_config], outputs=[stage_output(run, "cohort")],
                             description="simulate a cohort in the Tsinghua App Usage format")
    lenient = ["--lenient", str(args.lenient).lower()]
    teacher = ["--teacher", args.teacher, *(["--teacher_model", args.teacher_model] if args.teacher_model else []),
               *(["--teacher_base_url", args.teacher_base_url] if args.teacher_base_url else [])]
    profile_data = ["--cohort_dir", cohort, "--teacher_cache_dir", cache, *teacher, *lenient]
    embeddings = stage_output(run, "embed")
    completion = ["--config", args.complete_config, "--data_path", d["tensors"], "--embeddings", embeddings,
                  "--output_dir", d["completion"]]
    out = [
        cohort_stage,
        Stage("tensors", [recipe("tensorize", "--config", args.tensorize_config, "--cohort_dir", cohort,
                                 "--output_dir", d["tensors"], "--seed", args.seed, *lenient)], d["tensors"],
              configs=[args.tensorize_config], inputs=[cohort], needs=["cohort"],
              outputs=[stage_output(run, "tensors")], description="load, validate and tensorize the cohort"),
        Stage("summary", [recipe("cohort_summary", "--cohort_dir", cohort, "--tensors_dir", d["tensors"],
                                 "--output_dir", d["summary"], *lenient)], d["summary"], inputs=[cohort, d["tensors"]],
              needs=["cohort", "tensors"], outputs=[stage_output(run, "summary")],
              description="cohort summary and figures"),
        Stage("sft", [recipe("sft", "--config", args.sft_config, *profile_data, "--output_dir", d["sft"],
                             *train_precision, *opt("--threads"))], d["sft"], configs=[args.sft_config], inputs=[cohort],
              needs=["cohort"], outputs=[stage_output(run, "sft")],
              description="teacher profiles + SFT (CoT distillation) of the LoRA student"),
        Stage("dpo", [recipe("dpo", "--config", args.dpo_config, *profile_data, "--sft_adapter", d["sft"],
                             "--output_dir", d["dpo"], *train_precision, *inference_precision, *opt("--threads"))],
              d["dpo"], configs=[args.dpo_config],
              inputs=[cohort, d["sft"]], needs=["sft"], outputs=[stage_output(run, "dpo")],
              description="DPO (Eq. 27) on top of the SFT student"),
        Stage("evaluate", [recipe("evaluate", "--config", args.evaluate_config, *profile_data, "--output_dir",
                                  d["evaluate"], "--sft_adapter", d["sft"], "--dpo_adapter", d["dpo"],
                                  *inference_precision, *opt("--threads"))], d["evaluate"], configs=[args.evaluate_config],
              inputs=[cohort, d["sft"], d["dpo"]], needs=["sft", "dpo"],
              outputs=[stage_output(run, "evaluate")],
              description="student evaluation: after SFT / after DPO, unconstrained and constrained"),
        Stage("novelty", [recipe("novelty", "--config", args.novelty_config, *profile_data, "--output_dir",
                                 d["novelty"], "--sft_adapter", d["sft"], "--dpo_adapter", d["dpo"],
                                 *inference_precision, *opt("--threads"))], d["novelty"], configs=[args.novelty_config],
              inputs=[cohort, d["sft"], d["dpo"]], needs=["sft", "dpo"], outputs=[stage_output(run, "novelty")],
              description="cold-start / novelty recommendation: the student against popularity, kNN and the teacher"),
        Stage("synthesis", [recipe("synthesize", cmd, "--config", args.synthesize_config, "--cohort_dir", cohort,
                                   "--output_dir", d["synthesis"], "--teacher_cache_dir", cache, *teacher, *lenient,
                                   *train_precision, *inference_precision) for cmd in ("train", "generate", "report")],
              d["synthesis"], configs=[args.synthesize_config], inputs=[cohort], needs=["cohort"],
              outputs=[stage_output(run, "synthesis")],
              description="semantic-augmented synthetic cohort + fidelity report"),
        Stage("embed", [recipe("embed", "--config", args.embed_config, *profile_data, "--output_dir", d["embed"])],
              d["embed"], configs=[args.embed_config], inputs=[cohort], needs=["cohort"],
              outputs=[embeddings], description="user embeddings h_u (Eq. 24)"),
        Stage("completion", [recipe("complete", "train", *completion),
                             recipe("complete", "evaluate", *completion, "--max_entities", 32)],
              d["completion"], configs=[args.complete_config], inputs=[d["tensors"], embeddings],
              needs=["tensors", "embed"], outputs=[stage_output(run, "completion")],
              description="U-MASK + DiT training (Algorithm 1) and evaluation"),
        Stage("compare", [recipe("compare", *completion, "--engine_dir", d["completion"], "--output_dir", d["compare"],
                                 *opt("--threads"))],
              d["compare"], configs=[args.complete_config], inputs=[d["tensors"], embeddings, d["completion"]],
              needs=["completion"], outputs=[stage_output(run, "compare")],
              description="short / long / cold-start completion vs baselines"),
        Stage("pituning", [recipe("pituning", "--config", args.pituning_config, "--cohort_dir", cohort, *lenient,
                                  "--output_dir", d["pituning"], *opt("--threads"))], d["pituning"],
              configs=[args.pituning_config], inputs=[cohort], needs=["cohort"],
              outputs=[stage_output(run, "pituning")],
              description="PITuning intent prediction on the cohort's derived intents"),
        Stage("lightgbm", [recipe("intent_baselines", "--config", args.pituning_config, "--cohort_dir", cohort,
                                  *lenient, "--output_dir", d["lightgbm"])], d["lightgbm"],
              configs=[args.pituning_config], inputs=[cohort], needs=["cohort"],
              outputs=[stage_output(run, "lightgbm")], description="LightGBM and most-frequent intent baselines"),
        Stage("report", [recipe("report", "--run_dir", run, "--output_dir", d["report"], "--demo_config",
                                getattr(args, "config_path", "") or "")], d["report"],
              inputs=[d[k] for k in d if k != "report"], outputs=[stage_output(run, "report")], always=True,
              description="one HTML page with every result"),
    ]
    for stage in out:
        stage.env = {**env, **stage.env}
        if args.jobs > 1 and stage.name not in CRITICAL_PATH:
            stage.nice = 10   # runs on the cores the critical path leaves idle
    return out


PRECISIONS = ("auto", "float32", "bfloat16")


def resolve_precision(precision: str) -> str:
    """``auto`` -> bfloat16 on a CPU with native bf16, else float32; the others as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if native_bf16_cpu() else "float32"
    return precision


def write_timings(path: Path, results, args: DemoArguments, started: datetime, wall_s: float) -> None:
    """``timings.json``: this invocation's wall time and each stage's (skipped stages: as recorded), the
    one measured source of how long the main job takes (the README points here)."""
    write_json(path, {"started_at": started.isoformat(timespec="seconds"),
                      "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "total_wall_s": round(wall_s, 1), "jobs": args.jobs, "cpu_count": os.cpu_count(),
                      "stages": [{"stage": r.name, "status": r.status, "wall_s": r.wall_s and round(r.wall_s, 1),
                                  "cpu_s": r.cpu_s and round(r.cpu_s, 1),
                                  "peak_rss_mb": r.peak_rss_mb and round(r.peak_rss_mb)} for r in results]})


def main(args: DemoArguments) -> int:
    pipeline = stages(args)
    if args.list_stages:
        for stage in pipeline:
            print(f"{stage.name:<11} {stage.description}")
            for command in stage.commands:
                print("    " + " ".join(command[1:]))
        return 0
    started, clock = datetime.now(timezone.utc), time.perf_counter()
    try:
        results = run_pipeline(pipeline, cwd=ROOT, only=args.only, start=args.from_stage, until=args.until,
                               force=args.force, keep_going=args.keep_going, quiet=args.quiet, jobs=args.jobs,
                               status_path=Path(args.output_dir) / "pipeline.json",
                               on_done=lambda stage: floor_violations(args.output_dir, stage.name))
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    write_timings(Path(args.output_dir) / "timings.json", results, args, started, time.perf_counter() - clock)
    report = Path(args.output_dir) / "report" / "index.html"
    if report.exists():
        print(f"report: {report}")
    failed = [r.name for r in results if r.status in ("failed", "blocked")]
    if failed:
        print(f"stages that did not finish: {', '.join(failed)} (see <stage>/stage.log); rerun the same command "
              "to retry them", file=sys.stderr)
    return 1 if failed else 0


def parse(argv: list[str]) -> DemoArguments:
    argv = ["--from_stage" if a == "--from" else a for a in argv]
    (args,) = parse_config((DemoArguments,), argv)
    if "--config" in argv:
        args.config_path = argv[argv.index("--config") + 1]
    return args


if __name__ == "__main__":
    sys.exit(main(parse(sys.argv[1:])))
