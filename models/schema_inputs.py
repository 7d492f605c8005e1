"""What a per-feature-dims model (TabularModel, DCN-v2) reads off a processed dataset's schema."""

from __future__ import annotations

import os
from typing import Any

from ctrflow.models.defaults import NUMERIC_DIM
from ctrflow.models.features import as_features
from ctrflow.models.numeric import numeric_config
from ctrflow.models.sizes import as_schema, embedding_sizes


def schema_inputs(schema: Any, kwargs: dict[str, Any], max_dim: int | None, embedding_dim: int | None,
                  init: str, numeric_embedding: str | None, numeric_dim: int | None) -> tuple[list, int]:
    """Embedding sizes and continuous-column count from ``schema``; resolves ``kwargs["features"]``
    against it and sets ``kwargs["numeric"]`` when a numeric embedding is asked for (in place).

    Args:
        schema: a :class:`~ctrflow.etl.schema.Schema`, its path, or the dataset dir.
        kwargs: the model's other constructor arguments (``features=`` is resolved here).
        max_dim, embedding_dim: cap of the stored per-feature dims / one dim for every table.
        init: the embedding initialiser the feature options default to.
        numeric_embedding, numeric_dim: ``"ple"`` / ``"periodic"`` and its d (default
            :data:`~ctrflow.models.defaults.NUMERIC_DIM` of the kind), or None.

    Returns:
        ``(emb_szs [(cardinality, dim)], n_cont)``.
    """
    if isinstance(schema, (str, os.PathLike)):
        schema = as_schema(schema)
    if kwargs.get("features") is not None:
        kwargs["features"] = as_features(kwargs["features"], as_schema(schema), dim=embedding_dim,
                                         max_dim=max_dim, init=init)
    if numeric_embedding is not None:
        kwargs["numeric"] = numeric_config(numeric_embedding, schema,
                                           numeric_dim or NUMERIC_DIM.get(numeric_embedding, 0))
    return embedding_sizes(schema, max_dim=max_dim, dim=embedding_dim), len(as_schema(schema).continuous)
