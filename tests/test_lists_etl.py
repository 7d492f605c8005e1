"""List (sequence) columns in the ETL: ops against pure-Python references, readers, schema, CLI.

References are written from the documented contract, not from the code: Categorify's NVTabular
ids applied element by element (0 pad, 1 null element, 2 OOV, 3.. by descending count then value;
a null list becomes an empty list), ``lst[:n]`` / ``lst[-n:]`` for ListTruncate, ``lst + [v] * k``
for ListPad, HashBucket of each element as a scalar.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctrflow.etl import Dataset, Workflow, lists, synthetic
from ctrflow.etl.hashing import hash_values
from ctrflow.etl.list_args import parse_list_cols
from ctrflow.etl.ops import Categorify, HashBucket, HashedCross, ListPad, ListTruncate
from ctrflow.etl.readers import normalize_arrow
from ctrflow.etl.run import main
from ctrflow.etl.schema import Schema

WORDS = ["a", "bb", "ccc", "é", "日本", "zz", "k1", "k2", "q", "0"]


# ---- data and references ------------------------------------------------------------------
def make_lists(n: int = 400, seed: int = 0, words: list[str] = WORDS) -> list[list[str | None] | None]:
    """Random lists: ~10% null lists, ~10% empty, ~5% null elements, lengths up to 12, Zipf values."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(words) + 1)
    out: list[list[str | None] | None] = []
    for _ in range(n):
        u = rng.random()
        if u < 0.1:
            out.append(None)
            continue
        k = 0 if u < 0.2 else int(rng.integers(1, 13))
        vals = [str(v) for v in rng.choice(words, k, p=p / p.sum())]
        out.append([None if rng.random() < 0.05 else v for v in vals])
    return out


def frame(columns: dict[str, tuple[list, pa.DataType]]) -> pd.DataFrame:
    table = pa.table({k: pa.array(v, t) for k, (v, t) in columns.items()})
    return normalize_arrow(table).to_pandas(types_mapper=pd.ArrowDtype)


def ref_vocab(values: list, freq_threshold: int = 0) -> dict:
    counts = Counter(v for v in values if v is not None)
    kept = sorted((v for v, c in counts.items() if c >= max(freq_threshold, 1)), key=lambda v: (-counts[v], v))
    return {v: 3 + i for i, v in enumerate(kept)}


def ref_encode(rows: list, vocab: dict) -> list[list[int]]:
    return [[1 if v is None else vocab.get(v, 2) for v in (r or [])] for r in rows]


def to_lists(series: pd.Series) -> list:
    return lists.list_array(series).to_pylist()


# ---- Categorify ---------------------------------------------------------------------------------
@pytest.mark.parametrize("freq_threshold", [0, 3])
@pytest.mark.parametrize("part_size", [10_000, 37])
def test_categorify_lists_match_reference(freq_threshold, part_size):
    fit_rows, new_rows = make_lists(400, 0), make_lists(100, 1, WORDS + ["unseen1", "unseen2"])
    fit = frame({"l": (fit_rows, pa.list_(pa.string()))})
    wf = Workflow(["l"] >> Categorify(freq_threshold=freq_threshold)).fit(Dataset(fit, part_size=part_size))
    vocab = ref_vocab([v for r in fit_rows for v in (r or [])], freq_threshold)
    out = wf.transform(Dataset(frame({"l": (new_rows, pa.list_(pa.string()))}), part_size=part_size)).compute()
    assert out["l"].dtype == pd.ArrowDtype(pa.list_(pa.int32()))
    assert to_lists(out["l"]) == ref_encode(new_rows, vocab)
    col = wf.output_schema()["l"]
    assert (col.kind, col.dtype, col.cardinality) == ("list", "int32", 3 + len(vocab))
    assert col.max_length == max(len(r or []) for r in fit_rows)


