"""Intent-labelled event data: the simulator, the validated file format, samples and splits."""

import numpy as np
import pytest
import torch

from scope.data.events import DataError
from scope.pituning.data import (EVENTS_FILE, INTENT_TRACE_FILE, INTENTS_FILE, N_SPECIAL, QUERY, SampleConfig,
                                 build_samples, is_individual, load_intent_cohort, prediction_points, read_vocabulary)
from scope.pituning.simulate import (EVENTS, INTENT_APPS, INTENT_PRIOR, INTENT_SYSTEM, INTENTS, IntentCohortConfig,
                                     simulate_intent_cohort)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("intents")
    simulate_intent_cohort(IntentCohortConfig(n_users=24, days=6, n_stations=200, individual_fraction=0.25, seed=3),
                           out, progress=False)
    return out


def test_vocabulary_has_18_intents_several_events_each_and_a_long_tail():
    assert len(INTENTS) == 18
    assert all(len(INTENT_APPS[i]) >= 1 and len(INTENT_APPS[i]) + len(INTENT_SYSTEM[i]) >= 3 for i in INTENTS)
    assert len(EVENTS) > 2 * len(INTENTS)
    assert any(e.startswith("sys:") for e in EVENTS) and any(e.startswith("launch:") for e in EVENTS)
    prior = np.array(list(INTENT_PRIOR.values()))
    assert prior.max() / prior.min() > 20 and np.all(np.diff(prior) <= 0)


def test_simulation_is_deterministic_and_population_individual_users_are_disjoint(cohort_dir, tmp_path):
    again = tmp_path / "again"
    simulate_intent_cohort(IntentCohortConfig(n_users=24, days=6, n_stations=200, individual_fraction=0.25, seed=3),
                           again, progress=False)
    assert (again / INTENT_TRACE_FILE).read_bytes() == (cohort_dir / INTENT_TRACE_FILE).read_bytes()
    data = build_samples(load_intent_cohort(cohort_dir), SampleConfig(individual_fraction=0.25, seed=3))
    assert data.individual_users and data.population_users
    assert not set(data.individual_users) & set(data.population_users)
    assert set(data.individual_users) == {int(u) for u in range(1, 25) if is_individual([u], 0.25, 3)[0]} \
        & set(data.individual_users)


def test_individual_preferences_differ_from_the_population(cohort_dir):
    data = build_samples(load_intent_cohort(cohort_dir), SampleConfig(individual_fraction=0.25, seed=3))
    population = data.population_intent_counts() / len(data.population_train)
    distances = []
    for user in data.individual_users:
        y = data.individual["train"].of_user(user).intent
        share = np.bincount(y.numpy(), minlength=18) / len(y)
        distances.append(0.5 * np.abs(share - population).sum())   # total variation distance
    assert np.mean(distances) > 0.15


def test_samples_have_30_history_events_and_a_query_and_time_ordered_splits(cohort_dir):
    data = build_samples(load_intent_cohort(cohort_dir), SampleConfig(individual_fraction=0.25, seed=3))
    train = data.individual["train"]
    assert train.event.shape[1] == 31 and (train.event[:, -1] == QUERY).all()
    assert (train.event[:, :-1] >= N_SPECIAL).all()
    for user in data.individual_users:
        parts = [data.individual[s].of_user(user).seconds for s in ("train", "val", "test")]
        assert len(parts[0]) > len(parts[2]) > 0
        assert parts[0].max() < parts[1].min() <= parts[1].max() < parts[2].min()
    assert data.vocab_sizes()["event"] == len(EVENTS) + N_SPECIAL


def test_prediction_points_start_sessions():
    import pandas as pd
    ev = pd.DataFrame({"seconds": [0, 10, 20, 2000, 2010, 2020], "intent": [1, 1, 2, 2, 2, 1]})
    assert prediction_points(ev, gap_minutes=10).tolist() == [0, 2, 3, 5]


# --------------------------------------------------------------------------------------------
# Bad input files: the error names file, line and field
# --------------------------------------------------------------------------------------------

def _corrupt(cohort_dir, tmp_path, line_index: int, new_line: str | None):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(cohort_dir, bad)
    lines = (bad / INTENT_TRACE_FILE).read_text().splitlines()
    if new_line is None:
        del lines[line_index]
    else:
        lines[line_index] = new_line
    (bad / INTENT_TRACE_FILE).write_text("\n".join(lines) + "\n")
    return bad, lines


