"""Fit the ETL workflow and write a processed dataset: ``python etl/run.py``.

With no ``--input`` it first generates the embedded Criteo-shaped synthetic click logs (see
``ctrflow.etl.synthetic``), so a fresh checkout runs end to end without a download. They are kept in
the cache directory (``--cache-dir`` > ``$CTRFLOW_CACHE_DIR`` > ``$XDG_CACHE_HOME/ctrflow`` >
``~/.cache/ctrflow``), under ``synthetic/rows-N-seedS-vV[-seqW]``, and reused by later runs with the same
rows, seed and generator version; a run writes nothing else outside ``--output``.

Commands:
    python etl/run.py                                    # synthetic data -> data/processed
    python etl/run.py --input day_0.gz day_1.gz --format criteo --valid day_2.gz --output out/
    python etl/run.py --input 'raw/*.parquet' --valid-fraction 0.05 --freq-threshold 15 \\
        --auto-bins I1:20 --bucketize I2:0,1,10,100 --workers 2   # dashboard on 127.0.0.1:8787
    python etl/run.py --synthetic-rows 200000 --cache-dir /scratch/ctrflow --output /scratch/small
    python etl/run.py --with-sequences                   # + item_id, hist_items, tags(+_weights) lists
    python etl/run.py --input raw.csv --cats u,item --conts x --list-cols 'tags:|,hist' --list-max-len 50 \\
        --joint-vocab items=item,hist                    # list columns (see etl/list_args.py)
    python etl/run.py --update out/ --input day_3.gz --format criteo --output out_day3/ [--decay 0.9]
                      # a new day: stats merged into out/'s workflow, ids kept, new categories appended;
                      # out_day3/ holds the day's processed data and the updated workflow (etl/update.py)

Layout written (atomically): OUT/train/part-*.parquet, OUT/valid/part-*.parquet, OUT/workflow/,
OUT/schema.json. Categorical ids int32, continuous float32, label float32.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

if __package__ in (None, ""):  # `python etl/run.py`: drop etl/ from the path so no module shadows a library
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from ctrflow.etl.cli_steps import (  # noqa: E402 - after the path fix above
    UsageError,
    check_writable,
    dask_context,
    fits_in_memory,
    parse_memory,
    prepare_input,
    print_summary,
    progress,
    random_split,
    summarize,
    synthetic_key,
    write_splits,
)

__all__ = ["UsageError", "build_parser", "build_workflow", "main", "parse_args", "run", "synthetic_key"]

CRITEO_CONTS = ",".join(f"I{i}" for i in range(1, 14))
CRITEO_CATS = ",".join(f"C{i}" for i in range(1, 27))

from ctrflow.etl.cli_help import DefaultsHelpFormatter, usage_name  # noqa: E402
from ctrflow.etl.config import DEFAULTS  # noqa: E402

log = logging.getLogger("ctrflow.etl")


_HelpFormatter = DefaultsHelpFormatter


def _prog(argv0: str | None = None, orig_argv: list[str] | None = None) -> str:
    """The command the user typed (:func:`ctrflow.etl.cli_help.usage_name`)."""
    return usage_name("ctrflow-etl", "ctrflow.etl.run", "etl/run.py", argv0, orig_argv)


def build_parser() -> argparse.ArgumentParser:
    """The command line: every option with its help text and (shown) default.

    Returns:
        The parser; ``prog`` is the command the user typed (see ``_prog``).
    """
    from ctrflow.etl import cache, list_args

    p = argparse.ArgumentParser(prog=_prog(), description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    src = p.add_argument_group("input")
    src.add_argument("--input", nargs="+", help="files, globs or directories (default: generate synthetic data)")
    src.add_argument("--format", choices=["parquet", "csv", "criteo"], default=None,
                     help="input format (default: from the file names; criteo = tab-separated day files)")
    # The Criteo lists are abbreviated: argparse would break the 100-character default mid-name.
    src.add_argument("--cats", default=CRITEO_CATS, help="comma-separated categorical columns (default: Criteo's "
                                                          "C1,C2,...,C26)")
    src.add_argument("--conts", default=CRITEO_CONTS, help="comma-separated continuous columns (default: Criteo's "
                                                            "I1,I2,...,I13)")
    src.add_argument("--label", default=DEFAULTS.label, help="label column")
    src.add_argument("--task", choices=["binary", "regression"], default=DEFAULTS.task, help="what the label holds")
    src.add_argument("--label-values", metavar="NEGATIVE,POSITIVE", default=None,
                     help="binary labels held as two other values, e.g. '<=50K,>50K' or -1,1 (default: 0/1, "
                          "yes/no, true/false); any other value is an error")
    split = src.add_mutually_exclusive_group()
    split.add_argument("--valid", nargs="+",
                       help="validation files (fit uses the training input only; default: split --input, "
                            "see --valid-fraction)")
    split.add_argument("--valid-fraction", type=float, default=None,
                       help=f"random share of --input rows held out for validation (default: "
                            f"{DEFAULTS.valid_fraction}; the synthetic data has its own validation split)")
    src.add_argument("--synthetic-rows", type=int, default=DEFAULTS.synthetic_rows,
                     help="rows of generated data (without --input)")
    src.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the generator and of the random split")
    src.add_argument("--cache-dir", metavar="DIR", default=None,
                     help="where generated synthetic data is kept and reused (default: $CTRFLOW_CACHE_DIR, else "
                          "$XDG_CACHE_HOME/ctrflow, else ~/.cache/ctrflow; here: "
                          f"{cache.cache_dir().replace('%', '%%')}); safe to delete")
    ops = p.add_argument_group("ops")
    ops.add_argument("--freq-threshold", type=int, default=DEFAULTS.freq_threshold,
                     help="Categorify: keep values seen this often")
    ops.add_argument("--negatives", choices=["signed", "clip"], default=DEFAULTS.negatives,
                     help="continuous values below 0: signed = sign(x) log(1 + |x|), order and sign kept; clip = "
                          "0 first, then log(1 + x) (NVTabular's Criteo recipe)")
    ops.add_argument("--num-buckets", type=int, default=None,
                     help="Categorify: hash OOV values into N ids (default: none, every OOV value is id 2)")
    ops.add_argument("--max-size", type=int, default=DEFAULTS.max_size,
                     help="Categorify: cap each cardinality at N (reserved ids included; 0: no cap)")
    ops.add_argument("--bucketize", action="append", default=[], metavar="COL:b1,b2,...",
                     help="add COL_bucket from fixed boundaries (repeatable)")
    ops.add_argument("--auto-bins", action="append", default=[], metavar="COL:K",
                     help="add COL_bin from K approximate-quantile buckets (repeatable)")
    run = p.add_argument_group("execution")
    inc = p.add_argument_group("incremental days (etl/update.py)")
    inc.add_argument("--update", metavar="WORKFLOW_DIR",
                     help="merge --input (a new day) into this fitted workflow (or processed dir) instead of "
                          "fitting; writes the day's processed data and the updated workflow to --output "
                          "(default: fit a new workflow)")
    inc.add_argument("--decay", type=float, default=None,
                     help="with --update: multiply the stored category counts by this first, e.g. 0.9 "
                          "(default: no decay)")
    inc.add_argument("--force", action="store_true", help="with --update: ingest an input seen before")
    run.add_argument("--output", default=DEFAULTS.output, help="processed dataset directory")
    run.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    run.add_argument("--engine", choices=["auto", "cpu", "gpu"], default="auto",
                     help="pandas (cpu) or cuDF (gpu); auto: gpu when RAPIDS and a CUDA device are present")
    cluster = run.add_mutually_exclusive_group()
    cluster.add_argument("--scheduler", metavar="ADDRESS",
                         help="address of an existing Dask scheduler (default: none, run in this process)")
    cluster.add_argument("--workers", type=int, metavar="N",
                         help="start a local Dask cluster with N workers (default: none, run in this process)")
    run.add_argument("--dashboard-address", metavar="HOST:PORT", default=None,
                     help="with --workers: where the Dask dashboard listens; :PORT means loopback, 0.0.0.0:PORT "
                          "exposes it to the network, none turns it off (default: 127.0.0.1:8787, loopback "
                          "only; a free port if 8787 is taken)")
    run.add_argument("--compression", choices=["none", "snappy", "lz4", "zstd"], default=DEFAULTS.compression,
                     help="parquet codec of the output (none: plain pages, fastest to write and read; "
                          "zstd: about 3x smaller)")
    run.add_argument("--part-size", default=None,
                     help="rows per partition (int) or bytes ('256MB') (default: 1,000,000 rows for parquet, "
                          "256MB for text input)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--memory-limit", metavar="SIZE", default=None,
                     help="memory budget of the whole run, e.g. 8GB, 512MB or 40%% of RAM: the input is kept in "
                          "memory between fit and transform only when its peak (~5x the estimated decoded input) "
                          "fits, else it is streamed from disk twice; local --workers share it (default: 40%% of RAM)")
    run.add_argument("--no-cache", action="store_true",
                     help="never keep the input in memory between fit and transform (it is when its peak fits "
                          "--memory-limit); unrelated to --cache-dir")
    list_args.add_arguments(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The namespace; ``part_size`` is an int when given as a row count.

    Raises:
        UsageError: an inconsistent or out-of-range combination of flags.
    """
    from ctrflow.etl import list_args

    args = build_parser().parse_args(argv)
    try:
        list_args.check(args)  # --list-cols, --list-max-len, --joint-vocab, --with-sequences
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.valid_fraction is not None and not 0 < args.valid_fraction < 1:
        raise UsageError(f"--valid-fraction must be in (0, 1), got {args.valid_fraction}")
    if args.synthetic_rows < 100:
        raise UsageError(f"--synthetic-rows must be >= 100, got {args.synthetic_rows}")
    if args.memory_limit is not None:
        try:
            args.memory_limit = parse_memory(args.memory_limit)
        except ValueError:
            raise UsageError(f"--memory-limit {args.memory_limit!r}: give a size such as 8GB, 512MB or 40%") from None
        if args.memory_limit <= 0:
            raise UsageError("--memory-limit must be > 0")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.dashboard_address is not None:
        if args.workers is None:
            raise UsageError("--dashboard-address applies to --workers only (a local cluster)")
        from ctrflow.etl.cluster import ClusterError, dashboard_option

        try:
            dashboard_option(args.dashboard_address)
        except ClusterError as e:
            raise UsageError(str(e)) from None
    if args.update and not args.input:
        raise UsageError("--update needs --input NEW_DAY (the new day's files)")
    if (args.decay is not None or args.force) and not args.update:
        raise UsageError("--decay and --force apply to --update only")
    if args.label_values is not None:  # checked now, before any input is read
        from ctrflow.etl.ops.label import check_label_values

        try:
            args.label_values = check_label_values(args.label_values.split(","), args.task, "--label-values")
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.decay is not None and not 0 < args.decay <= 1:
        raise UsageError(f"--decay must be in (0, 1], got {args.decay}")
    if args.part_size is not None and args.part_size.isdigit():
        args.part_size = int(args.part_size)
    return args


