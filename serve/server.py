"""One server process's work: load the run, build the app, serve a socket with uvicorn.

Shared by ``python -m ctrflow.serve`` (one process) and each child of ``--processes N``
(:func:`serve_child`, which ``multiprocessing``'s spawn finds here: it cannot import a package's ``__main__``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import socket
import sys
from typing import Any

from ctrflow.serve.processes import die_with_parent, listen_socket, threads_per_process


def build(a: argparse.Namespace, token: str | None, threads: int | None, processes: int = 1) -> tuple[Any, Any]:
    """Load the run and build the app (one server process's work before it serves).

    Returns:
        (the :class:`~ctrflow.serve.predictor.Predictor`, the FastAPI app).
    """
    import torch

    from ctrflow.serve.app import create_app
    from ctrflow.serve.predictor import Predictor

    if threads:
        torch.set_num_threads(threads)
    predictor = Predictor.from_run(a.run, device=a.device, batch_size=a.batch_size, checkpoint=a.checkpoint,
                                   data_dir=a.data, amp=a.amp)
    app = create_app(predictor, max_rows=a.max_rows, max_bytes=a.max_bytes, batching=not a.no_batching,
                     max_in_flight=a.max_in_flight, token=token, processes=processes)
    # What is loaded now lives as long as the server: out of the cyclic GC's reach, a full collection
    # scans only what requests left behind (here 267k loaded objects made one take ~200 ms, GIL held).
    gc.collect()
    gc.freeze()
    return predictor, app


def http_stack() -> dict[str, str]:
    """The HTTP parser and event loop uvicorn is given: httptools and uvloop when they import (the ``serve``
    extra installs both; C code instead of Python for parsing requests and running the loop), else h11 and
    asyncio. Chosen here rather than by uvicorn's ``auto``, so the start-up line names what is really used.
    """
    stack = {"http": "h11", "loop": "asyncio"}
    with contextlib.suppress(ImportError):
        import httptools  # noqa: F401

        stack["http"] = "httptools"
    if sys.platform != "win32":  # uvloop has no Windows build
        with contextlib.suppress(ImportError):
            import uvloop  # noqa: F401

            stack["loop"] = "uvloop"
    return stack


def info(predictor: Any) -> dict[str, Any]:
    """What the start-up line names (plain strings: a child sends it to the parent)."""
    return {"model_class": str(predictor.info.get("model_class")), "checkpoint": str(predictor.info.get("checkpoint")),
            "device": str(predictor.device), **http_stack()}


def run_uvicorn(app: Any, sock: socket.socket, a: argparse.Namespace) -> None:
    """Serve ``app`` on the bound ``sock`` until SIGTERM / SIGINT (uvicorn's graceful shutdown), with the parser
    and loop of :func:`http_stack`."""
    import uvicorn

    config = uvicorn.Config(app, host=a.host, port=sock.getsockname()[1], log_level=a.log_level, **http_stack())
    uvicorn.Server(config).run(sockets=[sock])


def serve_child(address: tuple[int, Any], index: int, parent_pid: int, ready: Any, a: argparse.Namespace,
                token: str | None) -> None:
    """One of ``--processes N`` (a spawned interpreter): load, listen on the port, report to the parent, serve.

    Args:
        address: ``(family, sockaddr)`` of the parent's port, to listen on with ``SO_REUSEPORT``.
        index: this child's number (0 .. N-1).
        parent_pid: the supervisor's pid (this child ends with it).
        ready: the queue for ``("ready", info)`` / ``("error", message)``.
        a: the parsed command line; token: the bearer token (None: none).
    """
    from ctrflow.serve.inputs import ServeError

    die_with_parent(parent_pid)
    try:
        predictor, app = build(a, token, threads_per_process(a.processes, a.threads), a.processes)
        sock = listen_socket(address)
    except (ServeError, ValueError, OSError) as e:
        ready.put(("error", str(e)))
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C while loading: the parent stops too
        sys.exit(130)
    ready.put(("ready", info(predictor)))
    try:
        run_uvicorn(app, sock, a)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
