"""Regression targets done right: the model learns a standardised target, or one squashed into the
target's range (fastai's ``y_range``), and every reported number is in the target's own units.

A raw MSE on ratings 1-5 starts with a model that predicts ~0, so the first epoch spends itself on the
mean (the TabularModel's RMSE was 6.79 after one epoch). Here the model's output ``z`` becomes a
prediction by

* ``y_range = (lo, hi)``: ``lo + (hi - lo) * sigmoid(z + z0)`` (fastai's ``SigmoidRange``; predictions
  can never leave the range), ``z0 = logit((mean - lo) / (hi - lo))`` so that a fresh model (``z ~ 0``)
  predicts the training mean: a skewed target (visit counts 0-77 around a mean of 2.9) otherwise starts
  at the range's middle, on the sigmoid's flat side, where DLRM stayed pinned at the bound, or
* standardisation: ``mean + std * z``,

and the loss is the MSE of predictions in units of the target's standard deviation (so the learning
rates tuned for the binary task fit). The transform is stored with the run (``TrainConfig.target``),
and ``ctrflow.serve`` applies the same one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def target_stats(labels: np.ndarray, y_range: str | tuple[float, float] | None = "auto") -> dict[str, Any]:
    """The target transform for training labels ``labels`` [N] (JSON-safe, for ``TrainConfig.target``).

    Args:
        labels: the training split's labels (finite numbers).
        y_range: ``"auto"`` (the labels' range widened by an eighth of its span on each side: ratings
            1-5 give 0.5-5.5, fastai's advice), ``None`` / ``"none"`` (standardise only), or ``(lo, hi)``.

    Returns:
        ``{"mean", "std", "y_range": [lo, hi] | None, "offset": z0}`` (``offset``: the logit of the mean's
        place in the range, 0 without a range).
    """
    y = np.asarray(labels, dtype=np.float64)
    if y.size == 0 or not np.isfinite(y).all():
        raise ValueError("regression labels must be finite numbers, and there must be some")
    mean, std = float(y.mean()), float(y.std())
    std = std if std > 0 else 1.0
    if y_range == "auto":
        lo, hi = float(y.min()), float(y.max())
        pad = (hi - lo) / 8 if hi > lo else max(abs(lo), 1.0) / 8
        rng: list[float] | None = [lo - pad, hi + pad]
    elif y_range is None or y_range == "none":
        rng = None
    else:
        lo, hi = (float(v) for v in y_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"y_range needs two finite numbers lo < hi, got {y_range}")
        rng = [lo, hi]
    offset = 0.0
    if rng is not None:  # where the mean sits in the range, kept off the sigmoid's saturated ends
        share = min(max((mean - rng[0]) / (rng[1] - rng[0]), 1e-3), 1 - 1e-3)
        offset = math.log(share / (1 - share))
    return {"mean": mean, "std": std, "y_range": rng, "offset": offset}


def predict(z: torch.Tensor, target: dict[str, Any] | None) -> torch.Tensor:
    """Model outputs [B] -> predictions in the target's units (``target`` None: unchanged)."""
    if not target:
        return z
    if target.get("y_range"):
        lo, hi = target["y_range"]
        return torch.sigmoid(z + target.get("offset", 0.0)) * (hi - lo) + lo  # runs saved before offset: 0
    return z * target["std"] + target["mean"]


def regression_loss(z: torch.Tensor, y: torch.Tensor, target: dict[str, Any] | None) -> torch.Tensor:
    """MSE of the predictions, in units of the target's std (plain MSE without a transform)."""
    if not target:
        return torch.nn.functional.mse_loss(z, y)
    return torch.nn.functional.mse_loss(predict(z, target) / target["std"], y / target["std"])
