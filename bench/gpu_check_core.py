"""Shared state of ``bench/gpu_check.py``: the ``Check`` (report, time budget, output files) and small helpers.

Imported as ``ctrflow.bench.gpu_check_core`` once ``gpu_check.ensure_ctrflow`` has made ``ctrflow`` importable.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from ctrflow.bench.gpu_check_report import goals, table

N_CAT, N_CONT = 26, 13
ROW_BYTES = 4 * (N_CAT + N_CONT + 1)  # int32 ids, float32 continuous, float32 label
SHARE = {"tests": 0.22, "data": 0.15, "loader": 0.12, "train": 0.38, "serve": 0.08}  # of --budget-s


def sync(device: Any) -> None:
    """Wait for ``device``'s queued work (a no-op off CUDA)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def error_text(e: BaseException) -> str:
    """``Type: first line of the message`` for the report."""
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


class Check:
    """The report, the time budget, shared state between sections and the output files of one run.

    Args:
        args: the parsed command line.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.t0, self.lock = args, time.perf_counter(), threading.Lock()
        self.state: dict[str, Any] = {}
        self.proc: subprocess.Popen | None = None
        self.device: Any = None  # torch.device, set by main
        self.work, self.schema = "", None  # the generated data's parent directory; its Schema (train section)
        self.report: dict[str, Any] = {"check": "bench/gpu_check.py", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                       "args": vars(args), "sections": {}}

    def left(self) -> float:
        """Seconds left of ``--budget-s``."""
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def deadline(self, name: str) -> float:
        """``perf_counter`` time by which section ``name`` should end (its share, within the budget)."""
        return time.perf_counter() + max(0.0, min(SHARE[name] * self.args.budget_s, self.left()))

    def section(self, name: str, fn: Callable[..., dict[str, Any]]) -> None:
        """Run ``fn(self, deadline)``; record its result or its error, the seconds, then write the outputs."""
        t = time.perf_counter()
        self.report["running"] = name  # what the watchdog names if it fires
        if name in self.args.skip:
            rec: dict[str, Any] = {"status": "skipped", "error": "--skip"}
        elif self.left() < 3:
            rec = {"status": "skipped", "error": f"time budget spent ({self.args.budget_s:.0f}s)"}
        else:
            try:
                rec = {"status": "ok", **fn(self, self.deadline(name))}
            except Exception as e:  # one section's failure must not stop the others
                rec = {"status": "error", "error": error_text(e), "traceback": traceback.format_exc(limit=6)}
        rec["seconds"] = round(time.perf_counter() - t, 2)
        self.report["sections"][name] = rec
        self.report.pop("running", None)
        print(f"[gpu_check] {name}: {rec['status']} in {rec['seconds']}s {rec.get('error', '')}", file=sys.stderr,
              flush=True)
        self.write()

    def write(self) -> str:
        """Write ``gpu_check.json`` and ``gpu_check.md`` atomically; returns the table."""
        with self.lock:
            self.report["seconds"] = round(time.perf_counter() - self.t0, 1)
            self.report["goals"] = goals(self.report)
            md = table(self.report)
            os.makedirs(self.args.out, exist_ok=True)
            for name, text in (("gpu_check.json", json.dumps(self.report, indent=2, default=str)),
                               ("gpu_check.md", md)):
                path = os.path.join(self.args.out, name)
                with open(path + ".tmp", "w") as f:
                    f.write(text + "\n")
                os.replace(path + ".tmp", path)
            return md

    def watchdog(self, limit: float) -> None:
        """After ``limit`` seconds: stop the pytest child, write what is there, print it and exit(3)."""

        def fire() -> None:
            self.report["watchdog"] = (f"stopped after {limit:.0f}s (--budget-s {self.args.budget_s:.0f} + 45) in "
                                       f"section {self.report.get('running', '?')}")
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
            print(self.write(), flush=True)
            os._exit(3)

        timer = threading.Timer(limit, fire)
        timer.daemon = True
        timer.start()

