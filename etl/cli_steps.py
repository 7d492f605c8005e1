"""The steps of an ETL run that ``etl/run.py`` (fit) and its ``--update`` path (``etl/cli_update.py``) share.

Input (synthetic data from the cache, format guess, the in-memory check, the random validation
split), the Dask context and progress bar, writing both splits, and the printed summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("ctrflow.etl")


class UsageError(ValueError):
    """A user error: printed as one line, exit code 2."""


@contextlib.contextmanager
def dask_context(args: argparse.Namespace, backend: Any) -> Iterator[Any]:
    """Dask config for the backend and, when asked, a distributed client (local or remote)."""
    import dask

    with dask.config.set({"dataframe.backend": backend.dask_backend, "dataframe.convert-string": False}):
        if args.scheduler is None and args.workers is None:
            yield None
            return
        from ctrflow.etl.cluster import close_client, dashboard_option, start_client

        client, cluster = start_client(args.scheduler, args.workers, gpu=backend.name == "gpu",
                                       dashboard_address=dashboard_option(getattr(args, "dashboard_address", None)),
                                       memory_limit=getattr(args, "memory_limit", None) or parse_memory(None))
        workers = len(client.scheduler_info().get("workers", {}))
        print(f"Dask cluster: {client.scheduler.address}, {workers} worker(s); dashboard: {client.dashboard_link}",
              file=sys.stderr)
        try:
            yield client
        finally:
            close_client(client, cluster)


def check_writable(path: str, flag: str) -> None:
    """Raise ``UsageError`` (one line) unless ``path`` can be created: before any work, not after it."""
    from ctrflow.etl.atomic import unwritable

    why = unwritable(path)
    if why:
        raise UsageError(f"{flag} {path}: {why}; choose a location you can write to")


def guess_format(paths: list[str]) -> str:
    """``--format`` from the first input's name: parquet (files or a directory), csv, else criteo."""
    first = paths[0]
    if first.endswith((".parquet", ".pq")) or os.path.isdir(first):
        return "parquet"
    if first.endswith((".csv", ".csv.gz")):
        return "csv"
    return "criteo"


def synthetic_key(rows: int, seed: int, sequences: bool) -> str:
    """The cache sub-directory of one synthetic data set: everything that changes its bytes.

    Args:
        rows: ``--synthetic-rows``; seed: ``--seed``; sequences: ``--with-sequences``.

    Returns:
        e.g. ``rows-2000000-seed0-v3`` or ``rows-2000000-seed0-v3-seq1`` (generator versions included,
        so a new generator never reuses an old data set).
    """
    from ctrflow.etl import synthetic

    return f"rows-{rows}-seed{seed}-v{synthetic.VERSION}" + (f"-seq{synthetic.seqs.VERSION}" if sequences else "")


