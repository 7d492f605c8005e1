"""fastai's ``TabularModel`` (same arguments, same architecture), on fused sparse embeddings.

Architecture (fastai 2.x, ``lin_first=True``)::

    ids [B, F] -> embeddings [B, sum(dims)] -> Dropout(embed_p) --+
    continuous [B, n_cont] -> BatchNorm1d(n_cont) ---------------+-> concat
        -> [Linear(bias=not use_bn) -> ReLU -> BatchNorm1d -> Dropout(p_i)] per hidden layer
        -> Linear(out_sz)   -> logits [B, out_sz]

With a numeric embedding (``numeric=``, :mod:`ctrflow.models.numeric`) the continuous block is
``numeric(continuous).flatten(1)`` [B, n_cont * d] instead (no BatchNorm1d on it).

Differences from fastai, by design: the embeddings of all features that share a dim live in one
fused table with sparse gradients (see :mod:`ctrflow.models.embedding`), and the embedding block is
ordered by dim (ascending) instead of by feature, which changes nothing the model can learn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ctrflow.models.defaults import HIDDEN, TABULAR_MAX_DIM
from ctrflow.models.embedding_part import HasEmbeddingPart, build_embedding, flatten_slots
from ctrflow.models.numeric import build_numeric
from ctrflow.models.schema_inputs import schema_inputs


class TabularModel(HasEmbeddingPart):
    """Embeddings + MLP for tabular data, fastai's argument names.

    Args:
        emb_szs: ``[(cardinality, dim), ...]`` per categorical feature (or a dict of them, as
            NVTabular's ``get_embedding_sizes`` returns).
        n_cont: number of continuous inputs.
        out_sz: output width (1 for binary logits / regression; 2 works with the trainer too).
        layers: hidden layer widths, e.g. ``[512, 256]``.
        ps: dropout per hidden layer (a float applies to all); default no dropout.
        embed_p: dropout on the concatenated embeddings.
        use_bn: BatchNorm1d after each hidden layer's activation.
        bn_final: BatchNorm1d on the output as well (fastai's option).
        bn_cont: BatchNorm1d on the continuous inputs (fastai's default).
        y_range: squash outputs into ``(lo, hi)`` with a scaled sigmoid (regression only).
        sparse: sparse embedding gradients (see :mod:`ctrflow.models.embedding`).
        emb_init: ``"normal"`` (fastai's truncated normal, std 0.01) or ``"uniform"`` (torchrec's).
        features: per-feature embedding options (resolved :class:`~ctrflow.models.features.Features`
            or their dict) instead of ``emb_szs``: shared tables, and list features whose pooled
            embeddings are concatenated with the others. Without it: as before.
        numeric: a numeric embedding's ``config`` (:func:`~ctrflow.models.numeric.numeric_config`): the
            continuous block is its output flattened, [B, n_cont * d], instead of ``bn_cont(continuous)``
            (held as ``numeric``; ``bn_cont`` then has no effect). None (default): as before.

    The embedding part (:func:`~ctrflow.models.embedding_part.build_embedding`) is held as ``embeds``
    (plain tables) or ``features`` (per-feature options): :attr:`embedding_part`.
    """

    def __init__(
        self,
        emb_szs: Sequence[tuple[int, int]] | Mapping[str, tuple[int, int]],
        n_cont: int,
        out_sz: int,
        layers: Sequence[int],
        ps: float | Sequence[float] | None = None,
        embed_p: float = 0.0,
        use_bn: bool = True,
        bn_final: bool = False,
        bn_cont: bool = True,
        y_range: tuple[float, float] | None = None,
        sparse: bool = True,
        emb_init: str = "normal",
        features: Any = None,
        numeric: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(emb_szs, Mapping):
            emb_szs = list(emb_szs.values())
        layers = [int(x) for x in layers]
        if ps is None:
            ps = [0.0] * len(layers)
        elif isinstance(ps, (int, float)):
            ps = [float(ps)] * len(layers)
        ps = list(ps)
        if len(ps) != len(layers):
            raise ValueError(f"ps has {len(ps)} entries but layers has {len(layers)}")
        if n_cont < 0 or out_sz < 1 or any(w < 1 for w in layers):
            raise ValueError(f"need n_cont >= 0, out_sz >= 1, layers >= 1; got {n_cont}, {out_sz}, {layers}")
        part = build_embedding(emb_szs, features, sparse=sparse, init=emb_init)
        if not part.num_slots and n_cont == 0:
            raise ValueError("TabularModel needs at least one categorical or continuous input")
        self.config: dict[str, Any] = {
            "emb_szs": part.emb_szs, "n_cont": n_cont, "out_sz": out_sz, "layers": layers, "ps": ps,
            "embed_p": embed_p, "use_bn": use_bn, "bn_final": bn_final, "bn_cont": bn_cont,
            "y_range": list(y_range) if y_range else None, "sparse": sparse, "emb_init": emb_init, **part.config,
        }
        self.set_embedding_part(part)
        self.emb_drop = nn.Dropout(embed_p)
        self.bn_cont = nn.BatchNorm1d(n_cont) if (bn_cont and n_cont and numeric is None) else None
        self.n_emb = part.out_features
        self.n_cat = part.num_columns
        self.n_cont = n_cont
        self.y_range = y_range
        self.numeric = build_numeric(numeric, n_cont)  # [B, n_cont] -> [B, n_cont, d], or None
        if self.numeric is not None:
            self.config["numeric"] = self.numeric.config  # the same dict: see PLE._load_from_state_dict
        sizes = [self.n_emb + self.cont_width, *layers, out_sz]
        blocks: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            last = i == len(sizes) - 2
            bn = use_bn and (not last or bn_final)
            blocks.append(nn.Linear(sizes[i], sizes[i + 1], bias=not bn))
            if not last:
                blocks.append(nn.ReLU(inplace=True))
            if bn:
                blocks.append(nn.BatchNorm1d(sizes[i + 1]))
            p = 0.0 if last else ps[i]
            if p:
                blocks.append(nn.Dropout(p))
        self.layers = nn.Sequential(*blocks)

    @property
    def cont_width(self) -> int:
        """Width of the continuous block of the MLP's input: n_cont, or n_cont * d with a numeric embedding."""
        return self.n_cont * (self.numeric.out_features if self.numeric is not None else 1)

    @classmethod
    def from_schema(
        cls,
        schema: Any,
        layers: Sequence[int] = HIDDEN,
        out_sz: int = 1,
        max_dim: int | None = TABULAR_MAX_DIM,
        embedding_dim: int | None = None,
        numeric_embedding: str | None = None,
        numeric_dim: int | None = None,
        **kwargs: Any,
    ) -> TabularModel:
        """Build from a processed dataset's schema (a :class:`Schema`, its path, or the dataset dir).

        Args:
            schema: the dataset's schema.
            layers: hidden layer widths.
            out_sz: output width.
            max_dim: cap the stored embedding dims (default :data:`~ctrflow.models.defaults.TABULAR_MAX_DIM`;
                the seed notebook's ``min(16, dim)`` is ``max_dim=16``); None keeps them.
            embedding_dim: one dim for every table instead of the stored ones.
            numeric_embedding: ``"ple"`` (edges: the schema's quantiles; ``ValueError`` without them) or
                ``"periodic"``: the continuous columns enter as their numeric embedding
                (:mod:`ctrflow.models.numeric`); None: raw.
            numeric_dim: its d per column (default :data:`~ctrflow.models.defaults.NUMERIC_DIM` of the kind).
            **kwargs: any other ``TabularModel`` argument; ``features=`` a
                :class:`~ctrflow.models.features.FeatureConfig` (or its dict / file path).
        """
        init = "uniform" if kwargs.get("emb_init") == "uniform" else "truncated_normal"
        emb, n_cont = schema_inputs(schema, kwargs, max_dim, embedding_dim, init, numeric_embedding, numeric_dim)
        return cls(emb, n_cont, out_sz, list(layers), **kwargs)

    @classmethod
    def from_options(cls, schema: Any, layers: Sequence[int] | None = None,
                     bottom_layers: Sequence[int] | None = None, embedding_dim: int | None = None,
                     features: Any = None, dropout: float | None = None,
                     numeric_embedding: str | None = None) -> TabularModel:
        """``fit.py``'s model flags: ``layers`` the MLP's hidden widths, ``embedding_dim`` the cap of the
        schema's per-table dims, ``dropout`` every hidden layer's (fastai's ``ps``; ``bottom_layers`` does
        not apply), ``numeric_embedding`` (``"ple"`` | ``"periodic"``) the continuous columns' embedding
        (d: :data:`~ctrflow.models.defaults.NUMERIC_DIM`); None: the defaults (raw continuous columns)."""
        return cls.from_schema(schema, layers=list(layers or HIDDEN), max_dim=embedding_dim or TABULAR_MAX_DIM,
                               features=features, ps=dropout or None, numeric_embedding=numeric_embedding)

    def check_input(self, categorical: torch.Tensor, continuous: torch.Tensor | None, lists: Any = None) -> None:
        """Raise ``ValueError`` if a batch does not fit the model (column counts, id ranges)."""
        n_cont = 0 if continuous is None or continuous.numel() == 0 else continuous.shape[1]
        if n_cont != self.n_cont:
            raise ValueError(f"the data has {n_cont} continuous columns, the model {self.n_cont}")
        self.embedding_part.check_input(categorical, lists)

    def forward(self, categorical: torch.Tensor, continuous: torch.Tensor | None = None, lists: Any = None,
                weights: Any = None) -> torch.Tensor:
        """Args: categorical [B, F] ids, continuous [B, n_cont], lists ``{name: (values [N], offsets [B + 1])}``
        and weights ``{name: [N]}`` (list features only). Returns: logits [B, out_sz]."""
        xs = []
        if self.n_emb:
            xs.append(self.emb_drop(flatten_slots(self.embedding_part(categorical, lists, weights))))
        if self.n_cont:
            if continuous is None or continuous.dim() != 2 or continuous.shape[1] != self.n_cont:
                got = None if continuous is None else list(continuous.shape)
                raise ValueError(f"expected continuous inputs of shape [B, {self.n_cont}], got {got}")
            x_cont = continuous.float()
            if self.numeric is not None:
                xs.append(self.numeric(x_cont).flatten(1))  # [B, n_cont * d]
            else:
                xs.append(self.bn_cont(x_cont) if self.bn_cont is not None else x_cont)
        x = xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)
        out = self.layers(x)
        if self.y_range is not None:
            lo, hi = self.y_range
            out = torch.sigmoid(out) * (hi - lo) + lo
        return out
