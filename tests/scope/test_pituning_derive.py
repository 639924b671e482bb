"""Intents derived from Tsinghua-format traces (scope/pituning/derive.py): records, labels, bad input, samples."""

import numpy as np
import pandas as pd
import pytest
import torch

from scope.data.events import DataError
from scope.data.simulate import CohortConfig, simulate_cohort
from scope.data.tsinghua import BASE_POI_FILE, TRACE_FILE
from scope.pituning.data import QUERY, SampleConfig, build_samples
from scope.pituning.derive import DeriveConfig, derive_intents, load_derived_cohort, station_intents

POI = pd.DataFrame([[5, 1, 0], [0, 2, 2], [0, 0, 0]], index=pd.Index([10, 11, 12], name="BaseID"),
                   columns=["Residence", "Education", "Hotel"])


def events(rows) -> pd.DataFrame:
    """(user, minute, station, app category) rows -> a loaded-trace frame."""
    u, minute, station, category = map(np.array, zip(*rows))
    return pd.DataFrame({"user_id": u, "timestamp": (np.datetime64("2016-04-20T00:00:00") + minute.astype(
        "timedelta64[m]")).astype("datetime64[s]"), "location_id": station, "app_category": category})


def test_station_intent_is_its_dominant_poi_category_ties_to_the_earlier_column():
    assert station_intents(POI).tolist() == [0, 1, -1]


def test_one_record_per_user_and_slot_with_its_modal_station_and_app_category():
    trace = events([(1, 0, 10, 3), (1, 5, 11, 4), (1, 9, 11, 4), (1, 29, 10, 4),   # slot 0: station 10 vs 11 tie
                    (1, 31, 11, 2),                                               # slot 1
                    (2, 2, 11, 7)])
    records, intents, counts = derive_intents(trace, POI, DeriveConfig(record_minutes=30))
    assert intents == ["Residence", "Education"]                  # the categories that label a record, in file order
    assert records["user_id"].tolist() == [1, 1, 2]
    assert records["base_station_id"].tolist() == [10, 11, 11]    # ties: the smaller station id
    assert records["event"].tolist() == [4, 2, 7]                 # the app category used most in the slot
    assert records["intent"].tolist() == [0, 1, 1]
    assert np.diff(records["seconds"].to_numpy()[:2]).item() == 1800
    assert counts == {"app_records": 6, "rows_without_poi": 0, "records": 3, "users": 2}


def test_a_station_without_poi_is_named_or_counted_under_lenient():
    trace = events([(1, 0, 10, 3), (1, 40, 12, 3), (1, 70, 10, 1)])
    with pytest.raises(DataError) as err:
        derive_intents(trace, POI, DeriveConfig(), "cohort/App_usage_trace.txt")
    assert err.value.line == 2 and err.value.field == "base_station_id" and "base station 12" in str(err.value)
    assert "cohort/App_usage_trace.txt:2" in str(err.value)
    records, _, counts = derive_intents(trace, POI, DeriveConfig(lenient=True))
    assert counts["rows_without_poi"] == 1 and len(records) == 2


def test_record_minutes_must_divide_a_day():
    with pytest.raises(ValueError, match="record_minutes"):
        DeriveConfig(record_minutes=7)


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tsinghua")
    simulate_cohort(CohortConfig(n_users=16, days=3, n_stations=150, n_apps=120, seed=5, cold_start_fraction=0.1),
                    out, progress=False)
    return out


def test_samples_from_a_simulated_cohort_hide_the_query_station_and_count_what_they_skip(cohort_dir):
    cohort = load_derived_cohort(cohort_dir, DeriveConfig())
    assert cohort.next_record and cohort.counts["rows_without_poi"] == 0 and len(cohort.events_vocab) == 20
    data = build_samples(cohort, SampleConfig(individual_fraction=0.3, seed=5, location_clusters=3,
                                              train_fraction=0.6, val_fraction=0.1))
    assert not set(data.population_users) & set(data.individual_users)
    assert data.skipped_users >= 1   # cold-start users have fewer than history + min_points records
    assert len(data.population_users) + len(data.individual_users) + data.skipped_users == 16
    for split in (data.population_train, data.individual["test"]):
        assert (split.location[:, -1] == 0).all() and (split.cluster[:, -1] == 0).all()
        assert (split.event[:, -1] == QUERY).all()
    # every record after the first 30 of a user is a prediction point, labelled by its own station
    events = cohort.events[cohort.events["user_id"] == data.population_users[0]]
    own = data.population_train.user == data.population_users[0]
    own_val = data.population_val.user == data.population_users[0]
    assert int(own.sum() + own_val.sum()) == len(events) - 30
    assert data.population_train.intent[own][:5].tolist() == events["intent"].to_numpy()[30:35].tolist()
    summary = data.summary()
    assert summary["skipped_users"] == data.skipped_users
    absent = set(summary["intents_absent_from_individuals"])
    seen = set(torch.cat([s.intent for s in data.individual.values()]).tolist())
    assert absent == {n for i, n in enumerate(data.intents) if i not in seen}


def test_a_bad_trace_stops_with_file_line_and_field_or_is_counted_under_lenient(cohort_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in cohort_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    lines = (bad / TRACE_FILE).read_text().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0] + " lots"
    (bad / TRACE_FILE).write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_derived_cohort(bad, DeriveConfig())
    assert err.value.line == 3 and err.value.field == "traffic_bytes"
    lenient = load_derived_cohort(bad, DeriveConfig(lenient=True))
    assert lenient.counts["trace"]["skipped_or_repaired"] == {"non_numeric_traffic": 1}
    # a station whose POI counts are all zero
    poi = pd.read_csv(bad / BASE_POI_FILE, sep="\t", index_col=0)
    station = int(lines[0].split()[2])
    poi.loc[station] = 0
    poi.to_csv(bad / BASE_POI_FILE, sep="\t")
    (bad / TRACE_FILE).write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    with pytest.raises(DataError) as err:
        load_derived_cohort(bad, DeriveConfig())
    assert err.value.line == 1 and err.value.field == "base_station_id" and str(bad / TRACE_FILE) in str(err.value)
    assert load_derived_cohort(bad, DeriveConfig(lenient=True)).counts["rows_without_poi"] >= 1
