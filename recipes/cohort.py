"""The cohort stage: simulate one in the Tsinghua App Usage format (the embedded default), or check
yours in place.

    python recipes/cohort.py --config recipes/configs/cohort.yaml [--n_users 1000 --seed 3 ...]
    python recipes/cohort.py --source_dir /path/to/tsinghua --output_dir runs/mine/cohort

With ``source_dir`` nothing is simulated and nothing is written there: the metadata files are read
through the validating readers and ``output_dir/cohort.json`` records where the cohort is and its
size (the trace itself is validated by the stages that read it, with ``--lenient`` if asked).
"""

import sys
from dataclasses import dataclass
from pathlib import Path

from scope.cli import parse_config, run_recipe
from scope.data.simulate import CohortConfig, simulate_cohort
from scope.data.tsinghua import TRACE_FILE, read_metadata
from scope.io import write_json


@dataclass
class CohortArguments(CohortConfig):
    output_dir: str = "runs/default/cohort"
    source_dir: str | None = None      # your Tsinghua-format folder: checked, not simulated


def check_source(source_dir: str | Path, output_dir: str | Path) -> dict:
    """Validate a user-supplied cohort's metadata and record it in ``output_dir/cohort.json``."""
    source = Path(source_dir).resolve()
    if not (source / TRACE_FILE).exists():
        raise FileNotFoundError(f"{source / TRACE_FILE} not found: --source_dir / --cohort_dir must hold a "
                                "Tsinghua-format cohort")
    if Path(output_dir).resolve() == source:
        raise ValueError(f"{source}: the output folder must not be the source folder (nothing is written there)")
    categories, app_category, base_poi, base_coords = read_metadata(source)
    summary = {"source": str(source), "simulated": False, "categories": len(categories), "apps": len(app_category),
               "stations": len(base_poi), "station_coordinates": base_coords is not None,
               "trace_bytes": (source / TRACE_FILE).stat().st_size}
    write_json(Path(output_dir) / "cohort.json", summary)
    return summary


def main(args: CohortArguments) -> dict:
    if args.source_dir is not None:
        summary = check_source(args.source_dir, args.output_dir)
        print(f"cohort {summary['source']}: {summary['categories']} categories, {summary['apps']:,} apps, "
              f"{summary['stations']:,} stations, a {summary['trace_bytes']:,}-byte trace (read in place)")
        return summary
    summary = simulate_cohort(args, args.output_dir)
    print(f"wrote {summary['events']:,} events of {summary['users']:,} users to {args.output_dir}")
    return summary


if __name__ == "__main__":
    sys.exit(run_recipe(main, *parse_config((CohortArguments,))))
