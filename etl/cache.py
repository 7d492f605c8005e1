"""Where generated data is cached: one place the user controls, never the checkout or the cwd.

Order: an explicit directory (a ``--cache-dir`` flag) > ``$CTRFLOW_CACHE_DIR`` >
``$XDG_CACHE_HOME/ctrflow`` > ``~/.cache/ctrflow``. The synthetic raw logs of ``etl/run.py`` and the
benchmarks' generated inputs live under it, one sub-directory per kind of data, keyed by everything
that changes the bytes (rows, seed, generator version), so a cache is reused only when it is the same
data. ``rm -rf`` of the directory is always safe: everything in it is regenerated on demand.
"""

from __future__ import annotations

import os

ENV = "CTRFLOW_CACHE_DIR"


def cache_dir(explicit: str | None = None, *parts: str) -> str:
    """The cache directory (not created), optionally joined with ``parts``.

    Args:
        explicit: a directory the user passed on the command line; wins over the environment.
        *parts: sub-directories below the cache root, e.g. ``("synthetic", "rows-2000000-seed0-v3")``.

    Returns:
        An absolute path.
    """
    root = explicit or os.environ.get(ENV)
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "ctrflow")
    return os.path.abspath(os.path.join(os.path.expanduser(root), *parts))
