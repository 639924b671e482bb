"""Completion vs baselines on per-user behaviour tensors: short-term, long-term and cold-start.

    python recipes/compare.py --config recipes/configs/complete_users.yaml \
        --run_dir runs/demo/completion --out_dir runs/demo/compare [--compare_entities 32]

Reads the trained U-MASK + DiT of ``recipes/complete.py train`` (``run_dir``) and scores, on the
same regions (same targets, same available region; completion.evaluate.task_regions with a
fixed seed), the historical average (with the slot-of-day profile fitted on train), ARIMA(1,0,0)
with a daily Fourier regressor (short / long only: it needs a history prefix, so windows with a
missing day in the history make it skip a task, reported under ``skipped``), a PatchTST-style
forecaster trained here on the train split, the same DiT completing from the whole available
region, and U-MASK + DiT. Short / long are scored on the ``split`` users (default test), cold-start
on the ``cold`` split (users unseen in training, ``cold_revealed`` revealed entries each), where
app-category recommendation (Recall / NDCG @k of the categories used in the target period) is
added. Writes ``comparison.json`` and ``comparison.md`` under ``out_dir``.
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from trl import TrlParser

from completion.baselines import ARIMA, DiTForecaster, HistoricalAverage, PatchTST, train_patchtst
from completion.evaluate import task_regions
from completion.metrics import rmse_mae
from completion.recommend import app_channels, recommendation_report
from completion.train import CHECKPOINT, load_model
from recipes.complete import CompleteArguments, load_split
from scope.io import write_json, write_text


@dataclass
class CompareArguments(CompleteArguments):
    out_dir: str = "runs/complete/compare"
    compare_entities: int = 32        # evenly spaced entities per split (0 = all): every method sees the same ones
    cold_split: str = "cold"
    patchtst_steps: int = 100
    patchtst_batch_size: int = 4      # windows per step: each gives C x H x W series (352 on the default tensors)
    arima: bool = True
    threads: int = 0                  # torch threads (0 = leave torch's default)


def _subset(data, n: int):
    if n and len(data.batch) > n:
        rows = torch.linspace(0, len(data.batch) - 1, n).round().long().unique()
        data.batch = data.batch[rows]
        data.user_id = None if data.user_id is None else data.user_id[rows.numpy()]
    return data


def score(method, data, task_name: str, args: CompareArguments, recommend: bool) -> dict:
    task, regions = task_regions(data.batch, task_name, args.task_config, args.seed)
    start = time.perf_counter()
    pred = method.predict(data.batch, task, regions)
    seconds = time.perf_counter() - start
    rmse, mae = rmse_mae(pred, data.batch.x, regions.target)
    rmse_o, mae_o = rmse_mae(data.inverse(pred), data.inverse(data.batch.x), regions.target)
    apps = app_channels(data.channels) or list(range(len(data.channels)))
    out = {"rmse_norm": rmse.nanmean().item(), "mae_norm": mae.nanmean().item(),
           "rmse_apps": rmse_o[apps].nanmean().item(), "mae_apps": mae_o[apps].nanmean().item(),
           "rmse_orig": rmse_o.tolist(), "mae_orig": mae_o.tolist(), "channels": data.channels,
           "entities": len(data.batch), "target_entries": int(regions.target.sum()),
           "ms_per_entity": 1000 * seconds / max(len(data.batch), 1)}
    if recommend and any(c.startswith("app:") for c in data.channels):
        target = regions.target.expand_as(data.batch.x) if regions.target.dim() == 4 else regions.target
        rec = recommendation_report(pred, data.batch.x, target, app_channels(data.channels), data.inverse)
        out.update({k: v for k, v in rec.items() if k.startswith(("recall@", "ndcg@", "users"))})
    return out


def markdown(table: dict) -> str:
    lines = []
    for task, rows in table.items():
        keys = [k for k in ("rmse_norm", "mae_norm", "rmse_apps", "mae_apps", "recall@3", "ndcg@3")
                if any(k in r for r in rows.values())]
        lines += [f"### {task}", "", "| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for method, r in rows.items():
            lines.append(f"| {method} | " + " | ".join(f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, ""))
                                                     for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)


def main(args: CompareArguments) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_model(Path(args.run_dir) / CHECKPOINT).to(args.device)
    train = load_split(args, "train")
    splits = {"short": args.split, "long": args.split, "cold": args.cold_split}
    data = {s: _subset(load_split(args, s), args.compare_entities) for s in set(splits.values())}
    slots_per_day = train.slots_per_day
    T = train.batch.x.shape[2]

    ha = HistoricalAverage(profile=True, slots_per_day=slots_per_day).fit(train.batch)
    torch.manual_seed(args.seed)
    patchtst = PatchTST(T=T, channels=train.batch.x.shape[1], slots_per_day=slots_per_day)
    losses = train_patchtst(patchtst, train.batch, args.task_config, ("short", "long"), steps=args.patchtst_steps,
                            batch_size=args.patchtst_batch_size, seed=args.seed)
    methods = {"historical average": ha, "PatchTST-style": patchtst,
               "DiT, whole available region": DiTForecaster(model, "available", args.n_samples, args.sampler_steps, args.seed),
               "U-MASK + DiT": DiTForecaster(model, "umask", args.n_samples, args.sampler_steps, args.seed)}
    arima = ARIMA((1, 0, 0), 2, slots_per_day=slots_per_day).fit(train.batch) if args.arima else None
    table, skipped = {}, {}
    for task_name, split in splits.items():
        if task_name not in args.eval_tasks and task_name != "cold":
            continue
        d = data[split]
        if len(d.batch) == 0:
            table[task_name] = {}
            continue
        rows = {}
        for name, method in methods.items():
            rows[name] = score(method, d, task_name, args, recommend=task_name == "cold")
            if name == "historical average" and arima is not None and task_name != "cold":
                try:
                    rows["ARIMA(1,0,0) + daily Fourier"] = score(arima, d, task_name, args, recommend=False)
                except ValueError as err:  # e.g. missing days leave no history prefix to fit a series on
                    skipped[f"ARIMA ({task_name})"] = str(err)
            print(f"{task_name}/{name}: rmse_norm {rows[name]['rmse_norm']:.4f}", flush=True)
        table[task_name] = rows
    report = {"split": args.split, "cold_split": args.cold_split, "entities": {s: len(d.batch) for s, d in data.items()},
              "tasks": table, "skipped": skipped, "patchtst_final_loss": float(np.mean(losses[-20:])) if losses else None,
              "wall_s": round(time.perf_counter() - start, 1),
              "note": "RMSE/MAE on target entries only; *_norm in log1p z-scored units (mean over channels), "
                      "*_apps in records per 15-minute slot (mean over app-category channels), *_orig per channel "
                      "in original units. Baselines read the whole available region; "
                      "U-MASK reveals the subset it chooses."}
    out = Path(args.out_dir)
    write_json(out / "comparison.json", report)
    notes = "".join(f"- {k} not scored: {v}\n" for k, v in skipped.items())
    write_text(out / "comparison.md", "# Completion vs baselines\n\n" + markdown(table) + notes)
    print(markdown(table))
    return report


if __name__ == "__main__":
    (arguments,) = TrlParser((CompareArguments,)).parse_args_and_config(sys.argv[1:])
    main(arguments)
