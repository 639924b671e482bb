"""LightGBM intent-prediction baselines on the same data and split as a PITuning run (paper Table 2).

    python recipes/intent_baselines.py --config recipes/configs/pituning_cpu.yaml \
        --cohort_dir runs/pituning/cohort --output_dir runs/pituning/lightgbm

Reads the PITuning recipe's own config (same samples, same individual users, same time-based
split), fits one LightGBM per individual user (appendix E features) and one pooled LightGBM
(population + individual training data), and scores both on the pooled test points of the
individual users with the recipe's metrics. Writes ``lightgbm.json`` and ``results.md``.
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from recipes.pituning import DEFAULT_CONFIG, SECTIONS, PITuningRun
from scope.cli import parse_sections, run_recipe
from scope.io import write_json, write_text
from scope.pituning.baselines import lightgbm_individual, lightgbm_pooled
from scope.pituning.evaluate import individual_test, results_table, score
from scope.pituning.stages import prepare_data


@dataclass
class IntentBaselineRun(PITuningRun):
    output_dir: str = "runs/pituning/lightgbm"
    max_population_rows: int = 20000


def main(run: IntentBaselineRun, sections: dict) -> dict:
    start = time.perf_counter()
    seed = sections["samples"].seed
    data = prepare_data(run.cohort_dir, run.output_dir, sections["cohort"], sections["samples"],
                        run.max_individual_users, run.progress)
    test = individual_test(data)
    scores, labels, modes = lightgbm_individual(data, seed=seed)
    rows = {"LightGBM per user": score(scores, labels, data)}
    pooled_scores, pooled_labels = lightgbm_pooled(data, max_population_rows=run.max_population_rows, seed=seed)
    rows["LightGBM pooled (population + individual)"] = score(pooled_scores, pooled_labels, data)
    report = {"metrics": rows, "settings": modes, "test_points": len(test), "individual_users": list(data.individual_users),
              "wall_s": round(time.perf_counter() - start, 1)}
    out = Path(run.output_dir)
    write_json(out / "lightgbm.json", report)
    write_text(out / "results.md", "# LightGBM intent baselines\n\n" + results_table(rows) + "\n")
    print(results_table(rows))
    return report


if __name__ == "__main__":
    sys.exit(run_recipe(main, *parse_sections(SECTIONS, sys.argv[1:], DEFAULT_CONFIG, top=IntentBaselineRun,
                                              shared=("seed", "individual_fraction"))))
