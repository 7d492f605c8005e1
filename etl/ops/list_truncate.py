"""ListTruncate: cut list columns to at most ``max_len`` elements (RecIS's SequenceTruncate).

Seed 000's convention is newest first, padded at the end, so ``keep="first"`` (the default) keeps
the most recent events; ``keep="last"`` keeps the tail of oldest-first sequences. Null lists come
out empty; scalar columns pass through unchanged. Pass a list column and its ``X_weights`` column
together and both are cut the same way.
The op only reshapes lists: kind, cardinality and vocabulary come from the op before it, and the
schema's ``max_length`` is at most ``max_len``.

Example:
    >>> hist = ["hist_items", "hist_items_weights"] >> ListTruncate(50)
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from ctrflow.etl import lists
from ctrflow.etl.ops.base import ListReshapeOp


class ListTruncate(ListReshapeOp):
    """Keep the first (or last) ``max_len`` elements of each list.

    Args:
        max_len: longest list kept (>= 1).
        keep: ``"first"`` (head: the newest events of a newest-first sequence) or ``"last"``.
    """

    def __init__(self, max_len: int, keep: str = "first") -> None:
        if int(max_len) < 1:
            raise ValueError(f"ListTruncate max_len must be >= 1, got {max_len}")
        if keep not in ("first", "last"):
            raise ValueError(f"ListTruncate keep must be 'first' or 'last', got {keep!r}")
        self.max_len = int(max_len)
        self.keep = keep

    def params(self) -> dict[str, Any]:
        return {"max_len": self.max_len, "keep": self.keep}

    def list_max_length(self, column: str) -> int:
        """Upper bound on the output lists' length (the schema's ``max_length``)."""
        return self.max_len

    def _reshape(self, arr: pa.Array) -> pa.Array:
        return lists.truncate(arr, self.max_len, self.keep)
