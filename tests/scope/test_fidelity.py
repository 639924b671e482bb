"""Fidelity scores (scope.synthesis.fidelity, Eq. 26) against direct computations, and the user bootstrap."""

import numpy as np
import pandas as pd
import pytest

from scope.data.simulate import APP_CATEGORIES
from scope.synthesis.fidelity import (app_poi_correlation, bootstrap_pearson, compare, correlation_sums, fidelity_report,
                                      next_category_accuracy, next_category_xy)
from scope.synthesis.traces import TraceGrammar, windows_from_events

GRAMMAR = TraceGrammar(APP_CATEGORIES, 3, 30)


def cohort(seed: int, n: int = 400) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    base_poi = pd.DataFrame(rng.integers(0, 10, size=(5, 4)).astype(float), columns=list("ABCD"),
                            index=pd.Index(range(5), name="BaseID"))
    location = rng.integers(0, 5, n)
    category = np.where(location < 2, rng.integers(0, 3, n), rng.integers(3, 6, n))   # apps depend on the place
    events = pd.DataFrame({"user_id": np.repeat([1, 2], n // 2),
                           "timestamp": pd.Timestamp("2016-04-20") + pd.to_timedelta(np.sort(rng.integers(0, 86400 * 2, n)), unit="s"),
                           "app_category": category, "location_id": location, "traffic_bytes": 100.0})
    events = events.sort_values(["user_id", "timestamp"], ignore_index=True)
    return events, base_poi


def test_correlation_matches_numpy_corrcoef_per_entry():
    events, base_poi = cohort(0)
    corr = app_poi_correlation(events, base_poi, len(APP_CATEGORIES))
    shares = base_poi.to_numpy() / base_poi.to_numpy().sum(1, keepdims=True)
    y = shares[events["location_id"].to_numpy()]
    for a in (0, 4):
        x = (events["app_category"].to_numpy() == a).astype(float)
        for p in range(4):
            assert corr[a, p] == pytest.approx(np.corrcoef(x, y[:, p])[0, 1])
    assert np.isnan(corr[10]).all()   # an app category that never occurs


def test_identical_cohorts_agree_perfectly_and_shuffled_places_do_not():
    events, base_poi = cohort(1)
    same = compare(events, events, base_poi, len(APP_CATEGORIES))
    assert same["pearson_r"] == pytest.approx(1) and same["hour_jsd"] == pytest.approx(0) and same["mae"] == 0
    shuffled = events.assign(location_id=np.random.default_rng(2).permutation(events["location_id"].to_numpy()))
    worse = compare(events, shuffled, base_poi, len(APP_CATEGORIES))
    assert worse["pearson_r"] < 0.5 and worse["app_jsd"] == pytest.approx(0)


def test_next_category_features_and_utility():
    events, _ = cohort(3)
    of = lambda ids: np.asarray(ids) % 3
    windows = windows_from_events(events, of, GRAMMAR)
    x, y = next_category_xy(windows, GRAMMAR)
    assert len(x) == len(y) == sum(len(w.events) - 1 for w in windows) and x.shape[1] == 24 + 1 + 20 + 3 + 4 + 1
    accuracy = next_category_accuracy(windows, windows, GRAMMAR)
    assert 0 <= accuracy <= 1
    assert np.isnan(next_category_accuracy([], windows, GRAMMAR))


def test_report_writes_json_and_figures(tmp_path):
    events, base_poi = cohort(4)
    of = lambda ids: np.asarray(ids) % 3
    windows = windows_from_events(events, of, GRAMMAR)
    summary = fidelity_report(events, events, base_poi, list(APP_CATEGORIES), tmp_path, grammar=GRAMMAR,
                              train_real=windows, train_synthetic=windows, test_real=windows, extra={"note": 1})
    assert summary["tstr_accuracy"] == summary["trtr_accuracy"] and summary["note"] == 1
    for name in ("fidelity.json", "corr_difference.png", "corr_scatter.png", "distributions.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_per_user_sums_rebuild_the_pooled_correlation_and_weight_users():
    events, base_poi = cohort(5)
    n_a = len(APP_CATEGORIES)
    sums = correlation_sums(events, base_poi, n_a)
    assert sums.users.tolist() == [1, 2] and sums.n.tolist() == [200, 200]
    np.testing.assert_allclose(sums.correlation(), app_poi_correlation(events, base_poi, n_a), atol=1e-12)
    twice_user_2 = pd.concat([events, events[events["user_id"] == 2]], ignore_index=True)
    np.testing.assert_allclose(sums.correlation(np.array([0, 2])),                  # only the weights' ratio counts
                               app_poi_correlation(events[events["user_id"] == 2], base_poi, n_a), atol=1e-12)
    np.testing.assert_allclose(sums.correlation(np.array([1, 2])), app_poi_correlation(twice_user_2, base_poi, n_a),
                               atol=1e-12)
    absent = correlation_sums(events, base_poi, n_a, users=np.array([1, 2, 3]))
    assert absent.n.tolist() == [200, 200, 0] and np.isnan(absent.correlation(np.array([0, 0, 1]))).all()


def test_user_bootstrap_is_paired_deterministic_and_brackets_the_estimate():
    events, base_poi = cohort(6, n=2000)
    events = events.assign(user_id=np.tile(np.arange(10), 200))      # 10 users of 200 records
    n_a = len(APP_CATEGORIES)
    other, _ = cohort(7, n=2000)
    other = other.assign(user_id=np.tile(np.arange(10), 200))
    sums = {"a": correlation_sums(events, base_poi, n_a), "b": correlation_sums(other, base_poi, n_a)}
    pairs = {"same": ("a", "a"), "other": ("a", "b")}
    draws = bootstrap_pearson(sums, pairs, n_boot=200, seed=0)
    np.testing.assert_allclose(draws["same"], 1.0)
    point = compare(events, other, base_poi, n_a)["pearson_r"]
    lo, hi = np.quantile(draws["other"], [0.025, 0.975])
    assert lo <= point <= hi and hi - lo > 0
    np.testing.assert_array_equal(draws["other"], bootstrap_pearson(sums, pairs, n_boot=200, seed=0)["other"])
    with pytest.raises(ValueError, match="same users"):
        bootstrap_pearson({"a": sums["a"], "c": correlation_sums(other[other["user_id"] < 5], base_poi, n_a)},
                          {"x": ("a", "c")})
