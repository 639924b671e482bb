"""The completion engine against every baseline on per-user behaviour tensors of a simulated cohort:
short-term (next hour), long-term (next day) and cold start (4 revealed entries), under history
sparsity, and conditioned on U-SCOPE's h_u, on nothing, or on the cohort's mean embedding.

    python -m benchmarks.completion_users            # ~2 h on 2 CPU cores
    python -m benchmarks.completion_users --quick    # a few minutes: smoke run, numbers meaningless

Data: the simulator writes `--users` users x 14 days. Profiles, and so h_u, come from **week 1
only** (the grounded teacher on a week-1 copy of the cohort, then the frozen Sentence-BERT of
`recipes/embed.py`; the engine's entity MLP, standardised on the train users, learns h_u from it); tensors cover both weeks (two-day windows of 15-minute slots, 20 app
categories + presence + traffic over the user's top 4 x 4 places). The engine trains on every
window of the train users; val and test score the windows that start in week 2 (days 8-13) of
val / test users, so h_u never saw the scored behaviour. The cold task reveals 4 entries of each
scored window (users unseen in training, known only by their week-1 profile).

Conditioning: `h_u` = the engine as trained; `none` = the same engine trained without entity
conditioning (3 seeds); `mean` = the h_u engine with every user's embedding replaced by the
cohort's mean profile encoding at test time (what h_u adds for the same weights).

Keys of the last line (also `benchmarks/results/<name>.json`): `engine_vs_best_baseline_{short,
long,cold}`, `umask_vs_fixed_{task}_rmse_gain`, `coverage90`, `crps`, `sparsity`, `conditioning`
({h_u, none, mean} per task and mean), `h_u_vs_none_gain`, `table`.
"""

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.common import RESULTS, emit, filtered_cohort, peak_rss_mb
from benchmarks.completion_common import (Budget, add_arguments, choose_fixed_mask, fit_baselines, gain, headline, log,
                                          score, sparsity_figure, sparsity_sweep, summarise, train_model)
from completion.baselines import DiTForecaster
from completion.evaluate import choose_prior
from completion.model import ModelConfig
from completion.tasks import TaskConfig
from completion.tensors import BehaviourTensors
from completion.users import load_embeddings, user_batch
from scope.io import atomic_path

TASKS = ("short", "long", "cold")
ROOT = Path(__file__).resolve().parents[1]
DAY = 86400


