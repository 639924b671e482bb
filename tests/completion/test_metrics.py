"""Metrics against values computed by hand."""

import math

import pytest
import torch

from completion.metrics import completion_report, coverage, crps, prediction_interval, rmse_mae
from scope.metrics import ranking_metrics


def as5d(values):
    """[C, n] -> [1, C, n, 1, 1]."""
    return torch.tensor(values, dtype=torch.float)[None, :, :, None, None]


def test_rmse_and_mae_per_channel_on_target_entries_only():
    truth = as5d([[0, 0, 0], [1, 1, 1]])
    pred = as5d([[3, 4, 50], [1, 3, 1]])
    target = as5d([[1, 1, 0], [1, 1, 1]]).bool()
    rmse, mae = rmse_mae(pred, truth, target)
    assert rmse.tolist() == pytest.approx([math.sqrt((9 + 16) / 2), math.sqrt(4 / 3)])
    assert mae.tolist() == pytest.approx([3.5, 2 / 3])


def test_crps_of_two_samples_and_of_one_sample():
    truth, target = as5d([[1.0]]), as5d([[1]]).bool()
    samples = torch.stack([as5d([[0.0]]), as5d([[2.0]])])
    # E|X - y| = 1, E|X - X'| = (0 + 2 + 2 + 0) / 4 = 1 -> 1 - 1/2
    assert crps(samples, truth, target).item() == pytest.approx(0.5)
    assert crps(samples[:1], truth, target).item() == pytest.approx(1.0)  # one sample: MAE
    three = torch.stack([as5d([[v]]) for v in (0.0, 1.0, 4.0)])
    # E|X - y| = (1 + 0 + 3) / 3, E|X - X'| = 2 (1 + 4 + 3) / 9
    assert crps(three, truth, target).item() == pytest.approx(4 / 3 - 8 / 9)


def test_interval_and_coverage():
    samples = torch.arange(11, dtype=torch.float).reshape(11, 1, 1, 1, 1, 1)  # 0..10
    lo, hi = prediction_interval(samples, level=0.8)
    assert (lo.item(), hi.item()) == pytest.approx((1.0, 9.0))
    truth = torch.tensor([0.5, 5.0, 9.0, 9.5]).reshape(1, 1, 4, 1, 1)
    samples = samples.expand(11, 1, 1, 4, 1, 1)
    target = torch.ones(1, 1, 4, 1, 1, dtype=torch.bool)
    assert coverage(samples, truth, target, level=0.8).item() == pytest.approx(0.5)


def test_report_in_normalised_and_original_units():
    truth = as5d([[0, 0]])
    samples = torch.stack([as5d([[1, 1]]), as5d([[3, 3]])])  # mean 2
    target = torch.ones_like(truth, dtype=torch.bool)
    report = completion_report(samples, truth, target, inverse=lambda v: 10 * v)
    assert report["rmse"] == pytest.approx([2.0]) and report["rmse_orig"] == pytest.approx([20.0])
    assert report["mae_orig"] == pytest.approx([20.0])
    assert report["crps"] == pytest.approx([2 - 0.5]) and report["crps_orig"] == pytest.approx([15.0])
    assert report["coverage90"] == pytest.approx([0.0])


def test_ranking_recall_ndcg_mrr_at_k():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5], [1, 2, 3, 4, 5.0]])
    relevant = torch.tensor([[0, 1, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]).bool()
    m = ranking_metrics(scores, relevant)  # row 3 has nothing relevant and is left out
    # row 1 ranks 0,1,2,3,4 -> hits at ranks 2 and 4; row 2 ranks 4,3,2,1,0 -> hit at rank 5
    assert m["recall@1"] == pytest.approx(0.0)
    assert m["recall@3"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["recall@5"] == pytest.approx((1 + 1) / 2)
    assert m["mrr@1"] == 0.0 and m["mrr@3"] == pytest.approx(0.5 / 2)
    assert m["mrr@5"] == pytest.approx((1 / 2 + 1 / 5) / 2)
    ideal_row1 = 1 + 1 / math.log2(3)  # both relevant items on top
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(3)) / ideal_row1 / 2)
    ndcg5_row1 = (1 / math.log2(3) + 1 / math.log2(5)) / ideal_row1
    assert m["ndcg@5"] == pytest.approx((ndcg5_row1 + 1 / math.log2(6)) / 2)


def test_js_divergence_bounds_and_a_hand_value():
    from scope.synthesis.fidelity import js_divergence

    assert js_divergence([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0)   # normalised first
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)         # disjoint: 1 bit
    # p = (1/2, 1/2), q = (1, 0): m = (3/4, 1/4); KL(p||m) = 1/2 log2(2/3) + 1/2 log2 2, KL(q||m) = log2(4/3)
    expected = (0.5 * math.log2(2 / 3) + 0.5 + math.log2(4 / 3)) / 2
    assert js_divergence([1, 1], [1, 0]) == pytest.approx(expected)
    with pytest.raises(ValueError):
        js_divergence([0, 0], [1, 1])


def test_agreement_r_r2_and_errors():
    from scope.synthesis.fidelity import agreement

    perfect = agreement([0.1, 0.2, 0.3], [0.1, 0.2, 0.3])
    assert perfect["pearson_r"] == pytest.approx(1) and perfect["r2_identity"] == pytest.approx(1) and perfect["mae"] == 0
    scaled = agreement([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])   # perfectly correlated, but not on the identity line
    assert scaled["r2"] == pytest.approx(1) and scaled["r2_identity"] == pytest.approx(1 - 14 / 2)
    assert scaled["mae"] == pytest.approx(2) and scaled["rmse"] == pytest.approx(math.sqrt(14 / 3))
    assert agreement([1, 2, 3], [3, 2, 1])["pearson_r"] == pytest.approx(-1)
