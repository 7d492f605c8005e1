"""A model's embedding part: one interface over the plain fused tables and per-feature tables.

Every ctrflow model gets its embeddings ready-made from :func:`build_embedding` (as torchrec's
``DLRM(embedding_bag_collection, ...)`` receives its ``EmbeddingBagCollection``) and calls them the same
way whatever they hold:

* :class:`~ctrflow.models.embedding.SparseArch`: one table per categorical column, one dim (DLRM's);
* :class:`~ctrflow.models.embedding.EmbeddingTables`: one table per categorical column, mixed dims;
* :class:`~ctrflow.models.feature_embedding.FeatureEmbedding`: per-feature options (shared tables,
  list features pooled by a combiner; :mod:`ctrflow.models.features`).

A model (a :class:`HasEmbeddingPart`) registers its part under the part's ``module_name``
(``sparse_arch``, ``embeds`` or ``features``), so the checkpoint keys are those the models have always
written.

Shapes: B = rows, F = categorical columns, S = slots (vectors per row), D = embedding dim.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ctrflow.models.embedding import EmbeddingTables, SparseArch
from ctrflow.models.feature_embedding import FeatureEmbedding
from ctrflow.models.features import as_features


@runtime_checkable
class EmbeddingPart(Protocol):
    """What a model reads from its embedding part.

    Attributes:
        module_name: the attribute a model holds it under (its checkpoint keys start with it).
        emb_szs: ``(cardinality, dim)`` of each categorical feature.
        dims: the distinct dims of its tables, ascending.
        num_columns: categorical columns a batch must hold.
        num_slots: vectors per row S (categoricals, one per pooled list, ``concat_n`` per concat list).
        out_features: width of the flattened output, sum over blocks of slots x dim.
        list_features: the list features it reads (``FeatureSpec``; empty: none).
        config: what a model holding it adds to its config (``{"features": ...}`` or ``{}``).
    """

    module_name: str
    emb_szs: list[tuple[int, int]]
    dims: list[int]
    list_features: Sequence[Any]

    @property
    def num_columns(self) -> int: ...

    @property
    def num_slots(self) -> int: ...

    @property
    def out_features(self) -> int: ...

    @property
    def config(self) -> dict[str, Any]: ...

    def __call__(self, categorical: torch.Tensor | None, lists: Mapping[str, Any] | None = None,
                 weights: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Blocks ``[B, S_i, D_i]`` (their slots add up to S)."""
        ...

    def check_input(self, categorical: torch.Tensor | None, lists: Mapping[str, Any] | None = None) -> None:
        """``ValueError`` naming the first feature whose ids do not fit its table."""
        ...


class HasEmbeddingPart(nn.Module):
    """Base of the models: one embedding part, held under its ``module_name``.

    Gives :attr:`embedding_part`, :attr:`takes_lists` and :attr:`features` (the per-feature part or
    ``None``, as the models have always had it).
    """

    embedding_name: str

    def set_embedding_part(self, part: EmbeddingPart) -> None:
        """Register ``part`` as ``self.<part.module_name>`` (the prefix of its checkpoint keys)."""
        name = part.module_name
        if name in self._modules or name in self.__dict__:
            raise ValueError(f"the model already has an attribute {name!r}")
        self._modules[name] = part  # not add_module: ``features`` is also a property of this class
        self.embedding_name = name

    @property
    def embedding_part(self) -> EmbeddingPart:
        """The embedding part (see :mod:`ctrflow.models.embedding_part`)."""
        return self._modules[self.embedding_name]

    @property
    def features(self) -> FeatureEmbedding | None:
        """The per-feature embedding part (``features=`` options), or ``None`` for plain tables."""
        part = self._modules.get("features")
        return part if isinstance(part, FeatureEmbedding) else None

    @property
    def takes_lists(self) -> bool:
        """The model reads list features (the trainer then passes ``lists=`` / ``weights=``)."""
        return bool(self.embedding_part.list_features)


def build_embedding(
    emb_szs: Sequence[tuple[int, int]],
    features: Any = None,
    sparse: bool = True,
    init: str = "normal",
    one_dim: bool = False,
) -> EmbeddingPart:
    """The embedding part for these tables (the models' one factory).

    Args:
        emb_szs: ``[(cardinality, dim), ...]`` per categorical column (ignored with ``features``).
        features: per-feature options, resolved (:class:`~ctrflow.models.features.Features` or its dict):
            a :class:`FeatureEmbedding` (its tables initialised by their own options).
        sparse: sparse gradients for every table.
        init: ``"normal"`` or ``"uniform"`` (plain tables; see :class:`~ctrflow.models.embedding.FusedEmbedding`).
        one_dim: every ``emb_szs`` dim is the same: one fused table, :class:`SparseArch` (DLRM's layout),
            instead of one per dim (:class:`EmbeddingTables`).

    Returns:
        The part; ``ValueError`` quoting the numbers when the sizes do not fit.
    """
    if features is not None:
        return FeatureEmbedding(as_features(features), sparse=sparse)
    sizes = [(int(n), int(d)) for n, d in emb_szs]
    if one_dim:
        dims = sorted({d for _, d in sizes})
        if len(dims) > 1:
            raise ValueError(f"one_dim needs one embedding dim for every table, got dims {dims}")
        return SparseArch([n for n, _ in sizes], dims[0] if dims else 1, sparse=sparse, init=init)
    return EmbeddingTables(sizes, sparse=sparse, init=init)


def stack_slots(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Blocks ``[B, S_i, D]`` of one dim -> ``[B, S, D]`` (no copy for one block)."""
    return blocks[0] if len(blocks) == 1 else torch.cat(list(blocks), dim=1)


def flatten_slots(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Blocks ``[B, S_i, D_i]`` -> ``[B, sum_i S_i * D_i]``, block after block."""
    flat = [x.reshape(x.shape[0], -1) for x in blocks]
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)
