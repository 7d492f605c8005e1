"""``python etl/run.py --update WORKFLOW_DIR --input NEW_DAY --output OUT``: the command line's incremental day.

The update itself is ``Workflow.update`` (see :mod:`ctrflow.etl.update`); this module loads the
workflow, checks the input was not ingested before, and writes OUT like a fresh run.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from ctrflow.etl import list_args
from ctrflow.etl.cli_steps import (
    UsageError,
    dask_context,
    fits_in_memory,
    guess_format,
    progress,
    random_split,
    summarize,
    write_splits,
)
from ctrflow.etl.config import DEFAULTS
from ctrflow.etl.dataset import Dataset
from ctrflow.etl.schema import Schema, SchemaError
from ctrflow.etl.update import AlreadySeenError, check_not_seen, input_fingerprint
from ctrflow.etl.versions import library_versions
from ctrflow.etl.workflow import Workflow
from ctrflow.etl.writer import atomic_dir


def run_update(args: Any, backend: Any) -> dict[str, Any]:
    """The CLI's update path: load, update on the new day, write OUT like a fresh run.

    OUT gets the new day's processed ``train/`` and ``valid/`` (transformed with the updated stats),
    ``workflow/`` (the updated workflow; the one in WORKFLOW_DIR is left as it was) and
    ``schema.json`` with the grown cardinalities. ``--valid`` files are transformed as given;
    without them ``--valid-fraction`` (default 0.1) of the new day is held out and not fitted on.
    """
    src = args.update
    if os.path.isdir(os.path.join(src, "workflow")) and not os.path.exists(os.path.join(src, "workflow.json")):
        src = os.path.join(src, "workflow")  # a processed dir: use its workflow
    workflow = Workflow.load(src)
    output = os.path.abspath(args.output)
    if os.path.exists(output) and not args.overwrite:
        raise UsageError(f"output {args.output} already exists: pass --overwrite to replace it")
    fmt = args.format or guess_format(args.input)
    train = Dataset(args.input, engine=fmt, part_size=args.part_size)
    valid = Dataset(args.valid, engine=fmt, part_size=args.part_size) if args.valid else None
    record = input_fingerprint(train)
    if not args.force:
        try:
            check_not_seen(workflow.seen, record)
        except AlreadySeenError as e:
            raise UsageError(str(e)) from None
    needed = workflow.input_columns
    with dask_context(args, backend), progress(args, backend):
        t0 = time.perf_counter()
        train, valid = list_args.split(train, args), list_args.split(valid, args)  # as in the first fit's --list-cols
        train.check_columns(needed)
        if valid is not None:
            valid.check_columns(needed)
        before = workflow.output_schema()
        if not args.no_cache and fits_in_memory(train, args.memory_limit):
            train = train.persist(needed)
        if valid is None:
            train, valid = random_split(train, args.valid_fraction or DEFAULTS.valid_fraction, args.seed)
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
    summary = summarize(schema, workflow, rows, train_files, valid_files, seconds, fit_s, write_s, backend.name)
    summary["output"] = args.output
    print(f"updated {src} with {', '.join(args.input)} (day {len(workflow.seen)}): "
          f"{len(grown)} categorical column(s) grew; updated workflow in {os.path.join(args.output, 'workflow')}")
    return summary