def test_categorify_list_int_values_and_num_buckets():
    rows = [[5, 6, 5], None, [], [7, None, 99], [5]]
    df = frame({"l": (rows, pa.list_(pa.int32())), "s": ([5, 6, 99, None, 7], pa.int64())})
    wf = Workflow(["l", "s"] >> Categorify(freq_threshold=2, num_buckets=4)).fit(Dataset(df))
    out = wf.transform(Dataset(df)).compute()
    # 5 is the only value seen twice in l; 6, 7, 99 hash into buckets 2..5 exactly as scalars do.
    oov = {v: 2 + int(hash_values(pa.array([v], pa.int64()))[0] % np.uint64(4)) for v in (6, 7, 99)}
    assert to_lists(out["l"]) == [[6, oov[6], 6], [], [], [oov[7], 1, oov[99]], [6]]
    assert wf.output_schema()["l"].cardinality == 6 + 1


def test_joint_vocabulary_shares_ids():
    hist = make_lists(300, 2)
    item = [r[0] if r else None for r in make_lists(300, 3)]
    df = frame({"item": (item, pa.string()), "hist": (hist, pa.list_(pa.string()))})
    joint = ["item", "hist"] >> Categorify(encode_type="joint", vocabulary="items")
    wf = Workflow(joint).fit(Dataset(df, part_size=50))
    out = wf.transform(Dataset(df)).compute()
    vocab = ref_vocab([v for r in hist for v in (r or [])] + item)  # counted over both columns
    assert to_lists(out["hist"]) == ref_encode(hist, vocab)
    assert out["item"].tolist() == [1 if v is None else vocab[v] for v in item]
    schema = wf.output_schema()
    assert schema["item"].cardinality == schema["hist"].cardinality == 3 + len(vocab)
    assert schema["item"].vocabulary == schema["hist"].vocabulary == "items"
    assert (schema["item"].kind, schema["hist"].kind) == ("categorical", "list")


def test_joint_default_name_and_bad_encode_type():
    df = frame({"a": (["x", "y"], pa.string()), "b": ([["y"], ["z"]], pa.list_(pa.string()))})
    wf = Workflow(["a", "b"] >> Categorify(encode_type="joint")).fit(Dataset(df))
    assert wf.output_schema()["b"].vocabulary == "a_b"
    with pytest.raises(ValueError, match="encode_type"):
        Categorify(encode_type="combo")


# ---- ListTruncate / ListPad ---------------------------------------------------------------------
@pytest.mark.parametrize("keep", ["first", "last"])
def test_truncate_matches_reference_and_weights_follow(keep):
    rows = make_lists(300, 4)
    rng = np.random.default_rng(0)
    weights = [None if r is None else [float(x) for x in rng.random(len(r)).astype(np.float32)] for r in rows]
    df = frame({"h": (rows, pa.list_(pa.string())), "h_weights": (weights, pa.list_(pa.float32()))})
    graph = ((["h"] >> Categorify()) + ["h_weights"]) >> ListTruncate(5, keep=keep)
    wf = Workflow(graph).fit(Dataset(df, part_size=64))
    out = wf.transform(Dataset(df, part_size=64)).compute()

    def cut(r):
        r = r or []
        return r[:5] if keep == "first" else r[-5:]

    vocab = ref_vocab([v for r in rows for v in (r or [])])
    assert to_lists(out["h"]) == ref_encode([cut(r) for r in rows], vocab)
    assert to_lists(out["h_weights"]) == [cut(w) for w in weights]
    schema = wf.output_schema()
    assert schema["h"].max_length == 5 and schema["h"].weights == "h_weights"
    assert (schema["h_weights"].kind, schema["h_weights"].dtype) == ("other", "float32")


