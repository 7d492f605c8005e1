"""Label: mark a column as the training target and check its values.

For ``task="binary"`` every value must be 0 or 1 (booleans allowed), or text that says which: the
words yes / no, true / false, y / n, t / f, 1 / 0 (any case, surrounding blanks ignored), or the two
values named by ``values=[negative, positive]`` (``etl/run.py --label-values``; e.g. a census file's
``<=50K`` / ``>50K``, numbers such as ``-1,1`` too). For ``"regression"`` any finite number. A null,
NaN or unrecognised label raises ``LabelError`` naming the column and an example value, so a bad
input never produces a processed dataset (a test file's ``>50K.`` is refused, not read as 0).
Output: float32.

Example:
    >>> target = ["label"] >> Label(task="binary")
    >>> target = ["income"] >> Label(task="binary", values=["<=50K", ">50K"])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ctrflow.etl import dispatch
from ctrflow.etl.ops.base import ColumnOp

TASKS = ("binary", "regression")
# Text a binary label may hold without --label-values (compared stripped and lower-cased).
POSITIVE_WORDS = ("1", "1.0", "true", "yes", "y", "t")
NEGATIVE_WORDS = ("0", "0.0", "false", "no", "n", "f")


class LabelError(ValueError):
    """Label values the task does not allow."""


class Label(ColumnOp):
    """Validate and cast label columns.

    Args:
        task: ``"binary"`` (values 0 / 1, or text as the module docstring says) or ``"regression"``
            (finite numbers).
        values: binary only: ``[negative, positive]``, the two values the column holds (text, or
            numbers written as text); every other value is an error. None: 0 / 1 and the yes/no words.
    """

    output_kind = "label"

    def __init__(self, task: str = "binary", values: list[str] | None = None) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.task, self.values = task, None if values is None else check_label_values(values, task)

    def params(self) -> dict[str, Any]:
        return {"task": self.task, "values": self.values}

    def transform_column(self, name: str, series: Any) -> Any:
        y, bad = label_floats(series, self.task, self.values)
        if bool(bad.any()):
            example = _example(series, bad)
            raise LabelError(label_message(name, self.task, int(bad.sum()), example, "in one partition",
                                           self.values))
        return dispatch.series_like(series, y.astype(np.float32), name=name)


def check_label_values(values: list[Any], task: str, what: str = "label values") -> list[str]:
    """``[negative, positive]`` as stripped text, or ``ValueError`` naming ``what`` (not two different
    non-empty values, or a task other than binary): the one check behind :class:`Label` and
    ``etl/run.py --label-values``."""
    values = [str(v).strip() for v in values]
    if task != "binary":
        raise ValueError(f"{what} expects two different values NEGATIVE,POSITIVE for --task binary only, "
                         f"not --task {task}")
    if len(values) != 2 or not all(values) or values[0] == values[1]:
        raise ValueError(f"{what} expects two different values NEGATIVE,POSITIVE, got {','.join(values)!r}")
    return values


def is_text(series: Any) -> bool:
    """True for a column of strings (object, string, categorical or arrow string dtype)."""
    dtype = series.dtype
    if isinstance(dtype, pd.ArrowDtype):
        t = dtype.pyarrow_dtype
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t)
    kind = str(dtype)
    return kind in ("object", "string", "str", "category") or kind.startswith("string")


def label_floats(series: Any, task: str, values: list[str] | None = None) -> tuple[Any, Any]:
    """A label column as float64 and the mask of its bad values.

    Args:
        series: the label column (pandas or cudf; numbers, booleans or text).
        task: ``binary`` or ``regression``.
        values: ``[negative, positive]`` (see :class:`Label`), or None.

    Returns:
        ``(y [N] float64 with NaN where bad, bad [N] bool)`` (numpy, or cupy for a cudf column).
    """
    if is_text(series):
        if task != "binary":
            raise LabelError(f"label column {series.name!r} holds text ({series.dtype}): a regression label must "
                             "be numbers; fix the input or choose --task binary with --label-values NEGATIVE,POSITIVE")
        pos, neg = _text_masks(series, values)
        xp = dispatch.xp_of(pos)
        y = xp.where(pos, 1.0, xp.where(neg, 0.0, np.nan))
    else:
        y = dispatch.to_float(series)
        if values is not None:
            try:
                lo, hi = float(values[0]), float(values[1])
            except ValueError:
                raise LabelError(f"label column {series.name!r} holds numbers but --label-values {','.join(values)} "
                                 "names text: give the two numbers, e.g. --label-values -1,1") from None
            xp = dispatch.xp_of(y)
            y = xp.where(y == hi, 1.0, xp.where(y == lo, 0.0, np.nan))
    return y, bad_labels(y, task)


def _text_masks(series: Any, values: list[str] | None) -> tuple[Any, Any]:
    """Where a text label is positive / negative: ``(pos [N] bool, neg [N] bool)``, nulls in neither.

    Text is compared with blanks stripped; without ``values`` also lower-cased, against the yes/no words.
    """
    pos_set, neg_set = ([values[1]], [values[0]]) if values is not None else (POSITIVE_WORDS, NEGATIVE_WORDS)
    if dispatch.is_gpu_object(series):
        text = series.astype(str).str.strip()
        text = text.str.lower() if values is None else text
        return text.isin(list(pos_set)).fillna(False).values, text.isin(list(neg_set)).fillna(False).values
    try:
        arr = dispatch.to_arrow(series)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # an object column of mixed types: compare their text
        arr = pa.array([None if v is None or v != v else str(v) for v in series], pa.string())
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.string())
    arr = pc.utf8_trim_whitespace(arr)
    arr = pc.utf8_lower(arr) if values is None else arr

    def mask(words: Any) -> np.ndarray:
        hit = pc.fill_null(pc.is_in(arr, value_set=pa.array(list(words), arr.type)), False)
        return hit.to_numpy(zero_copy_only=False)

    return mask(pos_set), mask(neg_set)


def _example(series: Any, bad: Any) -> Any:
    """The first bad value as the input held it (text stays text; a null reads None)."""
    i = int(dispatch.to_numpy(bad).argmax())
    v = series.iloc[i : i + 1].to_pandas().iloc[0] if dispatch.is_gpu_object(series) else series.iloc[i]
    if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
        return float("nan")
    return v if isinstance(v, str) else float(v)


def bad_labels(y: Any, task: str) -> Any:
    """Boolean mask of the labels ``task`` does not allow (null / NaN / inf; for binary, not 0 or 1)."""
    xp = dispatch.xp_of(y)
    bad = ~xp.isfinite(y)
    if task == "binary":
        bad |= (y != 0) & (y != 1)
    return bad


def label_message(name: str, task: str, count: int, example: Any, where: str,
                  values: list[str] | None = None) -> str:
    """One line: how many labels are bad, where, an example, and the fix that fits what is wrong."""
    if task == "regression":
        allowed = "finite numbers"
    elif values is not None:
        allowed = f"{values[0]!r} (0) / {values[1]!r} (1)"
    else:
        allowed = "0 or 1 (or yes/no, true/false)"
    if isinstance(example, str):
        fix = ("name the column's two values with --label-values NEGATIVE,POSITIVE" if values is None
               else "clean the input, or name the values it holds with --label-values NEGATIVE,POSITIVE")
    elif np.isfinite(example) and task == "binary":
        fix = ("clean the input, name its two values with --label-values NEGATIVE,POSITIVE, or choose --task "
               "regression if the label is a number to predict")
    else:
        fix = "drop or fill the rows whose label is missing"
    shown = repr(example) if isinstance(example, str) else example
    return f"label column {name!r} has {count:,} value(s) outside {allowed} {where} (e.g. {shown}): {fix}"


def _count_bad(series: Any, task: str, values: list[str] | None) -> tuple[int, Any]:
    y, bad = label_floats(series, task, values)
    n = int(bad.sum())
    return n, _example(series, bad) if n else float("nan")


def count_bad_labels(name: str, task: str, ddf: Any, values: list[str] | None = None) -> tuple[int, Any]:
    """Bad labels of a whole Dask DataFrame: ``(count, an example value)``, for the error message."""
    import dask

    parts = dask.compute(*[dask.delayed(_count_bad)(p, task, values) for p in ddf[name].to_delayed()])
    n = sum(c for c, _ in parts)
    return n, next((ex for c, ex in parts if c), float("nan"))
