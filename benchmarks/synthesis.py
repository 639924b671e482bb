"""Synthesis benchmark (U-SCOPE section 5.2, Eq. 25-26), scored on behaviour the synthesis never saw.

    python -m benchmarks.synthesis [--users 200 --days 7 --generate_users 60 --calibration_users 20 --threads 1]
    # any other --key value goes to recipes/synthesize.py (e.g. --max_steps 200)

The simulator writes two weeks of the same users. Week 1 is the real cohort: the trace LM is
trained on its train users, and each synthetic user is conditioned on its source user's week 1
(profile, history prior, write-back pools). Week 2 is never shown to the synthesis; it is what a
synthetic week is scored against, on the same source users:

- ``heldout_pearson_r`` / ``heldout_r2``: Eq. 26 agreement of the synthetic ``Corr(a, p)`` with week 2;
- ``reference_pearson_r`` / ``reference_r2``: the same users' week 1 against their week 2, i.e. what an
  exact copy of the conditioning week scores (sampling noise alone keeps it below 1). Target:
  ``heldout_pearson_r >= 0.95 x reference_pearson_r`` (``heldout_over_reference``);
- ``conditioned_pearson_r`` / ``conditioned_r2``: the synthetic users against the very week they were
  conditioned on (the earlier protocol; it favours the synthetic side);
- each r with a 95% interval from a paired bootstrap over the source users
  (:func:`scope.synthesis.fidelity.bootstrap_pearson`), and so ``heldout_over_reference_ci``;
- ``tstr_accuracy`` / ``trtr_accuracy``: next-app-category accuracy on the source users' week 2 of a
  classifier trained on the synthetic lines / on the same users' week 1 (target: TSTR >= 0.95 x
  TRTR); ``test_users_tstr_accuracy`` / ``test_users_trtr_accuracy``: the recipe's report, scored on
  the test split's users (never conditioned on, never calibrated on);
- ``well_formed_rate`` (target 1.0) and, from one batch of the same prompts, constrained vs
  unconstrained tokens/s and the unconstrained well-formed rate;
- ``calibration``: ``history_weight`` x ``temperature``, each point generated for the first
  ``--calibration_users`` val users from their week 1 and scored against their week 2. The objective
  is the worse of the two target ratios, ``min(heldout r / reference r, TSTR / TRTR)``; the best
  point generates the scored cohort. The scored (train) users never enter the calibration.

Figures (``benchmarks/results/figures/``): ``synthesis_heldout_corr_scatter.png`` and
``synthesis_heldout_corr_difference.png`` (synthetic vs week 2), the recipe's report against week 1
(``synthesis_corr_*.png``, ``synthesis_distributions.png``) and ``synthesis_calibration.png``.
"""

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.common import RESULTS, emit, filtered_cohort, peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]
PAIRS = {"heldout": ("week2", "synthetic"), "reference": ("week2", "week1"), "conditioned": ("week1", "synthetic")}


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--users", type=int, default=200, help="simulated users (two weeks are simulated, see above)")
    parser.add_argument("--days", type=int, default=7, help="days of the real cohort (and of the held-out week)")
    parser.add_argument("--generate_users", type=int, default=60, help="source users to synthesise (train split)")
    parser.add_argument("--calibration_users", type=int, default=20, help="val users of the calibration")
    parser.add_argument("--history_weights", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.8, 1.0, 1.25])
    parser.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples of the source users")
    parser.add_argument("--config", default=str(ROOT / "recipes" / "configs" / "synthesize_cpu.yaml"))
    parser.add_argument("--work_dir", default=str(ROOT / "runs" / "bench" / "synthesis"))
    parser.add_argument("--throughput_tokens", type=int, default=64, help="max new tokens of the throughput probe")
    parser.add_argument("--keep", action="store_true", help="reuse the trained model, calibration and cohort in work_dir")
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from recipes import synthesize
    from scope.data.tsinghua import load_cohort
    from scope.profiles.corpus import build_corpus
    from scope.profiles.llms import load_tokenizer
    from scope.synthesis.generation import (RecordPools, conditioning_prompt, generate_shards, load_grammar,
                                            parse_generated, plan_requests, read_profiles, read_shards, sample_windows,
                                            serialise_cohort, written_back_events)
    from scope.synthesis.traces import GrammarTokens, TraceWindow

    work = Path(args.work_dir)
    stage = work / "stage"
    if not args.keep:
        for old in (stage, work / "calibration"):
            shutil.rmtree(old, ignore_errors=True)
    cohort_dir, week2 = two_week_cohort(work, args.users, args.days)
    argv = ["--config", args.config, "--cohort_dir", str(cohort_dir), "--teacher_cache_dir", str(work / "teacher_cache"),
            "--output_dir", str(stage), "--report_to", "none", "--threads", str(args.threads),
            "--n_users", str(args.users), "--days", str(args.days), "--generate_users", str(args.generate_users),
            "--tstr_test_splits", "test", *overrides]
    figures, start = {}, time.perf_counter()

    def run_stage(name: str, extra: list[str]) -> dict:
        t0 = time.perf_counter()
        _, script, training, model_args = synthesize.parse([name, *argv, *extra])
        result = synthesize.STAGE_FUNCTIONS[name](script, training, model_args)
        figures[f"{name}_s"] = round(time.perf_counter() - t0, 1)
        return result

    trained = run_stage("train", [])
    figures.update({"train_windows": trained["windows"], "train_loss": trained.get("train_loss")})

    # --- calibration on val users: week 1 conditions, week 2 scores
    t0 = time.perf_counter()
    _, script, training, model_args = synthesize.parse(["generate", *argv])
    corpus = build_corpus(script)
    cohort, n_a, offset = corpus.cohort, len(corpus.cohort.categories), script.synthetic_user_offset
    model_dir = stage / "model"
    grammar = load_grammar(model_dir / "grammar.json")
    tokens = GrammarTokens(grammar, load_tokenizer(str(model_dir)))
    model = synthesize.trained_trace_lm(model_args, training, model_dir)
    pools = RecordPools(cohort.events, corpus.clusters.of, cohort.app_category, cohort.base_poi.index.to_numpy(), n_a,
                        grammar, script.within_slot)
    weeks = Weeks(cohort.events, week2, cohort.base_poi, cohort.categories, corpus.clusters.of, grammar)
    val_users = corpus.profiled("val")[:args.calibration_users]
    requests = plan_requests(corpus, script, grammar, users=val_users)
    grid = []
    for weight in args.history_weights:
        for temperature in args.temperatures:
            shards = work / "calibration" / f"history_weight={weight}_temperature={temperature}"
            stats = generate_shards(model, tokens, requests, corpus.clusters.names, shards, shard_users=script.shard_users,
                                    batch_size=script.generation_batch_size, temperature=temperature,
                                    seed=script.synthesis_seed, max_new_tokens=script.max_new_tokens or None,
                                    progress=False, history_weight=weight)
            synthetic = written_back_events(read_shards(shards, grammar), grammar, pools, cohort.app_category,
                                            seed=script.synthesis_seed, offset=offset)
            point = {"history_weight": weight, "temperature": temperature,
                     **weeks.scores(val_users, synthetic.assign(user_id=synthetic["user_id"] - offset))}
            if stats["lines"]:
                point["well_formed_rate"] = stats["well_formed_lines"] / stats["lines"]
            grid.append(point)
            print(f"calibration: history_weight {weight}, temperature {temperature}: objective {point['objective']:.4f}",
                  flush=True)
    chosen = max(grid, key=lambda p: p["objective"])
    figures["calibration"] = {"users": len(val_users), "split": "val",
                              "objective": "min(heldout_pearson_r / reference_pearson_r, tstr / trtr) on the val users' week 2",
                              "chosen": {k: chosen[k] for k in ("history_weight", "temperature")}, "grid": grid,
                              "wall_s": round(time.perf_counter() - t0, 1)}
    calibration_figure(grid, args.history_weights, args.temperatures, RESULTS / "figures" / "synthesis_calibration.png")
    chosen_args = ["--history_weight", str(chosen["history_weight"]), "--temperature", str(chosen["temperature"])]

    # --- the scored cohort: the first generate_users train users, with the chosen values
    generated = run_stage("generate", chosen_args)
    figures.update({k: generated[k] for k in ("well_formed_rate", "records", "users", "tokens") if k in generated})
    figures["constrained_tokens_per_s_generate"] = generated.get("constrained_tokens_per_s")
    report = run_stage("report", chosen_args)
    figures["wall_s"] = round(time.perf_counter() - start, 1)
    figures.update({"test_users": report["test_users"], "test_users_lines": report["test_lines"],
                    **{f"test_users_{k}": report[k] for k in ("tstr_accuracy", "trtr_accuracy", "majority_accuracy")}})
    for png in (stage / "report").glob("*.png"):   # the report's figures (against week 1), for the README
        shutil.copyfile(png, RESULTS / "figures" / f"synthesis_{png.name}")

    sources = sorted(int(u) for u in read_profiles(stage / "cohort")["source_user_id"])
    synthetic = load_cohort(stage / "cohort", strict=True).events
    synthetic = synthetic.assign(user_id=synthetic["user_id"] - offset)
    scores = weeks.scores(sources, synthetic, n_boot=args.n_boot, figures_dir=RESULTS / "figures")
    figures.update({k: v for k, v in scores.items() if k != "objective"})
    figures["source_users"] = len(sources)
    # yardsticks on the held-out week: the grammar's coarsening alone, and the dominant-pair write-back
    ceiling = written_back_events(_by_user(serialise_cohort(corpus, sources, grammar)), grammar, pools,
                                  cohort.app_category, seed=script.synthesis_seed)
    figures["ceiling_heldout_pearson_r"] = weeks.pearson(sources, ceiling)
    dominant = RecordPools(cohort.events, corpus.clusters.of, cohort.app_category, cohort.base_poi.index.to_numpy(), n_a,
                           grammar, within_slot="dominant")
    lines = read_shards(stage / "cohort" / "shards", grammar)
    dominant_events = written_back_events(lines, grammar, dominant, cohort.app_category, seed=script.synthesis_seed,
                                          offset=offset)
    figures["dominant_heldout_pearson_r"] = weeks.pearson(sources, dominant_events.assign(
        user_id=dominant_events["user_id"] - offset))

    # throughput: the same prompts and model, constrained vs free sampling (same seed, same token cap)
    requests = plan_requests(corpus, script, grammar)[: script.generation_batch_size]
    prompts = [conditioning_prompt(r.profile, grammar, corpus.clusters.names, TraceWindow(0, r.dates[0]).weekday)
               for r in requests]
    runs = {}
    for label, constraints in (("warmup", None), ("unconstrained", None), ("constrained", [r.constraint for r in requests])):
        torch.manual_seed(0)
        texts, n_tokens, wall = sample_windows(model, tokens, prompts, constraints, temperature=chosen["temperature"],
                                               max_new_tokens=args.throughput_tokens,
                                               history_weight=chosen["history_weight"])
        parsed = [parse_generated(grammar, t) for t in texts]
        runs[label] = (n_tokens / wall, sum(g for _, _, g in parsed) / max(sum(n for _, n, _ in parsed), 1))
    figures["constrained_tokens_per_s"] = round(runs["constrained"][0], 1)
    figures["unconstrained_tokens_per_s"] = round(runs["unconstrained"][0], 1)
    figures["throughput_ratio"] = round(runs["constrained"][0] / runs["unconstrained"][0], 3)
    figures["unconstrained_well_formed_rate"] = round(runs["unconstrained"][1], 4)
    figures.update({"reused_stage": bool(args.keep), "threads": args.threads, "peak_rss_mb": round(peak_rss_mb()),
                    "load_avg_1m": os.getloadavg()[0]})
    return emit("synthesis", figures)