def _split_list(s: str) -> list[str]:
    return [c.strip() for c in s.split(",") if c.strip()]


def _col_spec(spec: str, flag: str) -> tuple[str, str]:
    col, sep, rest = spec.partition(":")
    if not sep or not col or not rest:
        raise UsageError(f"{flag} expects COL:VALUES, got {spec!r}")
    return col, rest


def build_workflow(args: argparse.Namespace, cats: list[str], conts: list[str],
                   available: list[str] | None = None) -> Any:
    """The Criteo recipe: Categorify on cats; FillMissing -> signed LogOp (or Clip(0) -> LogOp) -> Normalize
    on conts;
    list columns (and joint vocabularies) as in ``etl/list_args.py`` (``available``: the input's columns)."""
    from ctrflow.etl import Workflow, list_args
    from ctrflow.etl.ops import (
        Bucketize,
        Categorify,
        Clip,
        FillMissing,
        Label,
        LogOp,
        Normalize,
        QuantileBucketize,
        Rename,
    )

    graph = [args.label] >> Label(task=args.task, values=args.label_values)
    if conts:
        if args.negatives == "clip":
            graph = graph + (conts >> FillMissing(0) >> Clip(min_value=0) >> LogOp() >> Normalize())
        else:  # the same values where x >= 0, and negative values stay apart from 0
            graph = graph + (conts >> FillMissing(0) >> LogOp(signed=True) >> Normalize())
    cats = [c for c in cats if c not in list_args.claimed_columns(args)]  # list / joint-vocabulary branches
    if cats:
        graph = graph + (cats >> Categorify(args.freq_threshold, args.max_size, args.num_buckets))
    graph = list_args.extend_graph(graph, args, available or [],
                                   lambda **kw: Categorify(args.freq_threshold, args.max_size, args.num_buckets, **kw))
    for spec in args.bucketize:
        col, values = _col_spec(spec, "--bucketize")
        try:
            bounds = [float(v) for v in values.split(",")]
        except ValueError:
            raise UsageError(f"--bucketize {spec!r}: boundaries must be numbers") from None
        graph = graph + ([col] >> Bucketize(bounds) >> Rename(postfix="_bucket"))
    for spec in args.auto_bins:
        col, k = _col_spec(spec, "--auto-bins")
        if not k.isdigit() or int(k) < 2:
            raise UsageError(f"--auto-bins {spec!r}: K must be an integer >= 2")
        graph = graph + ([col] >> QuantileBucketize(int(k)) >> Rename(postfix="_bin"))
    return Workflow(graph)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole ETL; returns the summary it prints."""
    from ctrflow.etl import dispatch, list_args
    from ctrflow.etl.ops.label import LabelError
    from ctrflow.etl.versions import library_versions
    from ctrflow.etl.writer import atomic_dir

    backend = dispatch.get_backend(args.engine)
    if args.update:  # incremental day: update the saved workflow's stats instead of fitting
        from ctrflow.etl.cli_update import run_update

        return run_update(args, backend)
    cats, conts = _split_list(args.cats), _split_list(args.conts)
    output = os.path.abspath(args.output)
    if os.path.exists(output) and not args.overwrite:
        raise UsageError(f"output {args.output} already exists: pass --overwrite to replace it")
    check_writable(output, "--output")  # before any work, not after the whole fit
    with dask_context(args, backend), progress(args, backend):
        train, valid, meta = prepare_input(args)
        from ctrflow.etl.update import input_fingerprint

        seen = [r] if (r := input_fingerprint(train)) else []  # so `--update` refuses this input later
        t0 = time.perf_counter()
        extra = [_col_spec(s, "--bucketize")[0] for s in args.bucketize]
        extra += [_col_spec(s, "--auto-bins")[0] for s in args.auto_bins]
        needed = list(dict.fromkeys([args.label, *conts, *cats, *extra]))  # --auto-bins I1 may also be a --conts
        needed += [c for c in list_args.needed_columns(args, train.column_names) if c not in needed]
        train, valid = list_args.split(train, args), list_args.split(valid, args)  # 'COL:SEP' strings -> lists
        train.check_columns(needed)
        if train.num_rows == 0:
            raise UsageError("the training input has no rows: check --input")
        if valid is not None:
            valid.check_columns(needed)
        workflow = build_workflow(args, cats, conts, train.column_names)
        t_fit = time.perf_counter()
        if not args.no_cache and fits_in_memory(train, args.memory_limit):
            train = train.persist(needed)  # fit and transform then share one read of the input
        if valid is None:
            train, valid = random_split(train, args.valid_fraction or DEFAULTS.valid_fraction, args.seed)
        workflow.fit(train)
        workflow.seen = seen
        fit_s = time.perf_counter() - t_fit
        schema = workflow.output_schema()
        with atomic_dir(output, overwrite=args.overwrite) as tmp:
            try:
                train_files, valid_files, rows, write_s = write_splits(
                    workflow, schema, train, valid, tmp, args.compression,
                    "the training input has no rows: check --input")
            except LabelError:  # raised by the first bad partition: count them all for the message
                raise LabelError(_label_report(args, {"training": train, "validation": valid})) from None
            workflow.meta = {"inputs": args.input or "synthetic", "format": args.format, "task": args.task,
                             # 'COL:SEP' splits run before the workflow: ctrflow.serve splits requests alike
                             "list_separators": {c: s for c, s in getattr(args, "list_spec", {}).items() if s}}
            workflow.save(os.path.join(tmp, "workflow"))
            list_stats = list_args.finish_schema(schema, tmp)  # max_length = longest list written
            seconds = time.perf_counter() - t0
            schema.metadata.update({
                "rows": rows, "task": args.task, "versions": library_versions(), **meta,
                "etl": {"seconds": round(seconds, 3), "fit_seconds": round(fit_s, 3),
                        "transform_write_seconds": round(write_s, 3), "backend": backend.name},
            })
            schema.save(os.path.join(tmp, "schema.json"))
    summary = summarize(schema, workflow, rows, train_files, valid_files, seconds, fit_s, write_s, backend.name)
    summary["output"] = args.output
    summary["lists"] = list_stats
    return summary


def _label_report(args: argparse.Namespace, splits: dict[str, Any]) -> str:
    """The bad labels of every split, counted in full (the transform stops at the first bad partition)."""
    from ctrflow.etl.ops.label import count_bad_labels, label_message

    found = {k: count_bad_labels(args.label, args.task, ds.to_ddf([args.label]), args.label_values)
             for k, ds in splits.items()}
    total = sum(n for n, _ in found.values())
    where = "(" + ", ".join(f"{n:,} in the {k} split" for k, (n, _) in found.items() if n) + ")"
    example = next(ex for n, ex in found.values() if n)
    return label_message(args.label, args.task, total, example, where, args.label_values)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 for user errors, printed as one line)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from ctrflow.etl.ops import LabelError
    from ctrflow.etl.readers import DatasetError
    from ctrflow.etl.workflow import WorkflowError

    try:
        args = parse_args(argv)
        summary = run(args)
    except (UsageError, DatasetError, LabelError, WorkflowError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad op parameters (boundaries, thresholds) are user errors too
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
