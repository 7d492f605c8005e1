"""Normalize: standardise continuous columns to zero mean and unit variance.

``(x - mean) / std`` with the mean and sample std (ddof=1) of the non-null fit values; nulls stay
null. Stats merge exactly across partitions (parallel-variance formula).

The same fit pass also sketches each column's distribution (a mergeable quantile sketch of a bounded
sample per partition, see :func:`fit_moments_and_sketch`), from which the op records ``QUANTILES + 1``
quantile edges of its **output** (``schema.json``'s ``"quantiles"``: exact min, the approximate
``1/K .. (K-1)/K`` quantiles, exact max, mapped through this op's own transform, de-duplicated and
strictly increasing). ``ctrflow.models.numeric`` builds piecewise-linear encodings from them.

Example:
    >>> cont = ["I1", "I2"] >> FillMissing() >> LogOp() >> Normalize()
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ctrflow.etl import dispatch
from ctrflow.etl.ops.base import ColumnOp
from ctrflow.etl.stats import (
    merge_columns,
    merge_moment_stats,
    merge_moments,
    merge_sketches,
    moments,
    sketch,
    sketch_quantiles,
    std_from_moments,
    tree_reduce,
)

QUANTILES = 32  # K: output quantile bins recorded per column (K + 1 edges before de-duplication)
SAMPLE_ROWS = 1 << 15  # values per partition fed to the sketch (rank error about 0.5/sqrt(sampled rows))
SKETCH_POINTS = 512  # points kept per column (rank error about 1/1024; saved in workflow.json for --update)


def fit_moments(columns: list[str], ddf: Any) -> Any:
    """Lazy per-column moments (count, mean, M2, min, max) of a Dask DataFrame."""

    def chunk(df: Any) -> dict[str, dict[str, float]]:
        return {c: moments(np.asarray(dispatch.to_numpy(dispatch.to_float(df[c])))) for c in columns}

    return tree_reduce(ddf[columns], chunk, merge_columns(merge_moments))


def sample_sketch(values: np.ndarray, rows: int = SAMPLE_ROWS) -> dict[str, list[float]]:
    """A quantile sketch (``ctrflow.etl.stats.sketch``'s format) of at most ``rows`` sampled non-NaN values.

    Args:
        values: float array [N] (NaN = null, ignored).
        rows: sample size; with N <= rows every value is used (the sketch is then that of ``values``).

    Returns:
        ``{"values": sorted [<=SKETCH_POINTS], "weights": [<=SKETCH_POINTS]}``; the sampled values weigh
        N_valid in all, so merged sketches weigh partitions by their row counts. The sample is seeded by N,
        so a run is deterministic.
    """
    if values.size <= rows:
        return sketch(values, SKETCH_POINTS)
    valid = values.size - int(np.count_nonzero(np.isnan(values)))
    picked = values[np.random.default_rng(values.size).integers(0, values.size, rows)]
    sk = sketch(picked, SKETCH_POINTS)  # drops the sampled NaNs
    total = sum(sk["weights"])
    scale = valid / total if total else 0.0
    sk["weights"] = [w * scale for w in sk["weights"]]
    return sk


def fit_moments_and_sketch(columns: list[str], ddf: Any) -> Any:
    """Lazy per-column ``{"moments": ..., "sketch": ...}`` in one pass (one conversion per column and partition)."""

    def chunk(df: Any) -> dict[str, dict[str, Any]]:
        out = {}
        for c in columns:
            x = np.asarray(dispatch.to_numpy(dispatch.to_float(df[c])))
            out[c] = {"moments": moments(x), "sketch": sample_sketch(x)}
        return out

    def pair(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return {"moments": merge_moments(a["moments"], b["moments"]),
                "sketch": merge_sketches(a["sketch"], b["sketch"], SKETCH_POINTS)}

    return tree_reduce(ddf[columns], chunk, merge_columns(pair))


class Normalize(ColumnOp):
    """Standardise each column with its fitted mean and std (and record its output quantiles)."""

    output_kind = "continuous"

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, Any]] | None = None

    def fit(self, columns: list[str], ddf: Any) -> Any:
        return fit_moments_and_sketch(columns, ddf)

    def fit_finalize(self, computed: dict[str, dict[str, Any]]) -> None:
        self.stats = {}
        for c, part in computed.items():
            m = part["moments"]
            self.stats[c] = {**m, "std": std_from_moments(m), "sketch": part["sketch"]}
            self.stats[c]["quantiles"] = self._quantiles(c)

    def update_finalize(self, computed: dict[str, dict[str, Any]], decay: float | None = None) -> None:
        """Exact merge of the moments; the sketches merge too (``decay`` applies to category counts only).

        The output quantiles are re-read from the merged sketch through the updated mean and std, so they
        describe every day seen so far. A workflow saved before quantiles existed has no sketch to merge:
        its columns keep no quantiles (refit to get them).
        """
        merged = merge_moment_stats(self.stats, {c: p["moments"] for c, p in computed.items()})
        for c, m in merged.items():
            old = self.stats[c].get("sketch")
            self.stats[c] = {**m, "std": std_from_moments(m)}
            if old is not None:
                self.stats[c]["sketch"] = merge_sketches(old, computed[c]["sketch"], SKETCH_POINTS)
                self.stats[c]["quantiles"] = self._quantiles(c)

    def _quantiles(self, column: str) -> list[float]:
        """The column's output quantile edges: strictly increasing float32 values ([] for an all-null column)."""
        m = self.stats[column]
        if not m["count"]:
            return []
        inner = sketch_quantiles(m["sketch"], np.arange(1, QUANTILES) / QUANTILES)
        q = np.clip(np.concatenate([[m["min"]], inner, [m["max"]]]), m["min"], m["max"])
        out = self.transform_array(column, q.astype(np.float64))  # the same arithmetic as the data's transform
        return np.unique(out[np.isfinite(out)]).tolist()

    def column_info(self, column: str) -> dict[str, Any]:
        """As ``Operator.column_info``, plus ``quantiles`` (the output's quantile edges) once fitted."""
        info = super().column_info(column)
        q = (self.stats or {}).get(column, {}).get("quantiles")
        if q is not None:
            info["quantiles"] = q
        return info

    @property
    def elementwise(self) -> bool:
        return True

    def transform_array(self, column: str, x: Any) -> Any:
        m = self.stats[column]
        std = m["std"] if m["std"] > 0 else 1.0
        x -= m["mean"]
        x /= std  # in place: the same float64 rounding as (x - mean) / std
        return x.astype(np.float32)

    def transform_column(self, name: str, series: Any) -> Any:
        return dispatch.series_like(series, self.transform_array(name, dispatch.float_work(series)), name=name)
