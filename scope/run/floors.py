"""Floors of the main job's results: per stage, the value at or beyond which a result says
"something is wrong" (a bug, a broken model, a stage that learnt nothing), not "the method lost".

A floor is no target: a result above it can still be poor. DPO's train reward accuracy has no
floor: a one-epoch run scores each pair before learning it, so a few steps sit near chance. Each stage's floors read only the files
that stage writes (the PITuning floor also reads ``pituning/report.json``, so it sits under
``lightgbm``, the stage that completes that comparison). :func:`floor_violations` is cheap (a few
small JSON files) and never raises: a missing, partial or unreadable file gives no message. The
runner appends its messages to the stage's ``stage.log``; the report shows :func:`all_violations`
in red at the top.

| stage | quantity | floor (flagged at or beyond) |
|---|---|---|
| sft | held-out schema-valid after SFT (``metrics.json``) | <= 0.5 |
| dpo | held-out schema-valid after DPO (``metrics.json``, when the stage answers held-out users) | <= 0.5 |
| evaluate | schema_valid and grounding@3 of every trained student, each decoding | <= 0.5 |
| novelty | mean hit@3 of every trained student; after DPO minus after SFT | <= popularity's; <= -0.1 |
| synthesis | well-formed share of generated lines; Eq. 26 Pearson r; TSTR accuracy | <= 0.9; <= 0.5; <= majority class |
| completion | 90% interval coverage (mean over channels), per task | <= 0.5 |
| compare | the engine's rmse_norm, per task | >= persistence's |
| lightgbm | PITuning's prec_m | <= most frequent intent per (user, slot) |
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from scope.run.stages import STAGES, stage_folder, stage_output

Values = dict[str, tuple[float, float]]   # where (e.g. "after DPO, unconstrained") -> (value, floor)


@dataclass(frozen=True)
class Floor:
    what: str                         # the quantity, in words
    read: Callable[[Path], Values]    # run folder -> values and their floors
    why: str                          # what a value at or beyond the floor means
    lower_is_better: bool = False     # an error: flagged at or above the floor


def _json(run_dir: Path, stage: str, name: str | None = None) -> dict:
    path = stage_folder(run_dir, stage) / name if name else stage_output(run_dir, stage)
    return json.loads(path.read_text())


def _fixed(floor: float, read: Callable[[Path], dict[str, float]]) -> Callable[[Path], Values]:
    return lambda run_dir: {where: (value, floor) for where, value in read(run_dir).items()}


def _students(run_dir: Path, metric: str) -> dict[str, float]:
    result = _json(run_dir, "evaluate")
    return {f"{stage}, {decoding}": row[decoding][metric]["mean"] for stage, row in result["stages"].items()
            if stage != "before SFT" for decoding in result["decodings"] if decoding in row}


def _novelty(run_dir: Path) -> Values:
    methods = _json(run_dir, "novelty")["methods"]
    floor = methods["popularity"]["mean_hit@3"]["mean"]
    return {f"{name}, vs popularity": (m["mean_hit@3"]["mean"], floor) for name, m in methods.items()
            if name.startswith("student") and name != "student before SFT"}


def _coverage(run_dir: Path) -> dict[str, float]:
    tasks = _json(run_dir, "completion")["tasks"]
    return {task: sum(r["coverage90"]) / len(r["coverage90"]) for task, r in tasks.items() if r.get("coverage90")}


def _engine(run_dir: Path) -> Values:
    tasks = _json(run_dir, "compare")["tasks"]
    out = {}
    for task, rows in tasks.items():
        engine = next((m for m in rows if m.startswith("engine")), None)
        if engine and "persistence" in rows:
            out[f"{task}, vs persistence"] = (rows[engine]["rmse_norm"], rows["persistence"]["rmse_norm"])
    return out


def _pituning(run_dir: Path) -> Values:
    tuned = _json(run_dir, "pituning")["metrics"]
    floor = _json(run_dir, "lightgbm")["metrics"]["most frequent intent per (user, slot)"]["prec_m"]
    return {f"{name}, vs most frequent intent": (m["prec_m"], floor) for name, m in tuned.items()
            if name.startswith("PITuning")}


FLOORS: dict[str, list[Floor]] = {
    "sft": [Floor("held-out schema-valid (student_schema_valid)",
                  _fixed(0.5, lambda r: {"": _json(r, "sft", "metrics.json")["student_schema_valid"]}),
                  "half or more of the SFT student's held-out answers are not a valid profile")],
    "dpo": [Floor("held-out schema-valid (student_schema_valid)",
                  _fixed(0.5, lambda r: {"": _json(r, "dpo", "metrics.json")["student_schema_valid"]}),
                  "half or more of the DPO student's held-out answers are not a valid profile")],
    "evaluate": [Floor("schema_valid", _fixed(0.5, lambda r: _students(r, "schema_valid")),
                       "half or more of the student's answers are not a valid profile"),
                 Floor("grounding@3", _fixed(0.5, lambda r: _students(r, "grounding@3")),
                       "the student's top apps and places miss the user's real ones half the time or more")],
    "novelty": [Floor("mean hit@3", _novelty, "the student recommends no better than the cohort's most popular items"),
                Floor("DPO effect on mean hit@3 (after DPO minus after SFT)",
                      _fixed(-0.1, lambda r: {"": _json(r, "novelty")["dpo_effect"]["mean_hit@3"]["mean"]}),
                      "DPO, which trains on these recommendations, made them clearly worse")],
    "synthesis": [Floor("well-formed share of the generated lines",
                        _fixed(0.9, lambda r: {"": _json(r, "synthesis")["well_formed_rate"]}),
                        "one line in ten or more breaks the trace grammar, although decoding is constrained"),
                  Floor("Pearson r of Corr(app, POI), synthetic vs real (Eq. 26)",
                        _fixed(0.5, lambda r: {"": _json(r, "synthesis")["pearson_r"]}),
                        "the synthetic cohort has lost most of the real app-place structure (paper: 0.952)"),
                  Floor("TSTR accuracy", lambda r: {"vs the majority class": (
                      _json(r, "synthesis")["tstr_accuracy"], _json(r, "synthesis")["majority_accuracy"])},
                        "a predictor trained on the synthetic traces is no better than always naming the most common category")],
    "completion": [Floor("90% interval coverage (mean over channels)", _fixed(0.5, _coverage),
                         "the engine's 90% intervals cover half of the targets or fewer: its spread is not calibrated")],
    "compare": [Floor("the engine's rmse_norm", _engine,
                      "the engine is no better than carrying the last value forward, the baseline its prior builds on",
                      lower_is_better=True)],
    "lightgbm": [Floor("PITuning's prec_m", _pituning,
                       "the tuned on-device model is no better than each user's most frequent intent per time slot")],
}


def floor_violations(run_dir: str | Path, stage: str) -> list[str]:
    """Messages for the results of ``stage`` in ``run_dir`` at or beyond their floor; empty when all are
    above it, or the stage has no floors, or its files are missing or unreadable."""
    messages = []
    for floor in FLOORS.get(stage, []):
        try:
            values = floor.read(Path(run_dir))
        except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, ZeroDivisionError):
            continue   # not written (yet), partial or of another layout: nothing to say
        for where, (value, limit) in values.items():
            if not isinstance(value, (int, float)) or not isinstance(limit, (int, float)) or math.isnan(value):
                continue
            if (value >= limit) if floor.lower_is_better else (value <= limit):
                side = "at or above" if floor.lower_is_better else "at or below"
                messages.append(f"{stage}: {floor.what}{f' ({where})' if where else ''} = {value:.3g}, {side} "
                                f"its floor {limit:.3g}: {floor.why}")
    return messages


def all_violations(run_dir: str | Path) -> dict[str, list[str]]:
    """:func:`floor_violations` of every stage that has any, in stage order."""
    out = {stage: floor_violations(run_dir, stage) for stage in STAGES}
    return {stage: messages for stage, messages in out.items() if messages}
