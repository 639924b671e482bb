"""Parse + validate + tensorize throughput on a Tsinghua-format trace of ~4,000,000 events.

Simulates ~1,000 users over one week (skipped when the trace is already in --work_dir), then
times, in one fresh process, everything from reading the files to the last shard written:
metadata, POI clustering, the streaming validated trace reader, user splits and tensorization
(safetensors shards + dataset.json). Target on a 2-core machine: >= 500,000 events/s and peak
RSS <= 3 GB.

    python benchmarks/tensorize.py [--users 1000 --work_dir /tmp/uscope-bench]
"""

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import emit, peak_rss_mb


def timed_run(cohort_dir: Path, out_dir: Path) -> dict:
    from completion.tensors import TensorConfig, tensorize_cohort
    from scope.data.locations import cluster_locations
    from scope.data.splits import UserSplitter
    from scope.data.tsinghua import TRACE_FILE, TraceValidator, read_metadata, stream_trace

    start = time.perf_counter()
    categories, app_category, base_poi, _ = read_metadata(cohort_dir)
    clusters = cluster_locations(base_poi)
    validator = TraceValidator(cohort_dir / TRACE_FILE, app_category, base_poi.index)
    dataset = tensorize_cohort(stream_trace(validator, validator.path), out_dir, categories=categories,
                               location_cluster=clusters.labels, assign_split=UserSplitter(), cfg=TensorConfig(),
                               progress=False)
    seconds = time.perf_counter() - start
    events = dataset["totals"]["events"]
    return {"events": events, "users": dataset["totals"]["users"], "windows": dataset["totals"]["items"],
            "seconds": round(seconds, 3), "events_per_s": round(events / seconds),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "tensor_gb": round(sum(f.stat().st_size for f in out_dir.glob("*.safetensors")) / 2**30, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--events_per_day", type=float, default=560.0)
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/uscope-bench-tensorize"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cohort_dir, out_dir = args.work_dir / "cohort", args.work_dir / "tensors"
    if args.child:
        import json
        print(json.dumps(timed_run(cohort_dir, out_dir)))
        return
    from scope.data.simulate import CohortConfig, simulate_cohort
    cfg = CohortConfig(n_users=args.users, days=7, seed=0, events_per_day=args.events_per_day, n_stations=9851,
                       n_apps=1696)
    if not (cohort_dir / "cohort.json").exists():
        simulate_cohort(cfg, cohort_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    # A fresh process, so that peak RSS is the pipeline's own, not the simulator's.
    child = subprocess.run([sys.executable, "-m", "benchmarks.tensorize", "--work_dir", str(args.work_dir), "--child"],
                           check=True, capture_output=True, text=True)
    import json
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    figures.update(target_events_per_s=500_000, target_peak_rss_mb=3072,
                   meets_targets=figures["events_per_s"] >= 500_000 and figures["peak_rss_mb"] <= 3072)
    emit("tensorize", figures)


if __name__ == "__main__":
    main()
