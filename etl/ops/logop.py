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

    @property
    def elementwise(self) -> bool:
        return True

    def transform_array(self, column: str, x: Any) -> Any:
        xp = dispatch.xp_of(x)
        with _errstate(xp):
            return xp.log1p(x, out=x)

    def transform_column(self, name: str, series: Any) -> Any:
        return dispatch.series_like(series, self.transform_array(name, dispatch.float_work(series)), name=name)


def _errstate(xp: Any) -> Any:
    return xp.errstate(invalid="ignore", divide="ignore")
