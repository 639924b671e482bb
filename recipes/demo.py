"""The main job on the embedded default: simulate a cohort, load it through the real Tsinghua
loader, tensorize it, and write a summary with figures under one run folder.

    python recipes/demo.py --config recipes/configs/demo.yaml [--run_dir runs/demo --n_users 500]
"""

from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
from transformers import HfArgumentParser
from trl import TrlParser

from completion.tensors import BehaviourTensors
from recipes import cohort, tensorize
from scope.cohort_report import summarize
from scope.simulate import read_ground_truth
from scope.tsinghua import load_cohort


@dataclass
class DemoArguments:
    run_dir: str = "runs/demo"
    cohort_config: str = "recipes/configs/cohort.yaml"
    tensorize_config: str = "recipes/configs/tensorize.yaml"
    n_users: int = 200
    days: int = 7
    seed: int = 0


def _stage_args(kind, path: str, **overrides):
    (args,) = HfArgumentParser((kind,)).parse_yaml_file(path, allow_extra_keys=False)
    return replace(args, **overrides)


def main(args: DemoArguments) -> dict:
    run = Path(args.run_dir)
    cohort_args = _stage_args(cohort.CohortArguments, args.cohort_config, out_dir=str(run / "cohort"),
                              n_users=args.n_users, days=args.days, seed=args.seed)
    cohort.main(cohort_args)
    tensor_args = _stage_args(tensorize.TensorizeArguments, args.tensorize_config, cohort_dir=cohort_args.out_dir,
                              out_dir=str(run / "tensors"), seed=args.seed)
    dataset = tensorize.main(tensor_args)

    loaded = load_cohort(cohort_args.out_dir)
    personas = read_ground_truth(cohort_args.out_dir)["persona"]
    train = BehaviourTensors(tensor_args.out_dir, "train")
    busiest = max(range(len(train)), key=lambda i: int(train[i]["x"][:-2].sum()))
    example = {k: v.numpy() for k, v in train[busiest].items()}
    summary = summarize(loaded.events, loaded.categories, dataset, example, run / "summary",
                        personas=personas, load_report=loaded.report.to_dict())
    print(pd.Series(summary["split_users"]).to_string())
    print(f"summary: {run / 'summary' / 'summary.md'}")
    return summary


if __name__ == "__main__":
    (arguments,) = TrlParser((DemoArguments,)).parse_args_and_config()
    main(arguments)
