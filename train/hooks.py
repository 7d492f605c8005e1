"""Calling a model's own training / validation hooks the way its author wrote them.

Seed 000's toolkit calls ``training_step(batch)``; Lightning calls ``training_step(batch, batch_idx)``.
The trainer accepts both, so either kind of model runs unchanged.
"""

from __future__ import annotations

import inspect
from typing import Any


def call_hook(hook: Any, batch: Any, batch_idx: int) -> Any:
    """Call a model's ``training_step`` / ``validation_step`` as seed 000 (``(batch)``) or Lightning
    (``(batch, batch_idx)``) writes it, by the number of positional parameters it takes."""
    try:
        params = inspect.signature(hook).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: the plain convention
        return hook(batch)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_more = any(p.kind == p.VAR_POSITIONAL for p in params) or len(positional) >= 2
    return hook(batch, batch_idx) if takes_more else hook(batch)
