"""Hostile and defective cohorts through the loader's real entry point (``recipes/tensorize.py``),
strict and lenient: every case ends in a one-line error naming file, line and field (or is
repaired and counted under ``--lenient``), nothing crashes, and a failed run never destroys the
previous valid output."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from completion.tensors import TensorConfig
from recipes import tensorize
from scope.cli import parse_config, run_recipe
from scope.data.simulate import CohortConfig, simulate_cohort
from scope.data.splits import UserSplitter

TRACE, APPS, CATS, POI = "App_usage_trace.txt", "App2Category.txt", "Categorys.txt", "base_poi.txt"


def set_field(lines: list[str], line: int, field: int, value: str) -> None:
    parts = lines[line - 1].split(" ")
    parts[field] = value
    lines[line - 1] = " ".join(parts)


def duplicate_later(lines: list[str]) -> None:
    """Line 3 again after the next user's rows: a duplicate that is not adjacent."""
    first_user = lines[0].split()[0]
    end = next(i for i, t in enumerate(lines) if t.split()[0] != first_user)
    lines.insert(end + 5, lines[2])


def move_first_user_to_the_end(lines: list[str]) -> None:
    """Half of the first user's rows after every other user: users interleaved across shards."""
    first_user = lines[0].split()[0]
    end = next(i for i, t in enumerate(lines) if t.split()[0] != first_user)
    moved = lines[end // 2:end]
    del lines[end // 2:end]
    lines.extend(moved)


def swap_times(lines: list[str]) -> None:
    lines[3], lines[4] = lines[4], lines[3]


# name -> (file, edit of its lines, file:line in the first error line, field, lenient outcome: the
# load_report kind it is counted under, or None when even a lenient run must stop)
CASES = {
    "user id too large for int64": (TRACE, lambda ls: set_field(ls, 5, 0, "9" * 23), f"{TRACE}:5", "user_id", "malformed_user_id"),
    "timestamp too large": (TRACE, lambda ls: set_field(ls, 5, 1, "9" * 20), f"{TRACE}:5", "timestamp", "malformed_timestamp"),
    "non-ASCII digit in a user id": (TRACE, lambda ls: set_field(ls, 5, 0, "1²"), f"{TRACE}:5", "user_id", "malformed_user_id"),
    "ten-million-digit app id": (TRACE, lambda ls: set_field(ls, 5, 3, "7" * 10_000_000), f"{TRACE}:5", "app_id", "malformed_app_id"),
    "traffic beyond float32": (TRACE, lambda ls: set_field(ls, 5, 4, "1e300"), f"{TRACE}:5", "traffic_bytes", "non_numeric_traffic"),
    "negative traffic": (TRACE, lambda ls: set_field(ls, 5, 4, "-7"), f"{TRACE}:5", "traffic_bytes", "negative_traffic"),
    "traffic nan": (TRACE, lambda ls: set_field(ls, 5, 4, "nan"), f"{TRACE}:5", "traffic_bytes", "non_numeric_traffic"),
    "traffic not a number": (TRACE, lambda ls: set_field(ls, 5, 4, "lots"), f"{TRACE}:5", "traffic_bytes", "non_numeric_traffic"),
    "unknown app": (TRACE, lambda ls: set_field(ls, 5, 3, "999999"), f"{TRACE}:5", "app_id", "unknown_app"),
    "unknown base station": (TRACE, lambda ls: set_field(ls, 5, 2, "999999"), f"{TRACE}:5", "base_station_id", "unknown_base_station"),
    "31 February": (TRACE, lambda ls: set_field(ls, 5, 1, "20160231101010"), f"{TRACE}:5", "timestamp", "malformed_timestamp"),
    "letters in a timestamp": (TRACE, lambda ls: set_field(ls, 5, 1, "2016O420101010"), f"{TRACE}:5", "timestamp", "malformed_timestamp"),
    "a missing field": (TRACE, lambda ls: ls.__setitem__(4, " ".join(ls[4].split()[:4])), f"{TRACE}:5", None, "wrong_column_count"),
    "a blank line": (TRACE, lambda ls: ls.insert(4, ""), f"{TRACE}:5", None, "blank_line"),
    "adjacent duplicate": (TRACE, lambda ls: ls.insert(5, ls[4]), f"{TRACE}:6", None, "duplicate_row"),
    "non-adjacent duplicate": (TRACE, duplicate_later, TRACE, "user_id", "duplicate_row"),
    "users interleaved across shards": (TRACE, move_first_user_to_the_end, TRACE, "user_id", "out_of_order"),
    "time going backwards": (TRACE, swap_times, f"{TRACE}:5", "timestamp", "out_of_order"),
    "non-ASCII digit in App2Category.txt": (APPS, lambda ls: ls.__setitem__(2, "2²" + ls[2][1:]), f"{APPS}:3", "app_id", None),
    "app listed twice": (APPS, lambda ls: ls.append(ls[0].split()[0] + " 5"), APPS, "app_id", None),
    "category ids with a gap": (CATS, lambda ls: ls.pop(1), CATS, "id", None),
    "negative POI count": (POI, lambda ls: ls.__setitem__(1, ls[1].rsplit("\t", 1)[0] + "\t-3"), f"{POI}:2", None, None),
    "base station id with letters": (POI, lambda ls: ls.__setitem__(1, "x" + ls[1]), f"{POI}:2", "BaseID", None),
    "empty trace": (TRACE, lambda ls: ls.clear(), TRACE, None, None),
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "cohort"
    simulate_cohort(CohortConfig(n_users=6, days=2, n_stations=200, n_apps=100, events_per_day=60, seed=3), root,
                    progress=False)
    return root


@pytest.fixture(scope="module")
def previous_output(cohort, tmp_path_factory) -> Path:
    """A valid dataset from an earlier run, copied under each case's output folder."""
    out = tmp_path_factory.mktemp("previous") / "tensors"
    assert cli(cohort, out, lenient=False) == 0
    return out


def cli(cohort: Path, out: Path, lenient: bool) -> int:
    argv = ["--cohort_dir", str(cohort), "--output_dir", str(out), "--lenient", str(lenient).lower(),
            "--shard_users", "2", "--window_slots", "96", "--height", "2", "--width", "2"]
    return run_recipe(tensorize.main, *parse_config((tensorize.TensorizeArguments, TensorConfig, UserSplitter), argv))


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def broken_copy(cohort: Path, tmp_path: Path, name: str) -> Path:
    target, edit = CASES[name][0], CASES[name][1]
    copy = tmp_path / "cohort"
    shutil.copytree(cohort, copy)
    text = (copy / target).read_text(encoding="utf-8")
    lines = text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
    edit(lines)
    (copy / target).write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return copy


@pytest.mark.parametrize("lenient", [False, True], ids=["strict", "lenient"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input(name, lenient, cohort, previous_output, tmp_path, capsys):
    _, _, where, field, counted_as = CASES[name]
    bad = broken_copy(cohort, tmp_path, name)
    out = tmp_path / "tensors"
    shutil.copytree(previous_output, out)
    before = digest(out)
    status = cli(bad, out, lenient)
    err = capsys.readouterr().err
    if lenient and counted_as is not None:
        assert status == 0, err
        report = json.loads((out / "load_report.json").read_text())
        assert report["skipped_or_repaired"].get(counted_as, 0) >= 1, report
        assert report["rows_kept"] <= report["rows_read"]
        assert (out / "dataset.json").exists()
        return
    assert status == 2
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    first = errors[0]
    assert where in first, first
    if field is not None:
        assert f"field '{field}'" in first, first
    assert len(first) < 400, "the offending value is echoed in full"
    assert "np.float64" not in err and "Traceback" not in err
    assert digest(out) == before  # the previous valid output survives a failed run


def test_a_byte_order_mark_is_accepted_on_the_trace_and_the_categories(cohort, tmp_path):
    copy = tmp_path / "cohort"
    shutil.copytree(cohort, copy)
    for name in (TRACE, CATS):
        (copy / name).write_bytes(b"\xef\xbb\xbf" + (copy / name).read_bytes())
    assert cli(copy, tmp_path / "out", lenient=False) == 0
    assert json.loads((tmp_path / "out" / "load_report.json").read_text())["skipped_or_repaired"] == {}


def test_negative_traffic_is_shown_as_a_plain_number(cohort, tmp_path, capsys):
    bad = broken_copy(cohort, tmp_path, "negative traffic")
    assert cli(bad, tmp_path / "out", lenient=False) == 2
    assert "found -7.0" in capsys.readouterr().err


def test_a_lenient_run_regroups_an_interleaved_trace_into_the_same_dataset(cohort, tmp_path):
    assert cli(cohort, tmp_path / "clean", lenient=True) == 0
    bad = broken_copy(cohort, tmp_path, "users interleaved across shards")
    assert cli(bad, tmp_path / "regrouped", lenient=True) == 0
    clean = json.loads((tmp_path / "clean" / "dataset.json").read_text())
    regrouped = json.loads((tmp_path / "regrouped" / "dataset.json").read_text())
    assert regrouped["totals"] == clean["totals"] and regrouped["splits"] == clean["splits"]


def test_debug_flag_shows_the_traceback(cohort, tmp_path, monkeypatch):
    bad = broken_copy(cohort, tmp_path, "unknown app")
    monkeypatch.setenv("USCOPE_DEBUG", "1")
    with pytest.raises(ValueError, match="app_id"):
        cli(bad, tmp_path / "out", lenient=False)
