"""Embeddings of continuous columns (Gorishniy, Rubachev, Babenko, NeurIPS 2022, "On Embeddings for
Numerical Features in Tabular Deep Learning").

Two encoders, each followed by a per-column linear layer and ReLU, both mapping the loader's
``continuous`` [B, n_cont] to [B, n_cont, d]:

* :class:`PiecewiseLinearEncoding` (the paper's PLE with quantile bins, "Q-LR"): bin edges per column
  come from the ETL (``schema.json``'s ``"quantiles"``, in the column's stored, i.e. normalised, space),
  so training and serving apply the same transform; the edges are buffers, saved in the state_dict.
* :class:`PeriodicEncoding` ("PLR"): ``concat(sin(2 pi c x), cos(2 pi c x))`` with trainable
  frequencies ``c ~ N(0, sigma)``.

:func:`numeric_embedding` picks one by name (``"ple"`` | ``"periodic"`` | None). The models take one as
``numeric=`` its ``config`` (:func:`numeric_config`; ``from_schema(..., numeric_embedding="ple")``), so a
checkpoint's model config rebuilds it, edges included (:func:`build_numeric`).

Example:
    >>> emb = numeric_embedding("ple", "data/processed", dim=16)   # or PiecewiseLinearEncoding.from_schema(...)
    >>> emb(batch.continuous).shape                                # [B, n_cont, 16]
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ctrflow.etl.schema import Schema
from ctrflow.models.defaults import NUMERIC_EMBEDDING
from ctrflow.models.sizes import as_schema

KINDS = ("ple", "periodic")
NO_QUANTILES = ("rerun etl/run.py: this dataset predates numeric embeddings (its schema.json has no quantiles for "
                "continuous column(s) {cols}; only columns whose last ETL op is Normalize record them)")


def schema_edges(schema: Schema | str | os.PathLike | dict[str, Any]) -> list[list[float]]:
    """The quantile edges of every continuous column, in the loader's column order.

    Args:
        schema: a :class:`Schema`, a ``schema.json`` path, a processed-dataset directory or a schema dict.

    Returns:
        One list of edges per continuous column (``schema.continuous`` order).

    Raises:
        ValueError: a continuous column has no recorded quantiles (the dataset predates them).
    """
    s = as_schema(schema)
    missing = [c for c in s.continuous if s[c].quantiles is None]
    if missing:
        raise ValueError(NO_QUANTILES.format(cols=", ".join(missing)))
    return [list(s[c].quantiles) for c in s.continuous]


def clean_edges(edges: Sequence[float]) -> np.ndarray:
    """Finite, de-duplicated, strictly increasing float32 edges; at least two (a line through 0 and 1 if fewer).

    Args:
        edges: bin edges of one column (any order, ties allowed).

    Returns:
        float32 array [T + 1] with T >= 1 bins. One distinct edge ``e`` becomes ``[e, e + 1]``; none, ``[0, 1]``.
    """
    e = np.asarray(edges, dtype=np.float64).ravel()
    e = np.unique(e[np.isfinite(e)].astype(np.float32))
    if e.size == 0:
        return np.array([0.0, 1.0], dtype=np.float32)
    if e.size == 1:
        return np.array([e[0], e[0] + 1.0], dtype=np.float32)
    return e


class ColumnLinear(nn.Module):
    """One linear layer per column: [B, n, k] -> [B, n, d] (``out[:, j] = x[:, j] @ W[j] + b[j]``).

    Args:
        n: columns; k: input width per column; d: output width. Initialised as ``nn.Linear``
            (``U(-1/sqrt(k), 1/sqrt(k))``).
    """

    def __init__(self, n: int, k: int, d: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(k)
        self.weight = nn.Parameter(torch.empty(n, k, d).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, d).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, n, k]. Returns: [B, n, d]."""
        return torch.einsum("bnk,nkd->bnd", x, self.weight) + self.bias


