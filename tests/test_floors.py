"""Floors of the main job's results (scope/run/floors.py): values at or beyond a floor are flagged,
values above it are not, and a missing or partial file is never an error."""

import json

import pytest

from scope.run.floors import FLOORS, all_violations, floor_violations
from scope.run.stages import STAGES, stage_folder, stage_output


def write(run_dir, stage, obj, name=None):
    path = stage_folder(run_dir, stage) / name if name else stage_output(run_dir, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def evaluation(schema_valid, grounding):
    ci = lambda m: {"mean": m, "ci95": [m, m]}  # noqa: E731
    row = {"unconstrained": {"schema_valid": ci(schema_valid), "grounding@3": ci(grounding)}}
    return {"decodings": ["unconstrained", "constrained"],
            "stages": {"before SFT": {"unconstrained": {"schema_valid": ci(0.0), "grounding@3": ci(0.0)}},
                       "after DPO": row}}


def test_every_stage_of_the_table_is_a_stage_of_the_main_job():
    assert set(FLOORS) <= set(STAGES)


def test_a_run_without_results_has_no_violations(tmp_path):
    assert all_violations(tmp_path / "nothing") == {}
    assert all(floor_violations(tmp_path / "nothing", stage) == [] for stage in STAGES)
    assert floor_violations(tmp_path, "no such stage") == []


@pytest.mark.parametrize("text", ["", "{", '{"stages": {"after DPO": {}}}', '{"stages": [1, 2]}', "[]",
                                  '{"decodings": ["unconstrained"], "stages": {"after DPO": {"unconstrained": 0.3}}}'])
def test_a_partial_or_foreign_file_is_silent(tmp_path, text):
    stage_output(tmp_path, "evaluate").parent.mkdir(parents=True)
    stage_output(tmp_path, "evaluate").write_text(text)
    assert floor_violations(tmp_path, "evaluate") == []


def test_a_student_at_or_below_its_floor_is_flagged(tmp_path):
    write(tmp_path, "evaluate", evaluation(0.5, 0.8))   # at the floor: flagged
    messages = floor_violations(tmp_path, "evaluate")
    assert messages == ["evaluate: schema_valid (after DPO, unconstrained) = 0.5, at or below its floor 0.5: half or "
                        "more of the student's answers are not a valid profile"]
    write(tmp_path, "evaluate", evaluation(0.0, 0.2))
    assert len(floor_violations(tmp_path, "evaluate")) == 2   # both metrics; the base model before SFT is not judged
    write(tmp_path, "evaluate", evaluation(0.95, 0.9))
    assert floor_violations(tmp_path, "evaluate") == []


def test_an_engine_no_better_than_persistence_is_flagged_on_that_task_only(tmp_path):
    tasks = {task: {"persistence": {"rmse_norm": 1.0}, "engine (U-MASK + DiT over the prior)": {"rmse_norm": value}}
             for task, value in (("short", 0.9), ("long", 1.0), ("cold", 1.7))}
    write(tmp_path, "compare", {"tasks": tasks})
    messages = floor_violations(tmp_path, "compare")
    assert len(messages) == 2 and "(long, vs persistence) = 1, at or above its floor 1" in messages[0]
    assert "(cold, vs persistence) = 1.7" in messages[1]


def test_pituning_below_the_most_frequent_intent_is_flagged_once_both_stages_ran(tmp_path):
    write(tmp_path, "lightgbm", {"metrics": {"most frequent intent per (user, slot)": {"prec_m": 0.5}}})
    assert floor_violations(tmp_path, "lightgbm") == []   # PITuning's report is not there yet
    write(tmp_path, "pituning", {"metrics": {"population model (no individual tuning)": {"prec_m": 0.1},
                                             "PITuning": {"prec_m": 0.45}}})
    assert floor_violations(tmp_path, "lightgbm") == [
        "lightgbm: PITuning's prec_m (PITuning, vs most frequent intent) = 0.45, at or below its floor 0.5: the tuned "
        "on-device model is no better than each user's most frequent intent per time slot"]


def test_the_other_floors(tmp_path):
    write(tmp_path, "sft", {"student_schema_valid": 0.25}, "metrics.json")
    write(tmp_path, "dpo", {"train_reward_accuracy": 0.4, "student_schema_valid": 0.5}, "metrics.json")
    write(tmp_path, "novelty", {"methods": {"popularity": {"mean_hit@3": {"mean": 0.8}},
                                            "student after SFT": {"mean_hit@3": {"mean": 0.85}},
                                            "student after DPO": {"mean_hit@3": {"mean": 0.7}}},
                                "dpo_effect": {"mean_hit@3": {"mean": -0.15}}})
    write(tmp_path, "synthesis", {"well_formed_rate": 0.9, "pearson_r": 0.92, "tstr_accuracy": 0.15,
                                  "majority_accuracy": 0.17})
    write(tmp_path, "completion", {"tasks": {"short": {"coverage90": [0.2, 0.4]}, "long": {"coverage90": [0.9, 0.88]}}})
    found = all_violations(tmp_path)
    assert list(found) == ["sft", "dpo", "novelty", "synthesis", "completion"]   # stage order
    assert [len(m) for m in found.values()] == [1, 1, 2, 2, 1]
    assert "held-out schema-valid" in found["dpo"][0]   # a one-epoch run's reward accuracy has no floor
    assert "student after DPO, vs popularity" in found["novelty"][0] and "DPO effect" in found["novelty"][1]
    assert "well-formed share" in found["synthesis"][0] and "TSTR accuracy (vs the majority class)" in found["synthesis"][1]
    assert "(short) = 0.3" in found["completion"][0]