class Weeks:
    """The two real weeks, and how a synthetic week of the same users scores against them."""

    def __init__(self, week1: pd.DataFrame, week2: pd.DataFrame, base_poi: pd.DataFrame, categories: list[str],
                 cluster_of, grammar):
        self.week1, self.week2, self.base_poi = week1, week2, base_poi
        self.categories, self.n_a = list(categories), len(categories)
        self.cluster_of, self.grammar = cluster_of, grammar

    def _of(self, events: pd.DataFrame, users: list[int]) -> pd.DataFrame:
        return events[events["user_id"].isin(users)]

    def pearson(self, users: list[int], synthetic: pd.DataFrame) -> float:
        """Eq. 26 agreement of ``synthetic`` with the users' week 2."""
        from scope.synthesis.fidelity import compare

        return compare(self._of(self.week2, users), synthetic, self.base_poi, self.n_a)["pearson_r"]

    def scores(self, users: list[int], synthetic: pd.DataFrame, *, n_boot: int = 0, figures_dir: Path | None = None) -> dict:
        """Held-out, reference and conditioned agreement, JSDs against week 2 and TSTR / TRTR on
        week 2 of ``users``; ``synthetic`` carries its source users' ids. With ``n_boot``: paired
        bootstrap intervals; with ``figures_dir``: the held-out scatter and difference heatmap."""
        from scope.synthesis.fidelity import (app_poi_correlation, bootstrap_pearson, compare, correlation_scatter,
                                              correlation_sums, difference_heatmap, next_category_accuracy)
        from scope.synthesis.traces import windows_from_events

        week1, week2 = self._of(self.week1, users), self._of(self.week2, users)
        out = {}
        for name, (real, other) in {"heldout": (week2, synthetic), "reference": (week2, week1),
                                    "conditioned": (week1, synthetic)}.items():
            c = compare(real, other, self.base_poi, self.n_a)
            out.update({f"{name}_pearson_r": c["pearson_r"], f"{name}_r2": c["r2"]})
            if name == "heldout":
                out.update({f"heldout_{k}": c[k] for k in ("mae", "rmse", "hour_jsd", "app_jsd", "pairs_compared",
                                                           "diff_above_0.05", "synthetic_records", "real_records")})
        out["heldout_over_reference"] = out["heldout_pearson_r"] / out["reference_pearson_r"]
        windows = {k: windows_from_events(v, self.cluster_of, self.grammar) for k, v in
                   (("synthetic", synthetic), ("week1", week1), ("week2", week2))}
        out["tstr_accuracy"] = next_category_accuracy(windows["synthetic"], windows["week2"], self.grammar)
        out["trtr_accuracy"] = next_category_accuracy(windows["week1"], windows["week2"], self.grammar)
        out["tstr_over_trtr"] = out["tstr_accuracy"] / out["trtr_accuracy"]
        out["objective"] = min(out["heldout_over_reference"], out["tstr_over_trtr"])
        if n_boot:
            sums = {k: correlation_sums(v, self.base_poi, self.n_a, users=np.asarray(users))
                    for k, v in (("week1", week1), ("week2", week2), ("synthetic", synthetic))}
            draws = bootstrap_pearson(sums, PAIRS, n_boot=n_boot)
            draws["heldout_over_reference"] = draws["heldout"] / draws["reference"]
            for name, values in draws.items():
                key = name if name == "heldout_over_reference" else f"{name}_pearson_r"
                out[f"{key}_ci"] = [float(q) for q in np.nanquantile(values, [0.025, 0.975])]
            out["n_boot"] = n_boot
        if figures_dir is not None:
            c_real, c_syn = (app_poi_correlation(e, self.base_poi, self.n_a) for e in (week2, synthetic))
            correlation_scatter(c_real, c_syn, {"r2": out["heldout_r2"], "pearson_r": out["heldout_pearson_r"]},
                                figures_dir / "synthesis_heldout_corr_scatter.png")
            difference_heatmap(c_real, c_syn, self.categories, list(self.base_poi.columns),
                               figures_dir / "synthesis_heldout_corr_difference.png")
        return out


