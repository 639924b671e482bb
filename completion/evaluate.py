"""Score any forecaster (`predict(batch, task, regions)`) on one task of a split; complete and
calibrate the engine's samples.

The regions come from `make_regions` with a fixed seed (after the sparsity protocol's drops, if
any), so every method of a comparison sees the same targets and the same available region. Scores are RMSE/MAE per channel on target entries,
in normalised and (given the loader's inverse transform) original units, plus the mean over
channels of the normalised RMSE, the single number the benchmark's gains compare.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from completion.batch import Batch
from completion.masks import MaskOutput
from completion.metrics import completion_report, point_errors, rmse_mae
from completion.model import CompletionModel
from completion.priors import carry_prior, profile_at, shrunk_mean, slot_profile
from completion.recommend import recommendation_report
from completion.tasks import Regions, TaskConfig, drop_history, make_regions, task_index


@dataclass(frozen=True)
class Sparsity:
    """The sparsity protocol: drop `fraction` of the history entries (`completion.tasks.drop_history`)
    before the regions are drawn; dropped entries are neither evidence nor targets."""

    fraction: float = 0.0
    kind: str = "uniform"  # uniform | block
    block_slots: int = 4


def task_regions(batch: Batch, task_name: str, config: TaskConfig, seed: int = 0,
                 sparsity: Sparsity | None = None) -> tuple[Tensor, Regions]:
    """The task index per entity and its regions, drawn with a fixed seed (after the history
    entries of `sparsity` are dropped)."""
    task = torch.full((len(batch),), task_index(task_name), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    observed = batch.observed
    if sparsity is not None and sparsity.fraction > 0:
        observed = drop_history(observed, task, config, sparsity.fraction, sparsity.kind, sparsity.block_slots, g)
    return task, make_regions(task, observed, batch.x.shape[1], config, g)


def evaluate(method, batch: Batch, task_name: str, config: TaskConfig,
             inverse: Callable[[Tensor], Tensor] | None = None, seed: int = 0,
             sparsity: Sparsity | None = None, level: float = 0.9,
             recommend_channels: list[int] | None = None, per_entity: bool = False) -> dict:
    """The one scoring of a completion method on one task of a split (the recipes and the
    benchmarks all use it): point errors per channel, their means over channels (`rmse_mean`,
    `mae_mean`, the numbers the comparisons rank by), `ms_per_entity` of the predict call, and the
    number of target entries. A method that leaves its samples in `method.samples`
    (`DiTForecaster`) also gets CRPS and `level` coverage; `recommend_channels` adds the
    recommendation scores of those channels (cold start); `per_entity` adds each entity's summed
    squared error and number of target entries per channel (`entity_sq_error`, `entity_targets`,
    [B, C] tensors), from which a bootstrap over entities rescores the RMSE."""
    task, regions = task_regions(batch, task_name, config, seed, sparsity)
    start = time.perf_counter()
    pred = method.predict(batch, task, regions)
    seconds = time.perf_counter() - start
    samples = getattr(method, "samples", None)
    if samples is not None and len(samples) > 1:
        report = completion_report(samples, batch.x, regions.target, inverse, level, point=pred)
    else:
        report = point_errors(pred, batch.x, regions.target, inverse)
    report["rmse_mean"] = torch.tensor(report["rmse"]).nanmean().item()
    report["mae_mean"] = torch.tensor(report["mae"]).nanmean().item()
    if recommend_channels:
        report["recommendation"] = recommendation_report(pred, batch.x, regions.target, recommend_channels, inverse)
    report["target_entries"] = int(regions.target.sum())
    if per_entity:
        w = regions.target.to(pred.dtype)
        dims = list(range(2, pred.dim()))
        report["entity_sq_error"] = ((pred - batch.x) ** 2 * w).sum(dims)
        report["entity_targets"] = w.sum(dims)
    report["ms_per_entity"] = 1000 * seconds / len(batch)
    return report


EVIDENCE = ("umask", "available")


@torch.no_grad()
def complete_chunked(model: CompletionModel, batch: Batch, task: Tensor, regions: Regions,
                     evidence: str = "umask", n_samples: int = 8, steps: int | None = 20,
                     seed: int = 0, chunk: int = 256, recenter: bool = True, eta: float | None = None
                     ) -> tuple[Tensor, Tensor]:
    """Samples [S, B, C, T, H, W] and point estimates [B, C, T, H, W] (on the CPU), in chunks of
    entities on the model's device; evidence = U-MASK's choice or the whole available region; `eta`:
    the sampler's stochasticity (`completion.diffusion.sample`; None: its default)."""
    if evidence not in EVIDENCE:
        raise ValueError(f"unknown evidence {evidence!r}; expected one of {EVIDENCE}")
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    samples, points = [], []
    for i in range(0, len(batch), chunk):
        rows = slice(i, i + chunk)
        sub = regions[rows]
        sub = Regions(sub.target.to(device), sub.available.to(device), sub.visible.to(device))
        M = sub.available.float() if evidence == "available" else None
        out = model.complete(batch[rows].to(device), task[rows].to(device), sub, n_samples=n_samples,
                             steps=steps, eta=eta, M=M, generator=g, recenter=recenter)
        samples.append(out.samples.cpu())
        points.append(out.point.cpu())
    return torch.cat(samples, dim=1), torch.cat(points)


