"""List features in the loader: values/offsets rebuild the lists exactly, padded output, KJT layout."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from loader_fixtures import no_leaked_threads, small_pieces  # noqa: F401  (autouse fixtures)

from ctrflow.etl.schema import ColumnSchema, Schema
from ctrflow.loader import Loader
from ctrflow.loader.jagged import from_padded, to_kjt_layout, to_padded
from ctrflow.loader.lists import gather_index, read_lists

FILE_ROWS = [1000, 1500, 700, 1200, 901]
N = sum(FILE_ROWS)


def tags_of(rid: int) -> list[int]:
    """Row ``rid``'s ``tags`` list (empty for null lists, up to 9 ids)."""
    return [] if rid % 11 == 0 else [3 + (rid * 7 + j) % 50 for j in range(rid % 10)]


def hist_of(rid: int) -> list[int]:
    return [3 + (rid + j) % 20 for j in range(rid % 4)]


def weights_of(rid: int) -> list[float]:
    return [float(rid % 5) + 0.25 * j for j in range(len(tags_of(rid)))]


def write_data(directory, file_rows=FILE_ROWS, row_group_size=300):
    directory.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, n in enumerate(file_rows):
        rid = list(range(start, start + n))
        start += n
        t = pa.table({
            "rid": pa.array(rid, pa.int32()),
            "x0": pa.array([r * 0.5 for r in rid], pa.float32()),
            "y": pa.array([r % 2 for r in rid], pa.float32()),
            "tags": pa.array([None if r % 11 == 0 else tags_of(r) for r in rid], pa.list_(pa.int32())),
            "tags_w": pa.array([None if r % 11 == 0 else weights_of(r) for r in rid], pa.list_(pa.float32())),
            "hist": pa.array([hist_of(r) for r in rid], pa.large_list(pa.int32())),
        })
        pq.write_table(t, directory / f"part-{i:05d}.parquet", row_group_size=row_group_size)
    Schema([
        ColumnSchema("rid", "categorical", "int32", cardinality=N, embedding_dim=8),
        ColumnSchema("x0", "continuous", "float32"),
        ColumnSchema("y", "label", "float32"),
        ColumnSchema("tags", "list", "int32", cardinality=53, embedding_dim=8, max_length=9, weights="tags_w"),
        ColumnSchema("tags_w", "other", "float32"),
        ColumnSchema("hist", "list", "int32", cardinality=23, embedding_dim=8, max_length=3, vocabulary="item"),
    ]).save(directory / "schema.json")
    return directory


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("lists") / "train")


