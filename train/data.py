"""``TensorLoader``: mini-batches of in-memory tensors, shaped like ``ctrflow.loader``'s batches.

For small data, tests and examples: it yields :class:`ctrflow.loader.batch.Batch` with the same
column-major ``categorical`` / ``continuous`` views the parquet loader produces, shuffles with a
generator seeded by ``(seed, epoch)`` so every epoch is reproducible, and can start an epoch at a
given batch (what a resumed run needs).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ctrflow.loader.batch import Batch


class TensorLoader:
    """Batches over column-major tensors.

    Args:
        categorical: [B, n_cat] ids (any layout; stored column-major).
        continuous: [B, n_cont] float32.
        label: [B] float32.
        batch_size: rows per batch (>= 1).
        shuffle: permute rows each epoch (seeded by ``seed`` and the epoch number).
        seed: base seed of the shuffle.
        drop_last: drop a last, smaller batch.
    """

    def __init__(self, categorical: torch.Tensor, continuous: torch.Tensor, label: torch.Tensor,
                 batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = label.shape[0]
        if categorical.shape[0] != n or continuous.shape[0] != n:
            raise ValueError(f"row counts differ: {categorical.shape[0]}, {continuous.shape[0]}, {n}")
        self.cat_t = categorical.t().contiguous()  # [n_cat, N]
        self.cont_t = continuous.float().t().contiguous()  # [n_cont, N]
        self.label = label.float().contiguous()
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0

    @property
    def rows(self) -> int:
        return int(self.label.shape[0])

    def __len__(self) -> int:
        n = self.rows
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose shuffle the next iteration uses."""
        self.epoch = int(epoch)

    def skip(self, batches: int) -> None:
        """Start the next iteration at batch ``batches`` of the epoch (for resuming mid-epoch)."""
        self.start_batch = int(batches)

    def __iter__(self) -> Iterator[Batch]:
        n = self.rows
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            perm = torch.randperm(n, generator=g)
        else:
            perm = None
        start, self.start_batch = self.start_batch, 0
        self.epoch += 1
        for i in range(start, len(self)):
            lo, hi = i * self.batch_size, min(n, (i + 1) * self.batch_size)
            if perm is None:
                cat, cont, y = self.cat_t[:, lo:hi], self.cont_t[:, lo:hi], self.label[lo:hi]
            else:
                rows = perm[lo:hi]
                cat, cont, y = self.cat_t[:, rows], self.cont_t[:, rows], self.label[rows]
            yield Batch(cat.t(), cont.t(), y)
