"""DCN-v2 (Wang et al. 2021, "DCN V2: Improved Deep & Cross Network and Practical Lessons for Web-scale
Learning to Rank Systems") on ctrflow's fused sparse embeddings.

::

    ids [B, F] -> embedding part -> [B, sum(dims)] --+
    continuous [B, n_cont] ---------------------------+-> x0 [B, d]
    stacked (default):  x0 -> CrossNet -> deep MLP (ReLU, dropout) -> Linear -> logits [B, 1]
    parallel:           [CrossNet(x0), deep MLP(x0)] -> Linear -> logits [B, 1]

    CrossNet, layer l:  x_{l+1} = x0 * (W_l x_l + b_l) + x_l      (* elementwise)
        full rank:  W_l [d, d]
        low rank:   W_l = U_l V_l^T,  U_l, V_l [d, r]   (the paper's cheaper form, r << d)

Cross weights are Xavier-normal and biases zero (torchrec's ``CrossNet`` / ``LowRankCrossNet``), so
a fresh cross layer starts as ``x0 * (W x) + x``. Embeddings are the other models' fused tables
(sparse gradients, row-sparse optimizers): per-feature dims from the schema (capped, as
``TabularModel``) or one dim for all, or per-feature options (``features=``).

With a numeric embedding (``numeric=``, :mod:`ctrflow.models.numeric`) the continuous part of x0 is
``numeric(continuous).flatten(1)`` [B, n_cont * d_num] instead of the raw columns.

Shapes: B = rows, F = categorical features, d = x0's width (sum of embedding dims + n_cont, or + n_cont * d_num
with a numeric embedding), r = rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ctrflow.models.defaults import DCN_CROSS_LAYERS, HIDDEN, TABULAR_MAX_DIM
from ctrflow.models.embedding_part import HasEmbeddingPart, build_embedding, flatten_slots
from ctrflow.models.mlp import mlp
from ctrflow.models.numeric import build_numeric
from ctrflow.models.schema_inputs import schema_inputs

STRUCTURES = ("stacked", "parallel")


class CrossLayer(nn.Module):
    """One DCN-v2 cross layer: ``x0 * (W x + b) + x``.

    Args:
        in_features: d.
        rank: ``None``: full-rank ``W`` [d, d] (``self.linear``); r: ``W = U V^T`` with ``self.down``
            (V^T, [r, d], no bias) and ``self.up`` (U, [d, r], with the bias b).
    """

    def __init__(self, in_features: int, rank: int | None = None) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"a cross layer needs in_features >= 1, got {in_features}")
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be >= 1 (or None: full rank), got {rank}")
        self.in_features, self.rank = int(in_features), rank
        self.project: nn.Module
        if rank is None:
            self.project = nn.Linear(in_features, in_features)
        else:
            self.project = nn.Sequential()
            self.project.add_module("down", nn.Linear(in_features, rank, bias=False))
            self.project.add_module("up", nn.Linear(rank, in_features))
        for m in self.project.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Args: x0 [B, d] (the cross net's input), x [B, d] (the previous layer's output). Returns: [B, d]."""
        return x0 * self.project(x) + x

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={'full' if self.rank is None else self.rank}"


