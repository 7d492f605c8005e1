"""LogOp: ``log(1 + x)`` of continuous columns (NVTabular's LogOp); use Clip(min_value=0) first, or
``signed=True``: ``sign(x) * log(1 + |x|)``, the same for ``x >= 0`` and monotone on every real, so
negative values keep their order and sign instead of all becoming 0.

Example:
    >>> cont = ["I1"] >> FillMissing() >> Clip(min_value=0) >> LogOp()
    >>> cont = ["balance"] >> FillMissing() >> LogOp(signed=True)
"""

from __future__ import annotations

from typing import Any

from ctrflow.etl import dispatch
from ctrflow.etl.ops.base import ColumnOp


class LogOp(ColumnOp):
    """``log1p(x)``; values below -1 give NaN, as numpy does. ``signed``: ``sign(x) * log1p(|x|)``.

    Args:
        signed: apply the log to ``|x|`` and keep the sign (defined for every real ``x``).
    """

    output_kind = "continuous"

    def __init__(self, signed: bool = False) -> None:
        self.signed = bool(signed)

    def params(self) -> dict[str, Any]:
        return {"signed": self.signed} if self.signed else {}  # unsigned: the params saved before `signed`

    @property
    def elementwise(self) -> bool:
        return True

    def transform_array(self, column: str, x: Any) -> Any:
        xp = dispatch.xp_of(x)
        if self.signed:
            sign = xp.sign(x)
            xp.abs(x, out=x)
            xp.log1p(x, out=x)
            return xp.multiply(x, sign, out=x)
        with _errstate(xp):
            return xp.log1p(x, out=x)

    def transform_column(self, name: str, series: Any) -> Any:
        return dispatch.series_like(series, self.transform_array(name, dispatch.float_work(series)), name=name)


def _errstate(xp: Any) -> Any:
    return xp.errstate(invalid="ignore", divide="ignore")
