"""pytest plugin of ``bench/gpu_check.py``: a test module that cannot import for want of Dask is skipped.

The GPU image has no Dask, and the serve / ETL test modules import it (through ``ctrflow.etl``) at module
level. Without this plugin their collection errors would read as failures; with
``pytest -p ctrflow.bench.gpu_check_plugin`` they are reported as skipped, with the reason
``SKIP_REASON``, and every other test still runs.
"""

from __future__ import annotations

import re
from collections.abc import Generator
from typing import Any

import pytest

SKIP_REASON = "imports Dask (or RAPIDS), absent here"
_MISSING = re.compile(r"No module named '(dask|distributed|dask_cudf|cudf)\b")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    """Turn a module's collection error caused by a missing Dask into a skip (as ``importorskip`` would)."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and isinstance(collector, pytest.Module) and _MISSING.search(str(rep.longrepr)):
        rep.outcome = "skipped"
        rep.longrepr = (str(collector.path), 0, f"Skipped: {SKIP_REASON}")
