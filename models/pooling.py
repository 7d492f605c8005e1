"""Combiners: one vector per row from a list feature's embeddings (RecIS's ``sum | mean | tile``).

A list feature arrives jagged, ``ids [N]`` + ``offsets [B + 1]`` (and optional per-element weights
``[N]``); ``weight`` is the embedding table, or a fused weight holding it from row ``start``.

* ``sum``: ``sum_j w_j e_j`` (``w_j = 1`` without weights); an empty list gives zeros.
* ``mean``: ``sum_j w_j e_j / sum_j w_j`` (the plain mean without weights, as TensorFlow's and
  RecIS's ``mean`` combiner); an empty list (or zero total weight) gives zeros.
* ``concat`` (RecIS's ``tile``): the embeddings of the first ``n`` elements side by side,
  ``[B, n, D]``, zeros past a row's end (weights scale each element).

``sum`` and ``mean`` are one ``F.embedding_bag`` call (one kernel, no ``[N, D]`` intermediate), whose
``sparse=True`` backward yields a row-sparse gradient like :class:`~ctrflow.models.embedding.FusedEmbedding`.

Shapes: B = rows, N = elements of all rows, D = embedding dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COMBINERS = ("sum", "mean", "concat")


def pool(
    weight: torch.Tensor,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    combiner: str = "sum",
    per_sample_weights: torch.Tensor | None = None,
    start: int | torch.Tensor = 0,
    concat_n: int = 1,
    sparse: bool = False,
) -> torch.Tensor:
    """Pool a jagged list feature.

    Args:
        weight: [rows, D] embedding weight (the table starts at row ``start``).
        ids: [N] ids of all rows (table-local).
        offsets: [B + 1] int64 row boundaries.
        combiner: ``sum``, ``mean`` or ``concat``.
        per_sample_weights: [N] float weights, or ``None``.
        start: first row of the table inside ``weight``.
        concat_n: elements kept by ``concat``.
        sparse: sparse gradient for ``weight``.

    Returns:
        [B, D] for ``sum`` / ``mean``, [B, concat_n, D] for ``concat``.
    """
    if combiner not in COMBINERS:
        raise ValueError(f"combiner must be one of {', '.join(COMBINERS)}, got {combiner!r}")
    idx = ids.to(torch.int64)
    if not (isinstance(start, int) and start == 0):
        idx = idx + start
    offsets = offsets.to(device=idx.device, dtype=torch.int64)
    psw = None if per_sample_weights is None else per_sample_weights.to(weight.dtype)
    if combiner == "concat":
        return _concat(weight, idx, offsets, psw, concat_n, sparse)
    if combiner == "mean" and psw is not None:
        total = F.embedding_bag(idx, weight, offsets, mode="sum", sparse=sparse, per_sample_weights=psw,
                                include_last_offset=True)
        wsum = torch.zeros(offsets.shape[0] - 1, dtype=psw.dtype, device=psw.device)
        rows = torch.repeat_interleave(torch.arange(wsum.shape[0], device=idx.device), offsets[1:] - offsets[:-1],
                                       output_size=idx.shape[0])
        wsum.index_add_(0, rows, psw)
        return total / torch.where(wsum == 0, torch.ones_like(wsum), wsum)[:, None]
    return F.embedding_bag(idx, weight, offsets, mode=combiner, sparse=sparse, per_sample_weights=psw,
                           include_last_offset=True)


def _concat(weight: torch.Tensor, idx: torch.Tensor, offsets: torch.Tensor, psw: torch.Tensor | None,
            n: int, sparse: bool) -> torch.Tensor:
    """[B, n, D]: embeddings of the first ``n`` elements of each row, zeros past its end."""
    b, d = offsets.shape[0] - 1, weight.shape[1]
    lengths = offsets[1:] - offsets[:-1]
    row = torch.repeat_interleave(torch.arange(b, device=idx.device), lengths, output_size=idx.shape[0])
    pos = torch.arange(idx.shape[0], device=idx.device) - offsets[:-1].index_select(0, row)
    keep = pos < n
    slot = (row * n + pos)[keep]  # flat [B * n] position of every kept element
    emb = F.embedding(idx[keep], weight, sparse=sparse)  # [kept, D]
    if psw is not None:
        emb = emb * psw[keep][:, None]
    out = torch.zeros(b * n, d, dtype=emb.dtype, device=emb.device)
    out = out.index_copy(0, slot, emb)
    return out.view(b, n, d)
