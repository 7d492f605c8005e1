"""LogOp: ``log(1 + x)`` of continuous columns (NVTabular's LogOp); use Clip(min_value=0) first.

Example:
    >>> cont = ["I1"] >> FillMissing() >> Clip(min_value=0) >> LogOp()
"""

from __future__ import annotations

from typing import Any

from ctrflow.etl import dispatch
from ctrflow.etl.ops.base import ColumnOp


class LogOp(ColumnOp):
    """``log1p(x)``; values below -1 give NaN, as numpy does."""

    output_kind = "continuous"

    def transform_column(self, name: str, series: Any) -> Any:
        x = dispatch.to_float(series)
        xp = dispatch.xp_of(x)
        with _errstate(xp):
            y = xp.log1p(x)
        return dispatch.series_like(series, y, name=name)


def _errstate(xp: Any) -> Any:
    return xp.errstate(invalid="ignore", divide="ignore")
