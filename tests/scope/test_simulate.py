"""The cohort simulator: determinism, realism the later stages rely on, and its file format."""

import filecmp

import numpy as np
import pandas as pd

from scope.data.locations import cluster_locations
from scope.data.simulate import (GROUND_TRUTH_FILE, PERSONAS, POI_CATEGORIES, CohortConfig, read_ground_truth,
                                 simulate_cohort)
from scope.data.splits import UserSplitter
from scope.data.tsinghua import (APP2CATEGORY_FILE, BASE_POI_FILE, CATEGORIES_FILE, TRACE_FILE, load_cohort,
                                 read_base_poi)
from tests.conftest import shared_data

FILES = (TRACE_FILE, APP2CATEGORY_FILE, CATEGORIES_FILE, BASE_POI_FILE, "base_coords.txt", GROUND_TRUTH_FILE)


def test_same_seed_same_files_other_seed_other_trace(tmp_path):
    cfg = dict(n_users=12, days=2, n_stations=200, n_apps=100)
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        simulate_cohort(CohortConfig(seed=seed, **cfg), tmp_path / name, progress=False)
    for f in FILES:
        assert filecmp.cmp(tmp_path / "a" / f, tmp_path / "b" / f, shallow=False), f
    assert not filecmp.cmp(tmp_path / "a" / TRACE_FILE, tmp_path / "c" / TRACE_FILE, shallow=False)


def test_a_user_does_not_depend_on_cohort_size(tmp_path):
    simulate_cohort(CohortConfig(n_users=5, days=2, seed=1, n_stations=200, n_apps=100), tmp_path / "small", progress=False)
    simulate_cohort(CohortConfig(n_users=9, days=2, seed=1, n_stations=200, n_apps=100), tmp_path / "large", progress=False)
    small, large = (pd.read_csv(tmp_path / d / TRACE_FILE, sep=" ", header=None) for d in ("small", "large"))
    first = large[large[0] == 1].reset_index(drop=True)
    pd.testing.assert_frame_equal(small[small[0] == 1].reset_index(drop=True), first)


def test_personas_ground_truth_and_cold_start_users(small_cohort):
    truth = read_ground_truth(small_cohort)
    cohort = load_cohort(small_cohort)
    counts = cohort.events.groupby("user_id").size()
    assert len(PERSONAS) >= 5 and set(truth["persona"]) <= set(PERSONAS)
    assert truth["persona"].nunique() >= 4
    cold = truth.index[truth["cold_start"]]
    assert len(cold) >= 1 and (counts.reindex(cold, fill_value=0) <= 30).all()
    warm = counts.drop(cold)
    assert warm.min() > 200
    prefs = pd.DataFrame(list(truth["app_category_preference"]))
    np.testing.assert_allclose(prefs.sum(axis=1), 1.0, atol=1e-3)
    # The latent preference is visible in the data: a user's most used category is (nearly
    # always) among its three most preferred ones.
    top_used = cohort.events.groupby("user_id")["app_category"].agg(lambda s: s.value_counts().idxmax())
    rank_of_used = [prefs.loc[i].rank(ascending=False).iloc[top_used[u]] for i, u in enumerate(truth.index) if u in warm.index]
    assert np.mean(np.array(rank_of_used) <= 3) > 0.9


def test_commuters_switch_places_around_8_and_18(small_cohort):
    truth = read_ground_truth(small_cohort)
    events = load_cohort(small_cohort).events
    commuters = truth.index[(truth["persona"] == "commuter") & ~truth["cold_start"]]
    ev = events[events["user_id"].isin(commuters) & (events["timestamp"].dt.day_of_week < 5)].copy()
    home = truth.loc[ev["user_id"], "home_station"].to_numpy()
    work = truth.loc[ev["user_id"], "work_station"].to_numpy()
    ev["place"] = np.select([ev["location_id"] == home, ev["location_id"] == work], ["home", "work"], "other")
    ev = ev[ev["place"] != "other"]
    changed = (ev["place"] != ev["place"].shift()) & (ev["user_id"] == ev["user_id"].shift())
    hours = ev.loc[changed, "timestamp"].dt.hour
    near_peaks = hours.isin([7, 8, 9, 17, 18, 19]).mean()
    assert len(hours) >= 2 * len(commuters)
    assert near_peaks > 0.85, hours.value_counts().sort_index()


def test_poi_file_matches_the_real_header_and_clusters_are_meaningful(small_cohort):
    poi = read_base_poi(small_cohort / BASE_POI_FILE)
    assert tuple(poi.columns) == POI_CATEGORIES
    real = read_base_poi(shared_data("tsinghua-meta") / BASE_POI_FILE)
    assert tuple(real.columns) == POI_CATEGORIES
    clusters = cluster_locations(poi, k=6, seed=0)
    assert sorted(set(clusters.labels)) == list(range(6))
    assert any("Residence" in n for n in clusters.names) and any("Business" in n for n in clusters.names)
    truth = read_ground_truth(small_cohort)
    homes = clusters.of(truth.loc[truth["persona"] == "commuter", "home_station"])
    works = clusters.of(truth.loc[truth["persona"] == "commuter", "work_station"])
    assert (homes != works).mean() > 0.7


def test_location_clusters_are_deterministic_on_the_real_poi_table():
    poi = read_base_poi(shared_data("tsinghua-meta") / BASE_POI_FILE)
    a, b = cluster_locations(poi, k=6, seed=0), cluster_locations(poi, k=6, seed=0)
    assert a.labels.equals(b.labels) and len(a.labels) == 9851
    assert np.bincount(a.labels)[0] == np.bincount(a.labels).max()  # ordered by size
    assert (a.of([0, 999999]) == [a.labels[0], -1]).all()


def test_splits_are_disjoint_complete_and_stable(small_cohort):
    events = load_cohort(small_cohort).events
    splitter = UserSplitter(cold_start_max_events=50, seed=0)
    splits = splitter.split(events)
    users = [u for s in splits.values() for u in s]
    assert len(users) == len(set(users)) == events["user_id"].nunique()
    counts = events.groupby("user_id").size()
    assert set(splits["cold"]) == set(counts.index[counts < 50])
    sub = splitter.split(events[events["user_id"] <= 20])  # same user, same split in any subset
    for name, members in sub.items():
        assert set(members) <= set(splits[name])
    big = splitter(np.arange(100_000), np.full(100_000, 100))
    shares = pd.Series(big).value_counts(normalize=True)
    assert abs(shares["train"] - 0.8) < 0.01 and abs(shares["val"] - 0.1) < 0.01
