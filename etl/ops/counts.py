"""Value counts of categorical columns: per-partition partials, their merges, and vocabulary merges.

``Categorify.fit`` reduces partitions with ``partial_counts`` / ``merge_counts`` (``stats.tree_reduce``);
``Categorify.update_finalize`` folds a new day's counts into the fitted vocabulary with
``merge_counts_into`` (ids kept, newly frequent values appended, stale ones retired; see
:mod:`ctrflow.etl.update` for the semantics).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctrflow.etl import dispatch, lists

PRUNE = 0.01  # with decay: forget tail values whose decayed count is below this


def value_counts(series: Any) -> dict[str, Any]:
    """Counts of the distinct non-null values (list columns: elements) of one partition's column."""
    if lists.is_list_series(series):  # one hash pass over the flat elements (no codes array)
        offsets, flat = lists.flatten(lists.list_array(series))
        flat = dispatch.nan_to_null(flat.dictionary_decode() if pa.types.is_dictionary(flat.type) else flat)
        vc = pc.value_counts(flat)
        values, counts = vc.field("values"), vc.field("counts")
        if flat.null_count:
            keep = values.is_valid()
            values, counts = values.filter(keep), counts.filter(keep)
        table = pa.table({"value": plain_values(values), "count": counts.cast(pa.int64())})
        lens = np.diff(offsets)
        return {"table": table, "rows": len(flat), "nulls": flat.null_count,
                "max_length": int(lens.max()) if lens.size else 0}
    return resolve_counts({"c": partial_counts(series)})["c"]


def partial_counts(series: Any) -> dict[str, Any]:
    """One partition's counts in the form ``merge_counts`` adds up fastest.

    Non-list columns give ``{"by_index": (uniques, positions, counts), ...}``: the counts of the
    dictionary entries seen in the partition (positions ascending). Partitions that share a
    dictionary (in-memory datasets, see ``readers.share_dictionaries``) then merge by adding counts
    per position instead of hashing values, and no partial is larger than its partition's distinct
    values; ``resolve_counts`` turns the result into the public ``{"table": ...}`` form.
    """
    if lists.is_list_series(series):
        return value_counts(series)
    codes, uniques = dispatch.factorize(series)
    # slot 0 counts code -1 (null): no mask, no filtered copy; intp as bincount wants (no int8 overflow)
    both = np.bincount(np.add(codes, 1, dtype=np.intp), minlength=len(uniques) + 1)
    pos = np.flatnonzero(both[1:])
    return {"by_index": (uniques, pos, both[1:][pos].astype(np.int64)), "rows": int(codes.size),
            "nulls": int(both[0])}


def _indexed_table(by_index: tuple[pa.Array, np.ndarray, np.ndarray]) -> pa.Table:
    uniques, pos, counts = by_index
    values = uniques if len(pos) == len(uniques) else uniques.take(pa.array(pos))
    return pa.table({"value": plain_values(values), "count": pa.array(counts, pa.int64())})


