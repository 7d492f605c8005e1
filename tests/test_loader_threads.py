"""ctrflow.loader's producer thread: errors surface, stop/abandon end it, memory stays bounded."""

from __future__ import annotations

import gc
import os
import threading
import traceback

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ctrflow.loader.chunk as chunk_mod
import ctrflow.loader.source as source_mod
from ctrflow.etl.parquet_layout import mark_required, write_options
from ctrflow.loader import Loader


def write(directory, n_files, rows, row_group_size, layout="snappy"):
    """``layout``: pyarrow's defaults (decoded by pyarrow) or ``etl`` (as the ETL writes: page views)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_files):
        rid = np.arange(i * rows, (i + 1) * rows, dtype=np.int64)
        t = pa.table({"rid": rid, "x": rid.astype(np.float32), "y": (rid % 2).astype(np.float32)})
        path = directory / f"part-{i:05d}.parquet"
        if layout == "etl":
            pq.write_table(mark_required(t), path, **write_options("none", row_group_size))
        else:
            pq.write_table(t, path, row_group_size=row_group_size)
        paths.append(str(path))
    return paths


def make(paths, batch_size=100, **kw):
    return Loader(paths, batch_size, cats=["rid"], conts=["x"], labels=["y"], **kw)


def loader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("ctrflow-loader")]


@pytest.fixture(autouse=True)
def no_leaked_threads(monkeypatch):
    monkeypatch.setattr(source_mod, "MIN_PIECE_ROWS", 1)  # one piece per row group
    yield
    leaked = loader_threads()
    for t in leaked:
        t.join(10)
    assert not [t for t in leaked if t.is_alive()], "a loader thread outlived its test"


@pytest.fixture
def paths(tmp_path):
    return write(tmp_path, 6, 1000, 250)  # 24 pieces


def corrupt_data_pages(path):
    """Overwrite the column chunks (not the footer) so that decoding, not opening, fails."""
    size = os.path.getsize(path)
    footer = pq.read_metadata(path).serialized_size + 8
    with open(path, "r+b") as f:
        f.seek(4)
        f.write(b"\xff" * (size - footer - 4))


def test_corrupt_file_in_the_middle_raises_in_the_consumer(paths):
    corrupt_data_pages(paths[3])
    loader = make(paths, shuffle=False, parts_per_chunk=2)
    seen = 0
    with pytest.raises(Exception) as info:
        for b in loader:
            seen += len(b)
    assert seen == 3000  # the three good files came through first
    assert "part-00003.parquet" in "".join(traceback.format_exception(info.value))
    assert not loader_threads()


def test_producer_exception_keeps_its_traceback(paths, monkeypatch):
    real = chunk_mod.read_tables
    calls = []

    def flaky(src, parts):
        calls.append(1)
        if len(calls) == 3:
            raise KeyError("boom in the producer")
        return real(src, parts)

    monkeypatch.setattr("ctrflow.loader.loader.read_tables", flaky)
    with pytest.raises(KeyError, match="boom") as info:
        for _ in make(paths):
            pass
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "flaky" in frames and "_produce" in frames
    assert not loader_threads()


def test_stop_and_context_manager_end_the_thread(paths):
    loader = make(paths, 10)
    it = iter(loader)
    next(it)
    assert loader_threads()
    loader.stop()
    assert not loader_threads()
    with pytest.raises(StopIteration):
        next(it)
    with make(paths, 10) as lo:
        next(iter(lo))
    assert not loader_threads()


def test_abandoned_iterator_is_collected_with_its_thread(paths):
    loader = make(paths, 10)
    it = iter(loader)
    next(it)
    thread = it.thread
    del it
    gc.collect()
    assert not thread.is_alive()
    # A new epoch also stops a half-consumed previous one.
    first = iter(loader)
    next(first)
    second = iter(loader)
    next(second)
    try:
        assert not first.thread.is_alive()
        assert len([t for t in loader_threads() if "read" not in t.name]) == 1
    finally:
        second.close()


def test_loader_dropped_while_iterator_in_use_keeps_going(paths):
    it = iter(make(paths, 1000, shuffle=False))
    gc.collect()
    assert sum(len(b) for b in it) == 6000


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("layout", ["snappy", "etl"])
def test_memory_stays_bounded_while_streaming(tmp_path, layout):
    # 48 MB of decoded columns, chunks of 40k rows (0.8 MB): 60x larger than one chunk. With the ETL's
    # layout the columns are mapped file pages, which count in RSS while mapped: they must be unmapped.
    rows = 2_400_000
    paths = write(tmp_path, 4, rows // 4, 20_000, layout)
    dataset_bytes = rows * (8 + 4 + 4)
    loader = make(paths, 10_000, parts_per_chunk=2)
    for _ in zip(range(3), loader, strict=False):  # warm the allocators
        pass
    gc.collect()
    base = peak = _rss()
    n = 0
    for b in loader:
        n += len(b)
        peak = max(peak, _rss())
    assert n == rows
    assert peak - base < dataset_bytes / 4, f"RSS grew {(peak - base) / 1e6:.1f} MB while streaming"