class PiecewiseLinearEncoding(nn.Module):
    """Piecewise-linear encoding of each continuous column, then a per-column linear layer (+ ReLU).

    For a column with edges ``b_0 < ... < b_T`` (T bins) and value x, bin t (1-based) encodes as::

        0                                 if x < b_{t-1} and t > 1
        1                                 if x >= b_t and t < T
        (x - b_{t-1}) / (b_t - b_{t-1})   otherwise

    so the first bin extends linearly below ``b_0`` (negative values) and the last above ``b_T`` (values
    over 1). Columns with fewer than K = max T bins are padded with zeros (their padding bins never
    fire, so they get no gradient).

    Args:
        edges: per continuous column, its bin edges (e.g. the ETL's quantiles); duplicates and non-finite
            values are dropped (see :func:`clean_edges`).
        dim: d, the output width per column; None (or 0) returns the raw encoding [B, n_cont, K].
        activation: ReLU after the linear layer (the paper's "Q-LR").

    Shapes:
        forward: x [B, n_cont] -> [B, n_cont, d] (or [B, n_cont, K] without ``dim``).
    """

    def __init__(self, edges: Sequence[Sequence[float]], dim: int | None = None, activation: bool = True) -> None:
        super().__init__()
        cleaned = [clean_edges(e) for e in edges]
        if not cleaned:
            raise ValueError("PiecewiseLinearEncoding needs at least one continuous column")
        if dim is not None and dim < 0:
            raise ValueError(f"dim must be positive (or None for the raw encoding), got {dim}")
        n, k = len(cleaned), max(e.size - 1 for e in cleaned)
        self.n_cont, self.n_bins = n, k
        self.config: dict[str, Any] = {"kind": "ple", "edges": [e.tolist() for e in cleaned],
                                       "dim": int(dim) if dim else None, "activation": bool(activation)}
        for name, table in _bin_tables(cleaned).items():  # edges [n, K + 1] (NaN-padded: for reading); the
            self.register_buffer(name, torch.from_numpy(table))  # rest [n, K]
        self.linear = ColumnLinear(n, k, int(dim)) if dim else None
        self.activation = nn.ReLU() if (dim and activation) else None
        self.out_features = int(dim) if dim else k

    @classmethod
    def from_schema(cls, schema: Schema | str | os.PathLike | dict[str, Any], dim: int | None = None,
                    activation: bool = True) -> PiecewiseLinearEncoding:
        """Build from a processed dataset's ``schema.json`` quantiles (see :func:`schema_edges`).

        Raises:
            ValueError: the dataset has no quantiles (written before numeric embeddings existed).
        """
        return cls(schema_edges(schema), dim, activation)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        """Take the checkpoint's edges: a model trained on them keeps them (as a table keeps its dim), e.g. when
        ``fit.py --resume`` continues on a new day whose schema has other quantiles. Updates :attr:`config` in
        place (the models hold this very dict) and, when the bin count K differs, resizes the buffers and the
        linear weight (``.data``: the optimizer keeps its parameter) before they are loaded."""
        saved = state_dict.get(prefix + "edges")
        if torch.is_tensor(saved) and saved.dim() == 2 and saved.shape[0] == self.n_cont and saved.shape[1] > 1:
            rows = saved.detach().float().cpu().numpy()
            cleaned = [r[~np.isnan(r)] for r in rows]
            k = max(e.size - 1 for e in cleaned)
            if [e.tolist() for e in cleaned] != self.config["edges"] and min(e.size for e in cleaned) > 1 and (
                    k == self.n_bins or self.linear is not None):
                device = self.lower.device
                for name, table in _bin_tables(cleaned).items():
                    setattr(self, name, torch.from_numpy(table).to(device))
                if k != self.n_bins:
                    w = self.linear.weight
                    w.data = w.data.new_empty((self.n_cont, k, w.shape[2]))  # filled by the load that follows
                self.n_bins = k
                self.config["edges"] = [e.tolist() for e in cleaned]
        super()._load_from_state_dict(state_dict, prefix, *args)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The piecewise-linear encoding alone. Args: x [B, n_cont]. Returns: [B, n_cont, K]."""
        if x.dim() != 2 or x.shape[1] != self.n_cont:
            raise ValueError(f"expected continuous inputs of shape [B, {self.n_cont}], got {list(x.shape)}")
        z = (x.float().unsqueeze(-1) - self.lower) / self.width
        return torch.maximum(torch.minimum(z, self.hi), self.lo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, n_cont] (the loader's continuous block). Returns: [B, n_cont, d] ([B, n_cont, K] without dim)."""
        z = self.encode(x)
        if self.linear is None:
            return z
        z = self.linear(z)
        return self.activation(z) if self.activation is not None else z