@pytest.mark.parametrize("mutate, field, words", [
    (lambda p: p[:4], None, "expected 5 space-separated fields"),
    (lambda p: [p[0], "20240399120000", *p[2:]], "timestamp", "valid yyyymmddhhmmss"),
    (lambda p: [p[0], p[1], "x7", *p[3:]], "base_station_id", "non-negative integer"),
    (lambda p: [*p[:3], "launch:teleport", p[4]], "event", "'launch:teleport' is not listed in events.txt"),
    (lambda p: [*p[:4], "sleeping"], "intent", "'sleeping' is not listed in intents.txt"),
])
def test_a_bad_trace_line_is_named(cohort_dir, tmp_path, mutate, field, words):
    lines = (cohort_dir / INTENT_TRACE_FILE).read_text().splitlines()
    bad, _ = _corrupt(cohort_dir, tmp_path, 6, " ".join(mutate(lines[6].split())))
    with pytest.raises(DataError) as err:
        load_intent_cohort(bad)
    assert err.value.line == 7 and err.value.field == field
    assert f"{INTENT_TRACE_FILE}:7:" in str(err.value) and words in str(err.value)


def test_lenient_reading_counts_unknown_intents_and_stations_without_poi(cohort_dir, tmp_path):
    lines = (cohort_dir / INTENT_TRACE_FILE).read_text().splitlines()
    bad, _ = _corrupt(cohort_dir, tmp_path, 6, " ".join([*lines[6].split()[:4], "sleeping"]))
    text = (bad / INTENT_TRACE_FILE).read_text().splitlines()
    parts = text[9].split()
    text[9] = " ".join([parts[0], parts[1], "987654", *parts[3:]])      # a station absent from base_poi.txt
    (bad / INTENT_TRACE_FILE).write_text("\n".join(text) + "\n")
    with pytest.raises(DataError) as err:
        load_intent_cohort(bad)
    assert err.value.line == 7 and err.value.field == "intent"
    cohort = load_intent_cohort(bad, lenient=True)
    assert cohort.counts["skipped_lines"] == {"intent": 1, "base_station_id": 1}
    assert len(cohort.events) == len(lines) - 2 and 987654 not in cohort.events["base_station_id"].tolist()
    (bad / INTENT_TRACE_FILE).write_text("\n".join(text[:6] + text[7:]) + "\n")
    with pytest.raises(DataError) as err:
        load_intent_cohort(bad)
    assert err.value.line == 9 and err.value.field == "base_station_id" and "987654" in str(err.value)


def test_unsorted_and_regrouped_traces_are_rejected(cohort_dir, tmp_path):
    lines = (cohort_dir / INTENT_TRACE_FILE).read_text().splitlines()
    swapped = lines[:]
    swapped[10], swapped[11] = swapped[11], swapped[10]
    if swapped[10].split()[1] != swapped[11].split()[1]:
        bad = tmp_path / "swapped"
        import shutil
        shutil.copytree(cohort_dir, bad)
        (bad / INTENT_TRACE_FILE).write_text("\n".join(swapped) + "\n")
        with pytest.raises(DataError, match=r":12: field 'timestamp': .*earlier than the previous"):
            load_intent_cohort(bad)
    other = next(i for i, line in enumerate(lines) if line.split()[0] != lines[0].split()[0])
    bad, _ = _corrupt(cohort_dir, tmp_path / "x", other + 3, lines[0])
    with pytest.raises(DataError, match=r"field 'user_id': user \d+ reappears"):
        load_intent_cohort(bad)


def test_bad_vocabularies_and_missing_files(cohort_dir, tmp_path):
    (tmp_path / INTENTS_FILE).write_text("news\nvideo\nnews\n")
    with pytest.raises(DataError, match=r"intents.txt:3: field 'name': 'news' is already listed at line 1"):
        read_vocabulary(tmp_path / INTENTS_FILE)
    (tmp_path / EVENTS_FILE).write_text("launch:a b\n")
    with pytest.raises(DataError, match=r"events.txt:1: field 'name'"):
        read_vocabulary(tmp_path / EVENTS_FILE)
    with pytest.raises(DataError, match="file not found"):
        load_intent_cohort(tmp_path / "nowhere")
