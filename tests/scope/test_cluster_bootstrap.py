"""The cluster bootstrap (scope.metrics.cluster_bootstrap_ci): users are resampled with all their cases,
and every novelty CI (scope.profiles.novelty) is drawn that way."""

import numpy as np
import pytest

from scope.metrics import bootstrap_ci, cluster_bootstrap_ci, cluster_bootstrap_means
from scope.profiles.novelty import CI_METHOD, ITEM_TYPES, KS, CaseScore, novelty_summary, paired_difference


def test_one_case_per_cluster_is_the_plain_bootstrap():
    values = np.random.default_rng(1).random(37)
    users = [f"u{i}" for i in range(37)]
    assert cluster_bootstrap_ci(values, users, n_boot=500, seed=3) == pytest.approx(bootstrap_ci(values, 500, 3))


def test_the_draws_are_means_over_the_cases_of_the_drawn_users():
    # users a (cases 0, 0) and b (case 1): two users drawn -> {a, a} 0, {a, b} 1/3 (3 cases), {b, b} 1
    draws = cluster_bootstrap_means([0.0, 0.0, 1.0], ["a", "a", "b"], n_boot=4000, seed=0)
    support, counts = np.unique(np.round(draws, 9), return_counts=True)
    assert support.tolist() == pytest.approx([0.0, 1 / 3, 1.0])
    assert counts / counts.sum() == pytest.approx([0.25, 0.5, 0.25], abs=0.03)


def test_deterministic_values():
    values, users = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0], [1, 1, 2, 3, 3, 4, 5]
    first = cluster_bootstrap_ci(values, users, n_boot=1000, seed=0)
    assert first == cluster_bootstrap_ci(values, users, n_boot=1000, seed=0)
    assert first[0] == pytest.approx(4 / 7)
    assert first[1:] == pytest.approx((1 / 6, 8 / 9))   # pinned: seed 0, 1000 draws
    assert cluster_bootstrap_ci([0.5, float("nan")], ["a", "b"]) == (0.5, 0.5, 0.5)   # NaN left out
    assert all(np.isnan(cluster_bootstrap_ci([], [])))
    with pytest.raises(ValueError, match="cluster labels"):
        cluster_bootstrap_means([1.0, 2.0], ["a"])


def test_duplicated_cases_widen_the_interval_against_the_naive_case_bootstrap():
    per_user = np.random.default_rng(0).random(30)
    values, users = np.repeat(per_user, 2), np.repeat(np.arange(30), 2)   # each user's two cases agree
    _, lo, hi = cluster_bootstrap_ci(values, users, n_boot=2000, seed=0)
    _, naive_lo, naive_hi = bootstrap_ci(values, 2000, 0)                 # treats 60 cases as independent
    assert hi - lo > 1.25 * (naive_hi - naive_lo)
    assert (lo, hi) == pytest.approx(bootstrap_ci(per_user, 2000, 0)[1:])   # = the 30 users, one value each


def _score(user: int, cut: str, hit: float) -> CaseScore:
    scores = {f"{t}_{m}@{k}": hit for t in ITEM_TYPES for m in ("hit", "recall") for k in KS}
    return CaseScore(f"{user}/{cut}", user, cut, True, False, None, scores)


def test_novelty_cis_resample_users():
    # user 1 has two cases (both hits), user 2 one (a miss): a resample is {1, 1}, {1, 2} or {2, 2}
    scores = [_score(1, "first_days", 1.0), _score(1, "removed", 1.0), _score(2, "first_days", 0.0)]
    summary = novelty_summary(scores, n_boot=4000)
    assert summary["ci95_method"] == CI_METHOD == "bootstrap over users (cluster)"
    assert (summary["cases"], summary["users"]) == (3, 2)
    assert summary["apps_hit@3"]["mean"] == pytest.approx(2 / 3) and summary["apps_hit@3"]["ci95"] == [0.0, 1.0]
    assert summary["mean_hit@3"]["ci95"] == [0.0, 1.0]
    after = [_score(1, "first_days", 1.0), _score(1, "removed", 1.0), _score(2, "first_days", 1.0)]
    diff = paired_difference(scores, after, n_boot=4000)
    assert (diff["mean"], diff["n"], diff["users"], diff["ci95_method"]) == (pytest.approx(1 / 3), 3, 2, CI_METHOD)
    assert diff["ci95"] == [0.0, 1.0]
