"""One producer thread per epoch, a bounded queue, and an iterator that cleans up after itself.

The producer pulls chunks from a generator (each pull reads, converts and shuffles one chunk) and
puts them on a queue. A semaphore with two permits bounds memory: the producer takes a permit
*before* building a chunk and the consumer gives it back once it has handed out the first batch of
the following chunk (by then the caller no longer holds the old chunk's last batch, so its buffers
can be reused), so about two chunks exist at once however large the dataset.

Failure and shutdown:
- an exception in the producer is put on the queue and re-raised by ``__next__`` (the same exception
  object, so its traceback still shows the producer's frames);
- ``close()`` (also run by ``Loader.stop()``, by the context manager, and by a ``weakref.finalize``
  when an abandoned iterator is garbage-collected) sets a stop event, wakes the producer, joins it
  and drops queued chunks. The thread holds no reference to the iterator, so dropping the iterator
  is enough for it to be collected.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

_END = object()
_POLL_S = 0.1  # how often blocked waits re-check the stop event / producer liveness
_JOIN_S = 30.0


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            pass
    return False


def _produce(
    chunks: Iterator[Any],
    q: queue.Queue,
    stop: threading.Event,
    slots: threading.Semaphore,
    init: Callable[[], None] | None,
) -> None:
    try:
        if init is not None:
            init()
        while True:
            while not slots.acquire(timeout=_POLL_S):
                if stop.is_set():
                    return
            if stop.is_set():
                return
            try:
                chunk = next(chunks)
            except StopIteration:
                _put(q, _END, stop)
                return
            if chunk is None:  # nothing complete yet (rows carried over): keep the permit
                slots.release()
                continue
            if not _put(q, chunk, stop):
                return
    except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
        _put(q, _Failure(e), stop)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _shutdown(stop: threading.Event, slots: threading.Semaphore, q: queue.Queue, thread: threading.Thread) -> None:
    stop.set()
    slots.release(2)  # wake a producer waiting for a permit
    if thread is not threading.current_thread() and thread.ident is not None:
        thread.join(_JOIN_S)
    while True:  # drop queued chunks now rather than when the queue itself is collected
        try:
            q.get_nowait()
        except queue.Empty:
            break


class EpochIterator:
    """Iterates one epoch: starts the producer thread and turns chunks into batches.

    Args:
        chunks: generator of chunks (or ``None`` for "no batch yet"); runs in the producer thread.
        make_batch: ``(chunk, k) -> batch`` for the ``k``-th batch of a chunk (a view).
        on_chunk: called in the consumer's thread on every chunk before use (CUDA stream sync).
        init: called first in the producer thread (e.g. ``torch.cuda.set_device``).
        name: thread name.
    """

    def __init__(
        self,
        chunks: Iterator[Any],
        make_batch: Callable[[Any, int], Any],
        on_chunk: Callable[[Any], None] | None = None,
        init: Callable[[], None] | None = None,
        name: str = "ctrflow-loader",
    ) -> None:
        self._make_batch, self._on_chunk = make_batch, on_chunk
        self._q: queue.Queue = queue.Queue(maxsize=4)
        self._stop = threading.Event()
        self._slots = threading.Semaphore(2)
        self.thread = threading.Thread(
            target=_produce, args=(chunks, self._q, self._stop, self._slots, init), name=name, daemon=True
        )
        self._finalizer = weakref.finalize(self, _shutdown, self._stop, self._slots, self._q, self.thread)
        self._chunk: Any = None
        self._k = 0
        self._pending = 0  # permits of chunks moved past but possibly still referenced by the caller
        self._done = False
        self.thread.start()

    def __iter__(self) -> EpochIterator:
        return self

    def __next__(self) -> Any:
        if self._pending and self._k > 0:
            # The caller has dropped the previous chunk's last batch by now (its loop variable
            # holds a batch of the current chunk), so the producer may reuse that chunk's memory.
            self._slots.release(self._pending)
            self._pending = 0
        while self._chunk is None or self._k >= self._chunk.batches:
            if self._chunk is not None:
                self._chunk = None
                if self._pending:
                    self._slots.release(self._pending)
                self._pending = 1
            if self._done:
                raise StopIteration
            item = self._get()
            if item is _END:
                self.close()
                raise StopIteration
            if isinstance(item, _Failure):
                self.close()
                raise item.exc
            if self._on_chunk is not None:
                self._on_chunk(item)
            self._chunk, self._k = item, 0
        self._k += 1
        return self._make_batch(self._chunk, self._k - 1)

    def _get(self) -> Any:
        while True:
            try:
                return self._q.get(timeout=_POLL_S)
            except queue.Empty:
                if not self.thread.is_alive():
                    try:
                        return self._q.get_nowait()
                    except queue.Empty:
                        raise RuntimeError("ctrflow.loader: the producer thread ended without a result") from None

    @property
    def alive(self) -> bool:
        return self._finalizer.alive

    def close(self) -> None:
        """Stop the producer thread and drop everything it queued (idempotent)."""
        self._done = True
        self._chunk = None
        self._finalizer()
