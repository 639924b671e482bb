"""The sparsity protocol and the hidden-cells cold task: dropped entries are never evidence nor
targets, the dropped share is what was asked, blocks are whole hours, horizons in hours."""

import pytest
import torch

from completion.evaluate import Sparsity, task_regions
from completion.tasks import TaskConfig, drop_history, history, make_regions, task_index

CONFIG = TaskConfig(short_horizon=4, long_horizon=16, cold_revealed=3)


def observed(B=6, T=32, H=2, W=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, T, H, W, generator=g) > 0.1  # some entries never existed


@pytest.mark.parametrize("kind", ["uniform", "block"])
@pytest.mark.parametrize("task_name", ["short", "long", "cold"])
def test_dropped_entries_never_become_evidence_or_targets(kind, task_name):
    obs = observed()
    task = torch.full((6,), task_index(task_name))
    g = torch.Generator().manual_seed(1)
    kept = drop_history(obs, task, CONFIG, 0.8, kind, block_slots=4, generator=g)
    dropped = obs & ~kept
    assert dropped.any()
    regions = make_regions(task, kept, 2, CONFIG, g)
    assert not (regions.available & dropped).any()
    assert not (regions.target.any(1) & dropped).any()
    assert not (dropped & ~history(obs, task, CONFIG)).any()  # only history is dropped: targets stay


def test_uniform_drops_exactly_the_share_of_history():
    obs = observed()
    task = torch.full((6,), task_index("short"))
    past = history(obs, task, CONFIG).flatten(1).sum(1)
    for fraction in (0.0, 0.5, 0.95):
        kept = drop_history(obs, task, CONFIG, fraction, "uniform", generator=torch.Generator().manual_seed(0))
        gone = (history(obs, task, CONFIG) & ~kept).flatten(1).sum(1)
        assert torch.equal(gone, torch.floor(fraction * past).long())


def test_blocks_are_whole_hours_of_every_cell_and_never_exceed_the_share():
    obs = torch.ones(4, 32, 2, 2, dtype=torch.bool)
    task = torch.full((4,), task_index("short"))  # 28 history slots = 7 hours
    kept = drop_history(obs, task, CONFIG, 0.6, "block", block_slots=4, generator=torch.Generator().manual_seed(3))
    gone = ~kept[:, :28]
    per_hour = gone.reshape(4, 7, 4 * 2 * 2)
    assert ((per_hour.all(2)) | (~per_hour.any(2))).all()  # an hour is dropped whole or not at all
    assert (per_hour.all(2).sum(1) == 4).all()  # 4 of 7 hours: 57% <= 60% < 5 hours
    assert kept[:, 28:].all()


def test_per_entity_fractions_and_bad_input():
    obs = observed(B=2)
    task = torch.full((2,), task_index("cold"))
    kept = drop_history(obs, task, CONFIG, torch.tensor([0.0, 0.5]), "uniform", generator=torch.Generator())
    assert torch.equal(kept[0], obs[0]) and not torch.equal(kept[1], obs[1])
    with pytest.raises(ValueError, match="unknown drop kind"):
        drop_history(obs, task, CONFIG, 0.5, "burst")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_history(obs, task, CONFIG, 1.5)


def test_task_regions_with_sparsity_are_the_same_for_every_method(make_batch):
    batch = make_batch(B=4, C=2, T=32, H=2, W=3)
    sparsity = Sparsity(0.8, "block", 4)
    a = task_regions(batch, "long", CONFIG, seed=5, sparsity=sparsity)[1]
    b = task_regions(batch, "long", CONFIG, seed=5, sparsity=sparsity)[1]
    full = task_regions(batch, "long", CONFIG, seed=5)[1]
    assert torch.equal(a.available, b.available) and torch.equal(a.target, b.target)
    assert a.available.sum() < 0.3 * full.available.sum()
    assert torch.equal(a.target, full.target)  # the future is untouched


def test_the_hidden_cells_cold_task_hides_whole_cells():
    obs = torch.ones(3, 8, 4, 4, dtype=torch.bool)
    config = TaskConfig(short_horizon=2, long_horizon=4, cold_hidden_cells=0.25)
    regions = make_regions(torch.full((3,), task_index("cold")), obs, 2, config, torch.Generator().manual_seed(0))
    hidden = regions.target[:, 0].all(1)  # [B, H, W] cells that are targets at every slot
    assert (hidden.flatten(1).sum(1) == 4).all()
    assert torch.equal(regions.available, ~hidden[:, None].expand_as(obs))
    with pytest.raises(ValueError, match="either channels or cells"):
        TaskConfig(cold_hidden_channels=(0,), cold_hidden_cells=0.25)


def test_horizons_in_hours_follow_the_step_length():
    assert (TaskConfig.in_hours(1, 8, 96).short_horizon, TaskConfig.in_hours(1, 8, 96).long_horizon) == (4, 32)
    assert (TaskConfig.in_hours(1, 8, 24).short_horizon, TaskConfig.in_hours(1, 8, 24).long_horizon) == (1, 8)
    with pytest.raises(ValueError, match="whole number"):
        TaskConfig.in_hours(0.5, 8, 24)
