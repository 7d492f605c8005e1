"""The operator contract (NVTabular's, kept).

A stateless op implements ``transform(columns, df)`` on one partition (pandas or cudf). A stat op
also implements ``fit(columns, ddf)`` returning lazy Dask objects and ``fit_finalize(computed)``
that stores plain JSON-safe stats (plus optional pyarrow tables, e.g. vocabularies). The workflow
computes the stats of one dependency level in a single ``dask.compute``. Every op declares its
output columns, their kind and dtype, and categorical outputs their cardinality.

Serving's fast path (``ctrflow.serve.fast_transform``) calls ``array_transform(columns)`` once, when a
predictor loads, and then the returned function on every request: the op's transform on host columns
(a ``pyarrow.Array`` where the pandas path holds an arrow-backed Series, a ``numpy.ndarray`` where it
holds a numpy-backed one), through the same functions ``transform`` uses, so the values are the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa

from ctrflow.etl import dispatch, lists
from ctrflow.etl.schema import embedding_dim, id_dtype

OP_REGISTRY: dict[str, type[Operator]] = {}


class OpNotFittedError(RuntimeError):
    """A stat op was used before ``Workflow.fit``."""


class Operator:
    """Base class of every ETL op.

    Subclasses set ``output_kind`` (``categorical`` | ``continuous`` | ``label`` | ``other``) and
    override ``transform``; stat ops override ``fit`` and ``fit_finalize`` too.
    """

    output_kind: ClassVar[str] = "continuous"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        OP_REGISTRY[cls.__name__] = cls

    # ---- graph building -------------------------------------------------------------------
    def __rrshift__(self, other: Any) -> Any:
        from ctrflow.etl.graph import as_node

        return as_node(other) >> self

    def output_column_names(self, columns: list[str]) -> list[str]:
        """Names of the columns this op outputs for the given input columns."""
        return list(columns)

    def source_column(self, column: str, inputs: list[str]) -> str | None:
        """For ops that only rename or reorder: the input column an output comes from.

        ``None`` (the default) means this op defines the output's kind and stats itself.
        """
        return None

    # ---- execution ------------------------------------------------------------------------
    def transform(self, columns: list[str], df: Any) -> Any:
        """Transform one partition.

        Args:
            columns: the op's input columns (all present in ``df``).
            df: a pandas or cudf DataFrame.

        Returns:
            A DataFrame of the same library holding exactly ``output_column_names(columns)``.
        """
        raise NotImplementedError

    @property
    def elementwise(self) -> bool:
        """True when the op maps each float64 input column to one output column of the same name
        through :meth:`transform_array`; the workflow then fuses chains of such ops into one pass
        per column on a plain array (no Series, no intermediate arrays)."""
        return False

    def transform_array(self, column: str, x: Any) -> Any:
        """Transform one column held as a float64 array [N] (NaN = null) that the caller owns.

        Args:
            column: the column's name (its stats key).
            x: float64 numpy / cupy array [N]; may be overwritten (``out=x``).

        Returns:
            The output array [N] (``x`` itself or a new array).
        """
        raise NotImplementedError

    def array_transform(self, columns: list[str]) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
        """This op's :meth:`transform` planned once for ``columns``, on host arrays (serving's fast path).

        Args:
            columns: the op's input columns.

        Returns:
            ``fn({column: array}) -> {output column: array}`` (arrays as the module docstring says; any
            lookup tables built now, not per call), equal to :meth:`transform`'s columns; ``None`` when
            the op has none (the caller then runs :meth:`transform` on a frame).
        """
        return None

    def null_fill(self, column: str) -> float | None:
        """For an elementwise op that only replaces nulls / NaN: the value it puts there (else None).

        The workflow then fills an integer column's nulls while converting it to float and skips
        the op's NaN scan (integers hold no NaN)."""
        return None

    @property
    def is_stat(self) -> bool:
        """True when the op must be fitted before it can transform."""
        return type(self).fit is not Operator.fit

    def fit(self, columns: list[str], ddf: Any) -> Any:
        """Lazy Dask objects whose computed values ``fit_finalize`` turns into stats."""
        return None

    def fit_finalize(self, computed: Any) -> None:
        """Store the computed stats (JSON-safe) on the op."""

    def update_finalize(self, computed: Any, decay: float | None = None) -> None:
        """Merge what ``fit`` computed on new data into the fitted stats (``Workflow.update``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be updated incrementally: refit the workflow")

    @property
    def fitted(self) -> bool:
        """Stat ops keep their fitted stats in ``self.stats`` (``None`` until fitted)."""
        return not self.is_stat or getattr(self, "stats", None) is not None

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise OpNotFittedError(f"{type(self).__name__} is not fitted: call Workflow.fit(dataset) first")

    # ---- schema ---------------------------------------------------------------------------
    def cardinality(self, column: str) -> int | None:
        """Number of distinct ids of a categorical output column (incl. the reserved ids)."""
        return None

    def column_info(self, column: str) -> dict[str, Any]:
        """Kind, dtype and (for categoricals) cardinality and embedding dim of an output column."""
        if self.output_kind == "categorical":
            card = self.cardinality(column)
            if card is None:
                raise OpNotFittedError(f"{type(self).__name__} has no cardinality for {column!r}: fit it first")
            return {
                "kind": "categorical",
                "dtype": id_dtype(card),
                "cardinality": int(card),
                "embedding_dim": self._pinned_dim(column) or embedding_dim(card),
            }
        if self.output_kind == "label":
            return {"kind": "label", "dtype": "float32"}
        if self.output_kind == "continuous":
            return {"kind": "continuous", "dtype": "float32"}
        return {"kind": "other", "dtype": None}

    def _pinned_dim(self, column: str) -> int | None:
        """The embedding dim ``Workflow.update`` fixed at the first fit's (so checkpoints keep fitting)."""
        stats = getattr(self, "stats", None)
        col = stats.get(column) if isinstance(stats, dict) else None
        return col.get("embedding_dim") if isinstance(col, dict) else None

    # ---- persistence ----------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """Constructor arguments (JSON-safe) that rebuild this op."""
        return {}

    def get_state(self) -> tuple[dict[str, Any], dict[str, pa.Table]]:
        """Fitted stats: a JSON-safe dict and named pyarrow tables (saved as parquet)."""
        stats = getattr(self, "stats", None)
        return ({"stats": stats} if stats is not None else {}), {}

    def set_state(self, state: dict[str, Any], tables: dict[str, pa.Table]) -> None:
        """Restore what ``get_state`` returned."""
        if "stats" in state:
            self.stats = state["stats"]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def op_to_dict(op: Operator) -> dict[str, Any]:
    return {"class": type(op).__name__, "params": op.params()}


