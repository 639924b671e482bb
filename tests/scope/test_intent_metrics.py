"""The intent metrics of appendix D (in completion/metrics.py) against scikit-learn and by hand."""

import math

import pytest
import torch
from sklearn.metrics import precision_recall_fscore_support

from scope.pituning.evaluate import intent_metrics, precision_recall, recall_per_class


@pytest.mark.parametrize("seed", range(5))
def test_weighted_and_macro_precision_recall_match_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 12, (300,), generator=g)
    predictions = torch.where(torch.rand(300, generator=g) < 0.4, labels, torch.randint(0, 15, (300,), generator=g))
    ours = precision_recall(labels, predictions)
    for average in ("weighted", "macro"):
        p, r, _, _ = precision_recall_fscore_support(labels.numpy(), predictions.numpy(), average=average,
                                                     zero_division=0)
        suffix = average[0]
        assert ours[f"prec_{suffix}"] == pytest.approx(p, abs=1e-12)
        assert ours[f"rec_{suffix}"] == pytest.approx(r, abs=1e-12)


def test_classes_only_predicted_or_never_predicted():
    labels = torch.tensor([0, 0, 1, 1])
    predictions = torch.tensor([0, 2, 2, 2])          # class 1 never predicted, class 2 never true
    ours = precision_recall(labels, predictions)
    p, r, _, _ = precision_recall_fscore_support(labels, predictions, average="macro", zero_division=0)
    assert (ours["prec_m"], ours["rec_m"]) == pytest.approx((p, r))
    assert ours["prec_m"] == pytest.approx((1.0 + 0.0 + 0.0) / 3) and ours["rec_m"] == pytest.approx(0.5 / 3)


def test_ndcg_with_one_relevant_intent():
    scores = torch.tensor([[0.9, 0.5, 0.1, 0.0], [0.1, 0.2, 0.3, 0.9], [0.4, 0.3, 0.2, 0.1]])
    labels = torch.tensor([0, 2, 3])                   # ranks 1, 2, 4
    m = intent_metrics(scores, labels)
    assert m["ndcg3"] == pytest.approx((1 + 1 / math.log2(3) + 0) / 3)
    assert m["ndcg5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(5)) / 3)
    assert set(m) == {"prec_w", "rec_w", "prec_m", "rec_m", "ndcg3", "ndcg5"}


def test_recall_per_class():
    recall = recall_per_class(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 0]), 4)
    assert recall[:3].tolist() == [0.5, 1.0, 0.0] and math.isnan(recall[3])
