"""What the two completion benchmarks (`completion_nj`, `completion_users`) share: training a model
per seed, the simple baselines chosen on val, the sparsity sweep, summaries over seeds, the
engine's gain over the best simple baseline, and the sparsity figure.

Protocol (both benchmarks): normalisation and training on the train split; every choice (HA
profile, ARIMA order, which fixed mask) on val; tables on test. Every baseline reads the whole
available region; U-MASK reveals the subset it chooses. Models are trained once per seed, with
random history dropout, and evaluated at every sparsity level.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

from completion.baselines import ARIMA, DiTForecaster, HistoricalAverage, MaskedPatchTransformer, Persistence, train_patch_transformer
from completion.batch import Batch
from completion.evaluate import Sparsity, calibrate, evaluate
from completion.masks import FIXED_MASKS
from completion.model import CompletionModel, ModelConfig
from completion.tasks import DROP_KINDS, TaskConfig
from completion.train import TrainConfig, train

SIMPLE = ("persistence", "ha", "arima", "masked_patch_transformer", "patchtst_transformers", "hu_knn")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Budget:
    """Training budget of every DiT of a benchmark."""

    steps: int
    batch_size: int
    lr: float
    history_dropout: tuple[float, ...]
    dropout_block_slots: int
    dropout_share: float = 0.25
    mask_ratio: float = 0.81


def train_model(model_config: ModelConfig, data: Batch, task_config: TaskConfig, tasks: tuple[str, ...],
                budget: Budget, seed: int, val: Batch | None = None, n_samples: int = 8, sampler_steps: int = 20,
                **train_kwargs) -> tuple[CompletionModel, dict]:
    """Train one DiT (EMA weights returned, in eval mode), calibrate it on `val` when given (residual
    weight and spread, with the evidence it was trained with), and report its speed and final loss."""
    config = TrainConfig(steps=budget.steps, batch_size=budget.batch_size, lr=budget.lr, seed=seed, tasks=tasks,
                         checkpoint_every=budget.steps, history_dropout=budget.history_dropout,
                         dropout_share=budget.dropout_share,
                         dropout_block_slots=budget.dropout_block_slots, mask_ratio=budget.mask_ratio, **train_kwargs)
    start = time.perf_counter()
    _, ema, logs = train(model_config, data, task_config, config, progress=False)
    seconds = time.perf_counter() - start
    stats = {"train_s": round(seconds, 1), "samples_per_s": round(budget.steps * budget.batch_size / seconds, 1),
             "final_L_rec": float(np.mean([r["L_rec"] for r in logs[-50:]])),
             "final_rho": float(np.mean([r["rho"] for r in logs[-50:]]))}
    if val is not None:
        evidence = "umask" if config.mask == "umask" else "available"
        stats["calibration"] = calibrate(ema, val, tasks, task_config, evidence, n_samples, sampler_steps)
    return ema, stats


def fit_baselines(train_b: Batch, val: Batch, task_config: TaskConfig, tasks: tuple[str, ...], slots_per_day: int,
                  patchtst_steps: int, patchtst_batch: int, seed: int, arima_val: int = 64,
                  arima: bool = True) -> tuple[dict, dict]:
    """Persistence, HA (profile or not, chosen on val), ARIMA (order and harmonics per task, chosen
    on a val subset) and the hand-written masked patch transformer (trained with `seed`) -> ({name: method or {task:
    method}}, choices)."""
    chosen = {}
    candidates = {p: HistoricalAverage(profile=p, slots_per_day=slots_per_day).fit(train_b) for p in (False, True)}
    best = min(candidates, key=lambda p: np.mean([evaluate(candidates[p], val, t, task_config)["rmse_mean"]
                                                  for t in tasks]))
    chosen["ha_profile"] = best
    methods = {"persistence": Persistence(), "ha": candidates[best]}
    forecast = tuple(t for t in tasks if t != "cold")
    if arima and forecast:
        methods["arima"] = {}
        for t in forecast:
            grid = {(order, K): ARIMA(order, K, slots_per_day=slots_per_day).fit(train_b)
                    for order in ((1, 0, 0), (2, 0, 0)) for K in (0, 2)}
            key = min(grid, key=lambda k: evaluate(grid[k], val[:arima_val], t, task_config)["rmse_mean"])
            chosen[f"arima_{t}"] = {"order": key[0], "fourier": key[1]}
            methods["arima"][t] = grid[key]
    torch.manual_seed(seed)
    patchtst = MaskedPatchTransformer(T=train_b.x.shape[2], channels=train_b.x.shape[1], slots_per_day=slots_per_day)
    train_patch_transformer(patchtst, train_b, task_config, forecast or tasks, steps=patchtst_steps,
                   batch_size=patchtst_batch, seed=seed)
    methods["masked_patch_transformer"] = patchtst
    return methods, chosen


def method_for(method, task: str):
    """A method, or its per-task instance ({task: method}); None where it has none for the task."""
    return method.get(task) if isinstance(method, dict) else method


def score(method, batch: Batch, tasks: tuple[str, ...], task_config: TaskConfig, inverse=None,
          sparsity: Sparsity | None = None) -> dict:
    """{task: report} of `evaluate` for the tasks the method handles."""
    out = {}
    for t in tasks:
        m = method_for(method, t)
        if m is None:
            continue
        try:
            out[t] = evaluate(m, batch, t, task_config, inverse, sparsity=sparsity)
        except ValueError as err:  # ARIMA on scattered history (cold start, or dropped entries)
            out[t] = {"skipped": str(err)}
    return out


def summarise(reports: list[dict]) -> dict:
    """Mean over seeds of every numeric leaf of {task: report} dicts, with `<key>_std` for the
    normalised RMSE when there are several seeds."""
    out = {}
    for t in reports[0]:
        if "skipped" in reports[0][t]:
            out[t] = reports[0][t]
            continue
        out[t] = {}
        for key, value in reports[0][t].items():
            values = np.array([r[t][key] for r in reports], dtype=np.float64)
            out[t][key] = np.round(values.mean(0), 6).tolist()
            if key == "rmse_mean":
                out[t]["rmse_mean_std"] = round(float(values.std(0)), 6)
                out[t]["rmse_mean_seeds"] = np.round(values, 6).tolist()
    return out


def gain(engine: float, reference: float) -> float:
    """Relative RMSE gain of the engine (> 0: the engine is better)."""
    return round(1 - engine / reference, 4)


def best_simple(table: dict, task: str) -> tuple[str, float]:
    """The simple baseline with the lowest normalised RMSE on `task`."""
    scores = {m: table[m][task]["rmse_mean"] for m in SIMPLE if m in table and "rmse_mean" in table[m].get(task, {})}
    name = min(scores, key=scores.get)
    return name, scores[name]


def sparsity_sweep(engines: list[CompletionModel], fixed: list[CompletionModel], batch: Batch,
                   tasks: tuple[str, ...], task_config: TaskConfig, levels: tuple[float, ...],
                   block_slots: int, n_samples: int) -> dict:
    """RMSE (point estimate) at every level and drop kind for U-MASK, the whole available region
    (same engines) and the best fixed mask, mean +- std over seeds, per task and averaged.

    -> {level: {umask, best_fixed, whole_region (mean over tasks and kinds, mean over seeds),
    *_std, detail: {kind: {task: {...}}}}}"""
    out = {}
    for level in levels:
        detail = {}
        seeds = {"umask": [], "whole_region": [], "best_fixed": []}
        for kind in DROP_KINDS:
            sparsity = Sparsity(level, kind, block_slots)
            detail[kind] = {}
            per_seed = {name: [] for name in seeds}
            for name, models, evidence in (("umask", engines, "umask"), ("whole_region", engines, "available"),
                                           ("best_fixed", fixed, "available")):
                for model in models:
                    f = DiTForecaster(model, evidence, n_samples=n_samples, steps=0)
                    per_seed[name].append({t: evaluate(f, batch, t, task_config, sparsity=sparsity)["rmse_mean"]
                                           for t in tasks})
            for t in tasks:
                detail[kind][t] = {name: round(float(np.mean([r[t] for r in runs])), 5)
                                   for name, runs in per_seed.items()}
            for name, runs in per_seed.items():
                seeds[name].append([np.mean([r[t] for t in tasks]) for r in runs])
        entry = {}
        for name, runs in seeds.items():
            per_seed_mean = np.mean(np.array(runs), axis=0)  # mean over kinds (and tasks), per seed
            entry[name] = round(float(per_seed_mean.mean()), 5)
            entry[f"{name}_std"] = round(float(per_seed_mean.std()), 5)
        entry["umask_vs_fixed_gain"] = gain(entry["umask"], entry["best_fixed"])
        entry["umask_vs_whole_gain"] = gain(entry["umask"], entry["whole_region"])
        entry["detail"] = detail
        out[str(level)] = entry
        log(f"sparsity {level}: umask {entry['umask']:.4f} fixed {entry['best_fixed']:.4f} "
            f"whole {entry['whole_region']:.4f}")
    return out


def choose_fixed_mask(model_config: ModelConfig, train_b: Batch, val: Batch, task_config: TaskConfig,
                      tasks: tuple[str, ...], budget: Budget, kinds: tuple[str, ...] = FIXED_MASKS,
                      n_samples: int = 4, sampler_steps: int = 20) -> tuple[str, dict, dict]:
    """Train (and calibrate on val) every fixed mask with seed 0, keep the best on val -> (kind, {kind: model},
    {kind: val rmse})."""
    models, val_rmse = {}, {}
    for kind in kinds:
        model, _ = train_model(model_config, train_b, task_config, tasks, budget, 0, val, n_samples, sampler_steps,
                               mask=kind)
        f = DiTForecaster(model, "available", n_samples=n_samples, steps=0)
        val_rmse[kind] = float(np.mean([evaluate(f, val, t, task_config)["rmse_mean"] for t in tasks]))
        models[kind] = model
        log(f"fixed mask {kind}: val {val_rmse[kind]:.4f}")
    return min(val_rmse, key=val_rmse.get), models, val_rmse


def sparsity_figure(sparsity: dict, path, title: str):
    """RMSE against the share of history dropped, for the three evidence strategies (mean +- std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scope.io import save_figure

    levels = [float(k) for k in sparsity]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("umask", "U-MASK"), ("best_fixed", "best fixed mask"), ("whole_region", "whole available region")):
        mean = np.array([sparsity[k][name] for k in sparsity])
        std = np.array([sparsity[k][f"{name}_std"] for k in sparsity])
        ax.errorbar(levels, mean, yerr=std, marker="o", capsize=3, label=label)
    ax.set(xlabel="share of history entries dropped (mean of uniform and hour blocks)",
           ylabel="normalised RMSE (mean of tasks)", title=title)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def add_arguments(parser: argparse.ArgumentParser, steps: int, batch_size: int, patchtst_steps: int, name: str) -> None:
    """The command-line options both benchmarks share (their defaults differ per dataset)."""
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch_size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--mask_lr_scale", type=float, default=1.0)
    parser.add_argument("--history_dropout", type=float, nargs="*", default=[0.5, 0.8, 0.95])
    parser.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.5, 0.8, 0.95])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n_samples", type=int, default=8)
    parser.add_argument("--sampler_steps", type=int, default=20)
    parser.add_argument("--patchtst_steps", type=int, default=patchtst_steps)
    parser.add_argument("--fixed_kinds", nargs="+", default=["random", "tube", "temporal"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny budget, one seed: a smoke run, numbers meaningless")
    parser.add_argument("--name", default=name)


def headline(table: dict, tasks: tuple[str, ...]) -> dict:
    """The issue's keys: the engine's gain over the best simple baseline and over the best fixed
    mask per task, and its calibrated samples' coverage and CRPS."""
    out = {}
    for t in tasks:
        base, base_rmse = best_simple(table, t)
        out[f"engine_vs_best_baseline_{t}"] = gain(table["engine"][t]["rmse_mean"], base_rmse)
        out[f"best_baseline_{t}"] = base
        out[f"umask_vs_fixed_{t}_rmse_gain"] = gain(table["engine"][t]["rmse_mean"], table["best_fixed"][t]["rmse_mean"])
    out["coverage90"] = {t: table["engine"][t]["coverage90"] for t in tasks}
    out["crps"] = {t: table["engine"][t]["crps"] for t in tasks}
    return out
