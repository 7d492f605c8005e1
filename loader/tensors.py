"""``TensorLoader``: mini-batches of in-memory tensors, shaped like ``Loader``'s batches.

For small data, tests and examples: it yields :class:`ctrflow.loader.batch.Batch` with the same
column-major ``categorical`` / ``continuous`` views the parquet loader produces, shuffles with a
generator seeded by ``(seed, epoch)`` so every epoch is reproducible, and can start an epoch at a
given batch (what a resumed run needs). Its batch arithmetic is the parquet loader's
(``ctrflow.loader.plan``), for one rank.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ctrflow.loader.batch import Batch
from ctrflow.loader.plan import batches_for, rank_rows


class TensorLoader:
    """Batches over column-major tensors.

    Args:
        categorical: [N, n_cat] ids (any layout; stored column-major).
        continuous: [N, n_cont] float32.
        label: [N] float32.
        batch_size: rows per batch (B >= 1).
        shuffle: permute rows each epoch (``torch.Generator`` seeded ``seed * 100_003 + epoch``).
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
        """Rows held (N)."""
        return int(self.label.shape[0])

    def _rows_out(self) -> int:
        """Rows one epoch delivers: N, or the whole batches of N with ``drop_last``."""
        return rank_rows(self.rows, 1, self.batch_size, self.drop_last)[0]

    def __len__(self) -> int:
        return batches_for(self._rows_out(), self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose shuffle the next iteration uses."""
        self.epoch = int(epoch)

    def skip(self, batches: int) -> None:
        """Start the next iteration at batch ``batches`` of the epoch (for resuming mid-epoch)."""
        self.start_batch = int(batches)

    def __iter__(self) -> Iterator[Batch]:
        """Yield the epoch's batches (``categorical`` [B, n_cat], ``continuous`` [B, n_cont], ``label`` [B])."""
        n, bsz = self.rows, self.batch_size
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            perm = torch.randperm(n, generator=g)
        else:
            perm = None
        start, self.start_batch = self.start_batch, 0
        self.epoch += 1
        rows = self._rows_out()
        for i in range(start, batches_for(rows, bsz)):
            lo, hi = i * bsz, min(rows, (i + 1) * bsz)
            if perm is None:
                cat, cont, y = self.cat_t[:, lo:hi], self.cont_t[:, lo:hi], self.label[lo:hi]
            else:
                idx = perm[lo:hi]
                cat, cont, y = self.cat_t[:, idx], self.cont_t[:, idx], self.label[idx]
            yield Batch(cat.t(), cont.t(), y)
