"""Stage counts stated in the docs hold: "N stages" and the runner's "[k/N] stage" lines in README.md and
benchmarks/README.md agree with the main job's stage table (scope.run.stages.STAGES). "users x N stages"
counts the student evaluation's stages instead (scope.profiles.evaluation.STUDENT_STAGES)."""

import re
from pathlib import Path

import pytest

from scope.profiles.evaluation import STUDENT_STAGES
from scope.run.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
STAGE_COUNT = re.compile(r"(users(?: x|,) )?\b(\d+) stages\b")
PROGRESS = re.compile(r"\[(\d+)/(\d+)\] (\w+)")   # scope.run.pipeline's "[4/14] sft: ..."


def stated(pattern: re.Pattern, path: Path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        for match in pattern.finditer(line):
            yield f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r}", match


@pytest.mark.parametrize("path", DOCS, ids=["README.md", "benchmarks/README.md"])
def test_stated_stage_counts_match_the_stage_table(path):
    wrong = []
    for where, match in stated(STAGE_COUNT, path):
        expected = len(STUDENT_STAGES) if match.group(1) else len(STAGES)
        if int(match.group(2)) != expected:
            wrong.append(f"{where} (expected {expected})")
    for where, match in stated(PROGRESS, path):
        k, n, stage = int(match.group(1)), int(match.group(2)), match.group(3)
        position = list(STAGES).index(stage) + 1 if stage in STAGES else k
        if (k, n) != (position, len(STAGES)):
            wrong.append(f"{where} (expected [{position}/{len(STAGES)}])")
    assert not wrong, "stage counts that differ from scope.run.stages.STAGES:\n" + "\n".join(wrong)


def test_the_patterns_catch_what_they_are_for():
    assert STAGE_COUNT.search("all 13 stages done").group(2) == "13" and not STAGE_COUNT.search("13 stages").group(1)
    assert STAGE_COUNT.search("(4 held-out users x 3 stages)").group(1)
    assert PROGRESS.search('"[4/13] sft: FAILED').groups() == ("4", "13", "sft")