def resolve_counts(computed: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Partials of ``partial_counts`` / ``merge_counts`` -> ``{"table": (value, count), "rows", "nulls"}``
    (plus ``"dictionary"``: the dictionary every counted partition shared, for ``fit_finalize``)."""
    out = {}
    for col, vc in computed.items():
        vc = dict(vc)
        if "by_index" in vc:
            vc["dictionary"] = vc["by_index"][0]
            vc["table"] = _indexed_table(vc.pop("by_index"))
        out[col] = vc
    return out


def array_key(arr: pa.Array) -> tuple:
    """Identity of an arrow array's memory (equal keys of two live arrays = the same data)."""
    return (str(arr.type), len(arr), arr.offset, tuple(b.address if b is not None else 0 for b in arr.buffers()))


def merge_counts(partials: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Add up several partitions' value counts, column by column.

    Partials over one shared dictionary add their count arrays; others are hashed together (one
    group-by per column).
    """
    out = {}
    for col in partials[0]:
        indexed = [p[col].get("by_index") for p in partials]
        if all(d is not None for d in indexed) and len({array_key(d[0]) for d in indexed}) == 1:
            uniques = indexed[0][0]  # one shared dictionary: add the counts position by position
            total = np.bincount(np.concatenate([d[1] for d in indexed]),
                                weights=np.concatenate([d[2] for d in indexed]), minlength=len(uniques))
            pos = np.flatnonzero(total)  # float64 sums of counts: exact below 2**53 rows
            out[col] = {"by_index": (uniques, pos, total[pos].astype(np.int64)),
                        "rows": sum(p[col]["rows"] for p in partials),
                        "nulls": sum(p[col]["nulls"] for p in partials)}
            continue
        tables = [p[col]["table"] if "table" in p[col] else _indexed_table(p[col]["by_index"]) for p in partials]
        tables = [t for t in tables if t.num_rows] or tables[:1]
        if len(tables) > 1:
            vtype = functools.reduce(common_type, [t.schema.field("value").type for t in tables])
            schema = pa.schema([("value", vtype), ("count", pa.int64())])
            merged = pa.concat_tables([t.cast(schema) for t in tables]).group_by("value").aggregate([("count", "sum")])
            merged = merged.rename_columns(["value", "count"]).select(["value", "count"])
        else:
            merged = tables[0]
        out[col] = {"table": merged, "rows": sum(p[col]["rows"] for p in partials),
                    "nulls": sum(p[col]["nulls"] for p in partials)}
        if any("max_length" in p[col] for p in partials):  # list columns
            out[col]["max_length"] = max(p[col].get("max_length", 0) for p in partials)
    return out


def plain_values(arr: pa.Array) -> pa.Array:
    """Values as a plain (non-dictionary, non-large) arrow array."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    return arr


def common_type(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    """A value type both partitions' values cast to (ints and floats -> float64, else string)."""
    if a == b or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    def is_num(t: pa.DataType) -> bool:
        return pa.types.is_integer(t) or pa.types.is_floating(t)

    if is_num(a) and is_num(b):
        return pa.float64() if pa.types.is_floating(a) or pa.types.is_floating(b) else pa.int64()
    return pa.string()


# ---- Workflow.update: fold new counts into a fitted vocabulary --------------------------------------
def merge_counts_into(vocab: pa.Table, tail: pa.Table | None, new: pa.Table, threshold: float,
                      room: int | None, decay: float | None) -> tuple[pa.Table, pa.Table, int]:
    """Fold new value counts into a vocabulary (id order) and its below-threshold tail.

    Args:
        vocab: ``value, count[, retired]`` in id order (row i has id first_kept_id + i).
        tail: ``value, count`` of seen values not in ``vocab`` (None: unknown, counted from zero).
        new: ``value, count`` of the new data.
        threshold: counts needed to be (or stay) kept.
        room: most rows the vocabulary may hold (None: no cap).
        decay: factor applied to the stored counts first.

    Returns:
        ``(vocab, tail, appended)``: the vocabulary with the same first rows (updated counts, a
        ``retired`` column when any value is retired) plus the appended values, the new tail, and
        how many values were appended.
    """
    tail = tail if tail is not None else new.schema.empty_table().select(["value", "count"])
    types = [t.schema.field("value").type for t in (vocab, tail, new) if t.num_rows]
    vtype = functools.reduce(common_type, types) if types else vocab.schema.field("value").type
    float_counts = decay is not None or pa.types.is_floating(vocab.schema.field("count").type)
    ctype = pa.float64() if float_counts else pa.int64()

    def norm(t: pa.Table, scale: float | None) -> pa.Table:
        counts = t["count"].cast(ctype)
        if scale is not None:
            counts = pc.multiply(counts, scale)
        return pa.table({"value": plain_values(t["value"].combine_chunks()).cast(vtype), "count": counts})

    vals = norm(vocab, decay)
    tail, new = norm(tail, decay), norm(new, None)
    counts = vals["count"].to_numpy().copy()
    pos = pc.index_in(new["value"], value_set=vals["value"].combine_chunks())
    found = pos.is_valid()
    idx = pos.filter(found).to_numpy()
    counts[idx] += new["count"].filter(found).to_numpy()  # new values are distinct: no duplicate positions
    rest = new.filter(pc.invert(found))
    merged = pa.concat_tables([tail, rest]).group_by("value").aggregate([("count", "sum")])
    merged = merged.rename_columns(["value", "count"]).select(["value", "count"])
    merged = merged.sort_by([("count", "descending"), ("value", "ascending")])
    passing = int(pc.sum(pc.greater_equal(merged["count"], threshold)).as_py() or 0)
    take = passing if room is None else max(0, min(passing, room - vals.num_rows))
    appended, tail = merged.slice(0, take), merged.slice(take)
    if decay is not None:
        tail = tail.filter(pc.greater_equal(tail["count"], PRUNE))
    counts = np.concatenate([counts, appended["count"].to_numpy()])
    out = {"value": pa.concat_arrays([vals["value"].combine_chunks(), appended["value"].combine_chunks()]),
           "count": pa.array(counts, ctype)}
    retired = counts < threshold
    if retired.any() or "retired" in vocab.column_names:
        out["retired"] = pa.array(retired)
    return pa.table(out), tail.combine_chunks(), take


def tail_counts(counts: pa.Table, keep: pa.Table, threshold: float) -> pa.Table:
    """The seen values a fresh fit did not keep (below ``threshold``, or cut by ``max_size``)."""
    below = pc.less(counts["count"], threshold)
    if keep.num_rows + int(pc.sum(below).as_py() or 0) == counts.num_rows:  # no max_size cut: cheap path
        return counts.filter(below).select(["value", "count"]).combine_chunks()
    kept = pc.is_in(counts["value"], value_set=keep["value"].combine_chunks())
    return counts.filter(pc.invert(kept)).select(["value", "count"]).combine_chunks()


def lookup_values(vocab: pa.Table) -> pa.Array:
    """The vocabulary's values in id order, retired ones nulled (so they map to OOV, ids unmoved)."""
    values = vocab["value"].combine_chunks()
    if "retired" not in vocab.column_names:
        return values
    return pc.if_else(vocab["retired"].combine_chunks(), pa.nulls(len(values), values.type), values)
