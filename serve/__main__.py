"""Serve a training run over HTTP: ``python -m ctrflow.serve --run RUN_DIR`` (or ``ctrflow-serve``).

Commands::

    python -m ctrflow.serve --run runs/dlrm-20261123                      # http://127.0.0.1:8000/docs
    python -m ctrflow.serve --run runs/a --host 0.0.0.0 --port 9000 --token-file /etc/ctrflow/token --device cuda
    python -m ctrflow.serve --run runs/a --processes 2      # two server processes on one port (one per core)
    curl -s localhost:8000/metadata          # the columns a row needs (every one: null for a missing value)

With ``--token-file PATH`` (or ``$CTRFLOW_SERVE_TOKEN``) every request but ``GET /health`` needs
``Authorization: Bearer <token>``; POST bodies must be ``Content-Type: application/json``.

A run directory that cannot be served (no checkpoint, its dataset gone, a corrupt workflow), a bad token
file or a port that cannot be bound exits with code 2 and one line.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import socket
import sys
from typing import Any

from ctrflow.etl.cli_help import DefaultsHelpFormatter, usage_name
from ctrflow.serve.access import TOKEN_ENV, load_token
from ctrflow.serve.limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_ROWS  # no FastAPI needed
from ctrflow.serve.predictor import DEFAULT_BATCH_SIZE
from ctrflow.serve.processes import parse_processes, run_processes
from ctrflow.serve.server import build, info, run_uvicorn, serve_child

CONSOLE_SCRIPT = "ctrflow-serve"  # pyproject's [project.scripts] name for main()


class UsageError(Exception):
    """Bad command line or run directory (exit code 2, one line)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise UsageError(message)


_Formatter = DefaultsHelpFormatter


def prog_name(argv0: str | None = None) -> str:
    """How the user started the server, for the usage line: the console script or ``python -m``."""
    name = usage_name(CONSOLE_SCRIPT, "ctrflow.serve", "python -m ctrflow.serve", argv0, orig_argv=[])
    return name if name == CONSOLE_SCRIPT else "python -m ctrflow.serve"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser (``prog``: the usage line's command, default :func:`prog_name`)."""
    p = _Parser(prog=prog or prog_name(), description=__doc__.split("\n\nA run")[0], formatter_class=_Formatter)
    p.add_argument("--run", required=True, help="run directory written by train/fit.py --out")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (0: any free port)")
    p.add_argument("--token-file", default=None,
                   help=f"file holding the bearer token every request but /health must send (else ${TOKEN_ENV}; "
                   "default: none, anyone who reaches the port may call the API)")
    p.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS, help="rows / candidates per request (413 above)")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                   help="request body size in bytes (413 above, refused before the body is read)")
    p.add_argument("--max-in-flight", type=int, default=DEFAULT_MAX_IN_FLIGHT,
                   help="POST requests served at once (more: 503 with Retry-After; /health is never refused)")
    p.add_argument("--device", default=None, help="auto (default: CUDA when available) | cpu | cuda[:i]")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="rows per model call")
    p.add_argument("--amp", action="store_true",
                   help="run the model in bfloat16 autocast (for CUDA, or a CPU with avx512_bf16 / AMX; scores "
                        "differ from fp32 by ~1e-3; the transform is unchanged) (default: fp32)")
    p.add_argument("--no-batching", action="store_true",
                   help="score each request on its own (default: concurrent requests share model calls)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: the run's newest)")
    p.add_argument("--data", default=None, help="processed dataset dir, if it moved since training")
    p.add_argument("--processes", default="1",
                   help="server processes sharing the port, each with the model loaded and its own limits "
                   "(auto: one per usable core); see ctrflow.serve.processes")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (default: torch's for one process, cores // processes for more)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level")
    return p


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """Parse and check the command line (:class:`UsageError` on a bad one)."""
    p = build_parser(prog)
    a = p.parse_args(argv)
    if a.host.startswith("[") and a.host.endswith("]"):  # [::1] as in a URL
        a.host = a.host[1:-1]
    for name in ("max_rows", "max_bytes", "max_in_flight", "batch_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if not 0 <= a.port < 65536:
        p.error(f"--port must be in 0..65535, got {a.port}")
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    try:
        a.processes = parse_processes(a.processes)
    except ValueError as e:
        p.error(f"--processes {a.processes}: {str(e).replace('invalid literal for int() with base 10', 'not a count')}")
    return a


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening-ready socket bound to ``host:port`` (:class:`UsageError` naming the port when it cannot be).

    Bound before the server starts, so a busy port fails in one line before anything says "serving", and
    uvicorn serves on this very socket (no window in which another process could take the port).
    ``reuse_port`` (``--processes N``): with ``SO_REUSEPORT``, so each server process can listen on the port
    with a socket of its own (the parent keeps this one bound, not listening, to hold the port).
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart over TIME_WAIT
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is already in use (another server?): pick another with "
                             "--port N, or --port 0 for any free one") from None
        if e.errno == errno.EACCES:
            raise UsageError(f"no permission to listen on port {port} on {host} (ports below 1024 need "
                             "privileges): pick another with --port N") from None
        raise UsageError(f"cannot listen on {host} port {port}: {e.strerror}") from None
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _banner(a: argparse.Namespace, info: dict[str, Any], port: int, token: str | None) -> None:
    shown = f"[{a.host}]" if ":" in a.host else a.host
    procs = f" ({a.processes} processes)" if a.processes > 1 else ""
    fast = info.get("http") == "httptools" and info.get("loop") == "uvloop"
    stack = f"HTTP: {info.get('http')} on {info.get('loop')}" + ("" if fast else
                                                                 " (pip install 'ctrflow[serve]': httptools, uvloop)")
    print(f"serving {info.get('model_class')} from {info.get('checkpoint')} on {info.get('device')} at "
          f"http://{shown}:{port}{procs} (docs: /docs){'; bearer token required' if token else ''}; {stack}",
          file=sys.stderr)
    if token is None and not _is_loopback(a.host):
        print(f"warning: listening on {a.host} without a token: anyone who can reach port {port} can call the API "
              f"(--token-file PATH or ${TOKEN_ENV})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 after a clean shutdown, 2 for bad input)."""
    from ctrflow.serve.inputs import ServeError

    try:
        a = parse_args(argv)
        try:
            import uvicorn  # noqa: F401 - checked here: one line when the serve extra is missing

            from ctrflow.serve.app import create_app  # noqa: F401
        except ImportError as e:
            raise UsageError(f"serving needs FastAPI and uvicorn ({e}): pip install 'ctrflow[serve]'") from None
        token = load_token(a.token_file)
        if a.processes > 1 and not hasattr(socket, "SO_REUSEPORT"):
            raise UsageError("--processes needs SO_REUSEPORT sockets (Linux, BSD, macOS): not on this system")
        sock = bind(a.host, a.port, reuse_port=a.processes > 1)  # before the (slow) model load: a busy port fails
        port = sock.getsockname()[1]
        if a.processes > 1:
            return run_processes(sock, a.processes, serve_child, (a, token),
                                 on_ready=lambda first: _banner(a, first, port, token))
        try:
            predictor, app = build(a, token, a.threads)
        except BaseException:
            sock.close()
            raise
    except (UsageError, ServeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _banner(a, info(predictor), port, token)
    try:
        run_uvicorn(app, sock, a)
    except KeyboardInterrupt:
        return 130
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
