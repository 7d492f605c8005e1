"""Streaming metrics equal scikit-learn's (exact AUC with ties, AP, logloss, RMSE)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctrflow.train.metrics import BinaryMetrics, RegressionMetrics, average_precision, roc_auc

sk = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("n,levels,seed", [(7, 3, 0), (1000, 10, 1), (20000, 50, 2), (5000, 100000, 3)])
def test_auc_and_ap_equal_sklearn_with_ties(n, levels, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (n,), generator=g).float() / levels  # many ties
    labels = (torch.rand(n, generator=g) < 0.3).float()
    labels[0], labels[1] = 0.0, 1.0
    assert roc_auc(scores, labels) == pytest.approx(sk.roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(sk.average_precision_score(labels, scores), abs=1e-12)


def test_streaming_equals_one_shot_and_sklearn():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3000, generator=g).round(decimals=1)
    labels = (torch.rand(3000, generator=g) < torch.sigmoid(logits)).float()
    m = BinaryMetrics()
    for lo in range(0, 3000, 700):
        m.update(logits[lo : lo + 700], labels[lo : lo + 700])
    out = m.compute()
    p = torch.sigmoid(logits.double()).numpy()
    assert out["rows"] == 3000
    assert out["auc"] == pytest.approx(sk.roc_auc_score(labels, logits), abs=1e-12)
    assert out["ap"] == pytest.approx(sk.average_precision_score(labels, logits), abs=1e-12)
    assert out["logloss"] == pytest.approx(sk.log_loss(labels.numpy(), p), rel=1e-9)


def test_degenerate_cases():
    assert math.isnan(roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 1.0])))
    assert math.isnan(average_precision(torch.tensor([0.1, 0.2]), torch.tensor([0.0, 0.0])))
    assert roc_auc(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0])) == 0.5
    assert BinaryMetrics().compute()["rows"] == 0


def test_regression_rmse():
    g = torch.Generator().manual_seed(0)
    pred, y = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    m = RegressionMetrics()
    m.update(pred[:300], y[:300])
    m.update(pred[300:], y[300:])
    out = m.compute()
    assert out["rmse"] == pytest.approx(float(np.sqrt(np.mean((pred.numpy() - y.numpy()) ** 2))), rel=1e-6)
