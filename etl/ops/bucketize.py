"""Bucketize: continuous values to bucket ids by fixed boundaries.

Ids follow ``numpy.digitize(x, boundaries, right=False)`` (NVTabular's Bucketize): values below
the first boundary -> 0, ``[b[i-1], b[i])`` -> i, at or above the last -> ``len(boundaries)``;
nulls -> ``len(boundaries) + 1``. The declared cardinality is ``len(boundaries) + 2``, so
``get_embedding_sizes`` covers bucketized columns (NVTabular 23.08 declares none and fails).

Example:
    >>> cats = ["I1"] >> Bucketize([0, 10, 100])   # ids 0..3, null -> 4, cardinality 5
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ctrflow.etl import dispatch
from ctrflow.etl.ops.base import ColumnOp


def digitize_with_nulls(series: Any, boundaries: np.ndarray, name: str) -> Any:
    """Bucket ids (int32) of a numeric Series; nulls get ``len(boundaries) + 1``."""
    x = dispatch.to_float(series)
    xp = dispatch.xp_of(x)
    b = xp.asarray(boundaries, dtype=xp.float64)
    ids = xp.searchsorted(b, x, side="right").astype(xp.int32)
    ids = xp.where(x != x, len(boundaries) + 1, ids).astype(xp.int32)
    return dispatch.series_like(series, ids, name=name)


class Bucketize(ColumnOp):
    """Bucket ids from boundaries.

    Args:
        boundaries: increasing cut points, one list for all columns or ``{column: list}``.
    """

    output_kind = "categorical"

    def __init__(self, boundaries: list[float] | dict[str, list[float]]) -> None:
        per_col = boundaries if isinstance(boundaries, dict) else {None: boundaries}
        for col, b in per_col.items():
            arr = np.asarray(b, dtype=np.float64)
            if arr.ndim != 1 or arr.size == 0 or np.any(np.diff(arr) <= 0):
                raise ValueError(f"Bucketize boundaries for {col or 'all columns'} must be a non-empty "
                                 f"strictly increasing list, got {b}")
        self.boundaries = boundaries

    def params(self) -> dict[str, Any]:
        return {"boundaries": self.boundaries}

    def _bounds(self, column: str) -> list[float]:
        if isinstance(self.boundaries, dict):
            if column not in self.boundaries:
                raise KeyError(f"Bucketize has no boundaries for column {column!r}")
            return self.boundaries[column]
        return self.boundaries

    def cardinality(self, column: str) -> int:
        return len(self._bounds(column)) + 2

    def transform_column(self, name: str, series: Any) -> Any:
        return digitize_with_nulls(series, np.asarray(self._bounds(name), dtype=np.float64), name)
