"""``FeatureEmbedding``: categorical and list features over (possibly shared) tables.

The ``nn.Module`` built from the options that :mod:`ctrflow.models.features` describes (that module
holds no tensors; this one holds the tables and does the lookups).

Tables of one dim live in one :class:`~ctrflow.models.embedding.FusedEmbedding` (so the row-sparse
optimizers, ``sparse_embedding_modules`` and everything that walks fused tables keep working); a
feature is a row range of one of them. Features that share a table use the **same** row range, so
their lookups read one parameter and their gradients add up in it.

Per dim group the categorical features are looked up with one ``F.embedding`` on ``ids + start``
([B, F_g, D]); each list feature is pooled with one ``F.embedding_bag`` (or the concat combiner) on
its values + offsets (see :mod:`ctrflow.models.pooling`).

Shapes: B = rows, F = features, D = dim, N = list elements.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ctrflow.models.embedding import FusedEmbedding
from ctrflow.models.features import Features, init_table
from ctrflow.models.pooling import pool


class FeatureEmbedding(nn.Module):
    """Embeds the features of a :class:`~ctrflow.models.features.Features`.

    An :class:`~ctrflow.models.embedding_part.EmbeddingPart`: a model holds it as ``features``
    (checkpoint keys ``features.groups.<k>.weight``, k-th smallest table dim).

    Args:
        features: resolved features and tables (``FeatureConfig.resolve(schema)``).
        sparse: sparse gradients for the tables.
    """

    module_name: ClassVar[str] = "features"

    def __init__(self, features: Features, sparse: bool = True) -> None:
        super().__init__()
        self.spec = features
        self.sparse = bool(sparse)
        dims = sorted({t.dim for t in features.tables})
        self.dims = dims
        self.groups = nn.ModuleList()
        where: dict[str, tuple[int, int]] = {}  # table -> (group, first row in the group's weight)
        for g, d in enumerate(dims):
            tabs = [t for t in features.tables if t.dim == d]
            fused = FusedEmbedding([t.cardinality for t in tabs], d, sparse=sparse)
            for t, start in zip(tabs, fused.offsets.tolist(), strict=True):
                init_table(fused.weight.data[start : start + t.cardinality], t.init, t.init_scale)
                where[t.name] = (g, start)
            self.groups.append(fused)
        self.where = where
        self.n_cat_columns = max((f.column for f in features.categorical), default=-1) + 1
        self.cat_groups: list[int] = []
        for g in range(len(dims)):
            feats = [f for f in features.categorical if where[f.table][0] == g]
            if not feats:
                continue
            self.cat_groups.append(g)
            self.register_buffer(f"cols_{g}", torch.tensor([f.column for f in feats]), persistent=False)
            self.register_buffer(f"starts_{g}", torch.tensor([where[f.table][1] for f in feats]), persistent=False)
        self.list_features = [f for f in features.features if f.kind == "list"]
        # [B, slots, D] blocks in forward order: categorical groups, then list features.
        self.slots = [sum(1 for f in features.categorical if where[f.table][0] == g) for g in self.cat_groups]
        self.slots += [f.slots for f in self.list_features]
        self.block_dims = [dims[g] for g in self.cat_groups] + [dims[where[f.table][0]] for f in self.list_features]

    @property
    def emb_szs(self) -> list[tuple[int, int]]:
        """``(cardinality, dim)`` of each categorical feature, in feature order."""
        return [(f.cardinality, self.spec.table(f.table).dim) for f in self.spec.categorical]

    @property
    def num_columns(self) -> int:
        """Categorical columns a batch must hold (the highest column used + 1)."""
        return self.n_cat_columns

    @property
    def config(self) -> dict[str, Any]:
        """What a model holding this part adds to its config: ``{"features": resolved features}``."""
        return {"features": self.spec.to_dict()}

    @property
    def num_slots(self) -> int:
        """Vectors per row (categoricals + one per pooled list, ``concat_n`` per concat list)."""
        return sum(self.slots)

    @property
    def out_features(self) -> int:
        """Width of the flattened output: sum of slots x dims."""
        return sum(s * d for s, d in zip(self.slots, self.block_dims, strict=True))

    def table_slices(self) -> dict[str, tuple[FusedEmbedding, int, int]]:
        """``{table: (fused module, first row, rows)}``: where every table's rows live."""
        out = {}
        for t in self.spec.tables:
            g, start = self.where[t.name]
            out[t.name] = (self.groups[g], start, t.cardinality)
        return out

    def forward(
        self,
        categorical: torch.Tensor | None,
        lists: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        weights: Mapping[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Embed every feature.

        Args:
            categorical: [B, n_cat] ids (the loader's column-major view is fine).
            lists: ``{name: (values [N], offsets [B + 1])}`` (or padded ``(ids [B, L], lengths [B])``).
            weights: ``{name: [N]}`` (or ``[B, L]`` when padded) per-element weights.

        Returns:
            Blocks ``[B, slots_i, D_i]``: one per categorical dim group, then one per list feature.
        """
        out = []
        if self.cat_groups:
            if categorical is None or categorical.dim() != 2 or categorical.shape[1] < self.n_cat_columns:
                got = None if categorical is None else list(categorical.shape)
                raise ValueError(f"expected categorical ids of shape [B, >= {self.n_cat_columns}], got {got}")
            ids_t = categorical.t()
            for g in self.cat_groups:
                cols = getattr(self, f"cols_{g}")
                idx = ids_t.index_select(0, cols).to(torch.int64) + getattr(self, f"starts_{g}")[:, None]
                emb = F.embedding(idx.reshape(-1), self.groups[g].weight, sparse=self.sparse)
                out.append(emb.view(cols.shape[0], -1, self.dims[g]).transpose(0, 1))
        for f in self.list_features:
            if lists is None or f.name not in lists:
                raise ValueError(f"the batch has no list feature {f.name!r} (load it: Loader(lists=[...]))")
            ids, offsets = lists[f.name]
            w = None if weights is None or f.weights is None else weights.get(f.name)
            if ids.dim() == 2:  # padded: (ids [B, L], lengths [B])
                from ctrflow.loader.jagged import from_padded

                if w is not None:
                    w, _ = from_padded(w, offsets)
                ids, offsets = from_padded(ids, offsets)
            g, start = self.where[f.table]
            pooled = pool(self.groups[g].weight, ids, offsets, f.combiner, w, start, f.concat_n, self.sparse)
            out.append(pooled.unsqueeze(1) if pooled.dim() == 2 else pooled)
        return out

    @torch.no_grad()
    def check_input(self, categorical: torch.Tensor | None, lists: Mapping[str, tuple] | None = None) -> None:
        """Raise ``ValueError`` naming the first feature whose ids fall outside its column's cardinality."""
        for f in self.spec.categorical:
            if categorical is None or categorical.shape[1] <= f.column:
                raise ValueError(f"the data has no categorical column {f.column} ({f.name!r})")
            _check_range(categorical[:, f.column], f.name, f.cardinality)
        for f in self.list_features:
            if lists is not None and f.name in lists:
                _check_range(lists[f.name][0], f.name, f.cardinality)


def _check_range(ids: torch.Tensor, name: str, card: int) -> None:
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= card:
        raise ValueError(f"feature {name!r}: ids span [{lo}, {hi}] but its table has {card} rows "
                         "(the data does not match the model's schema)")


def features_columns(features: Features) -> int:
    """Categorical columns a batch must hold for ``features`` (the highest column used + 1)."""
    return max((f.column for f in features.categorical), default=-1) + 1
