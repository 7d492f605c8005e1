"""List (sequence) columns: arrow list arrays handled as flat values + offsets, never row by row.

A list column of a partition is an arrow-backed pandas Series (``pd.ArrowDtype(pa.list_(...))``) or
a cudf list Series. Every op on lists works on the flat element array and the ``[N + 1]`` offsets:
element-wise ops (Categorify, HashBucket) map the flat values and keep the offsets; shape ops
(ListTruncate, ListPad) compute new offsets and gather the flat values once.

Conventions (seed 000's): the newest element first, padding at the end. A null list is written as
an empty list by every list op; a null *element* stays null until Categorify maps it to id 1.
A list column ``X``'s optional per-element weights live in the column ``X_weights``
(``list<float32>``, same lengths); shape ops applied to both keep them aligned.

Example:
    >>> import pyarrow as pa
    >>> arr = pa.array([[5, 6, 7], None, [8]], pa.list_(pa.int64()))
    >>> truncate(arr, 2).to_pylist()
    [[5, 6], [], [8]]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ctrflow.etl import dispatch

WEIGHTS_SUFFIX = "_weights"


def is_list_type(t: pa.DataType) -> bool:
    """True for arrow list, large list and fixed-size list types."""
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def is_list_series(series: Any) -> bool:
    """True when a pandas / cudf Series holds lists."""
    dtype = series.dtype
    if isinstance(dtype, pd.ArrowDtype):
        return is_list_type(dtype.pyarrow_dtype)
    return type(dtype).__name__ == "ListDtype"  # cudf


def list_array(series: Any) -> pa.Array:
    """One arrow list array (``list<T>``, int32 offsets) from a list Series or arrow array."""
    arr = series if isinstance(series, (pa.Array, pa.ChunkedArray)) else dispatch.to_arrow(series)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if not pa.types.is_list(arr.type):
        arr = arr.cast(pa.list_(arr.type.value_type))
    return arr


def lengths(arr: pa.Array) -> np.ndarray:
    """Lengths [N] (int64) of a list array, 0 for a null list."""
    n = pc.list_value_length(arr)
    return (n.fill_null(0) if n.null_count else n).to_numpy(zero_copy_only=False).astype(np.int64)


def flatten(arr: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Offsets [N + 1] (int64, starting at 0) and flat values [offsets[-1]]; null lists become empty."""
    lens = lengths(arr)
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return offsets, arr.flatten()  # flatten() honours slicing and skips values behind null lists


def from_flat(offsets: np.ndarray, values: Any, value_type: pa.DataType | None = None) -> pa.Array:
    """A ``list<T>`` array from offsets [N + 1] and flat values [offsets[-1]] (no nulls)."""
    if not isinstance(values, pa.Array):
        values = pa.array(values, type=value_type)
    return pa.ListArray.from_arrays(pa.array(np.asarray(offsets, dtype=np.int32), pa.int32()), values)


def series_from_list(like: Any, arr: pa.Array, name: str | None = None) -> Any:
    """A Series of ``like``'s library and index holding the arrow list array ``arr``."""
    if dispatch.is_gpu_object(like):  # pragma: no cover - cudf
        import cudf

        out = cudf.Series.from_arrow(arr)
        out.index = like.index
        return out.rename(name)
    return pd.Series(pd.arrays.ArrowExtensionArray(arr), index=like.index, name=name, copy=False)


def map_values(series: Any, fn: Any, value_type: pa.DataType, name: str | None = None) -> Any:
    """Apply an element-wise ``fn(flat values: pa.Array) -> [M] numpy`` to a list Series.

    Returns:
        A list Series with the same lengths (null lists empty) and ``value_type`` elements.
    """
    offsets, flat = flatten(list_array(series))
    return series_from_list(series, from_flat(offsets, fn(flat), value_type), name)


