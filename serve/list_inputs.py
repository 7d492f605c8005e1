"""List (sequence) columns in serving: request values -> arrow list arrays -> the loader's jagged tensors.

A list column arrives as a JSON array per row (``"hist_items": [17, 4, 9]``), ``null`` (read as an
empty list, as every ETL list op does) or, for a column the ETL split with ``--list-cols COL:SEP``, the
delimited string itself (``"tags": "a|b"``), split by the ETL's own ``split_strings``. Elements follow
the scalar rules of :mod:`ctrflow.serve.inputs` (a string element may be sent as an integer and so
on); a null element is kept (Categorify maps it to id 1). A weight column ``X_weights`` must have one
non-null number per element of ``X`` (the loader refuses anything else at training time).

After the workflow, :func:`jagged_inputs` casts the processed list columns as the ETL's writer does
(``list<schema dtype>``: int32 ids, float32 weights) and reads them with the loader's ``read_lists``,
so the model gets exactly the ``(values [N], offsets [B + 1])`` and ``weights [N]`` a training batch
holds.

Example:
    >>> import pyarrow as pa
    >>> list_column_array("tags", ["a|b", ["c"], None], pa.list_(pa.string()), sep="|").to_pylist()
    [['a', 'b'], ['c'], None]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ctrflow.etl import lists
from ctrflow.serve.values import ServeError, coerce, is_utf8, what


def is_list_target(t: pa.DataType | None) -> bool:
    return t is not None and lists.is_list_type(t)


def _clean(values: Sequence[Any], elem: pa.DataType) -> bool:
    """Every value is None or a list of already-typed elements (arrow can take the column in one call).

    Integers must be ints (arrow would truncate 2.5 to 2 silently); booleans (``type(True) is bool``)
    and numeric strings never pass, so they go the slow way (an error, or parsing).
    """
    if pa.types.is_string(elem):
        ok: tuple[type, ...] = (str, type(None))
    elif pa.types.is_integer(elem):
        ok = (int, type(None))
    else:
        ok = (int, float, type(None))
    return all(v is None or (type(v) is list and all(type(e) in ok for e in v)) for v in values)


def _split(col: str, values: list[Any], sep: str) -> None:
    """Delimited strings among ``values`` replaced (in place) by their tokens, as the ETL split them."""
    rows = [i for i, v in enumerate(values) if isinstance(v, str)]
    if not rows:
        return
    bad = next((i for i in rows if not is_utf8(values[i])), None)
    if bad is not None:
        raise ServeError(f"column {col!r} row {bad}: the string is not valid Unicode text", col)
    parts = lists.split_strings(pa.array([values[i] for i in rows], pa.string()), sep).to_pylist()
    for i, p in zip(rows, parts, strict=True):
        values[i] = p


def list_column_array(col: str, values: Sequence[Any], target: pa.DataType, sep: str | None = None) -> pa.Array:
    """One list column of Python values as a ``list<T>`` arrow array, validated.

    Args:
        col: column name (for errors).
        values: B values: lists (or tuples / numpy arrays), None, or delimited strings when ``sep`` is set.
        target: ``list<T>``; elements are parsed to ``T`` like scalars (``serve.inputs``).
        sep: the ETL's ``--list-cols COL:SEP`` separator, or None (then a string is an error).

    Returns:
        ``[B]`` ``list<T>`` array (null lists stay null; the workflow's list ops empty them).

    Raises:
        ServeError: a value that is not a list, an element of the wrong type (naming row and element).
    """
    elem = target.value_type
    values = list(values)
    if sep is not None:
        _split(col, values, sep)
    if _clean(values, elem):
        try:
            arr = pa.array(values, type=target, from_pandas=True)
            if not pa.types.is_floating(elem) or not pc.any(pc.is_inf(arr.flatten())).as_py():
                return arr
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, UnicodeError):
            pass
    out: list[Any] = []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(None)
            continue
        if isinstance(v, np.ndarray):  # a pandas object column read from parquet
            v = v.tolist()
        if not isinstance(v, (list, tuple)):
            form = f"a JSON array or a {sep!r}-separated string" if sep else "a JSON array"
            raise ServeError(f"column {col!r} row {i}: expected a list ({form}), got {what(v)}", col)
        out.append([coerce(col, i, e, elem, j) for j, e in enumerate(v)])
    try:
        return pa.array(out, type=target)
    except UnicodeError:  # a lone surrogate ("\ud800") decodes from JSON but is no UTF-8 text
        i = next((i for i, v in enumerate(out) if v and any(isinstance(e, str) and not is_utf8(e) for e in v)), 0)
        raise ServeError(f"column {col!r} row {i}: a string is not valid Unicode text", col) from None
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
        raise ServeError(f"column {col!r}: list elements of unsupported types ({e})", col) from None


def list_from_arrow(arr: pa.Array, target: pa.DataType, sep: str | None = None) -> pa.Array | None:
    """A DataFrame's column (as arrow) as ``target``, when that is a plain cast; None: validate value by value.

    Delimited strings (``sep``) go through the ETL's ``split_strings``; a list column whose elements are
    of the target's kind (strings for strings, numbers for numbers) is cast safely.
    """
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    t = arr.type
    if sep is not None and (pa.types.is_string(t) or pa.types.is_large_string(t)):
        return lists.split_strings(arr, sep)
    if not lists.is_list_type(t):
        return None
    arr = lists.list_array(arr)
    v, elem = arr.type.value_type, target.value_type
    if pa.types.is_dictionary(v):
        v = v.value_type
        arr = arr.cast(pa.list_(v))
    if (pa.types.is_string(v) or pa.types.is_large_string(v)) != pa.types.is_string(elem):
        return None  # strings <-> numbers: parsed element by element (the JSON rules)
    if pa.types.is_boolean(v) or (pa.types.is_integer(elem) and pa.types.is_floating(v)):
        return None  # 2.5 must not become 2
    out = arr.cast(target, safe=True)
    if pa.types.is_floating(elem) and pc.any(pc.is_inf(out.flatten())).as_py():
        return None
    return out


def check_weights(arrays: Mapping[str, pa.Array], pairs: Mapping[str, str]) -> None:
    """Each weight column holds one non-null weight per element of its list column (same row lengths).

    Args:
        arrays: validated columns (``{name: [B] array}``).
        pairs: ``{list column: its weight column}``.

    Raises:
        ServeError: naming the weight column and the first bad row.
    """
    for col, wcol in pairs.items():
        a, w = arrays[col], arrays[wcol]
        la, lw = lists.lengths(a), lists.lengths(w)
        bad = np.flatnonzero(la != lw)
        if bad.size:
            i = int(bad[0])
            raise ServeError(f"column {wcol!r} row {i}: {lw[i]} weight(s) for the {la[i]} element(s) of {col!r} "
                             "(send one weight per element)", wcol)
        flat = w.flatten()  # skips the values behind null lists
        if flat.null_count:
            k = int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0])
            i = int(np.searchsorted(np.cumsum(lw), k, side="right"))
            raise ServeError(f"column {wcol!r} row {i}: a weight is null or NaN (send a number per element)", wcol)


def weight_pairs(types: Mapping[str, pa.DataType | None]) -> dict[str, str]:
    """``{list input: its weight input}`` by the ETL's ``X`` / ``X_weights`` convention (both lists)."""
    listed = [c for c, t in types.items() if is_list_target(t)]
    return lists.weights_of(listed)


def jagged_inputs(processed: Any, names: Sequence[str], weights: Mapping[str, str], dtypes: Mapping[str, str]
                  ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """The model's list inputs from processed rows, as the loader builds them from the ETL's parquet.

    Args:
        processed: the workflow's output frame (B rows).
        names: list features the model reads.
        weights: ``{list feature: weight column}`` (the schema's ``weights``).
        dtypes: ``{column: numpy dtype}`` of the schema (what the ETL's writer casts list elements to).

    Returns:
        ``({name: (values [N], offsets [B + 1] int64)}, {name: weights [N] float32})``.
    """
    from ctrflow.loader.lists import read_lists

    cols = list(dict.fromkeys([*names, *(weights[n] for n in names if n in weights)]))
    written = [lists.list_array(pa.Array.from_pandas(processed[c])).cast(pa.list_(pa.from_numpy_dtype(dtypes[c])))
               for c in cols]  # the ETL writer's cast (etl/writer.py: list<schema dtype>)
    table = pa.table(written, names=cols)
    out, wts = {}, {}
    for n in names:
        values, offsets, w = read_lists([table], n, weights.get(n))
        out[n] = (torch.from_numpy(values), torch.from_numpy(offsets))
        if w is not None:
            wts[n] = torch.from_numpy(w)
    return out, wts
