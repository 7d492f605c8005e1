"""The stable hash of ``ctrflow.etl.hashing`` against a pure-Python FNV-1a 64 reference.

HashBucket, HashedCross and Categorify's OOV buckets depend on these values never changing, so a
few value -> bucket pairs are hard-coded as a regression guard.
"""

from __future__ import annotations

import struct

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from ctrflow.etl.hashing import OFFSET, PRIME, combine_hashes, fnv1a64, hash_values, null_hash

MASK = 0xFFFFFFFFFFFFFFFF


def ref_str(s: str) -> int:
    return fnv1a64(s.encode("utf-8"))


def ref_int(v: int) -> int:
    return fnv1a64(struct.pack("<q", v))


def ref_float(v: float) -> int:
    return fnv1a64(struct.pack("<d", v))


def random_unicode(rng: np.random.Generator, n: int, max_len: int = 40) -> list[str]:
    """Strings mixing ASCII, Latin-1, CJK and astral (emoji) code points; some empty."""
    ranges = [(0x20, 0x7F), (0xA0, 0x100), (0x4E00, 0x9FFF), (0x1F300, 0x1F64F)]
    out = []
    for _ in range(n):
        length = int(rng.integers(0, max_len + 1))
        chars = []
        for _ in range(length):
            lo, hi = ranges[int(rng.integers(len(ranges)))]
            chars.append(chr(int(rng.integers(lo, hi))))
        out.append("".join(chars))
    out[:3] = ["", "a", "x" * 300]  # empty, one byte, much longer than the rest
    return out


# ---- reference function and documented vectors ----------------------------------------------
def test_documented_vectors():
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64(b"foobar") == 0x85944171F73967E8
    assert int(OFFSET) == 0xCBF29CE484222325 and int(PRIME) == 0x100000001B3
    got = hash_values(pa.array(["", "a", "foobar"]))
    assert got.dtype == np.uint64
    assert got.tolist() == [0xCBF29CE484222325, 0xAF63DC4C8601EC8C, 0x85944171F73967E8]


# ---- strings --------------------------------------------------------------------------------
@pytest.mark.parametrize("arrow_type", [pa.string(), pa.large_string()])
def test_strings_match_reference(arrow_type):
    rng = np.random.default_rng(1)
    strs = random_unicode(rng, 300)
    got = hash_values(pa.array(strs, type=arrow_type))
    assert got.tolist() == [ref_str(s) for s in strs]


def test_strings_all_input_kinds_agree():
    strs = random_unicode(np.random.default_rng(2), 120)
    expected = [ref_str(s) for s in strs]
    assert hash_values(pd.Series(strs, dtype="str")).tolist() == expected
    assert hash_values(pd.Series(strs, dtype=object)).tolist() == expected
    assert hash_values(np.array(strs, dtype=object)).tolist() == expected
    assert hash_values(pa.chunked_array([strs[:50], strs[50:]])).tolist() == expected


def test_sliced_string_array_uses_its_offset():
    strs = random_unicode(np.random.default_rng(3), 50)
    arr = pa.array(strs).slice(7, 20)
    assert hash_values(arr).tolist() == [ref_str(s) for s in strs[7:27]]


def test_binary_hashes_like_its_bytes():
    data = [b"", b"\x00\xff", b"abc"]
    assert hash_values(pa.array(data, pa.binary())).tolist() == [fnv1a64(b) for b in data]


def test_empty_inputs():
    assert hash_values(pa.array([], pa.string())).shape == (0,)
    assert hash_values(pa.array([], pa.int64())).shape == (0,)
    assert hash_values(pa.array([""] * 4)).tolist() == [0xCBF29CE484222325] * 4


# ---- integers, floats, booleans -------------------------------------------------------------
def test_ints_are_fnv_of_int64_little_endian():
    rng = np.random.default_rng(4)
    vals = rng.integers(-(2**63), 2**63 - 1, 500, dtype=np.int64, endpoint=True).tolist()
    vals += [0, 1, -1, 255, 256, -256, 2**31, -(2**31) - 1, -(2**63), 2**63 - 1]
    expected = [ref_int(v) for v in vals]
    assert hash_values(np.array(vals, np.int64)).tolist() == expected
    assert hash_values(pa.array(vals, pa.int64())).tolist() == expected
    assert hash_values(pd.Series(vals, dtype="Int64")).tolist() == expected


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.uint8, np.uint16, np.uint32])
def test_narrow_ints_hash_as_int64(dtype):
    info = np.iinfo(dtype)
    vals = np.array([info.min, 0, 1, info.max], dtype=dtype)
    assert hash_values(vals).tolist() == [ref_int(int(v)) for v in vals]


