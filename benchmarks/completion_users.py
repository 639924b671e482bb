"""The completion engine on per-user behaviour tensors of a simulated cohort, against every baseline and
against conditioning controls: short-term (next hour), long-term (next day) and cold start (4 revealed
entries), under history sparsity.

    python -m benchmarks.completion_users            # ~2 h on 2 CPU cores, resumable per cell
    python -m benchmarks.completion_users --quick    # a few minutes: smoke run, numbers meaningless

Data: the simulator writes `--users` users x 14 days. Profiles, and so h_u, come from **week 1
only** (the grounded teacher on a week-1 copy of the cohort, then the frozen Sentence-BERT of
`recipes/embed.py`; the engine's entity MLP, standardised on the train users, learns h_u from it and
feeds it to U-MASK and the DiT). Tensors cover both weeks (two-day windows of 15-minute slots, 20 app
categories + presence + traffic over the user's top 4 x 4 places). The engine trains on every window
of the train users; val and test score the windows that start in week 2 (days 8-13) of val / test
users, so h_u never saw the scored behaviour. The cold task reveals 4 entries of each scored window
(users unseen in training, known only by their week-1 profile).

Conditioning controls (same split, same budget, 3 seeds; point estimates):
- `h_u`: the engine (SBERT profile encodings -> the trained entity MLP);
- `none`: trained without user conditioning (neither U-MASK nor the DiT reads a user vector);
- `mean`: the h_u engine with every user's encoding replaced by the cohort mean at test;
- `shuffled`: encodings permuted across users, at training and at test;
- `oracle_stats`: the user's week-1 statistics (per-channel means, per channel x quarter of the day,
  per cell) in place of the encoding: what user information from the same history can buy at most.
A ridge probe from h_u (the seed's trained MLP) and from raw SBERT to each user's week-2 statistics
(fit on train users, R^2 on test users) measures whether the embedding encodes behaviour.

Baselines: persistence, HA, ARIMA, the hand-written masked patch transformer, transformers'
`PatchTSTForPrediction` (per forecasting task, patch length chosen on val) and `hu_knn` (the training
users nearest by the seed's h_u, k and level chosen on val).

Every (method or condition, seed) is a cell cached under `<cache_dir>/cells/` (JSON; trained models
under `<cache_dir>/models/`; default `benchmarks/results/cache/completion_users/`, kept in the
repository): a rerun, in this session or a later one, reuses them and prints which. The data in
`<work_dir>` is rebuilt the same from the seeds. Delete the cache after changing the code or the
settings.

Keys of the last line (also `benchmarks/results/<name>.json`): `conditioning.{none,mean,shuffled,h_u,
oracle_stats}.{short,long,cold}.{rmse,std}`, `h_u_vs_none_gain_cold` and `h_u_vs_shuffled_gain_cold`
({mean, ci_low, ci_high}: bootstrap over test users), `oracle_share_cold`, `probe_r2.{h_u,sbert}`,
`engine_vs_best_baseline_{task}`, `best_baseline_{task}`, `coverage90.{task}`, `spread_factor.{task}`,
`spread_diagnosis`, `revealed`, `sparsity`, `table`.
"""

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.common import RESULTS, emit, filtered_cohort, peak_rss_mb
from benchmarks.completion_common import (Budget, add_arguments, choose_fixed_mask, fit_baselines, gain, headline, log,
                                          score, sparsity_figure, sparsity_sweep, summarise, train_model)
from completion.baselines import DiTForecaster, PatchTSTForecaster, UserKNN
from completion.batch import Batch
from completion.evaluate import choose_prior, complete_chunked, evaluate, spread_factor, task_regions
from completion.model import ModelConfig, build_model
from completion.tasks import TaskConfig
from completion.tensors import BehaviourTensors
from completion.users import load_embeddings, probe_r2, user_batch, user_statistics
from scope.io import atomic_path, save_figure, write_json
from scope.metrics import bootstrap_weights

TASKS = ("short", "long", "cold")
CONDITIONS = ("none", "mean", "shuffled", "h_u", "oracle_stats")
ROOT = Path(__file__).resolve().parents[1]


