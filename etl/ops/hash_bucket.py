"""HashBucket: categorical values to ``hash(value) % num_buckets`` with the stable hash of
``ctrflow.etl.hashing`` (the same bucket on CPU and GPU, across runs and versions). Nulls map to
the id ``num_buckets``, so the declared cardinality is ``num_buckets + 1``. On a list column each
element gets the bucket its value would get as a scalar (null elements ``num_buckets``).

Example:
    >>> cats = ["C1", "C2"] >> HashBucket(num_buckets=1000)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from ctrflow.etl import dispatch, lists
from ctrflow.etl.hashing import hash_values
from ctrflow.etl.ops.base import ColumnOp
from ctrflow.etl.schema import id_dtype


def bucket_ids(hashes: np.ndarray, num_buckets: int, null: np.ndarray | None) -> np.ndarray:
    ids = (hashes % np.uint64(num_buckets)).astype(np.int64)
    if null is not None:
        ids[null] = num_buckets
    return ids.astype(id_dtype(num_buckets + 1))


class HashBucket(ColumnOp):
    """Hash values into buckets.

    Args:
        num_buckets: buckets per column, or ``{column: buckets}``.
    """

    output_kind = "categorical"

    def __init__(self, num_buckets: int | dict[str, int]) -> None:
        values = num_buckets.values() if isinstance(num_buckets, dict) else [num_buckets]
        if any(int(v) < 1 for v in values):
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
        self.num_buckets = num_buckets

    def params(self) -> dict[str, Any]:
        return {"num_buckets": self.num_buckets}

    def _n(self, column: str) -> int:
        return int(self.num_buckets[column] if isinstance(self.num_buckets, dict) else self.num_buckets)

    def cardinality(self, column: str) -> int:
        return self._n(column) + 1

    def transform_column(self, name: str, series: Any) -> Any:
        if lists.is_list_series(series):  # element-wise: same bucket as the scalar value, offsets kept
            n = self._n(name)
            return lists.map_values(series, lambda flat: _bucket_flat(flat, n), pa.from_numpy_dtype(id_dtype(n + 1)),
                                    name)
        codes, uniques = dispatch.factorize(series)
        lut = np.append(bucket_ids(hash_values(uniques), self._n(name), None), self._n(name))
        return dispatch.series_like(series, lut[codes], name=name)


def _bucket_flat(flat: pa.Array, n: int) -> np.ndarray:
    """Buckets [M] of flat list elements [M] (hashing each distinct value once; nulls -> ``n``)."""
    codes, uniques = dispatch.factorize_arrow(flat)
    return np.append(bucket_ids(hash_values(uniques), n, None), n).astype(id_dtype(n + 1))[codes]
