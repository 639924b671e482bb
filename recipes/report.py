"""The run report: one self-contained HTML page with the configuration, every results table and figure.

    python recipes/report.py --run_dir runs/demo [--output_dir runs/demo/report --demo_config recipes/configs/demo.yaml]

Reads what the stages of recipes/demo.py wrote under ``run_dir`` (see scope/run/report.py); a stage
that failed or did not run shows as a labelled "not available" box. Open ``<output_dir>/index.html``
in any browser; figures are embedded, so the single file can be mailed.
"""

import sys
from dataclasses import dataclass

from scope.cli import parse_config, run_recipe
from scope.run.report import build_report


@dataclass
class ReportArguments:
    run_dir: str = "runs/demo"
    output_dir: str = ""                 # default: <run_dir>/report
    demo_config: str = ""             # the main job's YAML, shown in the report
    title: str = "U-SCOPE / U-MASK toolchain: run report"


def main(args: ReportArguments):
    path = build_report(args.run_dir, args.output_dir or f"{args.run_dir}/report", args.demo_config or None, args.title)
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    sys.exit(run_recipe(main, *parse_config((ReportArguments,))))
