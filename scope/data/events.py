"""The behaviour event schema and the errors raised for bad input.

One row per app-usage record:
``user_id, timestamp, app_id, app_category, location_id, traffic_bytes`` (+ optional ``lat, lon``).
Every reader in the project returns events as a :class:`pandas.DataFrame` with exactly these
columns and dtypes, sorted by ``(user_id, timestamp)``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

EVENT_DTYPES: dict[str, str] = {
    "user_id": "int64",
    "timestamp": "datetime64[s]",
    "app_id": "int32",
    "app_category": "int16",
    "location_id": "int32",
    "traffic_bytes": "float64",
}
OPTIONAL_DTYPES: dict[str, str] = {"lat": "float64", "lon": "float64"}
EVENT_COLUMNS: tuple[str, ...] = tuple(EVENT_DTYPES)


MAX_SHOWN_CHARS = 60


def show(value) -> str:
    """A value for an error message: numpy scalars as plain numbers, long values cut short."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else f"{text[:MAX_SHOWN_CHARS]}... ({len(text):,} characters)"


def is_ascii_int(text: str, max_digits: int = 18) -> bool:
    """``text`` is a non-negative integer of at most ``max_digits`` ASCII digits (fits int64; ``str.isdigit``
    also accepts ``²`` and other Unicode digits that ``int`` rejects)."""
    return 0 < len(text) <= max_digits and text.isascii() and text.isdigit()


class DataError(ValueError):
    """Bad input, located: which file, which line, which field, and what was expected."""

    def __init__(self, path, line: int | None, field: str | None, message: str):
        self.path, self.line, self.field = str(path), line, field
        where = self.path if line is None else f"{self.path}:{line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")


@dataclass(frozen=True)
class RowIssue:
    """One rejected (or, for ``out_of_order``, re-sorted) row of an input file."""

    kind: str
    line: int
    field: str | None
    message: str


@dataclass
class LoadReport:
    """What a lenient read skipped or repaired, by kind, with the first examples of each."""

    path: str
    rows_read: int = 0
    rows_kept: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[RowIssue]] = field(default_factory=dict)
    users_without_valid_rows: list[int] = field(default_factory=list)
    max_examples: int = 5

    def add(self, issue: RowIssue) -> None:
        self.counts[issue.kind] += 1
        kept = self.examples.setdefault(issue.kind, [])
        if len(kept) < self.max_examples:
            kept.append(issue)

    @property
    def clean(self) -> bool:
        return not self.counts and not self.users_without_valid_rows

    def summary(self) -> str:
        lines = [f"{self.path}: read {self.rows_read:,} rows, kept {self.rows_kept:,}"]
        for kind, n in sorted(self.counts.items()):
            first = self.examples[kind][0]
            lines.append(f"  {kind}: {n:,} (first at line {first.line}: {first.message})")
        if self.users_without_valid_rows:
            shown = ", ".join(map(str, self.users_without_valid_rows[:10]))
            lines.append(f"  users with zero valid rows: {len(self.users_without_valid_rows)} ({shown})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "skipped_or_repaired": dict(self.counts),
            "users_without_valid_rows": self.users_without_valid_rows,
        }


def empty_events() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in EVENT_DTYPES.items()})


def validate_events(events: pd.DataFrame) -> pd.DataFrame:
    """Check a frame against the schema (columns, dtypes, no nulls); return it in canonical order."""
    missing = [c for c in EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(f"events frame lacks columns {missing}; expected {list(EVENT_COLUMNS)}")
    for column, dtype in {**EVENT_DTYPES, **OPTIONAL_DTYPES}.items():
        if column in events.columns and events[column].dtype != np.dtype(dtype):
            raise ValueError(f"events column '{column}' has dtype {events[column].dtype}, expected {dtype}")
    if events[list(EVENT_COLUMNS)].isna().any().any():
        raise ValueError("events frame contains nulls")
    if (events["traffic_bytes"] < 0).any():
        raise ValueError("events frame has negative traffic_bytes")
    extra = [c for c in OPTIONAL_DTYPES if c in events.columns]
    return events[list(EVENT_COLUMNS) + extra]
