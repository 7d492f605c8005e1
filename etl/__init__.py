"""ctrflow.etl: NVTabular-style Dataset / Workflow / ops on Dask (pandas on CPU, cuDF on GPU).

Heavy modules (Dask) load lazily, so ``ctrflow.etl.schema`` stays importable where Dask is absent
(the loader and models only need the schema).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Dataset": "ctrflow.etl.dataset",
    "Workflow": "ctrflow.etl.workflow",
    "ColumnSelector": "ctrflow.etl.graph",
    "get_embedding_sizes": "ctrflow.etl.workflow",
    "Schema": "ctrflow.etl.schema",
    "ColumnSchema": "ctrflow.etl.schema",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ctrflow.etl' has no attribute {name!r}")
