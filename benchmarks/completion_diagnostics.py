"""Why the completion engine won or lost on NJ: learning curves, objective, capacity, ablations,
and the error on zero-heavy entries, every variant trained with the same data, seed and budget.

    python -m benchmarks.completion_diagnostics            # ~2.5 h on 2 CPU cores
    python -m benchmarks.completion_diagnostics --quick    # a few minutes: smoke run

Variants (tiny DiT conditioned on the POI profile, batch 64, lr 1e-3, seed 0; val RMSE every `--every` steps on 168 val
entities, test RMSE at the end; point estimate = the first reverse step's X_0 estimate, and the
mean of 4 DDIM-20 samples beside it):
- `plain_dit`: the paper's DiT as the project had it (no prior, U-MASK evidence), and
  `plain_dit_whole`: the same DiT reading the whole available region;
- `prior`: the residual over the `carry` prior, whole region (the backbone of the engine);
- `prior_regression` / `plain_regression`: the same backbones trained as deterministic
  regressors (one forward pass, MSE);
- `prior_S`: capacity, the S preset (hidden 384, depth 12; 25x the compute of a tiny step),
  `--s_steps` steps of batch 32, about what 2 CPU cores train in 25 minutes;
- `no_center`, `no_poi` (no POI conditioning, to `--steps`), `no_calendar`: ablations of `prior`;
- `umask_uniform` / `umask_recency`: U-MASK evidence over the prior, its temporal profile started
  uniform or as a recency ramp, trained through the DiT's evidence channels only; `umask`: with
  the prior's straight-through gradient as well (the engine's U-MASK); `engine`: `umask` with
  the benchmarks' history dropout, and `prior_dropout`: `prior` with the same dropout.
Learning curves run to `--steps` (4x the 700 steps of the earlier benchmark); the other variants
to `--ablation_steps`, compared with `prior` at the same step. Results are cached per variant in
`benchmarks/results/<name>_runs.json`, so an interrupted run resumes with the next variant.
Writes `benchmarks/results/<name>.json` (last stdout line) and the learning-curve figure.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, emit, peak_rss_mb
from benchmarks.completion_common import log
from completion.baselines import DiTForecaster, Persistence
from completion.city import load_city
from completion.evaluate import evaluate, task_regions
from completion.model import ModelConfig
from completion.tasks import TaskConfig
from completion.train import TrainConfig, train
from scope.io import save_figure, write_json

TASKS = ("short", "long")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "uomo-nj" / "nj_traffic_users_64.npz"
WHOLE = dict(mask="random", mask_ratio=1.0)  # a "fixed mask" revealing the whole available region
DROPOUT = dict(history_dropout=(0.5, 0.8, 0.95))


def variants(args) -> dict[str, tuple[dict, dict, str, int]]:
    """name -> (ModelConfig overrides, TrainConfig overrides, evidence, steps)."""
    long_, short_ = args.steps, args.ablation_steps
    plain = dict(prior="zero")
    return {
        "umask": ({}, {}, "umask", short_),
        "prior": ({}, WHOLE, "available", long_),
        "engine": ({}, DROPOUT, "umask", short_),
        "plain_dit": (plain | dict(recency_init=0.0), {}, "umask", long_),
        "plain_dit_whole": (plain, WHOLE, "available", long_),
        "prior_regression": ({}, WHOLE | dict(objective="regression"), "available", long_),
        "plain_regression": (plain, WHOLE | dict(objective="regression"), "available", short_),
        "no_center": (dict(center=False), WHOLE, "available", short_),
        "no_poi": (dict(entity_conditioning=False), WHOLE, "available", long_),
        "no_calendar": (dict(calendar=False), WHOLE, "available", short_),
        "umask_uniform": (dict(recency_init=0.0, prior_gradient=False), {}, "umask", short_),
        "umask_recency": (dict(prior_gradient=False), {}, "umask", short_),
        "prior_dropout": ({}, WHOLE | DROPOUT, "available", short_),
        "prior_S": (dict(preset="S"), WHOLE | dict(batch_size=32), "available", args.s_steps),
    }


def model_config(overrides: dict) -> ModelConfig:
    recency = overrides.pop("recency_init", 3.0)
    base = dict(channels=2, T=64, cell_dim=21, entity_dim=21 * 16, preset="tiny", patch_size=(4, 2, 2),
                entity_conditioning=True, umask=dict(d=64, bank_size=512, recency_init=recency))
    return ModelConfig(**(base | overrides))


def run_variant(name, spec, nj, val, test, task_config, args) -> dict:
    """Train in segments of `--every` steps (resuming the same checkpoint), scoring val after each."""
    overrides, train_overrides, evidence, steps = spec
    mc = model_config(dict(overrides))
    out = Path(args.work_dir) / name
    curve, start = [], time.perf_counter()
    for s in range(args.every, steps + 1, args.every):
        config = TrainConfig(**({"steps": s, "batch_size": 64, "lr": 1e-3, "seed": 0, "tasks": TASKS,
                                 "checkpoint_every": args.every} | train_overrides))
        _, ema, logs = train(mc, nj.batches["train"], task_config, config, out_dir=out, progress=False)
        point = DiTForecaster(ema, evidence, n_samples=4, steps=0)
        curve.append({"step": s, "train_s": round(time.perf_counter() - start, 1),
                      **{f"val_{t}": round(evaluate(point, val, t, task_config)["rmse_mean"], 5) for t in TASKS}})
        log(f"{name} {curve[-1]}")
    sampled = DiTForecaster(ema, evidence, n_samples=4, steps=20, point="sample_mean")
    result = {"curve": curve, "steps": steps,
              "test": {t: round(evaluate(point, test, t, task_config)["rmse_mean"], 5) for t in TASKS},
              "test_sample_mean": {t: round(evaluate(sampled, test, t, task_config)["rmse_mean"], 5) for t in TASKS},
              "zero_heavy": zero_heavy(point, test, task_config, args.zero)}
    if evidence == "umask":
        result["budget"] = {t: round(float(ema.umask.rho_logit.sigmoid()[i]), 4) for i, t in enumerate(TASKS)}
    return result


def zero_heavy(method, batch, task_config, zero) -> dict:
    """Normalised RMSE per channel on the target entries of dead cells (the series is exactly zero,
    `zero` [C] in normalised units, over its whole available history) and of live cells, next to
    persistence, which gets dead cells exactly right."""
    out = {}
    for t in TASKS:
        task, regions = task_regions(batch, t, task_config)
        A = regions.evidence(regions.available.float()).bool()
        at_zero = (batch.x - zero[None, :, None, None, None]).abs() < 1e-5
        dead = ((at_zero | ~A).all(2, keepdim=True) & A.any(2, keepdim=True)).expand_as(batch.x)
        out[t] = {"dead_share": round(float((regions.target & dead).sum() / regions.target.sum()), 4)}
        for label, m in (("method", method), ("persistence", Persistence())):
            err = (m.predict(batch, task, regions) - batch.x) ** 2
            for cells, mask in (("dead", dead), ("live", ~dead)):
                w = (regions.target & mask).float()
                rmse = ((err * w).sum((0, 2, 3, 4)) / w.sum((0, 2, 3, 4)).clamp(min=1)).sqrt()
                out[t][f"{label}_{cells}"] = [round(v, 5) for v in rmse.tolist()]
    return out


def dropout_effect(args, val, test, task_config) -> dict:
    """What history dropout buys: `umask` (trained on complete histories) against `engine` (the same
    with history dropout), scored with their own masks at every sparsity level (mean of uniform and
    hour-block drops), from the variants' saved checkpoints."""
    from completion.evaluate import Sparsity
    from completion.train import CHECKPOINT, load_model

    out = {}
    for name in ("umask", "engine"):
        path = Path(args.work_dir) / name / CHECKPOINT
        if not path.exists():
            continue
        model = load_model(path)
        point = DiTForecaster(model, "umask", n_samples=4, steps=0)
        out[name] = {}
        for level in (0.0, 0.5, 0.8, 0.95):
            scores = [evaluate(point, test, t, task_config, sparsity=Sparsity(level, kind, 4))["rmse_mean"]
                      for kind in ("uniform", "block") for t in TASKS]
            out[name][str(level)] = round(float(np.mean(scores)), 5)
    return out


