"""The profile schema, parsing of model answers, and outlines-constrained local generation."""

import json

import pytest

from scope.profiles.schema import Profile, ProfileError, generation_schema, parse_profile
from scope.profiles.teachers import LocalTeacher, grounded_profile


def test_grounded_profile_round_trips_through_json(corpus):
    profile = corpus.results[corpus.profiled("train")[0]].profile
    text = profile.to_json()
    assert text.startswith('{"reasoning": ')  # chain-of-thought first
    assert parse_profile("Sure! " + text + " trailing") == profile
    assert "Persona:" in profile.to_text() and profile.reasoning not in profile.to_text()


@pytest.mark.parametrize("bad, reason", [
    ("no json here", "no JSON object"),
    ('{"reasoning": "x", "persona": ', "invalid JSON"),
    ('{"reasoning": "x"}', "schema violation at persona"),
])
def test_invalid_answers_are_rejected_with_a_reason(bad, reason):
    with pytest.raises(ProfileError, match=reason):
        parse_profile(bad)


def test_out_of_range_values_and_extra_keys_are_rejected(corpus):
    obj = json.loads(corpus.results[corpus.profiled("train")[0]].profile.to_json())
    obj["app_preferences"][0]["share_pct"] = 140
    with pytest.raises(ProfileError, match="share_pct"):
        parse_profile(json.dumps(obj))
    obj = json.loads(corpus.results[corpus.profiled("train")[0]].profile.to_json())
    obj["user_id"] = 3
    with pytest.raises(ProfileError, match="user_id"):
        parse_profile(json.dumps(obj))


def test_generation_schema_uses_cohort_names_and_caps():
    schema = generation_schema(["Games", "News"], ["Residence"], max_chars=10)
    props = schema["properties"]
    assert "$defs" not in schema and "$ref" not in json.dumps(schema)
    assert props["app_preferences"]["items"]["properties"]["category"]["enum"] == ["Games", "News"]
    assert props["location_tendencies"]["items"]["properties"]["area"]["enum"] == ["Residence"]
    assert props["reasoning"]["maxLength"] == 10 and props["likely_intents"]["items"]["maxLength"] == 10


def test_outlines_constrains_a_random_model_to_a_valid_profile(tiny_model_dir, tokenizer, corpus):
    """A random 2-layer model produces garbage unconstrained; under outlines it must give a valid profile."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    teacher = LocalTeacher(model, tokenizer, model_name="tiny", max_new_tokens=300, categories=corpus.cohort.categories,
                           areas=corpus.clusters.names, max_chars=8)
    user = corpus.profiled("train")[0]
    (result,) = teacher.generate([corpus.prompts[user]])
    assert result.ok, result.error
    assert all(a.category in corpus.cohort.categories for a in result.profile.app_preferences)
    assert all(p.area in corpus.clusters.names for p in result.profile.location_tendencies)
    assert teacher.name.startswith("local:tiny:")


def test_empty_history_profile_is_valid(corpus):
    from scope.data.statistics import user_statistics

    stats = user_statistics(123, corpus.cohort.events.iloc[:0], corpus.cohort.categories, corpus.clusters)
    profile = grounded_profile(stats)
    assert profile.persona.startswith("unknown") and profile.app_preferences == []
    assert Profile.model_validate_json(profile.to_json()) == profile
