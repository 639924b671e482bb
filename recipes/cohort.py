"""Simulate a cohort in Tsinghua App Usage format (the embedded default data).

    python recipes/cohort.py --config recipes/configs/cohort.yaml [--n_users 1000 --seed 3 ...]
"""

import sys
from dataclasses import dataclass

from scope.cli import parse_config, run_recipe
from scope.data.simulate import CohortConfig, simulate_cohort


@dataclass
class CohortArguments(CohortConfig):
    output_dir: str = "runs/default/cohort"


def main(args: CohortArguments) -> dict:
    summary = simulate_cohort(args, args.output_dir)
    print(f"wrote {summary['events']:,} events of {summary['users']:,} users to {args.output_dir}")
    return summary


if __name__ == "__main__":
    sys.exit(run_recipe(main, *parse_config((CohortArguments,))))