class Cells:
    """A JSON result per cell under `folder`, computed once: a rerun reads it back. The cells belong to
    one set of `settings` (kept in `folder/settings.json`); other settings are refused, not mixed in."""

    def __init__(self, folder: Path, settings: dict):
        self.folder = folder
        self.reused: list[str] = []
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "settings.json"
        settings = json.loads(json.dumps(settings))
        if path.exists() and json.loads(path.read_text()) != settings:
            old = json.loads(path.read_text())
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise SystemExit(f"{path}: the cached cells were computed with other settings ({', '.join(changed)}); "
                             "delete that cache or pass another --cache_dir")
        write_json(path, settings)

    def get(self, name: str, compute):
        path = self.folder / f"{name}.json"
        if path.exists():
            self.reused.append(name)
            return json.loads(path.read_text())
        value = compute()
        write_json(path, value)
        return value


def cached_model(folder: Path, name: str, config: ModelConfig, fit) -> tuple:
    """A trained model (and its training stats) from `folder/<name>.pt` when it was saved with the same
    model config, else `fit()` and save it."""
    path = folder / f"{name}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=False)
        if saved.get("config") == asdict(config):
            model = build_model(config)
            model.load_state_dict(saved["state"])
            return model.eval(), saved["stats"]
        log(f"{path.name}: saved with another model config; training afresh")
    model, stats = fit()
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"state": model.state_dict(), "stats": stats, "config": asdict(config)}, tmp)
    return model, stats


# -- data ---------------------------------------------------------------------------------------

