"""Fidelity scores (scope.synthesis.fidelity, Eq. 26) against direct computations."""

import numpy as np
import pandas as pd
import pytest

from scope.data.simulate import APP_CATEGORIES
from scope.synthesis.fidelity import (app_poi_correlation, compare, fidelity_report, next_category_accuracy,
                                      next_category_xy)
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
