"""``Loader``: batches of a processed parquet dataset, read and shuffled by one producer thread.

Example:
    >>> with Loader("data/processed/train", batch_size=65536) as loader:   # doctest: +SKIP
    ...     for batch in loader:
    ...         logits = model(batch.categorical, batch.continuous)
    ...         loss = bce(logits, batch.label)

Per epoch (see ``plan.py`` for the row assignment, ``chunk.py`` / ``cuda.py`` for the conversion,
``producer.py`` for the thread): the rank's pieces are read ``parts_per_chunk`` at a time, converted
once to tensors on the target device, rows are shuffled inside the chunk, and the consumer hands
out batches as views. Iterating again starts the next epoch with a new (seeded) shuffle.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ctrflow.loader.batch import Batch
from ctrflow.loader.cache import PieceCache
from ctrflow.loader.chunk import Chunk, CpuBuilder, read_tables
from ctrflow.loader.lists import LIST_FORMATS, batch_lists
from ctrflow.loader.plan import Slice, batches_for, epoch_chunks, every_row_batch_size, rank_rows
from ctrflow.loader.producer import EpochIterator
from ctrflow.loader.source import resolve

log = logging.getLogger("ctrflow.loader")
_device_logged = False


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``None`` -> the current CUDA device when there is one, else the CPU (logged once per process)."""
    global _device_logged
    if device is None:
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        if not _device_logged:
            log.info("ctrflow.loader: device=None -> using %s", dev)
            _device_logged = True
        return dev
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {dev} is not supported by ctrflow.loader (use cpu or cuda)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but CUDA is not available here")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else int(world)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"global_rank={rank} is not in [0, global_size={world})")
    return rank, world


def _chunk_seed(seed: int, epoch: int, rank: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank, index]).generate_state(1, np.uint64)[0] >> 1)


