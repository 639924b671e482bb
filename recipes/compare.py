"""The completion engine against simple baselines on the same regions: short-term, long-term and
cold-start, on per-user tensors or a UoMo-format city file.

    python recipes/compare.py --config recipes/configs/complete_users.yaml \
        --engine_dir runs/demo/completion --output_dir runs/demo/compare [--compare_entities 32]

Reads the trained engine of ``recipes/complete.py train`` (``engine_dir``, by default the config's
``output_dir``, where training wrote it) with its calibration to this data
(``calibration_<data>.json`` there, as evaluate and predict apply it) and scores with ``completion.evaluate.evaluate``, on the same
regions (same targets, same available region; completion.evaluate.task_regions with a fixed
seed): persistence (the last available value), the historical average (with the slot-of-day
profile fitted on train), ARIMA(1,0,0) with a daily Fourier regressor (short / long only: it needs
a history prefix; windows where a missing day breaks the prefix make it skip that task, reported
under ``skipped``), a hand-written masked patch transformer trained here on the train split, the same engine
completing from the whole available region, and the engine with its own evidence (U-MASK, or the
whole region for a fixed-mask checkpoint), and two conditioning controls of the same engine (point
estimates): every user read with the cohort's mean entity vector, and with another user's
(``completion.baselines.ConditioningControl``): what h_u adds at test. Short / long are scored on the ``split`` entities;
cold-start, when ``eval_tasks`` has it, on ``cold_split`` (default: the ``cold`` users of
per-user tensors, ``split`` on a city file), with app-category recommendation (Recall / NDCG @k of
the categories used in the target period) where the data has app channels. Writes
``comparison.json`` and ``comparison.md`` (whose first line names the best method per task)
under ``output_dir``; ``engine_minus_baseline`` holds, per task and simple baseline, the engine's
``rmse_norm`` minus the baseline's with a paired bootstrap 95% CI over users (entities on a city file);
``embedding_probe`` (with user embeddings) the held-out R^2 of a ridge probe from the SBERT encodings and from
the engine's h_u to each ``split`` user's statistics, fitted on the train users (``completion.users.embedding_probe``).
"""

import json
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from completion.baselines import (ARIMA, ConditioningControl, DiTForecaster, HistoricalAverage, MaskedPatchTransformer,
                                  Persistence, train_patch_transformer)
from completion.evaluate import evaluate
from completion.masks import UMaskConfig
from completion.model import ModelConfig
from completion.recommend import app_channels
from completion.tasks import TaskConfig
from completion.train import CHECKPOINT, TrainConfig, checkpoint_configs, load_model
from completion.users import embedding_probe
from recipes.complete import CompleteArguments, Configs, _evidence, calibration_path, load_split
from scope.cli import parse_config, run_recipe
from scope.io import write_json, write_text
from scope.metrics import bootstrap_weights

ENGINE = "engine (U-MASK + DiT over the prior)"


@dataclass
class CompareArguments:
    """Settings of the comparison, parsed beside the completion config it shares with complete.py."""

    engine_dir: str = ""              # the trained engine; "" = the config's output_dir
    compare_entities: int = 32        # evenly spaced entities per split (0 = all): every method sees the same ones
    cold_split: str = ""              # "" = the cold users of per-user tensors, `split` on a city file
    patch_transformer_steps: int = 100
    patch_transformer_batch_size: int = 4      # windows per step: each gives C x H x W series (352 on the default tensors)
    arima: bool = True


def _subset(data, n: int):
    if n and len(data.batch) > n:
        rows = torch.linspace(0, len(data.batch) - 1, n).round().long().unique()
        data.batch = data.batch[rows]
        data.user_id = None if data.user_id is None else data.user_id[rows.numpy()]
    return data