def _bin_tables(edges: list[np.ndarray]) -> dict[str, np.ndarray]:
    """PLE's buffers from cleaned edges (n columns, K = most bins): ``edges`` [n, K + 1] NaN-padded, and [n, K]
    ``lower`` (bin start), ``width``, and the clamp bounds ``lo`` / ``hi`` of each bin's value."""
    n, k = len(edges), max(e.size - 1 for e in edges)
    lower = np.zeros((n, k), np.float32)
    width = np.ones((n, k), np.float32)
    lo = np.zeros((n, k), np.float32)  # clamp bounds per bin: first bin open below, last bin open above
    hi = np.zeros((n, k), np.float32)  # padding bins: clamp to [0, 0]
    for j, e in enumerate(edges):
        t = e.size - 1
        lower[j, :t] = e[:-1]
        width[j, :t] = np.diff(e)
        hi[j, :t] = 1.0
        lo[j, 0] = -np.inf
        hi[j, t - 1] = np.inf
    return {"edges": _padded(edges), "lower": lower, "width": width, "lo": lo, "hi": hi}


def _padded(edges: list[np.ndarray]) -> np.ndarray:
    """Edges of every column in one float32 array [n, K + 1], NaN after a column's last edge."""
    out = np.full((len(edges), max(e.size for e in edges)), np.nan, np.float32)
    for j, e in enumerate(edges):
        out[j, : e.size] = e
    return out


class PeriodicEncoding(nn.Module):
    """Periodic encoding ``concat(sin(2 pi c x), cos(2 pi c x))`` per column, then linear + ReLU ("PLR").

    Args:
        n_cont: continuous columns.
        k: frequencies per column (the encoding has 2k features per column).
        sigma: std of the frequencies' initialisation ``c ~ N(0, sigma)`` (the paper tunes it, 0.01 - 100).
        dim: d, the output width per column. Defaults (k=48, sigma=0.01, d=24): those of the authors'
            ``rtdl_num_embeddings.PeriodicEmbeddings``.
        activation: ReLU after the linear layer.

    Shapes:
        forward: x [B, n_cont] -> [B, n_cont, d].
    """

    def __init__(self, n_cont: int, k: int = 48, sigma: float = 0.01, dim: int = 24, activation: bool = True) -> None:
        super().__init__()
        if n_cont < 1 or k < 1 or dim < 1 or not sigma > 0:
            raise ValueError(f"need n_cont, k, dim >= 1 and sigma > 0; got n_cont={n_cont}, k={k}, dim={dim}, "
                             f"sigma={sigma}")
        self.n_cont, self.k, self.sigma = int(n_cont), int(k), float(sigma)
        self.config: dict[str, Any] = {"kind": "periodic", "n_cont": self.n_cont, "k": self.k, "sigma": self.sigma,
                                       "dim": int(dim), "activation": bool(activation)}
        self.frequencies = nn.Parameter(torch.randn(self.n_cont, self.k) * self.sigma)  # c [n_cont, k]
        self.linear = ColumnLinear(self.n_cont, 2 * self.k, int(dim))
        self.activation = nn.ReLU() if activation else None
        self.out_features = int(dim)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The periodic features alone. Args: x [B, n_cont]. Returns: [B, n_cont, 2k]."""
        if x.dim() != 2 or x.shape[1] != self.n_cont:
            raise ValueError(f"expected continuous inputs of shape [B, {self.n_cont}], got {list(x.shape)}")
        v = 2 * math.pi * self.frequencies * x.float().unsqueeze(-1)  # [B, n_cont, k]
        return torch.cat((torch.sin(v), torch.cos(v)), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, n_cont]. Returns: [B, n_cont, d]."""
        z = self.linear(self.encode(x))
        return self.activation(z) if self.activation is not None else z


def from_config(config: Mapping[str, Any]) -> nn.Module:
    """Rebuild a module from its ``config`` (JSON-safe; PLE's holds its edges), e.g. from a checkpoint's config.

    Args:
        config: ``module.config`` of a :class:`PiecewiseLinearEncoding` or :class:`PeriodicEncoding`.

    Returns:
        A module of the same shapes, ready for ``load_state_dict``.
    """
    cfg = dict(config)
    kind = cfg.pop("kind")
    if kind == "ple":
        return PiecewiseLinearEncoding(**cfg)
    if kind == "periodic":
        return PeriodicEncoding(**cfg)
    raise ValueError(f"numeric embedding config kind must be one of {KINDS}, got {kind!r}")