def test_truncate_and_pad_on_arrow_edge_cases():
    arr = pa.array([[1, 2, None, 4], None, [], [5]], pa.list_(pa.int64()))
    assert lists.truncate(arr, 2).to_pylist() == [[1, 2], [], [], [5]]
    assert lists.truncate(arr.slice(1), 1, "last").to_pylist() == [[], [], [5]]
    assert lists.truncate(arr, 10).to_pylist() == [[1, 2, None, 4], [], [], [5]]
    assert lists.pad(arr, 3).to_pylist() == [[1, 2, None], [0, 0, 0], [0, 0, 0], [5, 0, 0]]
    assert lists.pad(pa.array([], pa.list_(pa.int64())), 3).to_pylist() == []
    with pytest.raises(ValueError):
        ListTruncate(0)
    with pytest.raises(ValueError):
        ListTruncate(3, keep="middle")


def test_list_pad_op_fixed_length_schema():
    rows = make_lists(100, 5)
    df = frame({"h": (rows, pa.list_(pa.string())), "s": (["a"] * 100, pa.string())})
    wf = Workflow(["h", "s"] >> Categorify() >> ListTruncate(3) >> ListPad(6)).fit(Dataset(df))
    out = wf.transform(Dataset(df, part_size=30)).compute()
    vocab = ref_vocab([v for r in rows for v in (r or [])])
    assert to_lists(out["h"]) == [(e[:3] + [0] * 6)[:6] for e in ref_encode(rows, vocab)]
    assert out["s"].tolist() == [3] * 100  # scalar columns pass through the list ops
    assert wf.output_schema()["h"].max_length == 6


# ---- hashing ------------------------------------------------------------------------------------
def test_hash_bucket_on_lists_equals_scalars():
    rows = make_lists(200, 6)
    df = frame({"h": (rows, pa.list_(pa.string()))})
    out = Workflow(["h"] >> HashBucket(97)).transform(Dataset(df, part_size=40)).compute()
    flat = [v for r in rows for v in (r or [])]
    scalar = Workflow(["x"] >> HashBucket(97)).transform(Dataset(frame({"x": (flat, pa.string())}))).compute()
    assert [v for r in to_lists(out["h"]) for v in r] == scalar["x"].tolist()
    assert [len(r) for r in to_lists(out["h"])] == [len(r or []) for r in rows]
    # the documented stable hash: FNV-1a 64 of the UTF-8 bytes, mod buckets (fixed vectors)
    assert hash_values(pa.array(["a"]))[0] == 0xAF63DC4C8601EC8C
    one = Workflow(["h"] >> HashBucket(1000)).transform(Dataset(frame({"h": ([["a", "foobar"]],
                                                                             pa.list_(pa.string()))}))).compute()
    assert to_lists(one["h"]) == [[0xAF63DC4C8601EC8C % 1000, 0x85944171F73967E8 % 1000]]


def test_hashed_cross_list_with_scalar():
    rows = make_lists(100, 7)
    u = [int(x) for x in np.random.default_rng(1).integers(0, 5, 100)]
    out = Workflow(["h", "u"] >> HashedCross(1000)).transform(
        Dataset(frame({"h": (rows, pa.list_(pa.string())), "u": (u, pa.int64())}), part_size=30)).compute()
    flat_h = [v for r in rows for v in (r or [])]
    flat_u = [ui for r, ui in zip(rows, u, strict=True) for _ in (r or [])]
    scalar = Workflow(["h", "u"] >> HashedCross(1000)).transform(
        Dataset(frame({"h": (flat_h, pa.string()), "u": (flat_u, pa.int64())}))).compute()
    assert [v for r in to_lists(out["h_X_u"]) for v in r] == scalar["h_X_u"].tolist()


# ---- readers ------------------------------------------------------------------------------------
def test_split_strings_reference():
    raw = ["a|b", None, "", "c||d|", "日本|é", "x"]
    expect = [None if s is None else [t for t in s.split("|") if t] for s in raw]
    assert lists.split_strings(pa.array(raw), "|").to_pylist() == expect
    assert lists.split_strings(pa.array(raw).dictionary_encode(), "|").to_pylist() == expect
    assert parse_list_cols(["tags:|,hist", "a:,,b:;"]) == {"tags": "|", "hist": None, "a": ",", "b": ";"}


