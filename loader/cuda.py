"""The GPU path: host-to-device copies on a side stream, shuffle and batch layout on the GPU.

Per chunk the producer thread decodes with pyarrow into a **pinned** column-major staging buffer
(two of them, used in turn; one is refilled only after the copy out of it has completed), then on a
side CUDA stream copies it to the device without blocking, prepends the leftover rows (kept on the
device), permutes the rows with a device ``randperm`` and lays them out batch-major
(``[K, n, B]``, the transpose is cheap on the GPU). An event recorded on the side stream is handed to
the consumer, which makes its own stream wait on it, so the copy and shuffle of chunk ``i + 1``
overlap the model's work on chunk ``i``. With RAPIDS installed, ``cudf.read_parquet`` decodes on the
GPU and the columns arrive through DLPack, skipping the host entirely.

Not exercised by the CPU test suite (tests marked ``gpu`` run it where CUDA exists).
"""

from __future__ import annotations

import pyarrow as pa
import torch

from ctrflow.loader.chunk import Chunk, fill_staging
from ctrflow.loader.lists import ListStage
from ctrflow.loader.plan import Slice, cut_chunk
from ctrflow.loader.pool import BufferPool
from ctrflow.loader.source import Source


def cudf_available() -> bool:
    try:
        import cudf  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install raising something else
        return False
    return True


