"""Readers for the Tsinghua App Usage dataset format (the public Tsinghua App Usage release).

A cohort directory holds four files (the real dataset's names):

- ``App_usage_trace.txt``: ``user_id yyyymmddhhmmss base_station_id app_id traffic_bytes``;
- ``App2Category.txt``: ``app_id cat_id``;
- ``Categorys.txt``: ``id<TAB>'Name'`` (the real file escapes ``\\_``, pads names with spaces
  inside the quotes, has stray lines and no final newline: all handled);
- ``base_poi.txt``: a tab-separated header ``BaseID`` + POI categories, then counts per station;

plus, optionally, ``base_coords.txt`` (``BaseID<TAB>lat<TAB>lon``, a project extension written by
the simulator) when station coordinates are known.

The trace reader streams the file in byte blocks. Each block is parsed by pyarrow's CSV reader
(fast path); a block that does not parse cleanly is re-read line by line (slow path) to name the
exact line and field. Then every row is checked, vectorised: calendar-valid timestamp, finite
non-negative traffic, known app, known base station, no exact duplicate, rows grouped by user and
sorted by time. ``strict=True`` (default) raises :class:`DataError` at the first bad row;
``strict=False`` skips bad rows, counts each kind in a :class:`LoadReport`, and re-sorts
out-of-order rows instead of dropping them, so no valid row is ever lost.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
from tqdm.auto import tqdm

from scope.data.events import EVENT_COLUMNS, DataError, LoadReport, RowIssue, empty_events, is_ascii_int, show

log = logging.getLogger(__name__)

TRACE_FILE = "App_usage_trace.txt"
APP2CATEGORY_FILE = "App2Category.txt"
CATEGORIES_FILE = "Categorys.txt"
BASE_POI_FILE = "base_poi.txt"
BASE_COORDS_FILE = "base_coords.txt"

TRACE_FIELDS = ("user_id", "timestamp", "base_station_id", "app_id", "traffic_bytes")
TRACE_LINE_FORMAT = "user_id yyyymmddhhmmss base_station_id app_id traffic_bytes"
_INT_FIELDS = TRACE_FIELDS[:4]
_BLOCK_BYTES = 32 << 20
_BOM = b"\xef\xbb\xbf"
_MAX_TRAFFIC = float(np.finfo(np.float32).max)  # traffic is stored as float32 in the tensors


# --------------------------------------------------------------------------------------------
# Metadata files
# --------------------------------------------------------------------------------------------

def _read_lines(path: Path) -> list[str]:
    """Decode a small text file strictly, naming the line of the first non-UTF-8 byte."""
    raw = Path(path).read_bytes().removeprefix(_BOM)
    if not raw.strip():
        raise DataError(path, None, None, "file is empty")
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(path, line, None, f"byte {raw[err.start]:#04x} is not valid UTF-8") from None


_CATEGORY_LINE = re.compile(r"^\s*([0-9]{1,9})\t\s*'(.*)'\s*$")


def read_categories(path: str | Path) -> list[str]:
    """``Categorys.txt`` -> category names indexed by id (ids must be 0..n-1)."""
    names: dict[int, str] = {}
    stray = []
    for line_no, text in enumerate(_read_lines(path), 1):
        match = _CATEGORY_LINE.match(text)
        if not match:
            if text.strip():
                stray.append(line_no)
            continue
        cat_id, name = int(match.group(1)), re.sub(r"\\(.)", r"\1", match.group(2)).strip()  # un-escape \_ and \&
        if cat_id in names:
            raise DataError(path, line_no, "id", f"duplicate category id {cat_id}")
        names[cat_id] = name
    if stray:
        log.warning("%s: ignored %d stray line(s) that are not `id<TAB>'name'`: lines %s", path, len(stray), stray)
    if sorted(names) != list(range(len(names))):
        raise DataError(path, None, "id", f"category ids must be 0..{len(names) - 1}, found {sorted(names)}")
    return [names[i] for i in range(len(names))]


def category_key(name: str) -> str:
    """A spelling-independent key of an app category name: its ASCII letters, lower-cased. The real
    ``Categorys.txt`` writes ``Health&Fitness``, ``Social_Networking``, ``infant&mom`` and even
    ``Weath1er`` where the simulator writes ``Health & Fitness``, ``Social Networking``, ``Infant &
    Mom`` and ``Weather``; rules that recognise categories compare these keys."""
    return re.sub(r"[^a-z]", "", name.lower())


def read_app_categories(path: str | Path, n_categories: int | None = None) -> pd.Series:
    """``App2Category.txt`` -> Series ``app_id -> category id`` (int16), sorted by app id."""
    apps: dict[int, int] = {}
    for line_no, text in enumerate(_read_lines(path), 1):
        if not text.strip():
            continue
        parts = text.split()
        if len(parts) != 2:
            raise DataError(path, line_no, None, f"expected 2 fields `app_id cat_id`, found {len(parts)}")
        for name, value in zip(("app_id", "cat_id"), parts):
            if not is_ascii_int(value):
                raise DataError(path, line_no, name, f"expected a non-negative integer (at most 18 digits), "
                                f"found {show(value)}")
        app_id, cat_id = int(parts[0]), int(parts[1])
        if n_categories is not None and cat_id >= n_categories:
            raise DataError(path, line_no, "cat_id", f"category {cat_id} is not in 0..{n_categories - 1}")
        if apps.setdefault(app_id, cat_id) != cat_id:
            raise DataError(path, line_no, "app_id", f"app {app_id} is listed twice with different categories")
    return pd.Series(apps, name="app_category", dtype="int16").rename_axis("app_id").sort_index()


def read_base_poi(path: str | Path) -> pd.DataFrame:
    """``base_poi.txt`` -> frame indexed by ``BaseID`` with one float column per POI category."""
    lines = _read_lines(path)
    header = lines[0].rstrip("\r\n").split("\t")
    if header[0].strip() != "BaseID" or len(header) < 2:
        raise DataError(path, 1, None, f"expected a header `BaseID<TAB>poi category...`, found {show(lines[0])}")
    columns = [h.strip() for h in header[1:]]
    ids, rows = [], []
    for line_no, text in enumerate(lines[1:], 2):
        if not text.strip():
            continue
        parts = text.rstrip("\r\n").split("\t")
        if len(parts) != len(header):
            raise DataError(path, line_no, None, f"expected {len(header)} tab-separated fields, found {len(parts)}")
        if not is_ascii_int(parts[0].strip()):
            raise DataError(path, line_no, "BaseID", f"expected a non-negative integer, found {show(parts[0])}")
        try:
            counts = [float(p) for p in parts[1:]]
        except ValueError:
            bad = next(i for i, p in enumerate(parts[1:]) if not _is_float(p))
            raise DataError(path, line_no, columns[bad], f"expected a count, found {show(parts[bad + 1])}") from None
        if any(not np.isfinite(c) or c < 0 for c in counts):
            bad = next(i for i, c in enumerate(counts) if not np.isfinite(c) or c < 0)
            raise DataError(path, line_no, columns[bad], f"expected a non-negative count, found {show(parts[bad + 1])}")
        ids.append(int(parts[0]))
        rows.append(counts)
    frame = pd.DataFrame(rows, index=pd.Index(ids, name="BaseID"), columns=columns)
    duplicated = frame.index[frame.index.duplicated()]
    if len(duplicated):
        raise DataError(path, None, "BaseID", f"base station {duplicated[0]} is listed twice")
    return frame


def read_base_coords(path: str | Path) -> pd.DataFrame:
    """``base_coords.txt`` (project extension) -> frame indexed by ``BaseID`` with ``lat, lon``."""
    lines = _read_lines(path)
    if lines[0].split("\t")[:3] != ["BaseID", "lat", "lon"]:
        raise DataError(path, 1, None, "expected the header `BaseID<TAB>lat<TAB>lon`")
    ids, coords = [], []
    for line_no, text in enumerate(lines[1:], 2):
        parts = text.split("\t")
        if len(parts) != 3 or not is_ascii_int(parts[0]) or not all(_is_float(p) for p in parts[1:]):
            raise DataError(path, line_no, None, f"expected `BaseID<TAB>lat<TAB>lon`, found {show(text)}")
        lat, lon = float(parts[1]), float(parts[2])
        if not (-90 <= lat <= 90 and -180 <= lon <= 180):
            raise DataError(path, line_no, "lat" if abs(lat) > 90 else "lon", f"coordinate out of range: {lat}, {lon}")
        ids.append(int(parts[0]))
        coords.append((lat, lon))
    return pd.DataFrame(coords, index=pd.Index(ids, name="BaseID"), columns=["lat", "lon"])


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# The trace
# --------------------------------------------------------------------------------------------

def decode_timestamps(stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``yyyymmddhhmmss`` integers -> (seconds since 1970-01-01, valid mask); calendar-checked."""
    v = np.asarray(stamps, dtype=np.int64)
    year, month, day = v // 10**10, v // 10**8 % 100, v // 10**6 % 100
    hour, minute, second = v // 10**4 % 100, v // 100 % 100, v % 100
    valid = (year >= 1970) & (year < 2200) & (month >= 1) & (month <= 12)
    valid &= (day >= 1) & (hour < 24) & (minute < 60) & (second < 60)
    months = np.where(valid, (year - 1970) * 12 + month - 1, 0)
    first = months.astype("datetime64[M]").astype("datetime64[D]").astype(np.int64)
    after = (months + 1).astype("datetime64[M]").astype("datetime64[D]").astype(np.int64)
    valid &= day <= after - first
    seconds = (first + day - 1) * 86400 + hour * 3600 + minute * 60 + second
    return np.where(valid, seconds, 0), valid


