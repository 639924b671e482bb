"""Fig. 8 and Fig. 9 are written as PNG files from U-MASK's outputs."""

import numpy as np
import torch

from completion.figures import mask_figure, pattern_figure, pca_2d
from completion.masks import UMask, UMaskConfig
from completion.tasks import TaskConfig, make_regions

PNG = b"\x89PNG\r\n\x1a\n"


def test_mask_and_pattern_figures_are_png_files(batch, tmp_path):
    torch.manual_seed(0)
    umask = UMask(2, 16, 4, UMaskConfig(d=8)).eval()
    outputs = {}
    for i, name in enumerate(("short", "long")):
        task = torch.full((len(batch),), i)
        regions = make_regions(task, batch.observed, 2, TaskConfig(short_horizon=2, long_horizon=8))
        outputs[name] = umask(batch.x, regions.available, regions.visible, batch.cells, task)
    path = mask_figure(outputs, tmp_path / "fig8.png")
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000
    path = pattern_figure(outputs["long"], regions.available, tmp_path / "sub" / "fig9.png")
    assert path.read_bytes()[:8] == PNG
    assert not list(tmp_path.glob(".*.tmp"))


def test_pca_projects_onto_the_leading_direction():
    F = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [2.0, 0.1, 0.0], [-2.0, -0.1, 0.0]])
    xy = pca_2d(F)
    assert xy.shape == (4, 2)
    assert np.allclose(np.abs(xy[:, 0]), [1, 1, 2.0025, 2.0025], atol=1e-2)
