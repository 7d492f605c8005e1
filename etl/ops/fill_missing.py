"""FillMissing: replace nulls with a constant or the fitted median, optionally flagging them.

Example:
    >>> cont = ["I1", "I2"] >> FillMissing(fill_val="median", add_binary_cols=True)
    >>> # outputs I1, I2, I1_filled, I2_filled (1.0 where the value was missing)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ctrflow.etl import dispatch
from ctrflow.etl.ops.base import Operator, host_series
from ctrflow.etl.stats import merge_columns, merge_sketch_stats, merge_sketches, sketch, sketch_quantiles, tree_reduce


class FillMissing(Operator):
    """Fill nulls.

    Args:
        fill_val: a number, or ``"median"`` (approximate median of the fit data, from a mergeable
            quantile sketch).
        add_binary_cols: also output ``<col>_filled`` (1.0 where the value was null).
    """

    output_kind = "continuous"

    def __init__(self, fill_val: float | str = 0, add_binary_cols: bool = False) -> None:
        if isinstance(fill_val, str) and fill_val != "median":
            raise ValueError(f"fill_val must be a number or 'median', got {fill_val!r}")
        self.fill_val = fill_val
        self.add_binary_cols = add_binary_cols
        self.stats: dict[str, Any] | None = None

    def params(self) -> dict[str, Any]:
        return {"fill_val": self.fill_val, "add_binary_cols": self.add_binary_cols}

    @property
    def is_stat(self) -> bool:
        return self.fill_val == "median"

    def output_column_names(self, columns: list[str]) -> list[str]:
        extra = [f"{c}_filled" for c in columns] if self.add_binary_cols else []
        return list(columns) + extra

    def fit(self, columns: list[str], ddf: Any) -> Any:
        def chunk(df: Any) -> dict:
            return {c: sketch(np.asarray(dispatch.to_numpy(dispatch.to_float(df[c])))) for c in columns}

        return tree_reduce(ddf[columns], chunk, merge_columns(merge_sketches))

    def fit_finalize(self, computed: dict[str, Any]) -> None:
        self.stats = {c: {"median": float(np.nan_to_num(sketch_quantiles(sk, [0.5])[0])), "sketch": sk}
                      for c, sk in computed.items()}

    def update_finalize(self, computed: dict[str, Any], decay: float | None = None) -> None:
        """Merge the new data's sketches into the fitted ones; the median is read from the merge."""
        self.fit_finalize(merge_sketch_stats(self.stats, computed))

    @property
    def elementwise(self) -> bool:
        return not self.add_binary_cols  # the flag columns make it more than a column-to-column map

    def _fill(self, column: str) -> float:
        return self.stats[column]["median"] if self.fill_val == "median" else float(self.fill_val)

    def null_fill(self, column: str) -> float | None:
        return self._fill(column)

    def transform_array(self, column: str, x: Any) -> Any:
        x[x != x] = self._fill(column)  # NaN test that works for numpy and cupy
        return x

    def _filled(self, column: str, series: Any) -> tuple[Any, Any]:
        """The column's values with nulls filled [N] float64, and its flags [N] float32 (None without them)."""
        x = dispatch.float_work(series)
        missing = x != x
        x[missing] = self._fill(column)
        return x, (missing.astype(np.float32) if self.add_binary_cols else None)

    def transform(self, columns: list[str], df: Any) -> Any:
        self._require_fitted()
        out, flags = {}, {}
        for c in columns:
            series = df[c]
            x, flag = self._filled(c, series)
            out[c] = dispatch.series_like(series, x, name=c)
            if flag is not None:
                flags[f"{c}_filled"] = dispatch.series_like(series, flag, name=f"{c}_filled")
        return dispatch.frame_from_columns(df, {**out, **flags})

    def array_transform(self, columns: list[str]) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """:meth:`transform` on host columns (serving; the workflow runs an elementwise one as a chain)."""
        self._require_fitted()

        def run(arrays: dict[str, Any]) -> dict[str, Any]:
            out, flags = {}, {}
            for c in columns:
                out[c], flag = self._filled(c, host_series(arrays[c], c))
                if flag is not None:
                    flags[f"{c}_filled"] = flag
            return {**out, **flags}

        return run
