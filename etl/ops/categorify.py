"""Categorify: map categorical values to contiguous integer ids (NVTabular 23.08's encoding).

Ids: 0 = padding, 1 = null, 2 = out-of-vocabulary or below ``freq_threshold`` (or, with
``num_buckets``, OOV values hash into ``num_buckets`` ids 2 .. 2 + num_buckets - 1), then the kept
values in descending frequency, ties broken by ascending value. Cardinality = first kept id + kept.

Example:
    >>> import pandas as pd
    >>> from ctrflow.etl import Dataset, Workflow
    >>> df = pd.DataFrame({"c": ["a", "a", "a", "b", "b", "c", "d", None]})
    >>> wf = Workflow(["c"] >> Categorify(freq_threshold=2))
    >>> wf.fit_transform(Dataset(df)).compute()["c"].tolist()
    [3, 3, 3, 4, 4, 2, 2, 1]
"""

from __future__ import annotations

import functools
import itertools
import threading
import warnings
from collections.abc import Callable
from typing import Any

import dask
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctrflow.etl import dispatch, lists
from ctrflow.etl.hashing import hash_values
from ctrflow.etl.ops.base import Operator, host_arrow
from ctrflow.etl.ops.counts import (
    array_key,
    lookup_values,
    merge_counts,
    merge_counts_into,
    partial_counts,
    plain_values,
    resolve_counts,
    tail_counts,
)
from ctrflow.etl.schema import embedding_dim, id_dtype
from ctrflow.etl.stats import tree_reduce

PAD, NULL, OOV = 0, 1, 2
_LUT_LOCK = threading.Lock()  # guards Categorify._lut_cache and _LUT_PENDING
_LUT_PENDING: dict[tuple, threading.Event] = {}  # (op id, dictionary key) -> set when its LUT is built
LUT_CACHE_MIN = 4096  # dictionaries at least this long get their id lookup table cached (Categorify._lut)


