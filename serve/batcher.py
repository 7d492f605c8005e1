"""``Batcher``: concurrent requests share one transform + model call (dynamic batching).

Each request is parsed and validated on its own (its errors stay its own), then its typed columns
are queued. A worker thread takes whatever is queued -- up to ``max_rows`` rows -- stacks it and runs
the workflow on it once (``Predictor.transform_columns``); a second thread runs the model on that batch and
hands every request its slice of the scores. Under load this pays the per-call costs (the planned
transform's fixed part: ~2.8 ms of its 3.5 ms for 256 rows, 8.2 ms for 2,048; kernel launches) once per
batch instead of once per request; an idle server answers a lone request at once (no waiting for company).
The two stages overlap: the model (torch, which releases the GIL) scores batch k on one core while the
workflow (numpy / arrow, partly holding the GIL) transforms batch k + 1 on the other.

Scores do not depend on the company a request keeps: every op and the model (in eval mode) work row
by row. A batch that fails as a whole is retried request by request, so one bad request cannot fail
the others.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future

import numpy as np
import pyarrow as pa

from ctrflow.serve.inputs import concat_columns, num_rows
from ctrflow.serve.predictor import Predictor

_Batch = list[tuple[dict[str, pa.Array], Future]]


class Batcher:
    """One worker thread scoring queued requests in batches.

    Args:
        predictor: does the work (``score_columns``).
        max_rows: most rows per batch (a larger single request still runs alone); default the
            predictor's ``batch_size``.
        max_wait_ms: longest a batch waits for requests still being parsed (:attr:`parsing` > 0).
    """

    def __init__(self, predictor: Predictor, max_rows: int | None = None, max_wait_ms: float = 5.0) -> None:
        self.predictor = predictor
        self.max_rows = int(max_rows or predictor.batch_size)
        self.max_wait_s = max_wait_ms / 1000
        self.parsing = 0  # requests accepted and being parsed (kept by the app; read here, so no lock)
        self._queue: queue.Queue = queue.Queue()
        # One transformed batch waits for the model at most: the transform stays at most one batch ahead,
        # so requests queue (and batch up) in _queue, not behind a finished transform.
        self._scored: queue.Queue = queue.Queue(maxsize=1)
        # Released when the model thread takes a batch: the next batch is collected only then, so it holds
        # every request that arrived meanwhile (bigger batches under load, the same pipeline depth).
        self._model_free = threading.Semaphore(1)
        self._closed = False
        self.batches = 0  # model calls so far (for /metadata and tests)
        self.requests = 0
        self._thread = threading.Thread(target=self._run, name="ctrflow-serve-batcher", daemon=True)
        self._model_thread = threading.Thread(target=self._run_model, name="ctrflow-serve-model", daemon=True)
        self._thread.start()
        self._model_thread.start()

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
            self._model_thread.join(timeout)

    def _run(self) -> None:
        carry = None
        while True:
            item = carry or self._queue.get()
            carry = None
            if item is None:
                self._scored.put(None)
                return
            self._model_free.acquire()
            batch, rows = [item], num_rows(item[0])
            deadline = time.monotonic() + self.max_wait_s
            while rows < self.max_rows:
                # Requests already being parsed join this batch if they come within max_wait_s: one more
                # transform (~3 ms of CPU) costs more than waiting a few ms for them. An idle server never waits.
                wait = deadline - time.monotonic() if self.parsing > 0 else 0.0
                try:
                    nxt = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    if self.parsing > 0 and deadline > time.monotonic():
                        continue
                    break
                if nxt is None or rows + num_rows(nxt[0]) > self.max_rows:
                    carry = nxt  # the stop signal, or the first request of the next batch
                    break
                batch.append(nxt)
                rows += num_rows(nxt[0])
            if not self._score(batch):
                self._model_free.release()  # nothing went to the model thread

    def _score(self, batch: _Batch) -> bool:
        """Transform a batch here, then queue it for the model thread (a failed batch: request by request, here).

        Returns:
            Whether the batch went to the model thread.
        """
        live = [(cols, fut) for cols, fut in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return False
        self.batches += 1
        self.requests += len(live)
        try:
            processed = self.predictor.transform_columns(concat_columns([c for c, _ in live]))
        except Exception as e:
            if len(live) == 1:
                live[0][1].set_exception(e)
            else:
                self._one_by_one(live)
            return False
        self._scored.put((live, processed))
        return True

    def _run_model(self) -> None:
        while (item := self._scored.get()) is not None:
            self._model_free.release()
            live, processed = item
            try:
                scores = self.predictor.predict_processed(processed)
            except Exception as e:
                if len(live) == 1:
                    live[0][1].set_exception(e)
                else:
                    self._one_by_one(live)
                continue
            bounds = np.cumsum([0] + [num_rows(c) for c, _ in live])
            for (_, fut), lo, hi in zip(live, bounds[:-1], bounds[1:], strict=True):
                fut.set_result(scores[lo:hi])

    def _one_by_one(self, live: _Batch) -> None:
        """Find the culprit of a failed batch: each request scored alone, each with its own result or error."""
        for cols, fut in live:
            try:
                fut.set_result(self.predictor.score_columns(cols))
            except Exception as e:
                fut.set_exception(e)

