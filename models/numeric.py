"""Embeddings of continuous columns (Gorishniy, Rubachev, Babenko, NeurIPS 2022, "On Embeddings for
Numerical Features in Tabular Deep Learning").

Two encoders, each followed by a per-column linear layer and ReLU, both mapping the loader's
``continuous`` [B, n_cont] to [B, n_cont, d]:

* :class:`PiecewiseLinearEncoding` (the paper's PLE with quantile bins, "Q-LR"): bin edges per column
  come from the ETL (``schema.json``'s ``"quantiles"``, in the column's stored, i.e. normalised, space),
  so training and serving apply the same transform; the edges are buffers, saved in the state_dict.
* :class:`PeriodicEncoding` ("PLR"): ``concat(sin(2 pi c x), cos(2 pi c x))`` with trainable
  frequencies ``c ~ N(0, sigma)``.

:func:`numeric_embedding` picks one by name (``"ple"`` | ``"periodic"`` | None).

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
        lower = np.zeros((n, k), np.float32)
        width = np.ones((n, k), np.float32)
        lo = np.zeros((n, k), np.float32)  # clamp bounds per bin: first bin open below, last bin open above
        hi = np.zeros((n, k), np.float32)  # padding bins: clamp to [0, 0]
        for j, e in enumerate(cleaned):
            t = e.size - 1
            lower[j, :t] = e[:-1]
            width[j, :t] = np.diff(e)
            hi[j, :t] = 1.0
            lo[j, 0] = -np.inf
            hi[j, t - 1] = np.inf
        self.n_cont, self.n_bins = n, k
        self.config: dict[str, Any] = {"kind": "ple", "edges": [e.tolist() for e in cleaned],
                                       "dim": int(dim) if dim else None, "activation": bool(activation)}
        self.register_buffer("edges", torch.from_numpy(_padded(cleaned)))  # [n, K + 1], NaN-padded: for reading
        self.register_buffer("lower", torch.from_numpy(lower))
        self.register_buffer("width", torch.from_numpy(width))
        self.register_buffer("lo", torch.from_numpy(lo))
        self.register_buffer("hi", torch.from_numpy(hi))
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


__all__ = ["ColumnLinear", "PeriodicEncoding", "PiecewiseLinearEncoding", "clean_edges", "from_config",
           "numeric_embedding", "schema_edges"]
