"""NormalizeMinMax: scale continuous columns to [0, 1] with the fitted min and max.

Example:
    >>> cont = ["I1"] >> FillMissing() >> NormalizeMinMax()
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ctrflow.etl import dispatch
from ctrflow.etl.ops.base import ColumnOp
from ctrflow.etl.ops.normalize import fit_moments
from ctrflow.etl.stats import merge_moment_stats


class NormalizeMinMax(ColumnOp):
    """``(x - min) / (max - min)``; a constant column maps to 0."""

    output_kind = "continuous"

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, float]] | None = None

    def fit(self, columns: list[str], ddf: Any) -> Any:
        return fit_moments(columns, ddf)

    def fit_finalize(self, computed: dict[str, dict[str, float]]) -> None:
        self.stats = computed

    def update_finalize(self, computed: dict[str, dict[str, float]], decay: float | None = None) -> None:
        """Exact merge with the new data's moments and extremes."""
        self.stats = merge_moment_stats(self.stats, computed)

    def transform_column(self, name: str, series: Any) -> Any:
        m = self.stats[name]
        x = dispatch.to_float(series)
        if m["count"] == 0 or not m["max"] > m["min"]:
            y = x * 0.0  # constant or all-null column
        else:
            y = (x - m["min"]) / (m["max"] - m["min"])
        return dispatch.series_like(series, y.astype(np.float32), name=name)