@dataclass
class _Block:
    """Parsed columns of one block, with the file line of each row."""

    line: np.ndarray
    user_id: np.ndarray
    timestamp: np.ndarray
    base_station_id: np.ndarray
    app_id: np.ndarray
    traffic_bytes: np.ndarray

    def take(self, keep: np.ndarray) -> "_Block":
        return _Block(*(getattr(self, f)[keep] for f in self.__dataclass_fields__))


_ARROW_READ = dict(
    parse_options=pa_csv.ParseOptions(delimiter=" ", quote_char=False, ignore_empty_lines=False),
    convert_options=pa_csv.ConvertOptions(
        column_types={**{f: pa.int64() for f in _INT_FIELDS}, "traffic_bytes": pa.float64()},
        null_values=[], strings_can_be_null=False, quoted_strings_can_be_null=False,
    ),
)


class TraceValidator:
    """Parses and validates ``App_usage_trace.txt`` block by block, carrying state across blocks."""

    def __init__(self, path, app_category: pd.Series, base_ids, *, strict: bool = True):
        self.path, self.strict = str(path), strict
        self.report = LoadReport(self.path)
        self.category_of_app = np.full(int(app_category.index.max()) + 1 if len(app_category) else 0, -1, np.int16)
        self.category_of_app[app_category.index.to_numpy()] = app_category.to_numpy()
        base_ids = np.asarray(base_ids, dtype=np.int64)
        self.known_base = np.zeros(int(base_ids.max()) + 1 if len(base_ids) else 0, bool)
        self.known_base[base_ids] = True
        self.needs_sort = False
        self._last_key: tuple[int, int] | None = None
        self._carry = pd.DataFrame(columns=list(TRACE_FIELDS))
        self._seen_users: set[int] = set()
        self._users_with_bad_rows: set[int] = set()
        self._pending: list[RowIssue] = []

    # -- parsing ---------------------------------------------------------------------------
    def parse(self, data: bytes, first_line: int) -> pd.DataFrame:
        """Validate one block of whole lines starting at ``first_line``; return its good events."""
        try:
            table = pa_csv.read_csv(io.BytesIO(data), read_options=pa_csv.ReadOptions(column_names=list(TRACE_FIELDS)), **_ARROW_READ)
            block = _Block(first_line + np.arange(table.num_rows), *(table.column(f).to_numpy() for f in TRACE_FIELDS))
        except pa.ArrowInvalid:
            block = self._parse_lines(data, first_line)
        self.report.rows_read += len(block.line)
        block, seconds = self._check_values(block)
        block, seconds = self._check_duplicates(block, seconds)
        self._check_order(block, seconds)
        if self._pending and self.strict:
            first = min(self._pending, key=lambda issue: issue.line)
            hint = " (pass strict=False / --lenient to skip bad rows and get a report)"
            raise DataError(self.path, first.line, first.field, first.message + hint)
        for issue in self._pending:
            self.report.add(issue)
        self._pending.clear()
        self._seen_users.update(np.unique(block.user_id).tolist())
        self.report.rows_kept += len(block.line)
        return pd.DataFrame({
            "user_id": block.user_id,
            "timestamp": seconds.astype("datetime64[s]"),
            "app_id": block.app_id.astype(np.int32),
            "app_category": self.category_of_app[block.app_id],
            "location_id": block.base_station_id.astype(np.int32),
            "traffic_bytes": block.traffic_bytes,
        })

    def _parse_lines(self, data: bytes, first_line: int) -> _Block:
        """Slow path: one line at a time, so that syntax errors name their line and field."""
        rows, lines = [], []
        for offset, raw in enumerate(data.split(b"\n")):
            line = first_line + offset
            try:
                parts = raw.decode("utf-8").split()
            except UnicodeDecodeError as err:
                self._issue("non_utf8", line, None, f"byte {raw[err.start]:#04x} at column {err.start + 1} is not valid UTF-8")
                continue
            if not parts:
                self._issue("blank_line", line, None, "blank line")
                continue
            if len(parts) != len(TRACE_FIELDS):
                self._issue("wrong_column_count", line, None,
                            f"expected {len(TRACE_FIELDS)} space-separated fields `{TRACE_LINE_FORMAT}`, found {len(parts)}")
                continue
            bad = next((f for f, p in zip(_INT_FIELDS, parts) if not is_ascii_int(p)), None)
            if bad is not None:
                kind = "malformed_timestamp" if bad == "timestamp" else f"malformed_{bad}"
                value = parts[TRACE_FIELDS.index(bad)]
                expected = "a yyyymmddhhmmss time" if bad == "timestamp" else "a non-negative integer of at most 18 digits"
                self._issue(kind, line, bad, f"expected {expected}, found {show(value)}", parts[0])
                continue
            if not _is_float(parts[4]):
                self._issue("non_numeric_traffic", line, "traffic_bytes", f"expected a number of bytes, found {show(parts[4])}",
                            parts[0])
                continue
            rows.append([int(p) for p in parts[:4]] + [float(parts[4])])
            lines.append(line)
        matrix = np.array(rows, dtype=object).reshape(-1, 5)
        return _Block(np.array(lines, np.int64), *(matrix[:, i].astype(np.int64) for i in range(4)),
                      matrix[:, 4].astype(np.float64))

    # -- checks ----------------------------------------------------------------------------
    def _check_values(self, block: _Block) -> tuple[_Block, np.ndarray]:
        seconds, valid_time = decode_timestamps(block.timestamp)
        app, base = block.app_id, block.base_station_id
        app_known = (app >= 0) & (app < len(self.category_of_app))
        app_known[app_known] = self.category_of_app[app[app_known]] >= 0
        base_known = (base >= 0) & (base < len(self.known_base))
        base_known[base_known] = self.known_base[base[base_known]]
        checks = [
            ("malformed_user_id", block.user_id < 0, "user_id", "a non-negative integer", block.user_id),
            ("malformed_timestamp", ~valid_time, "timestamp", "a valid yyyymmddhhmmss time", block.timestamp),
            ("non_numeric_traffic", ~np.isfinite(block.traffic_bytes) | (block.traffic_bytes > _MAX_TRAFFIC),
             "traffic_bytes", f"a finite number of bytes up to {_MAX_TRAFFIC:.3g}", block.traffic_bytes),
            ("negative_traffic", block.traffic_bytes < 0, "traffic_bytes", "a non-negative number of bytes", block.traffic_bytes),
            ("unknown_app", ~app_known, "app_id", f"an app listed in {APP2CATEGORY_FILE}", app),
            ("unknown_base_station", ~base_known, "base_station_id", f"a base station listed in {BASE_POI_FILE}", base),
        ]
        bad = np.zeros(len(block.line), bool)
        for kind, mask, field, expected, values in checks:
            new = np.flatnonzero(mask & ~bad)
            for i in new[: 1 if self.strict else None]:
                self._issue(kind, int(block.line[i]), field, f"expected {expected}, found {show(values[i])}",
                            int(block.user_id[i]))
            bad |= mask
        return block.take(~bad), seconds[~bad]

    def _check_duplicates(self, block: _Block, seconds: np.ndarray) -> tuple[_Block, np.ndarray]:
        """Exact duplicates of an earlier row (the earlier one is kept).

        Duplicates share ``(user_id, timestamp)``, and in a sorted trace such rows are adjacent,
        so only rows with an equal-keyed neighbour (and the previous block's last key group) are
        compared. Non-adjacent duplicates of an unsorted, leniently read trace are caught after
        :func:`read_trace` re-sorts it.
        """
        same = (block.user_id[1:] == block.user_id[:-1]) & (block.timestamp[1:] == block.timestamp[:-1])
        candidate = np.zeros(len(block.line), bool)
        candidate[1:] |= same
        candidate[:-1] |= same
        if len(self._carry) and len(block.line):
            candidate |= (block.user_id == self._carry["user_id"].iat[0]) & (block.timestamp == self._carry["timestamp"].iat[0])
        rows = np.flatnonzero(candidate)
        frame = pd.DataFrame({f: getattr(block, f)[rows] for f in TRACE_FIELDS})
        both = pd.concat([self._carry, frame], ignore_index=True) if len(self._carry) else frame
        dup = np.zeros(len(block.line), bool)
        dup[rows] = both.duplicated(keep="first").to_numpy()[len(both) - len(frame):]
        for i in np.flatnonzero(dup)[: 1 if self.strict else None]:
            self._issue("duplicate_row", int(block.line[i]), None, "identical to an earlier row", int(block.user_id[i]))
        block, seconds = block.take(~dup), seconds[~dup]
        if len(block.line):
            last = (block.user_id == block.user_id[-1]) & (block.timestamp == block.timestamp[-1])
            self._carry = pd.DataFrame({f: getattr(block, f)[last] for f in TRACE_FIELDS})
        return block, seconds

    def _check_order(self, block: _Block, seconds: np.ndarray) -> None:
        """Rows must be grouped by user and non-decreasing in time within a user."""
        if not len(block.line):
            return
        user = block.user_id
        prev_user = np.concatenate([[self._last_key[0] if self._last_key else -1], user[:-1]])
        prev_time = np.concatenate([[self._last_key[1] if self._last_key else 0], seconds[:-1]])
        same = user == prev_user
        backwards = same & (seconds < prev_time)
        starts = np.flatnonzero(~same)
        start_users = user[starts]
        reappears = pd.Series(start_users).duplicated().to_numpy() | np.fromiter(
            (u in self._seen_users for u in start_users.tolist()), bool, len(starts))
        for i in np.flatnonzero(backwards)[: 1 if self.strict else None]:
            self._issue("out_of_order", int(block.line[i]), "timestamp",
                        f"time {block.timestamp[i]} is earlier than the previous row's {block.timestamp[i - 1] if i else '(previous block)'}"
                        " (rows must be sorted by user_id, then timestamp)")
        for i in starts[reappears][: 1 if self.strict else None]:
            self._issue("out_of_order", int(block.line[i]), "user_id",
                        f"user {user[i]} reappears after other users (rows must be grouped by user_id)")
        self.needs_sort |= bool(backwards.any() or reappears.any())
        self._last_key = (int(user[-1]), int(seconds[-1]))

    def _issue(self, kind: str, line: int, field: str | None, message: str, user: int | str | None = None) -> None:
        self._pending.append(RowIssue(kind, line, field, message))
        if user is not None and is_ascii_int(str(user)):
            self._users_with_bad_rows.add(int(user))

    def finish(self) -> LoadReport:
        self.report.users_without_valid_rows = sorted(self._users_with_bad_rows - self._seen_users)
        return self.report


