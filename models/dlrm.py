"""DLRM (Naumov et al. 2019) split into torchrec's small named archs.

::

    continuous [B, n_cont] -> DenseArch (MLP, ReLU) ------------> dense [B, D] --+
    ids [B, F] -> embedding part (SparseArch: F tables in one weight) -> sparse [B, F, D] --+
        -> InteractionArch: [dense, all pairwise dots of (dense, sparse_1..F)]  [B, D + F(F+1)/2]
        -> OverArch (MLP, ReLU, last layer linear) -> logits [B, 1]

With per-feature options (``features=``) the embedding part is a
:class:`~ctrflow.models.feature_embedding.FeatureEmbedding` and F counts its slots (list features too).
With a numeric embedding (``numeric=``, :mod:`ctrflow.models.numeric`) each continuous column is one more
sparse slot: sparse = [ids' embeddings, numeric(continuous) [B, n_cont, D]], F + n_cont slots in the
interaction; the dense arch still reads the raw continuous columns.

Same layout and initialisation as torchrec's ``torchrec/models/dlrm.py`` (embedding rows
``U(-1/sqrt(card), 1/sqrt(card))``), so the benchmark compares like with like; the difference is the
embedding implementation (one fused lookup with sparse gradients instead of an
``EmbeddingBagCollection`` over a KeyedJaggedTensor).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ctrflow.models.defaults import DLRM_EMBEDDING_DIM, HIDDEN, NUMERIC_DIM
from ctrflow.models.embedding import SparseArch
from ctrflow.models.embedding_part import HasEmbeddingPart, build_embedding, stack_slots
from ctrflow.models.features import as_features
from ctrflow.models.mlp import mlp
from ctrflow.models.numeric import build_numeric, numeric_config
from ctrflow.models.sizes import as_schema, embedding_sizes

__all__ = ["DLRM", "DenseArch", "InteractionArch", "OverArch", "SparseArch", "mlp"]


class DenseArch(nn.Module):
    """Bottom MLP over the continuous inputs: [B, n_cont] -> [B, D] (ReLU after every layer, ``dropout``
    after every layer but the last)."""

    def __init__(self, in_features: int, layer_sizes: Sequence[int], dropout: float = 0.0):
        super().__init__()
        self.model = mlp(in_features, layer_sizes, last_activation=True, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class InteractionArch(nn.Module):
    """Pairwise dot products between the dense output and every embedding.

    Args:
        num_sparse_features: F.

    Forward: dense [B, D], sparse [B, F, D] -> [B, D + F(F+1)/2]: the dense vector followed by the
    upper triangle (without diagonal) of the (F+1) x (F+1) Gram matrix of (dense, sparse_1..F).
    """

    def __init__(self, num_sparse_features: int):
        super().__init__()
        self.F = int(num_sparse_features)
        tri = torch.triu_indices(self.F + 1, self.F + 1, offset=1)
        # Flat indices into the [F+1, F+1] Gram matrix: one gather instead of two-index indexing.
        self.register_buffer("triu_flat", tri[0] * (self.F + 1) + tri[1], persistent=False)

    @property
    def out_features_extra(self) -> int:
        return self.F * (self.F + 1) // 2

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        if self.F <= 0:
            return dense
        b = dense.shape[0]
        combined = torch.cat((dense.unsqueeze(1), sparse), dim=1)  # [B, F+1, D]
        gram = torch.bmm(combined, combined.transpose(1, 2))  # [B, F+1, F+1]
        pairs = gram.reshape(b, -1).index_select(1, self.triu_flat)  # [B, F(F+1)/2]
        return torch.cat((dense, pairs), dim=1)


class OverArch(nn.Module):
    """Top MLP: ReLU (then ``dropout``) after every layer but the last, which outputs the logits."""

    def __init__(self, in_features: int, layer_sizes: Sequence[int], dropout: float = 0.0):
        super().__init__()
        if not layer_sizes:
            raise ValueError("OverArch needs at least one layer (the output)")
        self.model = mlp(in_features, layer_sizes, last_activation=False, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


NUMERIC_INPUTS = ("mlp", "slots")  # where DLRM puts a numeric embedding (see DLRM's numeric_input)


class DLRM(HasEmbeddingPart):
    """Deep Learning Recommendation Model, returning logits [B, 1].

    Args:
        cardinalities: rows of each categorical feature's table [F].
        n_cont: continuous inputs (at least 1: the dense arch feeds the interaction).
        embedding_dim: D, shared by every table and by the dense arch's output.
        dense_arch_layer_sizes: bottom MLP widths; the last must equal ``embedding_dim``.
        over_arch_layer_sizes: top MLP widths; the last is the output width (1).
        sparse: sparse embedding gradients (see :mod:`ctrflow.models.embedding`).
        init: embedding init, ``"uniform"`` (torchrec's) or ``"normal"``.
        features: per-feature embedding options (resolved :class:`~ctrflow.models.features.Features`
            or their dict), replacing one table per column: shared tables, list features pooled into
            one more sparse feature each (``concat`` lists: ``concat_n`` more). Every table's dim
            must be ``embedding_dim``; ``cardinalities`` is then ignored. Without it: as before.
        dropout: dropout after every hidden layer of the bottom and top MLPs (not after the bottom's
            output, the dense vector of the interaction); 0 (default): none, and no Dropout modules.
        numeric: a numeric embedding's ``config`` (:func:`~ctrflow.models.numeric.numeric_config`), held as
            ``numeric``. None (default): none, the bottom MLP reads the raw columns.
        numeric_input: where the numeric embedding goes. ``"mlp"``: its [B, n_cont, d] output, flattened,
            joins the raw columns as the bottom MLP's input (n_cont * (1 + d) features; any d); ``"slots"``:
            each column becomes one more sparse slot of the interaction (d must be ``embedding_dim``; the
            Gram matrix grows from (F+1)^2 to (F+1+n_cont)^2: 205 s instead of 141 s for one epoch of the
            embedded data). ``from_schema`` builds ``"mlp"`` (valid AUC 0.77434 vs 0.77407 for slots there,
            bench/RESULTS.md "Rare rows warm up, numeric embeddings by default"); ``"slots"``, the constructor's
            default, is what configs saved before ``numeric_input`` existed meant.

    The embedding part (:func:`~ctrflow.models.embedding_part.build_embedding`) is held as
    ``sparse_arch`` (plain tables) or ``features`` (per-feature options): :attr:`embedding_part`.
    """

    def __init__(
        self,
        cardinalities: Sequence[int],
        n_cont: int,
        embedding_dim: int = DLRM_EMBEDDING_DIM,
        dense_arch_layer_sizes: Sequence[int] = (*HIDDEN, DLRM_EMBEDDING_DIM),
        over_arch_layer_sizes: Sequence[int] = (*HIDDEN, 1),
        sparse: bool = True,
        init: str = "uniform",
        features: Any = None,
        dropout: float = 0.0,
        numeric: dict[str, Any] | None = None,
        numeric_input: str = "slots",
    ) -> None:
        super().__init__()
        if numeric_input not in NUMERIC_INPUTS:
            raise ValueError(f"numeric_input must be one of {NUMERIC_INPUTS}, got {numeric_input!r}")
        slots = numeric is not None and numeric_input == "slots"
        dense_sizes = [int(x) for x in dense_arch_layer_sizes]
        over_sizes = [int(x) for x in over_arch_layer_sizes]
        if n_cont < 1:
            raise ValueError(f"DLRM needs at least one continuous input (n_cont={n_cont}); use TabularModel")
        if not dense_sizes or dense_sizes[-1] != embedding_dim:
            raise ValueError(
                f"the dense arch's last layer must equal embedding_dim={embedding_dim} "
                f"(got dense_arch_layer_sizes={dense_sizes})"
            )
        if not over_sizes:
            raise ValueError("over_arch_layer_sizes must hold at least the output width")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        part = build_embedding([(c, embedding_dim) for c in cardinalities], features, sparse=sparse, init=init,
                               one_dim=True)
        if part.dims != [embedding_dim]:
            raise ValueError(f"DLRM needs every table of dim embedding_dim={embedding_dim}; got dims {part.dims}")
        self.config: dict[str, Any] = {
            "cardinalities": [c for c, _ in part.emb_szs] or [1], "n_cont": int(n_cont),
            "embedding_dim": int(embedding_dim), "dense_arch_layer_sizes": dense_sizes,
            "over_arch_layer_sizes": over_sizes, "sparse": sparse, "init": init,
            **({"dropout": float(dropout)} if dropout else {}), **part.config,
            **({"numeric_input": numeric_input} if numeric is not None else {}),
        }
        self.n_cat = part.num_columns
        self.n_cont = int(n_cont)
        self.set_embedding_part(part)
        self.numeric_slots = slots
        numeric_width = 0
        if numeric is not None and not slots:
            with torch.device("meta"):  # its width only; the weights are drawn last, below
                numeric_width = self.n_cont * build_numeric(numeric, self.n_cont).out_features
        self.dense_arch = DenseArch(n_cont + numeric_width, dense_sizes, dropout)
        self.inter_arch = InteractionArch(part.num_slots + (self.n_cont if slots else 0))
        self.over_arch = OverArch(embedding_dim + self.inter_arch.out_features_extra, over_sizes, dropout)
        # Made last: the tables and the MLPs draw the same initial weights as without it (as slots).
        # [B, n_cont] -> [B, n_cont, d]
        self.numeric = build_numeric(numeric, self.n_cont, dim=int(embedding_dim) if slots else None)
        if self.numeric is not None:
            self.config["numeric"] = self.numeric.config  # the same dict: see PLE._load_from_state_dict

    @classmethod
    def from_schema(
        cls,
        schema: Any,
        embedding_dim: int = DLRM_EMBEDDING_DIM,
        dense_arch_layer_sizes: Sequence[int] | None = None,
        over_arch_layer_sizes: Sequence[int] = (*HIDDEN, 1),
        numeric_embedding: str | None = None,
        numeric_dim: int | None = None,
        numeric_input: str = "mlp",
        **kwargs: Any,
    ) -> DLRM:
        """Build from a processed dataset's schema (a :class:`Schema`, its path, or the dataset dir).

        Every table gets ``embedding_dim`` (DLRM's interaction needs one dim); the cardinalities come
        from the schema. ``dense_arch_layer_sizes`` defaults to ``[*HIDDEN, embedding_dim]``
        (:mod:`ctrflow.models.defaults`).
        ``features=`` a :class:`~ctrflow.models.features.FeatureConfig` (or its dict / file path) sets
        per-feature options (shared tables, list features); see :mod:`ctrflow.models.features`.
        ``numeric_embedding="ple"`` (edges: the schema's quantiles; ``ValueError`` without them) or
        ``"periodic"`` embeds each continuous column (see :mod:`ctrflow.models.numeric`): into the bottom MLP's
        input (``numeric_input="mlp"``; ``numeric_dim`` per column, default :data:`NUMERIC_DIM`) or as one more
        sparse slot each (``"slots"``; ``numeric_dim`` must be ``embedding_dim``, the default there).
        """
        if isinstance(schema, (str, os.PathLike)):
            schema = as_schema(schema)
        if kwargs.get("features") is not None:
            kwargs["features"] = as_features(kwargs["features"], as_schema(schema), dim=embedding_dim,
                                             init=kwargs.get("init", "uniform"))
        sizes = embedding_sizes(schema, dim=embedding_dim)
        n_cont = len(as_schema(schema).continuous)
        dense = list(dense_arch_layer_sizes) if dense_arch_layer_sizes else [*HIDDEN, embedding_dim]
        slots = numeric_input == "slots"
        if slots and numeric_dim is not None and numeric_dim != embedding_dim:
            raise ValueError(f"DLRM's numeric slots are one more sparse slot per column: numeric_dim must be "
                             f"embedding_dim={embedding_dim}, got {numeric_dim}")
        if numeric_embedding is not None:
            d = embedding_dim if slots else numeric_dim or NUMERIC_DIM.get(numeric_embedding, 0)
            kwargs["numeric"] = numeric_config(numeric_embedding, schema, d)
            kwargs["numeric_input"] = numeric_input
        return cls([c for c, _ in sizes], n_cont, embedding_dim, dense, over_arch_layer_sizes, **kwargs)

    @classmethod
    def from_options(cls, schema: Any, layers: Sequence[int] | None = None,
                     bottom_layers: Sequence[int] | None = None, embedding_dim: int | None = None,
                     features: Any = None, dropout: float | None = None,
                     numeric_embedding: str | None = None) -> DLRM:
        """``fit.py``'s model flags: ``layers`` the top MLP's hidden widths, ``bottom_layers`` the bottom
        MLP's before its projection to ``embedding_dim`` (every table's dim), ``dropout`` after the hidden
        layers of both, ``numeric_embedding`` (``"ple"`` | ``"periodic"``) each continuous column embedded into
        the bottom MLP's input (d: :data:`NUMERIC_DIM`); None: the defaults (no numeric embedding)."""
        d = embedding_dim or DLRM_EMBEDDING_DIM
        return cls.from_schema(schema, embedding_dim=d, dense_arch_layer_sizes=[*(bottom_layers or HIDDEN), d],
                               over_arch_layer_sizes=[*(layers or HIDDEN), 1], features=features,
                               dropout=dropout or 0.0, numeric_embedding=numeric_embedding)

    def check_input(self, categorical: torch.Tensor, continuous: torch.Tensor | None, lists: Any = None) -> None:
        """Raise ``ValueError`` if a batch does not fit the model (column counts, id ranges)."""
        n_cont = 0 if continuous is None else continuous.shape[1]
        if n_cont != self.n_cont:
            raise ValueError(f"the data has {n_cont} continuous columns, the model {self.n_cont}")
        self.embedding_part.check_input(categorical, lists)

    def forward(self, categorical: torch.Tensor, continuous: torch.Tensor, lists: Any = None,
                weights: Any = None) -> torch.Tensor:
        """Args: categorical [B, F] ids, continuous [B, n_cont], lists ``{name: (values [N], offsets [B + 1])}``
        and weights ``{name: [N]}`` (list features only). Returns: logits [B, 1]."""
        if continuous.dim() != 2 or continuous.shape[1] != self.n_cont:
            raise ValueError(f"expected continuous inputs of shape [B, {self.n_cont}], got {list(continuous.shape)}")
        x = continuous.float()
        if self.numeric is not None and not self.numeric_slots:  # [B, n_cont * (1 + d)] into the bottom MLP
            x = torch.cat((x, self.numeric(x).flatten(1).to(x.dtype)), dim=1)
        dense = self.dense_arch(x)
        sparse = stack_slots(self.embedding_part(categorical, lists, weights)).to(dense.dtype)  # [B, S, D]
        if self.numeric_slots:  # one more slot per continuous column: [B, S + n_cont, D]
            sparse = torch.cat((sparse, self.numeric(continuous).to(dense.dtype)), dim=1)
        return self.over_arch(self.inter_arch(dense, sparse))
