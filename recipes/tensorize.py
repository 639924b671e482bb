"""Read a Tsinghua-format cohort, validate it, cluster its locations, split its users, and write
behaviour tensors (safetensors shards + dataset.json) in bounded memory.

    python recipes/tensorize.py --config recipes/configs/tensorize.yaml [--cohort_dir DIR --lenient true]
"""

from dataclasses import asdict, dataclass

from completion.tensors import TensorConfig, tensorize_cohort
from scope.cli import parse_config
from scope.data.locations import cluster_locations
from scope.data.splits import UserSplitter
from scope.data.tsinghua import TRACE_FILE, TraceValidator, read_metadata, stream_trace
from scope.io import write_json


@dataclass
class TensorizeArguments:
    """The recipe's own settings; the tensor layout and the user split are the library's configs
    (``completion.tensors.TensorConfig``, ``scope.data.splits.UserSplitter``), parsed beside it."""

    cohort_dir: str = "runs/default/cohort"
    output_dir: str = "runs/default/tensors"
    lenient: bool = False              # skip bad rows (counted and reported) instead of stopping
    location_clusters: int = 6         # k-means clusters of the stations' POI profiles (seeded by the split seed)


def main(args: TensorizeArguments, cfg: TensorConfig | None = None, splitter: UserSplitter = UserSplitter()) -> dict:
    cfg = cfg or TensorConfig()
    categories, app_category, base_poi, base_coords = read_metadata(args.cohort_dir)
    clusters = cluster_locations(base_poi, k=args.location_clusters, seed=splitter.seed)
    validator = TraceValidator(f"{args.cohort_dir}/{TRACE_FILE}", app_category, base_poi.index, strict=not args.lenient)
    dataset = tensorize_cohort(
        stream_trace(validator, validator.path, progress=True), args.output_dir, categories=categories,
        location_cluster=clusters.labels, assign_split=splitter, cfg=cfg, stations=base_coords,
        meta={"cohort_dir": args.cohort_dir, "location_clusters": clusters.to_dict(),
              "splitter": asdict(splitter), "load_report": validator.report.to_dict()})
    write_json(f"{args.output_dir}/load_report.json", validator.report.to_dict())
    if not validator.report.clean:
        print(validator.report.summary())
    totals = dataset["totals"]
    print(f"tensorized {totals['events']:,} events of {totals['users']:,} users into {totals['items']:,} windows "
          f"[C={dataset['shape']['C']}, T={cfg.window_slots}, H={cfg.height}, W={cfg.width}] at {args.output_dir}; "
          f"{totals['dropped_events'] / max(totals['events'], 1):.1%} of events fall outside the {dataset['layout']} layout")
    return dataset


if __name__ == "__main__":
    main(*parse_config((TensorizeArguments, TensorConfig, UserSplitter)))
