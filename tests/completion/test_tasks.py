"""The three tasks as (target, available) regions: disjoint, inside the observed entries."""

import pytest
import torch

from completion.tasks import TaskConfig, make_regions, task_index

C, T, H, W = 2, 16, 3, 5


def regions_for(name, config, observed=None, seed=0):
    observed = torch.ones(4, T, H, W, dtype=torch.bool) if observed is None else observed
    task = torch.full((len(observed),), task_index(name))
    return make_regions(task, observed, C, config, torch.Generator().manual_seed(seed))


def revealed_entries(regions):
    return regions.evidence(regions.available.float()).bool()


def test_short_targets_the_next_slots_after_the_history():
    r = regions_for("short", TaskConfig(short_horizon=4))
    assert r.target[:, :, -4:].all() and not r.target[:, :, :-4].any()
    assert r.available[:, :-4].all() and not r.available[:, -4:].any()
    assert r.visible.all()


def test_long_on_nj_targets_the_last_32_of_64_slots():
    observed = torch.ones(2, 64, 4, 4, dtype=torch.bool)
    task = torch.full((2,), task_index("long"))
    r = make_regions(task, observed, 2, TaskConfig(long_horizon=32))
    assert r.target[:, :, 32:].all() and not r.target[:, :, :32].any()
    assert r.available.sum().item() == 2 * 32 * 16


def test_cold_reveals_at_most_a_few_entries_and_targets_the_rest():
    r = regions_for("cold", TaskConfig(cold_revealed=3))
    assert (r.available.flatten(1).sum(1) == 3).all()
    assert torch.equal(r.target, ~r.available[:, None].expand_as(r.target))


def test_cold_with_a_hidden_channel_group_targets_only_that_group():
    r = regions_for("cold", TaskConfig(cold_hidden_channels=(1,)))
    assert torch.equal(r.visible, torch.tensor([[True, False]]).expand(4, 2))
    assert r.target[:, 1].all() and not r.target[:, 0].any()
    assert r.available.all()


@pytest.mark.parametrize("config", [TaskConfig(short_horizon=4, long_horizon=8),
                                    TaskConfig(long_horizon=8, cold_hidden_channels=(0,))])
def test_no_target_is_ever_available_and_missing_entries_are_neither(config):
    observed = torch.rand(6, T, H, W, generator=torch.Generator().manual_seed(1)) > 0.3
    task = torch.tensor([0, 1, 2, 0, 1, 2])
    r = make_regions(task, observed, C, config, torch.Generator().manual_seed(2))
    assert not (revealed_entries(r) & r.target).any()
    assert not (r.available & ~observed).any()
    assert not (r.target & ~observed[:, None]).any()


def test_a_horizon_without_history_is_refused():
    with pytest.raises(ValueError, match="no history"):
        regions_for("long", TaskConfig(long_horizon=T))
