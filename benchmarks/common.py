"""The benchmark contract: figures as one JSON object on the last line of output, and the same
object in ``benchmarks/results/<name>.json``."""

import json
import platform
import resource
import shutil
from pathlib import Path

import pandas as pd

from scope.io import write_json, write_text

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(name: str, figures: dict) -> dict:
    figures = {**figures, "machine": f"{platform.machine()}, {platform.python_version()}"}
    write_json(RESULTS / f"{name}.json", figures)
    print(json.dumps(figures))
    return figures


def filtered_cohort(src: Path, dst: Path, keep) -> Path:
    """A copy of the Tsinghua cohort ``src`` in ``dst`` whose trace keeps the rows where
    ``keep(trace)`` is true (``trace``: the raw rows as strings, columns 0..4)."""
    from scope.data.tsinghua import TRACE_FILE

    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and path.name != TRACE_FILE:
            shutil.copyfile(path, dst / path.name)
    trace = pd.read_csv(src / TRACE_FILE, sep=" ", header=None, dtype=str)
    write_text(dst / TRACE_FILE, trace[keep(trace)].to_csv(sep=" ", header=False, index=False))
    return dst
