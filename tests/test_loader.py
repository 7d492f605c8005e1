"""ctrflow.loader: every row once per epoch, seeded shuffles, sharding, sources, layout."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from loader_fixtures import no_leaked_threads, small_pieces  # noqa: F401  (autouse fixtures)

from ctrflow.etl.schema import ColumnSchema, Schema
from ctrflow.loader import Batch, Loader
from ctrflow.loader.plan import batches_for, rank_rows

FILE_ROWS = [1000, 1500, 700, 1200, 901]  # 5301 rows, files with several row groups
N = sum(FILE_ROWS)
CATS = ["rid", "c1", "c2"]
CONTS = ["x0", "x1"]
LABELS = ["y"]


def write_parts(directory, file_rows, row_group_size=300, start=0, layout="snappy"):
    """Parquet files whose every column is a function of a global row id ``rid``.

    ``layout``: ``snappy`` (pyarrow's defaults: nullable, dictionary + snappy pages, decoded by pyarrow),
    ``plain`` (as the ETL writes: REQUIRED, plain, uncompressed, read as page views; pages of 128 rows
    so that slices and batches cut through pages), or ``mixed`` (some columns of each kind).
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, n in enumerate(file_rows):
        rid = np.arange(start, start + n, dtype=np.int64)
        start += n
        t = pa.table(
            {
                "rid": rid,
                "c1": (rid % 97).astype(np.int32),
                "c2": (rid % 13 + 3).astype(np.int32),
                "x0": (rid * 0.5).astype(np.float32),
                "x1": (-rid).astype(np.float32),
                "y": (rid % 2).astype(np.float32),
            }
        )
        path = directory / f"part-{i:05d}.parquet"
        if layout == "snappy":
            pq.write_table(t, path, row_group_size=row_group_size)
        else:
            required = set(t.column_names) if layout == "plain" else {"rid", "c2", "x1"}
            t = t.cast(pa.schema([f.with_nullable(f.name not in required) for f in t.schema]))
            pq.write_table(t, path, row_group_size=row_group_size, compression="none", use_dictionary=False,
                           max_rows_per_page=128, data_page_version="2.0" if i % 2 else "1.0")
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module", params=["snappy", "plain", "mixed"])
def parts(tmp_path_factory, request):
    return write_parts(tmp_path_factory.mktemp("loader") / "train", FILE_ROWS, layout=request.param)


def make(parts, batch_size=128, **kw):
    return Loader(parts, batch_size, cats=CATS, conts=CONTS, labels=LABELS, **kw)


def epoch_ids(loader):
    """Row ids per batch for one epoch; also checks that every row arrived intact."""
    out = []
    for b in loader:
        assert isinstance(b, Batch)
        rid = b.categorical[:, 0].to(torch.int64)
        assert torch.equal(b.categorical[:, 1].to(torch.int64), rid % 97)
        assert torch.equal(b.categorical[:, 2].to(torch.int64), rid % 13 + 3)
        assert torch.equal(b.continuous[:, 0], (rid * 0.5).float())
        assert torch.equal(b.continuous[:, 1], (-rid).float())
        assert torch.equal(b.label, (rid % 2).float())
        out.append(rid.numpy().copy())
    return out


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("batch_size", [100, 128, 5301, 8000])  # 100 leaves 1 row; 5301 = N
@pytest.mark.parametrize("drop_last", [False, True])
def test_every_row_once_per_epoch(parts, shuffle, batch_size, drop_last):
    loader = make(parts, batch_size, shuffle=shuffle, drop_last=drop_last, parts_per_chunk=2)
    batches = epoch_ids(loader)
    assert len(batches) == len(loader)
    ids = np.concatenate(batches) if batches else np.array([], dtype=np.int64)
    sizes = [len(b) for b in batches]
    if drop_last:
        assert all(s == batch_size for s in sizes)
        assert len(ids) == (N // batch_size) * batch_size
        assert len(np.unique(ids)) == len(ids)
    else:
        assert all(s == batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= batch_size
        assert np.array_equal(np.sort(ids), np.arange(N))
    if not shuffle:
        assert np.array_equal(ids, np.arange(len(ids)))
    elif len(ids) > 1:
        assert not np.array_equal(ids, np.sort(ids))


def test_epochs_shuffle_differently_and_seed_reproduces(parts):
    a, b = make(parts, seed=7), make(parts, seed=7)
    a0, a1 = np.concatenate(epoch_ids(a)), np.concatenate(epoch_ids(a))
    b0, b1 = np.concatenate(epoch_ids(b)), np.concatenate(epoch_ids(b))
    assert np.array_equal(a0, b0) and np.array_equal(a1, b1)
    assert not np.array_equal(a0, a1)
    c0 = np.concatenate(epoch_ids(make(parts, seed=8)))
    assert not np.array_equal(a0, c0)
    b.set_epoch(1)
    assert np.array_equal(np.concatenate(epoch_ids(b)), a1)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_sharding_disjoint_covering_equal_batches(parts, world, shuffle, drop_last):
    loaders = [make(parts, 128, shuffle=shuffle, drop_last=drop_last, global_rank=r, global_size=world)
               for r in range(world)]
    per_rank = [epoch_ids(lo) for lo in loaders]
    counts = {len(b) for b in per_rank} | {len(lo) for lo in loaders}
    assert len(counts) == 1, f"ranks yield different batch counts: {counts}"
    ids = [np.concatenate(b) for b in per_rank]
    allids = np.concatenate(ids)
    assert len(np.unique(allids)) == len(allids), "ranks overlap"
    if not drop_last:
        assert np.array_equal(np.sort(allids), np.arange(N))
    assert all(len(b) > 0 for rank in per_rank for b in rank)


def test_sharding_corner_case_never_yields_an_empty_batch(tmp_path):
    # 3 ranks, 3 * 256 + 2 rows, B = 128: two ranks would need an empty last batch -> 2 rows left out.
    paths = write_parts(tmp_path, [3 * 256 + 2], row_group_size=100)
    per_rank = [epoch_ids(make(paths, 128, global_rank=r, global_size=3)) for r in range(3)]
    assert {len(b) for b in per_rank} == {2}
    allids = np.concatenate([np.concatenate(b) for b in per_rank])
    assert len(allids) == 3 * 256 and len(np.unique(allids)) == len(allids)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("batch_size", [1, 3, 10, 64])
@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_rows_rule(world, batch_size, drop_last):
    for total in range(0, 300, 7):
        rows = rank_rows(total, world, batch_size, drop_last)
        nb = {batches_for(r, batch_size) for r in rows}
        assert len(nb) == 1
        assert sum(rows) <= total and max(rows) - min(rows) <= 1
        if drop_last:
            assert all(r % batch_size == 0 for r in rows)
        else:
            assert min(rows) > (nb.pop() - 1) * batch_size or max(rows) == 0  # no empty batch
            assert total - sum(rows) < world


def test_sharding_reads_rank_and_world_from_torchrun_env(parts, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = make(parts)
    assert (loader.rank, loader.world) == (1, 2)
    with pytest.raises(ValueError, match="global_rank"):
        make(parts, global_rank=2, global_size=2)


def test_batch_layout_is_column_major_views(parts):
    b = next(iter(make(parts, 128, shuffle=False)))
    assert b.categorical.shape == (128, 3) and b.categorical.stride() == (1, 128)
    assert b.categorical.dtype == torch.int64  # rid is int64 in the files
    assert b.continuous.shape == (128, 2) and b.continuous.dtype == torch.float32
    assert b.continuous.stride() == (1, 128)
    assert b.label.shape == (128,) and b.label.dtype == torch.float32
    moved = b.to("cpu")
    assert torch.equal(moved.categorical, b.categorical)


def test_int32_ids_stay_int32(parts):
    loader = Loader(parts, 64, cats=["c1", "c2"], conts=[], labels=LABELS)
    b = next(iter(loader))
    assert b.categorical.dtype == torch.int32 and b.continuous.shape == (64, 0)
    loader.stop()


def test_processed_directory_and_dataset_sources(tmp_path):
    out = tmp_path / "processed"
    paths = write_parts(out / "train", [500, 300])
    Schema(
        [
            ColumnSchema("rid", "other", "int64"),
            ColumnSchema("c1", "categorical", "int32", cardinality=100, embedding_dim=16),
            ColumnSchema("c2", "categorical", "int32", cardinality=16, embedding_dim=16),
            ColumnSchema("x0", "continuous", "float32"),
            ColumnSchema("y", "label", "float32"),
        ]
    ).save(out / "schema.json")
    loader = Loader(out / "train", 100, shuffle=False)
    assert loader.columns.cats == ("c1", "c2") and loader.columns.conts == ("x0",)
    assert loader.schema is not None and len(loader) == 8
    b = next(iter(loader))
    assert b.categorical.dtype == torch.int32 and torch.equal(b.continuous[:, 0], torch.arange(100) * 0.5)
    loader.stop()
    with pytest.raises(ValueError, match="train"):
        Loader(out, 100)

    class FakeDataset:  # ctrflow.etl.Dataset's duck type: .files and .schema
        files = paths
        schema = None

    ds_loader = Loader(FakeDataset(), 100, shuffle=False)  # schema found next to the files
    assert sum(len(b) for b in ds_loader) == 800


def test_foreign_parquet_needs_columns(tmp_path, parts):
    with pytest.raises(Exception, match="cats="):
        Loader(parts, 10)
    with pytest.raises(ValueError, match="no column"):
        Loader(parts, 10, cats=["nope"])


def test_works_inside_torch_dataloader(parts):
    loader = make(parts, 256)
    dl = torch.utils.data.DataLoader(loader, batch_size=None)
    assert len(dl) == len(loader)
    ids = np.concatenate([b.categorical[:, 0].numpy() for b in dl])
    assert np.array_equal(np.sort(ids), np.arange(N))


def test_device_none_is_cpu_here_and_logged_once(parts, caplog):
    import ctrflow.loader.loader as loader_mod

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    loader_mod._device_logged = False
    with caplog.at_level("INFO", logger="ctrflow.loader"):
        assert make(parts).device == torch.device("cpu")
        make(parts)
    assert sum("device=None" in r.message for r in caplog.records) == 1


def test_without_read_ahead_and_with_tiny_chunks(parts):
    loader = make(parts, 100, read_ahead=False, parts_per_chunk=1)
    ids = np.concatenate(epoch_ids(loader))
    assert np.array_equal(np.sort(ids), np.arange(N))


def test_more_ranks_than_rows(tmp_path):
    paths = write_parts(tmp_path, [2])
    loaders = [make(paths, 4, global_rank=r, global_size=3) for r in range(3)]
    assert [len(lo) for lo in loaders] == [0, 0, 0]
    assert all(list(lo) == [] for lo in loaders)


def test_importing_the_loader_does_not_import_dask():
    import subprocess
    import sys

    code = "import sys, ctrflow.loader; assert not [m for m in sys.modules if m.startswith('dask')]"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("shuffle", [False, True])
def test_gpu_arrangement_logic_on_cpu_tensors(shuffle):
    """The device-side core of the GPU path (leftover, permutation, batch-major blocks), run on CPU."""
    from ctrflow.loader.cuda import arrange

    gen, left, out = torch.Generator().manual_seed(0), None, []
    sizes = [70, 130, 5, 260]
    start = 0
    for i, n in enumerate(sizes):
        rid = torch.arange(start, start + n, dtype=torch.int32)
        start += n
        total = n + (left[0].shape[1] if left else 0)
        perm = torch.randperm(total, generator=gen) if shuffle else None
        cat, flt, k, last, left = arrange(rid[None], rid[None].float(), left, perm, 64, i == len(sizes) - 1)
        assert cat.shape[1:] == (1, 64) and cat.is_contiguous()
        for b in range(k):
            rows = last if b == k - 1 else 64
            assert torch.equal(flt[b, 0, :rows], cat[b, 0, :rows].float())
            out.append(cat[b, 0, :rows])
    ids = torch.cat(out).numpy()
    assert np.array_equal(np.sort(ids), np.arange(sum(sizes)))
    assert np.array_equal(ids, np.arange(sum(sizes))) != shuffle


def test_bad_arguments_fail_with_one_clear_line(parts):
    with pytest.raises(ValueError, match="batch_size"):
        make(parts, 0)
    with pytest.raises(ValueError, match="parts_per_chunk"):
        make(parts, parts_per_chunk=0)
    with pytest.raises(ValueError, match="not supported"):
        make(parts, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            make(parts, device="cuda")


@pytest.mark.parametrize("world", [1, 2])
def test_cache_gives_the_same_epochs_as_streaming(parts, world, monkeypatch):
    import ctrflow.loader.cache as cache_mod

    decoded = []  # pieces decoded through the cache
    real = cache_mod.read_tables
    monkeypatch.setattr(cache_mod, "read_tables", lambda src, s: decoded.extend(x.piece for x in s) or real(src, s))
    for rank in range(world):
        streamed = make(parts, batch_size=100, seed=5, global_rank=rank, global_size=world)
        cached = make(parts, batch_size=100, seed=5, global_rank=rank, global_size=world, cache=True)
        for epoch in range(3):
            a, b = epoch_ids(streamed), epoch_ids(cached)
            assert [x.tolist() for x in a] == [x.tolist() for x in b], f"rank {rank} epoch {epoch}"
            rows = np.concatenate(b)
            assert len(rows) == len(set(rows.tolist()))  # exactly once
            if epoch == 0:
                first = len(decoded)
        if world == 1:
            assert len(decoded) == first, "later epochs must not decode again"
        # With several ranks a rank reads other pieces in later epochs: each is still decoded once.
        assert len(set(decoded)) == len(decoded), "each piece decoded once"
        decoded.clear()
        assert cached.cache_bytes > 0 and streamed.cache_bytes == 0


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("shuffle", [True, False])
def test_copy_threads_give_the_same_batches(parts, cache, shuffle):
    one = make(parts, batch_size=100, seed=9, cache=cache, shuffle=shuffle)
    three = make(parts, batch_size=100, seed=9, cache=cache, shuffle=shuffle, threads=3)
    assert one.threads == 1  # the CPU default leaves the other cores to the model
    for _ in range(2):
        a, b = epoch_ids(one), epoch_ids(three)  # epoch_ids also checks every column of every row
        assert [x.tolist() for x in a] == [x.tolist() for x in b]
    with pytest.raises(ValueError, match="threads"):
        make(parts, threads=0)


def test_fill_staging_threads_copy_every_column(parts):
    """The GPU path's host copy (into the pinned staging buffers), with its columns split over threads."""
    from ctrflow.loader.chunk import fill_staging, read_tables
    from ctrflow.loader.plan import Slice

    src = make(parts).source
    tables = read_tables(src, [Slice(p, 0, src.pieces[p].rows) for p in range(3)])
    rows = sum(t.num_rows for t in tables)
    out = []
    for threads in (1, 3):
        cat, flt = torch.full((3, rows + 5), -1, dtype=torch.int64), torch.full((3, rows + 5), -1.0)
        assert fill_staging(src.columns, tables, cat, flt, 5, threads=threads) == rows + 5
        out.append((cat, flt))
    rid = out[0][0][0, 5:]
    assert torch.equal(rid, torch.from_numpy(np.concatenate([t.column("rid").to_numpy() for t in tables])))
    assert torch.equal(out[0][0][1, 5:], rid % 97) and torch.equal(out[0][1][1, 5:], (-rid).float())
    assert (out[0][0][:, :5] == -1).all()
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
