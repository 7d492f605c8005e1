"""Several server processes on one port (``python -m ctrflow.serve --processes N``).

One process serves at most what one GIL allows (JSON, validation and the transform hold it for most of
a request), so on a machine with several cores N processes serve up to N times as much. The parent binds
the port with ``SO_REUSEPORT`` (a busy port still fails before anything loads) and holds it, then starts N
children with the ``spawn`` method (a fresh interpreter each: no OpenMP or arrow thread pool copied
mid-state by ``fork``). Every child loads the run, listens on the port with a ``SO_REUSEPORT`` socket of
its own and serves it with its own uvicorn; the kernel spreads new connections over the children by a
hash of their addresses (Linux lets only sockets of the same user join a port's ``SO_REUSEPORT`` group,
so no other user's process can listen beside them). One shared listening socket was tried first: the
idle child that won the accept races took 7 or 8 of 8 keep-alive clients, so one process did nearly all
the work. Each child has its own limits (``--max-in-flight`` and the batcher are per process), its own
token check and its own ``/health``.

The parent only supervises: it prints one line when every child is ready; a child that fails to load
(a bad run directory: exit 2 with its one-line error) or dies later stops the others (exit 2 / 1: a
supervisor such as systemd restarts the whole server); SIGTERM / SIGINT stop every child gracefully
(uvicorn finishes the requests in flight) and the parent returns 0 / 130. A child also gets SIGTERM
when the parent dies, even by SIGKILL (Linux ``PR_SET_PDEATHSIG``), so no child outlives it.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

_PR_SET_PDEATHSIG = 1


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def parse_processes(value: str) -> int:
    """``--processes``: a count >= 1, or ``auto`` (one per usable core).

    Raises:
        ValueError: neither.
    """
    if value.strip().lower() == "auto":
        return usable_cores()
    n = int(value)
    if n < 1:
        raise ValueError(f"must be >= 1 or auto, got {n}")
    return n


def threads_per_process(processes: int, threads: int | None = None) -> int | None:
    """torch CPU threads of each process: ``threads`` when given, else the cores shared out
    (``max(1, cores // processes)``) so N processes do not oversubscribe them; None (torch's default) for one."""
    if threads is not None:
        return threads
    return max(1, usable_cores() // processes) if processes > 1 else None


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux for SIGTERM when the parent dies; exit now if it already has (no orphan child)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def listen_socket(address: tuple[int, Any], backlog: int = 2048) -> socket.socket:
    """A child's own socket listening on the parent's port (``SO_REUSEPORT``; ``address``: family, sockaddr)."""
    family, addr = address
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.listen(backlog)  # uvicorn's backlog; listening before "ready", so no connection is refused
    except BaseException:
        sock.close()
        raise
    return sock


def run_processes(sock: socket.socket, processes: int, target: Callable[..., Any], args: tuple[Any, ...],
                  grace_s: float = 30.0, on_ready: Callable[[Any], None] | None = None) -> int:
    """Start ``processes`` children serving ``sock`` and supervise them until a signal or a child's end.

    Args:
        sock: the socket bound with ``SO_REUSEPORT`` that holds the port (closed on return).
        processes: how many children.
        target: a module-level function ``target(address, index, parent_pid, ready, *args)`` run in each
            child, ``address`` = ``(family, sockaddr)`` of ``sock``: it listens there (:func:`listen_socket`),
            puts ``("ready", info)`` or ``("error", message)`` on the queue ``ready`` once loaded, then serves
            until SIGTERM / SIGINT.
        args: the rest of ``target``'s arguments (picklable).
        grace_s: how long stopped children may take to finish their requests before they are killed.
        on_ready: called with the first child's ``info`` once every child is ready.

    Returns:
        The exit code: 0 after SIGTERM, 130 after SIGINT, 2 when a child could not load (its message on
        stderr), 1 when a child died while serving.
    """
    ctx = mp.get_context("spawn")
    ready: Any = ctx.Queue()
    stop: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: stop.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    address = (sock.family, sock.getsockname())
    children = [ctx.Process(target=target, args=(address, i, os.getpid(), ready, *args), name=f"ctrflow-serve-{i}",
                            daemon=False) for i in range(processes)]
    code = 0
    try:
        for p in children:
            p.start()
        code = _wait_ready(children, ready, stop, on_ready)
        while code == 0 and not stop:
            dead = [p for p in children if not p.is_alive()]
            if dead:
                print(f"error: server process {dead[0].name} (pid {dead[0].pid}) exited with {dead[0].exitcode}: "
                      "stopping the others", file=sys.stderr)
                code = 1
                break
            time.sleep(0.2)
        if stop and code == 0:
            code = 130 if stop[0] == signal.SIGINT else 0
    finally:
        _stop(children, grace_s)
        for s, h in previous.items():
            signal.signal(s, h)
        ready.close()
        sock.close()
    return code


def _wait_ready(children: list[Any], ready: Any, stop: list[int], on_ready: Callable[[Any], None] | None) -> int:
    """Wait for every child's ``ready`` (0), or the first ``error`` (2, printed) / dead child (1) / signal (0)."""
    infos: list[Any] = []
    while len(infos) < len(children) and not stop:
        try:
            kind, info = ready.get(timeout=0.2)
        except queue.Empty:
            dead = [p for p in children if p.exitcode is not None]
            if dead:
                with contextlib.suppress(queue.Empty):  # its error message may be just behind its exit
                    kind, info = ready.get(timeout=1.0)
                    if kind == "error":
                        print(f"error: {info}", file=sys.stderr)
                        return 2
                print(f"error: server process {dead[0].name} exited with {dead[0].exitcode} while loading",
                      file=sys.stderr)
                return 1
            continue
        if kind == "error":
            print(f"error: {info}", file=sys.stderr)
            return 2
        infos.append(info)
    if infos and len(infos) == len(children) and on_ready is not None:
        on_ready(infos[0])
    return 0


def _stop(children: list[Any], grace_s: float) -> None:
    """SIGTERM every live child (uvicorn's graceful stop), wait up to ``grace_s``, then SIGKILL what is left."""
    for p in children:
        if p.pid is not None and p.is_alive():
            with contextlib.suppress(OSError):
                os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in children:
        if p.pid is not None:
            p.join(max(0.0, deadline - time.monotonic()))
    for p in children:
        if p.pid is not None and p.is_alive():
            p.kill()
            p.join(5)
