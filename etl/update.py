"""Incremental days: fold a new day's statistics into a fitted workflow (``Workflow.update``).

What an update does, op by op (each stat op's ``update_finalize`` merges the partials its ``fit``
computes on the new data into the stats it keeps):

* ``Normalize`` / ``NormalizeMinMax``: count, mean, M2, min, max merged with Chan's parallel-variance
  formula, so they equal a fit on all data seen so far up to float rounding (when the op's inputs
  are the raw columns; behind a ``FillMissing("median")`` the old days were filled with the median
  of their time, which an update cannot revisit).
* ``FillMissing("median")``: the quantile sketches are merged; the median is read from the merge.
* ``QuantileBucketize``: the sketches are merged, but the **boundaries stay those of the first
  fit**, so a bucket id keeps its meaning (and its embedding row); refit to move them.
* ``Categorify``: counts accumulate. Every kept value keeps its id; values whose (accumulated)
  count newly reaches ``freq_threshold`` get ids appended after the existing ones (descending
  count, ties by value), within ``max_size``. For that the op keeps the counts of *every* value it
  has seen, also those below the threshold (``tail/<col>`` tables in the saved workflow: about
  value bytes + 8 bytes per distinct value ever seen). With ``decay`` (e.g. 0.9), the stored counts
  are multiplied by it before each update; a kept value whose decayed count falls below the
  threshold is *retired*: its id then maps to OOV, no other id moves and the id is never given to
  another value (if the value comes back above the threshold it gets its old id back). Tail values
  whose decayed count falls under ``PRUNE`` are forgotten to bound memory.
  Embedding dims stay those of the first fit (pinned in the stats at the first update), so a model
  trained before the update can grow its tables without changing their width.

The workflow records a content fingerprint of every input it ingested (``Workflow.seen``) and
refuses an input whose files it has seen before unless ``force=True``.

Example:
    >>> wf = Workflow.load("day1/workflow")
    >>> wf.update(Dataset("raw/day2.parquet"), decay=0.9)  # then wf.transform(...) / wf.save(...)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
import warnings
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FINGERPRINT_BYTES = 1 << 20  # hashed at each end of a file: day files are many GB
PRUNE = 0.01  # with decay: forget tail values whose decayed count is below this


class AlreadySeenError(ValueError):
    """The input was ingested before (pass ``force=True`` / ``--force`` to ingest it again)."""


# ---- input fingerprints --------------------------------------------------------------------------
def file_fingerprint(path: str) -> dict[str, Any]:
    """Path, size, mtime and a content hash (sha256 of the size and the first and last MiB)."""
    st = os.stat(path)
    h = hashlib.sha256(str(st.st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT_BYTES))
        if st.st_size > 2 * FINGERPRINT_BYTES:
            f.seek(-FINGERPRINT_BYTES, os.SEEK_END)
        h.update(f.read(FINGERPRINT_BYTES))
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}


def input_fingerprint(dataset: Any) -> dict[str, Any] | None:
    """A record of a file-backed Dataset's files (None for in-memory data, which is not tracked)."""
    files = getattr(dataset, "files", None)
    if not files:
        return None
    return {"files": [file_fingerprint(f) for f in files], "rows": dataset.num_rows,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def check_not_seen(seen: list[dict[str, Any]], record: dict[str, Any] | None) -> None:
    """Raise :class:`AlreadySeenError` if a file of ``record`` has the content of one already ingested."""
    if record is None:
        return
    known = {f["sha256"]: (k, f["path"]) for k, r in enumerate(seen) for f in r.get("files", [])}
    for f in record["files"]:
        if f["sha256"] in known:
            k, path = known[f["sha256"]]
            what = "the first fit" if k == 0 else f"update {k}"
            raise AlreadySeenError(f"input {f['path']} was already ingested by {what} (same content as {path}): "
                                   "pass --force (force=True) to ingest it again")


# ---- Workflow.update ------------------------------------------------------------------------------
def update_workflow(wf: Any, dataset: Any, decay: float | None = None, force: bool = False,
                    source: dict[str, Any] | None = None) -> Any:
    """Merge the statistics of ``dataset`` into the fitted workflow ``wf`` (in place; returns it).

    Args:
        wf: a fitted ``Workflow``.
        dataset: the new data (same input columns).
        decay: multiply the stored category counts by this (0 < decay <= 1) before adding the new ones.
        force: ingest an input whose files the workflow has seen before.
        source: the fingerprint to record (default: ``input_fingerprint(dataset)``); the CLI passes
            the raw input's when ``dataset`` is a split of it.

    Returns:
        ``wf``, with updated stats and the input appended to ``wf.seen``.
    """
    if not wf.fitted:
        raise RuntimeError("Workflow.update before Workflow.fit: fit it on the first day first")
    if decay is not None and not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    from ctrflow.etl.ops.base import Operator

    stuck = sorted({type(o).__name__ for o in wf.ops if o.is_stat
                    and type(o).update_finalize is Operator.update_finalize})
    if stuck:  # checked first, so a failed update leaves the workflow as it was
        raise ValueError(f"{', '.join(stuck)} cannot be updated incrementally: refit the workflow")
    record = source if source is not None else input_fingerprint(dataset)
    if not force:
        check_not_seen(wf.seen, record)
    dataset.check_columns(wf.input_columns)
    ddf = dataset.to_ddf(wf.input_columns)
    # Level by level, like fit: a level's new partials are computed through the already-updated stats below it.
    wf._fit_levels(ddf, lambda op, stats: op.update_finalize(stats, decay))
    if record is not None:
        wf.seen.append({**record, "decay": decay, "forced": bool(force)})
    return wf


# ---- Categorify --------------------------------------------------------------------------------
def update_categorify(op: Any, computed: dict[str, dict[str, Any]], decay: float | None) -> None:
    """``Categorify.update_finalize``: merge new value counts, append newly kept values, retire stale ones."""
    from ctrflow.etl.ops.categorify import merge_counts
    from ctrflow.etl.schema import embedding_dim

    thr = max(op.freq_threshold, 1)
    room = op.max_size - op.first_kept_id if op.max_size else None
    if getattr(op, "encode_type", "column") == "joint":  # one vocabulary for every column, as in fit
        key = op.vocabulary or "_".join(computed)
        groups = {key: (merge_counts([{key: vc} for vc in computed.values()])[key], list(computed))}
    else:
        groups = {col: (vc, [col]) for col, vc in computed.items()}
    for key, (new, cols) in groups.items():
        dims = {c: op.stats[c].get("embedding_dim") or embedding_dim(op.cardinality(c)) for c in cols}
        if key not in op.tails and op.stats[cols[0]].get("distinct", 0) > op.vocabs[key].num_rows:
            warnings.warn(f"Categorify {key!r}: the workflow holds no counts of its values below freq_threshold "
                          "(saved by an older ctrflow); they restart from zero", stacklevel=2)
        vocab, tail, appended = merge_counts_into(op.vocabs[key], op.tails.get(key), new["table"], thr, room, decay)
        op.vocabs[key], op.tails[key] = vocab, tail
        active = vocab.filter(pc.invert(vocab["retired"])) if "retired" in vocab.column_names else vocab
        active_rows = pc.sum(active["count"]).as_py() or 0
        for c in cols:
            old = op.stats[c]
            rows, nulls = old["rows"] + int(computed[c]["rows"]), old["nulls"] + int(computed[c]["nulls"])
            op.stats[c] = {
                **old, "kept": vocab.num_rows, "distinct": vocab.num_rows + tail.num_rows, "rows": rows,
                "nulls": nulls, "oov_rows": max(0, int(rows - nulls - active_rows)),
                "embedding_dim": int(dims[c]),  # pinned: the first fit's dim, whatever the cardinality now
                "appended": appended, "retired": vocab.num_rows - active.num_rows, "updates": old.get("updates", 0) + 1,
            }
            if "max_length" in computed[c]:
                op.stats[c]["max_length"] = max(old.get("max_length", 0), int(computed[c]["max_length"]))
    op._lookup = {}


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
    from ctrflow.etl.ops.categorify import _common_type, _plain

    tail = tail if tail is not None else new.schema.empty_table().select(["value", "count"])
    types = [t.schema.field("value").type for t in (vocab, tail, new) if t.num_rows]
    vtype = functools.reduce(_common_type, types) if types else vocab.schema.field("value").type
    float_counts = decay is not None or pa.types.is_floating(vocab.schema.field("count").type)
    ctype = pa.float64() if float_counts else pa.int64()

    def norm(t: pa.Table, scale: float | None) -> pa.Table:
        counts = t["count"].cast(ctype)
        if scale is not None:
            counts = pc.multiply(counts, scale)
        return pa.table({"value": _plain(t["value"].combine_chunks()).cast(vtype), "count": counts})

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


# ---- sketches and moments ------------------------------------------------------------------------
def merge_moment_stats(old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-column exact merge of fitted moments (count, mean, m2, min, max) with new ones."""
    from ctrflow.etl.stats import merge_moments

    keys = ("count", "mean", "m2", "min", "max")
    return {c: merge_moments({k: old[c][k] for k in keys}, new[c]) for c in new}


def merge_sketch_stats(old: dict[str, dict[str, Any]], new: dict[str, Any]) -> dict[str, Any]:
    """Per-column merge of fitted quantile sketches with new ones."""
    from ctrflow.etl.stats import merge_sketches

    return {c: merge_sketches(old[c]["sketch"], sk) for c, sk in new.items()}


# ---- `python etl/run.py --update WORKFLOW_DIR --input NEW_DAY --output OUT` ------------------------
def run_update(args: Any, backend: Any) -> dict[str, Any]:
    """The CLI's update path: load, update on the new day, write OUT like a fresh run.

    OUT gets the new day's processed ``train/`` and ``valid/`` (transformed with the updated stats),
    ``workflow/`` (the updated workflow; the one in WORKFLOW_DIR is left as it was) and
    ``schema.json`` with the grown cardinalities. ``--valid`` files are transformed as given;
    without them ``--valid-fraction`` (default 0.1) of the new day is held out and not fitted on.
    """
    from ctrflow.etl import Dataset, list_args
    from ctrflow.etl.run import (
        UsageError,
        _fits_in_memory,
        _guess_format,
        _progress,
        _summary,
        dask_context,
        random_split,
        write_splits,
    )
    from ctrflow.etl.schema import Schema, SchemaError
    from ctrflow.etl.versions import library_versions
    from ctrflow.etl.workflow import Workflow
    from ctrflow.etl.writer import atomic_dir

    src = args.update
    if os.path.isdir(os.path.join(src, "workflow")) and not os.path.exists(os.path.join(src, "workflow.json")):
        src = os.path.join(src, "workflow")  # a processed dir: use its workflow
    workflow = Workflow.load(src)
    output = os.path.abspath(args.output)
    if os.path.exists(output) and not args.overwrite:
        raise UsageError(f"output {args.output} already exists: pass --overwrite to replace it")
    fmt = args.format or _guess_format(args.input)
    train = Dataset(args.input, engine=fmt, part_size=args.part_size)
    valid = Dataset(args.valid, engine=fmt, part_size=args.part_size) if args.valid else None
    record = input_fingerprint(train)
    if not args.force:
        try:
            check_not_seen(workflow.seen, record)
        except AlreadySeenError as e:
            raise UsageError(str(e)) from None
    needed = workflow.input_columns
    with dask_context(args, backend), _progress(args, backend):
        t0 = time.perf_counter()
        train, valid = list_args.split(train, args), list_args.split(valid, args)  # as in the first fit's --list-cols
        train.check_columns(needed)
        if valid is not None:
            valid.check_columns(needed)
        before = workflow.output_schema()
        if not args.no_cache and _fits_in_memory(train):
            train = train.persist(needed)
        if valid is None:
            train, valid = random_split(train, args.valid_fraction or 0.1, args.seed)
        workflow.update(train, decay=args.decay, force=args.force, source=record)
        fit_s = time.perf_counter() - t0
        schema = workflow.output_schema()
        with atomic_dir(output, overwrite=args.overwrite) as tmp:
            train_files, valid_files, rows, write_s = write_splits(
                workflow, schema, train, valid, tmp, args.compression,
                "the new day has no training rows: check --input")
            workflow.save(os.path.join(tmp, "workflow"))
            list_args.finish_schema(schema, tmp)  # max_length = longest list written
            seconds = time.perf_counter() - t0
            grown = {c.name: [before[c.name].cardinality, c.cardinality] for c in schema.columns
                     if c.kind in ("categorical", "list") and before[c.name].cardinality != c.cardinality}
            prev = {}
            with contextlib.suppress(SchemaError, OSError):  # the workflow may have been moved on its own
                prev = Schema.load(os.path.dirname(os.path.abspath(src))).metadata
            schema.metadata.update({
                "rows": rows, "task": prev.get("task", workflow.meta.get("task", "binary")),
                "versions": library_versions(),
                "update": {"from": os.path.abspath(src), "inputs": args.input, "decay": args.decay,
                           "day": len(workflow.seen), "grown": grown},
                "etl": {"seconds": round(seconds, 3), "fit_seconds": round(fit_s, 3),
                        "transform_write_seconds": round(write_s, 3), "backend": backend.name},
            })
            schema.save(os.path.join(tmp, "schema.json"))
    summary = _summary(schema, workflow, rows, train_files, valid_files, seconds, fit_s, write_s, backend.name)
    summary["output"] = args.output
    print(f"updated {src} with {', '.join(args.input)} (day {len(workflow.seen)}): "
          f"{len(grown)} categorical column(s) grew; updated workflow in {os.path.join(args.output, 'workflow')}")
    return summary