def test_integral_floats_hash_like_ints():
    ints = [0, 1, -1, 3, -7, 2**40, -(2**52)]
    floats = np.array(ints, dtype=np.float64)
    assert hash_values(floats).tolist() == hash_values(np.array(ints)).tolist()
    assert hash_values(floats.astype(np.float32)).tolist() == [ref_int(v) for v in ints]
    assert hash_values(np.array([-0.0])).tolist() == [ref_int(0)]


def test_non_integral_floats_hash_their_float64_bits():
    vals = [0.5, -2.25, 1e300, -1e-300, float(2**63), float("inf"), float("-inf")]
    assert hash_values(np.array(vals)).tolist() == [ref_float(v) for v in vals]


def test_booleans_hash_like_ints():
    assert hash_values(pa.array([True, False])).tolist() == [ref_int(1), ref_int(0)]


# ---- dictionary arrays and nulls ------------------------------------------------------------
def test_dictionary_arrays_hash_like_decoded_values():
    rng = np.random.default_rng(5)
    strs = random_unicode(rng, 30)
    values = [strs[i] if rng.random() > 0.2 else None for i in rng.integers(0, 30, 400)]
    plain = pa.array(values, pa.string())
    enc = plain.dictionary_encode()
    assert pa.types.is_dictionary(enc.type)
    assert hash_values(enc).tolist() == hash_values(plain).tolist()
    assert hash_values(enc.slice(11, 100)).tolist() == hash_values(plain.slice(11, 100)).tolist()
    ints = pa.array([5, None, -3, 5, 2**40], pa.int64())
    assert hash_values(ints.dictionary_encode()).tolist() == hash_values(ints).tolist()
    # A dictionary listing values no row uses (as parquet / categoricals produce) changes nothing.
    wide = pa.DictionaryArray.from_arrays(pa.array([2, 0, None], pa.int32()), pa.array(["u", "v", "w"]))
    assert hash_values(wide).tolist() == [ref_str("w"), ref_str("u"), int(null_hash())]


def test_null_hash_is_stable_and_shared_by_every_type():
    expected = fnv1a64(b"\xff" * 9)
    assert expected == 0x2804DDDE49E161A6
    assert int(null_hash()) == expected
    for arr in (
        pa.array(["a", None]),
        pa.array([1, None], pa.int64()),
        pa.array([1.5, None]),
        pa.array(["a", None]).dictionary_encode(),
        pd.Series(["a", None], dtype="str"),
        pd.Series([1, None], dtype="Int64"),
        np.array([1.5, np.nan]),
    ):
        h = hash_values(arr)
        assert int(h[1]) == expected, arr
        assert int(h[0]) != expected


# ---- crosses and buckets --------------------------------------------------------------------
def test_combine_hashes_reference():
    a = ["x", "y", None, "x"]
    b = [1, 2, 3, None]
    ha, hb = hash_values(pa.array(a)), hash_values(pa.array(b, pa.int64()))
    got = combine_hashes([ha, hb])
    for k in range(4):
        h = 0xCBF29CE484222325
        for part in (int(ha[k]), int(hb[k])):
            h = ((h ^ part) * 0x100000001B3) & MASK
        assert int(got[k]) == h
    assert combine_hashes([hb, ha]).tolist() != got.tolist()  # column order matters


# value -> hash % 1000, computed once with the pure-Python reference; a change here changes every
# HashBucket / HashedCross / Categorify(num_buckets) id users have trained on.
STRING_BUCKETS = {"": 37, "a": 996, "foobar": 968, "criteo": 181, "68fd1e64": 461, "é": 617, "日本語": 911,
                  "🙂": 947}
INT_BUCKETS = {0: 405, 1: 996, -1: 757, 42: 255, 2**31: 109, -(2**63): 397, 2**63 - 1: 765}
FLOAT_BUCKETS = {0.5: 944, -2.25: 607, 1e300: 99}


def test_fixed_bucket_vectors():
    s = list(STRING_BUCKETS)
    assert (hash_values(pa.array(s)) % np.uint64(1000)).tolist() == list(STRING_BUCKETS.values())
    i = list(INT_BUCKETS)
    assert (hash_values(np.array(i, np.int64)) % np.uint64(1000)).tolist() == list(INT_BUCKETS.values())
    f = list(FLOAT_BUCKETS)
    assert (hash_values(np.array(f)) % np.uint64(1000)).tolist() == list(FLOAT_BUCKETS.values())
    assert int(null_hash()) % 1000 == 638
