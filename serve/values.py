"""One request value: its parse to the workflow's input type, and the error that names its field.

Shared by :mod:`ctrflow.serve.inputs` (scalar columns) and :mod:`ctrflow.serve.list_inputs` (list
columns), which both import it; neither imports the other's internals.
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa


class ServeError(ValueError):
    """Bad input to the predictor (a 4xx over HTTP).

    Args:
        message: one line naming the problem.
        field: the request field or column at fault (``None`` when it is the request as a whole).
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def what(v: Any) -> str:
    return {bool: "a boolean", dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(
        type(v), type(v).__name__)


def coerce(col: str, i: int, v: Any, target: pa.DataType | None, element: int | None = None) -> Any:
    """One value (or list element number ``element``) parsed to ``target`` (None for missing);
    :class:`ServeError` naming column and row."""
    if v is None:
        return None
    if isinstance(v, float) and math.isnan(v):
        return None
    where = f"column {col!r} row {i}" + ("" if element is None else f" element {element}")
    if target is None:
        if isinstance(v, (dict, list)):
            raise ServeError(f"{where}: expected a number or a string, got {what(v)}", col)
        return v
    if pa.types.is_string(target):
        if isinstance(v, str):
            return v
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        raise ServeError(f"{where}: expected a string (a category), got {what(v)} {v!r:.40}", col)
    if isinstance(v, bool) or isinstance(v, (dict, list)):
        raise ServeError(f"{where}: expected a number, got {what(v)}", col)
    if isinstance(v, str):
        s = v.strip()
        if not s:
            return None  # an empty field is a missing value, as in the Criteo text files
        try:
            v = int(s) if pa.types.is_integer(target) and s.lstrip("+-").isdigit() else float(s)
        except ValueError:
            raise ServeError(f"{where}: {v!r:.40} is not a number", col) from None
        if isinstance(v, float) and math.isnan(v):
            return None
    if not isinstance(v, (int, float)):
        raise ServeError(f"{where}: expected a number, got {what(v)}", col)
    if isinstance(v, float) and not math.isfinite(v):
        raise ServeError(f"{where}: {v} is not a finite number", col)
    if pa.types.is_integer(target):
        if not -(2**63) <= v < 2**63:
            raise ServeError(f"{where}: {v:.6g} does not fit int64", col)
        if isinstance(v, float):
            if not v.is_integer():
                raise ServeError(f"{where}: {v} is not an integer", col)
            v = int(v)
        return v
    return float(v)


def is_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeError:
        return False
