"""QuantileBucketize: automatic discretisation into ``num_bins`` near-equal-frequency buckets.

Boundaries are the approximate ``1/K .. (K-1)/K`` quantiles of the fit data, from a mergeable
quantile sketch (rank error about 1/2048); repeated boundaries (heavy ties) are dropped, so a
column may get fewer buckets. Ids and the declared cardinality follow ``Bucketize``
(``len(boundaries) + 2``, nulls last).

Example:
    >>> cats = ["I1", "I2"] >> QuantileBucketize(num_bins=10)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ctrflow.etl import dispatch
from ctrflow.etl.ops.base import ColumnOp
from ctrflow.etl.ops.bucketize import digitize_with_nulls
from ctrflow.etl.stats import merge_columns, merge_sketch_stats, merge_sketches, sketch, sketch_quantiles, tree_reduce


class QuantileBucketize(ColumnOp):
    """Equal-frequency buckets.

    Args:
        num_bins: buckets per column (>= 2).
    """

    output_kind = "categorical"

    def __init__(self, num_bins: int = 10) -> None:
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}")
        self.num_bins = int(num_bins)
        self.stats: dict[str, Any] | None = None

    def params(self) -> dict[str, Any]:
        return {"num_bins": self.num_bins}

    def fit(self, columns: list[str], ddf: Any) -> Any:
        def chunk(df: Any) -> dict:
            return {c: sketch(np.asarray(dispatch.to_numpy(dispatch.to_float(df[c])))) for c in columns}

        return tree_reduce(ddf[columns], chunk, merge_columns(merge_sketches))

    def fit_finalize(self, computed: dict[str, Any]) -> None:
        qs = np.arange(1, self.num_bins) / self.num_bins
        self.stats = {}
        for c, sk in computed.items():
            b = sketch_quantiles(sk, qs)
            b = np.unique(b[np.isfinite(b)])
            self.stats[c] = {"boundaries": b.tolist(), "sketch": sk}

    def update_finalize(self, computed: dict[str, Any], decay: float | None = None) -> None:
        """Merge the sketches but keep the first fit's boundaries, so bucket ids keep their meaning."""
        for c, sk in merge_sketch_stats(self.stats, computed).items():
            self.stats[c] = {**self.stats[c], "sketch": sk}

    def cardinality(self, column: str) -> int | None:
        if self.stats is None or column not in self.stats:
            return None
        return len(self.stats[column]["boundaries"]) + 2

    def transform_column(self, name: str, series: Any) -> Any:
        return digitize_with_nulls(series, np.asarray(self.stats[name]["boundaries"], dtype=np.float64), name)
