"""Reading a chunk of slices and turning it into batch-major CPU tensors.

A chunk is stored **batch-major**: ``cat`` is ``[K, n_cat, B]`` and ``flt`` (continuous columns then
labels) is ``[K, n_flt, B]``, so batch ``k`` is the contiguous column-major block ``cat[k]`` and the
``Batch`` handed out is the view ``cat[k].t()`` ([B, n_cat], strides (1, B)): columns stay as parquet
stores them and no row-major copy is made on the host. Rows that do not fill a whole batch are kept
(``leftover``) and go first into the next chunk, so batches never straddle two buffers.

CPU path, per chunk: one big ``read_row_groups`` per file (pyarrow decodes columns on its threads,
GIL released), then each column is copied once from its zero-copy numpy view, either straight into
the batch-major output (no shuffle) or, one column at a time, into a scratch column (a few MB, so it
stays in cache) from which per-batch ``np.take`` calls gather the output in a random row order
(shuffle).

The host-side copies and gathers use numpy, not torch, on purpose: they run in the producer thread
next to the training loop, and a torch op there would start a second OpenMP team; with more busy
threads than cores, OpenMP's spinning barriers slowed a 1 MB copy 300x on the 2-core machine.
numpy's loops are single-threaded and release the GIL, so the producer uses one core cleanly.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ctrflow.loader import pages
from ctrflow.loader.lists import ListStage
from ctrflow.loader.plan import Slice, batches_for, cut_chunk
from ctrflow.loader.pool import BufferPool
from ctrflow.loader.source import Columns, Source


@dataclass
class Chunk:
    """Batches ready to hand out.

    Attributes:
        cat: [K', n_cat, B] categorical ids (K' >= batches).
        flt: [K', n_cont + n_label, B] float32.
        batches: number of batches K to hand out (the first K blocks).
        last_rows: rows in batch K - 1 (B unless it is the epoch's partial last batch).
        event: CUDA event the consumer waits on before using the tensors (GPU path).
        lists: list columns ``{name: (values, offsets, weights | None)}`` of the rows handed out, in
            batch order (see ``ctrflow.loader.lists``); empty without list columns.
    """

    cat: torch.Tensor
    flt: torch.Tensor
    batches: int
    last_rows: int
    event: Any = None
    lists: dict[str, Any] = field(default_factory=dict)


def read_tables(src: Source, parts: list[Slice]) -> list[pa.Table]:
    """Read ``parts`` (one ``read_row_groups`` call per file) into one Arrow table per slice.

    Plain-encoded REQUIRED columns come as zero-copy views of the file's pages (``ctrflow.loader.pages``),
    the rest decoded by pyarrow.
    """
    names = list(src.columns.cats + src.columns.floats + src.columns.list_columns)
    by_file: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(parts):
        by_file[src.pieces[s.piece].file].append(i)
    out: list[pa.Table | None] = [None] * len(parts)
    for f, idx in by_file.items():
        rgs = sorted({rg for i in idx for rg in src.pieces[parts[i].piece].row_groups})
        path = src.files[f]
        try:
            table = pages.read_row_groups(path, src.metadata[f], rgs, names, src.page_layouts)
        except Exception as e:
            if hasattr(e, "add_note"):
                e.add_note(f"ctrflow.loader: while reading row groups {rgs} of {path}")
            raise
        offset, pos = {}, 0
        for rg in rgs:
            offset[rg] = pos
            pos += src.metadata[f].row_group(rg).num_rows
        for i in idx:
            s = parts[i]
            out[i] = table.slice(offset[src.pieces[s.piece].row_groups[0]] + s.start, s.rows)
    return out  # type: ignore[return-value]


def arrow_to_numpy(arr: pa.Array, name: str, kind: str) -> np.ndarray:
    """A 1-D numpy view of ``arr`` (zero-copy when Arrow allows; read-only).

    Nulls: an error for categorical and label columns, NaN for continuous ones.
    """
    if arr.null_count:
        if kind != "continuous":
            raise ValueError(f"{kind} column {name!r} has {arr.null_count} nulls; fill them before loading")
        arr = pc.cast(arr, pa.float32()).fill_null(float("nan"))
    return arr.to_numpy(zero_copy_only=False)


def _columns(cols: Columns) -> list[tuple[int, str, str, bool]]:
    """(row in its buffer, name, kind, is_categorical) for every delivered column."""
    out = [(j, n, "categorical", True) for j, n in enumerate(cols.cats)]
    out += [(j, n, "continuous", False) for j, n in enumerate(cols.conts)]
    out += [(len(cols.conts) + j, n, "label", False) for j, n in enumerate(cols.labels)]
    return out


def by_column_groups(columns: list[Any], threads: int, work: Callable[[list[Any], int], None]) -> None:
    """Run ``work(group, i)`` on ``threads`` round-robin groups of ``columns`` in parallel.

    numpy's copies and takes release the GIL, so the groups use as many cores; ``threads=1`` runs
    everything in the calling thread.
    """
    groups = [columns[i::threads] for i in range(min(threads, len(columns)))]
    if len(groups) <= 1:
        for i, g in enumerate(groups):
            work(g, i)
        return
    with ThreadPoolExecutor(len(groups) - 1, thread_name_prefix="ctrflow-loader-copy") as pool:
        futures = [pool.submit(work, g, i) for i, g in enumerate(groups) if i]
        work(groups[0], 0)
        for f in futures:
            f.result()


def fill_staging(cols: Columns, tables: list[pa.Table], cat: torch.Tensor, flt: torch.Tensor, at: int,
                 threads: int = 1) -> int:
    """Copy ``tables`` into column-major buffers ``cat`` [n_cat, T] / ``flt`` [n_flt, T] from row ``at``.

    Args:
        threads: threads copying (columns split between them).

    Returns:
        The row after the last one written.
    """
    cat_np, flt_np = cat.numpy(), flt.numpy()

    def copy(group: list[tuple[int, str, str, bool]], _: int) -> None:
        for j, name, kind, is_cat in group:
            dst = cat_np[j] if is_cat else flt_np[j]
            pos = at
            for t in tables:
                for ch in t.column(name).chunks:
                    n = len(ch)
                    if n:
                        np.copyto(dst[pos : pos + n], arrow_to_numpy(ch, name, kind), casting="unsafe")
                        pos += n

    by_column_groups(_columns(cols), threads, copy)
    return at + sum(t.num_rows for t in tables)


def _put_rows(buf: np.ndarray, j: int, start: int, src: np.ndarray) -> None:
    """Write 1-D ``src`` to rows ``start..`` of column ``j`` of batch-major ``buf`` [K, n, B]."""
    bsz = buf.shape[2]
    n, pos = src.shape[0], 0
    k, o = divmod(start, bsz)
    if o:  # head: the rest of a partly filled batch
        m = min(bsz - o, n)
        np.copyto(buf[k, j, o : o + m], src[:m], casting="unsafe")
        pos, k = m, k + 1
    full = (n - pos) // bsz
    if full:  # whole batches in one strided copy
        np.copyto(buf[k : k + full, j, :], src[pos : pos + full * bsz].reshape(full, bsz), casting="unsafe")
        pos, k = pos + full * bsz, k + full
    if pos < n:
        np.copyto(buf[k, j, : n - pos], src[pos:], casting="unsafe")


class CpuBuilder:
    """Builds CPU chunks from decoded tables, carrying leftover rows between chunks.

    Args:
        cols: the delivered columns.
        batch_size: B.
        shuffle: permute rows inside each chunk (leftover rows included).
        pin: put chunks in page-locked memory (for a later ``.to("cuda", non_blocking=True)``).
        threads: threads copying / gathering the columns (1: the producer thread alone, which leaves
            the other cores to the model; more when the host has cores to spare, e.g. feeding a GPU).
    """

    def __init__(self, cols: Columns, batch_size: int, shuffle: bool, pin: bool = False, threads: int = 1) -> None:
        self.cols, self.bsz, self.shuffle = cols, batch_size, shuffle
        self.n_cat, self.n_flt = len(cols.cats), len(cols.floats)
        self.threads = max(1, int(threads))
        self.out_pool = BufferPool(capacity=6, pin=pin)  # cat + flt of up to 3 chunks
        self.stage_pool = BufferPool(capacity=2 * self.threads)  # two scratch columns per thread
        self.left: tuple[np.ndarray, np.ndarray] | None = None  # ([n_cat, L], [n_flt, L]) copies
        self.list_stage = ListStage(cols.lists, cols.list_weights) if cols.lists else None

    def build(self, tables: list[pa.Table], seed: int | None, final: bool) -> Chunk | None:
        """Turn ``tables`` (+ leftover) into a chunk, cut by ``plan.cut_chunk`` (the CUDA path's cut too).

        Args:
            tables: decoded slices, in order.
            seed: seed of this chunk's row permutation (used when shuffling).
            final: the epoch's last chunk: hand out the partial last batch too.

        Returns:
            The chunk, or ``None`` when no batch is complete yet (its rows are carried).
        """
        left = self.left[0].shape[1] if self.left is not None else 0
        total = left + sum(t.num_rows for t in tables)
        if total == 0:
            return None
        blocks = batches_for(total, self.bsz)  # every row is laid out, the carried ones included
        cat = self.out_pool.get((blocks, self.n_cat, self.bsz), self.cols.cat_dtype)
        flt = self.out_pool.get((blocks, self.n_flt, self.bsz), torch.float32)
        cat_np, flt_np = cat.numpy(), flt.numpy()
        perm = np.random.default_rng(seed).permutation(total) if self.shuffle else None
        if perm is not None:
            self._shuffled(tables, cat_np, flt_np, left, total, perm)
        else:
            self._direct(tables, cat_np, flt_np, left)
        cut = cut_chunk(total, self.bsz, final)
        lists = {}
        if self.list_stage is not None:
            lists = self.list_stage.build(tables, self.left is not None, perm, cut.rows, cut.keep_from)
        # The carried rows are the head of block K (the blocks before it are all handed out).
        k, n = cut.batches, cut.carry
        self.left = (cat_np[k, :, :n].copy(), flt_np[k, :, :n].copy()) if n else None
        return Chunk(cat, flt, cut.batches, cut.last_rows, lists=lists) if cut.batches else None

    def _direct(self, tables: list[pa.Table], cat: np.ndarray, flt: np.ndarray, left: int) -> None:
        if self.left is not None:
            cat[0, :, :left] = self.left[0]
            flt[0, :, :left] = self.left[1]

        def copy(group: list[tuple[int, str, str, bool]], _: int) -> None:
            for j, name, kind, is_cat in group:
                buf, pos = (cat if is_cat else flt), left
                for t in tables:
                    for ch in t.column(name).chunks:
                        if len(ch):
                            _put_rows(buf, j, pos, arrow_to_numpy(ch, name, kind))
                            pos += len(ch)

        by_column_groups(_columns(self.cols), self.threads, copy)

    def _shuffled(
        self, tables: list[pa.Table], cat: np.ndarray, flt: np.ndarray, left: int, total: int, perm: np.ndarray
    ) -> None:
        columns = _columns(self.cols)
        # Each group gets its own scratch columns (taken here, in this thread, so they are distinct).
        scratch = [
            {
                np.dtype(np.float32): self.stage_pool.get((total,), torch.float32).numpy(),
                cat.dtype: self.stage_pool.get((total,), self.cols.cat_dtype).numpy(),
            }
            for _ in range(min(self.threads, len(columns)))
        ]
        by_column_groups(columns, self.threads,
                         lambda group, i: self._gather(group, scratch[i], tables, cat, flt, left, perm))

    def _gather(
        self,
        columns: list[tuple[int, str, str, bool]],
        scratch: dict[np.dtype, np.ndarray],
        tables: list[pa.Table],
        cat: np.ndarray,
        flt: np.ndarray,
        left: int,
        perm: np.ndarray,
    ) -> None:
        """Copy each of ``columns`` into a scratch column, then gather it in ``perm`` order into the chunk."""
        bsz, blocks = self.bsz, cat.shape[0]
        for j, name, kind, is_cat in columns:
            # Gather one column at a time from a scratch column that stays in cache (a few MB),
            # rather than staging the whole chunk in memory and reading it back.
            dst = cat if is_cat else flt
            col = scratch[dst.dtype]
            if self.left is not None:
                col[:left] = self.left[0 if is_cat else 1][j]
            pos = left
            for t in tables:
                for ch in t.column(name).chunks:
                    if len(ch):
                        np.copyto(col[pos : pos + len(ch)], arrow_to_numpy(ch, name, kind), casting="unsafe")
                        pos += len(ch)
            for k in range(blocks):
                idx = perm[k * bsz : (k + 1) * bsz]
                # mode="wrap": no bounds check, which would also buffer the output.
                np.take(col, idx, out=dst[k, j, : idx.shape[0]], mode="wrap")