class CrossNet(nn.Module):
    """A stack of :class:`CrossLayer`: [B, d] -> [B, d] (zero layers: the identity).

    Args: in_features d, num_layers, rank (``None``: full rank; see :class:`CrossLayer`).
    """

    def __init__(self, in_features: int, num_layers: int, rank: int | None = None) -> None:
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        self.layers = nn.ModuleList(CrossLayer(in_features, rank) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """Args: x0 [B, d]. Returns: x_L [B, d]."""
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x


class DCNv2(HasEmbeddingPart):
    """Deep & Cross Network v2, returning logits [B, 1].

    Args:
        emb_szs: ``[(cardinality, dim), ...]`` per categorical feature (or a dict of them).
        n_cont: continuous inputs (appended to x0 as they come: the ETL normalises them).
        cross_layers: cross layers L (0: a plain MLP over x0).
        rank: ``None``: full-rank cross weights; r: low-rank ``U V^T`` of rank r.
        deep_layers: hidden widths of the deep MLP (ReLU after each); ``[]`` (stacked): no deep MLP.
        structure: ``"stacked"`` (cross net, then the deep MLP: the paper's best on Criteo) or
            ``"parallel"`` (both on x0, outputs concatenated).
        dropout: dropout after every deep layer; 0: none.
        sparse: sparse embedding gradients (see :mod:`ctrflow.models.embedding`).
        init: embedding init, ``"uniform"`` (torchrec's) or ``"normal"`` (truncated, std 0.01).
        features: per-feature embedding options (resolved :class:`~ctrflow.models.features.Features`
            or their dict) instead of ``emb_szs``: shared tables, list features pooled into x0.
        numeric: a numeric embedding's ``config`` (:func:`~ctrflow.models.numeric.numeric_config`): x0's
            continuous part is its output flattened, [B, n_cont * d_num] (held as ``numeric``). None
            (default): the raw columns, as before.

    The embedding part is held as ``embeds`` (plain tables) or ``features``: :attr:`embedding_part`.
    """

    def __init__(
        self,
        emb_szs: Sequence[tuple[int, int]] | Mapping[str, tuple[int, int]],
        n_cont: int,
        cross_layers: int = DCN_CROSS_LAYERS,
        rank: int | None = None,
        deep_layers: Sequence[int] = HIDDEN,
        structure: str = "stacked",
        dropout: float = 0.0,
        sparse: bool = True,
        init: str = "uniform",
        features: Any = None,
        numeric: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(emb_szs, Mapping):
            emb_szs = list(emb_szs.values())
        deep = [int(x) for x in deep_layers]
        if n_cont < 0 or cross_layers < 0 or any(w < 1 for w in deep):
            raise ValueError(f"need n_cont >= 0, cross_layers >= 0, deep_layers >= 1; "
                             f"got {n_cont}, {cross_layers}, {deep}")
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {', '.join(STRUCTURES)}, got {structure!r}")
        if structure == "parallel" and not deep:
            raise ValueError("the parallel structure needs deep_layers (got [])")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        part = build_embedding(emb_szs, features, sparse=sparse, init=init)
        num = build_numeric(numeric, int(n_cont))  # [B, n_cont] -> [B, n_cont, d_num], or None
        d = part.out_features + int(n_cont) * (num.out_features if num is not None else 1)
        if d == 0:
            raise ValueError("DCNv2 needs at least one categorical, list or continuous input")
        self.config: dict[str, Any] = {
            "emb_szs": part.emb_szs, "n_cont": int(n_cont), "cross_layers": int(cross_layers),
            "rank": None if rank is None else int(rank), "deep_layers": deep, "structure": structure,
            "dropout": float(dropout), "sparse": sparse, "init": init, **part.config,
            **({"numeric": num.config} if num is not None else {}),  # the same dict: see PLE._load_from_state_dict
        }
        self.n_cat = part.num_columns
        self.n_cont = int(n_cont)
        self.n_emb = part.out_features
        self.set_embedding_part(part)
        self.numeric = num
        self.cross_net = CrossNet(d, cross_layers, rank)
        self.deep_net = mlp(d, deep, last_activation=True, dropout=dropout, last_dropout=True)  # output follows
        width = (deep[-1] if deep else d) + (d if structure == "parallel" else 0)
        self.output = nn.Linear(width, 1)

    @property
    def in_features(self) -> int:
        """d: x0's width (embeddings, then continuous inputs: n_cont, or n_cont * d_num embedded)."""
        return self.n_emb + self.n_cont * (self.numeric.out_features if self.numeric is not None else 1)

    @classmethod
    def from_schema(
        cls,
        schema: Any,
        max_dim: int | None = TABULAR_MAX_DIM,
        embedding_dim: int | None = None,
        numeric_embedding: str | None = None,
        numeric_dim: int | None = None,
        **kwargs: Any,
    ) -> DCNv2:
        """Build from a processed dataset's schema (a :class:`Schema`, its path, or the dataset dir).

        Args:
            schema: the dataset's schema.
            max_dim: cap of the stored per-feature dims (default
                :data:`~ctrflow.models.defaults.TABULAR_MAX_DIM`); None keeps them.
            embedding_dim: one dim for every table instead of the stored ones.
            numeric_embedding: ``"ple"`` (edges: the schema's quantiles; ``ValueError`` without them) or
                ``"periodic"``: the continuous columns enter x0 as their numeric embedding
                (:mod:`ctrflow.models.numeric`); None: raw.
            numeric_dim: its d per column (default :data:`~ctrflow.models.defaults.NUMERIC_DIM` of the kind).
            **kwargs: any other ``DCNv2`` argument; ``features=`` a
                :class:`~ctrflow.models.features.FeatureConfig` (or its dict / file path).
        """
        init = "uniform" if kwargs.get("init", "uniform") == "uniform" else "truncated_normal"
        emb, n_cont = schema_inputs(schema, kwargs, max_dim, embedding_dim, init, numeric_embedding, numeric_dim)
        return cls(emb, n_cont, **kwargs)

    @classmethod
    def from_options(cls, schema: Any, layers: Sequence[int] | None = None,
                     bottom_layers: Sequence[int] | None = None, embedding_dim: int | None = None,
                     features: Any = None, dropout: float | None = None,
                     numeric_embedding: str | None = None) -> DCNv2:
        """``fit.py``'s model flags: ``layers`` the deep MLP's widths (after the cross net), ``embedding_dim``
        the cap of the schema's per-table dims (as ``tabular``), ``dropout`` after every deep layer;
        ``numeric_embedding`` (``"ple"`` | ``"periodic"``) the continuous columns' embedding (d:
        :data:`~ctrflow.models.defaults.NUMERIC_DIM`); ``bottom_layers`` does not apply (DCN-v2 has no bottom
        MLP); None: the defaults (3 full-rank cross layers, stacked, raw continuous columns)."""
        return cls.from_schema(schema, max_dim=embedding_dim or TABULAR_MAX_DIM, features=features,
                               deep_layers=list(layers or HIDDEN), dropout=dropout or 0.0,
                               numeric_embedding=numeric_embedding)

    def check_input(self, categorical: torch.Tensor, continuous: torch.Tensor | None, lists: Any = None) -> None:
        """Raise ``ValueError`` if a batch does not fit the model (column counts, id ranges)."""
        n_cont = 0 if continuous is None or continuous.numel() == 0 else continuous.shape[1]
        if n_cont != self.n_cont:
            raise ValueError(f"the data has {n_cont} continuous columns, the model {self.n_cont}")
        self.embedding_part.check_input(categorical, lists)

    def forward(self, categorical: torch.Tensor, continuous: torch.Tensor | None = None, lists: Any = None,
                weights: Any = None) -> torch.Tensor:
        """Args: categorical [B, F] ids, continuous [B, n_cont], lists ``{name: (values [N], offsets [B + 1])}``
        and weights ``{name: [N]}`` (list features only). Returns: logits [B, 1]."""
        xs = []
        if self.n_emb:
            xs.append(flatten_slots(self.embedding_part(categorical, lists, weights)).float())
        if self.n_cont:
            if continuous is None or continuous.dim() != 2 or continuous.shape[1] != self.n_cont:
                got = None if continuous is None else list(continuous.shape)
                raise ValueError(f"expected continuous inputs of shape [B, {self.n_cont}], got {got}")
            x_cont = continuous.float()
            xs.append(self.numeric(x_cont).flatten(1).float() if self.numeric is not None else x_cont)
        x0 = xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)  # [B, d]
        crossed = self.cross_net(x0)
        if self.config["structure"] == "parallel":
            return self.output(torch.cat((crossed, self.deep_net(x0)), dim=1))
        return self.output(self.deep_net(crossed))
