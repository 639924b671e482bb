"""Intent-prediction baselines on the same data and split as a PITuning run (paper Table 2, appendix E).

    python recipes/intent_baselines.py --config recipes/configs/pituning_cpu.yaml \
        --cohort_dir runs/demo/cohort --output_dir runs/pituning/lightgbm

Reads the PITuning recipe's own config (same data source, samples, individual users and time-based
split) and scores, on the pooled test points of the individual users with the recipe's metrics:
one LightGBM per individual user and one pooled LightGBM (population + individual training data),
both with Table 5's settings (:mod:`scope.pituning.baselines`), and each user's most frequent
intent per time slot. Also the population LightGBM on the held-out population validation users,
the yardstick of the population model in the PITuning report. Writes ``lightgbm.json`` (with each
baseline's per-user intent counts ``class_counts``, paired with PITuning's in the run report) and
``results.md``.
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from recipes.pituning import DEFAULT_CONFIG, SECTIONS, SHARED, PITuningRun, load_data
from scope.cli import parse_sections, run_recipe
from scope.io import write_json, write_text
from scope.pituning.baselines import lightgbm_individual, lightgbm_pooled, lightgbm_population, most_frequent_per_slot
from scope.pituning.evaluate import individual_test, intent_metrics, results_table, score, user_class_counts


@dataclass
class IntentBaselineRun(PITuningRun):
    output_dir: str = "runs/pituning/lightgbm"


def main(run: IntentBaselineRun, sections: dict) -> dict:
    start = time.perf_counter()
    data = load_data(run, sections["cohort"], sections["intent_cohort"], sections["derive"], sections["samples"])
    test = individual_test(data)
    scores, labels, modes = lightgbm_individual(data)
    per_user = torch.cat([torch.full((len(data.individual["test"].of_user(u)),), u) for u in data.individual_users])
    predictions = {"LightGBM per user": (scores, labels, per_user),
                   "LightGBM pooled (population + individual)": (lightgbm_pooled(data, test)[0], test.intent, test.user),
                   "most frequent intent per (user, slot)": (most_frequent_per_slot(data, test), test.intent, test.user)}
    rows = {name: score(s, y, data) for name, (s, y, _) in predictions.items()}
    _, held_out = data.population_val_halves()
    population = intent_metrics(lightgbm_population(data), held_out.intent)
    report = {"metrics": rows, "settings": modes, "test_points": len(test),
              "class_counts": {name: user_class_counts(s, y, u, data.n_intents) for name, (s, y, u) in predictions.items()},
              "individual_users": list(data.individual_users),
              "lightgbm_population_val": {k: round(v, 4) for k, v in population.items()},
              "wall_s": round(time.perf_counter() - start, 1)}
    out = Path(run.output_dir)
    write_json(out / "lightgbm.json", report)
    write_text(out / "results.md", "# Intent baselines\n\n" + results_table(rows) + "\n")
    print(results_table(rows))
    return report


if __name__ == "__main__":
    sys.exit(run_recipe(main, *parse_sections(SECTIONS, sys.argv[1:], DEFAULT_CONFIG, top=IntentBaselineRun,
                                              shared=SHARED)))
