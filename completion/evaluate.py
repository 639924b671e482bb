"""Score any forecaster (`predict(batch, task, regions)`) on one task of a split.

The regions come from `make_regions` with a fixed seed, so every method of a comparison sees the
same targets and the same available region. Scores are RMSE/MAE per channel on target entries,
in normalised and (given the loader's inverse transform) original units, plus the mean over
channels of the normalised RMSE, the single number the benchmark's gains compare.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from completion.data import Batch
from completion.masks import MaskOutput
from completion.metrics import rmse_mae
from completion.model import CompletionModel
from completion.tasks import Regions, TaskConfig, make_regions, task_index


def task_regions(batch: Batch, task_name: str, config: TaskConfig, seed: int = 0) -> tuple[Tensor, Regions]:
    """The task index per entity and its regions, drawn with a fixed seed."""
    task = torch.full((len(batch),), task_index(task_name), dtype=torch.long)
    regions = make_regions(task, batch.observed, batch.x.shape[1], config, torch.Generator().manual_seed(seed))
    return task, regions


def evaluate(method, batch: Batch, task_name: str, config: TaskConfig,
             inverse: Callable[[Tensor], Tensor] | None = None, seed: int = 0) -> dict:
    """Point-error report of `method` on one task; `ms_per_entity` times its predict call."""
    task, regions = task_regions(batch, task_name, config, seed)
    start = time.perf_counter()
    pred = method.predict(batch, task, regions)
    seconds = time.perf_counter() - start
    rmse, mae = rmse_mae(pred, batch.x, regions.target)
    report = {"rmse": rmse.tolist(), "mae": mae.tolist(), "rmse_mean": rmse.nanmean().item()}
    if inverse is not None:
        rmse, mae = rmse_mae(inverse(pred), inverse(batch.x), regions.target)
        report |= {"rmse_orig": rmse.tolist(), "mae_orig": mae.tolist()}
    report["ms_per_entity"] = 1000 * seconds / len(batch)
    return report


EVIDENCE = ("umask", "available")


@torch.no_grad()
def sample_chunked(model: CompletionModel, batch: Batch, task: Tensor, regions: Regions,
                   evidence: str = "umask", n_samples: int = 8, steps: int | None = 20,
                   seed: int = 0, chunk: int = 256) -> Tensor:
    """`n_samples` completions [S, B, C, T, H, W] (on the CPU) in chunks of entities, on the model's
    device; evidence = U-MASK's choice or the whole available region."""
    if evidence not in EVIDENCE:
        raise ValueError(f"unknown evidence {evidence!r}; expected one of {EVIDENCE}")
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    out = []
    for i in range(0, len(batch), chunk):
        rows = slice(i, i + chunk)
        sub = Regions(*(r[rows].to(device) for r in (regions.target, regions.available, regions.visible)))
        M = sub.available.float() if evidence == "available" else None
        out.append(model.complete(batch[rows].to(device), task[rows].to(device), sub, n_samples=n_samples,
                                  steps=steps, M=M, generator=g).samples.cpu())
    return torch.cat(out, dim=1)


@torch.no_grad()
def umask_outputs(model: CompletionModel, batch: Batch, tasks: tuple[str, ...], config: TaskConfig
                  ) -> dict[str, tuple[MaskOutput, Regions]]:
    """U-MASK's evaluation-mode mask for every entity, per task (for budgets and figures)."""
    model.eval()
    out = {}
    for name in tasks:
        task, regions = task_regions(batch, name, config)
        x0 = batch.x - model.offset(batch.x, regions)
        out[name] = (model.umask(x0, regions.available, regions.visible, batch.cells, task), regions)
    return out
