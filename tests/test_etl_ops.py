"""Every ETL op against a numpy / pandas reference, on one frame and through partitioned inputs.

References are written here from the op's documented contract (not from its code): Categorify's
NVTabular 23.08 ids, ``np.digitize``, ``np.log1p``, ``np.nanmean`` / ``np.nanstd(ddof=1)``, the
pure-Python FNV-1a hash. The partitioned runs (tiny partitions, an empty partition, parquet files
with a dictionary-encoded string column and int columns with nulls) must equal the single-frame
reference exactly.
"""

from __future__ import annotations

import struct
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctrflow.etl import Dataset, Workflow, get_embedding_sizes
from ctrflow.etl.hashing import combine_hashes, fnv1a64, hash_values
from ctrflow.etl.ops import (
    Bucketize,
    Categorify,
    Clip,
    FillMissing,
    HashBucket,
    HashedCross,
    Label,
    LabelError,
    LogOp,
    Normalize,
    NormalizeMinMax,
    QuantileBucketize,
    Rename,
)
from ctrflow.etl.schema import embedding_dim

WORDS = ["a", "bb", "ccc", "é", "日本", "🙂", "", "zz", "k1", "k2", "k3", "q", "Q", "ä", "x y", "0", "10", "9"]


# ---- data -----------------------------------------------------------------------------------
def make_frame(n: int = 600, seed: int = 0) -> pd.DataFrame:
    """Random CTR-like columns with nulls; rows 300..349 have every nullable column all-null."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(WORDS) + 1)
    s = rng.choice(WORDS, n, p=p / p.sum()).astype(object)
    s[rng.random(n) < 0.1] = None
    t = rng.choice(["u", "v", "w", "vv", "ww"], n).astype(object)
    t[rng.random(n) < 0.05] = None
    i = pd.array(rng.integers(-20, 40, n), dtype="Int64")
    i[rng.random(n) < 0.1] = pd.NA
    x = rng.normal(1.0, 3.0, n)
    x[rng.random(n) < 0.1] = np.nan
    f = rng.exponential(5.0, n)
    f[rng.random(n) < 0.2] = np.nan
    pos = rng.lognormal(1.0, 1.5, n) - 1.0  # a few negatives for Clip
    pos[rng.random(n) < 0.1] = np.nan
    q = rng.gamma(2.0, 2.0, n)
    q[rng.random(n) < 0.1] = np.nan
    df = pd.DataFrame({"s": s, "t": t, "i": i, "x": x, "f": f, "p": pos, "q": q,
                       "y": rng.integers(0, 2, n)})
    if n > 350:
        for c in ("s", "i", "x", "f", "p", "q"):
            df.loc[300:349, c] = None
    return df


def hash_ref(v) -> int:
    """Pure-Python FNV-1a of one value, as documented in ctrflow.etl.hashing."""
    if isinstance(v, str):
        return fnv1a64(v.encode())
    if isinstance(v, (int, np.integer)):
        return fnv1a64(struct.pack("<q", int(v)))
    v = float(v)
    if v == int(v):
        return fnv1a64(struct.pack("<q", int(v)))
    return fnv1a64(struct.pack("<d", v))


def vocab_ref(fit: pd.Series, freq_threshold: int = 0, max_size: int = 0, num_buckets: int | None = None) -> list:
    """Kept values in id order: count descending, then value ascending.

    ``max_size`` is NVTabular's: the whole cardinality, reserved ids included.
    """
    counts: dict = {}
    for v in fit:
        if not pd.isna(v):
            counts[v] = counts.get(v, 0) + 1
    kept = [v for v, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= max(freq_threshold, 1)]
    return kept[: max_size - 2 - (num_buckets or 1)] if max_size else kept


def categorify_ref(fit: pd.Series, apply: pd.Series, freq_threshold: int = 0, max_size: int = 0,
                   num_buckets: int | None = None) -> np.ndarray:
    """NVTabular 23.08 ids: 1 null, 2 (or 2 + hash % nb) OOV, then by count desc, value asc."""
    kept = vocab_ref(fit, freq_threshold, max_size, num_buckets)
    first = 2 + (num_buckets or 1)
    ids = {v: first + k for k, v in enumerate(kept)}
    out = []
    for v in apply:
        if pd.isna(v):
            out.append(1)
        elif v in ids:
            out.append(ids[v])
        else:
            out.append(2 + hash_ref(v) % num_buckets if num_buckets else 2)
    return np.array(out, dtype=np.int64)


def floats(s: pd.Series) -> np.ndarray:
    return pd.to_numeric(s).astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)


def run(graph, dataset: Dataset) -> tuple[Workflow, pd.DataFrame]:
    wf = Workflow(graph)
    out = wf.fit_transform(dataset).compute().reset_index(drop=True)
    return wf, out


def run_df(graph, df: pd.DataFrame, **kw) -> tuple[Workflow, pd.DataFrame]:
    return run(graph, Dataset(df, **kw))


# ---- Categorify -----------------------------------------------------------------------------
@pytest.mark.parametrize("part_size", [None, 1, 3])
@pytest.mark.parametrize("shuffled", [False, True])
def test_categorify_nvtabular_2308_ids(part_size, shuffled):
    values = ["a", "a", "a", "b", "b", "c", "d", None]
    order = [6, 0, 7, 3, 1, 5, 2, 4] if shuffled else list(range(8))  # ids must not depend on row order
    df = pd.DataFrame({"c": [values[k] for k in order]})
    wf, out = run_df(["c"] >> Categorify(freq_threshold=2), df, part_size=part_size)
    expected = {"a": 3, "b": 4, "c": 2, "d": 2, None: 1}
    assert out["c"].tolist() == [expected[values[k]] for k in order]
    assert out["c"].dtype == np.int32
    assert get_embedding_sizes(wf) == {"c": (5, 16)}
    unseen = wf.transform(Dataset(pd.DataFrame({"c": ["zzz", "b", None, "a", "c"]}))).compute()
    assert unseen["c"].tolist() == [2, 4, 1, 3, 2]


CAT_PARAMS = [
    {},
    {"freq_threshold": 3},
    {"max_size": 5},
    {"freq_threshold": 2, "max_size": 12, "num_buckets": 7},
    {"num_buckets": 3},
    {"freq_threshold": 1000},  # nothing kept: every value is OOV
]


@pytest.mark.parametrize("params", CAT_PARAMS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "default")
@pytest.mark.parametrize("col", ["s", "i"])
def test_categorify_matches_reference_with_unseen_values(col, params):
    df = make_frame(600, seed=1)
    fit_df, new_df = df.iloc[:400], make_frame(300, seed=2)  # new_df holds values fit never saw
    if col == "i":
        new_df["i"] = new_df["i"] + 30  # shifts about half the ints out of the fitted range
    else:
        new_df.loc[::4, "s"] = [f"unseen-{k}" for k in range(0, len(new_df), 4)]
    wf = Workflow([col] >> Categorify(**params)).fit(Dataset(fit_df, part_size=70))
    op = wf.ops[0]
    for apply in (fit_df, new_df):
        got = wf.transform(Dataset(apply, part_size=50)).compute()[col]
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got.to_numpy(), categorify_ref(fit_df[col], apply[col], **params))
    kept = vocab_ref(fit_df[col], params.get("freq_threshold", 0), params.get("max_size", 0),
                     params.get("num_buckets"))
    assert op.vocabs[col]["value"].to_pylist() == kept
    card = 2 + (params.get("num_buckets") or 1) + len(kept)
    assert op.cardinality(col) == card
    assert get_embedding_sizes(wf) == {col: (card, embedding_dim(card))}


def test_categorify_ties_by_value_ascending():
    strs = ["b", "b", "a", "a", "B", "B", "ä", "ä", "c", "c", "c"]
    ints = [10, 10, 9, 9, 100, 100, -1, -1, 5, 5, 5]
    df = pd.DataFrame({"s": strs, "i": ints})
    _, out = run_df(["s", "i"] >> Categorify(), df, part_size=3)
    # counts: c/5 x3 first, then the 2-count ties by codepoint / numeric order (not as strings)
    assert dict(zip(strs, out["s"], strict=True)) == {"c": 3, "B": 4, "a": 5, "b": 6, "ä": 7}
    assert dict(zip(ints, out["i"], strict=True)) == {5: 3, -1: 4, 9: 5, 10: 6, 100: 7}


def test_categorify_int_fit_transforms_float_input_alike():
    """Ints with nulls read as Int64 (arrow, parquet) or as float64 (numpy pandas) get the same ids."""
    fit = pd.DataFrame({"i": pd.array([1, 2, 2, 3, None, 10, 10, 10], dtype="Int64")})
    wf = Workflow(["i"] >> Categorify(num_buckets=4)).fit(Dataset(fit))
    as_float = pd.DataFrame({"i": [1.0, 2.0, np.nan, 3.5, 10.0, 99.0]})
    got = wf.transform(Dataset(as_float)).compute()["i"].tolist()
    # kept from 6 (= 2 + 4 buckets): 10 -> 6, 2 -> 7, 1 -> 8, 3 -> 9
    assert got[:3] == [8, 7, 1] and got[4] == 6
    assert got[3] == 2 + hash_ref(3.5) % 4 and got[5] == 2 + hash_ref(99) % 4


def test_nan_in_parquet_is_null_like_in_pandas(tmp_path):
    pq.write_table(pa.table({"f": pa.array([1.5, np.nan, 1.5, None])}), tmp_path / "f.parquet")
    wf = Workflow((["f"] >> Categorify()) + (["f"] >> HashBucket(10) >> Rename(postfix="_h")))
    wf.fit(Dataset(tmp_path / "f.parquet"))
    from_pandas = wf.transform(Dataset(pd.DataFrame({"f": [1.5, np.nan, 1.5, None]}))).compute()
    assert from_pandas["f"].tolist() == [3, 1, 3, 1] and from_pandas["f_h"].tolist()[1::2] == [10, 10]
    from_parquet = wf.transform(Dataset(tmp_path / "f.parquet")).compute()
    pd.testing.assert_frame_equal(from_parquet.reset_index(drop=True), from_pandas)


def test_categorify_rejects_bad_params():
    with pytest.raises(ValueError):
        Categorify(freq_threshold=-1)
    with pytest.raises(ValueError):
        Categorify(num_buckets=0)


# ---- continuous ops -------------------------------------------------------------------------
def test_normalize_sample_std_and_nulls():
    df = make_frame(600, seed=3)
    wf, out = run_df(["x", "i"] >> Normalize(), df, part_size=97)
    for c in ("x", "i"):
        v = floats(df[c])
        ref = (v - np.nanmean(v)) / np.nanstd(v, ddof=1)
        assert out[c].dtype == np.float32
        np.testing.assert_allclose(out[c].to_numpy(np.float64), ref, rtol=1e-5, atol=1e-6, equal_nan=True)
        st = wf.ops[0].stats[c]
        assert st["mean"] == pytest.approx(np.nanmean(v), rel=1e-12)
        assert st["std"] == pytest.approx(np.nanstd(v, ddof=1), rel=1e-12)
        assert st["count"] == int(np.isfinite(v).sum())


def test_normalize_constant_column_is_zero():
    _, out = run_df(["x"] >> Normalize(), pd.DataFrame({"x": [4.0, 4.0, np.nan, 4.0]}))
    np.testing.assert_array_equal(out["x"].to_numpy(), np.array([0, 0, np.nan, 0], np.float32))


def test_normalize_minmax():
    df = make_frame(500, seed=4)
    _, out = run_df(["x"] >> NormalizeMinMax(), df, part_size=33)
    v = floats(df["x"])
    ref = (v - np.nanmin(v)) / (np.nanmax(v) - np.nanmin(v))
    np.testing.assert_allclose(out["x"].to_numpy(np.float64), ref, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert np.nanmin(out["x"]) == 0 and np.nanmax(out["x"]) == pytest.approx(1.0)


def test_fill_missing_constant_with_flags():
    df = make_frame(300, seed=5)
    wf, out = run_df(["x", "f"] >> FillMissing(fill_val=-1.5, add_binary_cols=True), df, part_size=40)
    assert wf.output_columns == ["x", "f", "x_filled", "f_filled"]
    for c in ("x", "f"):
        v = floats(df[c])
        np.testing.assert_allclose(out[c].to_numpy(np.float64), np.where(np.isnan(v), -1.5, v), rtol=1e-6)
        np.testing.assert_array_equal(out[f"{c}_filled"].to_numpy(), np.isnan(v).astype(np.float32))
        assert out[f"{c}_filled"].dtype == np.float32
    assert wf.output_schema()["x_filled"].kind == "continuous"


def test_fill_missing_median_exact_below_sketch_size():
    df = make_frame(600, seed=6)
    wf, out = run_df(["f", "i"] >> FillMissing(fill_val="median"), df, part_size=23)
    for c in ("f", "i"):
        v = floats(df[c])
        med = np.nanmedian(v)
        assert wf.ops[0].stats[c]["median"] == pytest.approx(med, rel=1e-12)
        np.testing.assert_allclose(out[c].to_numpy(np.float64), np.where(np.isnan(v), med, v), rtol=1e-6)


def test_fill_missing_median_within_sketch_tolerance():
    rng = np.random.default_rng(7)
    v = rng.lognormal(0, 2, 20_000)
    v[rng.random(v.size) < 0.1] = np.nan
    wf = Workflow(["v"] >> FillMissing(fill_val="median")).fit(Dataset(pd.DataFrame({"v": v}), part_size=1500))
    med = wf.ops[0].stats["v"]["median"]
    rank = np.mean(v[~np.isnan(v)] <= med)
    assert abs(rank - 0.5) < 0.005, (med, np.nanmedian(v), rank)


def test_clip_and_log():
    df = make_frame(400, seed=8)
    _, out = run_df((["p"] >> Clip(min_value=0) >> LogOp()) + (["x"] >> Clip(min_value=-1, max_value=2.5)), df)
    p, x = floats(df["p"]), floats(df["x"])
    np.testing.assert_allclose(out["p"].to_numpy(np.float64), np.log1p(np.clip(p, 0, None)), rtol=1e-6,
                               equal_nan=True)
    np.testing.assert_allclose(out["x"].to_numpy(np.float64), np.clip(x, -1, 2.5), rtol=1e-6, equal_nan=True)
    assert out["p"].isna().sum() == np.isnan(p).sum()
    assert (out.dtypes == np.float32).all()
    with pytest.raises(ValueError):
        Clip()
    with pytest.raises(ValueError):
        Clip(min_value=2, max_value=1)


def test_log_below_minus_one_is_nan():
    _, out = run_df(["x"] >> LogOp(), pd.DataFrame({"x": [-2.0, -1.0, 0.0, np.e - 1]}))
    got = out["x"].to_numpy(np.float64)
    assert np.isnan(got[0]) and got[1] == -np.inf and got[2] == 0 and got[3] == pytest.approx(1.0)


def test_signed_log_keeps_sign_and_order_and_equals_log_on_non_negatives():
    x = np.array([-1e6, -3.0, -1.0, -0.5, 0.0, 0.5, 1.0, np.e - 1, 1e9, np.nan])
    _, out = run_df(["x"] >> LogOp(signed=True), pd.DataFrame({"x": x}), part_size=3)
    got = out["x"].to_numpy(np.float64)
    np.testing.assert_allclose(got[:-1], np.sign(x[:-1]) * np.log1p(np.abs(x[:-1])), rtol=1e-6)
    assert np.isnan(got[-1]) and np.all(np.diff(got[:-1]) > 0)  # strictly monotone: negatives stay apart
    _, plain = run_df(["x"] >> LogOp(), pd.DataFrame({"x": x[4:-1]}))
    np.testing.assert_array_equal(got[4:-1], plain["x"].to_numpy(np.float64))
    assert LogOp(signed=True).params() == {"signed": True} and LogOp().params() == {}  # old workflows load as before


# ---- bucketing ------------------------------------------------------------------------------
def test_bucketize_digitize_semantics():
    df = make_frame(500, seed=9)
    b = [-2.0, 0.0, 1.0, 4.5]
    df.loc[:4, "x"] = b + [100.0]  # values exactly on the boundaries
    wf, out = run_df(["x", "i"] >> Bucketize(b), df, part_size=64)
    for c in ("x", "i"):
        v = floats(df[c])
        ref = np.where(np.isnan(v), len(b) + 1, np.digitize(np.nan_to_num(v), b, right=False))
        np.testing.assert_array_equal(out[c].to_numpy(), ref)
        assert out[c].dtype == np.int32
    assert out["x"].tolist()[:5] == [1, 2, 3, 4, 4]
    assert get_embedding_sizes(wf) == {"x": (6, 16), "i": (6, 16)}


def test_bucketize_per_column_boundaries():
    df = pd.DataFrame({"a": [0.0, 5.0, 50.0], "b": [0.0, 5.0, None]})
    wf, out = run_df(["a", "b"] >> Bucketize({"a": [1, 10], "b": [3]}), df)
    assert out["a"].tolist() == [0, 1, 2] and out["b"].tolist() == [0, 1, 2]
    assert get_embedding_sizes(wf) == {"a": (4, 16), "b": (3, 16)}
    with pytest.raises(ValueError):
        Bucketize([1, 1, 2])


def test_quantile_bucketize_equal_frequency():
    rng = np.random.default_rng(10)
    v = rng.gamma(2.0, 2.0, 2000)
    v[rng.random(v.size) < 0.1] = np.nan
    df = pd.DataFrame({"q": v})
    k = 8
    wf, out = run_df(["q"] >> QuantileBucketize(num_bins=k), df, part_size=300)
    bounds = wf.ops[0].stats["q"]["boundaries"]
    assert len(bounds) == k - 1
    # below the sketch size the boundaries are exact Hazen quantiles
    np.testing.assert_allclose(bounds, np.nanquantile(v, np.arange(1, k) / k, method="hazen"), rtol=1e-12)
    ids = out["q"].to_numpy()
    np.testing.assert_array_equal(ids[np.isnan(v)], k)  # nulls -> len(boundaries) + 1
    counts = np.bincount(ids[~np.isnan(v)], minlength=k)
    assert counts.min() >= 0.95 * (~np.isnan(v)).sum() / k and counts.max() <= 1.05 * (~np.isnan(v)).sum() / k
    assert get_embedding_sizes(wf) == {"q": (k + 1, 16)}


def test_quantile_bucketize_heavy_ties_drop_repeated_boundaries():
    df = pd.DataFrame({"q": [0.0] * 90 + list(range(1, 11))})
    wf, out = run_df(["q"] >> QuantileBucketize(num_bins=10), df)
    bounds = wf.ops[0].stats["q"]["boundaries"]
    assert bounds == sorted(set(bounds))
    assert wf.ops[0].cardinality("q") == len(bounds) + 2
    assert out["q"].max() < len(bounds) + 2


# ---- hashing ops ----------------------------------------------------------------------------
@pytest.mark.parametrize("col", ["s", "i", "x"])
def test_hash_bucket(col):
    df = make_frame(400, seed=11)
    n = 37
    wf, out = run_df([col] >> HashBucket(n), df, part_size=50)
    h = (hash_values(df[col]) % np.uint64(n)).astype(np.int64)
    ref = np.where(df[col].isna().to_numpy(), n, h)
    np.testing.assert_array_equal(out[col].to_numpy(), ref)
    assert out[col].dtype == np.int32
    ref_py = [n if pd.isna(v) else hash_ref(v) % n for v in df[col]]
    np.testing.assert_array_equal(out[col].to_numpy(), ref_py)
    assert get_embedding_sizes(wf) == {col: (n + 1, embedding_dim(n + 1))}


def test_hash_bucket_per_column():
    df = make_frame(100, seed=12)
    wf, out = run_df(["s", "t"] >> HashBucket({"s": 5, "t": 11}), df)
    assert out["s"].max() <= 5 and out["t"].max() <= 11
    assert get_embedding_sizes(wf) == {"s": (6, 16), "t": (12, 16)}


def test_hashed_cross():
    df = make_frame(400, seed=13)
    n = 101
    wf, out = run_df(["s", "i"] >> HashedCross(n), df, part_size=45)
    assert wf.output_columns == ["s_X_i"]
    ref = combine_hashes([hash_values(df["s"]), hash_values(df["i"])]) % np.uint64(n)
    np.testing.assert_array_equal(out["s_X_i"].to_numpy(), ref.astype(np.int64))
    assert out["s_X_i"].dtype == np.int32
    assert get_embedding_sizes(wf) == {"s_X_i": (n, embedding_dim(n))}
    with pytest.raises(ValueError):
        (["s"] >> HashedCross(10)).output_columns  # noqa: B018 - a cross needs two columns


# ---- Rename and Label -----------------------------------------------------------------------
def test_rename_kind_and_cardinality_follow():
    df = make_frame(200, seed=14)
    graph = (["s", "t"] >> Categorify() >> Rename(mapping={"s": "s_id"})) + (["x"] >> Normalize() >> Rename(
        postfix="_n"))
    wf, out = run_df(graph, df)
    assert wf.output_columns == ["s_id", "t", "x_n"]
    schema = wf.output_schema()
    assert schema["s_id"].kind == "categorical" and schema["x_n"].kind == "continuous"
    card = 3 + df["s"].nunique()
    assert get_embedding_sizes(wf) == {"s_id": (card, embedding_dim(card)), "t": (3 + df["t"].nunique(), 16)}
    np.testing.assert_array_equal(out["s_id"].to_numpy(), categorify_ref(df["s"], df["s"]))
    with pytest.raises(ValueError):
        Rename()


def test_label_binary_and_regression():
    df = pd.DataFrame({"y": [0, 1, 1, 0], "b": [True, False, True, True], "r": [0.5, -3.0, 2.0, 7.25]})
    wf, out = run_df((["y", "b"] >> Label()) + (["r"] >> Label(task="regression")), df, part_size=2)
    assert out["y"].tolist() == [0, 1, 1, 0] and out["b"].tolist() == [1, 0, 1, 1]
    assert out["r"].tolist() == [0.5, -3.0, 2.0, 7.25]
    assert (out.dtypes == np.float32).all()
    assert wf.output_schema()["y"].kind == "label"
    with pytest.raises(ValueError):
        Label(task="multiclass")


@pytest.mark.parametrize(
    "values,task",
    [
        ([0.0, 1.0, np.nan], "binary"),
        ([0, 1, 2], "binary"),
        (pd.array([0, None, 1], dtype="Int64"), "binary"),
        ([0.5, np.inf, 1.0], "regression"),
        ([0.5, np.nan, 1.0], "regression"),
    ],
    ids=["nan", "two", "null", "inf-regression", "nan-regression"],
)
def test_label_rejects_bad_values(values, task):
    df = pd.DataFrame({"y": values})
    with pytest.raises(LabelError, match="'y'"):
        run_df(["y"] >> Label(task=task), df)


def test_numeric_op_on_strings_raises_type_error():
    df = pd.DataFrame({"y": ["yes", "no", "yes"]})
    with pytest.raises(TypeError, match="numeric op needs numbers"):
        run_df(["y"] >> Normalize(), df)


# ---- every op, partitioned inputs -----------------------------------------------------------
def all_ops_graph():
    """One graph exercising every op on its own columns (renames keep the outputs distinct)."""
    return (
        (["s", "i"] >> Categorify(freq_threshold=2))
        + (["t"] >> Categorify(max_size=9, num_buckets=4) >> Rename(postfix="_c"))
        + (["x"] >> Normalize())
        + (["x"] >> NormalizeMinMax() >> Rename(postfix="_mm"))
        + (["f"] >> FillMissing(fill_val="median", add_binary_cols=True))
        + (["p"] >> Clip(min_value=0) >> LogOp())
        + (["x"] >> Bucketize([-1.0, 0.0, 2.0]) >> Rename(postfix="_b"))
        + (["q"] >> QuantileBucketize(num_bins=5))
        + (["s"] >> HashBucket(50) >> Rename(postfix="_h"))
        + (["s", "t"] >> HashedCross(64))
        + (["y"] >> Label())
    )


def all_ops_reference(df: pd.DataFrame) -> dict[str, np.ndarray]:
    x, f, p, q = (floats(df[c]) for c in "xfpq")
    v = q[~np.isnan(q)]
    qb = np.unique(np.quantile(v, np.arange(1, 5) / 5, method="hazen"))
    med = np.nanmedian(f)
    return {
        "s": categorify_ref(df["s"], df["s"], freq_threshold=2),
        "i": categorify_ref(df["i"], df["i"], freq_threshold=2),
        "t_c": categorify_ref(df["t"], df["t"], max_size=9, num_buckets=4),
        "x": (x - np.nanmean(x)) / np.nanstd(x, ddof=1),
        "x_mm": (x - np.nanmin(x)) / (np.nanmax(x) - np.nanmin(x)),
        "f": np.where(np.isnan(f), med, f),
        "f_filled": np.isnan(f).astype(np.float64),
        "p": np.log1p(np.clip(p, 0, None)),
        "x_b": np.where(np.isnan(x), 4, np.digitize(np.nan_to_num(x), [-1.0, 0.0, 2.0])),
        "q": np.where(np.isnan(q), len(qb) + 1, np.digitize(np.nan_to_num(q), qb)),
        "s_h": np.array([50 if pd.isna(v) else hash_ref(v) % 50 for v in df["s"]]),
        "s_X_t": (combine_hashes([hash_values(df["s"]), hash_values(df["t"])]) % np.uint64(64)).astype(np.int64),
        "y": df["y"].to_numpy(np.float64),
    }


def check_all_ops(wf: Workflow, out: pd.DataFrame, df: pd.DataFrame) -> None:
    ref = all_ops_reference(df)
    assert list(out.columns) == list(ref) == wf.output_columns
    assert len(out) == len(df)
    schema = wf.output_schema()
    for c, r in ref.items():
        got = out[c].to_numpy()
        if schema[c].kind == "categorical":
            assert out[c].dtype == np.int32, c
            np.testing.assert_array_equal(got, r, err_msg=c)
        else:
            assert out[c].dtype == np.float32, c
            np.testing.assert_allclose(got.astype(np.float64), r, rtol=2e-5, atol=2e-6, equal_nan=True, err_msg=c)
    assert set(get_embedding_sizes(wf)) == {"s", "i", "t_c", "x_b", "q", "s_h", "s_X_t"}


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return make_frame(600, seed=42)


@pytest.mark.parametrize("part_size", [None, 97, 25, 1], ids=lambda k: f"part_size={k}")
def test_all_ops_pandas_partitions(frame, part_size):
    df = frame.iloc[:40] if part_size == 1 else frame  # 40 one-row partitions keep it fast
    wf, out = run_df(all_ops_graph(), df, part_size=part_size)
    check_all_ops(wf, out, df)


def with_empty_partitions(df: pd.DataFrame, npartitions: int, empty: list[int]) -> tuple[dd.DataFrame, pd.DataFrame]:
    """A Dask frame whose partitions ``empty`` hold no rows, and the rows it does hold."""
    df = df.assign(_row=np.arange(len(df)))
    ddf = dd.from_pandas(df, npartitions=npartitions, sort=True)
    div = ddf.divisions
    lo = [div[k] for k in empty]
    hi = [div[k + 1] if k + 1 < npartitions else len(df) for k in empty]  # the last division is inclusive
    keep = np.ones(len(df), bool)
    for a, b in zip(lo, hi, strict=True):
        keep[a:b] = False
    mask = None
    for a, b in zip(lo, hi, strict=True):
        m = (ddf["_row"] < a) | (ddf["_row"] >= b)
        mask = m if mask is None else mask & m
    ddf = ddf[mask]
    sizes = ddf.map_partitions(len).compute().tolist()
    assert all(sizes[k] == 0 for k in empty) and sum(sizes) == keep.sum()
    return ddf, df[keep].drop(columns="_row").reset_index(drop=True)


@pytest.mark.parametrize("empty", [[1], [0, 3]], ids=["middle-empty", "first-and-last-empty"])
def test_all_ops_with_empty_partitions(frame, empty):
    ddf, kept = with_empty_partitions(frame, 4, empty)
    wf, out = run(all_ops_graph(), Dataset(ddf))
    check_all_ops(wf, out, kept)


def write_parquet_input(df: pd.DataFrame, folder: Path, files: int = 2, row_group_size: int = 37) -> None:
    """Parquet files as users bring them: string columns dictionary-encoded, ints with nulls."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.set_column(table.schema.get_field_index("s"), "s", table["s"].dictionary_encode())
    table = table.set_column(table.schema.get_field_index("t"), "t", table["t"].cast(pa.string()))
    assert table.schema.field("i").type == pa.int64() and table["i"].null_count > 0
    step = -(-len(df) // files)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(files):
        pq.write_table(table.slice(k * step, step), folder / f"part-{k:02d}.parquet", row_group_size=row_group_size)


@pytest.mark.parametrize("part_size", [None, 50, 1], ids=lambda k: f"part_size={k}")
def test_all_ops_parquet_input(frame, tmp_path, part_size):
    write_parquet_input(frame, tmp_path / "in")
    assert pq.read_schema(tmp_path / "in" / "part-00.parquet").field("s").type.value_type == pa.string()
    ds = Dataset(tmp_path / "in", part_size=part_size)
    assert ds.npartitions == {None: 2, 50: 16, 1: 18}[part_size]  # 9 row groups a file; 37 + 4 rows join
    wf, out = run(all_ops_graph(), ds)
    check_all_ops(wf, out, frame)


def fitted_stats(wf: Workflow) -> list:
    out = []
    for op in wf.ops:
        if isinstance(op, Categorify):
            out.append({c: t.to_pylist() for c, t in op.vocabs.items()})
            out.append(op.stats)
        elif getattr(op, "stats", None) is not None:
            out.append(op.stats)
    return out


def assert_stats_equal(a, b, path="stats"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_stats_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_stats_equal(x, y, f"{path}[{k}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-9, abs=1e-12), path
    else:
        assert a == b, path


def test_stats_do_not_depend_on_partitioning(frame, tmp_path):
    one = Workflow(all_ops_graph()).fit(Dataset(frame))
    many = Workflow(all_ops_graph()).fit(Dataset(frame, part_size=13))
    write_parquet_input(frame, tmp_path / "in", files=3, row_group_size=11)
    parquet = Workflow(all_ops_graph()).fit(Dataset(tmp_path / "in", part_size=30))
    parts = [frame.iloc[:0], frame.iloc[:250], frame.iloc[250:250], frame.iloc[250:], frame.iloc[:0]]
    ddf = dd.from_map(lambda k: parts[k], range(len(parts)), meta=frame.iloc[:0], enforce_metadata=False)
    empties = Workflow(all_ops_graph()).fit(Dataset(ddf))  # every row, three empty partitions
    reference = fitted_stats(one)
    assert len(reference) == 8  # 2 Categorify (vocab + stats), Normalize, MinMax, FillMissing, Quantile
    for other in (many, parquet, empties):
        assert_stats_equal(reference, fitted_stats(other))
        assert get_embedding_sizes(other) == get_embedding_sizes(one)


def test_categorify_max_size_is_total_cardinality_like_nvtabular():
    """NVTabular 23.08: max_size=5 keeps 2 values (ids 3, 4); with num_buckets=2, max_size=7 keeps 3."""
    df = pd.DataFrame({"c": list("aaaabbbccd")})
    wf = Workflow(["c"] >> Categorify(max_size=5))
    out = wf.fit_transform(Dataset(df)).compute()["c"].tolist()
    assert out == [3, 3, 3, 3, 4, 4, 4, 2, 2, 2]
    assert get_embedding_sizes(wf)["c"][0] == 5
    wf = Workflow(["c"] >> Categorify(max_size=7, num_buckets=2))
    wf.fit(Dataset(df))
    assert get_embedding_sizes(wf)["c"][0] == 7
    with pytest.raises(ValueError, match="max_size"):
        Categorify(max_size=3, num_buckets=2)
