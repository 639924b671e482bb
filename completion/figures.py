"""Figures of U-MASK's masks (PNG, matplotlib's Agg backend), written atomically.

- `mask_figure` (paper Fig. 8): per task, the temporal mask (share of entities revealing each
  slot), the spatial mask (share revealing each cell), the joint T x (H W) mask averaged over
  entities, and the distribution of mask values p_i N_b over the available region (1 = uniform).
- `pattern_figure` (paper Fig. 9): a PCA projection of F_pat coloured by soft group (argmax A)
  and by mask density k_b / N_b.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from torch import Tensor  # noqa: E402

from completion.masks import MaskOutput  # noqa: E402
from scope.io import save_figure  # noqa: E402


def mask_figure(outputs: dict[str, MaskOutput], path: str | Path) -> Path:
    """Fig. 8: one row per task of {task: MaskOutput} (M and p are [B, T, H, W])."""
    if not outputs:
        raise ValueError("mask_figure needs at least one task's MaskOutput")
    fig, axes = plt.subplots(len(outputs), 4, figsize=(16, 3.2 * len(outputs)), squeeze=False)
    for row, (task, out) in zip(axes, outputs.items()):
        M = out.M.detach().float()
        B, T, H, W = M.shape
        row[0].plot(np.arange(T), M.mean((0, 2, 3)).numpy())
        row[0].set(title=f"{task}: temporal mask", xlabel="slot t", ylabel="share revealed", ylim=(0, 1.05))
        im = row[1].imshow(M.mean((0, 1)).numpy(), vmin=0, vmax=1, cmap="viridis")
        row[1].set(title=f"{task}: spatial mask", xlabel="w", ylabel="h")
        fig.colorbar(im, ax=row[1])
        im = row[2].imshow(M.mean(0).reshape(T, H * W).T.numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis")
        row[2].set(title=f"{task}: joint mask (mean over entities)", xlabel="slot t", ylabel="cell h*W+w")
        fig.colorbar(im, ax=row[2])
        available = out.p > 0
        relative = (out.p * available.flatten(1).sum(1)[:, None, None, None])[available]
        row[3].hist(relative.detach().numpy(), bins=40, color="tab:orange")
        row[3].set(title=f"{task}: mask values p N_b", xlabel="p_i N_b (1 = uniform)", ylabel="coordinates")
    fig.tight_layout()
    return save_figure(fig, path)


def pca_2d(F: Tensor) -> np.ndarray:
    """Rows of F [B, d] projected on their two leading principal components -> [B, 2]."""
    X = F.detach().double().numpy()
    X = X - X.mean(0)
    _, _, Vt = np.linalg.svd(X, full_matrices=False)
    return X @ Vt[:2].T


def pattern_figure(out: MaskOutput, available: Tensor, path: str | Path) -> Path:
    """Fig. 9: PCA of F_pat, coloured by soft group and by mask density k_b / N_b."""
    xy = pca_2d(out.F_pat)
    group = out.A.argmax(1).numpy()
    density = (out.k / available.flatten(1).sum(1).clamp(min=1)).numpy()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    sc = axes[0].scatter(xy[:, 0], xy[:, 1], c=group, cmap="tab10", s=8)
    axes[0].set(title="F_pat (PCA) by soft group argmax A", xlabel="PC1", ylabel="PC2")
    axes[0].legend(*sc.legend_elements(), title="group", fontsize=7, loc="best")
    sc = axes[1].scatter(xy[:, 0], xy[:, 1], c=density, cmap="magma", s=8)
    axes[1].set(title="F_pat (PCA) by mask density k_b / N_b", xlabel="PC1", ylabel="PC2")
    fig.colorbar(sc, ax=axes[1])
    fig.tight_layout()
    return save_figure(fig, path)