def _byte_blocks(path: Path, block_bytes: int, progress: tqdm | None) -> Iterator[tuple[int, bytes]]:
    """Whole-line byte blocks with the file line number of each block's first line."""
    line, rest = 1, b""
    with open(path, "rb") as handle:
        first = handle.read(len(_BOM))
        if progress is not None:
            progress.update(len(first))
        if first != _BOM:  # a byte-order mark is not part of the first line
            rest = first
        while chunk := handle.read(block_bytes):
            if progress is not None:
                progress.update(len(chunk))
            data = rest + chunk
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            block, rest = data[:cut], data[cut + 1:]
            yield line, block
            line += block.count(b"\n") + 1
    if rest.strip():
        yield line, rest


def stream_trace(validator: TraceValidator, path: str | Path, *, block_bytes: int = _BLOCK_BYTES,
                 progress: bool = False) -> Iterator[pd.DataFrame]:
    """Validated event blocks of ``App_usage_trace.txt`` in file order, in bounded memory.

    With a lenient validator, check ``validator.needs_sort`` at the end: :func:`read_trace` does.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    if os.path.getsize(path) == 0:
        raise DataError(path, None, None, f"file is empty; expected lines `{TRACE_LINE_FORMAT}`")
    bar = tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc=f"reading {path.name}",
               disable=not progress)
    with bar:
        for first_line, data in _byte_blocks(path, block_bytes, bar):
            events = validator.parse(data, first_line)
            if len(events):
                yield events
    validator.finish()


def read_trace(path: str | Path, app_category: pd.Series, base_ids, *, strict: bool = True,
               progress: bool = False, block_bytes: int = _BLOCK_BYTES) -> tuple[pd.DataFrame, LoadReport]:
    """The whole validated trace as one events frame sorted by (user_id, timestamp), plus its report."""
    validator = TraceValidator(path, app_category, base_ids, strict=strict)
    blocks = list(stream_trace(validator, path, block_bytes=block_bytes, progress=progress))
    events = pd.concat(blocks, ignore_index=True) if blocks else empty_events()
    if validator.needs_sort:
        events = events.sort_values(["user_id", "timestamp"], kind="stable", ignore_index=True)
        dup = events.duplicated(subset=[c for c in EVENT_COLUMNS if c != "app_category"], keep="first")
        for _ in range(int(dup.sum())):
            validator.report.add(RowIssue("duplicate_row", -1, None, "identical to an earlier row (found after re-sorting)"))
        events = events[~dup.to_numpy()].reset_index(drop=True)
        validator.report.rows_kept = len(events)
    if not len(events):
        raise DataError(path, None, None, "no valid rows" + ("" if strict else ":\n" + validator.report.summary()))
    return events, validator.report


# --------------------------------------------------------------------------------------------
# A whole cohort directory
# --------------------------------------------------------------------------------------------

@dataclass
class Cohort:
    """Everything read from one Tsinghua-format directory."""

    directory: Path
    categories: list[str]
    app_category: pd.Series
    base_poi: pd.DataFrame
    base_coords: pd.DataFrame | None
    events: pd.DataFrame
    report: LoadReport

    @property
    def user_ids(self) -> np.ndarray:
        return self.events["user_id"].unique()


def read_metadata(directory: str | Path) -> tuple[list[str], pd.Series, pd.DataFrame, pd.DataFrame | None]:
    """The three metadata files (and optional coordinates) of a cohort directory."""
    directory = Path(directory)
    for name in (CATEGORIES_FILE, APP2CATEGORY_FILE, BASE_POI_FILE):
        if not (directory / name).exists():
            raise DataError(directory / name, None, None, "file not found (a cohort directory holds "
                            f"{TRACE_FILE}, {APP2CATEGORY_FILE}, {CATEGORIES_FILE} and {BASE_POI_FILE})")
    categories = read_categories(directory / CATEGORIES_FILE)
    app_category = read_app_categories(directory / APP2CATEGORY_FILE, len(categories))
    base_poi = read_base_poi(directory / BASE_POI_FILE)
    coords_path = directory / BASE_COORDS_FILE
    base_coords = read_base_coords(coords_path) if coords_path.exists() else None
    return categories, app_category, base_poi, base_coords


def load_cohort(directory: str | Path, *, strict: bool = True, progress: bool = False) -> Cohort:
    """Read and validate a whole cohort directory; events gain ``lat, lon`` when coordinates exist."""
    directory = Path(directory)
    categories, app_category, base_poi, base_coords = read_metadata(directory)
    events, report = read_trace(directory / TRACE_FILE, app_category, base_poi.index.to_numpy(),
                                strict=strict, progress=progress)
    if base_coords is not None:
        located = base_coords.reindex(events["location_id"].to_numpy())
        if located["lat"].isna().any():
            station = events["location_id"].to_numpy()[located["lat"].isna().to_numpy()][0]
            raise DataError(directory / BASE_COORDS_FILE, None, "BaseID",
                            f"base station {station} is used in the trace but has no coordinates")
        events["lat"], events["lon"] = located["lat"].to_numpy(), located["lon"].to_numpy()
    if not report.clean:
        log.warning("%s", report.summary())
    return Cohort(directory, categories, app_category, base_poi, base_coords, events, report)
