"""Normalize: standardise continuous columns to zero mean and unit variance.

``(x - mean) / std`` with the mean and sample std (ddof=1) of the non-null fit values; nulls stay
null. Stats merge exactly across partitions (parallel-variance formula).

Example:
    >>> cont = ["I1", "I2"] >> FillMissing() >> LogOp() >> Normalize()
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ctrflow.etl import dispatch
from ctrflow.etl.ops.base import ColumnOp
from ctrflow.etl.stats import merge_columns, merge_moment_stats, merge_moments, moments, std_from_moments, tree_reduce


def fit_moments(columns: list[str], ddf: Any) -> Any:
    """Lazy per-column moments (count, mean, M2, min, max) of a Dask DataFrame."""

    def chunk(df: Any) -> dict[str, dict[str, float]]:
        return {c: moments(np.asarray(dispatch.to_numpy(dispatch.to_float(df[c])))) for c in columns}

    return tree_reduce(ddf[columns], chunk, merge_columns(merge_moments))


class Normalize(ColumnOp):
    """Standardise each column with its fitted mean and std."""

    output_kind = "continuous"

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, float]] | None = None

    def fit(self, columns: list[str], ddf: Any) -> Any:
        return fit_moments(columns, ddf)

    def fit_finalize(self, computed: dict[str, dict[str, float]]) -> None:
        self.stats = {c: {**m, "std": std_from_moments(m)} for c, m in computed.items()}

    def update_finalize(self, computed: dict[str, dict[str, float]], decay: float | None = None) -> None:
        """Exact merge with the new data's moments (``decay`` applies to category counts only)."""
        self.fit_finalize(merge_moment_stats(self.stats, computed))

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
