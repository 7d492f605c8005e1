"""Per-feature embedding options (RecIS's ``EmbeddingOption``) and the config that sets them.

This module is the *description* (which table each feature uses, its dim, combiner, initialiser),
plain data read from TOML / JSON and stored in checkpoints; :mod:`ctrflow.models.feature_embedding`
is the *module* built from it (the tables and the lookups).

Example (Python)::

    cfg = FeatureConfig({
        "item_id": EmbeddingOption(shared="items"),
        "hist_items": EmbeddingOption(shared="items", combiner="mean"),   # one table with item_id
    })
    model = DLRM.from_schema("data/processed", features=cfg)

The same as a TOML (or JSON) file for ``train/fit.py --features FILE``::

    [defaults]                 # optional; every feature not overriding it
    init = "truncated_normal"
    init_scale = 0.01

    [features.item_id]
    shared = "items"

    [features.hist_items]      # a list column: used because it is named here
    shared = "items"
    combiner = "mean"          # sum | mean | concat (with concat_n = N)

    # exclude = ["C7"]         # categorical columns the model does not use

Rules: every categorical column of the schema is a feature (its options from ``defaults`` unless
named under ``features``), list columns are features only when named; features with the same
``shared`` name look up **one** table (one parameter, gradients from all of them), which has the
largest of their cardinalities; features sharing a table must agree on dim and initialiser, and a
list column's weights (schema ``weights``) are used by its combiner.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from ctrflow.models.pooling import COMBINERS

INITS = ("normal", "truncated_normal", "uniform")


@dataclass(frozen=True)
class EmbeddingOption:
    """How one feature is embedded.

    Args:
        dim: embedding dim (``None``: the model's default, e.g. the schema's dim or DLRM's D).
        shared: table name; features with the same name share one table (``None``: own table).
        combiner: for list features: ``sum``, ``mean`` (both weighted when the list has weights) or
            ``concat`` (the first ``concat_n`` embeddings side by side; RecIS's ``tile``).
        concat_n: elements kept by ``concat``.
        init: ``normal`` (N(0, scale)), ``truncated_normal`` (N(0, scale) cut at 2 scale) or
            ``uniform`` (U(-scale, scale)); ``None``: the model's default.
        init_scale: std or bound of ``init`` (``None``: 0.01 for the normals, 1/sqrt(rows) for uniform).
    """

    dim: int | None = None
    shared: str | None = None
    combiner: str = "sum"
    concat_n: int | None = None
    init: str | None = None
    init_scale: float | None = None

    def __post_init__(self) -> None:
        if self.dim is not None and int(self.dim) < 1:
            raise ValueError(f"embedding dim must be >= 1, got {self.dim}")
        if self.combiner not in COMBINERS:
            raise ValueError(f"combiner must be one of {', '.join(COMBINERS)}, got {self.combiner!r}")
        if self.combiner == "concat" and (self.concat_n is None or int(self.concat_n) < 1):
            raise ValueError(f"combiner 'concat' needs concat_n >= 1, got {self.concat_n}")
        if self.init is not None and self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.init_scale is not None and not self.init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {self.init_scale}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "") -> EmbeddingOption:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**d)

    def merged(self, default: EmbeddingOption) -> EmbeddingOption:
        """This option with unset (``None``) fields taken from ``default``."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for f in ("dim", "init", "init_scale"):
            if d[f] is None:
                d[f] = getattr(default, f)
        return EmbeddingOption(**d)


@dataclass(frozen=True)
class TableSpec:
    """One embedding table: ``cardinality`` rows of dim ``dim``, initialised by ``init``/``init_scale``."""

    name: str
    cardinality: int
    dim: int
    init: str
    init_scale: float | None


@dataclass(frozen=True)
class FeatureSpec:
    """One resolved feature.

    Attributes:
        name: column name; kind: ``categorical`` or ``list``; table: its table's name.
        cardinality: ids of this column lie in ``[0, cardinality)``.
        column: position in ``Batch.categorical`` (categoricals) or ``-1``.
        combiner, concat_n: list pooling; weights: the list's weight column (or ``None``).
    """

    name: str
    kind: str
    table: str
    cardinality: int
    column: int = -1
    combiner: str = "sum"
    concat_n: int = 1
    weights: str | None = None

    @property
    def slots(self) -> int:
        """Vectors this feature contributes: 1, or ``concat_n`` for ``concat``."""
        return self.concat_n if self.kind == "list" and self.combiner == "concat" else 1


@dataclass
class Features:
    """Resolved features and tables (JSON-safe via :meth:`to_dict`; stored in model configs)."""

    features: list[FeatureSpec]
    tables: list[TableSpec]

    @property
    def lists(self) -> list[str]:
        return [f.name for f in self.features if f.kind == "list"]

    @property
    def categorical(self) -> list[FeatureSpec]:
        return [f for f in self.features if f.kind == "categorical"]

    def table(self, name: str) -> TableSpec:
        return next(t for t in self.tables if t.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"features": [asdict(f) for f in self.features], "tables": [asdict(t) for t in self.tables]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Features:
        return cls([FeatureSpec(**f) for f in d["features"]], [TableSpec(**t) for t in d["tables"]])


@dataclass
class FeatureConfig:
    """Embedding options per feature (see the module docstring).

    Args:
        features: ``{column: EmbeddingOption}``; list columns are used only when named here.
        defaults: options of every feature not overriding them.
        exclude: categorical columns the model leaves out.
    """

    features: dict[str, EmbeddingOption] = field(default_factory=dict)
    defaults: EmbeddingOption = field(default_factory=EmbeddingOption)
    exclude: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureConfig:
        """From the parsed TOML / JSON (``features``, ``defaults``, ``exclude``); ``ValueError`` if bad."""
        unknown = sorted(set(d) - {"features", "defaults", "exclude"})
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)} (known: defaults, exclude, features)")
        feats = d.get("features", {})
        if not isinstance(feats, dict) or not all(isinstance(v, dict) for v in feats.values()):
            raise ValueError("'features' must map column names to tables of options")
        return cls(
            {k: EmbeddingOption.from_dict(v, f"feature {k!r}: ") for k, v in feats.items()},
            EmbeddingOption.from_dict(d.get("defaults", {}), "defaults: "),
            [str(x) for x in d.get("exclude", [])],
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureConfig:
        """Read a ``.toml`` or ``.json`` file; ``ValueError`` with one line if it is not a valid config."""
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise ValueError(f"cannot read feature config {path}: {e.strerror}") from None
        try:
            if path.endswith(".json"):
                d = json.loads(raw)
            else:
                import tomllib

                d = tomllib.loads(raw.decode())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid {'JSON' if path.endswith('.json') else 'TOML'}: {e}") from None
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def resolve(
        self,
        schema: Any,
        dim: int | None = None,
        max_dim: int | None = None,
        init: str = "truncated_normal",
        init_scale: float | None = None,
    ) -> Features:
        """Features and tables for a dataset's schema.

        Args:
            schema: a :class:`ctrflow.etl.schema.Schema`.
            dim: the model's dim for features without one (``None``: the schema's dim).
            max_dim: cap of schema dims (not of explicit ones).
            init, init_scale: the model's initialiser for features without one.

        Returns:
            :class:`Features`; ``ValueError`` quoting names and numbers when the config does not fit.
        """
        cols = {c.name: c for c in schema.columns}
        unknown = sorted(n for n in [*self.features, *self.exclude] if n not in cols)
        if unknown:
            raise ValueError(f"feature config names column(s) {', '.join(unknown)} that the dataset lacks")
        model_default = EmbeddingOption(dim=dim, init=init, init_scale=init_scale)
        default = self.defaults.merged(model_default)
        specs: list[FeatureSpec] = []
        per_table: dict[str, list[tuple[FeatureSpec, EmbeddingOption, int]]] = {}
        names = [(n, i) for i, n in enumerate(schema.categorical) if n not in self.exclude]
        names += [(n, -1) for n in schema.lists if n in self.features]
        for name, pos in names:
            col = cols[name]
            if name in self.features and col.kind not in ("categorical", "list"):
                raise ValueError(f"feature {name!r} is a {col.kind} column; only categorical and list columns embed")
            opt = self.features.get(name, EmbeddingOption()).merged(default)
            if col.kind == "categorical" and opt.combiner != "sum":
                raise ValueError(f"feature {name!r} is categorical (one id per row): combiner {opt.combiner!r} "
                                 "applies to list columns only")
            stored = int(col.embedding_dim or 16)
            d = opt.dim or (min(stored, max_dim) if max_dim else stored)
            spec = FeatureSpec(name, col.kind, opt.shared or name, int(col.cardinality), pos, opt.combiner,
                               int(opt.concat_n or 1), col.weights if col.kind == "list" else None)
            specs.append(spec)
            per_table.setdefault(spec.table, []).append((spec, opt, d))
        if not specs:
            raise ValueError("the feature config leaves no categorical or list feature")
        return Features(specs, [_table(name, members, cols) for name, members in per_table.items()])


def _table(name: str, members: list[tuple[FeatureSpec, EmbeddingOption, int]], cols: dict[str, Any]) -> TableSpec:
    """The table several features share; their options must agree."""
    who = ", ".join(s.name for s, _, _ in members)
    dims = {d for _, _, d in members}
    explicit = {o.dim for s, o, _ in members if o.dim is not None}
    if len(explicit) > 1 or (not explicit and len(dims) > 1):
        raise ValueError(f"table {name!r} is shared by {who} with different dims {sorted(explicit or dims)}")
    dim = explicit.pop() if explicit else dims.pop()
    inits = {(o.init, o.init_scale) for _, o, _ in members}
    if len(inits) > 1:
        raise ValueError(f"table {name!r} is shared by {who} with different initialisers {sorted(inits, key=str)}")
    vocabs = {cols[s.name].vocabulary for s, _, _ in members if cols[s.name].vocabulary}
    if len(vocabs) > 1:
        raise ValueError(f"table {name!r} is shared by {who}, whose ids come from different vocabularies "
                         f"{sorted(vocabs)}: the same id would mean different values")
    init, scale = inits.pop()
    return TableSpec(name, max(s.cardinality for s, _, _ in members), int(dim), init, scale)


@torch.no_grad()
def init_table(weight: torch.Tensor, init: str, scale: float | None) -> None:
    """Initialise one table's rows ``weight`` [rows, D] in place (see :class:`EmbeddingOption`)."""
    if init == "uniform":
        bound = scale if scale is not None else math.sqrt(1.0 / weight.shape[0])
        weight.uniform_(-bound, bound)
    elif init == "normal":
        weight.normal_(0.0, scale if scale is not None else 0.01)
    elif init == "truncated_normal":
        std = scale if scale is not None else 0.01
        torch.nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
    else:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")


def as_features(features: Any, schema: Any = None, **resolve_kwargs: Any) -> Features:
    """:class:`Features` from resolved features, their dict, a config, a config dict or a config file path.

    Configs are resolved against ``schema`` with ``resolve_kwargs`` (see :meth:`FeatureConfig.resolve`).
    """
    if isinstance(features, Features):
        return features
    if isinstance(features, dict) and "tables" in features:
        return Features.from_dict(features)
    if isinstance(features, (str, os.PathLike)):
        features = FeatureConfig.load(features)
    elif isinstance(features, dict):
        features = FeatureConfig.from_dict(features)
    if not isinstance(features, FeatureConfig):
        raise TypeError(f"features must be a FeatureConfig, a dict or a file path, not {type(features).__name__}")
    if schema is None:
        raise ValueError("a feature config needs the dataset's schema to resolve")
    return features.resolve(schema, **resolve_kwargs)