def prepare(args, work: Path) -> dict:
    """Simulate, profile week 1, embed, tensorize -> batches per split (+ the mean-embedding test batch)."""
    from recipes import embed, tensorize
    from scope.data.simulate import CohortConfig, simulate_cohort

    cohort = work / "cohort"
    if not (cohort / "cohort.json").exists():
        simulate_cohort(CohortConfig(n_users=args.users, days=14, seed=args.cohort_seed), cohort, progress=False)
    start = pd.Timestamp(CohortConfig().start_date)
    week2 = start + pd.Timedelta(days=7)
    week1 = filtered_cohort(cohort, work / "week1", lambda t: t[1] < week2.strftime("%Y%m%d%H%M%S"))
    emb_dir = work / "embeddings"
    if not (emb_dir / "user_embeddings.safetensors").exists():
        embed.main(embed.EmbedArguments(cohort_dir=str(week1),
                                        teacher_cache_dir=str(work / "teacher_cache"), output_dir=str(emb_dir)))
    tensors = work / "tensors"
    if not (tensors / "dataset.json").exists():
        tensorize.main(tensorize.TensorizeArguments(cohort_dir=str(cohort), output_dir=str(tensors)))
    embeddings = load_embeddings(emb_dir / "user_embeddings.safetensors")
    scored_from = int((start + pd.Timedelta(days=8)).timestamp())
    out = {}
    for split in ("train", "val", "test"):
        bt = BehaviourTensors(tensors, split)
        batch, users = user_batch(bt, embeddings)
        if split != "train":
            keep = torch.from_numpy(bt.arrays()["start"] >= scored_from)
            batch, users = batch[keep], users[keep.numpy()]
        out[split] = batch
        log(f"{split}: {len(batch)} windows of {len(np.unique(users))} users")
    out["inverse"] = lambda z: bt.normalizer.inverse_transform(z, channel_axis=z.dim() - 4)
    out["slots_per_day"] = 1440 // bt.meta["config"]["slot_minutes"]
    out["mean_embedding"] = torch.from_numpy(embeddings.embedding.mean(0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--cohort_seed", type=int, default=0)
    parser.add_argument("--work_dir", type=Path, default=ROOT / "runs" / "bench" / "completion_users")
    add_arguments(parser, steps=1200, batch_size=16, patchtst_steps=300, name="completion_users")
    args = parser.parse_args()
    if args.quick:
        args.users, args.steps, args.seeds, args.patchtst_steps = 40, 20, 1, 10
        args.n_samples, args.sampler_steps, args.name = 2, 3, f"{args.name}_quick"
        args.work_dir = args.work_dir.with_name(args.work_dir.name + "_quick")
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    data = prepare(args, args.work_dir)
    train_b, val, test = data["train"], data["val"], data["test"]
    task_config = TaskConfig(short_horizon=4, long_horizon=96, cold_revealed=4)
    budget = Budget(args.steps, args.batch_size, args.lr, tuple(args.history_dropout), data["slots_per_day"] // 24)
    _, C, T, H, W = train_b.x.shape
    damping, shrinkage, prior_val = choose_prior(train_b, val, TASKS, task_config, data["slots_per_day"])
    model_config = ModelConfig(channels=C, T=T, cell_dim=train_b.cells.shape[-1], entity_dim=train_b.entity.shape[-1],
                               preset=args.preset, patch_size=(8, 2, 2), prior_damping=damping,
                               prior_shrinkage=shrinkage, slots_per_day=data["slots_per_day"],
                               umask=dict(d=64, bank_size=512))
    table, stats, chosen = {}, {}, {"prior_damping": damping, "prior_shrinkage": shrinkage, "prior_val_rmse": prior_val}
    log(f"prior damping {damping}, shrinkage {shrinkage} (val RMSE of the prior alone {prior_val})")

    patchtst_runs = []
    for seed in range(args.seeds):
        methods, chosen_seed = fit_baselines(train_b, val, task_config, TASKS, data["slots_per_day"],
                                             args.patchtst_steps, 4, seed, arima=not args.quick and seed == 0)
        if seed == 0:
            chosen |= chosen_seed
            for name in ("persistence", "ha", "arima"):
                if name in methods:
                    table[name] = score(methods[name], test, TASKS, task_config, data["inverse"])
        patchtst_runs.append(score(methods["patchtst"], test, TASKS, task_config, data["inverse"]))
    table["patchtst"] = summarise(patchtst_runs)

    engines, runs, mean_runs, none_runs = [], [], [], []
    mean_test = replace(test, entity=data["mean_embedding"].expand_as(test.entity).contiguous())
    for seed in range(args.seeds):
        model, stats[f"engine_seed{seed}"] = train_model(model_config, train_b, task_config, TASKS, budget, seed, val,
                                                         args.n_samples, args.sampler_steps,
                                                         mask_lr_scale=args.mask_lr_scale)
        forecaster = DiTForecaster(model, "umask", n_samples=args.n_samples, steps=args.sampler_steps)
        runs.append(score(forecaster, test, TASKS, task_config, data["inverse"]))
        mean_runs.append(score(DiTForecaster(model, "umask", n_samples=4, steps=0), mean_test, TASKS, task_config))
        engines.append(model)
        log(f"engine seed {seed} {stats[f'engine_seed{seed}']}: {[runs[-1][t]['rmse_mean'] for t in TASKS]}")
        none, stats[f"none_seed{seed}"] = train_model(replace(model_config, entity_conditioning=False), train_b,
                                                      task_config, TASKS, budget, seed, val, 4, args.sampler_steps,
                                                      mask_lr_scale=args.mask_lr_scale)
        none_runs.append(score(DiTForecaster(none, "umask", n_samples=4, steps=0), test, TASKS, task_config))
    table["engine"] = summarise(runs)
    table["engine_whole_region"] = summarise([score(DiTForecaster(m, "available", n_samples=4, steps=0), test, TASKS,
                                                    task_config, data["inverse"]) for m in engines])
    point_runs = [score(DiTForecaster(m, "umask", n_samples=4, steps=0), test, TASKS, task_config) for m in engines]
    conditioning = {}
    for name, reports in (("h_u", point_runs), ("none", none_runs), ("mean", mean_runs)):
        s = summarise(reports)
        conditioning[name] = {t: {"rmse": s[t]["rmse_mean"], "std": s[t]["rmse_mean_std"]} for t in TASKS}
        conditioning[name]["mean"] = round(float(np.mean([s[t]["rmse_mean"] for t in TASKS])), 6)
    log(f"conditioning {conditioning}")

    best_kind, fixed_seed0, fixed_val = choose_fixed_mask(model_config, train_b, val, task_config, TASKS, budget,
                                                          tuple(args.fixed_kinds), n_samples=4,
                                                          sampler_steps=args.sampler_steps)
    chosen |= {"fixed_mask": best_kind, "fixed_val_rmse": fixed_val}
    fixed = [fixed_seed0[best_kind]] + [train_model(model_config, train_b, task_config, TASKS, budget, seed, val, 4,
                                                    args.sampler_steps, mask=best_kind)[0]
                                        for seed in range(1, args.seeds)]
    table["best_fixed"] = summarise([score(DiTForecaster(m, "available", n_samples=4, steps=0), test, TASKS,
                                           task_config, data["inverse"]) for m in fixed])
    sparsity = sparsity_sweep(engines, fixed, test, TASKS, task_config, tuple(args.levels),
                              budget.dropout_block_slots, n_samples=2)  # 216 scorings of 125 large windows

    figures = headline(table, TASKS) | {
        "sparsity": sparsity,
        "conditioning": conditioning,
        "h_u_vs_none_gain": {**{t: gain(conditioning["h_u"][t]["rmse"], conditioning["none"][t]["rmse"])
                                for t in TASKS},
                             "mean": gain(conditioning["h_u"]["mean"], conditioning["none"]["mean"])},
        "chosen_on_val": chosen,
        "windows": {s: len(data[s]) for s in ("train", "val", "test")},
        "train": stats,
        "table": table,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    sparsity_figure(sparsity, RESULTS / "figures" / f"{args.name}_sparsity.png",
                    "Per-user tensors (test, week 2): RMSE vs dropped history")
    lines = [f"# Completion on per-user tensors, reproduced by `python -m benchmarks.completion_users "
             f"{' '.join(sys.argv[1:])}`", "", "| method | " + " | ".join(TASKS) + " |", "|---" * (len(TASKS) + 1) + "|"]
    for m, r in table.items():
        lines.append(f"| {m} | " + " | ".join(f"{r[t]['rmse_mean']:.4f}" if "rmse_mean" in r.get(t, {}) else "-"
                                              for t in TASKS) + " |")
    with atomic_path(RESULTS / f"{args.name}.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    emit(args.name, figures)


if __name__ == "__main__":
    main()