def truncate(arr: pa.Array, max_len: int, keep: str = "first") -> pa.Array:
    """Lists cut to at most ``max_len`` elements.

    Args:
        arr: [N] list array.
        max_len: longest list kept.
        keep: ``"first"`` keeps the head (newest-first sequences keep the most recent events),
            ``"last"`` the tail.

    Returns:
        [N] ``list<T>`` array, null lists empty; ``arr`` itself when nothing is cut and no list is null.
    """
    if keep not in ("first", "last"):
        raise ValueError(f"keep must be 'first' or 'last', got {keep!r}")
    arr = list_array(arr)
    offsets, flat = flatten(arr)
    lens = np.diff(offsets)
    if (lens.size == 0 or lens.max() <= max_len) and arr.null_count == 0:
        return arr
    new_lens = np.minimum(lens, max_len)
    new_offsets = np.zeros_like(offsets)
    np.cumsum(new_lens, out=new_offsets[1:])
    starts = offsets[:-1] if keep == "first" else offsets[1:] - new_lens
    return from_flat(new_offsets, flat.take(_gather(starts, new_lens, new_offsets)))


def pad(arr: pa.Array, length: int, value: Any = 0) -> pa.Array:
    """Lists of exactly ``length`` elements: cut to the first ``length``, padded at the end with ``value``.

    Args:
        arr: [N] list array.
        length: output list length.
        value: padding element (cast to the element type).

    Returns:
        [N] ``list<T>`` array with offsets ``0, length, 2 * length, ...``.
    """
    arr = truncate(arr, length, "first")
    offsets, flat = flatten(arr)
    lens = np.diff(offsets)
    n = len(lens)
    fill = pa.scalar(value).cast(flat.type) if not pa.types.is_null(flat.type) else pa.scalar(value)
    # Position of every kept element in the padded [N * length] layout; the rest is padding.
    target = _gather(np.arange(n, dtype=np.int64) * length, lens, offsets)
    src = np.full(n * length, -1, dtype=np.int64)
    src[target] = np.arange(len(flat), dtype=np.int64)
    values = pa.concat_arrays([flat, pa.array([fill.as_py()], type=fill.type)])
    out = values.take(pa.array(np.where(src < 0, len(flat), src)))
    return from_flat(np.arange(n + 1, dtype=np.int64) * length, out)


def _gather(starts: np.ndarray, lens: np.ndarray, new_offsets: np.ndarray) -> np.ndarray:
    """Flat indices ``starts[i] + j`` for ``j < lens[i]``, row after row (no Python loop over rows)."""
    total = int(new_offsets[-1])
    return np.repeat(starts - new_offsets[:-1], lens) + np.arange(total, dtype=np.int64)


