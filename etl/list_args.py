"""``etl/run.py``'s list-column flags: ``--list-cols``, ``--list-max-len``, ``--joint-vocab``, ``--with-sequences``.

Commands:
    python etl/run.py --with-sequences                   # synthetic data + item_id, hist_items, tags
    python etl/run.py --input raw.csv --cats user,item --conts price --list-cols 'tags:|,hist' \\
        --list-max-len 50 --joint-vocab items=item,hist

Each list column ``L`` (plus ``L_weights`` when the input has it) becomes
``([L] >> Categorify) + [L_weights] >> ListTruncate(max_len)``; columns named together in
``--joint-vocab`` share one Categorify vocabulary. ``COL:SEP`` splits a delimited string column
into a list first (``--list-cols 'tags:,'`` splits on commas).
"""

from __future__ import annotations

import argparse
import glob
import os
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ctrflow.etl import lists

NO_LIMIT = 2**31 - 1
SEQUENCE_LISTS = "hist_items,tags"
SEQUENCE_JOINT = "items=item_id,hist_items"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("list (sequence) columns")
    g.add_argument("--list-cols", action="append", default=[], metavar="COL[:SEP],...",
                   help="list columns: list-typed parquet columns, or delimited strings split on SEP "
                        "('tags:|'); a column COL_weights next to COL travels with it (repeatable)")
    g.add_argument("--list-max-len", type=int, default=None, metavar="N",
                   help="ListTruncate every list to its first N elements (newest first; default: no limit)")
    g.add_argument("--joint-vocab", action="append", default=[], metavar="[NAME=]COL,COL,...",
                   help="encode these categorical / list columns with one shared vocabulary NAME "
                        "(default: the first column's name), e.g. items=item_id,hist_items (repeatable)")
    g.add_argument("--with-sequences", action="store_true",
                   help="synthetic data with item_id, hist_items (newest first), tags + tags_weights whose "
                        "overlap drives the clicks; item_id and hist_items share the vocabulary 'items'")


def parse_list_cols(specs: list[str]) -> dict[str, str | None]:
    """``["tags:|,hist", "a:,"]`` -> ``{"tags": "|", "hist": None, "a": ","}`` (``SEP`` may be a comma)."""
    out: dict[str, str | None] = {}
    for spec in specs:
        tokens = spec.split(",")
        i = 0
        while i < len(tokens):
            tok = tokens[i].strip()
            i += 1
            if not tok:
                continue
            col, colon, sep = tok.partition(":")
            if colon and not sep:  # "COL:," -> the separator is the comma itself
                sep = ","
                i += 1 if i < len(tokens) and not tokens[i] else 0
            out[col.strip()] = sep or None
    return out


def parse_joint(specs: list[str]) -> dict[str, list[str]]:
    """``["items=item_id,hist_items"]`` -> ``{"items": ["item_id", "hist_items"]}``."""
    out = {}
    for spec in specs:
        name, eq, cols = spec.partition("=")
        members = [c.strip() for c in (cols if eq else name).split(",") if c.strip()]
        if len(members) < 2:
            raise ValueError(f"--joint-vocab {spec!r}: name at least two columns")
        out[name.strip() if eq else members[0]] = members
    return out


def check(args: argparse.Namespace) -> None:
    """Validate the list flags (raises ValueError with one clear line)."""
    if args.with_sequences:
        if args.input:
            raise ValueError("--with-sequences generates synthetic data: drop --input")
        args.list_cols = [*args.list_cols, SEQUENCE_LISTS]
        args.joint_vocab = [*args.joint_vocab, SEQUENCE_JOINT]
    if args.list_max_len is not None and args.list_max_len < 1:
        raise ValueError(f"--list-max-len must be >= 1, got {args.list_max_len}")
    args.list_spec = parse_list_cols(args.list_cols)
    args.joint_spec = parse_joint(args.joint_vocab)
    seen: set[str] = set()
    for members in args.joint_spec.values():
        dup = seen.intersection(members)
        if dup:
            raise ValueError(f"--joint-vocab: column(s) {sorted(dup)} named in two vocabularies")
        seen.update(members)


def needed_columns(args: argparse.Namespace, available: list[str]) -> list[str]:
    """Input columns the list flags read (weights included when the input has them)."""
    spec, joint = _specs(args)
    cols = list(spec) + [c for m in joint.values() for c in m]
    cols += [w for c in spec if (w := c + lists.WEIGHTS_SUFFIX) in available]
    return list(dict.fromkeys(cols))


