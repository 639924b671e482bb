"""Behaviour tensors: counts equal events, round trips, availability, layouts, splits, streaming."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from completion.normalization import Log1pStandardizer
from completion.tensors import (DATASET_FILE, BehaviourTensors, GridLayout, TensorConfig, tensorize_cohort,
                                tensorize_users)
from scope.data.locations import cluster_locations
from scope.data.splits import UserSplitter
from scope.data.tsinghua import load_cohort

CFG = TensorConfig(window_slots=96, height=3, width=5, shard_users=7)  # non-square on purpose


@pytest.fixture(scope="module")
def cohort(small_cohort):
    return load_cohort(small_cohort)


@pytest.fixture(scope="module")
def clusters(cohort):
    return cluster_locations(cohort.base_poi, k=6, seed=0)


@pytest.fixture(scope="module")
def dataset(cohort, clusters, tmp_path_factory):
    out = tmp_path_factory.mktemp("tensors")
    tensorize_cohort([cohort.events], out, categories=cohort.categories, location_cluster=clusters.labels,
                     assign_split=UserSplitter(cold_start_max_events=50), cfg=CFG, progress=False)
    return out


def _slots(events: pd.DataFrame, cfg: TensorConfig) -> pd.DataFrame:
    """Reference (slow, obvious) slot arithmetic: per user from midnight of its first day."""
    ev = events.copy()
    first = ev.groupby("user_id")["timestamp"].transform("min").dt.floor("D")
    slot = ((ev["timestamp"] - first).dt.total_seconds() // (cfg.slot_minutes * 60)).astype(int)
    ev["window"], ev["t"] = slot // cfg.window_slots, slot % cfg.window_slots
    return ev


def _placed(events: pd.DataFrame, cfg: TensorConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Events with their top-K cell ``rank``: (placed in the layout, all)."""
    ev = _slots(events, cfg)
    visits = ev.groupby(["user_id", "location_id"]).size().rename("n").reset_index()
    visits = visits.sort_values(["user_id", "n", "location_id"], ascending=[True, False, True])
    visits["rank"] = visits.groupby("user_id").cumcount()
    ev = ev.merge(visits[["user_id", "location_id", "rank"]], on=["user_id", "location_id"])
    return ev[ev["rank"] < cfg.height * cfg.width], ev


def test_counts_equal_events_per_user_slot_location(cohort, clusters):
    items = tensorize_users(cohort.events, cohort.categories, clusters.labels, CFG)
    placed, ev = _placed(cohort.events, CFG)
    HW = CFG.height * CFG.width
    expected = placed.groupby(["user_id", "window", "t", "rank", "app_category"]).size()
    row = {(u, w): i for i, (u, w) in enumerate(zip(items["user_id"], items["window"]))}
    x = items["x"].reshape(len(items["x"]), len(cohort.categories) + 2, CFG.window_slots, HW)
    got = np.array([x[row[u, w], c, t, r] for (u, w, t, r, c) in expected.index])
    np.testing.assert_array_equal(got, expected.to_numpy())
    assert x[:, :20].sum() == len(placed)                        # nothing else was counted
    assert items["dropped_events"].sum() == len(ev) - len(placed)
    traffic = placed.groupby(["user_id", "window", "t", "rank"])["traffic_bytes"].sum()
    got = np.array([x[row[u, w], -1, t, r] for (u, w, t, r) in traffic.index])
    np.testing.assert_allclose(got, traffic.to_numpy(), rtol=1e-6)
    presence = x[:, -2]
    assert set(np.unique(presence)) <= {0.0, 1.0}
    np.testing.assert_array_equal(presence, x[:, :20].sum(1) > 0)


def test_round_trip_tensor_back_to_events(cohort, clusters):
    """Expanding every count back into events gives exactly the placed events, key for key."""
    items = tensorize_users(cohort.events, cohort.categories, clusters.labels, CFG)
    n, c, t, h, w = np.nonzero(items["x"][:, :20])
    counts = items["x"][n, c, t, h, w].astype(int)
    back = pd.DataFrame({"user_id": items["user_id"][n], "window": items["window"][n], "t": t,
                         "rank": h * CFG.width + w, "app_category": c}).loc[np.repeat(np.arange(len(n)), counts)]
    keys = ["user_id", "window", "t", "rank", "app_category"]
    placed, _ = _placed(cohort.events, CFG)
    a = back.groupby(keys).size()
    b = placed.astype({"app_category": int}).groupby(keys).size()
    pd.testing.assert_series_equal(a, b, check_index_type=False)


def test_saved_dataset_round_trips_and_splits_are_disjoint(dataset, cohort, clusters):
    meta = json.loads((dataset / DATASET_FILE).read_text())
    assert meta["shape"] == {"C": 22, "T": 96, "H": 3, "W": 5}
    assert len(meta["shards"]) == int(np.ceil(cohort.events["user_id"].nunique() / CFG.shard_users))
    users = {name: set(u) for name, u in meta["splits"].items()}
    assert sum(map(len, users.values())) == len(set().union(*users.values())) == cohort.events["user_id"].nunique()
    everything = BehaviourTensors(dataset).arrays()
    reference = tensorize_users(cohort.events, cohort.categories, clusters.labels, CFG)
    order = np.lexsort((everything["window"], everything["user_id"]))
    for key in ("x", "available", "timestamps", "cell_cluster", "slot_cluster", "user_id", "window"):
        np.testing.assert_array_equal(everything[key][order], reference[key], err_msg=key)
    for name, members in users.items():
        got = set(BehaviourTensors(dataset, name).arrays()["user_id"].tolist()) if members else set()
        assert got == members
    item = BehaviourTensors(dataset, "train")[0]
    assert item["x"].shape == (22, 96, 3, 5) and item["available"].dtype == torch.bool


