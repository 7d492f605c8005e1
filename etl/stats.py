"""Mergeable statistics: per-partition partials combined by a Dask tree reduction.

Every stat op reduces partitions with a ``chunk`` function and merges partials pairwise with a
``merge`` function, so no worker ever holds more than ``split_every`` partials and no column is
gathered whole. The same merges let ``Workflow.update`` fold new data into fitted stats.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import dask
import numpy as np


def tree_reduce(ddf: Any, chunk: Callable[[Any], Any], merge: Callable[[list[Any]], Any], split_every: int = 8):
    """A lazy tree reduction over the partitions of a Dask DataFrame.

    Args:
        ddf: the Dask DataFrame (its partitions are pandas or cudf frames).
        chunk: partition -> partial result.
        merge: [partial, ...] -> partial (up to ``split_every`` at a time); associative.
        split_every: fan-in of each merge level.

    Returns:
        A ``dask.delayed`` object; compute it (with the level's other stats) for the final partial.
    """
    # optimize_graph=False keeps the partitions' keys, so stats computed together share one read.
    parts = [dask.delayed(chunk)(p) for p in ddf.to_delayed(optimize_graph=False)]
    while len(parts) > 1:
        parts = [dask.delayed(merge)(parts[i : i + split_every]) for i in range(0, len(parts), split_every)]
    return parts[0]


def merge_columns(pairwise: Callable[[Any, Any], Any]) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """A list merge of ``{column: partial}`` dicts from a pairwise merge of partials."""

    def merge(partials: list[dict[str, Any]]) -> dict[str, Any]:
        return {c: functools.reduce(pairwise, [p[c] for p in partials]) for c in partials[0]}

    return merge


# ---- moments: count, mean, M2, min, max (Chan et al.'s parallel variance) ----------------------
def moments(values: np.ndarray) -> dict[str, float]:
    """Moments of the non-NaN entries of a 1-D float array."""
    nan = np.isnan(values)
    v = values[~nan] if nan.any() else values  # no copy when nothing is missing (e.g. after FillMissing)
    if v.size == 0:
        return {"count": 0, "mean": 0.0, "m2": 0.0, "min": None, "max": None}  # None, not inf: strict JSON
    mean = float(v.mean())
    d = v - mean
    d *= d  # the same arithmetic as ((v - mean) ** 2), one temporary
    return {
        "count": int(v.size),
        "mean": mean,
        "m2": float(d.sum()),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def merge_moments(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Exact merge of two ``moments`` results (parallel-variance formula)."""
    na, nb = a["count"], b["count"]
    if na == 0:
        return dict(b)
    if nb == 0:
        return dict(a)
    n = na + nb
    delta = b["mean"] - a["mean"]
    return {
        "count": n,
        "mean": a["mean"] + delta * nb / n,
        "m2": a["m2"] + b["m2"] + delta * delta * na * nb / n,
        "min": min(a["min"], b["min"]),
        "max": max(a["max"], b["max"]),
    }


def merge_moment_stats(old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-column exact merge of fitted moments (count, mean, m2, min, max) with new ones (``Workflow.update``)."""
    keys = ("count", "mean", "m2", "min", "max")
    return {c: merge_moments({k: old[c][k] for k in keys}, new[c]) for c in new}


def std_from_moments(m: dict[str, float]) -> float:
    """Sample standard deviation (ddof=1, as pandas and Dask compute it)."""
    return float(np.sqrt(m["m2"] / (m["count"] - 1))) if m["count"] > 1 else 0.0


# ---- quantile sketch ---------------------------------------------------------------------------
SKETCH_SIZE = 2048


def sketch(values: np.ndarray, size: int = SKETCH_SIZE) -> dict[str, list[float]]:
    """A weighted-sample quantile sketch of the non-NaN entries (rank error about 1/size).

    Returns:
        ``{"values": sorted [<=size], "weights": [<=size]}`` (JSON-safe lists).
    """
    v = np.sort(values[~np.isnan(values)])
    return _compress(v, np.ones_like(v), size)


def merge_sketches(a: dict[str, list[float]], b: dict[str, list[float]], size: int = SKETCH_SIZE):
    """Merge two sketches into one of at most ``size`` points (weights add up)."""
    v = np.concatenate([a["values"], b["values"]]).astype(np.float64)
    w = np.concatenate([a["weights"], b["weights"]]).astype(np.float64)
    order = np.argsort(v, kind="stable")
    return _compress(v[order], w[order], size)


def merge_sketch_stats(old: dict[str, dict[str, Any]], new: dict[str, Any]) -> dict[str, Any]:
    """Per-column merge of fitted quantile sketches (``old[c]["sketch"]``) with new ones (``Workflow.update``)."""
    return {c: merge_sketches(old[c]["sketch"], sk) for c, sk in new.items()}


def _compress(v: np.ndarray, w: np.ndarray, size: int) -> dict[str, list[float]]:
    if v.size <= size:
        return {"values": v.tolist(), "weights": w.tolist()}
    # Keep the value at the middle of each of `size` equal-weight slices of the distribution.
    cum = np.cumsum(w)
    total = cum[-1]
    targets = (np.arange(size) + 0.5) * total / size
    idx = np.searchsorted(cum, targets)
    return {"values": v[idx].tolist(), "weights": np.full(size, total / size).tolist()}


def sketch_quantiles(sk: dict[str, list[float]], qs: np.ndarray) -> np.ndarray:
    """Approximate quantiles ``qs`` (in [0, 1]) of the sketched distribution."""
    v = np.asarray(sk["values"], dtype=np.float64)
    w = np.asarray(sk["weights"], dtype=np.float64)
    if v.size == 0:
        return np.full(len(qs), np.nan)
    cum = np.cumsum(w) - 0.5 * w
    return np.interp(np.asarray(qs) * w.sum(), cum, v)
