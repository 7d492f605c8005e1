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
        xp = dispatch.xp_of(y)
        bad = ~xp.isfinite(y)
        if self.task == "binary":
            bad |= (y != 0) & (y != 1)
        if bool(bad.any()):
            example = float(dispatch.to_numpy(y[bad])[0])
            allowed = "0 or 1" if self.task == "binary" else "finite numbers"
            raise LabelError(
                f"label column {name!r} has {int(bad.sum())} value(s) outside {allowed} (e.g. {example}) "
                f"for task {self.task!r}: clean the input or choose --task regression"
            )
        return dispatch.series_like(series, y.astype(np.float32), name=name)