def test_list_typed_parquet_is_read_with_stable_types(tmp_path):
    t1 = pa.table({"l": pa.array([["x", None], None], pa.large_list(pa.large_string())),
                   "n": pa.array([[1, 2], []], pa.list_(pa.int32()))})
    t2 = pa.table({"l": pa.array([["y"]], pa.large_list(pa.large_string())),
                   "n": pa.array([[3]], pa.list_(pa.int32()))})
    pq.write_table(t1, tmp_path / "a.parquet")
    pq.write_table(t2, tmp_path / "b.parquet")
    ds = Dataset(str(tmp_path), engine="parquet")
    df = ds.compute()
    assert df["l"].dtype == pd.ArrowDtype(pa.list_(pa.string()))
    assert df["n"].dtype == pd.ArrowDtype(pa.list_(pa.int64()))
    assert to_lists(df["l"]) == [["x", None], None, ["y"]]
    out = Workflow(["l", "n"] >> Categorify()).fit_transform(ds).compute()
    assert to_lists(out["n"]) == [[3, 4], [], [5]] and to_lists(out["l"]) == [[3, 1], [], [4]]


# ---- CLI ----------------------------------------------------------------------------------------
def test_cli_list_cols_csv(tmp_path):
    n = 400
    rows = make_lists(n, 8)
    rng = np.random.default_rng(2)
    csv = pd.DataFrame({"label": rng.integers(0, 2, n), "u": rng.integers(0, 9, n).astype(str),
                        "x": rng.random(n),
                        "tags": ["" if r is None else "|".join(v for v in r if v is not None) for r in rows]})
    csv.to_csv(tmp_path / "in.csv", index=False)
    out = tmp_path / "out"
    assert main(["--input", str(tmp_path / "in.csv"), "--cats", "u", "--conts", "x", "--list-cols", "tags:|",
                 "--list-max-len", "4", "--freq-threshold", "0", "--output", str(out), "--no-progress"]) == 0
    schema = Schema.load(out)
    col = schema["tags"]
    assert (col.kind, col.dtype, col.max_length) == ("list", "int32", 4)
    got = pa.concat_tables([pq.read_table(f) for f in sorted((out / "train").glob("*.parquet"))
                            + sorted((out / "valid").glob("*.parquet"))])
    assert got.schema.field("tags").type == pa.list_(pa.int32())
    lens = sorted(len(r) for r in got["tags"].to_pylist())
    assert lens == sorted(min(4, len([v for v in (r or []) if v is not None])) for r in rows)


