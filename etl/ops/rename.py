"""Rename: rename columns with a mapping, a function, or a postfix.

Example:
    >>> cats = ["C1"] >> Categorify() >> Rename(postfix="_id")   # outputs C1_id
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ctrflow.etl.ops.base import Operator


class Rename(Operator):
    """Rename columns (kind and cardinality follow the column).

    Args:
        mapping: ``{old: new}``; columns not listed keep their name.
        postfix: appended to every name (when no mapping is given).
    """

    output_kind = "other"

    def __init__(self, mapping: dict[str, str] | None = None, postfix: str | None = None) -> None:
        if not mapping and not postfix:
            raise ValueError("Rename needs a mapping or a postfix")
        self.mapping = dict(mapping or {})
        self.postfix = postfix

    def params(self) -> dict[str, Any]:
        return {"mapping": self.mapping, "postfix": self.postfix}

    def new_name(self, col: str) -> str:
        if self.mapping:
            return self.mapping.get(col, col)
        return f"{col}{self.postfix}"

    def output_column_names(self, columns: list[str]) -> list[str]:
        return [self.new_name(c) for c in columns]

    def source_column(self, column: str, inputs: list[str]) -> str | None:
        return next(c for c in inputs if self.new_name(c) == column)

    def transform(self, columns: list[str], df: Any) -> Any:
        return df[columns].rename(columns={c: self.new_name(c) for c in columns})

    def array_transform(self, columns: list[str]) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
        names = [(c, self.new_name(c)) for c in columns]
        if len({new for _, new in names}) < len(names):
            return None  # two columns renamed alike: only a frame holds both
        return lambda arrays: {new: arrays[old] for old, new in names}
