"""Embedding sizes and column lists read from a processed dataset's ``schema.json``.

Both models' ``from_schema`` use these, so a model built from a dataset always has one table per
categorical column, sized by the cardinality the ETL recorded.
"""

from __future__ import annotations

import os
from typing import Any

from ctrflow.etl.schema import Schema


def as_schema(schema: Schema | str | os.PathLike | dict[str, Any]) -> Schema:
    """A :class:`Schema` from a Schema, a ``schema.json`` path, a processed-dataset dir or a dict."""
    if isinstance(schema, Schema):
        return schema
    if isinstance(schema, dict):
        return Schema.from_dict(schema)
    return Schema.load(schema)


def embedding_sizes(
    schema: Schema | str | os.PathLike | dict[str, Any],
    max_dim: int | None = None,
    dim: int | None = None,
) -> list[tuple[int, int]]:
    """``[(cardinality, dim), ...]`` for the categorical columns, in schema order.

    Args:
        schema: see :func:`as_schema`.
        max_dim: cap every stored dim (the seed notebook's ``min(16, dim)``).
        dim: use this dim for every table instead of the stored ones (DLRM needs one dim).

    Returns:
        One ``(cardinality, dim)`` per categorical column.
    """
    s = as_schema(schema)
    sizes = s.embedding_sizes(max_dim)
    return [(card, int(dim) if dim else d) for card, d in (sizes[name] for name in s.categorical)]
