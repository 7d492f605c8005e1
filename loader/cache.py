"""Decoded pieces kept in host memory across epochs (``Loader(..., cache=True)``).

Streaming from parquet costs a decode per epoch: on Criteo-shaped plain-encoded files pyarrow decodes
~3.6M rows/s on 2 cores, so the read alone bounds every epoch. A dataset that fits in RAM (4M rows x
40 columns x 4 B = 640 MB) need not pay it again: the first epoch keeps each decoded piece (an Arrow
table of the loader's columns, the same buffers the builder would get from a fresh read) and later
epochs slice those. The shuffle, sharding and batching are unchanged: ``read`` returns exactly what
``read_tables`` would.

Memory: the decoded size of the pieces this rank has read (``Loader.cache_bytes`` tells), held until
the loader is garbage-collected or ``clear()`` is called. With several ranks the shuffled plan gives a
rank other pieces in later epochs, so each rank's cache grows towards the whole dataset: on one
machine with N ranks, budget N copies (or cache only with one rank per machine). Off by default:
the streaming loader keeps about two chunks alive however large the dataset.
"""

from __future__ import annotations

import threading

import pyarrow as pa

from ctrflow.loader.chunk import read_tables
from ctrflow.loader.plan import Slice
from ctrflow.loader.source import Source


class PieceCache:
    """``read(parts)`` like ``chunk.read_tables``, decoding each piece once and then serving it from memory.

    Args:
        src: the resolved source (files, pieces, columns).
    """

    def __init__(self, src: Source) -> None:
        self.src = src
        self.tables: dict[int, pa.Table] = {}
        self._lock = threading.Lock()  # the read-ahead thread of one epoch vs. a new epoch's

    @property
    def nbytes(self) -> int:
        """Bytes of decoded data held."""
        return sum(t.nbytes for t in self.tables.values())

    def read(self, parts: list[Slice]) -> list[pa.Table]:
        """One Arrow table per slice (zero-copy slices of the cached pieces)."""
        with self._lock:
            missing = sorted({s.piece for s in parts} - self.tables.keys())
            if missing:
                whole = [Slice(p, 0, self.src.pieces[p].rows) for p in missing]
                for p, table in zip(missing, read_tables(self.src, whole), strict=True):
                    # One owned contiguous buffer per column: plain columns arrive as views of the
                    # file's pages (page cache the kernel may evict), one chunk per page.
                    self.tables[p] = table.combine_chunks()
            return [self.tables[s.piece].slice(s.start, s.rows) for s in parts]

    def clear(self) -> None:
        """Drop every cached piece (the next epoch decodes again)."""
        with self._lock:
            self.tables.clear()