def with_entity(batch: Batch, users: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> Batch:
    """`batch` with each window's entity vector = `rows` of its user (by `ids`)."""
    index = {int(u): i for i, u in enumerate(ids)}
    return replace(batch, entity=torch.from_numpy(rows[[index[int(u)] for u in users]]).float().contiguous())


def prepare(args, work: Path) -> dict:
    """Simulate, profile week 1, embed, tensorize -> batches and user ids per split, week-1 and week-2
    statistics per user."""
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
    week2_ts, scored_from = int(week2.timestamp()), int((start + pd.Timedelta(days=8)).timestamp())
    out = {"batches": {}, "users": {}, "week1": [], "week2": []}
    for split in ("train", "val", "test"):
        bt = BehaviourTensors(tensors, split)
        batch, users = user_batch(bt, embeddings)
        starts = bt.arrays()["start"]
        window_s = bt.meta["config"]["window_slots"] * bt.meta["config"]["slot_minutes"] * 60
        spd = 1440 // bt.meta["config"]["slot_minutes"]
        for name, keep in (("week1", starts + window_s <= week2_ts), ("week2", starts >= week2_ts)):
            keep_t = torch.from_numpy(keep)
            out[name].append(user_statistics(batch[keep_t], users[keep], spd))
        if split != "train":
            keep = torch.from_numpy(starts >= scored_from)
            batch, users = batch[keep], users[keep.numpy()]
        out["batches"][split], out["users"][split] = batch, users
        log(f"{split}: {len(batch)} windows of {len(np.unique(users))} users")
    for name in ("week1", "week2"):
        ids = np.concatenate([s[0] for s in out[name]])
        out[name] = (ids, np.concatenate([s[1] for s in out[name]]), out[name][0][2])
    out["inverse"] = lambda z: bt.normalizer.inverse_transform(z, channel_axis=z.dim() - 4)
    out["slots_per_day"] = 1440 // bt.meta["config"]["slot_minutes"]
    out["sbert"] = embeddings
    return out


# -- scoring ------------------------------------------------------------------------------------

def point_cell(model, batches: dict, users: np.ndarray, task_config: TaskConfig, evidence: str = "umask") -> dict:
    """Point-estimate RMSE per task and each test user's summed squared error and targets per channel
    (for the bootstrap over users)."""
    f = DiTForecaster(model, evidence, n_samples=4, steps=0)
    out = {}
    for t in TASKS:
        r = evaluate(f, batches[t], t, task_config, per_entity=True)
        ids, owner = np.unique(users, return_inverse=True)
        sq = np.zeros((len(ids), r["entity_sq_error"].shape[1]))
        n = np.zeros_like(sq)
        np.add.at(sq, owner, r["entity_sq_error"].double().numpy())
        np.add.at(n, owner, r["entity_targets"].double().numpy())
        out[t] = {"rmse": r["rmse_mean"], "sq": sq.tolist(), "n": n.tolist()}
    return out


def bootstrap_gain(a: list[dict], b: list[dict], task: str, n_boot: int = 2000) -> dict:
    """1 - RMSE(a) / RMSE(b) on `task`, the RMSE pooled over test users and averaged over seeds (a[i]
    and b[i]: the same seed), with its 95% interval from resampling the users."""
    weights = bootstrap_weights(len(a[0][task]["sq"]), n_boot)
    def rmse(cells):
        per_seed = []
        for c in cells:
            sq, n = np.array(c[task]["sq"]), np.array(c[task]["n"])
            with np.errstate(invalid="ignore", divide="ignore"):
                per_seed.append(np.nanmean(np.sqrt((weights @ sq) / (weights @ n)), 1))
        return np.mean(per_seed, 0)
    g = 1 - rmse(a) / rmse(b)
    lo, hi = np.nanquantile(g[1:], [0.025, 0.975])
    return {"mean": round(float(g[0]), 4), "ci_low": round(float(lo), 4), "ci_high": round(float(hi), 4),
            "users": len(weights[0])}


def spread_diagnosis(model, val: Batch, task_config: TaskConfig, n_samples: int) -> dict:
    """Why the raw samples are narrow (val, the uncalibrated spread 1): per task and sampler, the factor
    the samples' deviations need for 90% coverage and the samples' standard deviation over the point
    estimate's RMSE (1 would be a calibrated Gaussian)."""
    out = {}
    calibrated = model.spread.clone()
    model.spread.fill_(1.0)
    for t in TASKS:
        task, regions = task_regions(val, t, task_config)
        w = regions.target.float()
        out[t] = {}
        for label, steps, eta in (("ddim20", 20, 0.0), ("ddim20_eta1", 20, 1.0), ("ddpm100_eta1", 100, 1.0)):
            samples, point = complete_chunked(model, val, task, regions, "umask", n_samples, steps, 0, eta=eta)
            sd = (((samples - samples.mean(0)) ** 2 * w).sum() / (w.sum() * len(samples))).sqrt()
            rmse = (((point - val.x) ** 2 * w).sum() / w.sum()).sqrt()
            out[t][label] = {"factor": round(float(spread_factor(samples, val.x, regions.target).mean()), 2),
                             "sample_sd_over_rmse": round(float(sd / rmse), 4)}
    model.spread.copy_(calibrated)
    return out


def revealed_cell(models: dict, levels: tuple[int, ...]) -> dict:
    """Cold start with `levels` revealed entries: RMSE of each model (point estimate)."""
    out = {}
    for n in levels:
        config = TaskConfig(short_horizon=4, long_horizon=96, cold_revealed=n)
        out[str(n)] = {name: evaluate(DiTForecaster(m, "umask", n_samples=4, steps=0), b, "cold", config)["rmse_mean"]
                       for name, (m, b) in models.items()}
    return out


def revealed_figure(revealed: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [int(n) for n in revealed]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("h_u", "shuffled", "oracle_stats"):
        g = np.array([[1 - s[name] / s["none"] for s in revealed[n]] for n in revealed])
        ax.errorbar(levels, 100 * g.mean(1), yerr=100 * g.std(1), marker="o", capsize=3, label=name)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xscale="symlog", xlabel="revealed entries of the cold-start window", ylabel="RMSE gain over none (%)",
           title="Cold start: what user conditioning buys (test, mean +- std over seeds)")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--cohort_seed", type=int, default=0)
    parser.add_argument("--work_dir", type=Path, default=ROOT / "runs" / "bench" / "completion_users")
    parser.add_argument("--cache_dir", type=Path, default=RESULTS / "cache" / "completion_users",
                        help="the cells (JSON) and trained models, kept with the repository so a later run resumes")
    parser.add_argument("--revealed", type=int, nargs="+", default=[0, 4, 16, 64, 256])
    add_arguments(parser, steps=1200, batch_size=16, patchtst_steps=300, name="completion_users")
    args = parser.parse_args()
    if args.quick:
        args.users, args.steps, args.seeds, args.patchtst_steps = 40, 20, 1, 10
        args.n_samples, args.sampler_steps, args.name = 2, 3, f"{args.name}_quick"
        args.work_dir = args.work_dir.with_name(args.work_dir.name + "_quick")
        args.cache_dir = args.cache_dir.with_name(args.cache_dir.name + "_quick")
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    data = prepare(args, args.work_dir)
    train_b, val, test = (data["batches"][s] for s in ("train", "val", "test"))
    users = data["users"]
    spd = data["slots_per_day"]
    task_config = TaskConfig(short_horizon=4, long_horizon=96, cold_revealed=4)
    budget = Budget(args.steps, args.batch_size, args.lr, tuple(args.history_dropout), spd // 24)
    _, C, T, H, W = train_b.x.shape
    damping, shrinkage, prior_val = choose_prior(train_b, val, TASKS, task_config, spd)
    model_config = ModelConfig(channels=C, T=T, cell_dim=train_b.cells.shape[-1], entity_dim=train_b.entity.shape[-1],
                               preset=args.preset, patch_size=(8, 2, 2), prior_damping=damping,
                               prior_shrinkage=shrinkage, slots_per_day=spd, umask=dict(d=64, bank_size=512))
    settings = {k: getattr(args, k) for k in ("users", "cohort_seed", "n_samples", "sampler_steps", "patchtst_steps",
                                              "mask_lr_scale", "revealed", "levels", "fixed_kinds")}
    cells = Cells(args.cache_dir / "cells", settings | {"model": asdict(model_config), "budget": asdict(budget)})
    models_dir = args.cache_dir / "models"
    table, chosen = {}, {"prior_damping": damping, "prior_shrinkage": shrinkage, "prior_val_rmse": prior_val}
    log(f"prior damping {damping}, shrinkage {shrinkage}")

    # the conditions' inputs: encodings (h_u), permuted encodings, week-1 statistics, the cohort mean
    sbert = data["sbert"]
    permutation = np.random.default_rng(0).permutation(len(sbert.user_id))
    stats_ids, stats_rows, n_main = data["week1"]
    stats_rows = np.nan_to_num(stats_rows)
    inputs = {"h_u": {s: data["batches"][s] for s in ("train", "val", "test")},
              "none": {s: data["batches"][s] for s in ("train", "val", "test")},
              "shuffled": {s: with_entity(data["batches"][s], users[s], sbert.user_id, sbert.embedding[permutation])
                           for s in ("train", "val", "test")},
              "oracle_stats": {s: with_entity(data["batches"][s], users[s], stats_ids, stats_rows)
                               for s in ("train", "val", "test")}}
    inputs["mean"] = dict(inputs["h_u"], test=replace(test, entity=torch.from_numpy(sbert.embedding.mean(0)).expand_as(
        test.entity).contiguous()))
    configs = {"h_u": model_config, "shuffled": model_config, "none": replace(model_config, entity_conditioning=False),
               "oracle_stats": replace(model_config, entity_dim=stats_rows.shape[1])}

    def engine(condition: str, seed: int):
        d = inputs[condition]
        return cached_model(models_dir, f"{condition}_seed{seed}", configs[condition],
                            lambda: train_model(configs[condition], d["train"], task_config, TASKS, budget, seed,
                                                d["val"], args.n_samples, args.sampler_steps,
                                                mask_lr_scale=args.mask_lr_scale))

    # the conditions, 3 seeds each (first: the cells that matter most when a run is cut short)
    cond_cells = {c: [] for c in CONDITIONS}
    engines = []
    for seed in range(args.seeds):
        for condition in ("h_u", "none", "shuffled", "oracle_stats"):
            model, stats = engine(condition, seed)
            if condition == "h_u":
                engines.append(model)
            test_batches = {t: inputs[condition]["test"] for t in TASKS}
            cond_cells[condition].append(cells.get(f"{condition}_seed{seed}", lambda: point_cell(
                model, test_batches, users["test"], task_config) | {"train": stats}))
        mean_batches = {t: inputs["mean"]["test"] for t in TASKS}
        cond_cells["mean"].append(cells.get(f"mean_seed{seed}", lambda: point_cell(engines[-1], mean_batches,
                                                                                   users["test"], task_config)))
        log(f"seed {seed}: " + ", ".join(f"{c} {[round(cond_cells[c][-1][t]['rmse'], 4) for t in TASKS]}"
                                          for c in CONDITIONS))

    # baselines
    def simple_baselines():
        methods, chosen_seed = fit_baselines(train_b, val, task_config, TASKS, spd, 1, 4, 0, arima=not args.quick)
        rows = {n: score(methods[n], test, TASKS, task_config, data["inverse"]) for n in ("persistence", "ha", "arima")
                if n in methods}
        return {"rows": rows, "chosen": chosen_seed}
    simple = cells.get("baselines_seed0", simple_baselines)
    table |= simple["rows"]
    chosen |= simple["chosen"]

    def masked_patch_transformer(seed):
        methods, _ = fit_baselines(train_b, val, task_config, TASKS, spd, args.patchtst_steps, 4, seed, arima=False)
        return score(methods["masked_patch_transformer"], test, TASKS, task_config, data["inverse"])
    table["masked_patch_transformer"] = summarise([cells.get(f"masked_patch_transformer_seed{s}",
                                                             lambda s=s: masked_patch_transformer(s))
                                                   for s in range(args.seeds)])

    def patchtst(seed):
        out, picks = {}, {}
        for t in ("short", "long"):
            horizon = task_config.short_horizon if t == "short" else task_config.long_horizon
            candidates = {}
            for patch in (8, 16):
                torch.manual_seed(seed)
                m = PatchTSTForecaster(T, C, horizon, patch_length=patch)
                m.fit(train_b, t, task_config, args.patchtst_steps, 4, seed=seed)
                candidates[patch] = (evaluate(m, val, t, task_config)["rmse_mean"], m)
            picks[t] = min(candidates, key=lambda p: candidates[p][0])
            out[t] = score(candidates[picks[t]][1], test, (t,), task_config, data["inverse"])[t]
        return {"rows": out, "patch_length": picks}
    runs = [cells.get(f"patchtst_transformers_seed{s}", lambda s=s: patchtst(s)) for s in range(args.seeds)]
    table["patchtst_transformers"] = summarise([r["rows"] for r in runs])
    chosen["patchtst_patch_length"] = [r["patch_length"] for r in runs]

    # the engine with calibrated samples (coverage, CRPS), the h_u kNN baseline and the probe, per seed
    engine_runs, knn_runs, probes = [], [], []
    for seed, model in enumerate(engines):
        engine_runs.append(cells.get(f"engine_samples_seed{seed}", lambda: score(
            DiTForecaster(model, "umask", n_samples=args.n_samples, steps=args.sampler_steps), test, TASKS,
            task_config, data["inverse"])))
        embed = model.dit.entity_embedder

        def knn():
            grid = {(k, own): UserKNN(embed, k, spd, own).fit(train_b) for k in (5, 20, 50) for own in (False, True)}
            picks, rows = {}, {}
            for t in TASKS:
                picks[t] = min(grid, key=lambda g: evaluate(grid[g], val, t, task_config)["rmse_mean"])
                rows[t] = score(grid[picks[t]], test, (t,), task_config, data["inverse"])[t]
            return {"rows": rows, "k_own_level": {t: list(p) for t, p in picks.items()}}
        knn_runs.append(cells.get(f"hu_knn_seed{seed}", knn))

        def probe_cell():
            ids2, week2, _ = data["week2"]
            split_of = {int(u): s for s in ("train", "test") for u in np.unique(users[s])}
            rows = np.array([i for i, u in enumerate(ids2) if int(u) in split_of])
            ids2, week2 = ids2[rows], np.nan_to_num(week2[rows])
            enc, _ = sbert.lookup(ids2)
            with torch.no_grad():
                h = embed(torch.from_numpy(enc)).numpy()
            train_rows = np.array([split_of[int(u)] == "train" for u in ids2])
            return probe_r2({"h_u": h, "sbert": enc}, week2, train_rows, n_main)
        probes.append(cells.get(f"probe_seed{seed}", probe_cell))
    table["engine"] = summarise(engine_runs)
    table["hu_knn"] = summarise([r["rows"] for r in knn_runs])
    chosen["hu_knn_k_own_level"] = [r["k_own_level"] for r in knn_runs]
    table["engine_whole_region"] = summarise([cells.get(f"whole_region_seed{s}", lambda m=m: score(
        DiTForecaster(m, "available", n_samples=4, steps=0), test, TASKS, task_config, data["inverse"]))
        for s, m in enumerate(engines)])

    # spread: why the raw samples are narrow (seed 0, val)
    diagnosis = cells.get("spread_diagnosis", lambda: spread_diagnosis(engines[0], val, task_config, args.n_samples))

    # cold start against the number of revealed entries
    def revealed(seed):
        return revealed_cell({c: (engine(c, seed)[0], inputs[c]["test"]) for c in ("h_u", "none", "shuffled",
                                                                                  "oracle_stats")},
                             tuple(args.revealed))
    revealed_runs = [cells.get(f"revealed_seed{s}", lambda s=s: revealed(s)) for s in range(args.seeds)]
    revealed_table = {n: [r[n] for r in revealed_runs] for n in revealed_runs[0]}
    revealed_figure(revealed_table, RESULTS / "figures" / f"{args.name}_revealed.png")

    # fixed masks and the sparsity sweep
    def fixed_choice():
        kind, models, val_rmse = choose_fixed_mask(model_config, train_b, val, task_config, TASKS, budget,
                                                   tuple(args.fixed_kinds), n_samples=4, sampler_steps=args.sampler_steps)
        return {"kind": kind, "val_rmse": val_rmse}
    fixed_pick = cells.get("fixed_choice", fixed_choice)
    chosen |= {"fixed_mask": fixed_pick["kind"], "fixed_val_rmse": fixed_pick["val_rmse"]}
    fixed = [cached_model(models_dir, f"fixed_{fixed_pick['kind']}_seed{s}", model_config, lambda s=s: train_model(
        model_config, train_b, task_config, TASKS, budget, s, val, 4, args.sampler_steps, mask=fixed_pick["kind"]))[0]
        for s in range(args.seeds)]
    table["best_fixed"] = summarise([cells.get(f"best_fixed_seed{s}", lambda m=m: score(
        DiTForecaster(m, "available", n_samples=4, steps=0), test, TASKS, task_config, data["inverse"]))
        for s, m in enumerate(fixed)])
    sparsity = cells.get("sparsity", lambda: sparsity_sweep(engines, fixed, test, TASKS, task_config,
                                                            tuple(args.levels), budget.dropout_block_slots, n_samples=2))

    conditioning = {c: {t: {"rmse": round(float(np.mean([r[t]["rmse"] for r in cond_cells[c]])), 6),
                            "std": round(float(np.std([r[t]["rmse"] for r in cond_cells[c]])), 6)} for t in TASKS}
                    for c in CONDITIONS}
    none_gain = gain(conditioning["h_u"]["cold"]["rmse"], conditioning["none"]["cold"]["rmse"])
    oracle_gain = gain(conditioning["oracle_stats"]["cold"]["rmse"], conditioning["none"]["cold"]["rmse"])
    spreads = {t: [r["train"]["calibration"][t]["spread"] for r in cond_cells["h_u"]] for t in TASKS}
    figures = headline(table, TASKS) | {
        "coverage90": {t: round(float(np.mean(table["engine"][t]["coverage90"])), 4) for t in TASKS},
        "crps": {t: round(float(np.mean(table["engine"][t]["crps"])), 4) for t in TASKS},
        "spread_factor": {t: {"mean": round(float(np.mean(spreads[t])), 2), "max": round(float(np.max(spreads[t])), 2)}
                          for t in TASKS},
        "spread_diagnosis": diagnosis,
        "conditioning": conditioning,
        "h_u_vs_none_gain": {t: gain(conditioning["h_u"][t]["rmse"], conditioning["none"][t]["rmse"]) for t in TASKS},
        "h_u_vs_none_gain_cold": bootstrap_gain(cond_cells["h_u"], cond_cells["none"], "cold"),
        "h_u_vs_shuffled_gain_cold": bootstrap_gain(cond_cells["h_u"], cond_cells["shuffled"], "cold"),
        "oracle_share_cold": round(none_gain / oracle_gain, 3) if oracle_gain > 0 else None,
        "probe_r2": {name: {k: round(float(np.mean([p[name][k] for p in probes])), 4) for k in ("main", "all")}
                     for name in ("h_u", "sbert")},
        "revealed": {n: {c: round(float(np.mean([r[c] for r in rows])), 5) for c in rows[0]}
                     for n, rows in revealed_table.items()},
        "sparsity": sparsity,
        "chosen_on_val": chosen,
        "windows": {s: len(data["batches"][s]) for s in ("train", "val", "test")},
        "table": table,
        "cells_reused": cells.reused,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    log(f"reused {len(cells.reused)} cells: {', '.join(cells.reused) or 'none'}")
    sparsity_figure(sparsity, RESULTS / "figures" / f"{args.name}_sparsity.png",
                    "Per-user tensors (test, week 2): RMSE vs dropped history")
    lines = [f"# Completion on per-user tensors, reproduced by `python -m benchmarks.completion_users "
             f"{' '.join(sys.argv[1:])}`", "", "| method | " + " | ".join(TASKS) + " |", "|---" * (len(TASKS) + 1) + "|"]
    for m, r in table.items():
        lines.append(f"| {m} | " + " | ".join(f"{r[t]['rmse_mean']:.4f}" if "rmse_mean" in r.get(t, {}) else "-"
                                              for t in TASKS) + " |")
    lines += ["", "| conditioning | " + " | ".join(TASKS) + " |", "|---" * (len(TASKS) + 1) + "|"]
    for c in CONDITIONS:
        lines.append(f"| {c} | " + " | ".join(f"{conditioning[c][t]['rmse']:.4f} ± {conditioning[c][t]['std']:.4f}"
                                               for t in TASKS) + " |")
    with atomic_path(RESULTS / f"{args.name}.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    emit(args.name, figures)


if __name__ == "__main__":
    main()
