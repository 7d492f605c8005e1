"""A stable, documented hash for HashBucket, HashedCross and Categorify's OOV buckets.

The hash is 64-bit FNV-1a (offset basis 0xcbf29ce484222325, prime 0x100000001b3) over:

- strings: their UTF-8 bytes;
- integers (and booleans): the 8 bytes of the value as little-endian int64 (two's complement);
- floats: the 8 bytes of the value as little-endian float64 (an integral float hashes as its
  integer, so ``3`` and ``3.0`` land in the same bucket whichever dtype a file was read with);
- null (and a float NaN): the 8 bytes of ``0xffffffffffffffff`` prefixed with the byte 0xff (distinct from any value).

A bucket is ``hash % num_buckets``. Crosses combine per-column hashes with
``h = (h ^ h_col) * prime`` starting from the offset basis, in column order. Only numpy (or cupy)
integer arithmetic is used, so the value is the same on CPU and GPU, across runs, platforms and
library versions. Known vectors (tests check them): ``fnv1a64(b"") == 0xcbf29ce484222325``,
``fnv1a64(b"a") == 0xaf63dc4c8601ec8c``, ``fnv1a64(b"foobar") == 0x85944171f73967e8``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctrflow.etl.dispatch import nan_to_null

OFFSET = np.uint64(0xCBF29CE484222325)
PRIME = np.uint64(0x100000001B3)
_NULL_HASH: np.uint64 | None = None


def fnv1a64(data: bytes) -> int:
    """Reference FNV-1a 64 of one byte string (pure Python; for docs and tests)."""
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def _hash_byte_matrix(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """FNV-1a of many byte strings stored back to back in ``data``; loops over byte positions."""
    h = np.full(len(starts), OFFSET, dtype=np.uint64)
    if len(starts) == 0:
        return h
    order = np.argsort(-lengths, kind="stable")  # longest first: rows still active are a prefix
    neg_len = -lengths[order]
    start = starts[order]
    hs = h[order]
    with np.errstate(over="ignore"):
        for j in range(int(-neg_len[0])):
            n = int(np.searchsorted(neg_len, -j, side="left"))  # rows longer than j bytes
            hs[:n] = (hs[:n] ^ data[start[:n] + j].astype(np.uint64)) * PRIME
    h[order] = hs
    return h


def _hash_int64(values: np.ndarray) -> np.ndarray:
    """FNV-1a over the 8 little-endian bytes of each int64 / float64 bit pattern."""
    v = values.view(np.uint64) if values.dtype.itemsize == 8 else values.astype(np.int64).view(np.uint64)
    h = np.full(v.shape, OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(8):
            h = (h ^ ((v >> np.uint64(8 * k)) & np.uint64(0xFF))) * PRIME
    return h


def null_hash() -> np.uint64:
    global _NULL_HASH
    if _NULL_HASH is None:
        _NULL_HASH = np.uint64(fnv1a64(b"\xff" + b"\xff" * 8))
    return _NULL_HASH


def hash_values(values: Any) -> np.ndarray:
    """Stable 64-bit hashes of an arrow array, numpy array or pandas Series.

    Args:
        values: [N] strings, integers, floats or booleans (nulls allowed).

    Returns:
        [N] uint64 hashes (numpy).
    """
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, from_pandas=True)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = nan_to_null(arr)  # a float NaN is a missing value, as in pandas
    if pa.types.is_dictionary(arr.type):
        codes = arr.indices.fill_null(-1).to_numpy(zero_copy_only=False)
        dict_hash = np.append(hash_values(arr.dictionary), null_hash())
        return dict_hash[codes]
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        h = _hash_strings(arr)
    elif pa.types.is_floating(t):
        f = arr.cast(pa.float64()).fill_null(0).to_numpy(zero_copy_only=False)
        integral = np.isfinite(f) & (np.floor(f) == f) & (np.abs(f) < 2**63)
        h = np.where(integral, _hash_int64(np.where(integral, f, 0).astype(np.int64)), _hash_int64(f))
    elif pa.types.is_integer(t) or pa.types.is_boolean(t):
        h = _hash_int64(arr.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False))
    else:
        h = _hash_strings(arr.cast(pa.string()))
    if arr.null_count:
        h = np.where(arr.is_valid().to_numpy(zero_copy_only=False), h, null_hash())
    return h


def _hash_strings(arr: pa.Array) -> np.ndarray:
    if pa.types.is_string(arr.type) or pa.types.is_binary(arr.type):
        arr = arr.cast(pa.large_binary())
    elif pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.large_binary())
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    lengths = pc.binary_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    return _hash_byte_matrix(data, offsets[:-1], lengths)


def combine_hashes(hashes: list[np.ndarray]) -> np.ndarray:
    """Combine per-column hashes (column order matters) into one hash per row."""
    h = np.full(hashes[0].shape, OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for hc in hashes:
            h = (h ^ hc) * PRIME
    return h