class Categorify(Operator):
    """Encode categorical columns as ids.

    Args:
        freq_threshold: keep values seen at least this many times in the fit data (0 or 1 keeps all).
        max_size: NVTabular's cap on the whole cardinality, reserved ids included: keeps the
            ``max_size - 2 - (num_buckets or 1)`` most frequent values; 0 = no limit. Unlike
            NVTabular, it may be combined with ``freq_threshold`` (both apply).
        num_buckets: hash OOV values into this many ids instead of the single id 2.
        encode_type: ``"column"`` (one vocabulary per column) or ``"joint"``: all input columns share
            one vocabulary (NVTabular's joint encoding; e.g. ``item_id`` and ``hist_items``), so the
            same value gets the same id in each and a model may share one embedding table.
        vocabulary: name of the joint vocabulary (implies ``encode_type="joint"``; default: the
            input names joined by ``_``); the schema's ``vocabulary`` field of every column.

    List columns (``list<T>``) are encoded element-wise with the same ids (null lists become
    empty, null elements id 1); values are counted once per element occurrence.
    """

    output_kind = "categorical"

    def __init__(self, freq_threshold: int = 0, max_size: int = 0, num_buckets: int | None = None,
                 encode_type: str = "column", vocabulary: str | None = None) -> None:
        if encode_type not in ("column", "joint"):
            raise ValueError(f"Categorify encode_type must be 'column' or 'joint', got {encode_type!r}")
        self.encode_type = "joint" if vocabulary else encode_type
        self.vocabulary = vocabulary
        if freq_threshold < 0 or max_size < 0:
            raise ValueError("freq_threshold and max_size must be >= 0")
        if num_buckets is not None and num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
        self.freq_threshold = int(freq_threshold)
        self.max_size = int(max_size)
        self.num_buckets = num_buckets
        if self.max_size and self.max_size < self.first_kept_id:
            raise ValueError(f"Categorify max_size={max_size} is below the {self.first_kept_id} reserved ids "
                             f"(padding, null, {num_buckets or 1} OOV): use max_size >= {self.first_kept_id}")
        self.stats: dict[str, dict[str, Any]] | None = None
        self.vocabs: dict[str, pa.Table] = {}
        self._lookup: dict[str, pa.Array] = {}
        self._lut_cache: dict[tuple, tuple[pa.Array, pa.Array, np.ndarray]] = {}  # see _lut
        self.tails: dict[str, pa.Table] = {}  # counts of seen values not kept, for Workflow.update

    def params(self) -> dict[str, Any]:
        return {"freq_threshold": self.freq_threshold, "max_size": self.max_size, "num_buckets": self.num_buckets,
                "encode_type": self.encode_type, "vocabulary": self.vocabulary}

    @property
    def first_kept_id(self) -> int:
        return OOV + (self.num_buckets or 1)

    @property
    def keep_threshold(self) -> int:
        """The count a value needs to be kept: ``freq_threshold``, where 0 and 1 both keep every value seen."""
        return max(self.freq_threshold, 1)

    # ---- fit ------------------------------------------------------------------------------
    def fit(self, columns: list[str], ddf: Any) -> Any:
        merged = tree_reduce(ddf[columns], lambda df: {c: partial_counts(df[c]) for c in columns}, merge_counts)
        return dask.delayed(resolve_counts)(merged)  # by-index partials -> the public {"table": ...} form

    def fit_finalize(self, computed: dict[str, dict[str, Any]]) -> None:
        self.stats, self.vocabs, self.tails = {}, {}, {}
        joint = None
        if self.encode_type == "joint":  # one count table over every column's values
            joint = self.vocabulary or "_".join(computed)
            per_column = computed
            computed = merge_counts([{joint: vc} for vc in per_column.values()])

        def vocabulary(counts: pa.Table) -> tuple[pa.Table, pa.Table]:
            keep = counts.filter(pc.greater_equal(counts["count"], self.keep_threshold))
            keep = keep.sort_by([("count", "descending"), ("value", "ascending")])
            if self.max_size:
                keep = keep.slice(0, self.max_size - self.first_kept_id)
            return keep.combine_chunks(), tail_counts(counts, keep, self.keep_threshold)

        # one sort per column, on a thread each (arrow's sort releases the GIL): the serial end of fit
        built = dispatch.thread_map(vocabulary, [vc["table"] for vc in computed.values()])
        for (col, vc), (keep, tail) in zip(computed.items(), built, strict=True):
            counts = vc["table"]
            self.vocabs[col] = keep
            self.tails[col] = tail
            kept_rows = pc.sum(keep["count"]).as_py() or 0
            self.stats[col] = {
                "kept": keep.num_rows,
                "distinct": counts.num_rows,
                "rows": int(vc["rows"]),
                "nulls": int(vc["nulls"]),
                "oov_rows": int(vc["rows"] - vc["nulls"] - kept_rows),
                **({"max_length": int(vc["max_length"])} if "max_length" in vc else {}),
            }
        if joint is not None:
            shared = {k: v for k, v in self.stats.pop(joint).items() if k != "max_length"}
            for col, vc in per_column.items():  # kept / distinct / oov_rows are the shared vocabulary's
                self.stats[col] = {**shared, "vocabulary": joint, "rows": int(vc["rows"]), "nulls": int(vc["nulls"]),
                                   **({"max_length": int(vc["max_length"])} if "max_length" in vc else {})}
        self._lookup = {}
        if joint is None:  # ids of a dictionary the fit partitions shared, built now, a column per thread
            shared_dicts = [(c, vc["dictionary"]) for c, vc in computed.items()
                            if "dictionary" in vc and len(vc["dictionary"]) >= LUT_CACHE_MIN]
            dispatch.thread_map(lambda cd: self._lut(cd[0], cd[1], id_dtype(self.cardinality(cd[0]))), shared_dicts)

    def update_finalize(self, computed: dict[str, dict[str, Any]], decay: float | None = None) -> None:
        """Merge new value counts (``Workflow.update``): kept values keep their ids, values whose count
        newly reaches ``freq_threshold`` are appended, decayed ones retired (:mod:`ctrflow.etl.update`)."""
        room = self.max_size - self.first_kept_id if self.max_size else None
        if self.encode_type == "joint":  # one vocabulary for every column, as in fit
            key = self.vocabulary or "_".join(computed)
            groups = {key: (merge_counts([{key: vc} for vc in computed.values()])[key], list(computed))}
        else:
            groups = {col: (vc, [col]) for col, vc in computed.items()}
        for key, (new, cols) in groups.items():
            dims = {c: self.stats[c].get("embedding_dim") or embedding_dim(self.cardinality(c)) for c in cols}
            if key not in self.tails and self.stats[cols[0]].get("distinct", 0) > self.vocabs[key].num_rows:
                warnings.warn(f"Categorify {key!r}: the workflow holds no counts of its values below freq_threshold "
                              "(saved by an older ctrflow); they restart from zero", stacklevel=2)
            vocab, tail, appended = merge_counts_into(self.vocabs[key], self.tails.get(key), new["table"],
                                                      self.keep_threshold, room, decay)
            self.vocabs[key], self.tails[key] = vocab, tail
            active = vocab.filter(pc.invert(vocab["retired"])) if "retired" in vocab.column_names else vocab
            active_rows = pc.sum(active["count"]).as_py() or 0
            for c in cols:
                old = self.stats[c]
                rows, nulls = old["rows"] + int(computed[c]["rows"]), old["nulls"] + int(computed[c]["nulls"])
                self.stats[c] = {
                    **old, "kept": vocab.num_rows, "distinct": vocab.num_rows + tail.num_rows, "rows": rows,
                    "nulls": nulls, "oov_rows": max(0, int(rows - nulls - active_rows)),
                    "embedding_dim": int(dims[c]),  # pinned: the first fit's dim, whatever the cardinality now
                    "appended": appended, "retired": vocab.num_rows - active.num_rows,
                    "updates": old.get("updates", 0) + 1,
                }
                if "max_length" in computed[c]:
                    self.stats[c]["max_length"] = max(old.get("max_length", 0), int(computed[c]["max_length"]))
        self._lookup = {}

    def cardinality(self, column: str) -> int | None:
        if self.stats is None or column not in self.stats:
            return None
        return self.first_kept_id + self.stats[column]["kept"]

    def column_info(self, column: str) -> dict[str, Any]:
        info = super().column_info(column)
        stats = (self.stats or {}).get(column, {})
        if stats.get("vocabulary"):
            info["vocabulary"] = stats["vocabulary"]
        if "max_length" in stats:  # fitted on a list column (the workflow's schema marks it "list")
            info["max_length"] = stats["max_length"]
        return info

    def _vocab_key(self, column: str) -> str:
        """The vocabulary a column's ids come from: its own, or the joint one."""
        return (self.stats or {}).get(column, {}).get("vocabulary") or column

    # ---- transform ------------------------------------------------------------------------
    def transform(self, columns: list[str], df: Any) -> Any:
        self._require_fitted()
        out = {}
        for col in columns:
            dtype = id_dtype(self.cardinality(col))
            series = df[col]  # one lookup: pandas column access is not free on wide frames
            if lists.is_list_series(series):  # element-wise on the flat values, offsets kept
                out[col] = lists.map_values(series, functools.partial(self._encode, col, dtype),
                                            pa.from_numpy_dtype(dtype), col)
                continue
            codes, uniques = dispatch.factorize(series)
            ids = self._lut(col, uniques, dtype)[codes]
            out[col] = dispatch.series_like(series, ids, name=col)
        return dispatch.frame_from_columns(df, out)

    def _encode(self, col: str, dtype: str, flat: pa.Array, index: ValueIndex | None = None) -> np.ndarray:
        """Ids [M] of the values [M] of an arrow array (a list column's flat elements; nulls -> 1)."""
        codes, uniques = dispatch.factorize_arrow(flat)
        return np.append(self._ids_of(col, uniques, index), NULL).astype(dtype)[codes]

    def array_transform(self, columns: list[str]) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """:meth:`transform` on host columns, each vocabulary's :class:`ValueIndex` built now (once)."""
        self._require_fitted()
        indexes: dict[str, ValueIndex] = {}
        plan = []
        for col in columns:
            key = self._vocab_key(col)
            if key not in indexes:
                indexes[key] = ValueIndex(self._vocab_values(key))
            plan.append((col, id_dtype(self.cardinality(col)), indexes[key]))

        def run(arrays: dict[str, Any]) -> dict[str, Any]:
            out = {}
            for col, dtype, index in plan:
                arr = host_arrow(arrays[col])
                if lists.is_list_type(arr.type):  # as lists.map_values: the flat values, offsets kept
                    offsets, flat = lists.flatten(lists.list_array(arr))
                    ids = self._encode(col, dtype, flat, index)
                    out[col] = lists.from_flat(offsets, ids, pa.from_numpy_dtype(dtype))
                else:  # = transform's factorize + _lut (the same ids whichever way the positions are found)
                    out[col] = self._encode(col, dtype, arr, index)
            return out

        return run

    def _lut(self, col: str, uniques: pa.Array, dtype: str) -> np.ndarray:
        """Ids [len(uniques) + 1] of a partition's distinct values, the last entry for code -1 (null).

        Cached per dictionary: partitions held in memory share one dictionary per column
        (``readers.share_dictionaries``), so the vocabulary lookup runs once per column, not once per
        partition. An entry keeps its dictionary alive (its buffer addresses are the key, so they
        cannot be reused by another array) and is dropped when the vocabulary changes.
        """
        if len(uniques) < LUT_CACHE_MIN:  # cheap to rebuild; keeps meta / small dictionaries out of the cache
            return np.append(self._ids_of(col, uniques), NULL).astype(dtype)  # code -1 (null) -> last entry
        key = (col, dtype, array_key(uniques))
        hit = self._cached_lut(col, key)
        if hit is not None:
            return hit
        # Partitions sharing a dictionary start together: one thread builds its LUT, the others wait
        # for it (only for that key: different dictionaries still build in parallel).
        with _LUT_LOCK:
            hit = self._cached_lut(col, key)
            if hit is not None:
                return hit
            pending = _LUT_PENDING.get((id(self), key))
            if pending is None:
                mine = _LUT_PENDING[(id(self), key)] = threading.Event()
        if pending is not None:
            pending.wait()
            hit = self._cached_lut(col, key)
            return hit if hit is not None else np.append(self._ids_of(col, uniques), NULL).astype(dtype)
        try:
            lut = np.append(self._ids_of(col, uniques), NULL).astype(dtype)
            with _LUT_LOCK:
                same_col = [k for k in self._lut_cache if k[0] == col]
                if len(same_col) >= 2:  # e.g. the train and valid dictionaries; streamed partitions bring one each
                    self._lut_cache.pop(same_col[0], None)
                self._lut_cache[key] = (self._lookup[self._vocab_key(col)], uniques, lut)
        finally:
            with _LUT_LOCK:
                _LUT_PENDING.pop((id(self), key), None)
            mine.set()
        return lut

    def _cached_lut(self, col: str, key: tuple) -> np.ndarray | None:
        hit = self._lut_cache.get(key)
        if hit is not None and hit[0] is self._lookup.get(self._vocab_key(col)):  # vocabulary unchanged
            return hit[2]
        return None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_lut_cache": {}}  # process-local (keyed by buffer addresses)

    def _vocab_values(self, key: str) -> pa.Array:
        """The vocabulary ``key``'s values in id order (retired ones null), built once per vocabulary."""
        vocab = self._lookup.get(key)
        if vocab is None:
            vocab = self._lookup[key] = lookup_values(self.vocabs[key])  # retired values (decay) -> OOV
        return vocab

    def _ids_of(self, col: str, uniques: pa.Array, index: ValueIndex | None = None) -> np.ndarray:
        """Ids of distinct values: vocabulary position + first kept id, or the OOV id(s).

        ``index`` (serving): a :class:`ValueIndex` of the vocabulary, kept between calls, finds the
        positions instead of ``pyarrow.compute.index_in`` (which hashes the whole vocabulary per call).
        """
        col = self._vocab_key(col)
        vocab = self._vocab_values(col)
        if len(uniques) == 0:  # e.g. Dask's meta: index_in would still hash the whole vocabulary
            return np.zeros(0, np.int64)
        uniques = _align_type(uniques, vocab.type)
        if index is not None and index.serves(vocab, uniques):
            pos = index.positions(uniques)
            found = pos >= 0
            ids = np.where(found, pos, 0) + self.first_kept_id
        else:
            pos = pc.index_in(uniques, value_set=vocab)
            found = pos.is_valid().to_numpy(zero_copy_only=False)
            ids = pos.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64) + self.first_kept_id
        if self.num_buckets:
            oov = OOV + hash_values(uniques) % np.uint64(self.num_buckets)
            return np.where(found, ids, oov.astype(np.int64))
        return np.where(found, ids, OOV)

    # ---- persistence ----------------------------------------------------------------------
    def get_state(self) -> tuple[dict[str, Any], dict[str, pa.Table]]:
        if self.stats is None:
            return {}, {}
        tails = {f"tail/{c}": t for c, t in self.tails.items() if t.num_rows}  # empty when every value is kept
        return {"stats": self.stats}, {**{f"categories/{c}": t for c, t in self.vocabs.items()}, **tails}

    def set_state(self, state: dict[str, Any], tables: dict[str, pa.Table]) -> None:
        self.stats = state.get("stats")
        self.vocabs = {k.split("/", 1)[1]: t for k, t in tables.items() if k.startswith("categories/")}
        self.tails = {k.split("/", 1)[1]: t for k, t in tables.items() if k.startswith("tail/")}
        self._lookup = {}


