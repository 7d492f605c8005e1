"""HashedCross: one feature from the combination of several columns' values.

The row's id is ``combine_hashes([hash(c1), hash(c2), ...]) % num_buckets`` with the stable hash
of ``ctrflow.etl.hashing`` (a null hashes as its own value, so crosses with nulls are kept).
Output column: the input names joined by ``_X_`` (``C1_X_C2``); cardinality ``num_buckets``.
One input may be a list column: each element is crossed with its row's other values, giving a list
of the same lengths (element ``e`` of row ``r`` gets the id the scalar row ``(e, r's values)`` gets).

Example:
    >>> cross = ["C1", "C2"] >> HashedCross(num_buckets=100_000)   # outputs C1_X_C2
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from ctrflow.etl import dispatch, lists
from ctrflow.etl.hashing import combine_hashes, hash_values, null_hash
from ctrflow.etl.ops.base import Operator, host_arrow
from ctrflow.etl.schema import id_dtype


class HashedCross(Operator):
    """Cross columns by hashing their values together.

    Args:
        num_buckets: ids of the crossed feature.
        columns: optional explicit list of the columns to cross (default: all input columns).
    """

    output_kind = "categorical"

    def __init__(self, num_buckets: int, columns: list[str] | None = None) -> None:
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
        self.num_buckets = int(num_buckets)
        self.columns = list(columns) if columns else None

    def params(self) -> dict[str, Any]:
        return {"num_buckets": self.num_buckets, "columns": self.columns}

    def _inputs(self, columns: list[str]) -> list[str]:
        cols = self.columns or columns
        if len(cols) < 2:
            raise ValueError(f"HashedCross needs at least two columns, got {cols}")
        return cols

    def output_column_names(self, columns: list[str]) -> list[str]:
        return ["_X_".join(self._inputs(columns))]

    def cardinality(self, column: str) -> int:
        return self.num_buckets

    def _cross(self, cols: list[str], listed: dict[str, pa.Array], factorize: Callable[[str], tuple]
               ) -> tuple[np.ndarray, np.ndarray | None]:
        """Ids of the crossed feature: [N] for scalar columns, or [M] flat ids and offsets [N + 1] when one
        input is a list column (``listed``: its arrow list array). ``factorize(c)``: a scalar column's
        ``(codes, uniques)``."""
        if len(listed) > 1:
            raise ValueError(f"HashedCross crosses at most one list column with scalars, got lists {list(listed)}")
        offsets = row = flat = None
        if listed:  # each element crossed with its row's scalar values: a list output, same lengths
            offsets, flat = lists.flatten(next(iter(listed.values())))
            row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        hashes = []
        for c in cols:
            codes, uniques = dispatch.factorize_arrow(flat) if c in listed else factorize(c)
            lut = np.append(hash_values(uniques), null_hash())
            hashes.append(lut[codes] if row is None or c in listed else lut[codes][row])
        return (combine_hashes(hashes) % np.uint64(self.num_buckets)).astype(id_dtype(self.num_buckets)), offsets

    def transform(self, columns: list[str], df: Any) -> Any:
        cols = self._inputs(columns)
        listed = {c: lists.list_array(df[c]) for c in cols if lists.is_list_series(df[c])}
        ids, offsets = self._cross(cols, listed, lambda c: dispatch.factorize(df[c]))
        name = self.output_column_names(columns)[0]
        if listed:
            arr = lists.from_flat(offsets, ids, pa.from_numpy_dtype(ids.dtype))
            like = df[next(iter(listed))]
            return dispatch.frame_from_columns(df, {name: lists.series_from_list(like, arr, name)})
        return dispatch.frame_from_columns(df, {name: dispatch.series_like(df[cols[0]], ids, name=name)})

    def array_transform(self, columns: list[str]) -> Callable[[dict[str, Any]], dict[str, Any]]:
        cols, name = self._inputs(columns), self.output_column_names(columns)[0]

        def run(arrays: dict[str, Any]) -> dict[str, Any]:
            values = {c: host_arrow(arrays[c]) for c in cols}
            listed = {c: lists.list_array(v) for c, v in values.items() if lists.is_list_type(v.type)}
            ids, offsets = self._cross(cols, listed, lambda c: dispatch.factorize_arrow(values[c]))
            return {name: lists.from_flat(offsets, ids, pa.from_numpy_dtype(ids.dtype)) if listed else ids}

        return run
