"""Teachers: the grounded teacher, the on-disk cache (hits, corrupted entries) and failure reporting."""

import json

import pytest

from scope.profiles.corpus import TeacherFailure, build_corpus
from scope.profiles.evaluation import precision_at_3
from scope.profiles.teachers import GroundedTeacher, Teacher, TeacherCache, TeacherResult, run_teacher
from tests.scope.conftest import data_args


class CountingTeacher(GroundedTeacher):
    name = "counting"

    def __init__(self):
        self.calls = 0

    def generate(self, prompts):
        self.calls += len(prompts)
        return super().generate(prompts)


class FailingTeacher(Teacher):
    name = "failing"

    def generate(self, prompts):
        return [TeacherResult(p.user_id, None, "garbage", "invalid JSON: nope", attempts=3) for p in prompts]


def test_grounded_teacher_is_deterministic_and_grounded(corpus):
    prompts = [corpus.prompts[u] for u in corpus.profiled("train")[:5]]
    first, second = GroundedTeacher().generate(prompts), GroundedTeacher().generate(prompts)
    assert [r.raw for r in first] == [r.raw for r in second]
    for p, r in zip(prompts, first):
        assert precision_at_3(r.profile.top_categories(), p.stats.top_apps()) == 1.0
        assert precision_at_3(r.profile.top_areas(), p.stats.top_areas()) > 0
        assert r.profile.app_preferences[0].category in r.profile.reasoning


def test_cache_hits_on_rerun(corpus, tmp_path):
    prompts = [corpus.prompts[u] for u in corpus.profiled("train")[:4]]
    teacher, cache = CountingTeacher(), TeacherCache(tmp_path)
    first = run_teacher(teacher, prompts, cache)
    again = run_teacher(teacher, prompts, TeacherCache(tmp_path))
    assert teacher.calls == 4
    assert all(r.cached for r in again) and [r.profile for r in again] == [r.profile for r in first]


@pytest.mark.parametrize("damage", ["truncate", "tamper", "garbage"])
def test_corrupted_cache_entry_is_detected_and_regenerated(corpus, tmp_path, damage):
    prompts = [corpus.prompts[u] for u in corpus.profiled("train")[:2]]
    teacher = CountingTeacher()
    run_teacher(teacher, prompts, TeacherCache(tmp_path))
    path = TeacherCache(tmp_path).path(TeacherCache.key(teacher.name, prompts[0]))
    text = path.read_text()
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "tamper":
        entry = json.loads(text)
        entry["profile"]["persona"] = "astronaut"
        path.write_text(json.dumps(entry))
    else:
        path.write_bytes(b"\x00\xff not json")
    cache = TeacherCache(tmp_path)
    results = run_teacher(teacher, prompts, cache)
    assert cache.stats.corrupted == [str(path)] and cache.stats.hits == 1
    assert teacher.calls == 3 and results[0].ok and not results[0].cached
    assert json.loads(path.read_text())["profile"]["persona"] != "astronaut"  # rewritten


def test_teacher_failures_are_reported_never_dropped(small_cohort, tmp_path):
    args = data_args(small_cohort, tmp_path / "cache", max_teacher_failure_fraction=0.5)
    with pytest.raises(TeacherFailure, match="no valid profile for 40 of 40 users.*invalid JSON"):
        build_corpus(args, FailingTeacher(), report_dir=tmp_path)
    lines = (tmp_path / "teacher_failures.jsonl").read_text().splitlines()
    assert len(lines) == 40 and json.loads(lines[0])["attempts"] == 3


def test_grounded_teacher_reads_the_real_files_category_spellings(small_cohort, tmp_path):
    """The real Categorys.txt spells the simulator's categories otherwise (Health&Fitness,
    Social\\_Networking, infant&mom, Weath1er, ...): the same users get the same personas and
    intents under both spellings."""
    import shutil

    from scope.data.locations import cluster_locations
    from scope.data.statistics import cohort_statistics
    from scope.data.tsinghua import load_cohort
    from scope.profiles.teachers import grounded_profile
    from tests.conftest import shared_data

    real = tmp_path / "real_spellings"
    shutil.copytree(small_cohort, real)
    shutil.copy(shared_data("tsinghua-meta/Categorys.txt"), real / "Categorys.txt")
    profiles = {}
    for name, folder in (("simulated", small_cohort), ("real", real)):
        cohort = load_cohort(folder)
        stats = cohort_statistics(cohort.events, cohort.categories, cluster_locations(cohort.base_poi))
        profiles[name] = {u: grounded_profile(s) for u, s in stats.items()}
    assert "Health&Fitness" in load_cohort(real).categories
    for u, simulated in profiles["simulated"].items():
        assert profiles["real"][u].persona == simulated.persona
        assert [i.split(" at ")[0] for i in profiles["real"][u].likely_intents] == \
            [i.split(" at ")[0] for i in simulated.likely_intents]
    intents = {i.split(" at ")[0] for p in profiles["real"].values() for i in p.likely_intents}
    assert not any(i.endswith(" apps") for i in intents), intents  # no category fell through to "use X apps"


def test_persona_rules_are_one_replaceable_table(corpus):
    from scope.profiles.teachers import PERSONA_RULES, PersonaRule

    prompts = [corpus.prompts[u] for u in corpus.users()[:6]]
    assert {r.label for r in PERSONA_RULES} == {"night-shift worker", "traveller", "student", "retiree", "commuter"}
    everyone = (PersonaRule("phone user", lambda s: True, lambda s: "every user is one"),)
    custom = GroundedTeacher(persona_rules=everyone, name="grounded-one-persona").generate(prompts)
    assert {r.profile.persona for r in custom if not prompts[0].stats.empty} <= {"phone user", "unknown (no history)"}
    with pytest.raises(ValueError, match="their own teacher name"):
        GroundedTeacher(persona_rules=everyone)