class Loader(torch.utils.data.IterableDataset):
    """Iterate ``Batch`` es of a parquet dataset.

    Args:
        source: a processed directory (``OUT/train``; column kinds from ``schema.json``), a parquet
            file, a list of parquet files, or a ``ctrflow.etl.Dataset`` (anything with ``.files``).
        batch_size: rows per batch (B).
        shuffle: shuffle the chunk order and the rows inside each chunk, anew every epoch.
        seed: shuffle seed; the same seed replays the same epochs.
        parts_per_chunk: pieces (row groups of >= 128k rows, merged when smaller) read per chunk;
            the shuffle window, and the unit of memory (about two chunks are alive).
        device: where batches live; ``None``: CUDA when present (logged once), else CPU.
        drop_last: drop each rank's incomplete last batch.
        global_rank, global_size: this rank and the number of ranks (default: torchrun's ``RANK`` /
            ``WORLD_SIZE``, else 0 / 1). Ranks get disjoint rows and the same number of batches.
        cats, conts, labels: column names overriding the schema (for parquet from other tools).
        pin_memory: CPU device only: put batches in page-locked memory (fast ``.to("cuda")``).
        use_cudf: GPU only: decode with cudf (``None``: when RAPIDS is installed).
        read_ahead: decode the next chunk in a helper thread while the producer converts and
            shuffles the current one (one decoded chunk more in memory; ``False`` to save it).
        lists: list columns to deliver in ``Batch.lists`` (``None``: the schema's list columns;
            ``[]``: none). Their rows follow the same shuffle, sharding and batching as the others.
        list_weights: ``{list column: weight column}`` (``None``: the schema's ``weights``) ->
            ``Batch.weights``.
        list_format: ``"jagged"``: ``(values [N], offsets [B + 1] int64)`` per list feature;
            ``"padded"``: ``(ids [B, L] padded with 0, lengths [B])`` (weights ``[B, L]``).
        pad_lengths: L per list column for ``"padded"`` (an int for all; default: the schema's
            ``max_length``, else the longest list of each batch).
        cache: keep the decoded pieces in host memory after the first epoch, so later epochs skip the
            parquet decode (``ctrflow.loader.cache``; costs the decoded size of this rank's rows, see
            ``cache_bytes``). Decodes on the host, also with ``use_cudf``.
        threads: threads that copy (and on the CPU shuffle) the columns into batches. Default: 1 on
            the CPU (the producer thread alone, leaving the other cores to the model training there),
            ``min(4, cores)`` with a CUDA device (the host only stages data for the GPU).
        every_row: deliver every row exactly once over the ranks (validation, exact metrics): the rank
            split can leave up to W - 1 rows out in one corner case (``ctrflow.loader.plan``), so the
            batch size is raised to the smallest one >= ``batch_size`` that leaves none out
            (``plan.every_row_batch_size``; ``loader.batch_size`` tells it; unchanged for one rank).
            Not with ``drop_last``.

    ``len(loader)`` is the exact number of batches per epoch (the same on every rank).
    """

    def __init__(
        self,
        source: Any,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        parts_per_chunk: int = 2,
        device: torch.device | str | None = None,
        drop_last: bool = False,
        global_rank: int | None = None,
        global_size: int | None = None,
        cats: list[str] | None = None,
        conts: list[str] | None = None,
        labels: list[str] | None = None,
        *,
        pin_memory: bool = False,
        use_cudf: bool | None = None,
        read_ahead: bool = True,
        lists: list[str] | None = None,
        list_weights: dict[str, str] | None = None,
        list_format: str = "jagged",
        pad_lengths: int | dict[str, int] | None = None,
        cache: bool = False,
        threads: int | None = None,
        every_row: bool = False,
    ) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(parts_per_chunk) < 1:
            raise ValueError(f"parts_per_chunk must be >= 1, got {parts_per_chunk}")
        self.batch_size, self.parts_per_chunk = int(batch_size), int(parts_per_chunk)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.rank, self.world = _rank_world(global_rank, global_size)
        if list_format not in LIST_FORMATS:
            raise ValueError(f"list_format must be one of {', '.join(LIST_FORMATS)}, got {list_format!r}")
        self.source = resolve(source, cats, conts, labels, lists=lists, list_weights=list_weights)
        self.columns = self.source.columns
        if every_row:
            if self.drop_last:
                raise ValueError("every_row=True delivers every row; it cannot be combined with drop_last=True")
            self.batch_size = every_row_batch_size(self.source.rows, self.world, self.batch_size)
        self.every_row = bool(every_row)
        self.list_format = list_format
        self.pad_lengths = _pad_lengths(self.columns.lists, pad_lengths, self.source.schema)
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            from ctrflow.loader.cuda import cudf_available

            self.use_cudf = cudf_available() if use_cudf is None else bool(use_cudf)
            self.use_cudf = self.use_cudf and not self.columns.lists and not cache  # host decode
        else:
            self.use_cudf = False
        self.pin_memory = bool(pin_memory) and self.device.type == "cpu" and torch.cuda.is_available()
        self.read_ahead = bool(read_ahead)
        self._cache = PieceCache(self.source) if cache else None
        if threads is None:
            threads = min(4, os.cpu_count() or 1) if self.device.type == "cuda" else 1
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = int(threads)
        self.epoch = 0
        per_rank = rank_rows(self.source.rows, self.world, self.batch_size, self.drop_last)
        self.rows = per_rank[self.rank]
        self._len = batches_for(self.rows, self.batch_size)
        # Rows no rank delivers in an epoch (ctrflow.loader.plan): the price of equal batch counts.
        self.surplus_rows = self.source.rows - sum(per_rank)
        if self.surplus_rows and not self.drop_last and self.rank == 0:
            log.warning("%d of %d rows are left out of every epoch so that %d ranks get the same number of "
                        "batches of %d (which rows, changes with the shuffle; every_row=True or another batch "
                        "size delivers them all)", self.surplus_rows, self.source.rows, self.world, self.batch_size)
        self._builder: Any = None
        self._live: weakref.ref | None = None

    @property
    def schema(self):
        """The dataset's ``ctrflow.etl.schema.Schema`` (``None`` for foreign parquet)."""
        return self.source.schema

    def __len__(self) -> int:
        return self._len

    @property
    def cache_bytes(self) -> int:
        """Bytes of decoded data held by ``cache=True`` (0 without a cache)."""
        return self._cache.nbytes if self._cache is not None else 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch`` (to resume; iterating advances it by one)."""
        self.epoch = int(epoch)

    def _new_builder(self):
        if self.device.type == "cuda":
            from ctrflow.loader.cuda import CudaBuilder

            return CudaBuilder(self.source, self.batch_size, self.shuffle, self.device, threads=self.threads)
        return CpuBuilder(self.columns, self.batch_size, self.shuffle, pin=self.pin_memory, threads=self.threads)

    def __iter__(self) -> EpochIterator:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise ValueError(
                "ctrflow.loader.Loader reads in its own thread: wrap it as "
                "DataLoader(loader, batch_size=None) with num_workers=0 (each worker would repeat the epoch)"
            )
        previous = self._live() if self._live is not None else None
        if previous is not None:
            previous.close()
            if previous.thread.is_alive():  # could not join: never share a builder with it
                self._builder = None
        if self._builder is None:
            self._builder = self._new_builder()
        self._builder.left = None
        epoch, self.epoch = self.epoch, self.epoch + 1
        chunks = epoch_chunks(
            [p.rows for p in self.source.pieces],
            epoch=epoch,
            seed=self.seed,
            shuffle=self.shuffle,
            rank=self.rank,
            world=self.world,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            parts_per_chunk=self.parts_per_chunk,
        )
        seeds = [_chunk_seed(self.seed, epoch, self.rank, i) for i in range(len(chunks))]
        device = self.device
        on_chunk = init = None
        if device.type == "cuda":
            from ctrflow.loader.cuda import consume

            def on_chunk(c: Chunk) -> None:
                consume(c, device)

            def init() -> None:  # the current CUDA device is per thread
                torch.cuda.set_device(device)

        src = self.source
        if self.use_cudf:
            from ctrflow.loader.cuda import read_device_columns

            def read(parts):
                return read_device_columns(src, parts, device)
        elif self._cache is not None:
            read = self._cache.read
        else:

            def read(parts):
                return read_tables(src, parts)

        chunks_iter = _build_chunks(
            chunks, read, self._builder, seeds if self.shuffle else None, self.read_ahead, init,
            name=f"ctrflow-loader-read-r{self.rank}",
        )
        n_cont, n_lab, bsz = len(self.columns.conts), len(self.columns.labels), self.batch_size

        fmt, pads = self.list_format, self.pad_lengths

        def make_batch(chunk: Chunk, k: int) -> Batch:
            b = _batch(chunk, k, n_cont, n_lab, bsz)
            if chunk.lists:
                b.lists, b.weights = batch_lists(chunk.lists, k * bsz, len(b), fmt, pads)
            return b

        it = EpochIterator(chunks_iter, make_batch, on_chunk, init, name=f"ctrflow-loader-r{self.rank}")
        self._live = weakref.ref(it)
        return it

    def stop(self) -> None:
        """End the producer thread of the running epoch, if any (iteration then stops)."""
        it = self._live() if self._live is not None else None
        if it is not None:
            it.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_live"], state["_builder"] = None, None
        return state

    def __repr__(self) -> str:
        c = self.columns
        return (
            f"Loader({len(self.source.files)} files, {self.source.rows} rows, rank {self.rank}/{self.world}: "
            f"{self.rows} rows in {len(self)} batches of {self.batch_size}; {len(c.cats)} cat, "
            f"{len(c.conts)} cont, {len(c.labels)} label; shuffle={self.shuffle}, device={self.device})"
        )


def _pad_lengths(lists: tuple[str, ...], given: int | dict[str, int] | None, schema: Any) -> dict[str, int]:
    """L per list column for ``list_format="padded"`` (missing: each batch's longest list)."""
    if isinstance(given, int):
        return dict.fromkeys(lists, int(given))
    out = dict(given or {})
    names = {c.name for c in schema.columns} if schema is not None else set()
    for n in lists:
        if n not in out and n in names and schema[n].max_length:
            out[n] = int(schema[n].max_length)
    return out


def _build_chunks(
    chunks: list[list[Slice]],
    read: Callable[[list[Slice]], Any],
    builder: Any,
    seeds: list[int] | None,
    read_ahead: bool,
    init: Callable[[], None] | None,
    name: str,
) -> Iterator[Chunk | None]:
    """The producer's work for one epoch: read and build every chunk, in order (a generator).

    With ``read_ahead`` a helper thread decodes chunk ``i + 1`` (pyarrow, GIL released) while the
    producer converts and shuffles chunk ``i``. Runs in the producer thread; closing the generator
    (the producer does on stop) waits for an in-flight read and ends the helper.
    """
    last = len(chunks) - 1
    if not read_ahead:
        for i, parts in enumerate(chunks):
            yield builder.build(read(parts), seeds[i] if seeds else None, final=i == last)
        return
    with ThreadPoolExecutor(1, thread_name_prefix=name, initializer=init) as pool:
        ahead = pool.submit(read, chunks[0]) if chunks else None
        try:
            for i in range(len(chunks)):
                data = ahead.result()
                ahead = pool.submit(read, chunks[i + 1]) if i < last else None
                yield builder.build(data, seeds[i] if seeds else None, final=i == last)
        finally:
            if ahead is not None:
                ahead.cancel()


def _batch(chunk: Chunk, k: int, n_cont: int, n_lab: int, bsz: int) -> Batch:
    """Batch ``k`` of ``chunk`` as views of its batch-major blocks (partial last batch: a copy)."""
    rows = chunk.last_rows if k == chunk.batches - 1 else bsz
    cat, flt = chunk.cat[k], chunk.flt[k]
    if rows < bsz:
        cat, flt = cat[:, :rows].contiguous(), flt[:, :rows].contiguous()
    label = flt[n_cont] if n_lab else torch.zeros(rows, device=flt.device)
    return Batch(cat.t(), flt[:n_cont].t(), label, labels=flt[n_cont:].t() if n_lab > 1 else None)