def split_strings(arr: pa.Array, sep: str) -> pa.Array:
    """Delimited strings to ``list<string>``: ``"a|b"`` -> ``["a", "b"]``; empty tokens are dropped
    (``""`` -> ``[]``, ``"a||b|"`` -> ``["a", "b"]``); a null string stays a null list.

    Dictionary-encoded input is split once per distinct string, then gathered by index.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        return split_strings(arr.dictionary, sep).take(arr.indices)
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.string())
    parts = list_array(pc.split_pattern(arr.cast(pa.string()), sep))
    offsets, flat = flatten(parts)
    keep = pc.not_equal(flat, "").fill_null(True).to_numpy(zero_copy_only=False)
    if keep.all():
        return parts
    row = np.repeat(np.arange(len(parts)), np.diff(offsets))
    new_lens = np.bincount(row[keep], minlength=len(parts))
    new_offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(new_lens, out=new_offsets[1:])
    return pa.ListArray.from_arrays(pa.array(new_offsets.astype(np.int32)), flat.filter(pa.array(keep)),
                                    mask=parts.is_null())


def split_columns(df: Any, spec: dict[str, str]) -> Any:
    """Split the delimited string columns ``{column: separator}`` of a pandas partition into lists."""
    out = {c: df[c] for c in df.columns}
    for col, sep in spec.items():
        if col in out and not is_list_series(out[col]):
            out[col] = series_from_list(df[col], split_strings(dispatch.to_arrow(df[col]), sep), col)
    return dispatch.frame_from_columns(df, out)


def max_length(series: Any) -> int:
    """Longest list of a list Series (0 when empty)."""
    lens = lengths(list_array(series))
    return int(lens.max()) if lens.size else 0


def weights_of(names: list[str]) -> dict[str, str]:
    """``{list column: its weight column}`` by the ``X`` / ``X_weights`` naming convention."""
    present = set(names)
    return {n: n + WEIGHTS_SUFFIX for n in names if n + WEIGHTS_SUFFIX in present}


# ---- schema --------------------------------------------------------------------------------
def list_outputs(frame: Any) -> list[str]:
    """Names of the list-typed columns of a (meta) frame."""
    return [str(c) for c in frame.columns if is_list_series(frame[c])]


def _path_bound(node: Any, column: str) -> tuple[int | None, bool]:
    """Smallest ``list_max_length`` of the reshaping ops on ``column``'s path to the output, and
    whether the most downstream of them pads to a fixed length (then that length is exact)."""
    bound = None
    if node.op is not None:
        if column not in node.output_columns:
            return None, False
        f = getattr(node.op, "list_max_length", None)
        if f is not None:
            bound = int(f(column))
            if getattr(node.op, "fixed_length", False):
                return bound, True
        column = node.op.source_column(column, node.input_columns) or column
        if column not in node.input_columns:
            return bound, False
    for p in reversed(node.parents):
        if column in p.output_columns:
            up, fixed = _path_bound(p, column)
            if fixed and bound is not None and up is not None:
                return min(bound, up), True
            if up is None:
                return bound, fixed
            return (up if bound is None else min(bound, up)), fixed
    return bound, False


def list_schema(workflow: Any, schema: Any) -> Any:
    """Mark the workflow's list outputs in ``schema`` (in place; returned).

    A list output from an op that declares ids (Categorify, HashBucket ...) gets kind ``list`` with
    its element dtype, and ``max_length``: the ``ListPad`` length, else the smallest of the
    ``ListTruncate`` bounds and the longest list Categorify saw in the fit data (``etl/run.py``
    replaces it with the longest list actually written). ``X_weights`` next to a list ``X`` becomes
    ``X``'s ``weights`` column: kind ``other``, dtype float32.
    """
    listed = set(getattr(workflow, "list_columns", None) or [])
    if not listed:
        return schema
    by_name = {c.name: c for c in schema.columns}
    for col in schema.columns:
        if col.name not in listed:
            continue
        bound, fixed = _path_bound(workflow.output_node, col.name)
        if col.kind in ("categorical", "list"):
            col.kind = "list"
            if fixed or col.max_length is None:
                col.max_length = bound if bound is not None else col.max_length
            elif bound is not None:
                col.max_length = min(col.max_length, bound)
        elif bound is not None:
            col.max_length = bound
    for name, wname in weights_of([c.name for c in schema.columns]).items():
        col, w = by_name[name], by_name[wname]
        if col.kind == "list" and wname in listed:
            col.weights = wname
            w.kind, w.dtype, w.max_length = "other", "float32", col.max_length
    return schema


def normal_list_type(t: pa.DataType) -> pa.DataType:
    """The type every partition reads a list column as (the readers' dtype rule, element-wise):
    ``list<string>`` for (large / dictionary) strings, ``list<int64>``, ``list<float64>``."""
    v = t.value_type
    if pa.types.is_dictionary(v):
        v = v.value_type
    if pa.types.is_string(v) or pa.types.is_large_string(v):
        v = pa.string()
    elif pa.types.is_integer(v):
        v = pa.int64()
    elif pa.types.is_floating(v) or pa.types.is_null(v) or pa.types.is_boolean(v):
        v = pa.float64()
    return pa.list_(v)
