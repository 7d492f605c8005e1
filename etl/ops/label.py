"""Label: mark a column as the training target and check its values.

For ``task="binary"`` every value must be 0 or 1 (booleans allowed); for ``"regression"`` any
finite number. A null, NaN or out-of-range label raises ``LabelError`` naming the column and an
example value, so a bad input never produces a processed dataset. Output: float32.

Example:
    >>> target = ["label"] >> Label(task="binary")
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ctrflow.etl import dispatch
from ctrflow.etl.ops.base import ColumnOp

TASKS = ("binary", "regression")


class LabelError(ValueError):
    """Label values the task does not allow."""


class Label(ColumnOp):
    """Validate and cast label columns.

    Args:
        task: ``"binary"`` (values 0 / 1) or ``"regression"`` (finite numbers).
    """

    output_kind = "label"

    def __init__(self, task: str = "binary") -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.task = task

    def params(self) -> dict[str, Any]:
        return {"task": self.task}

    def transform_column(self, name: str, series: Any) -> Any:
        y = dispatch.to_float(series)
        bad = bad_labels(y, self.task)
        if bool(bad.any()):
            example = float(dispatch.to_numpy(y[bad])[0])
            raise LabelError(label_message(name, self.task, int(bad.sum()), example, "in one partition"))
        return dispatch.series_like(series, y.astype(np.float32), name=name)


def bad_labels(y: Any, task: str) -> Any:
    """Boolean mask of the labels ``task`` does not allow (null / NaN / inf; for binary, not 0 or 1)."""
    xp = dispatch.xp_of(y)
    bad = ~xp.isfinite(y)
    if task == "binary":
        bad |= (y != 0) & (y != 1)
    return bad


def label_message(name: str, task: str, count: int, example: float, where: str) -> str:
    """One line: how many labels are bad, where, an example, and the fix that fits what is wrong."""
    allowed = "0 or 1" if task == "binary" else "finite numbers"
    if np.isfinite(example) and task == "binary":
        fix = "clean the input, or choose --task regression if the label is a number to predict"
    else:
        fix = "drop or fill the rows whose label is missing"
    return f"label column {name!r} has {count:,} value(s) outside {allowed} {where} (e.g. {example}): {fix}"


def _count_bad(series: Any, task: str) -> tuple[int, float]:
    y = dispatch.to_float(series)
    bad = bad_labels(y, task)
    n = int(bad.sum())
    return n, float(dispatch.to_numpy(y[bad])[0]) if n else float("nan")


def count_bad_labels(name: str, task: str, ddf: Any) -> tuple[int, float]:
    """Bad labels of a whole Dask DataFrame: ``(count, an example value)``, for the error message."""
    import dask

    parts = dask.compute(*[dask.delayed(_count_bad)(p, task) for p in ddf[name].to_delayed()])
    n = sum(c for c, _ in parts)
    return n, next((ex for c, ex in parts if c), float("nan"))
