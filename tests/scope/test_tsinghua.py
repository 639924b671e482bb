"""The Tsinghua-format readers: real metadata quirks, every kind of bad trace row, streaming."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scope.data.events import DataError, validate_events
from scope.data.tsinghua import (APP2CATEGORY_FILE, BASE_POI_FILE, CATEGORIES_FILE, TRACE_FILE, decode_timestamps,
                                 load_cohort, read_app_categories, read_base_poi, read_categories, read_trace)
from tests.conftest import shared_data

GOOD = [
    "1 20160420080000 10 3 1200",
    "1 20160420080500 11 4 300.5",
    "1 20160420091500 10 3 0",
    "2 20160420070000 12 5 42",
    "2 20160421230000 12 3 77",
]


def make_cohort(root: Path, lines: list[str] | bytes) -> Path:
    """A tiny cohort directory: 3 categories, apps 3-5, stations 10-12."""
    root.mkdir(parents=True, exist_ok=True)
    (root / CATEGORIES_FILE).write_text("0\t'Utilities'\n1\t'Games'\n2\t'Social\\_Networking '")
    (root / APP2CATEGORY_FILE).write_text("3 0\n4 1\n5 2")
    (root / BASE_POI_FILE).write_text("BaseID\tResidence\tShopping\n10\t5\t1\n11\t0\t3\n12\t2\t2\n")
    data = lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode()
    (root / TRACE_FILE).write_bytes(data)
    return root


def _read(root: Path, **kwargs):
    apps = read_app_categories(root / APP2CATEGORY_FILE)
    return read_trace(root / TRACE_FILE, apps, read_base_poi(root / BASE_POI_FILE).index, **kwargs)


# -- real metadata --------------------------------------------------------------------------

def test_real_metadata_parses_with_its_quirks():
    meta = shared_data("tsinghua-meta")
    categories = read_categories(meta / CATEGORIES_FILE)
    assert len(categories) == 20
    assert categories[4] == "Social_Networking"       # escaped \_ undone
    assert categories[9] == "Lifestyle"               # trailing space inside the quotes removed
    assert categories[19] == "sports"                 # last line has no final newline
    apps = read_app_categories(meta / APP2CATEGORY_FILE, len(categories))
    # The file has 1,696 lines (ids 0..1695) but no final newline, so `wc -l` says 1695.
    assert len(apps) == 1696 and apps.index.min() == 0 and apps.index.max() == 1695
    assert apps.between(0, 19).all()
    poi = read_base_poi(meta / BASE_POI_FILE)
    assert poi.shape == (9851, 17)
    assert poi.columns[0] == "Medical care" and poi.columns[-1] == "Other"
    assert (poi.to_numpy() >= 0).all()


# -- a clean trace --------------------------------------------------------------------------

def test_clean_trace_reads_to_the_event_schema(tmp_path):
    events, report = _read(make_cohort(tmp_path, GOOD))
    validate_events(events)
    assert report.clean and report.rows_read == report.rows_kept == 5
    assert events["timestamp"].iloc[1] == pd.Timestamp("2016-04-20 08:05:00")
    assert events["app_category"].tolist() == [0, 1, 0, 2, 0]
    assert events["location_id"].tolist() == [10, 11, 10, 12, 12]
    assert events["traffic_bytes"].tolist() == [1200, 300.5, 0, 42, 77]


def test_timestamps_are_calendar_checked():
    seconds, valid = decode_timestamps(np.array([20160420080000, 20160229235959, 20150229000000,
                                                 20160431000000, 20160420240000, 2016042008]))
    assert valid.tolist() == [True, True, False, False, False, False]
    assert seconds[0] == pd.Timestamp("2016-04-20 08:00").value // 10**9


def test_tiny_blocks_give_the_same_events_and_line_numbers(tmp_path):
    root = make_cohort(tmp_path, GOOD)
    whole, _ = _read(root)
    pieces, _ = _read(root, block_bytes=16)
    pd.testing.assert_frame_equal(whole, pieces)
    bad = make_cohort(tmp_path / "bad", GOOD[:4] + ["2 20160421230000 12 3 -1"])
    with pytest.raises(DataError, match=r":5: field 'traffic_bytes'"):
        _read(bad, block_bytes=16)


# -- bad input: strict names file, line, field and what was expected -----------------------

BAD_ROWS = {
    "malformed_timestamp": ("1 2016042X080000 10 3 5", "timestamp", "yyyymmddhhmmss"),
    "impossible_date": ("1 20160230080000 10 3 5", "timestamp", "valid yyyymmddhhmmss"),
    "non_numeric_traffic": ("1 20160420100000 10 3 lots", "traffic_bytes", "number of bytes"),
    "nan_traffic": ("1 20160420100000 10 3 nan", "traffic_bytes", "finite"),
    "negative_traffic": ("1 20160420100000 10 3 -12", "traffic_bytes", "non-negative"),
    "unknown_app": ("1 20160420100000 10 99 5", "app_id", "App2Category"),
    "unknown_base_station": ("1 20160420100000 77 3 5", "base_station_id", "base_poi"),
    "wrong_column_count": ("1 20160420100000 10 3", None, "expected 5 space-separated fields"),
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_is_located(tmp_path, kind):
    row, field, expected = BAD_ROWS[kind]
    root = make_cohort(tmp_path, GOOD[:3] + [row] + GOOD[3:])
    with pytest.raises(DataError) as err:
        _read(root)
    message = str(err.value)
    assert f"{TRACE_FILE}:4:" in message
    assert (f"field '{field}'" in message) if field else ("field" not in message.split(":4:")[1][:8])
    assert expected in message


def test_non_utf8_bytes_are_located(tmp_path):
    data = ("\n".join(GOOD[:2]) + "\n").encode() + b"1 2016042010\xff000 10 3 5\n" + (GOOD[2] + "\n").encode()
    with pytest.raises(DataError, match=rf"{TRACE_FILE}:3: .*0xff.*not valid UTF-8"):
        _read(make_cohort(tmp_path, data))


def test_duplicate_row_is_located(tmp_path):
    with pytest.raises(DataError, match=rf"{TRACE_FILE}:3: identical to an earlier row"):
        _read(make_cohort(tmp_path, GOOD[:2] + [GOOD[1]] + GOOD[2:]))


def test_out_of_order_rows_are_located(tmp_path):
    with pytest.raises(DataError, match=rf"{TRACE_FILE}:3: field 'timestamp': .*earlier than"):
        _read(make_cohort(tmp_path, [GOOD[0], GOOD[2], GOOD[1]] + GOOD[3:]))
    with pytest.raises(DataError, match=rf"{TRACE_FILE}:6: field 'user_id': user 1 reappears"):
        _read(make_cohort(tmp_path / "regroup", GOOD + ["1 20160422080000 10 3 5"]))


def test_empty_file_is_an_error_even_when_lenient(tmp_path):
    root = make_cohort(tmp_path, b"")
    for strict in (True, False):
        with pytest.raises(DataError, match=rf"{TRACE_FILE}: file is empty"):
            _read(root, strict=strict)


def test_missing_metadata_file_is_named(tmp_path):
    root = make_cohort(tmp_path, GOOD)
    (root / BASE_POI_FILE).unlink()
    with pytest.raises(DataError, match=rf"{BASE_POI_FILE}: file not found"):
        load_cohort(root)


def test_malformed_metadata_is_located(tmp_path):
    root = make_cohort(tmp_path, GOOD)
    (root / APP2CATEGORY_FILE).write_text("3 0\n4 x\n")
    with pytest.raises(DataError, match=rf"{APP2CATEGORY_FILE}:2: field 'cat_id'"):
        load_cohort(root)
    (root / APP2CATEGORY_FILE).write_text("3 0\n4 7\n")
    with pytest.raises(DataError, match=rf"{APP2CATEGORY_FILE}:2: field 'cat_id': category 7"):
        load_cohort(root)


# -- lenient: skip, count, report; never lose a valid row -----------------------------------

def test_lenient_read_counts_each_kind_and_keeps_every_valid_row(tmp_path):
    rows = list(GOOD)
    rows.insert(1, BAD_ROWS["malformed_timestamp"][0])
    rows.insert(2, BAD_ROWS["unknown_app"][0])
    rows.insert(3, GOOD[0])                                   # duplicate of row 1
    rows.insert(4, "3 20160420100000 10 3 -1")                # user 3 has only bad rows
    rows.insert(5, "3 20160420100000 10 3 abc")
    rows.insert(6, "9 20160420100000 10 3")                   # too few columns
    rows.append("1 20160423080000 10 3 5")                    # user 1 reappears: kept, re-sorted
    data = ("\n".join(rows) + "\n").encode() + b"2 20160420\xfe 12 5 1\n"
    events, report = _read(make_cohort(tmp_path, data), strict=False)
    assert dict(report.counts) == {
        "malformed_timestamp": 1, "unknown_app": 1, "duplicate_row": 1, "negative_traffic": 1,
        "non_numeric_traffic": 1, "wrong_column_count": 1, "out_of_order": 1, "non_utf8": 1}
    assert report.users_without_valid_rows == [3]
    expected = pd.DataFrame([r.split() for r in GOOD + ["1 20160423080000 10 3 5"]],
                            columns=["user_id", "ts", "loc", "app", "bytes"])
    assert len(events) == len(expected) == report.rows_kept
    assert events["user_id"].tolist() == [1, 1, 1, 1, 2, 2]  # re-sorted by user, then time
    assert events["timestamp"].is_monotonic_increasing is False
    assert events.groupby("user_id")["timestamp"].apply(lambda s: s.is_monotonic_increasing).all()
    assert "users with zero valid rows: 1 (3)" in report.summary()


def test_user_with_zero_valid_rows_stops_a_strict_read(tmp_path):
    root = make_cohort(tmp_path, GOOD + ["3 20160420100000 10 3 -1"])
    with pytest.raises(DataError, match=rf"{TRACE_FILE}:6: field 'traffic_bytes'"):
        _read(root)


def test_a_trace_without_any_valid_row_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no valid rows"):
        _read(make_cohort(tmp_path, ["1 2016 10 3 5", "2 x 10 3 5"]), strict=False)


def test_simulated_cohort_loads_cleanly_with_coordinates(small_cohort):
    cohort = load_cohort(small_cohort)
    validate_events(cohort.events)
    assert cohort.report.clean
    assert {"lat", "lon"} <= set(cohort.events.columns)
    assert cohort.events["lat"].notna().all()
    assert len(cohort.categories) == 20 and cohort.base_poi.shape[1] == 17
