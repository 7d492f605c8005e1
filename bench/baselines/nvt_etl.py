"""NVTabular 23.08 (CPU mode) side of ``bench/etl.py``: the Criteo workflow on raw parquet.

Runs inside the pinned venv made by ``bench/baselines/nvtabular_venv.sh`` (pandas 1.5, numpy 1.26),
never in ctrflow's own environment. The workflow is NVTabular's Criteo example:
``Categorify(freq_threshold=2)`` on C1..C26; ``FillMissing -> Clip(min_value=0) -> LogOp ->
Normalize`` on I1..I13; ``label`` passed through. It fits on the train files, then transforms and
writes train (and valid, if given) with ``Dataset.to_parquet`` (no shuffle, so row order is kept),
timing fit and transform+write separately.

Usage (the venv's python):
    bench/.venvs/nvtabular/bin/python bench/baselines/nvt_etl.py \
        --train RAW/train --valid RAW/valid --out SCRATCH/etl-nvtabular --json result.json

Prints one JSON object (last line of stdout) and writes it to ``--json`` when given:
``{"fit_s", "transform_write_s", "transform_write_s_by_split", "cpu_s", "save_s", "rows": {split: n},
"versions": {...}}``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time
import warnings

CATS = [f"C{i}" for i in range(1, 27)]
CONTS = [f"I{i}" for i in range(1, 14)]
LABEL = "label"


def _files(source: str) -> list[str]:
    """Parquet files of a directory (sorted), or a glob / single file."""
    if os.path.isdir(source):
        found = sorted(glob.glob(os.path.join(source, "*.parquet")))
    else:
        found = sorted(glob.glob(source))
    if not found:
        raise SystemExit(f"error: no parquet files at {source}")
    return found


def _rows_written(out_dir: str) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in glob.glob(os.path.join(out_dir, "*.parquet")))


def run(train: list[str], valid: list[str] | None, out: str, part_size: str | None) -> dict:
    """Fit on ``train``, transform+write each split into ``out/<split>``; return the timings.

    Args:
        train: raw train parquet files.
        valid: raw validation parquet files, or None.
        out: output directory (replaced).
        part_size: NVTabular ``Dataset(part_size=...)``; None keeps its default.

    Returns:
        JSON-safe dict with seconds, rows per split and library versions.
    """
    import dask
    import merlin.core
    import numpy as np
    import nvtabular as nvt
    import pandas as pd
    import pyarrow as pa
    from nvtabular import ops

    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    # Categorify writes its vocabularies under out_path (default: the current directory).
    stats_dir = os.path.join(out, "fit-stats")
    cats = CATS >> ops.Categorify(freq_threshold=2, out_path=stats_dir)
    conts = CONTS >> ops.FillMissing() >> ops.Clip(min_value=0) >> ops.LogOp() >> ops.Normalize()
    wf = nvt.Workflow(cats + conts + [LABEL])
    ds_kw = {"engine": "parquet", "cpu": True}
    if part_size:
        ds_kw["part_size"] = part_size

    c0, t0 = time.process_time(), time.perf_counter()
    wf.fit(nvt.Dataset(train, **ds_kw))
    fit_s = time.perf_counter() - t0

    by_split: dict[str, float] = {}
    rows: dict[str, int] = {}
    for split, files in (("train", train), ("valid", valid)):
        if not files:
            continue
        t0 = time.perf_counter()
        wf.transform(nvt.Dataset(files, **ds_kw)).to_parquet(os.path.join(out, split), shuffle=None)
        by_split[split] = time.perf_counter() - t0
        rows[split] = _rows_written(os.path.join(out, split))
    cpu_s = time.process_time() - c0

    t0 = time.perf_counter()
    wf.save(os.path.join(out, "workflow"))
    save_s = time.perf_counter() - t0
    shutil.rmtree(stats_dir, ignore_errors=True)
    return {
        "system": "nvtabular",
        "fit_s": fit_s,
        "transform_write_s": sum(by_split.values()),
        "transform_write_s_by_split": by_split,
        "cpu_s": cpu_s,
        "save_s": save_s,
        "rows": rows,
        "embedding_sizes": {k: list(v) for k, v in ops.get_embedding_sizes(wf).items()},
        "versions": {
            "python": sys.version.split()[0],
            "nvtabular": nvt.__version__,
            "merlin-core": merlin.core.__version__,
            "dask": dask.__version__,
            "pandas": pd.__version__,
            "numpy": np.__version__,
            "pyarrow": pa.__version__,
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True, help="raw train parquet: directory, glob or file")
    p.add_argument("--valid", help="raw validation parquet: directory, glob or file")
    p.add_argument("--out", required=True, help="output directory (replaced)")
    p.add_argument("--part-size", help="NVTabular Dataset part_size (e.g. 256MB); default: its own")
    p.add_argument("--json", help="also write the result JSON here")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")  # merlin's Triton/tensorflow-metadata import warnings
    res = run(_files(a.train), _files(a.valid) if a.valid else None, a.out, a.part_size)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
