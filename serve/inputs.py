"""Raw request rows -> the frame the fitted workflow expects, with errors that name the field.

Training read its input through ``ctrflow.etl.readers`` (arrow-backed pandas: strings as
``dictionary<int32, string>``, integers int64, floats float64). Serving builds exactly that frame from
JSON rows or a user's DataFrame, parsing each column to the type the workflow was fitted on
(``Workflow.input_dtypes``), so the same ops see the same types: ids, hashes and statistics match.

Example:
    >>> import pyarrow as pa
    >>> frame_from_records([{"c": 7, "x": "1.5"}], {"c": pa.string(), "x": pa.float64()})["c"].tolist()
    ['7']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ctrflow.etl.lists import is_list_type
from ctrflow.etl.readers import normalize_arrow
from ctrflow.serve.list_inputs import check_weights, list_column_array, list_from_arrow, weight_pairs
from ctrflow.serve.values import ServeError, coerce, is_utf8, what

__all__ = ["ServeError", "arrow_type", "column_array", "columns_from_pandas", "columns_from_records",
           "concat_columns", "frame_from_records", "num_rows", "to_frame"]


def arrow_type(dtype: str) -> pa.DataType | None:
    """The arrow type requests are parsed to from a recorded input dtype (``None``: infer).

    Strings (``dictionary<values=string ...>``, ``string``, ``object``, ``category``) -> string,
    integers -> int64, floats and booleans -> float64 (what ``readers.normalize_arrow`` stores);
    list dtypes -> ``list<`` that rule applied to the element ``>``.
    """
    d = dtype.lower()
    if d.startswith(("list<", "large_list<")) and ">" in d:  # "list<item: int64>[pyarrow]" -> list<int64>
        inner = d[d.index("<") + 1 : d.rindex(">")]
        elem = arrow_type((inner.split(":", 1)[1] if ":" in inner else inner).strip())
        return pa.list_(elem or pa.float64())
    if any(k in d for k in ("string", "object", "category", "str", "utf8")):
        return pa.string()
    if "int" in d:
        return pa.int64()
    if any(k in d for k in ("double", "float", "bool")):
        return pa.float64()
    return None


def column_array(col: str, values: Sequence[Any], target: pa.DataType | None, sep: str | None = None) -> pa.Array:
    """One column of Python values as an arrow array of ``target``, validated.

    A fast path hands clean columns to arrow in one call; anything it rejects (or may have let through:
    booleans, infinities) goes value by value so the error names the row. List targets: see
    :func:`ctrflow.serve.list_inputs.list_column_array` (``sep``: the ETL's split separator).
    """
    if target is not None and is_list_type(target):
        return list_column_array(col, values, target, sep)
    if target is not None:
        arr = _inferred(values, target)
        if arr is not None:
            return arr
    kinds = set(map(type, values))  # one C-level pass; the checks below are then set operations
    if target is None:
        fast = False
    elif pa.types.is_string(target):
        fast = kinds <= _STR_KINDS
    elif pa.types.is_integer(target):  # arrow would truncate 2.5 to 2 silently
        fast = kinds <= _INT_KINDS
    else:  # arrow would take booleans as 0 / 1 and refuses numeric strings: both go the slow way
        fast = not kinds & _NOT_FLOAT_KINDS
    try:
        if fast:
            arr = pa.array(values, type=target, from_pandas=True)
            if not pa.types.is_floating(target) or not pc.any(pc.is_inf(arr)).as_py():
                return arr
        elif pa.types.is_integer(target) and kinds <= _NUMBER_KINDS:
            arr = _integral_floats(values, target)  # 3.0 for 3: what JSON encoders write for a float column
            if arr is not None:
                return arr
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, UnicodeError):
        pass
    coerced = [coerce(col, i, v, target) for i, v in enumerate(values)]
    try:
        return pa.array(coerced, type=target, from_pandas=True)
    except UnicodeError:  # a lone surrogate ("\ud800") decodes from JSON but is no UTF-8 text
        i = next((i for i, v in enumerate(coerced) if isinstance(v, str) and not is_utf8(v)), 0)
        raise ServeError(f"column {col!r} row {i}: the string is not valid Unicode text", col) from None
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:  # e.g. mixed kinds with no recorded type
        raise ServeError(f"column {col!r}: values of mixed or unsupported types ({e})", col) from None


def _inferred(values: Sequence[Any], target: pa.DataType) -> pa.Array | None:
    """Clean values as ``target`` through one arrow conversion with type inference; None: the checked
    path (:func:`column_array`'s) decides, and words the error.

    Arrow's inference is the type check (it refuses bytes as strings, bools among ints, mixed kinds) and,
    for Python floats, about twice as fast as its conversion to a given float type. Only bools among floats
    pass it unnoticed (``[1.0, True]`` -> double), so a double column is checked for them, and for infinities.
    """
    try:
        arr = pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, UnicodeError):
        return None
    kind = arr.type
    if pa.types.is_null(kind):  # every value missing
        return pa.nulls(len(arr), target)
    if pa.types.is_string(target) or not (pa.types.is_integer(target) or pa.types.is_floating(target)):
        return arr if kind == target else None
    if pa.types.is_floating(kind):
        if bool in set(map(type, values)):
            return None
        if pa.types.is_integer(target):  # every value is exact here (inference refuses an int it would round),
            try:  # so arrow's safe cast is the whole check: it refuses 2.5, inf and what int64 cannot hold
                return arr.cast(target)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                return None
        return arr if kind == target and not pc.any(pc.is_inf(arr)).as_py() else None
    if kind == target:  # int64: arrow's integer inference refuses bools
        return arr
    if pa.types.is_integer(kind) and pa.types.is_floating(target):
        bounds = pc.min_max(arr)
        if max(-bounds["min"].as_py(), bounds["max"].as_py()) < 2**53:  # exact in float64
            return arr.cast(target)
    return None


def _integral_floats(values: Sequence[Any], target: pa.DataType) -> pa.Array | None:
    """Ints and integral floats as ``target``; None when a value is not an integer.

    Within ±2**53 every integer is exact in float64, so one conversion to float64 and arrow's safe cast
    (which refuses 2.5, inf) do it: ~8x faster than arrow's int conversion of Python floats. Larger
    values take that conversion (big ints stay exact), the floats checked for integrality first."""
    as_float = pa.array(values, type=pa.float64(), from_pandas=True)
    bounds = pc.min_max(as_float)
    lo, hi = bounds["min"].as_py(), bounds["max"].as_py()
    if lo is None or max(-lo, hi) < 2.0**53:
        try:
            return as_float.cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return None
    if pc.all(pc.equal(pc.floor(as_float), as_float)).as_py() is False:  # 2.5 would truncate to 2
        return None
    return pa.array(values, type=target, from_pandas=True)


def to_frame(arrays: Mapping[str, pa.Array]) -> pd.DataFrame:
    """Arrow columns -> the arrow-backed pandas frame ``ctrflow.etl.readers`` gives the workflow."""
    table = pa.Table.from_arrays(list(arrays.values()), names=list(arrays))
    return normalize_arrow(table).to_pandas(types_mapper=pd.ArrowDtype, split_blocks=True)


def frame_from_records(rows: Any, types: Mapping[str, pa.DataType | None], field: str = "rows",
                       fill: Mapping[str, Any] | None = None, separators: Mapping[str, str] | None = None
                       ) -> pd.DataFrame:
    """``to_frame(columns_from_records(...))``: validated JSON-style rows as the raw input frame."""
    return to_frame(columns_from_records(rows, types, field, fill, separators))


def columns_from_records(rows: Any, types: Mapping[str, pa.DataType | None], field: str = "rows",
                         fill: Mapping[str, Any] | None = None, separators: Mapping[str, str] | None = None
                         ) -> dict[str, pa.Array]:
    """Validate JSON-style rows and parse them into typed arrow columns.

    Args:
        rows: a list of objects ``{column: value}`` (B rows); extra keys are ignored.
        types: every required input column -> the arrow type to parse it to (``None``: infer).
        field: how error messages name the list (``rows``, ``candidates``).
        fill: columns to add with a constant (the label: the workflow reads it, the model does not).
        separators: ``{list column: separator}`` of columns the ETL split from delimited strings
            (``--list-cols COL:SEP``): such a column also takes the delimited string.

    Returns:
        ``{column: pa.Array [B]}`` for the columns of ``types`` plus ``fill``.

    Raises:
        ServeError: not a list, empty, a row that is not an object, a missing column, a bad value.
    """
    if not isinstance(rows, list):
        raise ServeError(f"{field} must be a JSON list of objects (one per row), got {what(rows)}", field)
    if not rows:
        raise ServeError(f"{field} is empty: send at least one row", field)
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ServeError(f"{field}[{i}] must be an object {{column: value}}, got {what(r)}", f"{field}[{i}]")
    arrays = {}
    for (col, target), values in zip(types.items(), _transpose(rows, list(types), field), strict=True):
        arrays[col] = column_array(col, values, target, (separators or {}).get(col))
    _check_weights(arrays, types)
    for col, value in (fill or {}).items():
        arrays[col] = pa.array([value] * len(rows))
    return arrays


def columns_from_pandas(df: pd.DataFrame, types: Mapping[str, pa.DataType | None],
                        fill: Mapping[str, Any] | None = None, separators: Mapping[str, str] | None = None
                        ) -> dict[str, pa.Array]:
    """Typed arrow columns from a user's DataFrame (any dtypes: numpy, arrow-backed, object).

    Args:
        df: B rows holding every column of ``types`` (others are ignored).
        types, fill, separators: as in :func:`columns_from_records` (list columns: python lists, numpy
            arrays or an arrow list dtype).

    Returns:
        ``{column: pa.Array [B]}`` for the columns of ``types`` plus ``fill``.
    """
    if not isinstance(df, pd.DataFrame):
        raise ServeError(f"expected a pandas DataFrame or a list of row objects, got {type(df).__name__}")
    if len(df) == 0:
        raise ServeError("the DataFrame is empty: pass at least one row", "rows")
    missing = [c for c in types if c not in df.columns]
    if missing:
        raise ServeError(f"missing column(s) {missing}", missing[0])
    arrays = {}
    for col, target in types.items():
        s = df[col]
        sep = (separators or {}).get(col)
        try:
            arr = pa.Array.from_pandas(s)
            if isinstance(arr, pa.ChunkedArray):
                arr = arr.combine_chunks()
            arr = _plain_cast(arr, target, sep)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            arr = None
        if arr is None:
            arr = column_array(col, _python_values(s), target, sep)
        arrays[col] = arr
    _check_weights(arrays, types)
    for col, value in (fill or {}).items():
        arrays[col] = pa.array([value] * len(df))
    return arrays


def _plain_cast(arr: pa.Array, target: pa.DataType | None, sep: str | None) -> pa.Array | None:
    """``arr`` as ``target`` when arrow can convert it without changing values; None: parse value by value."""
    if target is not None and is_list_type(target):
        return list_from_arrow(arr, target, sep)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if target is not None and arr.type != target:
        if pa.types.is_string(target) != (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
            return None  # strings <-> numbers: parse value by value (rules of the JSON path)
        arr = arr.cast(target, safe=True)
    if pa.types.is_floating(arr.type) and pc.any(pc.is_inf(arr)).as_py():
        return None
    return arr


def _python_values(s: pd.Series) -> list[Any]:
    """A column's values as Python objects, missing scalars as None (lists and arrays kept as they are)."""
    values = s.astype(object).tolist()
    return [None if not isinstance(v, (list, tuple, np.ndarray)) and pd.isna(v) else v for v in values]


def _check_weights(arrays: Mapping[str, pa.Array], types: Mapping[str, pa.DataType | None]) -> None:
    """List weight columns (``X_weights``): one non-null weight per element of ``X``."""
    if any(t is not None and is_list_type(t) for t in types.values()):
        check_weights(arrays, weight_pairs(types))


def concat_columns(parts: Sequence[Mapping[str, pa.Array]]) -> dict[str, pa.Array]:
    """Several requests' columns stacked into one (row order kept), to transform and score them at once."""
    if len(parts) == 1:
        return dict(parts[0])
    return {c: pa.concat_arrays([p[c] for p in parts]) for c in parts[0]}


def num_rows(columns: Mapping[str, pa.Array]) -> int:
    return len(next(iter(columns.values()))) if columns else 0


def _transpose(rows: list[dict], cols: list[str], field: str) -> list[Sequence[Any]]:
    """The values of each of ``cols`` across ``rows`` (row order), or the error naming a missing column.

    ``itemgetter`` + ``zip`` move the values in C: a per-value Python loop cost more than parsing the JSON.
    """
    if not cols:
        return []
    try:
        if len(cols) == 1:
            return [list(map(itemgetter(cols[0]), rows))]
        return list(zip(*map(itemgetter(*cols), rows), strict=True))
    except KeyError:
        pass
    nowhere = [c for c in cols if not any(c in r for r in rows)]
    if nowhere:
        names = ", ".join(map(repr, nowhere[:8])) + (f" and {len(nowhere) - 8} more" if len(nowhere) > 8 else "")
        raise ServeError(f"missing column{'s' * (len(nowhere) > 1)} {names} (send null for a missing value)",
                         nowhere[0])
    i, col = next((i, c) for i, r in enumerate(rows) for c in cols if c not in r)
    raise ServeError(f"{field}[{i}] is missing column {col!r} (send null for a missing value)", col)


_STR_KINDS = frozenset({str, type(None)})
_INT_KINDS = frozenset({int, type(None)})
_NOT_FLOAT_KINDS = frozenset({bool, str})
_NUMBER_KINDS = frozenset({int, float, type(None)})