def read_device_columns(src: Source, parts: list[Slice], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Decode ``parts`` on the GPU with cudf; one ``{column: 1-D device tensor}`` per slice."""
    import cudf

    names = list(src.columns.cats + src.columns.floats)
    out = []
    for s in parts:
        piece = src.pieces[s.piece]
        path = src.files[piece.file]
        try:
            df = cudf.read_parquet(path, columns=names, row_groups=[list(piece.row_groups)])
        except Exception as e:
            if hasattr(e, "add_note"):
                e.add_note(f"ctrflow.loader: while reading row groups {piece.row_groups} of {path}")
            raise
        df = df.iloc[s.start : s.stop]
        cols = {}
        for name in names:
            col = df[name]
            if col.null_count:
                if name in src.columns.conts:
                    col = col.astype("float32").fillna(float("nan"))
                else:
                    raise ValueError(f"column {name!r} has {col.null_count} nulls; fill them before loading")
            cols[name] = torch.from_dlpack(col.values).to(device)
        out.append(cols)
    torch.cuda.synchronize(device)  # cudf ran on its own stream; make its results visible to ours
    return out


class CudaBuilder:
    """Builds device chunks (see the module docstring).

    Args:
        src: the resolved source (columns, dtypes).
        batch_size: B.
        shuffle: permute rows inside each chunk on the device.
        device: the CUDA device.
        threads: host threads copying the decoded columns into the pinned staging buffers.
    """

    def __init__(self, src: Source, batch_size: int, shuffle: bool, device: torch.device, threads: int = 1) -> None:
        self.cols, self.bsz, self.shuffle, self.device = src.columns, batch_size, shuffle, device
        self.threads = threads
        self.n_cat, self.n_flt = len(src.columns.cats), len(src.columns.floats)
        self.stream = torch.cuda.Stream(device)
        self.pools = [BufferPool(capacity=2, pin=True), BufferPool(capacity=2, pin=True)]
        self.events: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0
        self.left: tuple[torch.Tensor, torch.Tensor] | None = None
        cols = src.columns
        self.list_stage = ListStage(cols.lists, cols.list_weights, device) if cols.lists else None

    def _to_device(self, tables: list[pa.Table]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = sum(t.num_rows for t in tables)
        slot, self.turn = self.turn, 1 - self.turn
        if self.events[slot] is not None:
            self.events[slot].synchronize()  # the previous copy out of this staging slot is done
        pool = self.pools[slot]
        h_cat = pool.get((self.n_cat, rows), self.cols.cat_dtype)
        h_flt = pool.get((self.n_flt, rows), torch.float32)
        fill_staging(self.cols, tables, h_cat, h_flt, 0, threads=self.threads)
        with torch.cuda.stream(self.stream):
            d_cat = h_cat.to(self.device, non_blocking=True)
            d_flt = h_flt.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.events[slot] = ev
        return d_cat, d_flt

    def _from_cudf(self, cols: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = sum(next(iter(c.values())).shape[0] for c in cols) if cols else 0
        with torch.cuda.stream(self.stream):
            d_cat = torch.empty((self.n_cat, rows), dtype=self.cols.cat_dtype, device=self.device)
            d_flt = torch.empty((self.n_flt, rows), dtype=torch.float32, device=self.device)
            pos = 0
            for c in cols:
                n = next(iter(c.values())).shape[0]
                for j, name in enumerate(self.cols.cats):
                    d_cat[j, pos : pos + n].copy_(c[name])
                for j, name in enumerate(self.cols.floats):
                    d_flt[j, pos : pos + n].copy_(c[name])
                pos += n
        return d_cat, d_flt

    def build(self, data, seed: int | None, final: bool) -> Chunk | None:
        """``data``: Arrow tables (host decode) or cudf column dicts; see ``CpuBuilder.build``."""
        if data and isinstance(data[0], pa.Table):
            d_cat, d_flt = self._to_device(data)
        else:
            d_cat, d_flt = self._from_cudf(data)
        with torch.cuda.stream(self.stream):
            lists, had_left = {}, self.left is not None
            total = d_cat.shape[1] + (self.left[0].shape[1] if had_left else 0)
            perm = None
            if self.shuffle:
                gen = torch.Generator(device=self.device).manual_seed(seed or 0)
                perm = torch.randperm(total, device=self.device, generator=gen)
            cat, flt, blocks, last, self.left = arrange(d_cat, d_flt, self.left, perm, self.bsz, final)
            if self.list_stage is not None:  # same permutation, same cut (arrange's), same leftover rows
                cut = cut_chunk(total, self.bsz, final)
                lists = self.list_stage.build(data, had_left, perm, cut.rows, cut.keep_from)
            if blocks == 0:
                return None
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return Chunk(cat, flt, blocks, last, event=ev, lists=lists)


def arrange(
    cat: torch.Tensor,
    flt: torch.Tensor,
    left: tuple[torch.Tensor, torch.Tensor] | None,
    perm: torch.Tensor | None,
    bsz: int,
    final: bool,
) -> tuple[torch.Tensor, torch.Tensor, int, int, tuple[torch.Tensor, torch.Tensor] | None]:
    """Leftover + new rows -> permuted, batch-major blocks (device-agnostic; the GPU path's core).

    The rows are cut as ``CpuBuilder.build`` cuts them (``plan.cut_chunk``).

    Args:
        cat, flt: [n_cat, R] / [n_flt, R] new rows, column-major.
        left: leftover ([n_cat, L], [n_flt, L]) from the previous chunk, or ``None``.
        perm: a permutation of the L + R rows, or ``None`` to keep their order.
        bsz: B.
        final: the epoch's last chunk (hand out the partial last batch).

    Returns:
        (cat [K', n_cat, B], flt [K', n_flt, B], batches K, rows of batch K - 1, new leftover).
    """
    if left is not None:
        cat, flt = torch.cat([left[0], cat], dim=1), torch.cat([left[1], flt], dim=1)
    if perm is not None:
        cat, flt = cat.index_select(1, perm), flt.index_select(1, perm)
    cut = cut_chunk(cat.shape[1], bsz, final)
    new_left = (cat[:, cut.rows :].clone(), flt[:, cut.rows :].clone()) if cut.carry else None
    k = cut.batches
    return _batch_major(cat, k, bsz), _batch_major(flt, k, bsz), k, cut.last_rows, new_left


def _batch_major(x: torch.Tensor, blocks: int, bsz: int) -> torch.Tensor:
    """The first ``blocks * B`` rows of [n, T] -> [blocks, n, B], zero-padding a partial last block."""
    x = x[:, : blocks * bsz]
    n, t = x.shape
    if t < blocks * bsz:
        padded = torch.zeros((n, blocks * bsz), dtype=x.dtype, device=x.device)
        padded[:, :t] = x
        x = padded
    return x.reshape(n, blocks, bsz).transpose(0, 1).contiguous()


def consume(chunk: Chunk, device: torch.device) -> None:
    """Make the current stream wait for ``chunk`` and tell the allocator it is used there."""
    if chunk.event is None:
        return
    stream = torch.cuda.current_stream(device)
    stream.wait_event(chunk.event)
    chunk.cat.record_stream(stream)
    chunk.flt.record_stream(stream)
    for parts in chunk.lists.values():
        for t in parts:
            if t is not None:
                t.record_stream(stream)