def numeric_embedding(kind: str | None, schema_or_edges: Any, dim: int, **kwargs: Any) -> nn.Module | None:
    """The numeric-embedding module named by ``kind`` (``fit.py``'s ``--numeric-embedding``), or None.

    Args:
        kind: ``"ple"``, ``"periodic"`` or None (no embedding: the model keeps its raw continuous input).
        schema_or_edges: a :class:`Schema`, ``schema.json`` path, processed-dataset dir or schema dict; or,
            for ``"ple"``, the edges per column (a list of lists, or ``{column: edges}`` in loader order);
            for ``"periodic"``, also an int (the number of continuous columns).
        dim: d, the output width per column.
        **kwargs: passed on (``activation``; ``k``, ``sigma`` for ``"periodic"``).

    Returns:
        A module mapping [B, n_cont] to [B, n_cont, dim], or None when ``kind`` is None.

    Raises:
        ValueError: an unknown kind, or (``"ple"``) a schema without quantiles.
    """
    if kind is None or kind == "none":
        return None
    if kind not in KINDS:
        raise ValueError(f"numeric embedding must be one of {KINDS} or None, got {kind!r}")
    is_schema = isinstance(schema_or_edges, (Schema, str, os.PathLike)) or (
        isinstance(schema_or_edges, Mapping) and "columns" in schema_or_edges)
    schema = (as_schema(dict(schema_or_edges) if isinstance(schema_or_edges, Mapping) else schema_or_edges)
              if is_schema else None)
    if kind == "ple":
        if schema is not None:
            return PiecewiseLinearEncoding.from_schema(schema, dim, **kwargs)
        edges = schema_or_edges.values() if isinstance(schema_or_edges, Mapping) else schema_or_edges
        return PiecewiseLinearEncoding(list(edges), dim, **kwargs)
    if schema is not None:
        n_cont = len(schema.continuous)
    elif isinstance(schema_or_edges, int):
        n_cont = schema_or_edges
    else:
        n_cont = len(schema_or_edges)
    return PeriodicEncoding(n_cont, dim=dim, **kwargs)


def auto_kind(kind: str | None, schema: Any) -> str | None:
    """``fit.py``'s ``--numeric-embedding`` resolved: ``"auto"`` is :data:`~ctrflow.models.defaults.NUMERIC_EMBEDDING`
    when the schema has continuous columns, all with quantiles (periodic needs none), else None; ``"none"`` is None.

    Args:
        kind: ``"auto"``, ``"none"``, None or a kind of :data:`KINDS`.
        schema: a :class:`Schema`, ``schema.json`` path, processed-dataset dir or schema dict.
    """
    if kind in (None, "none"):
        return None
    if kind != "auto":
        return kind
    s = as_schema(schema)
    if not s.continuous or (NUMERIC_EMBEDDING == "ple" and any(s[c].quantiles is None for c in s.continuous)):
        return None
    return NUMERIC_EMBEDDING


def numeric_config(kind: str | None, schema_or_edges: Any, dim: int | None, **kwargs: Any) -> dict[str, Any] | None:
    """The ``config`` of :func:`numeric_embedding` ``(kind, schema_or_edges, dim, **kwargs)``, what a model's
    ``numeric=`` takes, without initialising any weights (built on the meta device). None when ``kind`` is None.

    Raises:
        ValueError: as :func:`numeric_embedding` (an unknown kind, a schema without quantiles).
    """
    with torch.device("meta"):
        module = numeric_embedding(kind, schema_or_edges, dim, **kwargs)
    return None if module is None else dict(module.config)


def build_numeric(config: Mapping[str, Any] | None, n_cont: int, dim: int | None = None) -> nn.Module | None:
    """A model's numeric embedding from its ``numeric=`` config (:func:`from_config`), checked against the model.

    Args:
        config: the module's ``config`` (None: no numeric embedding, returns None).
        n_cont: the model's continuous columns; the module must embed exactly these.
        dim: the width per column the model needs (DLRM: its embedding dim); None: any.

    Returns:
        The module, [B, n_cont] -> [B, n_cont, out_features], or None.
    """
    if config is None:
        return None
    module = from_config(config)
    if module.n_cont != n_cont:
        raise ValueError(f"the numeric embedding embeds {module.n_cont} continuous columns, the model has {n_cont}")
    if dim is not None and module.out_features != dim:
        raise ValueError(f"the numeric embedding's dim must be {dim} (the model's embedding dim), "
                         f"got {module.out_features}")
    return module


__all__ = ["ColumnLinear", "PeriodicEncoding", "PiecewiseLinearEncoding", "auto_kind", "build_numeric", "clean_edges",
           "from_config", "numeric_config", "numeric_embedding", "schema_edges"]