@torch.no_grad()
def umask_outputs(model: CompletionModel, batch: Batch, tasks: tuple[str, ...], config: TaskConfig
                  ) -> dict[str, tuple[MaskOutput, Regions]]:
    """U-MASK's evaluation-mode mask for every entity, per task (for budgets and figures)."""
    model.eval()
    out = {}
    for name in tasks:
        task, regions = task_regions(batch, name, config)
        x0 = batch.x - model.offset(batch.x, regions)
        out[name] = (model.evidence_mask(x0, batch, regions, task, None, None)[1], regions)
    return out


def spread_factor(samples: Tensor, truth: Tensor, target: Tensor, level: float = 0.9,
                  iterations: int = 40) -> Tensor:
    """Per channel, the factor f by which the samples' deviations from their mean must be scaled
    for the central `level` interval to cover a share `level` of the target entries -> [C].

    Quantiles are equivariant under `mean + f (sample - mean)`, so coverage is found for any f
    without resampling; f is bisected in log space on [1e-3, 1e3] (monotone: a wider interval
    covers more).
    """
    mean = samples.mean(0)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=samples.dtype)
    lo, hi = torch.quantile(samples - mean, q, dim=0)
    w = target.to(samples.dtype)
    dims = [0] + list(range(2, truth.dim()))
    C = truth.shape[1]
    log_lo, log_hi = torch.full((C,), -3 * math.log(10)), torch.full((C,), 3 * math.log(10))
    for _ in range(iterations):
        mid = (log_lo + log_hi) / 2
        f = mid.exp()[None, :, None, None, None]
        inside = ((truth >= mean + f * lo) & (truth <= mean + f * hi)).to(samples.dtype)
        covered = (inside * w).sum(dims) / w.sum(dims).clamp(min=1)
        too_narrow = covered < level
        log_lo, log_hi = torch.where(too_narrow, mid, log_lo), torch.where(too_narrow, log_hi, mid)
    return ((log_lo + log_hi) / 2).exp()


