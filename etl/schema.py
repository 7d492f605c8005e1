"""The processed-dataset schema: the contract between ``ctrflow.etl`` and ``ctrflow.loader``.

``OUT/schema.json`` lists every output column with its kind (categorical | continuous | label | list),
dtype, and for categoricals the cardinality and embedding dim. This module imports nothing heavier
than the standard library so the loader and models can read a schema without Dask.

Example:
    >>> s = Schema([ColumnSchema("C1", "categorical", "int32", cardinality=10, embedding_dim=16)])
    >>> s.categorical
    ['C1']
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_FORMAT = "ctrflow.processed/1"
KINDS = ("categorical", "continuous", "label", "list", "other")


class SchemaError(ValueError):
    """A schema.json is missing, corrupt or does not describe a processed dataset."""


@dataclass
class ColumnSchema:
    """One output column.

    Args:
        name: column name in the parquet files.
        kind: one of ``categorical``, ``continuous``, ``label``, ``list``, ``other``.
        dtype: numpy dtype name of the stored values (``int32``, ``float32``...).
        cardinality: number of ids (0 = padding, 1 = null, 2 = OOV, 3.. = kept values) for
            categorical and list columns; ``None`` otherwise.
        embedding_dim: suggested embedding dim for categorical and list columns.
        max_length: longest list for list columns (after any ``ListTruncate``).
        weights: for a list column, the name of its per-element weight column (``list<float32>``,
            same lengths), whose own kind is ``other``.
        vocabulary: name of the vocabulary the ids come from when several columns share one
            (``Categorify`` with a shared encoding); ids of columns with the same ``vocabulary`` mean the
            same value, so a model may look them up in one table. ``None``: the column's own vocabulary.
        quantiles: for a continuous column, quantile edges of its stored (output) values on the training
            split, strictly increasing: the exact min, the approximate ``1/K .. (K-1)/K`` quantiles and the
            exact max (K = 32 by default), ties merged; ``ctrflow.models.numeric`` builds piecewise-linear
            encodings from them. ``None``: not recorded (written by an older ETL, or the column's last op is
            not ``Normalize``).
    """

    name: str
    kind: str
    dtype: str
    cardinality: int | None = None
    embedding_dim: int | None = None
    max_length: int | None = None
    weights: str | None = None
    vocabulary: str | None = None
    quantiles: list[float] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SchemaError(f"column {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.kind in ("categorical", "list") and self.cardinality is None:
            raise SchemaError(f"categorical column {self.name!r} declares no cardinality")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Schema:
    """All columns of a processed dataset plus free-form metadata.

    Args:
        columns: the output columns, in file order.
        metadata: JSON-safe extras: row counts per split, the generator's oracle metrics, versions.
    """

    columns: list[ColumnSchema]
    metadata: dict[str, Any] = field(default_factory=dict)

    def _names(self, kind: str) -> list[str]:
        return [c.name for c in self.columns if c.kind == kind]

    @property
    def categorical(self) -> list[str]:
        return self._names("categorical")

    @property
    def continuous(self) -> list[str]:
        return self._names("continuous")

    @property
    def label(self) -> list[str]:
        return self._names("label")

    @property
    def lists(self) -> list[str]:
        return self._names("list")

    def __getitem__(self, name: str) -> ColumnSchema:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"no column {name!r} in schema (have: {', '.join(c.name for c in self.columns)})")

    def embedding_sizes(self, max_dim: int | None = None) -> dict[str, tuple[int, int]]:
        """``{column: (cardinality, dim)}`` for categorical columns, dim optionally capped."""
        out = {}
        for c in self.columns:
            if c.kind == "categorical":
                dim = int(c.embedding_dim or 16)
                out[c.name] = (int(c.cardinality), min(dim, max_dim) if max_dim else dim)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"format": SCHEMA_FORMAT, "columns": [c.to_dict() for c in self.columns], **self.metadata}

    def save(self, path: str | os.PathLike) -> None:
        """Write ``schema.json`` (atomically: temporary file, then rename)."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schema:
        if d.get("format") != SCHEMA_FORMAT:
            raise SchemaError(f"schema format is {d.get('format')!r}, expected {SCHEMA_FORMAT!r}")
        cols = [ColumnSchema(**c) for c in d["columns"]]
        meta = {k: v for k, v in d.items() if k not in ("format", "columns")}
        return cls(cols, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Schema:
        """Read a ``schema.json`` file, or the one inside a processed-dataset directory."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "schema.json")
        if not os.path.exists(path):
            raise SchemaError(
                f"{path} does not exist: not a processed dataset (run `python etl/run.py --output DIR` first)"
            )
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SchemaError(f"{path} is not valid JSON ({e}); re-run the ETL") from None
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError) as e:
            raise SchemaError(f"{path} is not a ctrflow schema ({e}); re-run the ETL") from None


def embedding_dim(cardinality: int, minimum: int = 16, maximum: int = 512) -> int:
    """NVTabular's embedding-size rule: ``clamp(round(1.6 * cardinality ** 0.56), minimum, maximum)``.

    fastai's rule is the same formula capped at 600 without the floor: ``embedding_dim(c, 1, 600)``.
    """
    return int(max(minimum, min(maximum, round(1.6 * cardinality**0.56))))


def id_dtype(cardinality: int) -> str:
    """int32 ids unless the cardinality needs int64."""
    return "int32" if cardinality < 2**31 else "int64"
