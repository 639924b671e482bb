"""Conventional fixed masks (Table 9 control): U-MASK's exact budget, inside the available region,
never a target, and the structure their names promise."""

import pytest
import torch

from completion.masks import FIXED_MASKS, fixed_mask
from completion.tasks import TaskConfig, make_regions

CONFIG = TaskConfig(short_horizon=2, long_horizon=6, cold_revealed=5)


def regions_of(batch):
    task = torch.tensor([0, 0, 1, 1, 2, 2])
    observed = batch.observed.clone()
    observed[0, 3] = False  # a missing slot
    return make_regions(task, observed, batch.x.shape[1], CONFIG, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", FIXED_MASKS)
@pytest.mark.parametrize("ratio", [0.0, 0.37, 0.81, 1.0])
def test_budget_is_exact_and_only_available_non_target_entries_are_revealed(batch, kind, ratio):
    regions = regions_of(batch)
    M = fixed_mask(kind, regions.available, ratio, torch.Generator().manual_seed(1))
    N = regions.available.flatten(1).sum(1)
    assert set(M.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(M.flatten(1).sum(1).long(), torch.floor(ratio * N).long())
    assert not (M.bool() & ~regions.available).any()
    assert not (regions.evidence(M).bool() & regions.target).any()


def test_tube_masks_reveal_whole_cells_and_temporal_masks_whole_slots(batch):
    available = torch.ones(6, 16, 3, 5, dtype=torch.bool)
    available[:, 12:] = False  # a long-task history of 12 slots
    g = torch.Generator().manual_seed(2)
    tube = fixed_mask("tube", available, 0.5, g)  # 90 of 180 coordinates: 7 full cells + 6 slots
    per_cell = tube.sum(1).flatten(1)  # [B, HW]
    assert ((per_cell == 12).sum(1) == 7).all() and ((per_cell == 6).sum(1) == 1).all()
    temporal = fixed_mask("temporal", available, 0.5, g)  # 6 full slots of 15 cells
    per_slot = temporal.flatten(2).sum(2)  # [B, T]
    assert ((per_slot == 15).sum(1) == 6).all() and (per_slot[:, 12:] == 0).all()


def test_fixed_masks_repeat_with_the_seed_and_vary_across_entities(batch):
    regions = regions_of(batch)
    a = fixed_mask("random", regions.available, 0.5, torch.Generator().manual_seed(3))
    b = fixed_mask("random", regions.available, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])


def test_bad_kind_or_ratio_is_a_clear_error(batch):
    available = torch.ones(1, 4, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="unknown fixed mask 'block'"):
        fixed_mask("block", available, 0.5)
    with pytest.raises(ValueError, match="mask ratio"):
        fixed_mask("random", available, 1.5)