def synthetic_input(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Generate the synthetic raw data into the cache (``--cache-dir``), or reuse it when already there.

    Args:
        args: the parsed flags (``synthetic_rows``, ``seed``, ``with_sequences``, ``cache_dir``).

    Returns:
        (the raw data directory with ``train/`` and ``valid/``, its ``synthetic.json`` metadata).
    """
    from ctrflow.etl import cache, synthetic

    seq = bool(getattr(args, "with_sequences", False))
    raw = cache.cache_dir(getattr(args, "cache_dir", None), "synthetic",
                          synthetic_key(args.synthetic_rows, args.seed, seq))
    meta: dict[str, Any] = {}
    meta_path = os.path.join(raw, "synthetic.json")
    if os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError):  # damaged by hand: regenerate
            meta = {}
    # The key already names these; checking the metadata too guards against a directory edited or copied by hand.
    if (meta.get("version") == synthetic.VERSION and meta.get("rows") == args.synthetic_rows
            and meta.get("seed") == args.seed
            and (meta.get("sequences") or {}).get("version") == (synthetic.seqs.VERSION if seq else None)):
        print(f"synthetic data: reusing {raw}", file=sys.stderr)
    else:  # none yet, or damaged: generate into a temporary directory renamed into place when complete
        t = time.perf_counter()
        meta = synthetic.generate(raw, rows=args.synthetic_rows, seed=args.seed, sequences=seq)
        print(f"synthetic data: generated {args.synthetic_rows:,} rows in {raw} ({time.perf_counter() - t:.1f} s)",
              file=sys.stderr)
    return raw, meta


def prepare_input(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """Training and validation Datasets (generating synthetic data when no input is given)."""
    from ctrflow.etl import Dataset

    meta: dict[str, Any] = {}
    if args.input is None:
        raw, meta = synthetic_input(args)
        train = Dataset(os.path.join(raw, "train"), engine="parquet", part_size=args.part_size)
        valid = Dataset(os.path.join(raw, "valid"), engine="parquet", part_size=args.part_size)
        return train, valid, {"synthetic": meta}
    fmt = args.format or guess_format(args.input)
    train = Dataset(args.input, engine=fmt, part_size=args.part_size)
    if args.valid:
        return train, Dataset(args.valid, engine=fmt, part_size=args.part_size), meta
    return train, None, meta


# Peak RSS of a cached run / the input's estimated decoded size (Dataset.estimated_bytes): measured 4.6 at
# 40M generated rows (estimate 2.31 GB, peak 10.63 GiB; `/usr/bin/time -v python etl/run.py --synthetic-rows
# 40000000`, 2026-12-06), so 5 with a margin: the estimate undercounts pandas' decoded columns.
PEAK_FACTOR = 5.0
MEMORY_SHARE = 0.4  # default --memory-limit: this share of the machine's RAM


def total_ram() -> int | None:
    """Physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def parse_memory(text: str | None) -> int | None:
    """``--memory-limit``: ``8GB``, ``512MB``, ``12G``, a byte count, or ``40%`` of RAM; None: the default.

    Raises:
        ValueError: an unreadable size.
    """
    ram = total_ram()
    if text is None:
        return int(MEMORY_SHARE * ram) if ram else None
    t = text.strip().upper().replace(" ", "")
    if t.endswith("%"):
        if not ram:
            raise ValueError("--memory-limit as a share of RAM: this system does not report its RAM")
        return int(float(t[:-1]) / 100 * ram)
    units = {"TB": 1e12, "GB": 1e9, "MB": 1e6, "KB": 1e3, "T": 2**40, "G": 2**30, "M": 2**20, "K": 2**10, "B": 1}
    for u, f in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * f)
    return int(float(t))


def fits_in_memory(dataset: Any, limit: int | None = None) -> bool:
    """True when keeping the decoded input in memory keeps the run's whole peak (about
    :data:`PEAK_FACTOR` x the input) under ``limit`` bytes (default: :data:`MEMORY_SHARE` of RAM)."""
    size = dataset.estimated_bytes()
    limit = parse_memory(None) if limit is None else limit
    if size is None or not limit:
        return False
    fits = PEAK_FACTOR * size <= limit
    how = "kept in memory between fit and transform" if fits else "streamed from disk twice"
    log.info("input ~%.2f GB decoded: %s (a cached run peaks near %.1f GB; --memory-limit %.1f GB)", size / 1e9,
             how, PEAK_FACTOR * size / 1e9, limit / 1e9)
    return fits


