"""Fidelity of a synthetic cohort against the real one (U-SCOPE section 5.2, Eq. 26; paper Fig. 5).

``Corr(a, p)`` (Eq. 26) is read here as the correlation, over a cohort's records, between "the
record's app category is ``a``" (0/1) and "the share of POI category ``p`` around the record's
base station" (from ``base_poi.txt``): a point-biserial Pearson correlation in [-1, 1], one per
(app category, POI category). It is positive where an app category is used more at places rich
in that POI category than the cohort's average record. Entries whose app category never occurs
in one of the two cohorts are left out of the comparison (``NaN`` in the matrices).

The report compares the synthetic matrix with the real one (on the real records of the source
users the synthetic users were conditioned on):

- a difference heatmap (synthetic - real) with ``|diff| > 0.05`` marked, and a scatter of the
  entries with Pearson r and R^2 (:func:`completion.metrics.agreement`; the paper's Fig. 5:
  R^2 = 0.906, r = 0.952), plus MAE / RMSE of the entries and of the joint (app category, POI
  category) distributions;
- Jensen-Shannon divergences of the hour-of-day and app-category distributions of records;
- utility: train-on-synthetic / test-on-real (TSTR) vs train-on-real / test-on-real (TRTR)
  accuracy of next-app-category prediction (a multinomial logistic regression over the event
  lines of :mod:`scope.synthesis.traces`: the next line's hour and weekend flag, the current line's
  category, cluster and level) on the same real test users' lines;
- a *ceiling* row: the same scores for the real source users serialised with the trace grammar
  and written back, not generated (coarsening alone), so a reader sees what the grammar itself
  costs; and ``vs_serialised_real``: the synthetic cohort against that serialised real cohort
  (what the trace LM and its constraint cost on their own);
- ``joint_*``: the same agreement on the joint (app category, POI category) distribution, a
  milder reading of Eq. 26 dominated by the marginals (reported beside, never instead).

The matrices are computed from per-user sums (:class:`CorrelationSums`), so a bootstrap over users
(:func:`bootstrap_pearson`) rescores any resample of the users without touching the records again:
the intervals of ``benchmarks/synthesis.py`` (a synthetic week against the same users' real weeks).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from scope.data.locations import poi_proportions  # noqa: E402
from scope.io import save_figure, write_json  # noqa: E402
from scope.synthesis.traces import TraceGrammar, TraceWindow  # noqa: E402

DIFF_MARK = 0.05


def js_divergence(p, q, eps: float = 0.0) -> float:
    """Jensen-Shannon divergence of two histograms (normalised here), base 2: 0 = equal, 1 = disjoint."""
    p, q = torch.as_tensor(p, dtype=torch.float64).flatten(), torch.as_tensor(q, dtype=torch.float64).flatten()
    if p.shape != q.shape or (p < 0).any() or (q < 0).any() or p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("js_divergence needs two non-negative histograms of the same length with positive mass")
    p, q = (p + eps) / (p + eps).sum(), (q + eps) / (q + eps).sum()
    m = (p + q) / 2

    def kl(a: Tensor) -> Tensor:
        keep = a > 0
        return (a[keep] * torch.log2(a[keep] / m[keep])).sum()

    return float((kl(p) + kl(q)) / 2)


def agreement(reference, estimate) -> dict[str, float]:
    """How well ``estimate`` reproduces ``reference`` entry by entry (both flattened):

    ``pearson_r``; ``r2`` = r^2, the R^2 of the least-squares line through the scatter (what a
    scatter plot's R^2 reports); ``r2_identity`` = 1 - SS_res / SS_tot against the identity line
    (penalises any bias or scale error); ``mae`` and ``rmse`` of the differences."""
    x = torch.as_tensor(reference, dtype=torch.float64).flatten()
    y = torch.as_tensor(estimate, dtype=torch.float64).flatten()
    if x.shape != y.shape or len(x) < 2:
        raise ValueError("agreement needs two arrays of the same size with at least two entries")
    xc, yc = x - x.mean(), y - y.mean()
    denom = (xc.norm() * yc.norm()).item()
    r = float((xc * yc).sum() / denom) if denom > 0 else float("nan")
    ss_tot = float((xc**2).sum())
    err = y - x
    return {"pearson_r": r, "r2": r * r, "r2_identity": 1 - float((err**2).sum()) / ss_tot if ss_tot > 0 else float("nan"),
            "mae": float(err.abs().mean()), "rmse": float(err.pow(2).mean().sqrt())}


@dataclass(frozen=True)
class CorrelationSums:
    """Per-user sufficient statistics of Eq. 26's ``Corr(a, p)`` over records: the number of records
    ``n`` [U], app-category counts [U, A], and the POI shares summed per app category ``xy``
    [U, A, P], overall ``y`` [U, P] and squared ``y2`` [U, P]. Any weighting of the users (a
    bootstrap resample) gives the correlation of the pooled records without touching them again."""

    users: np.ndarray
    n: np.ndarray
    counts: np.ndarray
    xy: np.ndarray
    y: np.ndarray
    y2: np.ndarray

    def correlation(self, weights: np.ndarray | None = None) -> np.ndarray:
        """``[A, P]`` correlation of the records of every user, user ``i`` counted ``weights[i]`` times."""
        w = np.ones(len(self.users)) if weights is None else np.asarray(weights, np.float64)
        n = float(w @ self.n)
        if n <= 0:
            return np.full(self.counts.shape[1:] + self.y.shape[1:], np.nan)
        x_mean = (w @ self.counts) / n                                                      # [A]
        y_mean = (w @ self.y) / n                                                           # [P]
        cov = np.tensordot(w, self.xy, axes=1) / n - x_mean[:, None] * y_mean[None, :]
        y_sd = np.sqrt(np.maximum((w @ self.y2) / n - y_mean**2, 0.0))
        sd = np.sqrt(x_mean * (1 - x_mean))[:, None] * y_sd[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = np.where(sd > 0, cov / np.where(sd > 0, sd, 1), np.nan)
        corr[x_mean == 0] = np.nan
        return corr


def correlation_sums(events: pd.DataFrame, base_poi: pd.DataFrame, n_categories: int,
                     users: np.ndarray | None = None) -> CorrelationSums:
    """:class:`CorrelationSums` of ``users`` (default: every user of ``events``, sorted); a user
    without records gets zeros."""
    users = np.unique(events["user_id"].to_numpy()) if users is None else np.asarray(users)
    poi = pd.DataFrame(poi_proportions(base_poi), index=base_poi.index)
    y = poi.reindex(events["location_id"].to_numpy()).fillna(0.0).to_numpy()            # [N, P]
    a = events["app_category"].to_numpy(np.int64)
    u = pd.Index(users).get_indexer(events["user_id"].to_numpy())
    keep = u >= 0
    y, a, u = y[keep], a[keep], u[keep]
    n_u, n_p = len(users), y.shape[1]
    counts = np.zeros((n_u, n_categories))
    np.add.at(counts, (u, a), 1)
    xy = np.zeros((n_u, n_categories, n_p))
    np.add.at(xy, (u, a), y)
    y_sum, y2_sum = np.zeros((n_u, n_p)), np.zeros((n_u, n_p))
    np.add.at(y_sum, u, y)
    np.add.at(y2_sum, u, y**2)
    return CorrelationSums(users, counts.sum(1), counts, xy, y_sum, y2_sum)


def app_poi_correlation(events: pd.DataFrame, base_poi: pd.DataFrame, n_categories: int) -> np.ndarray:
    """Eq. 26: ``[A, P]`` Pearson correlation over records of app-category indicators and POI shares."""
    return correlation_sums(events.assign(user_id=0), base_poi, n_categories).correlation()


def bootstrap_pearson(sums: dict[str, CorrelationSums], pairs: dict[str, tuple[str, str]], *, n_boot: int = 1000,
                      seed: int = 0) -> dict[str, np.ndarray]:
    """Eq. 26 agreement (Pearson r of two ``Corr(a, p)`` matrices, on the entries finite in both) of
    each named pair of cohorts, for ``n_boot`` resamples of the users with replacement. Every cohort
    of ``sums`` must hold the same users in the same order (a synthetic user under its source's id):
    one resample weights them all, so the pairs are paired and their ratios have intervals too."""
    users = next(iter(sums.values())).users
    if any(not np.array_equal(s.users, users) for s in sums.values()):
        raise ValueError("bootstrap_pearson needs the same users, in the same order, in every cohort")
    rng = np.random.default_rng(seed)
    out = {name: np.empty(n_boot) for name in pairs}
    for b in range(n_boot):
        weights = np.bincount(rng.integers(0, len(users), len(users)), minlength=len(users))
        corr = {name: s.correlation(weights) for name, s in sums.items()}
        for name, (x, y) in pairs.items():
            keep = np.isfinite(corr[x]) & np.isfinite(corr[y])
            out[name][b] = agreement(corr[x][keep], corr[y][keep])["pearson_r"] if keep.sum() >= 2 else np.nan
    return out


def pearson_difference(real: pd.DataFrame, synthetic: pd.DataFrame, reference: pd.DataFrame, base_poi: pd.DataFrame,
                       n_categories: int, users, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Eq. 26 agreement with ``real`` (Pearson r) of ``synthetic`` minus that of ``reference``, the three
    cohorts carrying the ids of the real ``users``, and its 95% CI by a paired bootstrap over those users."""
    sums = {k: correlation_sums(v, base_poi, n_categories, users=np.asarray(users))
            for k, v in (("real", real), ("synthetic", synthetic), ("reference", reference))}
    corr = {k: s.correlation() for k, s in sums.items()}
    point = []
    for other in ("synthetic", "reference"):
        keep = np.isfinite(corr["real"]) & np.isfinite(corr[other])
        point.append(agreement(corr["real"][keep], corr[other][keep])["pearson_r"] if keep.sum() >= 2 else np.nan)
    draws = bootstrap_pearson(sums, {"synthetic": ("real", "synthetic"), "reference": ("real", "reference")},
                              n_boot=n_boot, seed=seed)
    lo, hi = np.nanquantile(draws["synthetic"] - draws["reference"], [0.025, 0.975])
    return {"mean": float(point[0] - point[1]), "ci95": [float(lo), float(hi)], "users": len(sums["real"].users),
            "n_boot": n_boot}


def joint_app_poi(events: pd.DataFrame, base_poi: pd.DataFrame, n_categories: int) -> np.ndarray:
    """``[A, P]`` joint distribution of (app category, POI category) weighted by POI shares."""
    poi = pd.DataFrame(poi_proportions(base_poi), index=base_poi.index)
    y = poi.reindex(events["location_id"].to_numpy()).fillna(0.0).to_numpy()
    joint = np.zeros((n_categories, y.shape[1]))
    np.add.at(joint, events["app_category"].to_numpy(np.int64), y)
    return joint / max(joint.sum(), 1e-12)


def hour_histogram(events: pd.DataFrame) -> np.ndarray:
    return np.bincount(pd.DatetimeIndex(events["timestamp"]).hour.to_numpy(), minlength=24).astype(float)


def app_histogram(events: pd.DataFrame, n_categories: int) -> np.ndarray:
    return np.bincount(events["app_category"].to_numpy(np.int64), minlength=n_categories).astype(float)


# --------------------------------------------------------------------------------------------
# Utility: next-app-category prediction (TSTR vs TRTR)
# --------------------------------------------------------------------------------------------

def next_category_xy(windows: list[TraceWindow], grammar: TraceGrammar) -> tuple[np.ndarray, np.ndarray]:
    """Features of each (line, next line) pair of a window and the next line's category."""
    n_a, n_k = len(grammar.categories), grammar.n_clusters
    rows, labels = [], []
    per_hour = 60 // grammar.slot_minutes if grammar.slot_minutes <= 60 else 1
    for w in windows:
        weekend = float(pd.Timestamp(w.date).day_of_week >= 5)
        for cur, nxt in zip(w.events[:-1], w.events[1:]):
            x = np.zeros(24 + 1 + n_a + n_k + 4 + 1)
            x[min(nxt.slot // per_hour, 23)] = 1
            x[24] = weekend
            x[25 + cur.category] = 1
            x[25 + n_a + cur.cluster] = 1
            x[25 + n_a + n_k + cur.level] = 1
            x[-1] = (nxt.slot - cur.slot) / grammar.slots_per_day
            rows.append(x)
            labels.append(nxt.category)
    width = 24 + 1 + n_a + n_k + 4 + 1
    return np.array(rows).reshape(-1, width), np.array(labels, np.int64)


def next_category_accuracy(train: list[TraceWindow], test: list[TraceWindow], grammar: TraceGrammar,
                           seed: int = 0) -> float:
    """Accuracy on ``test`` lines of a logistic regression fitted on ``train`` lines (NaN if either is empty)."""
    from sklearn.linear_model import LogisticRegression

    x_train, y_train = next_category_xy(train, grammar)
    x_test, y_test = next_category_xy(test, grammar)
    if not len(y_test) or not len(y_train):
        return float("nan")
    if len(np.unique(y_train)) == 1:
        return float((y_test == y_train[0]).mean())
    model = LogisticRegression(max_iter=1000, C=1.0, random_state=seed).fit(x_train, y_train)
    return float((model.predict(x_test) == y_test).mean())


# --------------------------------------------------------------------------------------------
# Figures and the report
# --------------------------------------------------------------------------------------------


def difference_heatmap(real: np.ndarray, synthetic: np.ndarray, app_names, poi_names, path: Path) -> None:
    diff = synthetic - real
    fig, ax = plt.subplots(figsize=(12, 8))
    limit = max(np.nanmax(np.abs(diff)) if np.isfinite(diff).any() else 0.1, DIFF_MARK * 2)
    image = ax.imshow(np.ma.masked_invalid(diff), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    for i, j in zip(*np.nonzero(np.abs(np.nan_to_num(diff)) > DIFF_MARK)):
        ax.text(j, i, "x", ha="center", va="center", fontsize=9, color="black")
    ax.set_xticks(range(len(poi_names)), poi_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(app_names)), app_names, fontsize=8)
    ax.set_title(f"Corr(a, p): synthetic - real (x: |diff| > {DIFF_MARK}; grey: app category absent)")
    fig.colorbar(image, ax=ax, label="difference of correlation")
    save_figure(fig, path)


def correlation_scatter(real: np.ndarray, synthetic: np.ndarray, scores: dict, path: Path) -> None:
    keep = np.isfinite(real) & np.isfinite(synthetic)
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.scatter(real[keep], synthetic[keep], s=10, alpha=0.6)
    lo = float(min(real[keep].min(), synthetic[keep].min(), 0)) if keep.any() else -0.1
    hi = float(max(real[keep].max(), synthetic[keep].max(), 0)) if keep.any() else 0.1
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--", label="identity")
    ax.set(xlabel="real Corr(a, p)", ylabel="synthetic Corr(a, p)",
           title=f"R^2 = {scores['r2']:.3f}, Pearson r = {scores['pearson_r']:.3f} ({int(keep.sum())} pairs)")
    ax.legend(loc="upper left")
    save_figure(fig, path)


def distribution_figure(real_hours, synth_hours, real_apps, synth_apps, app_names, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    axes[0].plot(range(24), real_hours / real_hours.sum(), marker="o", ms=3, label="real")
    axes[0].plot(range(24), synth_hours / synth_hours.sum(), marker="o", ms=3, label="synthetic")
    axes[0].set(xlabel="hour of day", ylabel="share of records", xticks=range(0, 24, 3))
    axes[0].legend()
    x = np.arange(len(app_names))
    axes[1].bar(x - 0.2, real_apps / real_apps.sum(), width=0.4, label="real")
    axes[1].bar(x + 0.2, synth_apps / synth_apps.sum(), width=0.4, label="synthetic")
    axes[1].set_xticks(x, app_names, rotation=70, ha="right", fontsize=7)
    axes[1].set_ylabel("share of records")
    save_figure(fig, path)


def compare(real: pd.DataFrame, synthetic: pd.DataFrame, base_poi: pd.DataFrame, n_categories: int) -> dict:
    """Eq. 26 agreement, distribution errors and JSDs of two event frames (no utility, no figures)."""
    c_real, c_syn = app_poi_correlation(real, base_poi, n_categories), app_poi_correlation(synthetic, base_poi, n_categories)
    keep = np.isfinite(c_real) & np.isfinite(c_syn)
    scores = agreement(c_real[keep], c_syn[keep]) if keep.sum() >= 2 else dict.fromkeys(
        ("pearson_r", "r2", "r2_identity", "mae", "rmse"), float("nan"))
    j_real, j_syn = joint_app_poi(real, base_poi, n_categories), joint_app_poi(synthetic, base_poi, n_categories)
    joint = agreement(j_real, j_syn)
    return {**scores, "pairs_compared": int(keep.sum()), "diff_above_0.05": int((np.abs(c_syn - c_real)[keep] > DIFF_MARK).sum()),
            "joint_pearson_r": joint["pearson_r"], "joint_r2": joint["r2"], "joint_mae": joint["mae"], "joint_rmse": joint["rmse"],
            "hour_jsd": js_divergence(hour_histogram(real), hour_histogram(synthetic)),
            "app_jsd": js_divergence(app_histogram(real, n_categories), app_histogram(synthetic, n_categories)),
            "real_records": len(real), "synthetic_records": len(synthetic)}


def fidelity_report(real: pd.DataFrame, synthetic: pd.DataFrame, base_poi: pd.DataFrame, categories: list[str],
                    out_dir: str | Path, *, grammar: TraceGrammar, train_real: list[TraceWindow],
                    train_synthetic: list[TraceWindow], test_real: list[TraceWindow],
                    ceiling: pd.DataFrame | None = None, extra: dict | None = None) -> dict:
    """Write ``fidelity.json`` and the PNG figures to ``out_dir``; return the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_a = len(categories)
    summary = compare(real, synthetic, base_poi, n_a)
    summary["tstr_accuracy"] = next_category_accuracy(train_synthetic, test_real, grammar)
    summary["trtr_accuracy"] = next_category_accuracy(train_real, test_real, grammar)
    summary["majority_accuracy"] = _majority_accuracy(train_real, test_real, grammar)
    summary["test_lines"] = int(len(next_category_xy(test_real, grammar)[1]))
    if ceiling is not None and len(ceiling):
        summary["ceiling"] = compare(real, ceiling, base_poi, n_a)
        summary["vs_serialised_real"] = compare(ceiling, synthetic, base_poi, n_a)
    if extra:
        summary.update(extra)
    c_real, c_syn = app_poi_correlation(real, base_poi, n_a), app_poi_correlation(synthetic, base_poi, n_a)
    difference_heatmap(c_real, c_syn, categories, list(base_poi.columns), out_dir / "corr_difference.png")
    correlation_scatter(c_real, c_syn, summary, out_dir / "corr_scatter.png")
    distribution_figure(hour_histogram(real), hour_histogram(synthetic), app_histogram(real, n_a),
                        app_histogram(synthetic, n_a), categories, out_dir / "distributions.png")
    write_json(out_dir / "fidelity.json", summary)
    return summary


def _majority_accuracy(train: list[TraceWindow], test: list[TraceWindow], grammar: TraceGrammar) -> float:
    _, y_train = next_category_xy(train, grammar)
    _, y_test = next_category_xy(test, grammar)
    if not len(y_train) or not len(y_test):
        return float("nan")
    return float((y_test == np.bincount(y_train).argmax()).mean())
