"""Statistics (Eq. 21-23) and structured prompts: values, no identifier leaks, empty/tiny histories."""

import numpy as np
import pandas as pd
import pytest

from scope.data.locations import cluster_locations
from scope.data.statistics import TINY_HISTORY, user_statistics
from scope.profiles.prompts import PromptBuilder

USER, STATIONS = 424242, (987651, 987652, 987653)


@pytest.fixture(scope="module")
def clusters():
    poi = pd.DataFrame({"Residence": [30, 0, 1, 25, 0, 2], "Business affairs": [0, 30, 1, 0, 28, 2],
                        "Shopping": [1, 1, 30, 2, 1, 27]}, index=pd.Index([*STATIONS, 5, 6, 7], name="BaseID"))
    return cluster_locations(poi, k=3)


def events(times, stations, apps):
    n = len(times)
    return pd.DataFrame({"user_id": np.full(n, USER, np.int64), "timestamp": pd.to_datetime(times).values.astype("datetime64[s]"),
                         "app_id": np.arange(n, dtype=np.int32), "app_category": np.asarray(apps, np.int16),
                         "location_id": np.asarray(stations, np.int32), "traffic_bytes": np.ones(n)})


CATEGORIES = ["Games", "News", "Navigation"]


@pytest.fixture(scope="module")
def history():
    # Weekday 2016-04-20 (Wed): 3 records at home at 08:00-08:04 (one session), 1 at work 14:00;
    # weekend 2016-04-23 (Sat): 2 at the shop at 20:00 and 20:30 (two sessions).
    times = ["2016-04-20 08:00", "2016-04-20 08:02", "2016-04-20 08:04", "2016-04-20 14:00",
             "2016-04-23 20:00", "2016-04-23 20:30"]
    return events(times, [STATIONS[0]] * 3 + [STATIONS[1]] + [STATIONS[2]] * 2, [1, 1, 1, 0, 2, 2])


def test_pi_time_c_u_and_sigma_u_values(history, clusters):
    s = user_statistics(USER, history, CATEGORIES, clusters)
    assert s.n_events == 6 and s.active_days == 2 and s.span_days == 4
    assert s.hour_share[8] == pytest.approx(3 / 6) and s.hour_share.sum() == pytest.approx(1)        # Eq. 21
    assert s.day_part_share == pytest.approx({"night": 0, "morning": 0.5, "afternoon": 1 / 6, "evening": 1 / 3})
    assert (s.weekday_rate, s.weekend_rate) == (4.0, 2.0)
    assert s.co_occurrence.sum() == pytest.approx(1) and s.co_occurrence.shape == (3, 3)             # Eq. 22
    assert s.app_share == pytest.approx({"News": 0.5, "Navigation": 1 / 3, "Games": 1 / 6})
    home = clusters.of([STATIONS[0]])[0]
    assert s.co_occurrence[home, CATEGORIES.index("News")] == pytest.approx(0.5)
    assert s.sessions_per_day == pytest.approx(4 / 2)                                                   # Eq. 23
    assert 0 < s.regularity < 1 and s.peak_hours(1) == [8]
    assert [p.rank for p in s.places] == [1, 2, 3] and s.places[0].share == pytest.approx(0.5)


def test_prompt_renders_the_statistics_and_no_identifier(history, clusters):
    s = user_statistics(USER, history, CATEGORIES, clusters)
    prompt = PromptBuilder()(s)
    text = prompt.text
    assert "6 records on 2 active days" in text and "News 50%" in text and "morning 50%" in text
    assert "place 1: " + clusters.names[clusters.of([STATIONS[0]])[0]] in text
    for identifier in (USER, *STATIONS):
        assert str(identifier) not in text
    assert [m["role"] for m in prompt.messages] == ["system", "user"]
    assert "Only 6 records were observed" in text  # tiny history is flagged
    assert 6 < TINY_HISTORY


def test_empty_history_gets_a_valid_prompt_that_says_so(clusters):
    s = user_statistics(USER, events([], [], []), CATEGORIES, clusters)
    assert s.empty and s.places == [] and s.co_occurrence.sum() == 0
    prompt = PromptBuilder()(s)
    assert "no app-usage records were observed" in prompt.user
    assert prompt.system and "{{" not in prompt.text
