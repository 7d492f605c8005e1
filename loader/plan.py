"""Epoch plans: which rows each rank reads, in which order, grouped into chunks.

The dataset is a list of *pieces* (runs of row groups, see ``ctrflow.loader.source``). For every epoch
the pieces are put in an order (file order, or a seeded permutation when shuffling) that all ranks
compute identically; that order defines a virtual row sequence ``0 .. N-1``. Rank ``r`` takes one
contiguous range of that sequence, so ranks never overlap, and the ranges are sized so that every
rank yields the **same number of batches** (DDP never waits on a rank that ran out):

- ``drop_last=False``: rank row counts differ by at most one (``N // W`` or ``N // W + 1``), so every
  row is delivered once per epoch and every rank has ``ceil(ceil(N / W) / B)`` batches; only the
  last batch of a rank may be smaller (by one row more on the ranks that got one row less). One
  corner case cannot be balanced: when ``N // W`` is a multiple of ``B`` and ``N % W != 0`` the
  ranks holding one row less would need an *empty* last batch; instead the ``N % W`` (< W) surplus
  rows of that epoch are left out, exactly as if they were a final global batch too small to split.
- ``drop_last=True``: every rank yields ``(N // W) // B`` full batches; the rest is skipped.
- Validation needs every row: ``every_row_batch_size`` gives the smallest batch size >= B that avoids
  the corner case (``Loader(..., every_row=True)`` uses it).

A rank's range then becomes a list of slices ``(piece, start, stop)``; consecutive slices are
grouped ``parts_per_chunk`` at a time into chunks, the unit the producer reads and shuffles. Inside a
rank, ``cut_chunk`` says how each chunk (with the rows carried over from the previous one) is cut into
batches, for the CPU and CUDA builders alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Slice:
    """Rows ``[start, stop)`` of piece number ``piece`` (piece-local row numbers)."""

    piece: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def rank_rows(total: int, world: int, batch_size: int, drop_last: bool) -> list[int]:
    """Rows each rank delivers per epoch (see the module docstring for the rule).

    Args:
        total: rows in the dataset (N).
        world: number of ranks (W).
        batch_size: rows per batch (B).
        drop_last: drop each rank's incomplete last batch.

    Returns:
        ``W`` row counts; their batch counts (``ceil(n / B)``) are all equal.
    """
    q, rem = divmod(total, world)
    if drop_last:
        return [(q // batch_size) * batch_size] * world
    if rem and q % batch_size == 0:
        return [q] * world  # the corner case: leave the < W surplus rows out
    return [q + (r < rem) for r in range(world)]


def batches_for(rows: int, batch_size: int) -> int:
    """Number of batches that ``rows`` rows make (the last one may be partial)."""
    return -(-rows // batch_size)


def every_row_batch_size(total: int, world: int, batch_size: int) -> int:
    """The smallest batch size >= ``batch_size`` for which the rank split delivers *every* row.

    ``rank_rows`` leaves up to ``W - 1`` rows out in one corner case (``(N // W) % B == 0`` with
    ``N % W != 0``); exact validation metrics need them all. Returns ``batch_size`` itself whenever
    no row is left out (always for ``W == 1``).

    Args:
        total: rows in the dataset (N).
        world: number of ranks (W).
        batch_size: the batch size asked for (B).

    Returns:
        The batch size to use (B or a little more).

    Raises:
        ValueError: ``0 < N < W``: some rank would have no row, yet every rank must yield a batch.
    """
    if 0 < total < world:
        raise ValueError(f"cannot deliver each of {total} rows once over {world} ranks with the same number of "
                         f"batches on every rank: fewer rows than ranks")
    # Terminates: with N // W = q > 0 the corner case ends at B = q + 1 at the latest.
    while sum(rank_rows(total, world, batch_size, False)) < total:
        batch_size += 1
    return batch_size


@dataclass(frozen=True)
class Cut:
    """How one chunk of ``total`` rows (carried-over rows first) is cut into batches.

    Attributes:
        batches: batches handed out (K); they cover rows ``[0, rows)``.
        last_rows: rows in batch ``K - 1`` (B unless it is the epoch's partial last batch).
        rows: rows handed out.
        carry: rows ``[rows, total)`` kept for the next chunk (0 on the final chunk).
    """

    batches: int
    last_rows: int
    rows: int
    carry: int

    @property
    def keep_from(self) -> int | None:
        """First carried row, or ``None`` when nothing is carried."""
        return self.rows if self.carry else None


def cut_chunk(total: int, batch_size: int, final: bool) -> Cut:
    """Cut ``total`` rows into whole batches; carry the rest, or hand it out on the ``final`` chunk.

    Batches never straddle two chunks: rows that do not fill a batch go first into the next chunk,
    and only the epoch's final chunk hands out a partial batch.

    Args:
        total: rows in the chunk, carried-over rows included.
        batch_size: B.
        final: the epoch's last chunk of this rank.

    Returns:
        The ``Cut`` (``batches == 0``: no batch is complete yet).
    """
    full, rem = divmod(total, batch_size)
    if final:
        return Cut(full + (rem > 0), rem or batch_size, total, 0)
    return Cut(full, batch_size, full * batch_size, rem)


def piece_order(num_pieces: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The epoch's piece order: identical on every rank for the same (seed, epoch)."""
    if not shuffle:
        return np.arange(num_pieces)
    return np.random.default_rng([seed, epoch]).permutation(num_pieces)


def rank_slices(
    piece_rows: list[int], order: np.ndarray, start: int, rows: int
) -> list[Slice]:
    """The slices covering virtual rows ``[start, start + rows)`` of the ordered pieces."""
    out: list[Slice] = []
    stop = start + rows
    pos = 0  # virtual row where the current piece begins
    for p in order:
        n = piece_rows[p]
        lo, hi = max(start, pos), min(stop, pos + n)
        if lo < hi:
            out.append(Slice(int(p), lo - pos, hi - pos))
        pos += n
        if pos >= stop:
            break
    return out


def epoch_chunks(
    piece_rows: list[int],
    *,
    epoch: int,
    seed: int,
    shuffle: bool,
    rank: int,
    world: int,
    batch_size: int,
    drop_last: bool,
    parts_per_chunk: int,
) -> list[list[Slice]]:
    """This rank's chunks for one epoch, in reading order.

    Args:
        piece_rows: rows of every piece, in storage order.
        epoch, seed: select the shuffle (same on every rank).
        shuffle: permute the piece order (rows are permuted later, inside each chunk).
        rank, world: this rank and the number of ranks.
        batch_size, drop_last: as for ``Loader``.
        parts_per_chunk: slices per chunk.

    Returns:
        A list of chunks, each a list of ``Slice``; together exactly ``rank_rows(...)[rank]`` rows.
    """
    counts = rank_rows(sum(piece_rows), world, batch_size, drop_last)
    # Ranges are laid out as if every rank held its "natural" share (q or q + 1 rows) so that the
    # layout does not depend on drop_last; each rank then reads only its first counts[rank] rows.
    q, rem = divmod(sum(piece_rows), world)
    start = rank * q + min(rank, rem)
    order = piece_order(len(piece_rows), seed, epoch, shuffle)
    slices = rank_slices(piece_rows, order, start, counts[rank])
    return [slices[i : i + parts_per_chunk] for i in range(0, len(slices), parts_per_chunk)]