def test_normaliser_is_fitted_on_train_users_only(dataset):
    train = BehaviourTensors(dataset, "train")
    arrays = train.arrays()
    ref = Log1pStandardizer.fit(arrays["x"], arrays["available"][:, None].squeeze(1))
    np.testing.assert_allclose(train.normalizer.mean, ref.mean, rtol=1e-5)
    np.testing.assert_allclose(train.normalizer.std, ref.std, rtol=1e-5)
    whole = BehaviourTensors(dataset).arrays()
    assert not np.allclose(Log1pStandardizer.fit(whole["x"], whole["available"]).mean, ref.mean)
    z = BehaviourTensors(dataset, "train", normalized=True)[0]["x"]
    np.testing.assert_allclose(train.normalizer.inverse_transform(z[None])[0], train[0]["x"], rtol=1e-4, atol=1e-3)


def test_availability_marks_missing_days_and_padding(cohort, clusters):
    ev = cohort.events
    user = ev.groupby("user_id").size().idxmax()
    mine = ev[ev["user_id"] == user]
    first_day = mine["timestamp"].min().floor("D")
    dropped_day = first_day + pd.Timedelta(days=1)
    kept = mine[mine["timestamp"].dt.floor("D") != dropped_day]
    cfg = TensorConfig(window_slots=192, height=3, width=5)              # window 0 = days 0 and 1
    items = tensorize_users(kept, cohort.categories, clusters.labels, cfg)
    avail = items["available"][0]
    assert not avail[96:].any()                                          # the missing day
    n_places = min(kept["location_id"].nunique(), cfg.height * cfg.width)
    assert avail[:96].reshape(96, -1).all(0).sum() == n_places              # real cells, whole day
    assert not avail[:96].reshape(96, -1).any(0)[n_places:].any()          # padding cells never
    assert (items["cell_cluster"][0].reshape(-1) >= 0).sum() == n_places


def test_timestamps_give_weekday_and_slot_of_day(cohort, clusters):
    items = tensorize_users(cohort.events, cohort.categories, clusters.labels, CFG)
    start = pd.to_datetime(items["start"][0], unit="s")
    assert start == start.floor("D")
    assert items["timestamps"][0, 0].tolist() == [start.day_of_week, 0]
    assert items["timestamps"][0, 37].tolist() == [start.day_of_week, 37]
    assert items["timestamps"][0, 95].tolist() == [start.day_of_week, 95]


def test_grid_layout_centres_the_most_visited_cell(cohort, clusters):
    cfg = TensorConfig(window_slots=96, height=5, width=5, spatial="grid")
    layout = GridLayout(cohort.base_coords, clusters.labels, 500.0)
    items = tensorize_users(cohort.events[list(cohort.events.columns[:6])], cohort.categories, clusters.labels, cfg, layout)
    per_cell = items["x"][:, :20].sum(axis=(1, 2))                         # [N, H, W]
    by_user = pd.DataFrame({"u": items["user_id"]}).groupby("u").indices
    for rows in by_user.values():
        total = per_cell[rows].sum(0)
        assert total.argmax() == 12                                     # centre of 5 x 5
    gy, gx = layout.cells_of(cohort.events["location_id"].to_numpy())
    expected = layout.cluster_of(gy, gx)
    assert items["dropped_events"].sum() + per_cell.sum() == len(cohort.events)
    assert items["available"].all(axis=(2, 3)).sum() > 0                   # every grid cell is a real place
    assert set(np.unique(items["cell_cluster"])) <= set(np.unique(expected)) | {-1}
    with pytest.raises(ValueError, match="location 999999 has no coordinates"):
        layout.cells_of(np.array([999999]))


def test_streaming_in_small_shards_equals_one_batch(cohort, clusters, tmp_path):
    blocks = [cohort.events.iloc[i:i + 5000] for i in range(0, len(cohort.events), 5000)]
    tensorize_cohort(blocks, tmp_path / "a", categories=cohort.categories, location_cluster=clusters.labels,
                     assign_split=UserSplitter(), cfg=TensorConfig(window_slots=96, shard_users=3), progress=False)
    tensorize_cohort([cohort.events], tmp_path / "b", categories=cohort.categories, location_cluster=clusters.labels,
                     assign_split=UserSplitter(), cfg=TensorConfig(window_slots=96, shard_users=1000), progress=False)
    a, b = BehaviourTensors(tmp_path / "a").arrays(), BehaviourTensors(tmp_path / "b").arrays()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    ds = BehaviourTensors(tmp_path / "a")
    ranks = [ds.shards_for_rank(r, 2) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(range(len(ds.meta["shards"])))


def test_a_stream_not_grouped_by_user_is_refused(cohort, clusters, tmp_path):
    ev = cohort.events
    first = ev[ev["user_id"] == ev["user_id"].iloc[0]]
    blocks = [first.iloc[:10], ev[ev["user_id"] != first["user_id"].iloc[0]], first.iloc[10:]]
    with pytest.raises(ValueError, match="not grouped by user_id"):
        tensorize_cohort(blocks, tmp_path, categories=cohort.categories, location_cluster=clusters.labels,
                         assign_split=UserSplitter(), cfg=TensorConfig(shard_users=2), progress=False)
    assert not (tmp_path / DATASET_FILE).exists()


def test_bad_configs_and_missing_dataset_are_explained(tmp_path):
    with pytest.raises(ValueError, match="slot_minutes must divide a day"):
        TensorConfig(slot_minutes=7)
    with pytest.raises(ValueError, match="spatial must be"):
        TensorConfig(spatial="hexagons")
    with pytest.raises(FileNotFoundError, match="not a tensorized cohort"):
        BehaviourTensors(tmp_path)
