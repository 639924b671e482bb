"""The completion engine against every baseline on the real NJ city data, under the project's tasks
(short: next 4 slots; long: last 32 of 64), under history sparsity, under UoMo's published
protocol, and zero-shot on resampled / rescaled versions of NJ.

    python -m benchmarks.completion_nj            # ~80 min on 2 CPU cores
    python -m benchmarks.completion_nj --quick    # a few minutes: smoke run, numbers meaningless
    python -m benchmarks.completion_nj --uomo_only  # UoMo's protocol alone (30 min on 1 core)

Protocol (see benchmarks/completion_common.py): training and normalisation on train, every choice
on val, tables on test (UoMo's protocol: see `uomo_protocol`), 3 seeds (mean +- std) for every
trained model. Val and test are two of the six training areas at other hours, not other areas
(`completion.city`). The engine is U-MASK + the tiny DiT over the `carry` prior (damping chosen
on val), trained once per seed with random history dropout (a quarter of the training windows
lose 50, 80 or 95% of their history, uniformly or in hour blocks) and evaluated at every
sparsity level; its residual weight and spread are calibrated on val. Fixed masks (random / tube /
temporal) are trained the same way at the budget U-MASK starts from (0.81); the best on val gets
the remaining seeds.

Keys of the last stdout line (also `benchmarks/results/<name>.json`):
- `engine_vs_best_baseline_{short,long}`: 1 - engine / best of persistence, seasonal HA, ARIMA
  and the masked patch transformer (normalised RMSE; > 0: the engine is better);
- `umask_vs_fixed_{short,long}_rmse_gain`: against the best fixed mask, no dropped history;
- `coverage90` and `crps` per task (the engine's calibrated samples);
- `sparsity`: {level: {umask, best_fixed, whole_region, ...}} (mean of tasks and drop kinds);
- `uomo_protocol`: {val_report / test: {task: {method: {rmse, mae, rmse_masked_pm1, rmse_all_pm1}}}}
  per channel (traffic, users), UoMo's tasks and scale (`completion.uomo`), every choice fitted on
  the first half of val's week and reported on its second half and on test (`--uomo_only` reruns
  just this key in the existing results file);
- `transfer`: {variant: {task: {engine, engine_zero_shot, ha, persistence}}}, the seed-0 engine
  on resampled / rescaled NJ without training (calibrated on the variant's val, or not at all);
- `table`: every method's full report per task.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, emit, peak_rss_mb
from benchmarks.completion_common import (Budget, add_arguments, choose_fixed_mask, fit_baselines, headline, log,
                                          method_for, score, sparsity_figure, sparsity_sweep, summarise, train_model)
from completion.baselines import DiTForecaster, HistoricalAverage, Persistence
from completion.city import load_city, resample_city
from completion.evaluate import calibrate, choose_prior, evaluate, task_regions, umask_outputs
from completion.figures import mask_figure
from completion.model import ModelConfig
from completion.tasks import TaskConfig
from completion.uomo import UOMO_TASKS, SameAreaLookup, time_halves, uomo_errors
from scope.io import atomic_path

TASKS = ("short", "long")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "uomo-nj" / "nj_traffic_users_64.npz"


def subset_rows(n_all: int, n: int) -> slice:
    """Every (N // n)-th entity, n of them (a fixed, evenly spaced subset)."""
    step = max(1, n_all // n)
    return slice(0, step * n, step)


def engine_config(args, cell_dim: int = 21, entity_dim: int = 21 * 16, **kwargs) -> ModelConfig:
    return ModelConfig(channels=2, T=64, cell_dim=cell_dim, entity_dim=entity_dim, preset=args.preset,
                       patch_size=(4, 2, 2), entity_conditioning=args.entity_conditioning,
                       umask=dict(d=64, bank_size=512), **kwargs)


def project_protocol(args, nj, val, test, budget):
    """Baselines, engines, fixed masks and the sparsity sweep on the project's tasks."""
    task_config = TaskConfig(short_horizon=4, long_horizon=32)
    train_b = nj.batches["train"]
    table, chosen, stats = {}, {}, {}
    patchtst_runs = []
    for seed in range(args.seeds):
        methods, chosen_seed = fit_baselines(train_b, val, task_config, TASKS, nj.slots_per_day, args.patchtst_steps,
                                             32, seed, arima=not args.quick and seed == 0)
        if seed == 0:
            chosen |= chosen_seed
            for name in ("persistence", "ha", "arima"):
                if name in methods:
                    table[name] = score(methods[name], test, TASKS, task_config, nj.inverse)
        patchtst_runs.append(score(methods["masked_patch_transformer"], test, TASKS, task_config, nj.inverse))
    table["masked_patch_transformer"] = summarise(patchtst_runs)
    log("baselines " + ", ".join(f"{m} {[table[m][t]['rmse_mean'] for t in TASKS]}" for m in table))

    damping, shrinkage, prior_val = choose_prior(train_b, val, TASKS, task_config, nj.slots_per_day)
    chosen |= {"prior_damping": damping, "prior_shrinkage": shrinkage, "prior_val_rmse": prior_val}
    model_config = engine_config(args, prior_damping=damping, prior_shrinkage=shrinkage)
    engines, engine_runs = [], []
    for seed in range(args.seeds):
        model, stats[f"engine_seed{seed}"] = train_model(model_config, train_b, task_config, TASKS, budget, seed, val,
                                                         args.n_samples, args.sampler_steps,
                                                         mask_lr_scale=args.mask_lr_scale)
        forecaster = DiTForecaster(model, "umask", n_samples=args.n_samples, steps=args.sampler_steps)
        engine_runs.append(score(forecaster, test, TASKS, task_config, nj.inverse))
        engines.append(model)
        log(f"engine seed {seed} {stats[f'engine_seed{seed}']} test "
            f"{[engine_runs[-1][t]['rmse_mean'] for t in TASKS]}")
    table["engine"] = summarise(engine_runs)
    table["engine_whole_region"] = summarise([score(DiTForecaster(m, "available", n_samples=args.n_samples,
                                                                  steps=args.sampler_steps), test, TASKS, task_config,
                                                    nj.inverse) for m in engines])

    best_kind, fixed_seed0, fixed_val = choose_fixed_mask(model_config, train_b, val, task_config, TASKS, budget,
                                                          tuple(args.fixed_kinds), n_samples=args.n_samples,
                                                          sampler_steps=args.sampler_steps)
    chosen |= {"fixed_mask": best_kind, "fixed_val_rmse": fixed_val}
    fixed = [fixed_seed0[best_kind]] + [train_model(model_config, train_b, task_config, TASKS, budget, seed, val,
                                                    args.n_samples, args.sampler_steps, mask=best_kind)[0]
                                        for seed in range(1, args.seeds)]
    table["best_fixed"] = summarise([score(DiTForecaster(m, "available", n_samples=args.n_samples, steps=0),
                                           test, TASKS, task_config, nj.inverse) for m in fixed])
    sparsity = sparsity_sweep(engines, fixed, test, TASKS, task_config, tuple(args.levels),
                              budget.dropout_block_slots, n_samples=4)
    outputs = umask_outputs(engines[0], test, TASKS, task_config)
    mask_figure({t: o for t, (o, _) in outputs.items()}, RESULTS / "figures" / f"{args.name}_masks.png")
    return table, chosen, stats, sparsity, engines


def uomo_row(method, city, batch, task, regions, truth) -> dict:
    """`uomo_errors` of one method on one task of a split, rounded."""
    pred = city.inverse(method.predict(batch, task, regions))
    return {k: np.round(v, 6).tolist() for k, v in uomo_errors(pred, truth, regions.target, city.scaler).items()}


def uomo_protocol(args, budget) -> dict:
    """UoMo's tasks and scale (`completion.uomo`): persistence, the same-area lookup, HA,
    the masked patch transformer and the engine (`args.seeds` seeds), trained on train in UoMo's scale. Every
    choice (the prior's damping and shrinkage, the HA variant, the engine's residual weight and
    spread) is fitted on the val windows of the first half of the week (`time_halves`), which are
    never scored; reported: val's windows after them (val is the split UoMo's code reports) and
    all of test."""
    wall = time.perf_counter()
    tasks = ("short", "long", "cold")
    nj = load_city(args.data, normalization="uomo")
    train_b, val = nj.batches["train"], nj.batches["val"]
    fit_rows, report_rows = time_halves(val.timestamps, nj.slots_per_day)
    fit, splits = val[fit_rows], {"val_report": val[report_rows], "test": nj.batches["test"]}
    if args.quick:
        fit = fit[subset_rows(len(fit), args.eval_entities)]
        splits = {name: b[subset_rows(len(b), args.eval_entities)] for name, b in splits.items()}
    baselines, chosen = fit_baselines(train_b, fit, UOMO_TASKS, tasks, nj.slots_per_day, args.patchtst_steps, 32, 0,
                                      arima=False)
    baselines["same_area_lookup"] = SameAreaLookup().fit(train_b, nj.slots_per_day)
    damping, shrinkage, _ = choose_prior(train_b, fit, tasks, UOMO_TASKS, nj.slots_per_day)
    chosen |= {"prior_damping": damping, "prior_shrinkage": shrinkage}
    engines = []
    for seed in range(args.seeds):
        model, stats = train_model(engine_config(args, prior_damping=damping, prior_shrinkage=shrinkage), train_b,
                                   UOMO_TASKS, tasks, budget, seed, fit, 4, args.sampler_steps,
                                   mask_lr_scale=args.mask_lr_scale)
        chosen[f"calibration_seed{seed}"] = stats["calibration"]
        engines.append(model)
    out = {"rows": {"fit": len(fit)} | {name: len(b) for name, b in splits.items()}, "chosen_on_fit": chosen}
    for split, batch in splits.items():
        out[split] = {}
        truth = nj.inverse(batch.x)
        for t in tasks:
            task, regions = task_regions(batch, t, UOMO_TASKS)
            scored = (nj, batch, task, regions, truth)
            rows = {name: uomo_row(method_for(baselines[name], t), *scored)
                    for name in ("persistence", "same_area_lookup", "ha", "masked_patch_transformer")}
            runs = [uomo_row(DiTForecaster(m, "umask", n_samples=4, steps=0), *scored) for m in engines]
            rows["engine"] = {k: np.mean([r[k] for r in runs], 0).round(6).tolist() for k in runs[0]}
            rows["engine"]["rmse_std"] = np.std([r["rmse"] for r in runs], 0).round(6).tolist()
            out[split][t] = rows
            log(f"UoMo {split}/{t}: " + ", ".join(f"{m} {r['rmse'][0]:.4f}" for m, r in rows.items()))
    out["wall_s"] = round(time.perf_counter() - wall, 1)
    return out


def transfer(args, engine, work: Path) -> dict:
    """The seed-0 engine on NJ resampled to 30- and 60-minute steps, rescaled, and with POI
    categories dropped, against HA fitted on each variant's train split and persistence; horizons
    in hours (next hour, last 8 hours). `engine_zero_shot` keeps NJ's weights and calibration;
    `engine` keeps the weights and calibrates the residual weight and spread on the variant's val
    split (no gradient step)."""
    variants = {"30min": dict(steps_per_slot=2), "60min": dict(steps_per_slot=4), "x0.05": dict(scale=0.05),
                "x20": dict(scale=20.0), "poi-2": dict(drop_poi=(4, 11))}
    nj_calibration = engine.calibration()
    out = {}
    for name, kwargs in variants.items():
        path = resample_city(args.data, work / f"nj_{name}.npz", **kwargs)
        city = load_city(path, poi_width=21, pad_poi=True)
        task_config = TaskConfig.in_hours(1, 8, city.slots_per_day)
        rows = subset_rows(len(city.batches["test"]), args.eval_entities)
        test, val = city.batches["test"][rows], city.batches["val"][subset_rows(len(city.batches["val"]), args.eval_entities)]
        engine.set_slots_per_day(city.slots_per_day)
        engine.load_calibration(nj_calibration)
        ha = HistoricalAverage(profile=True, slots_per_day=city.slots_per_day).fit(city.batches["train"])
        point = DiTForecaster(engine, "umask", n_samples=4, steps=0)
        out[name] = {t: {"engine_zero_shot": round(evaluate(point, test, t, task_config)["rmse_mean"], 5)} for t in TASKS}
        out[name]["calibration"] = calibrate(engine, val, TASKS, task_config, "umask", n_samples=4, steps=args.sampler_steps)
        for t in TASKS:
            out[name][t] |= {m: round(evaluate(f, test, t, task_config)["rmse_mean"], 5)
                             for m, f in (("engine", point), ("ha", ha), ("persistence", Persistence()))}
        log(f"transfer {name} ({city.slots_per_day} slots/day): {out[name]}")
    engine.set_slots_per_day(96)
    engine.load_calibration(nj_calibration)
    return out


def markdown(table: dict, command: str) -> str:
    lines = [f"# Completion on NJ (test subset), reproduced by `{command}`", "",
             "| method | task | RMSE traffic | RMSE users | MAE traffic | MAE users | RMSE norm (mean of channels) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for method, by_task in table.items():
        for t in TASKS:
            r = by_task.get(t, {})
            if "rmse_orig" not in r:
                continue
            std = f" ± {r['rmse_mean_std']:.4f}" if "rmse_mean_std" in r else ""
            lines.append(f"| {method} | {t} | {r['rmse_orig'][0]:.1f} | {r['rmse_orig'][1]:.3f} | {r['mae_orig'][0]:.1f} "
                         f"| {r['mae_orig'][1]:.3f} | {r['rmse_mean']:.4f}{std} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, steps=1400, batch_size=64, patchtst_steps=600, name="completion_nj")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--entity_conditioning", type=lambda s: s.lower() == "true", default=True,
                        help="POI conditioning (on: better on val, see the README's ablation)")
    parser.add_argument("--eval_entities", type=int, default=168, help="every (N // this)-th val/test entity")
    parser.add_argument("--uomo_only", action="store_true",
                        help="run only UoMo's protocol; it replaces `uomo_protocol` in results/<name>.json")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds, args.patchtst_steps, args.eval_entities = 30, 1, 20, 16
        args.n_samples, args.sampler_steps, args.name = 2, 3, f"{args.name}_quick"
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    nj = load_city(args.data)
    budget = Budget(args.steps, args.batch_size, args.lr, tuple(args.history_dropout), nj.slots_per_day // 24)
    if args.uomo_only:
        path = RESULTS / f"{args.name}.json"
        figures = json.loads(path.read_text()) if path.exists() else {}
        emit(args.name, figures | {"uomo_protocol": uomo_protocol(args, budget)})
        return
    val, test = (nj.batches[s][subset_rows(len(nj.batches[s]), args.eval_entities)] for s in ("val", "test"))

    table, chosen, stats, sparsity, engines = project_protocol(args, nj, val, test, budget)
    uomo = uomo_protocol(args, budget)
    with tempfile.TemporaryDirectory() as work:
        transfers = transfer(args, engines[0], Path(work))

    figures = headline(table, TASKS) | {
        "sparsity": sparsity,
        "uomo_protocol": uomo,
        "transfer": transfers,
        "transfer_never_worse_than_ha": all(transfers[v][t]["engine"] <= transfers[v][t]["ha"]
                                            for v in transfers for t in TASKS),
        "chosen_on_val": chosen,
        "train": stats,
        "table": table,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    sparsity_figure(sparsity, RESULTS / "figures" / f"{args.name}_sparsity.png", "NJ test: RMSE vs dropped history")
    log(" | ".join(f"{m}: " + ", ".join(f"{t} {table[m][t]['rmse_mean']:.4f}" for t in TASKS if "rmse_mean" in table[m][t])
                   for m in table))
    command = "python -m benchmarks.completion_nj " + " ".join(sys.argv[1:])
    with atomic_path(RESULTS / f"{args.name}.md") as tmp:
        tmp.write_text(markdown(table, command.strip()))
    emit(args.name, figures)


if __name__ == "__main__":
    main()
