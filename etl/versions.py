"""Versions of the libraries that wrote a workflow or dataset (recorded beside the stats)."""

from __future__ import annotations

from importlib import metadata


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("ctrflow", "pandas", "pyarrow", "numpy", "dask"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out
