"""U-MASK against every baseline on the real NJ city data (short: next 4 slots; long: last 32 of 64).

Protocol: normalisation and all training on the train split; every choice (HA profile, ARIMA
order, which fixed mask, the fixed masks' budget) is made on val; the table is on test. Every
baseline sees the whole available region at test time; U-MASK reveals the subset it chooses.
The fixed masks get U-MASK's budget: the mean k_b / N_b of the seed-0 U-MASK on val. All three
fixed masks are trained with seed 0; the best on val gets the remaining seeds. The DiT without
entity conditioning is trained like U-MASK (one seed) and completes from the available region.

Sized for a 2-core CPU shared with another process, within 40 minutes (the issue allows 60):
the `tiny` DiT preset (hidden 64, depth 2, 64 tokens of 4x2x2), 700 optimiser steps of 64
entities per DiT (nine DiTs in all, ~0.3 s a U-MASK step on one thread), 4 samples of the
20-step DDIM sampler per entity, and a fixed, evenly spaced subset of 168 of the 672 val/test
entities (the sampler sweep uses 32 of them); larger presets are for GPUs.

    python -m benchmarks.completion_nj [--steps 700 --seeds 3 --threads 1]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, emit, peak_rss_mb
from completion.baselines import ARIMA, DiTForecaster, HistoricalAverage, PatchTST, train_patchtst
from completion.evaluate import evaluate, umask_outputs
from completion.figures import mask_figure, pattern_figure
from completion.masks import FIXED_MASKS
from completion.model import ModelConfig
from completion.nj import load_nj
from completion.tasks import TaskConfig
from completion.train import TrainConfig, train
from scope.io import atomic_path

TASKS = ("short", "long")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "uomo-nj" / "nj_traffic_users_64.npz"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def score(method, batch, config, inverse) -> dict:
    return {t: evaluate(method, batch, t, config, inverse) for t in TASKS}


def val_mean(report: dict) -> float:
    return float(np.mean([report[t]["rmse_mean"] for t in TASKS]))


def train_dit(args, model_config, data, task_config, seed: int, **train_kwargs):
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed,
                         tasks=TASKS, checkpoint_every=args.steps, **train_kwargs)
    start = time.perf_counter()
    _, ema, logs = train(model_config, data, task_config, config, progress=False)
    seconds = time.perf_counter() - start
    return ema, {"samples_per_s": args.steps * args.batch_size / seconds, "train_s": seconds,
                 "final_L_rec": float(np.mean([r["L_rec"] for r in logs[-50:]])),
                 "final_rho": float(np.mean([r["rho"] for r in logs[-50:]]))}


def dit(model, evidence: str, args, steps: int | None = None) -> DiTForecaster:
    return DiTForecaster(model, evidence, n_samples=args.n_samples, steps=steps or args.sampler_steps)


def budget(outputs) -> float:
    """Mean k_b / N_b over entities and tasks."""
    return float(np.mean([(o.k / r.available.flatten(1).sum(1)).mean().item() for o, r in outputs.values()]))


def summarise(reports: list[dict]) -> dict:
    """Mean (and std over seeds) of every per-task figure of several runs."""
    out = {}
    for t in TASKS:
        out[t] = {}
        for key in ("rmse", "mae", "rmse_orig", "mae_orig", "rmse_mean", "ms_per_entity"):
            values = np.array([r[t][key] for r in reports], dtype=np.float64)
            out[t][key] = np.round(values.mean(0), 6).tolist()
            if key == "rmse_mean" and len(reports) > 1:
                out[t]["rmse_mean_std"] = round(float(values.std(0)), 6)
    return out


def markdown(table: dict, figures: dict, command: str) -> str:
    """The results table (test split): RMSE and MAE per channel, original units and normalised."""
    lines = [f"# Completion on NJ (test subset), reproduced by `{command}`", "",
             "| method | task | RMSE traffic | RMSE users | MAE traffic | MAE users | RMSE norm (mean of channels) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for method, by_task in table.items():
        for t in TASKS:
            r = by_task[t]
            std = f" ± {r['rmse_mean_std']:.4f}" if "rmse_mean_std" in r else ""
            lines.append(f"| {method} | {t} | {r['rmse_orig'][0]:.1f} | {r['rmse_orig'][1]:.3f} | {r['mae_orig'][0]:.1f} "
                         f"| {r['mae_orig'][1]:.3f} | {r['rmse_mean']:.4f}{std} |")
    lines += ["", "```json", json.dumps({k: v for k, v in figures.items() if k != "table"}, indent=1), "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n_samples", type=int, default=4)
    parser.add_argument("--sampler_steps", type=int, default=20)
    parser.add_argument("--patchtst_steps", type=int, default=600)
    parser.add_argument("--eval_entities", type=int, default=168, help="every (N // this)-th val/test entity")
    parser.add_argument("--sweep_entities", type=int, default=32, help="test entities of the sampler sweep")
    parser.add_argument("--fixed_kinds", nargs="+", default=list(FIXED_MASKS))
    parser.add_argument("--arima_val_entities", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="1: with another process on the 2 cores, 2 threads ran 4x slower (measured)")
    parser.add_argument("--name", default="completion_nj")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    nj = load_nj(args.data)
    train_b = nj.batches["train"]
    val, test = (nj.batches[s][::max(1, len(nj.batches[s]) // args.eval_entities)][:args.eval_entities]
                 for s in ("val", "test"))
    task_config = TaskConfig(short_horizon=4, long_horizon=32)
    table, chosen = {}, {}

    # Historical average: with or without the slot-of-day profile, chosen on val.
    candidates = {p: HistoricalAverage(profile=p).fit(train_b) for p in (False, True)}
    best = min(candidates, key=lambda p: val_mean(score(candidates[p], val, task_config, nj.inverse)))
    chosen["ha_profile"] = best
    table["ha"] = score(candidates[best], test, task_config, nj.inverse)
    log(f"HA (profile={best}) test {[table['ha'][t]['rmse_mean'] for t in TASKS]}")

    # ARIMA: order and Fourier harmonics per task, chosen on a val subset.
    arima_val = val[:args.arima_val_entities]
    table["arima"] = {}
    for t in TASKS:
        grid = {(order, K): ARIMA(order, K).fit(train_b) for order in ((1, 0, 0), (2, 0, 0)) for K in (0, 2)}
        key = min(grid, key=lambda k: evaluate(grid[k], arima_val, t, task_config)["rmse_mean"])
        chosen[f"arima_{t}"] = {"order": key[0], "fourier": key[1]}
        table["arima"][t] = evaluate(grid[key], test, t, task_config, nj.inverse)
    log(f"ARIMA {chosen} test {[table['arima'][t]['rmse_mean'] for t in TASKS]}")

    # PatchTST-style forecaster.
    torch.manual_seed(0)
    patchtst = PatchTST(T=64, channels=2)
    start = time.perf_counter()
    train_patchtst(patchtst, train_b, task_config, TASKS, steps=args.patchtst_steps, seed=0)
    patchtst_s = time.perf_counter() - start
    table["patchtst"] = score(patchtst, test, task_config, nj.inverse)
    log(f"PatchTST ({patchtst_s:.0f} s) test {[table['patchtst'][t]['rmse_mean'] for t in TASKS]}")

    # U-MASK (joint training, Algorithm 1), several seeds.
    model_config = ModelConfig(channels=2, T=64, cell_dim=21, entity_dim=21 * 16, preset=args.preset,
                               patch_size=(4, 2, 2), umask=dict(d=64, bank_size=512))
    umask_runs, umask_models, train_stats = [], [], []
    for seed in range(args.seeds):
        model, stats = train_dit(args, model_config, train_b, task_config, seed)
        umask_models.append(model)
        train_stats.append(stats)
        umask_runs.append(score(dit(model, "umask", args), test, task_config, nj.inverse))
        log(f"U-MASK seed {seed} {stats} test {[umask_runs[-1][t]['rmse_mean'] for t in TASKS]}")
    table["umask"] = summarise(umask_runs)
    val_outputs = umask_outputs(umask_models[0], val, TASKS, task_config)
    ratio = budget(val_outputs)
    chosen["fixed_mask_ratio"] = round(ratio, 4)
    table["umask_model_whole_region"] = score(dit(umask_models[0], "available", args), test, task_config, nj.inverse)

    # Fixed conventional masks at U-MASK's budget (Table 9 control).
    fixed_seed0, fixed_val = {}, {}
    for kind in args.fixed_kinds:
        model, _ = train_dit(args, model_config, train_b, task_config, 0, mask=kind, mask_ratio=ratio)
        forecaster = dit(model, "available", args)
        fixed_val[kind] = val_mean(score(forecaster, val, task_config, nj.inverse))
        fixed_seed0[kind] = score(forecaster, test, task_config, nj.inverse)
        table[f"fixed_{kind}_seed0"] = fixed_seed0[kind]
        log(f"fixed {kind} val {fixed_val[kind]:.4f} test {[fixed_seed0[kind][t]['rmse_mean'] for t in TASKS]}")
    best_kind = min(fixed_val, key=fixed_val.get)
    chosen["fixed_mask"] = best_kind
    fixed_runs = [fixed_seed0[best_kind]]
    for seed in range(1, args.seeds):
        model, _ = train_dit(args, model_config, train_b, task_config, seed, mask=best_kind, mask_ratio=ratio)
        fixed_runs.append(score(dit(model, "available", args), test, task_config, nj.inverse))
    table[f"fixed_{best_kind}"] = summarise(fixed_runs)

    # DiT without entity conditioning.
    no_entity = ModelConfig(**{**model_config.__dict__, "entity_conditioning": False})
    model, _ = train_dit(args, no_entity, train_b, task_config, 0)
    table["dit_no_entity"] = score(dit(model, "available", args), test, task_config, nj.inverse)
    log(f"no-entity test {[table['dit_no_entity'][t]['rmse_mean'] for t in TASKS]}")

    # Sampler steps vs RMSE (U-MASK seed 0, test).
    sweep = test[:args.sweep_entities]
    sampler = {s: {t: r["rmse_mean"] for t, r in score(dit(umask_models[0], "umask", args, s), sweep, task_config,
                                                         nj.inverse).items()} for s in (10, 20, 50, 200)}
    log(f"sampler {sampler}")

    # Figures 8 and 9 from the seed-0 U-MASK on test.
    figures_dir = RESULTS / "figures"
    test_outputs = umask_outputs(umask_models[0], test, TASKS, task_config)
    mask_figure({t: o for t, (o, _) in test_outputs.items()}, figures_dir / f"{args.name}_masks.png")
    out, regions = test_outputs["long"]
    pattern_figure(out, regions.available, figures_dir / f"{args.name}_fpat.png")

    fixed_best = table[f"fixed_{best_kind}"]
    gains = {f"umask_vs_fixed_{t}_rmse_gain": round(1 - table["umask"][t]["rmse_mean"] / fixed_best[t]["rmse_mean"], 4)
             for t in TASKS}
    baselines = ("ha", "arima", "patchtst")
    wins = {f"umask_beats_{b}_{t}": table["umask"][t]["rmse_mean"] < table[b][t]["rmse_mean"]
            for b in baselines for t in TASKS}
    s200 = sampler[200]
    figures = {
        **gains,
        "sampler_rmse": {str(k): v for k, v in sampler.items()},
        "sampler_20_vs_200_gap": {t: round(sampler[20][t] / s200[t] - 1, 4) for t in TASKS},
        "train_samples_per_s": round(float(np.mean([s["samples_per_s"] for s in train_stats])), 1),
        "inference_ms_per_entity": round(table["umask"]["short"]["ms_per_entity"], 2),
        "umask_train": train_stats,
        "chosen_on_val": chosen,
        "fixed_val_rmse": fixed_val,
        "table": table,
        **wins,
        "meets_targets": all(g >= 0.10 for g in gains.values()) and all(wins.values())
                         and all(abs(sampler[20][t] / s200[t] - 1) <= 0.03 for t in TASKS),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    log(" | ".join(f"{m}: " + ", ".join(f"{t} {table[m][t]['rmse_mean']:.4f}" for t in TASKS) for m in table))
    command = "python -m benchmarks.completion_nj " + " ".join(sys.argv[1:])
    with atomic_path(RESULTS / f"{args.name}.md") as tmp:
        tmp.write_text(markdown(table, figures, command.strip()))
    emit(args.name, figures)


if __name__ == "__main__":
    main()