def score(method, data, task_name: str, cfg: Configs, recommend: bool) -> tuple[dict, tuple]:
    """`completion.evaluate.evaluate`, summarised over channels (all, and the app categories), and the
    per-entity errors (squared error, target entries [B, C]) that :func:`rmse_difference` resamples."""
    has_apps = any(c.startswith("app:") for c in data.channels)
    apps = app_channels(data.channels) if has_apps else list(range(len(data.channels)))
    report = evaluate(method, data.batch, task_name, cfg.task, data.inverse, cfg.train.seed,
                      recommend_channels=app_channels(data.channels) if recommend and has_apps else None,
                      per_entity=True)
    rmse_o, mae_o = torch.tensor(report["rmse_orig"]), torch.tensor(report["mae_orig"])
    out = {"rmse_norm": report["rmse_mean"], "mae_norm": report["mae_mean"],
           "rmse_apps": rmse_o[apps].nanmean().item(), "mae_apps": mae_o[apps].nanmean().item(),
           "rmse_orig": report["rmse_orig"], "mae_orig": report["mae_orig"], "channels": data.channels,
           "entities": len(data.batch), "target_entries": report["target_entries"],
           "ms_per_entity": report["ms_per_entity"]}
    out.update({k: v for k, v in report.get("recommendation", {}).items() if k.startswith(("recall@", "ndcg@", "users"))})
    return out, (report["entity_sq_error"].double().numpy(), report["entity_targets"].double().numpy())


def rmse_difference(a: tuple, b: tuple, clusters=None, n_boot: int = 2000, seed: int = 0) -> dict:
    """``rmse_norm`` of ``a`` minus that of ``b`` (per-entity errors of :func:`score` on the same
    entities) and its percentile bootstrap 95% CI, resampling ``clusters`` (each entity's user; None:
    the entities themselves) with replacement, each with all its entities."""
    (sq_a, n), (sq_b, _) = a, b
    ids = np.unique(np.arange(len(n)) if clusters is None else np.asarray(clusters), return_inverse=True)[1]
    k = int(ids.max()) + 1
    sums = []
    for x in (sq_a, sq_b, n):
        sums.append(np.zeros((k, x.shape[1])))
        np.add.at(sums[-1], ids, x)
    weights = bootstrap_weights(k, n_boot, seed)   # row 0: the sample itself, then the resamples
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # a resample without targets in a channel
        rmse = [np.nanmean(np.sqrt((weights @ s) / (weights @ sums[2])), 1) for s in sums[:2]]
    diff = rmse[0] - rmse[1]
    lo, hi = np.nanquantile(diff[1:], [0.025, 0.975])
    return {"mean": float(diff[0]), "ci95": [float(lo), float(hi)], "clusters": k,
            "resampled": "entities" if clusters is None else "users"}


def headline(table: dict) -> str:
    """One sentence per task: the best method by normalised RMSE, and the engine's gain or loss against
    the best simple baseline."""
    parts = []
    for task, rows in table.items():
        if not rows:
            continue
        best = min(rows, key=lambda m: rows[m]["rmse_norm"])
        simple = {m: r for m, r in rows.items() if not m.startswith(("engine", "DiT"))}
        line = f"{task}: best is {best} ({rows[best]['rmse_norm']:.4f})"
        if ENGINE in rows and simple:
            base = min(simple, key=lambda m: simple[m]["rmse_norm"])
            gain = 1 - rows[ENGINE]["rmse_norm"] / simple[base]["rmse_norm"]
            line += (f"; the engine is {abs(gain):.1%} {'better' if gain >= 0 else 'worse'} than the best simple "
                     f"baseline, {base}")
        parts.append(line)
    return "; ".join(parts) + "."


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