def curve_figure(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for name in ("plain_dit", "plain_dit_whole", "prior", "prior_regression", "engine"):
        if name not in results:
            continue
        steps = [c["step"] for c in results[name]["curve"]]
        for ax, t in zip(axes, TASKS):
            ax.plot(steps, [c[f"val_{t}"] for c in results[name]["curve"]], marker="o", ms=3, label=name)
    for ax, t in zip(axes, TASKS):
        if "persistence_val" in results:
            ax.axhline(results["persistence_val"][t], color="grey", ls="--", label="persistence")
        ax.set(title=f"NJ val, {t}", xlabel="training step", ylabel="normalised RMSE")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--steps", type=int, default=2800)
    parser.add_argument("--ablation_steps", type=int, default=1400)
    parser.add_argument("--s_steps", type=int, default=350, help="the S preset (batch 32): ~25 min on 2 cores")
    parser.add_argument("--every", type=int, default=350)
    parser.add_argument("--eval_entities", type=int, default=168)
    parser.add_argument("--only", nargs="*", default=None, help="run these variants only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work_dir", default=str(Path(__file__).resolve().parents[1] / "runs" / "bench" / "diagnostics"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--name", default="completion_diagnostics")
    args = parser.parse_args()
    if args.quick:
        args.steps = args.ablation_steps = args.s_steps = args.every = 10
        args.eval_entities, args.name = 8, f"{args.name}_quick"
        args.work_dir += "_quick"
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    nj = load_city(args.data)
    val, test = (nj.batches[s][::len(nj.batches[s]) // args.eval_entities][:args.eval_entities] for s in ("val", "test"))
    task_config = TaskConfig(short_horizon=4, long_horizon=32)
    args.zero = nj.scaler.transform(torch.zeros(1, 2, 1)).flatten().float()  # a raw 0 in normalised units
    cache = RESULTS / f"{args.name}_runs.json"
    results = json.loads(cache.read_text()) if cache.exists() else {}
    results["persistence_val"] = {t: round(evaluate(Persistence(), val, t, task_config)["rmse_mean"], 5) for t in TASKS}
    results["persistence_test"] = {t: round(evaluate(Persistence(), test, t, task_config)["rmse_mean"], 5)
                                   for t in TASKS}
    for name, spec in variants(args).items():
        if name in results or (args.only is not None and name not in args.only):
            continue
        results[name] = run_variant(name, spec, nj, val, test, task_config, args)
        write_json(cache, results)
    curve_figure(results, RESULTS / "figures" / f"{args.name}_curves.png")
    dropout = dropout_effect(args, val, test, task_config)
    summary = {name: {"val_at_end": {t: r["curve"][-1][f"val_{t}"] for t in TASKS}, "test": r["test"],
                      "test_sample_mean": r["test_sample_mean"], "steps": r["steps"],
                      "train_s": r["curve"][-1]["train_s"]}
               for name, r in results.items() if isinstance(r, dict) and "curve" in r}
    emit(args.name, {"summary": summary, "persistence_val": results["persistence_val"],
                     "persistence_test": results["persistence_test"],
                     "zero_heavy": {n: r["zero_heavy"] for n, r in results.items() if isinstance(r, dict) and "zero_heavy" in r},
                     "budget": {n: r["budget"] for n, r in results.items() if isinstance(r, dict) and "budget" in r},
                     "dropout_effect_test": dropout,
                     "peak_rss_mb": round(peak_rss_mb(), 1), "wall_s": round(time.perf_counter() - wall, 1)})


if __name__ == "__main__":
    main()
