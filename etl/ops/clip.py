"""Clip: bound continuous values to [min_value, max_value] (nulls stay null).

Example:
    >>> cont = ["I1"] >> FillMissing() >> Clip(min_value=0) >> LogOp()
"""

from __future__ import annotations

from typing import Any

from ctrflow.etl import dispatch
from ctrflow.etl.ops.base import ColumnOp


class Clip(ColumnOp):
    """Clip values.

    Args:
        min_value: lower bound (None = unbounded).
        max_value: upper bound (None = unbounded).
    """

    output_kind = "continuous"

    def __init__(self, min_value: float | None = None, max_value: float | None = None) -> None:
        if min_value is None and max_value is None:
            raise ValueError("Clip needs min_value, max_value or both")
        if min_value is not None and max_value is not None and min_value > max_value:
            raise ValueError(f"Clip: min_value {min_value} > max_value {max_value}")
        self.min_value, self.max_value = min_value, max_value

    def params(self) -> dict[str, Any]:
        return {"min_value": self.min_value, "max_value": self.max_value}

    @property
    def elementwise(self) -> bool:
        return True

    def transform_array(self, column: str, x: Any) -> Any:
        return dispatch.xp_of(x).clip(x, self.min_value, self.max_value, out=x)

    def transform_column(self, name: str, series: Any) -> Any:
        return dispatch.series_like(series, self.transform_array(name, dispatch.float_work(series)), name=name)
