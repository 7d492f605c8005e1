"""Run logging: a small progress bar, ``metrics.jsonl``, and TensorBoard when it is installed.

Trackers share one interface (``log(record)`` / ``close()``), like accelerate's ``tracking.py``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, TextIO


class ProgressBar:
    """A one-line progress bar on stderr; silent when stderr is not a terminal.

    Args:
        total: steps to reach 100% (None: show the count only).
        stream: where to draw (default ``sys.stderr``).
        enabled: force on / off (default: on when ``stream`` is a TTY).
    """

    def __init__(self, total: int | None, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.start = time.perf_counter()
        self._last = 0.0
        self._drawn = False

    def update(self, n: int, postfix: str = "", force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        el = now - self.start
        if self.total:
            frac = min(1.0, n / self.total)
            bar = "#" * int(frac * 24)
            eta = el / frac - el if frac > 0 else 0
            line = f"{frac:4.0%} |{bar:<24}| {n}/{self.total} [{_hms(el)}<{_hms(eta)}] {postfix}"
        else:
            line = f"{n} steps [{_hms(el)}] {postfix}"
        self.stream.write("\r" + line[:150].ljust(80))
        self.stream.flush()
        self._drawn = True

    def clear(self) -> None:
        """Erase the bar so a log line can be printed cleanly."""
        if self._drawn:
            self.stream.write("\r" + " " * 150 + "\r")
            self.stream.flush()
            self._drawn = False

    def close(self) -> None:
        self.clear()


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def _clean(v: Any) -> Any:
    """JSON-safe value: NaN / inf become None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class JsonlTracker:
    """Appends one JSON object per record to ``path`` (flushed each time, so a crash keeps the log)."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._f = open(path, "a")

    def log(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoardTracker:
    """Scalars to TensorBoard under ``log_dir``; build with :func:`tensorboard_tracker`."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def log(self, record: dict[str, Any]) -> None:
        kind = record.get("kind", "train")
        step = int(record.get("step", 0))
        for k, v in record.items():
            if k not in ("kind", "step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self.writer.close()


def tensorboard_tracker(log_dir: str) -> TensorBoardTracker | None:
    """A TensorBoard tracker, or None when ``torch.utils.tensorboard`` cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return TensorBoardTracker(SummaryWriter(log_dir=log_dir))


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