def main(cfg: Configs, compare: CompareArguments) -> dict:
    args, seed = cfg.args, cfg.train.seed
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    path = Path(compare.engine_dir or args.output_dir) / CHECKPOINT
    if not path.exists():
        raise SystemExit(f"{path}: no trained engine; run `recipes/complete.py train` first or set --engine_dir")
    model_config, _, _ = checkpoint_configs(path)
    model = load_model(path).to(cfg.train.device)
    train = load_split(cfg, "train", model_config.cell_dim, path.parent)
    model.set_slots_per_day(train.slots_per_day)
    calibration = calibration_path(compare.engine_dir or args.output_dir, args.data_name)
    if calibration.exists():   # the engine that evaluate scores: residual weight and spread fitted on val
        model.load_calibration(json.loads(calibration.read_text()))
    cold_split = compare.cold_split or ("cold" if args.data == "tensors" else args.split)
    splits = {t: (cold_split if t == "cold" else args.split) for t in args.eval_tasks}
    data = {s: _subset(load_split(cfg, s, model_config.cell_dim, path.parent), compare.compare_entities)
            for s in set(splits.values())}
    slots_per_day = train.slots_per_day
    T = train.batch.x.shape[2]

    ha = HistoricalAverage(profile=True, slots_per_day=slots_per_day).fit(train.batch)
    torch.manual_seed(seed)
    patch_transformer = MaskedPatchTransformer(T=T, channels=train.batch.x.shape[1], slots_per_day=slots_per_day)
    losses = train_patch_transformer(patch_transformer, train.batch, cfg.task, ("short", "long"),
                                     steps=compare.patch_transformer_steps,
                                     batch_size=compare.patch_transformer_batch_size, seed=seed)
    arima = ARIMA((1, 0, 0), 2, slots_per_day=slots_per_day).fit(train.batch) if compare.arima else None
    methods = {"persistence": Persistence(), "historical average": ha, "ARIMA(1,0,0) + daily Fourier": arima,
               "masked patch transformer": patch_transformer,
               "DiT, whole available region": DiTForecaster(model, "available", args.n_samples, args.sampler_steps,
                                                            seed),
               ENGINE: DiTForecaster(model, _evidence(args, path), args.n_samples, args.sampler_steps, seed)}
    for kind in ConditioningControl.KINDS:   # the same engine, other users' vectors: what h_u adds at test
        methods[f"{ENGINE}, {kind} h_u"] = ConditioningControl(
            DiTForecaster(model, _evidence(args, path), args.n_samples, 0, seed), kind, seed)
    table, skipped, differences = {}, {}, {}
    for task_name, split in splits.items():
        d = data[split]
        rows, errors = {}, {}
        for name, method in methods.items():
            if method is None or len(d.batch) == 0:
                continue
            try:
                rows[name], errors[name] = score(method, d, task_name, cfg, recommend=task_name == "cold")
            except ValueError as err:  # ARIMA: missing days leave no history prefix to fit a series on
                skipped[f"{name} ({task_name})"] = str(err)
                continue
            print(f"{task_name}/{name}: rmse_norm {rows[name]['rmse_norm']:.4f}", flush=True)
        table[task_name] = rows
        if ENGINE in errors:
            differences[task_name] = {name: rmse_difference(errors[ENGINE], e, d.user_id)
                                      for name, e in errors.items() if not name.startswith(("engine", "DiT"))}
    probe = None
    if args.embeddings and model.dit.entity_conditioning:   # does the engine's h_u encode the users' behaviour?
        held_out = load_split(cfg, args.split, model_config.cell_dim, path.parent)
        device = next(model.parameters()).device
        try:
            probe = embedding_probe(lambda e: model.dit.entity_embedder(e.to(device)).cpu(),
                                    (train.batch, train.user_id), (held_out.batch, held_out.user_id), slots_per_day)
        except ValueError as err:  # too few users to fit and score a probe: say so, keep the comparison
            skipped["embedding probe"] = str(err)
    summary = headline(table)
    report = {"headline": summary, "split": args.split, "cold_split": cold_split,
              "calibration": str(calibration) if calibration.exists() else None,
              "entities": {s: len(d.batch) for s, d in data.items()}, "tasks": table, "skipped": skipped,
              "engine_minus_baseline": differences, "embedding_probe": probe,
              "patch_transformer_final_loss": float(np.mean(losses[-20:])) if losses else None,
              "wall_s": round(time.perf_counter() - start, 1),
              "note": "RMSE/MAE on target entries only; *_norm in log1p z-scored units (mean over channels), "
                      "*_apps in records per slot (mean over app-category channels), *_orig per channel "
                      "in original units. Baselines read the whole available region; "
                      "U-MASK reveals the subset it chooses."}
    out = Path(args.output_dir)
    write_json(out / "comparison.json", report)
    notes = "".join(f"- {k} not scored: {v}\n" for k, v in skipped.items())
    write_text(out / "comparison.md", f"# Completion vs baselines\n\n{summary}\n\n" + markdown(table) + notes)
    print(summary)
    print(markdown(table))
    return report


def parse(argv: list[str]) -> tuple[Configs, CompareArguments]:
    args, compare, model, umask, task, train_config = parse_config(
        (CompleteArguments, CompareArguments, ModelConfig, UMaskConfig, TaskConfig, TrainConfig), argv)
    return Configs(args, replace(model, umask=umask), task, train_config), compare


if __name__ == "__main__":
    sys.exit(run_recipe(main, *parse(sys.argv[1:])))