def op_from_dict(d: dict[str, Any]) -> Operator:
    cls = OP_REGISTRY.get(d["class"])
    if cls is None:
        raise ValueError(f"unknown op {d['class']!r} in saved workflow (written by a newer ctrflow?)")
    return cls(**d["params"])


class ColumnOp(Operator):
    """An op applied to each input column independently (``transform_column``)."""

    def transform_column(self, name: str, series: Any) -> Any:
        raise NotImplementedError

    def transform(self, columns: list[str], df: Any) -> Any:
        self._require_fitted()
        out = {c: self.transform_column(c, df[c]) for c in columns}
        return dispatch.frame_from_columns(df, out)

    def array_transform(self, columns: list[str]) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """``transform_column`` itself on each column held as a Series view of the array (no frame)."""
        self._require_fitted()
        return lambda arrays: {c: host_values(self.transform_column(c, host_series(arrays[c], c))) for c in columns}


class ListReshapeOp(Operator):
    """An op that reshapes list columns (``_reshape`` of each one's arrow list array); scalar columns
    pass through unchanged (e.g. the candidate of a joint Categorify). Kind and stats come from upstream."""

    output_kind = "other"

    def _reshape(self, arr: pa.Array) -> pa.Array:
        raise NotImplementedError

    def source_column(self, column: str, inputs: list[str]) -> str | None:
        return column  # a reshape: kind and stats come from upstream

    def transform(self, columns: list[str], df: Any) -> Any:
        out = {}
        for c in columns:
            series = df[c]
            out[c] = lists.series_from_list(series, self._reshape(lists.list_array(series)), c) \
                if lists.is_list_series(series) else series
        return dispatch.frame_from_columns(df, out)

    def array_transform(self, columns: list[str]) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def one(values: Any) -> Any:
            listed = lists.is_list_type(values.type) if isinstance(values, pa.Array) else \
                isinstance(values, pd.Series) and lists.is_list_series(values)
            return self._reshape(lists.list_array(values)) if listed else values

        return lambda arrays: {c: one(arrays[c]) for c in columns}


def elementwise_chain(ops: list[Operator], column: str, series: Any) -> Any:
    """One column through a chain of elementwise ops (``FillMissing >> Clip >> LogOp >> Normalize``) in
    one pass on one float64 array, each op writing in place: the workflow's fused evaluation, offline and online.

    Args:
        ops: the chain, first op first (each ``elementwise``).
        column: the column's name (the ops' stats key).
        series: its values (pandas / cudf Series).

    Returns:
        The output array [N] (numpy or cupy).
    """
    x, filled = dispatch.float_work_filled(series, ops[0].null_fill(column))  # FillMissing done here
    for op in ops[1:] if filled else ops:
        x = op.transform_array(column, x if x.dtype == "float64" else x.astype("float64"))
    return x


# ---- host columns (serving's fast path): arrays <-> the Series the pandas path holds ----------------
def host_series(values: Any, name: str | None = None) -> pd.Series:
    """A pandas Series viewing a host column (no copy): arrow arrays arrow-backed, numpy arrays numpy-backed."""
    if isinstance(values, pa.Array):
        return pd.Series(pd.arrays.ArrowExtensionArray(values), name=name, copy=False)
    if isinstance(values, pd.Series):
        return values if values.name == name else values.rename(name)
    return pd.Series(values, name=name, copy=False)


def host_values(series: Any) -> Any:
    """The array behind a Series (inverse of :func:`host_series`): a pyarrow Array for an arrow-backed
    Series, numpy for a numpy-backed one; any other Series (e.g. a masked dtype) stays as it is."""
    if isinstance(series, (np.ndarray, pa.Array)):
        return series
    if isinstance(series.dtype, pd.ArrowDtype):
        return dispatch.to_arrow(series)
    if isinstance(series.dtype, np.dtype):
        return series.to_numpy()
    return series


def host_arrow(values: Any) -> pa.Array:
    """A host column as an arrow array, as ``dispatch.to_arrow`` sees its Series (numpy NaN -> null)."""
    if isinstance(values, pa.Array):
        return values
    if isinstance(values, np.ndarray):
        return pa.Array.from_pandas(values)
    return dispatch.to_arrow(values)
