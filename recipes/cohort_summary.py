"""Summary of a cohort and its behaviour tensors: users per persona and split, figures (scope/run/cohort_report.py).

    python recipes/cohort_summary.py --cohort_dir runs/demo/cohort --tensors_dir runs/demo/tensors \
        --output_dir runs/demo/summary
"""

import sys
from dataclasses import dataclass

import pandas as pd

from completion.tensors import BehaviourTensors
from scope.cli import parse_config, run_recipe
from scope.data.simulate import read_ground_truth
from scope.data.tsinghua import load_cohort
from scope.run.cohort_report import summarize


@dataclass
class SummaryArguments:
    cohort_dir: str = "runs/default/cohort"
    tensors_dir: str = "runs/default/tensors"
    output_dir: str = "runs/default/summary"
    lenient: bool = False              # skip bad trace rows (counted) instead of stopping


def main(args: SummaryArguments) -> dict:
    loaded = load_cohort(args.cohort_dir, strict=not args.lenient)
    try:
        personas = read_ground_truth(args.cohort_dir)["persona"]
    except FileNotFoundError:  # a real cohort has no simulator ground truth
        personas = None
    dataset = BehaviourTensors(args.tensors_dir, "train")
    busiest = max(range(len(dataset)), key=lambda i: int(dataset[i]["x"][:-2].sum()))
    example = {k: v.numpy() for k, v in dataset[busiest].items()}
    summary = summarize(loaded.events, loaded.categories, dataset.meta, example, args.output_dir,
                        personas=personas, load_report=loaded.report.to_dict())
    print(pd.Series(summary["split_users"]).to_string())
    print(f"summary: {args.output_dir}/summary.md")
    return summary


if __name__ == "__main__":
    sys.exit(run_recipe(main, *parse_config((SummaryArguments,))))
