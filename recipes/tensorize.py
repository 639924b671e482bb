"""Read a Tsinghua-format cohort, validate it, cluster its locations, split its users, and write
behaviour tensors (safetensors shards + dataset.json) in bounded memory.

    python recipes/tensorize.py --config recipes/configs/tensorize.yaml [--cohort_dir DIR --lenient true]
"""

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from completion.tensors import TensorConfig, tensorize_cohort
from scope.cli import parse_config, run_recipe
from scope.data.locations import cluster_locations
from scope.data.splits import UserSplitter
from scope.data.tsinghua import TRACE_FILE, TraceValidator, read_metadata, read_trace, stream_trace
from scope.io import atomic_dir, write_json


@dataclass
class TensorizeArguments:
    """The recipe's own settings; the tensor layout and the user split are the library's configs
    (``completion.tensors.TensorConfig``, ``scope.data.splits.UserSplitter``), parsed beside it."""

    cohort_dir: str = "runs/default/cohort"
    output_dir: str = "runs/default/tensors"
    lenient: bool = False              # skip bad rows (counted and reported) instead of stopping
    location_clusters: int = 6         # k-means clusters of the stations' POI profiles (seeded by the split seed)


def main(args: TensorizeArguments, cfg: TensorConfig | None = None, splitter: UserSplitter = UserSplitter()) -> dict:
    """Tensorize into a staging folder that replaces ``output_dir`` only when everything succeeded:
    a failed run leaves the previous dataset and its ``load_report.json`` as they were.

    The trace is streamed in bounded memory. A lenient read of a trace that turns out unsorted (a
    user's rows apart, or out of time order, duplicates among them) is redone from the whole trace
    sorted in memory, so its rows are regrouped and its duplicates counted, as the reader promises.
    """
    cfg = cfg or TensorConfig()
    categories, app_category, base_poi, base_coords = read_metadata(args.cohort_dir)
    clusters = cluster_locations(base_poi, k=args.location_clusters, seed=splitter.seed)
    trace = Path(args.cohort_dir) / TRACE_FILE
    validator = TraceValidator(trace, app_category, base_poi.index, strict=not args.lenient)

    def tensorize(blocks, staging: Path) -> dict:
        return tensorize_cohort(blocks, staging, categories=categories, location_cluster=clusters.labels,
                                assign_split=splitter, cfg=cfg, stations=base_coords,
                                meta=lambda: {"cohort_dir": args.cohort_dir, "location_clusters": clusters.to_dict(),
                                              "splitter": asdict(splitter), "load_report": validator.report.to_dict()})

    with atomic_dir(args.output_dir) as staging:
        try:
            dataset = tensorize(stream_trace(validator, trace, progress=True), staging)
        except ValueError:
            if not (args.lenient and validator.needs_sort):
                raise
        if args.lenient and validator.needs_sort:
            events, report = read_trace(trace, app_category, base_poi.index, strict=False)
            validator.report = report
            dataset = tensorize(_user_blocks(events), staging)
        write_json(staging / "load_report.json", validator.report.to_dict())
    if not validator.report.clean:
        print(validator.report.summary())
    totals = dataset["totals"]
    print(f"tensorized {totals['events']:,} events of {totals['users']:,} users into {totals['items']:,} windows "
          f"[C={dataset['shape']['C']}, T={cfg.window_slots}, H={cfg.height}, W={cfg.width}] at {args.output_dir}; "
          f"{totals['dropped_events'] / max(totals['events'], 1):.1%} of events fall outside the {dataset['layout']} layout")
    return dataset


def _user_blocks(events, rows: int = 1 << 20):
    """An in-memory, user-sorted events frame as blocks of about ``rows`` rows."""
    for start in range(0, len(events), rows):
        yield events.iloc[start:start + rows]


if __name__ == "__main__":
    sys.exit(run_recipe(main, *parse_config((TensorizeArguments, TensorConfig, UserSplitter))))