@torch.no_grad()
def calibrate(model: CompletionModel, batch: Batch, tasks: tuple[str, ...], config: TaskConfig,
              evidence: str = "umask", n_samples: int = 8, steps: int | None = 20, seed: int = 0,
              level: float = 0.9) -> dict[str, dict[str, float | list[float]]]:
    """Calibrate on `batch` (validation entities; never the scored split), per task: the residual's
    weight alpha (least squares in [0, 1] between the prior and the full point estimate), then the
    samples' spread for `level` coverage. Returns {task: {alpha, spread}}."""
    out = {}
    for name in tasks:
        tau = task_index(name)
        task, regions = task_regions(batch, name, config, seed)
        model.residual_weight[tau] = 1.0
        _, full = complete_chunked(model, batch, task, regions, evidence, n_samples, 0, seed)
        model.residual_weight[tau] = 0.0
        _, prior = complete_chunked(model, batch, task, regions, evidence, n_samples, 0, seed)
        w = regions.target.to(full.dtype)
        step = full - prior
        alpha = ((step * (batch.x - prior) * w).sum() / (step**2 * w).sum().clamp(min=1e-12)).clamp(0, 1)
        model.residual_weight[tau] = alpha
        out[name] = {"alpha": round(alpha.item(), 4)}
    for name, spread in calibrate_spread(model, batch, tasks, config, evidence, n_samples, steps, seed, level).items():
        out[name]["spread"] = spread
    return out


@torch.no_grad()
def calibrate_spread(model: CompletionModel, batch: Batch, tasks: tuple[str, ...], config: TaskConfig,
                     evidence: str = "umask", n_samples: int = 8, steps: int | None = 20, seed: int = 0,
                     level: float = 0.9) -> dict[str, list[float]]:
    """Set `model.spread` per task and channel so the `level` interval covers `level` of the targets
    of `batch` (validation entities; never the scored split). Returns the new spreads."""
    out = {}
    for name in tasks:
        task, regions = task_regions(batch, name, config, seed)
        samples, _ = complete_chunked(model, batch, task, regions, evidence, n_samples, steps, seed)
        factor = spread_factor(samples, batch.x, regions.target, level)
        model.spread[task_index(name)] *= factor.to(model.spread)
        out[name] = model.spread[task_index(name)].tolist()
    return out


DAMPING_GRID = (1.0, 0.97, 0.9, 0.7, 0.5, 0.0)
SHRINKAGE_GRID = (0.0, 1.0, 4.0, 16.0)


def choose_prior(train: Batch, val: Batch, tasks: tuple[str, ...], config: TaskConfig, slots_per_day: int,
                 seasonal: bool = True, center: bool = True, dampings: tuple[float, ...] = DAMPING_GRID,
                 shrinkages: tuple[float, ...] = SHRINKAGE_GRID,
                 tolerance: float = 0.02) -> tuple[float, float, dict[str, float]]:
    """The `carry` prior's damping and shrinkage with the lowest val RMSE (mean over tasks, whole
    available region, centred as the engine centres; no training involved) -> (damping, shrinkage,
    {"damping/shrinkage": val RMSE}). The damping is the best one at the chosen shrinkage, and the
    shrinkage the first of the grid whose best damping comes within `tolerance` (relative) of the
    overall best: no shrinkage unless it clearly pays. The slot-of-day profile is fitted on `train`. Persistence-like data (city traffic) picks damping
    ~1, bursty per-user counts ~0.5; cold-start users with four revealed entries want their few
    values shrunk."""
    profile = slot_profile(train.x, train.observed, train.timestamps, slots_per_day) if seasonal else None
    season = None if profile is None else profile_at(profile, val.timestamps)
    regions = {name: task_regions(val, name, config)[1] for name in tasks}
    scores = {}
    for k in shrinkages:
        for d in dampings:
            errors = []
            for name in tasks:
                evidence = regions[name].evidence(regions[name].available.to(val.x.dtype))
                offset = shrunk_mean(val.x, evidence, k) if center else torch.zeros_like(val.x[:, :, :1, :1, :1])
                pred = offset + carry_prior(val.x - offset, evidence, d, season, k)
                errors.append(rmse_mae(pred, val.x, regions[name].target)[0].nanmean().item())
            scores[f"{d:g}/{k:g}"] = float(sum(errors) / len(errors))
    best = min(scores.values())
    shrinkage = next(k for k in shrinkages if min(scores[f"{d:g}/{k:g}"] for d in dampings) <= best * (1 + tolerance))
    damping = min(dampings, key=lambda d: scores[f"{d:g}/{shrinkage:g}"])
    return float(damping), float(shrinkage), scores
