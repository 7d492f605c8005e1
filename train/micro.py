"""Micro-batches: a large batch run forward and backward in slices, for one optimizer step.

A batch of 400,000 rows keeps every layer's activations for all of its rows until the backward pass.
Slicing the batch into micro-batches of :data:`AUTO_ROWS` rows and weighting each slice's mean loss by
its share of the batch gives the same gradient (up to float summation order) for any model whose rows do
not interact, in a fraction of the memory (``train/fit.py --batch-size 400000`` on 36M rows: 4.36 GB peak
RSS with slices, 7.86 GB whole; bench/RESULTS.md). The optimizer still steps once per batch, so the
batch rule (:mod:`ctrflow.train.scaling`), the schedule and the checkpoints are those of the full batch.

Models with batch statistics (BatchNorm: the TabularModel) would normalise each slice by its own
statistics ("ghost batch norm"), a different model: they are split only when asked for explicitly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Rows per slice on the CPU. DLRM forward/backward per row on a 2-core EPYC (bench/RESULTS.md, "Large
# batches"): 34.3 us at 16384 against 41.4 at 32768 and 36.5 at 8192 (fp32; bf16 21.9 / 25.0 / 24.6): a
# slice's activations (~32 MB a layer at 512 wide) stay near the cache, and per-op overhead stays small.
AUTO_ROWS = 16384


def has_batch_statistics(model: nn.Module) -> bool:
    """True when a module of ``model`` normalises by statistics of the batch (BatchNorm in training)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def micro_batch_rows(requested: int | None, batch_rows: int, device: torch.device, model: nn.Module,
                     world_size: int = 1, custom_step: bool = False) -> int:
    """Rows per micro-batch for batches of ``batch_rows`` (0: run each batch whole).

    Args:
        requested: ``TrainConfig.micro_batch``: None for the automatic choice (:data:`AUTO_ROWS` on the CPU
            for one process, a model without batch statistics and the built-in loss), 0 for never, or rows.
        batch_rows: rows per training batch.
        device: where the model trains (the automatic choice splits on the CPU only: a GPU's memory is
            sized by the user's batch, and its kernels gain from the whole batch).
        model: the model (BatchNorm keeps it whole unless ``requested`` is explicit).
        world_size: ranks (several: whole batches, so DDP reduces once per step).
        custom_step: the model brings its own ``training_step`` (its loss need not be a mean: whole).

    Returns:
        Rows per slice, or 0 when the batch is not larger than one slice or may not be split.
    """
    if requested is not None and requested < 0:
        raise ValueError(f"micro_batch must be >= 0 (0: never split), got {requested}")
    if world_size > 1:
        return 0
    if requested is None:
        if device.type != "cpu" or custom_step or has_batch_statistics(model):
            return 0
        requested = AUTO_ROWS
    return requested if 0 < requested < batch_rows else 0


class SparseGradients:
    """Gathers the sparse gradients of a batch's slices and joins them once, after the last slice.

    Autograd adds each slice's sparse gradient into ``param.grad`` by concatenation, copying everything
    gathered so far: ``k`` slices cost ``O(k^2)`` copies of one slice's rows (a 400,000-row batch in 25
    slices copies ~9 GB), and it merges some duplicate lookups on the way. Taking each slice's gradient
    out and concatenating all of them at the end is ``O(k)`` and keeps one entry per lookup, as the whole
    batch's backward does, so the optimizers (CowClip's lookup counts included) see the whole batch's
    gradient (``tests/test_micro_batch.py``).

    Args:
        params: the model's parameters (only those that receive sparse gradients are touched).
    """

    def __init__(self, params: Any) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.parts: dict[int, list[torch.Tensor]] = {}

    def take(self) -> None:
        """After a slice's backward: move every sparse ``param.grad`` aside (the param's grad is then None)."""
        for i, p in enumerate(self.params):
            if p.grad is not None and p.grad.is_sparse:
                self.parts.setdefault(i, []).append(p.grad)
                p.grad = None

    def join(self) -> None:
        """After the last slice: each param's gathered gradients as one sparse ``param.grad``."""
        for i, parts in self.parts.items():
            p = self.params[i]
            if len(parts) == 1:
                p.grad = parts[0]
                continue
            idx = torch.cat([g._indices() for g in parts], dim=1)
            val = torch.cat([g._values() for g in parts])
            # The indices are autograd's own (valid): no invariant check (and no warning about skipping one).
            p.grad = torch.sparse_coo_tensor(idx, val, parts[0].shape, is_coalesced=False, check_invariants=False)
        self.parts = {}


def split_batch(batch: Any, rows: int) -> list[Any]:
    """``batch`` as consecutive slices of at most ``rows`` rows (views, no copy).

    Args:
        batch: a :class:`~ctrflow.loader.batch.Batch` or a tuple / list of tensors sharing dim 0.
        rows: rows per slice (> 0).

    Returns:
        The slices in order; ``[batch]`` when it has list features (their values are ragged) or is
        another kind of object.
    """
    if hasattr(batch, "categorical"):
        if batch.lists or batch.weights:
            return [batch]
        n = len(batch)
        return [type(batch)(batch.categorical[s:s + rows], batch.continuous[s:s + rows], batch.label[s:s + rows],
                            labels=None if batch.labels is None else batch.labels[s:s + rows])
                for s in range(0, n, rows)]
    if isinstance(batch, (tuple, list)) and batch and all(torch.is_tensor(t) for t in batch):
        n = batch[0].shape[0]
        if all(t.shape[0] == n for t in batch):
            return [type(batch)(t[s:s + rows] for t in batch) for s in range(0, n, rows)]
    return [batch]
