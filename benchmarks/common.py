"""The benchmark contract: figures as one JSON object on the last line of output, and the same
object in ``benchmarks/results/<name>.json``."""

import json
import platform
import resource
from pathlib import Path

from scope.io import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(name: str, figures: dict) -> dict:
    figures = {**figures, "machine": f"{platform.machine()}, {platform.python_version()}"}
    write_json(RESULTS / f"{name}.json", figures)
    print(json.dumps(figures))
    return figures
