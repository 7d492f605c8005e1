"""``Batcher``: concurrent requests share one transform + model call (dynamic batching).

Each request is parsed and validated on its own (its errors stay its own), then its typed columns
are queued. One worker thread takes whatever is queued -- up to ``max_rows`` rows -- stacks it, runs
``Predictor.score_columns`` once and hands every request its slice of the scores. Under load this
pays the per-call costs (the workflow's per-frame overhead, kernel launches) once per batch instead of
once per request; an idle server answers a lone request at once (no waiting for company).

Scores do not depend on the company a request keeps: every op and the model (in eval mode) work row
by row. A batch that fails as a whole is retried request by request, so one bad request cannot fail
the others.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping
from concurrent.futures import Future

import numpy as np
import pyarrow as pa

from ctrflow.serve.inputs import concat_columns, num_rows
from ctrflow.serve.predictor import Predictor


class Batcher:
    """One worker thread scoring queued requests in batches.

    Args:
        predictor: does the work (``score_columns``).
        max_rows: most rows per batch (a larger single request still runs alone); default the
            predictor's ``batch_size``.
    """

    def __init__(self, predictor: Predictor, max_rows: int | None = None) -> None:
        self.predictor = predictor
        self.max_rows = int(max_rows or predictor.batch_size)
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self.batches = 0  # model calls so far (for /metadata and tests)
        self.requests = 0
        self._thread = threading.Thread(target=self._run, name="ctrflow-serve-batcher", daemon=True)
        self._thread.start()

    def submit(self, columns: Mapping[str, pa.Array]) -> Future:
        """Queue one request's validated columns; the future's result is its ``[B]`` scores."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        fut: Future = Future()
        self._queue.put((dict(columns), fut))
        return fut

    def close(self, timeout: float | None = 10.0) -> None:
        """Finish what is queued, then stop the worker."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout)

    def _run(self) -> None:
        carry = None
        while True:
            item = carry or self._queue.get()
            carry = None
            if item is None:
                return
            batch, rows = [item], num_rows(item[0])
            while rows < self.max_rows:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None or rows + num_rows(nxt[0]) > self.max_rows:
                    carry = nxt  # the stop signal, or the first request of the next batch
                    break
                batch.append(nxt)
                rows += num_rows(nxt[0])
            self._score(batch)

    def _score(self, batch: list[tuple[dict[str, pa.Array], Future]]) -> None:
        live = [(cols, fut) for cols, fut in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        self.batches += 1
        self.requests += len(live)
        try:
            scores = self.predictor.score_columns(concat_columns([c for c, _ in live]))
        except Exception as e:
            if len(live) == 1:
                live[0][1].set_exception(e)
                return
            for cols, fut in live:  # find the culprit: each request alone
                try:
                    fut.set_result(self.predictor.score_columns(cols))
                except Exception as e1:
                    fut.set_exception(e1)
            return
        bounds = np.cumsum([0] + [num_rows(c) for c, _ in live])
        for (_, fut), lo, hi in zip(live, bounds[:-1], bounds[1:], strict=True):
            fut.set_result(scores[lo:hi])