def test_cli_with_sequences(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--with-sequences", "--synthetic-rows", "3000", "--no-progress", "--list-max-len", "50"]) == 0
    out = tmp_path / "data" / "processed"
    schema = Schema.load(out)
    item, hist, tags, w = schema["item_id"], schema["hist_items"], schema["tags"], schema["tags_weights"]
    assert (item.kind, hist.kind, tags.kind, w.kind) == ("categorical", "list", "list", "other")
    assert item.vocabulary == hist.vocabulary == "items" and item.cardinality == hist.cardinality
    assert hist.max_length <= 50 and tags.weights == "tags_weights" and w.dtype == "float32"
    assert schema.categorical[:26] == [f"C{i}" for i in range(1, 27)]
    meta = schema.metadata["synthetic"]
    assert meta["sequences"]["columns"]["history"] == "hist_items"
    assert meta["oracle"]["valid_auc"] is not None and "oracle_no_sequence" in meta["sequences"]
    f = sorted((out / "train").glob("*.parquet"))[0]
    t = pq.read_table(f)
    assert t.schema.field("hist_items").type == pa.list_(pa.int32())
    assert t.schema.field("tags_weights").type == pa.list_(pa.float32())
    assert pa.compute.list_value_length(t["tags"]).equals(pa.compute.list_value_length(t["tags_weights"]))
    with open(out / "schema.json") as fh:
        assert json.load(fh)["columns"][-1] == {"name": "tags_weights", "kind": "other", "dtype": "float32",
                                                "max_length": tags.max_length}


def test_sequences_leave_default_columns_unchanged(tmp_path):
    a = synthetic.generate(str(tmp_path / "a"), rows=3000, seed=1)
    b = synthetic.generate(str(tmp_path / "b"), rows=3000, seed=1, sequences=True)
    ta = pq.read_table(tmp_path / "a" / a["files"]["train"][0])
    tb = pq.read_table(tmp_path / "b" / b["files"]["train"][0])
    assert all(ta[c].equals(tb[c]) for c in ta.column_names if c != "label")
    assert "sequences" not in a and b["sequences"]["order"] == "newest first"
    lens = pa.compute.list_value_length(tb["hist_items"]).to_numpy()
    assert lens.max() <= 100 and 10 < lens.mean() < 30


def test_workflow_with_lists_saves_and_loads(tmp_path):
    rows = make_lists(120, 9)
    df = frame({"h": (rows, pa.list_(pa.string())), "i": ([r[0] if r else "a" for r in rows], pa.string())})
    wf = Workflow(["i", "h"] >> Categorify(vocabulary="v") >> ListTruncate(3)).fit(Dataset(df))
    wf.save(tmp_path / "wf")
    back = Workflow.load(tmp_path / "wf")
    assert back.output_schema().to_dict() == wf.output_schema().to_dict()
    assert back.transform(Dataset(df)).compute().equals(wf.transform(Dataset(df)).compute())


def test_cli_list_typed_parquet_weights_and_joint_vocab(tmp_path):
    n = 300
    rows = make_lists(n, 10)
    rng = np.random.default_rng(3)
    weights = [None if r is None else [float(x) for x in rng.random(len(r)).astype(np.float32)] for r in rows]
    item = [str(v) for v in rng.choice(WORDS, n)]
    table = pa.table({"label": pa.array(rng.integers(0, 2, n)), "x": pa.array(rng.random(n)),
                      "item": pa.array(item), "hist": pa.array(rows, pa.list_(pa.string())),
                      "hist_weights": pa.array(weights, pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "train.parquet")
    pq.write_table(table.slice(0, 50), tmp_path / "valid.parquet")
    out = tmp_path / "out"
    assert main(["--input", str(tmp_path / "train.parquet"), "--valid", str(tmp_path / "valid.parquet"),
                 "--cats", "item", "--conts", "x", "--list-cols", "hist", "--joint-vocab", "items=item,hist",
                 "--list-max-len", "3", "--freq-threshold", "0", "--output", str(out), "--no-progress"]) == 0
    schema = Schema.load(out)
    assert schema["hist"].weights == "hist_weights" and schema["hist"].max_length == 3
    assert schema["item"].vocabulary == schema["hist"].vocabulary == "items"
    got = pa.concat_tables([pq.read_table(f) for f in sorted((out / "train").glob("part-*.parquet"))])
    vocab = ref_vocab([v for r in rows for v in (r or [])] + item)
    assert got["item"].to_pylist() == [vocab[v] for v in item]
    assert got["hist"].to_pylist() == ref_encode([(r or [])[:3] for r in rows], vocab)
    assert got["hist_weights"].to_pylist() == [(w or [])[:3] for w in weights]


@pytest.mark.parametrize("argv, needle", [
    (["--list-max-len", "0"], "--list-max-len"),
    (["--with-sequences", "--input", "x.parquet"], "--with-sequences"),
    (["--joint-vocab", "items=a"], "at least two"),
])
def test_cli_bad_list_flags(tmp_path, capsys, argv, needle):
    assert main([*argv, "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
