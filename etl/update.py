"""Incremental days: what ``Workflow.update`` does, and the record of the inputs a workflow ingested.

The update logic lives beside what it updates: ``Workflow.update`` (etl/workflow.py) runs each stat
op's ``update_finalize``, which merges the partials its ``fit`` computes on the new data into the stats
it keeps (moment and sketch merges: etl/stats.py; count merges: etl/ops/counts.py); the command line's
``--update`` path is etl/cli_update.py. Op by op:

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
  whose decayed count falls under ``ops.counts.PRUNE`` are forgotten to bound memory.
  Embedding dims stay those of the first fit (pinned in the stats at the first update), so a model
  trained before the update can grow its tables without changing their width.

The workflow records a content fingerprint of every input it ingested (``Workflow.seen``) and
refuses an input whose files it has seen before unless ``force=True``.

Example:
    >>> wf = Workflow.load("day1/workflow")
    >>> wf.update(Dataset("raw/day2.parquet"), decay=0.9)  # then wf.transform(...) / wf.save(...)
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

FINGERPRINT_BYTES = 1 << 20  # hashed at each end of a file: day files are many GB


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
