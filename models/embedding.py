"""Embedding tables that stay fast with many large tables on CPU and GPU.

``FusedEmbedding`` stores F tables of one dim D as **one** ``[sum(cardinalities), D]`` weight and
looks every feature up with a single ``F.embedding`` call on ``ids + offsets`` (one kernel instead of
F). With ``sparse=True`` (the default) the backward pass yields a sparse gradient that holds only the
rows the batch used, so an optimizer from :mod:`ctrflow.train.optim` updates those rows and never
touches the millions of others (a dense Adam step over 26 tables of up to 1M rows costs seconds).

``SparseArch`` (F tables of one dim: DLRM's) and ``EmbeddingTables`` (features of mixed dims, fastai's
``emb_szs``: one fused table per distinct dim) are the plain embedding parts of the models (see
:mod:`ctrflow.models.embedding_part`).

Shapes: B = batch rows, F = categorical features, D = embedding dim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class FusedEmbedding(nn.Module):
    """F embedding tables of the same dim held in one weight.

    Args:
        cardinalities: rows of each table [F] (ids of feature i must lie in ``[0, cardinalities[i])``).
        dim: embedding dim D shared by every table.
        sparse: produce sparse gradients (only the rows used); pair with a sparse-capable optimizer
            (``ctrflow.train.optim`` or ``torch.optim.SGD/Adagrad/SparseAdam``).
        init: ``"normal"`` (truncated normal, std ``std``: fastai's) or ``"uniform"``
            (``U(-1/sqrt(card), 1/sqrt(card))`` per table: torchrec's default).
        std: standard deviation for ``init="normal"``.
    """

    def __init__(
        self,
        cardinalities: Sequence[int],
        dim: int,
        sparse: bool = True,
        init: str = "normal",
        std: float = 0.01,
    ) -> None:
        super().__init__()
        cards = [int(c) for c in cardinalities]
        if not cards:
            raise ValueError("FusedEmbedding needs at least one table")
        bad = [(i, c) for i, c in enumerate(cards) if c < 1]
        if bad:
            raise ValueError(f"every cardinality must be >= 1, got {bad} (feature index, cardinality)")
        if dim < 1:
            raise ValueError(f"embedding dim must be >= 1, got {dim}")
        if init not in ("normal", "uniform"):
            raise ValueError(f"init must be 'normal' or 'uniform', got {init!r}")
        self.cardinalities = cards
        self.dim = int(dim)
        self.sparse = bool(sparse)
        self.init = init
        self.std = float(std)
        starts = [0]
        for c in cards[:-1]:
            starts.append(starts[-1] + c)
        self.weight = nn.Parameter(torch.empty(sum(cards), self.dim))
        # Not persistent: derived from the cardinalities, which the checkpoint config carries.
        self.register_buffer("offsets", torch.tensor(starts, dtype=torch.int64), persistent=False)
        self.reset_parameters()

    @property
    def num_features(self) -> int:
        return len(self.cardinalities)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "normal":
                nn.init.trunc_normal_(self.weight, std=self.std, a=-2 * self.std, b=2 * self.std)
                return
            for start, card in zip(self.offsets.tolist(), self.cardinalities, strict=False):
                bound = math.sqrt(1.0 / card)
                self.weight[start : start + card].uniform_(-bound, bound)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Look up every feature.

        Args:
            ids: [B, F] integer ids, any layout (the loader's column-major view is read as is).

        Returns:
            [B, F, D] embeddings (a transposed view of a feature-major [F, B, D] buffer).
        """
        if ids.dim() != 2 or ids.shape[1] != self.num_features:
            raise ValueError(
                f"expected categorical ids of shape [B, {self.num_features}], got {list(ids.shape)}"
            )
        b, f = ids.shape
        # Feature-major [F, B]: for the loader's column-major batches this is a plain copy + cast,
        # and each table's rows are then read together.
        idx = torch.empty((f, b), dtype=torch.int64, device=ids.device)
        idx.copy_(ids.t())
        idx += self.offsets[:, None]
        out = F.embedding(idx.view(-1), self.weight, sparse=self.sparse)
        return out.view(f, b, self.dim).transpose(0, 1)

    def check_ids(self, ids: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the first feature whose ids fall outside its table."""
        check_ids(ids, self.cardinalities)

    def extra_repr(self) -> str:
        return f"tables={self.num_features}, rows={self.weight.shape[0]}, dim={self.dim}, sparse={self.sparse}"


class _PlainTables:
    """What the plain table parts share: one slot per categorical column (``emb_szs``: (cardinality, dim)
    each), no list features and no configuration of their own."""

    emb_szs: list[tuple[int, int]]

    @property
    def num_columns(self) -> int:
        return len(self.emb_szs)

    @property
    def config(self) -> dict[str, Any]:
        return {}  # nothing beyond the model's own arguments

    @property
    def num_slots(self) -> int:
        return len(self.emb_szs)


class SparseArch(_PlainTables, nn.Module):
    """One embedding table per categorical feature, all of dim D, fused into one weight (DLRM's).

    An :class:`~ctrflow.models.embedding_part.EmbeddingPart`: a model holds it as ``sparse_arch``
    (checkpoint key ``sparse_arch.embedding.weight``).

    Args:
        cardinalities: rows of each table [F].
        dim: D.
        sparse: sparse gradients; init: ``"uniform"`` (torchrec's) or ``"normal"``.
    """

    module_name: ClassVar[str] = "sparse_arch"
    list_features: ClassVar[tuple[Any, ...]] = ()  # no list features

    def __init__(self, cardinalities: Sequence[int], dim: int, sparse: bool = True, init: str = "uniform"):
        super().__init__()
        cards = [int(c) for c in cardinalities]
        if not cards:
            raise ValueError("SparseArch needs at least one categorical feature (cardinalities=[])")
        self.embedding = FusedEmbedding(cards, dim, sparse=sparse, init=init)
        self.emb_szs = [(c, int(dim)) for c in cards]
        self.dims = [int(dim)]


    @property
    def out_features(self) -> int:
        return len(self.emb_szs) * self.dims[0]

    def forward(self, categorical: torch.Tensor, lists: Any = None, weights: Any = None) -> list[torch.Tensor]:
        """Args: categorical [B, F] ids (``lists`` / ``weights`` unused). Returns: ``[[B, F, D]]``."""
        return [self.embedding(categorical)]

    def check_input(self, categorical: torch.Tensor | None, lists: Any = None) -> None:
        """Raise ``ValueError`` naming the first feature whose ids fall outside its table."""
        check_ids(_ids_or_empty(categorical), [c for c, _ in self.emb_szs])


class EmbeddingTables(_PlainTables, nn.Module):
    """Embeddings of features with mixed dims: one :class:`FusedEmbedding` per distinct dim.

    An :class:`~ctrflow.models.embedding_part.EmbeddingPart`: a model holds it as ``embeds`` (checkpoint
    keys ``embeds.groups.<k>.weight``, k-th smallest dim). No features (``emb_szs=[]``) is allowed: a
    part with nothing to embed.

    Args:
        emb_szs: ``[(cardinality, dim), ...]`` per feature, in the order of the categorical columns.
        sparse, init, std: passed to every :class:`FusedEmbedding`.
    """

    module_name: ClassVar[str] = "embeds"
    list_features: ClassVar[tuple[Any, ...]] = ()  # no list features

    def __init__(
        self,
        emb_szs: Sequence[tuple[int, int]],
        sparse: bool = True,
        init: str = "normal",
        std: float = 0.01,
    ) -> None:
        super().__init__()
        self.emb_szs = [(int(n), int(d)) for n, d in emb_szs]
        dims = sorted({d for _, d in self.emb_szs})
        self.groups = nn.ModuleList()
        self.slots: list[int] = []
        for d in dims:
            feats = [i for i, (_, di) in enumerate(self.emb_szs) if di == d]
            self.register_buffer(f"features_{d}", torch.tensor(feats, dtype=torch.int64), persistent=False)
            self.groups.append(FusedEmbedding([self.emb_szs[i][0] for i in feats], d, sparse, init, std))
            self.slots.append(len(feats))
        self.dims = dims
        self.out_features = sum(d for _, d in self.emb_szs)

    @property
    def num_features(self) -> int:
        return len(self.emb_szs)


    def _group_ids(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        if len(self.groups) == 1:
            return ids
        return ids.index_select(1, getattr(self, f"features_{self.dims[k]}"))

    def forward(self, categorical: torch.Tensor, lists: Any = None, weights: Any = None) -> list[torch.Tensor]:
        """Args: categorical [B, F] ids (``lists`` / ``weights`` unused).

        Returns: one block [B, F_k, D_k] per distinct dim D_k (ascending); F_k features have that dim.
        """
        ids = categorical
        if ids.dim() != 2 or ids.shape[1] != self.num_features:
            raise ValueError(
                f"expected categorical ids of shape [B, {self.num_features}], got {list(ids.shape)}"
            )
        return [g(self._group_ids(ids, k)) for k, g in enumerate(self.groups)]

    def check_ids(self, ids: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the first feature whose ids fall outside its table."""
        check_ids(ids, [n for n, _ in self.emb_szs])

    def check_input(self, categorical: torch.Tensor | None, lists: Any = None) -> None:
        """:meth:`check_ids`; no categorical input (``None`` or ``[B, 0]``) fits a part without features."""
        self.check_ids(_ids_or_empty(categorical))


def _ids_or_empty(categorical: torch.Tensor | None) -> torch.Tensor:
    """``categorical``, or ``[0, 0]`` ids for ``None`` (a batch without categorical columns)."""
    return torch.zeros((0, 0), dtype=torch.int64) if categorical is None else categorical


@torch.no_grad()
def check_ids(ids: torch.Tensor, cardinalities: Sequence[int]) -> None:
    """Raise ``ValueError`` if ``ids`` [B, F] do not fit tables of these cardinalities [F].

    An id past a table's end would otherwise silently read the next table's rows of a fused weight.
    """
    if ids.dim() != 2 or ids.shape[1] != len(cardinalities):
        raise ValueError(
            f"the data has {ids.shape[1] if ids.dim() == 2 else '?'} categorical columns, "
            f"the model {len(cardinalities)}"
        )
    if ids.numel() == 0:
        return
    lo = ids.amin(dim=0).tolist()
    hi = ids.amax(dim=0).tolist()
    for i, (mn, mx, card) in enumerate(zip(lo, hi, cardinalities, strict=False)):
        if mn < 0 or mx >= card:
            raise ValueError(
                f"categorical feature {i}: ids span [{mn}, {mx}] but its table has {card} rows "
                "(the data does not match the model's schema)"
            )


def sparse_embedding_modules(model: nn.Module) -> list[nn.Module]:
    """Modules of ``model`` whose weight gets sparse gradients (ours, ``nn.Embedding(sparse=True)``...)."""
    out = []
    for m in model.modules():
        if isinstance(m, FusedEmbedding) and m.sparse:
            out.append(m)
        elif isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse:
            out.append(m)
    return out