def check_epoch(loader) -> list[int]:
    """Row ids of one epoch; asserts every row's lists and weights are exactly the originals."""
    seen = []
    for b in loader:
        rid = b.categorical[:, 0].tolist()
        assert set(b.lists) == {"tags", "hist"} and set(b.weights) == {"tags"}
        for name, ref in (("tags", tags_of), ("hist", hist_of)):
            v, o = b.lists[name]
            assert o.dtype == torch.int64 and o.shape == (len(b) + 1,) and int(o[0]) == 0
            assert int(o[-1]) == v.shape[0]
            flat = [x for r in rid for x in ref(r)]
            assert v.tolist() == flat
            assert torch.equal(o[1:] - o[:-1], torch.tensor([len(ref(r)) for r in rid]))
        w = b.weights["tags"]
        assert w.dtype == torch.float32
        assert w.tolist() == [x for r in rid for x in weights_of(r)]
        seen += rid
    return seen


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("batch_size,drop_last", [(100, False), (128, False), (128, True), (1000, False)])
def test_lists_rebuild_exactly_once(data, shuffle, batch_size, drop_last):
    loader = Loader(data, batch_size, shuffle=shuffle, seed=3, drop_last=drop_last, parts_per_chunk=2)
    assert loader.columns.lists == ("tags", "hist") and loader.columns.list_weights == ("tags_w", None)
    seen = check_epoch(loader)
    assert len(seen) == len(set(seen))
    if drop_last:
        assert len(seen) == (N // batch_size) * batch_size
    else:
        assert sorted(seen) == list(range(N))
    if not shuffle:
        assert seen == sorted(seen)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_lists_sharded(data, world):
    seen, counts = [], []
    for r in range(world):
        loader = Loader(data, 128, shuffle=True, seed=1, global_rank=r, global_size=world)
        ids = check_epoch(loader)
        counts.append(len(loader))
        seen += ids
    assert len(set(counts)) == 1
    assert len(seen) == len(set(seen)) and len(seen) >= N - world


def test_no_lists_and_foreign_parquet(data):
    b = next(iter(Loader(data, 64, lists=[])))
    assert b.lists == {} and b.weights == {}
    files = sorted(str(p) for p in data.glob("*.parquet"))
    loader = Loader(files, 64, shuffle=False, cats=["rid"], conts=["x0"], labels=["y"], lists=["tags"],
                    list_weights={"tags": "tags_w"})
    b = next(iter(loader))
    assert b.lists["tags"][0].tolist() == [x for r in range(64) for x in tags_of(r)]
    assert b.weights["tags"].tolist() == [x for r in range(64) for x in weights_of(r)]
    with pytest.raises(TypeError, match="expected a list"):
        Loader(files, 64, cats=["rid"], lists=["x0"])


def test_padded_output(data):
    loader = Loader(data, 100, shuffle=True, seed=0, list_format="padded")
    for b in loader:
        rid = b.categorical[:, 0].tolist()
        ids, lengths = b.lists["tags"]
        assert ids.shape == (len(b), 9)  # the schema's max_length
        for i, r in enumerate(rid):
            ref = tags_of(r)
            assert ids[i].tolist() == ref + [0] * (9 - len(ref))
            assert int(lengths[i]) == len(ref)
        w = b.weights["tags"]
        assert w[0].tolist() == weights_of(rid[0]) + [0.0] * (9 - len(tags_of(rid[0])))
        assert b.lists["hist"][0].shape == (len(b), 3)
    short = next(iter(Loader(data, 50, shuffle=False, list_format="padded", pad_lengths=2)))
    assert short.lists["tags"][0][9].tolist() == tags_of(9)[:2]
    assert short.lists["tags"][1][9] == 2


def test_to_padded_and_back():
    values = torch.tensor([5, 6, 7, 8, 9, 10])
    offsets = torch.tensor([0, 2, 2, 6])
    p = to_padded(values, offsets, 3, pad=-1)
    assert p.tolist() == [[5, 6, -1], [-1, -1, -1], [7, 8, 9]]
    v, o = from_padded(to_padded(values, offsets, 4), torch.tensor([2, 0, 4]))
    assert v.tolist() == values.tolist() and o.tolist() == offsets.tolist()


def test_kjt_layout_matches_python_reference(data):
    b = next(iter(Loader(data, 37, shuffle=True, seed=5)))
    kjt = to_kjt_layout(b, keys=["hist", "rid", "tags"], categorical_names=["rid"])
    rid = b.categorical[:, 0].tolist()
    ref_vals, ref_lens, ref_w = [], [], []
    for key in ["hist", "rid", "tags"]:
        for r in rid:
            row = {"hist": hist_of(r), "rid": [r], "tags": tags_of(r)}[key]
            ref_vals += row
            ref_lens.append(len(row))
            ref_w += weights_of(r) if key == "tags" else [1.0] * len(row)
    assert kjt.keys == ["hist", "rid", "tags"] and kjt.stride == 37
    assert kjt.values.tolist() == ref_vals
    assert kjt.lengths.tolist() == ref_lens
    assert kjt.offsets.tolist() == np.concatenate([[0], np.cumsum(ref_lens)]).tolist()
    assert kjt.weights.tolist() == ref_w
    with pytest.raises(KeyError, match="no feature"):
        to_kjt_layout(b, keys=["nope"])


def test_gather_index_numpy_and_torch_agree():
    offsets = np.array([0, 3, 3, 4, 8], np.int64)
    rows = np.array([3, 0, 2, 1])
    idx, new = gather_index(offsets, rows)
    assert idx.tolist() == [4, 5, 6, 7, 0, 1, 2, 3] and new.tolist() == [0, 4, 7, 8, 8]
    tidx, tnew = gather_index(torch.from_numpy(offsets), torch.from_numpy(rows))
    assert tidx.tolist() == idx.tolist() and tnew.tolist() == new.tolist()


def test_read_lists_sliced_and_nulls():
    arr = pa.array([[1, 2], None, [3], [4, 5, 6]], pa.list_(pa.int32()))
    t = pa.table({"a": arr}).slice(1, 3)
    v, o, w = read_lists([t], "a", None)
    assert v.tolist() == [3, 4, 5, 6] and o.tolist() == [0, 0, 1, 4] and w is None
    bad = pa.table({"a": pa.array([[1, None]], pa.list_(pa.int32()))})
    with pytest.raises(ValueError, match="null elements"):
        read_lists([bad], "a", None)


def test_list_stage_torch_path_matches_numpy(data):
    """The GPU builder's torch maths (run here on the CPU) equals the CPU builder's numpy maths."""
    from ctrflow.loader.lists import ListStage

    tables = [pq.read_table(p) for p in sorted(data.glob("*.parquet"))[:2]]
    assert [t.num_rows for t in tables] == [1000, 1500]
    perm = np.random.default_rng(0).permutation(1600)  # 100 carried-over rows + 1500 new ones
    outs = []
    for device in (None, torch.device("cpu")):
        stage = ListStage(("tags", "hist"), ("tags_w", None), device)
        p = perm if device is None else torch.from_numpy(perm)
        first = stage.build(tables[:1], False, None, 900, 900)  # 100 rows carried over
        second = stage.build(tables[1:], True, p, 1600, None)
        outs.append((first, second))
    for a, b in zip(outs[0], outs[1], strict=True):
        for name in ("tags", "hist"):
            for x, y in zip(a[name], b[name], strict=True):
                assert (x is None and y is None) or torch.equal(x, y)


def test_blocked_take_matches_reference():
    from ctrflow.loader.lists import _take_blocked, take_rows

    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 7, 1000)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = rng.integers(0, 99, int(offsets[-1])).astype(np.int32)
    weights = rng.random(int(offsets[-1])).astype(np.float32)
    rows = rng.permutation(1000)[:700]
    ref_v = np.concatenate([values[offsets[r]:offsets[r + 1]] for r in rows])
    ref_w = np.concatenate([weights[offsets[r]:offsets[r + 1]] for r in rows])
    for block in (1, 64, 5000):
        v, o, w = _take_blocked(values, offsets, weights, rows, block)
        assert np.array_equal(v, ref_v) and np.array_equal(w, ref_w)
        assert np.array_equal(np.diff(o), lengths[rows])
    v, o, w = take_rows((values, offsets, None), rows)
    assert np.array_equal(v, ref_v) and w is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shuffle", [False, True])
def test_gpu_lists_rebuild_exactly_once(data, shuffle):
    loader = Loader(data, 128, shuffle=shuffle, seed=2, device="cuda")
    seen = []
    for b in loader:
        assert b.lists["tags"][0].is_cuda and b.weights["tags"].is_cuda
        seen += check_epoch([b.to("cpu")])
    assert sorted(seen) == list(range(N))


def test_lists_with_cache_rebuild_exactly_once(data):
    loader = Loader(data, 128, shuffle=True, seed=2, cache=True)
    for _ in range(2):
        seen = check_epoch(loader)
        assert sorted(seen) == list(range(N))
    assert loader.cache_bytes > 0


def test_lists_with_piece_cache(data):
    loader = Loader(data, 100, shuffle=True, seed=4, cache=True)
    for _ in range(2):  # the second epoch reads the cached (sliced) Arrow pieces
        assert sorted(check_epoch(loader)) == list(range(N))
