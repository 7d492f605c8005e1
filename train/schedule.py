"""The learning-rate schedule: a linear warm-up, then a cosine or linear decay to a floor."""

from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, decay: str = "cosine",
              min_factor: float = 0.0) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): linear warm-up, then decay.

    Args:
        step: optimizer steps taken so far.
        total_steps: steps of the whole run (the decay reaches ``min_factor`` there).
        warmup_steps: linear ramp from ``1 / warmup_steps`` to 1.
        decay: ``cosine``, ``linear`` or ``none``.
        min_factor: floor of the decay.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "none" or total_steps <= warmup_steps:
        return 1.0
    frac = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "linear":
        return min_factor + (1 - min_factor) * (1 - frac)
    if decay == "cosine":
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * frac))
    raise ValueError(f"unknown decay {decay!r}; choose cosine, linear or none")