def _align_type(uniques: pa.Array, target: pa.DataType) -> pa.Array:
    uniques = plain_values(uniques)
    if uniques.type == target:
        return uniques
    try:
        return uniques.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return uniques.cast(pa.string()) if pa.types.is_string(target) else uniques


class ValueIndex:
    """Positions of values in a vocabulary through a hash map kept between calls (serving: a request's
    few distinct values cost a dictionary lookup each, not a hash of the whole vocabulary).

    Holds string and integer vocabularies (a Python dict: about 100 bytes per value); others, and a
    vocabulary whose values repeat, keep ``pyarrow.compute.index_in`` (``serves`` is False).
    Same answers as ``index_in``: the first position of an equal value, retired (null) entries never match.

    Args:
        vocab: the vocabulary's values in id order (``Categorify._vocab_values``).
    """

    def __init__(self, vocab: pa.Array) -> None:
        self.vocab = vocab
        self.type = vocab.type
        self.map: dict[Any, int] | None = None
        if pa.types.is_string(vocab.type) or pa.types.is_integer(vocab.type):
            values = vocab.to_pylist()
            n = len(values)
            found = dict(zip(reversed(values), range(n - 1, -1, -1), strict=True))  # the first position wins
            found.pop(None, None)  # retired values: OOV
            self.map = found

    def serves(self, vocab: pa.Array, uniques: pa.Array) -> bool:
        """Whether this index answers for ``vocab`` (unchanged since it was built) and ``uniques``' type."""
        return self.map is not None and vocab is self.vocab and uniques.type == self.type and not uniques.null_count

    def positions(self, uniques: pa.Array) -> np.ndarray:
        """Positions [N] (int64, -1 where absent) of distinct non-null values [N]."""
        keys = uniques.to_numpy(zero_copy_only=False) if pa.types.is_string(self.type) else uniques.to_pylist()
        return np.fromiter(map(self.map.get, keys, itertools.repeat(-1)), np.int64, len(keys))
