"""Where a benchmark writes: its result JSON where ``--json`` says, everything else under the cache.

Generated inputs (and other intermediates worth reusing) live under ``CACHE/bench/``, where CACHE is
``ctrflow.etl.cache.cache_dir`` (``--cache-dir`` > ``$CTRFLOW_CACHE_DIR`` > ``$XDG_CACHE_HOME/ctrflow`` >
``~/.cache/ctrflow``), each in a directory named after everything that changes its bytes. Outputs that
are only timed (processed datasets, training runs) go into a temporary directory under the same root
(same file system as the inputs, so timings do not depend on ``/tmp`` being in memory), removed at the
end. Without ``--json`` the result goes to ``CACHE/bench/<name>.json``. Nothing is written into the
checkout or the working directory unless the user points a flag there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

from ctrflow.etl.cache import cache_dir


def add_output_args(p: argparse.ArgumentParser, name: str) -> None:
    """Add ``--cache-dir`` and ``--json`` (default ``CACHE/bench/<name>.json``) to a benchmark's parser.

    Args:
        p: the benchmark's argument parser.
        name: the benchmark's name, used for the default JSON file name.
    """
    p.add_argument("--cache-dir", default=None,
                   help="where generated inputs are kept and reused, and scratch outputs made (default: "
                        "$CTRFLOW_CACHE_DIR, else $XDG_CACHE_HOME/ctrflow, else ~/.cache/ctrflow); "
                        "data lands in CACHE/bench/")
    p.add_argument("--json", default=None, help=f"result JSON (default CACHE/bench/{name}.json)")


def bench_dir(explicit: str | None, *parts: str) -> str:
    """``CACHE/bench/<parts>`` as an absolute path (not created).

    Args:
        explicit: the ``--cache-dir`` value, or None for the environment's default.
        *parts: sub-paths below ``CACHE/bench``.

    Returns:
        An absolute path.
    """
    return cache_dir(explicit, "bench", *parts)


def json_path(a: argparse.Namespace, name: str) -> str:
    """The result JSON's path: ``--json`` as given (relative to the cwd), else ``CACHE/bench/<name>.json``."""
    return os.path.abspath(a.json) if a.json else bench_dir(a.cache_dir, f"{name}.json")


def scratch(explicit: str | None, name: str) -> tempfile.TemporaryDirectory:
    """A temporary directory under ``CACHE/bench`` for outputs that are timed, not kept.

    Args:
        explicit: the ``--cache-dir`` value, or None.
        name: prefix of the directory name (shows whose leftovers a killed run left behind).

    Returns:
        A ``TemporaryDirectory``; use it as a context manager so it is removed however the run ends.
    """
    root = bench_dir(explicit)
    os.makedirs(root, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=f".scratch-{name}-", dir=root)


def announce(path: str, reused: bool) -> None:
    """Say on stderr where cached input data lives, so a user can find (and delete) it."""
    print(f"data: {path} ({'cached, reused' if reused else 'generated, cached for later runs'})", file=sys.stderr)


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (a killed run leaves no half file) and say where.

    Args:
        path: destination; its directory is created.
        obj: JSON-serialisable object (other values fall back to ``str``).
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)
    print(f"wrote {path}")
