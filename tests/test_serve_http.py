"""The HTTP stack the server runs on: uvicorn with httptools and uvloop when they import (the ``serve`` extra),
h11 and asyncio otherwise, named on the start-up line (``ctrflow.serve.server.http_stack``)."""

from __future__ import annotations

import argparse
import importlib.util
import socket
import sys

import pytest

pytest.importorskip("uvicorn")

from ctrflow.serve import server  # noqa: E402
from ctrflow.serve.__main__ import _banner  # noqa: E402


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def test_the_stack_is_the_fastest_one_installed():
    stack = server.http_stack()
    assert stack["http"] == ("httptools" if _importable("httptools") else "h11")
    assert stack["loop"] == ("uvloop" if _importable("uvloop") and sys.platform != "win32" else "asyncio")


def test_without_httptools_and_uvloop_the_stack_is_h11_on_asyncio(monkeypatch):
    monkeypatch.setitem(sys.modules, "httptools", None)  # None in sys.modules: `import httptools` raises ImportError
    monkeypatch.setitem(sys.modules, "uvloop", None)
    assert server.http_stack() == {"http": "h11", "loop": "asyncio"}


def test_uvicorn_is_given_the_named_stack(monkeypatch):
    import uvicorn

    seen = {}

    class FakeServer:
        def __init__(self, config: uvicorn.Config) -> None:
            seen["config"] = config

        def run(self, sockets: list[socket.socket]) -> None:
            seen["sockets"] = sockets

    monkeypatch.setattr(uvicorn, "Server", FakeServer)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        server.run_uvicorn(object(), sock, argparse.Namespace(host="127.0.0.1", log_level="warning"))
        assert seen["sockets"] == [sock]
    stack = server.http_stack()
    assert (seen["config"].http, seen["config"].loop) == (stack["http"], stack["loop"])


@pytest.mark.parametrize("stack, words", [({"http": "httptools", "loop": "uvloop"}, "HTTP: httptools on uvloop"),
                                          ({"http": "h11", "loop": "asyncio"}, "pip install 'ctrflow[serve]'")])
def test_the_start_up_line_names_the_stack(stack, words, capsys):
    a = argparse.Namespace(host="127.0.0.1", processes=1)
    _banner(a, {"model_class": "DLRM", "checkpoint": "best.pt", "device": "cpu", **stack}, 8000, None)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("serving DLRM") and words in lines[0], lines
    assert f"HTTP: {stack['http']} on {stack['loop']}" in lines[0]
