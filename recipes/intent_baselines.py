"""LightGBM intent-prediction baselines on the same data and split as a PITuning run (paper Table 2).

    python recipes/intent_baselines.py --config recipes/configs/pituning_cpu.yaml \
        --cohort_dir runs/pituning/cohort --out_dir runs/pituning/lightgbm

Reads the PITuning recipe's own config (same samples, same individual users, same time-based
split), fits one LightGBM per individual user (appendix E features) and one pooled LightGBM
(population + individual training data), and scores both on the pooled test points of the
individual users with the recipe's metrics. Writes ``lightgbm.json`` and ``results.md``.
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from trl import TrlParser

from recipes.pituning import PITuningArguments, individual_test, prepare_data, results_table, score
from scope.pituning.baselines import lightgbm_individual, lightgbm_pooled
from scope.io import write_json, write_text


@dataclass
class IntentBaselineArguments(PITuningArguments):
    out_dir: str = "runs/pituning/lightgbm"
    max_population_rows: int = 20000


def main(args: IntentBaselineArguments) -> dict:
    start = time.perf_counter()
    data = prepare_data(args)
    test = individual_test(data)
    scores, labels, modes = lightgbm_individual(data, seed=args.seed)
    rows = {"LightGBM per user": score(scores, labels, data)}
    pooled_scores, pooled_labels = lightgbm_pooled(data, max_population_rows=args.max_population_rows, seed=args.seed)
    rows["LightGBM pooled (population + individual)"] = score(pooled_scores, pooled_labels, data)
    report = {"metrics": rows, "settings": modes, "test_points": len(test), "individual_users": list(data.individual_users),
              "wall_s": round(time.perf_counter() - start, 1)}
    out = Path(args.out_dir)
    write_json(out / "lightgbm.json", report)
    write_text(out / "results.md", "# LightGBM intent baselines\n\n" + results_table(rows) + "\n")
    print(results_table(rows))
    return report


if __name__ == "__main__":
    (arguments,) = TrlParser((IntentBaselineArguments,)).parse_args_and_config(sys.argv[1:])
    main(arguments)
