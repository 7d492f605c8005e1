"""Best-checkpoint selection and early stopping: which evaluation was best, and when to stop looking.

The trainer asks :class:`BestTracker` after every evaluation. It keeps the best value of the chosen
metric (AUC higher is better; logloss, RMSE, loss lower), the step it came from and how many
evaluations have passed since, and it travels inside every checkpoint so a resumed run keeps it.
"""

from __future__ import annotations

import math
from typing import Any

HIGHER_IS_BETTER = {"auc": True, "ap": True, "logloss": False, "rmse": False, "mse": False, "loss": False}


def default_metric(task: str) -> str:
    """The metric a task selects by: AUC for binary, RMSE for regression."""
    return "auc" if task == "binary" else "rmse"


class BestTracker:
    """The best evaluation so far by one metric.

    Args:
        metric: a key of the evaluation results (see :data:`HIGHER_IS_BETTER`).
        patience: stop after this many evaluations without improvement (None: never stop early).
        min_delta: the least change that counts as an improvement.
    """

    def __init__(self, metric: str, patience: int | None = None, min_delta: float = 0.0) -> None:
        if metric not in HIGHER_IS_BETTER:
            raise ValueError(f"unknown selection metric {metric!r}; choose one of {', '.join(HIGHER_IS_BETTER)}")
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.metric, self.patience, self.min_delta = metric, patience, float(min_delta)
        self.best: float | None = None
        self.step: int | None = None
        self.results: dict[str, float] = {}
        self.since = 0  # evaluations since the best

    def update(self, step: int, results: dict[str, float]) -> bool:
        """Record an evaluation; True when it is the new best (a NaN never is)."""
        value = results.get(self.metric)
        if value is None or not math.isfinite(value):
            self.since += 1
            return False
        better = self.best is None or (
            value > self.best + self.min_delta if HIGHER_IS_BETTER[self.metric] else value < self.best - self.min_delta)
        if better:
            self.best, self.step, self.results, self.since = float(value), int(step), dict(results), 0
        else:
            self.since += 1
        return better

    @property
    def should_stop(self) -> bool:
        """Patience is used up."""
        return self.patience is not None and self.since >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "best": self.best, "step": self.step, "results": self.results,
                "since": self.since}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore (a checkpoint of another metric, or none, starts afresh)."""
        if not state or state.get("metric") != self.metric:
            return
        self.best, self.step = state.get("best"), state.get("step")
        self.results, self.since = dict(state.get("results") or {}), int(state.get("since", 0))