def random_split(dataset: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """Row-level random train / valid split, reproducible from ``seed`` (per partition)."""
    import numpy as np

    from ctrflow.etl import Dataset

    ddf = dataset.to_ddf()

    def take(df: Any, valid: bool, partition_info: dict | None = None) -> Any:
        number = partition_info["number"] if partition_info else 0
        u = np.random.default_rng([seed, number]).random(len(df))
        return df[(u < fraction) if valid else (u >= fraction)]

    return (Dataset(ddf.map_partitions(take, False, meta=ddf._meta)),
            Dataset(ddf.map_partitions(take, True, meta=ddf._meta)))


def write_splits(workflow: Any, schema: Any, train: Any, valid: Any, out: str, compression: str,
                 empty: str) -> tuple[list[dict], list[dict], dict[str, int], float]:
    """Transform both splits and write ``out/train`` and ``out/valid`` in one Dask compute.

    Args:
        workflow: the fitted (or updated) workflow; schema: its ``output_schema()``.
        train, valid: the raw splits (Datasets); out: the temporary output directory.
        compression: parquet codec (``none``: plain pages); empty: the error when train has no rows.

    Returns:
        (train file records, valid file records, ``{"train": rows, "valid": rows}``, seconds).
    """
    from ctrflow.etl.writer import write_parquet

    t = time.perf_counter()
    train_files, valid_files = write_parquet(
        [(workflow.transform(train).to_ddf(), os.path.join(out, "train")),
         (workflow.transform(valid).to_ddf(), os.path.join(out, "valid"))],
        {c.name: c.dtype for c in schema.columns},
        count_ids=[c.name for c in schema.columns if c.kind == "categorical"], compression=compression,
    )
    rows = {"train": sum(f["rows"] for f in train_files), "valid": sum(f["rows"] for f in valid_files)}
    if rows["train"] == 0:
        raise UsageError(empty)
    return train_files, valid_files, rows, time.perf_counter() - t


@contextlib.contextmanager
def progress(args: argparse.Namespace, backend: Any) -> Iterator[None]:
    """Dask's progress bar on a terminal, for a run in this process (``--no-progress``: none)."""
    if args.no_progress or args.scheduler or args.workers or not sys.stderr.isatty():
        yield
        return
    from dask.diagnostics import ProgressBar

    with ProgressBar(minimum=1.0, out=sys.stderr):
        yield


def summarize(schema: Any, workflow: Any, rows: dict[str, int], train_files: list[dict], valid_files: list[dict],
              seconds: float, fit_s: float, write_s: float, backend: str) -> dict[str, Any]:
    """What a run prints (and ``main`` returns through ``run``): rows, timings, per-column null / OOV rates."""
    from ctrflow.etl.ops import Categorify

    total = rows["train"] + rows["valid"]
    cats = {}
    fitted = {c: op.stats[c] for op in workflow.ops if isinstance(op, Categorify) for c in op.stats}
    for col in schema.columns:
        if col.kind != "categorical":
            continue
        vrows = max(rows["valid"], 1)
        entry = {"cardinality": col.cardinality,
                 "train_null_rate": sum(f["nulls"][col.name] for f in train_files) / rows["train"],
                 "train_oov_rate": sum(f["oov"][col.name] for f in train_files) / rows["train"],
                 "valid_null_rate": sum(f["nulls"][col.name] for f in valid_files) / vrows,
                 "valid_oov_rate": sum(f["oov"][col.name] for f in valid_files) / vrows}
        if col.name in fitted:
            entry["distinct_in_fit"] = fitted[col.name]["distinct"]
        cats[col.name] = entry
    return {"rows": rows, "seconds": seconds, "fit_seconds": fit_s, "transform_write_seconds": write_s,
            "rows_per_s": total / seconds if seconds else 0.0, "backend": backend, "categorical": cats}


def print_summary(s: dict[str, Any]) -> None:
    """Print :func:`summarize`'s result as a table (list columns after it)."""
    r = s["rows"]
    print(f"ETL ({s['backend']}): {r['train']:,} train + {r['valid']:,} valid rows -> {s['output']} "
          f"in {s['seconds']:.2f} s ({s['rows_per_s']:,.0f} rows/s; fit {s['fit_seconds']:.2f} s, "
          f"transform+write {s['transform_write_seconds']:.2f} s)")
    print(f"{'column':>12} {'cardinality':>12} {'null% train':>11} {'OOV% train':>10} {'null% valid':>11} "
          f"{'OOV% valid':>10}")
    for name, c in s["categorical"].items():
        print(f"{name:>12} {c['cardinality']:>12,} {100 * c['train_null_rate']:>11.2f} "
              f"{100 * c['train_oov_rate']:>10.2f} {100 * c['valid_null_rate']:>11.2f} "
              f"{100 * c['valid_oov_rate']:>10.2f}")
    from ctrflow.etl import list_args

    list_args.print_summary(s.get("lists", {}))
