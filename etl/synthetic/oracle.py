"""Scores of the known click probabilities (the **oracle**): what a perfect model would reach.

``synthetic.json`` records them per split; JSON has no NaN, so a split too small to hold both labels
stores null (:func:`finite`).
"""

from __future__ import annotations

import numpy as np


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks [n] of x [n], ties sharing their average rank."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    out = np.empty(len(x))
    out[order] = np.repeat(avg, ends - starts)
    return out


def auc(label: np.ndarray, score: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney, ties count 1/2) of scores [n] for 0/1 labels [n]."""
    pos = label.astype(bool)
    n_pos = int(pos.sum())
    n_neg = len(label) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")  # generate() stores it as null
    r = ranks(np.asarray(score, dtype=np.float64))
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(label: np.ndarray, prob: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities [n] for 0/1 labels [n]."""
    p = np.clip(prob, 1e-15, 1 - 1e-15)
    return float(-np.mean(np.where(label.astype(bool), np.log(p), np.log1p(-p))))


def finite(x: float) -> float | None:
    """``x``, or None (JSON null) when it is NaN: a split too small to hold both labels."""
    return x if np.isfinite(x) else None
