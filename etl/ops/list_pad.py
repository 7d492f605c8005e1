"""ListPad: fixed-length lists, cut to ``length`` and padded at the end with ``value``.

Seed 000's layout: newest first, padding at the end. With Categorify's ids the default ``value=0``
is the padding id; a ``X_weights`` column padded alongside gets weight 0 there. Every output list
has exactly ``length`` elements (still a ``list<T>`` column, offsets ``0, length, 2 * length ...``),
so the schema's ``max_length`` is ``length``.

Example:
    >>> from ctrflow.etl.ops import Categorify
    >>> fixed = ["hist_items"] >> Categorify() >> ListPad(20)
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from ctrflow.etl import lists
from ctrflow.etl.ops.base import ListReshapeOp


class ListPad(ListReshapeOp):
    """Pad (and cut) each list to exactly ``length`` elements.

    Args:
        length: output list length (>= 1).
        value: padding element (cast to each column's element type).
    """

    fixed_length = True  # the schema's max_length is exactly ``length``, whatever came before

    def __init__(self, length: int, value: Any = 0) -> None:
        if int(length) < 1:
            raise ValueError(f"ListPad length must be >= 1, got {length}")
        self.length = int(length)
        self.value = value

    def params(self) -> dict[str, Any]:
        return {"length": self.length, "value": self.value}

    def list_max_length(self, column: str) -> int:
        """Every output list has this length."""
        return self.length

    def _reshape(self, arr: pa.Array) -> pa.Array:
        return lists.pad(arr, self.length, self.value)
