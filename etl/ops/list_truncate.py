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

from ctrflow.etl import dispatch, lists
from ctrflow.etl.ops.base import Operator


class ListTruncate(Operator):
    """Keep the first (or last) ``max_len`` elements of each list.

    Args:
        max_len: longest list kept (>= 1).
        keep: ``"first"`` (head: the newest events of a newest-first sequence) or ``"last"``.
    """

    output_kind = "other"

    def __init__(self, max_len: int, keep: str = "first") -> None:
        if int(max_len) < 1:
            raise ValueError(f"ListTruncate max_len must be >= 1, got {max_len}")
        if keep not in ("first", "last"):
            raise ValueError(f"ListTruncate keep must be 'first' or 'last', got {keep!r}")
        self.max_len = int(max_len)
        self.keep = keep

    def params(self) -> dict[str, Any]:
        return {"max_len": self.max_len, "keep": self.keep}

    def source_column(self, column: str, inputs: list[str]) -> str | None:
        return column  # a reshape: kind and stats come from upstream

    def list_max_length(self, column: str) -> int:
        """Upper bound on the output lists' length (the schema's ``max_length``)."""
        return self.max_len

    def transform(self, columns: list[str], df: Any) -> Any:
        out = {}
        for c in columns:  # scalar columns pass through (e.g. the candidate of a joint Categorify)
            if lists.is_list_series(df[c]):
                cut = lists.truncate(lists.list_array(df[c]), self.max_len, self.keep)
                out[c] = lists.series_from_list(df[c], cut, c)
            else:
                out[c] = df[c]
        return dispatch.frame_from_columns(df, out)
