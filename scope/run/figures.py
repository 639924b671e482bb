"""Figures of the run report that no stage draws itself (PNG, matplotlib's Agg backend).

- `user_cluster_figure`: the users' embeddings h_u projected on their two leading principal
  components, coloured by a label per user (the simulated persona), with the silhouette score of
  those labels in the full embedding space (1 = perfectly separated groups, ~0 = no structure).
- `training_curves_figure`: one panel per (run, scalar) from TensorBoard event files (SFT / DPO
  trainer logs, the DiT's train/loss, train/rho, ...).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scope.io import save_figure  # noqa: E402


def pca_2d(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of X [N, d] on their two leading principal components -> ([N, 2], explained variance share [2])."""
    X = np.asarray(X, dtype=np.float64)
    X = X - X.mean(0)
    _, s, vt = np.linalg.svd(X, full_matrices=False)
    var = s ** 2 / max((s ** 2).sum(), 1e-12)
    proj = X @ vt[:2].T
    if proj.shape[1] < 2:
        proj = np.pad(proj, ((0, 0), (0, 2 - proj.shape[1])))
        var = np.pad(var, (0, 2 - len(var)))
    return proj, var[:2]


def silhouette(X: np.ndarray, labels: np.ndarray) -> float | None:
    """Silhouette score of ``labels`` in the space of X (cosine), or None with fewer than 2 groups."""
    from sklearn.metrics import silhouette_score

    if len(set(labels)) < 2 or len(labels) <= len(set(labels)):
        return None
    return float(silhouette_score(X, labels, metric="cosine"))


def user_cluster_figure(embedding: np.ndarray, labels: list[str], path: str | Path,
                        title: str = "users' embeddings h_u") -> dict:
    """Scatter of the 2-D PCA of ``embedding`` [N, d], one colour per label; returns its figures."""
    labels = np.asarray(labels, dtype=object)
    proj, var = pca_2d(embedding)
    score = silhouette(np.asarray(embedding, dtype=np.float64), labels)
    fig, ax = plt.subplots(figsize=(7, 5.5))
    for i, group in enumerate(sorted(set(labels))):
        rows = labels == group
        ax.scatter(proj[rows, 0], proj[rows, 1], s=18, alpha=0.8, color=plt.cm.tab10(i % 10),
                   label=f"{group} ({rows.sum()})")
    ax.set(xlabel=f"PC 1 ({var[0]:.0%} of variance)", ylabel=f"PC 2 ({var[1]:.0%} of variance)",
           title=title + (f"; silhouette {score:.2f}" if score is not None else ""))
    ax.legend(fontsize=8, loc="best", frameon=False)
    save_figure(fig, path)
    return {"users": int(len(labels)), "silhouette": score, "explained_variance": [float(v) for v in var]}


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files under ``logdir`` (all runs merged): {tag: [(step, value)]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = Path(logdir)
    out: dict[str, list[tuple[int, float]]] = {}
    folders = sorted({p.parent for p in logdir.rglob("events.out.tfevents.*")}) if logdir.is_dir() else []
    for folder in folders:
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(v) for tag, v in out.items()}


def training_curves_figure(curves: dict[str, dict[str, list[tuple[int, float]]]], path: str | Path) -> Path | None:
    """One panel per (run, tag) of ``curves`` = {run name: {tag: [(step, value)]}}; None if nothing to draw."""
    panels = [(run, tag, points) for run, tags in curves.items() for tag, points in tags.items() if len(points) >= 2]
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, (run, tag, points) in zip(axes.flat, panels):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 30 else None)
        ax.set(title=f"{run}: {tag}", xlabel="step")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)