def _by_user(windows: list) -> dict[int, list]:
    out: dict[int, list] = {}
    for w in windows:
        out.setdefault(w.user_id, []).append(w)
    return out


def calibration_figure(grid: list[dict], weights: list[float], temperatures: list[float], path: Path) -> None:
    """The calibration objective over the grid, each cell annotated with its two ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scope.io import save_figure

    value = np.array([[next(p["objective"] for p in grid if p["history_weight"] == w and p["temperature"] == t)
                       for t in temperatures] for w in weights])
    fig, ax = plt.subplots(figsize=(6, 4.5))
    image = ax.imshow(value, cmap="viridis", aspect="auto")
    for i, w in enumerate(weights):
        for j, t in enumerate(temperatures):
            p = next(p for p in grid if p["history_weight"] == w and p["temperature"] == t)
            ax.text(j, i, f"{p['heldout_over_reference']:.3f}\n{p['tstr_over_trtr']:.3f}", ha="center", va="center",
                    fontsize=8, color="white")
    ax.set_xticks(range(len(temperatures)), [str(t) for t in temperatures])
    ax.set_yticks(range(len(weights)), [str(w) for w in weights])
    ax.set(xlabel="temperature", ylabel="history_weight",
           title="calibration on val users (cell: heldout/reference r, TSTR/TRTR)")
    fig.colorbar(image, ax=ax, label="objective: min of the two ratios")
    save_figure(fig, path)


def two_week_cohort(work: Path, users: int, days: int) -> tuple[Path, pd.DataFrame]:
    """Simulate ``users`` x ``2 * days`` days; write the first ``days`` days as the real cohort
    (once) and return its folder and the events of the other days (the held-out week)."""
    from scope.data.simulate import CohortConfig, simulate_cohort
    from scope.data.tsinghua import TRACE_FILE, load_cohort

    simulated, cohort = work / f"simulated-{users}x{2 * days}", work / f"cohort-{users}x{days}"
    if not (simulated / TRACE_FILE).exists():
        simulate_cohort(CohortConfig(n_users=users, days=2 * days), simulated, progress=False)
    events = load_cohort(simulated).events
    cut = events["timestamp"].min().normalize() + pd.Timedelta(days=days)
    if not (cohort / TRACE_FILE).exists():
        filtered_cohort(simulated, cohort, lambda trace: trace[1] < cut.strftime("%Y%m%d%H%M%S"))
    return cohort, events[events["timestamp"] >= cut]


if __name__ == "__main__":
    main()
