"""Clipping the dense (MLP) part of a step's gradient by its global norm; the batch rule sets the limit
(:mod:`ctrflow.train.scaling`), the trainer applies it before each optimizer step. The embedding tables'
sparse gradients are CowClip's, row by row (:mod:`ctrflow.train.optim`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def clip_dense_gradients(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor | None:
    """Scale the dense gradients of ``params`` so that their global L2 norm is at most ``max_norm``.

    Sparse gradients (the embedding tables: CowClip clips those row by row) are left out. One fused
    ``foreach`` pass; nothing is read back to the host, so it does not synchronise a GPU.

    Args:
        params: the model's parameters (those without a gradient, or with a sparse one, are skipped).
        max_norm: the largest norm the dense gradient may keep (> 0).

    Returns:
        The norm before clipping (a 0-dim tensor on the gradients' device), or None without dense gradients.
    """
    dense = [p for p in params if p.grad is not None and not p.grad.is_sparse]
    if not dense:
        return None
    return torch.nn.utils.clip_grad_norm_(dense, max_norm, foreach=True)
