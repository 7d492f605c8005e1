"""Online serving: the fitted workflow and the trained model behind one HTTP API (issue #6).

``Predictor.from_run(RUN_DIR)`` scores raw rows in-process (``predict``, ``rank``); ``create_app`` wraps
it in a FastAPI app; ``python -m ctrflow.serve --run RUN_DIR`` (or ``ctrflow-serve``) runs that app
with uvicorn. FastAPI is imported only by ``create_app``, so batch scoring needs just the core deps.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP (when this import is the first): idle OpenMP threads sleep instead of
# spinning. Measured here with other threads busy (the server's, other processes): a 256-row DLRM call
# took 423 ms with spinning threads, 9 ms without (train/fit.py does the same for the same reason).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from typing import Any  # noqa: E402

from ctrflow.serve.inputs import ServeError  # noqa: E402
from ctrflow.serve.predictor import Predictor, RunError, model_from_checkpoint  # noqa: E402


def create_app(*args: Any, **kwargs: Any) -> Any:
    """See :func:`ctrflow.serve.app.create_app` (imported on use: it needs the ``serve`` extra)."""
    from ctrflow.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["Predictor", "RunError", "ServeError", "create_app", "model_from_checkpoint"]