def split(dataset: Any, args: argparse.Namespace) -> Any:
    """The dataset with its delimited string list columns split into lists (no-op without any)."""
    if dataset is None:
        return None
    spec = {c: s for c, s in _specs(args)[0].items() if s}
    return split_dataset(dataset, spec) if spec else dataset


def split_dataset(dataset: Any, spec: dict[str, str]) -> Any:
    """A Dataset whose delimited string columns ``{column: separator}`` are split into lists."""
    from ctrflow.etl.dataset import Dataset

    if not spec:
        return dataset
    ddf = dataset.to_ddf()
    return Dataset(ddf.map_partitions(lists.split_columns, spec, meta=lists.split_columns(ddf._meta, spec)),
                   schema=dataset.schema)


def claimed_columns(args: argparse.Namespace) -> set[str]:
    """List columns and joint-vocabulary columns: encoded by ``extend_graph``, not the per-column Categorify."""
    spec, joint = _specs(args)
    return set(spec) | {c for m in joint.values() for c in m}


def extend_graph(graph: Any, args: argparse.Namespace, available: list[str], categorify: Any) -> Any:
    """Add the joint-vocabulary and list-column branches to ``graph``.

    Args:
        graph: the workflow graph so far (without the ``claimed_columns``).
        args: parsed flags (``check`` applied).
        available: the input's column names (to find ``L_weights`` columns).
        categorify: ``**kwargs -> Categorify`` with the run's threshold / size / bucket flags.

    Returns:
        The extended graph.
    """
    from ctrflow.etl.ops import ListTruncate

    spec, joint = _specs(args)
    max_len = getattr(args, "list_max_len", None) or NO_LIMIT
    joint_cols = {c for m in joint.values() for c in m}
    for name, members in joint.items():
        branch = members >> categorify(vocabulary=name)
        weights = [w for c in members if c in spec and (w := c + lists.WEIGHTS_SUFFIX) in available]
        graph = graph + ((branch + weights if weights else branch) >> ListTruncate(max_len))
    for col in spec:
        if col in joint_cols:
            continue
        branch = [col] >> categorify()
        w = col + lists.WEIGHTS_SUFFIX
        graph = graph + ((branch + [w] if w in available else branch) >> ListTruncate(max_len))
    return graph


def _specs(args: argparse.Namespace) -> tuple[dict[str, str | None], dict[str, list[str]]]:
    """The parsed list and joint specs (empty for a Namespace built without the list flags)."""
    return getattr(args, "list_spec", None) or {}, getattr(args, "joint_spec", None) or {}


def finish_schema(schema: Any, out_dir: str) -> dict[str, dict[str, float]]:
    """Set each list column's ``max_length`` to the longest list written; per-column element stats.

    Reads only the list columns of the written parquet files (their offsets decide the lengths).

    Returns:
        ``{list column: {"max_length", "mean_length", "null_rate", "oov_rate"}}`` (rates per element).
    """
    cols = [c for c in schema.columns if c.kind == "list"]
    if not cols:
        return {}
    files = sorted(glob.glob(os.path.join(out_dir, "*", "part-*.parquet")))
    acc = {c.name: np.zeros(5) for c in cols}  # rows, elements, max, nulls, oov
    for f in files:
        table = pq.read_table(f, columns=[c.name for c in cols])
        for c in cols:
            arr = lists.list_array(table[c.name])
            lens = lists.lengths(arr)
            flat = arr.flatten()
            a = acc[c.name]
            a[0] += len(lens)
            a[1] += lens.sum()
            a[2] = max(a[2], lens.max() if lens.size else 0)
            a[3] += pc.sum(pc.equal(flat, 1)).as_py() or 0
            a[4] += pc.sum(pc.equal(flat, 2)).as_py() or 0
    out = {}
    for c in cols:
        rows, elems, longest, nulls, oov = acc[c.name]
        c.max_length = int(longest)
        if c.weights:
            schema[c.weights].max_length = int(longest)
        out[c.name] = {"cardinality": c.cardinality, "max_length": int(longest), "mean_length": elems / max(rows, 1),
                       "null_rate": nulls / max(elems, 1), "oov_rate": oov / max(elems, 1)}
    return out


def print_summary(stats: dict[str, dict[str, float]]) -> None:
    if not stats:
        return
    print(f"{'list column':>12} {'cardinality':>12} {'mean len':>9} {'max len':>8} {'null% elem':>10} "
          f"{'OOV% elem':>10}")
    for name, s in stats.items():
        print(f"{name:>12} {s['cardinality']:>12,} {s['mean_length']:>9.2f} {s['max_length']:>8} "
              f"{100 * s['null_rate']:>10.2f} {100 * s['oov_rate']:>10.2f}")
