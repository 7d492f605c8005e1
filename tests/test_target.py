"""Regression targets: standardised or range-squashed training, metrics in the target's own units."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ctrflow.train.target import predict, regression_loss, target_stats


def test_target_stats_and_the_auto_range():
    y = np.array([1, 2, 3, 4, 5, 5, 4], dtype=float)
    t = target_stats(y)
    assert t["y_range"] == [0.5, 5.5] and t["mean"] == pytest.approx(y.mean()) and t["std"] == pytest.approx(y.std())
    assert target_stats(y, None)["y_range"] is None and target_stats(y, (0, 10))["y_range"] == [0.0, 10.0]
    with pytest.raises(ValueError):
        target_stats(np.array([1.0, np.nan]))
    with pytest.raises(ValueError):
        target_stats(y, (3, 1))


def test_a_fresh_model_predicts_the_mean_of_a_skewed_target():
    # Visit counts: most 0-3, a long tail to 77 (statsmodels' randhie). Without the offset a zero output
    # predicted the range's middle (~38), on the sigmoid's flat side.
    rng = np.random.default_rng(0)
    y = np.minimum(rng.poisson(rng.gamma(0.5, 6.0, 20000)), 77).astype(float)
    y[0] = 77.0
    t = target_stats(y)
    at_zero = predict(torch.zeros(1), t).item()
    assert at_zero == pytest.approx(y.mean(), rel=1e-4)
    assert abs(at_zero - sum(t["y_range"]) / 2) > 30
    # a run saved before the offset existed reads as offset 0
    assert predict(torch.zeros(1), {"mean": 1.0, "std": 1.0, "y_range": [0.0, 10.0]}).item() == 5.0


def test_predict_and_loss():
    z = torch.tensor([-50.0, 0.0, 50.0])
    squashed = predict(z, {"mean": 3.0, "std": 2.0, "y_range": [0.5, 5.5]})
    assert torch.allclose(squashed, torch.tensor([0.5, 3.0, 5.5])) and predict(z, None) is z
    std = predict(torch.tensor([1.0]), {"mean": 3.0, "std": 2.0, "y_range": None})
    assert std.item() == 5.0
    y = torch.tensor([5.0])
    loss = regression_loss(torch.tensor([1.0]), y, {"mean": 3.0, "std": 2.0, "y_range": None})
    assert loss.item() == 0.0  # 3 + 2 * 1 == 5


@pytest.mark.parametrize("y_range", ["auto", "none"])
def test_ratings_train_in_their_units_from_the_first_epoch(tmp_path, capsys, y_range):
    from test_fit import FAST

    from ctrflow.etl.schema import ColumnSchema, Schema
    from ctrflow.train.fit import main

    rng = np.random.default_rng(0)
    d = tmp_path / "ratings"
    for split, n in (("train", 4096), ("valid", 1024)):
        c = rng.integers(3, 40, n).astype(np.int32)
        x = rng.standard_normal(n).astype(np.float32)
        y = np.clip(np.round(3 + 1.2 * x + (c % 3 - 1)), 1, 5).astype(np.float32)
        (d / split).mkdir(parents=True)
        pq.write_table(pa.table({"C0": c, "I0": x, "label": y}), d / split / "part-0.parquet")
    Schema([ColumnSchema("C0", "categorical", "int32", cardinality=40, embedding_dim=8),
            ColumnSchema("I0", "continuous", "float32"), ColumnSchema("label", "label", "float32")],
           {"task": "regression"}).save(d / "schema.json")
    out = tmp_path / "run"
    assert main(["--data", str(d), "--out", str(out), "--y-range", y_range, "--no-loader-bench",
                 *FAST, "--lr", "0.01"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    label_std = float(np.std(pq.read_table(d / "valid").column("label").to_numpy()))
    assert summary["valid"]["rmse"] < 0.8 * label_std  # one epoch: well below predicting the mean
    cfg = json.loads((out / "config.json").read_text())
    state = torch.load(out / "checkpoints" / sorted(p.name for p in (out / "checkpoints").iterdir())[-1],
                       weights_only=True)
    target = state["config"]["train"]["target"]
    assert (target["y_range"] == [0.5, 5.5]) if y_range == "auto" else target["y_range"] is None
    assert cfg["args"]["y_range"] == y_range
