"""``python -m ctrflow.serve --processes N``: several server processes on one port.

The real server runs here (a subprocess, its children spawned by it): every child serves the port with
the same token, content-type and size rules and its own ``/health``; SIGTERM / SIGINT stop them all
(exit 0 / 130), a child that dies stops the others (exit 1), the parent's death (even SIGKILL) ends the
children, and a run that cannot load exits 2 with one line. No test leaves a process behind.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from test_serve import run  # noqa: E402,F401 - the module fixture: a tiny trained run

from ctrflow.serve.__main__ import main as serve_main  # noqa: E402
from ctrflow.serve.__main__ import parse_args  # noqa: E402
from ctrflow.serve.processes import parse_processes, threads_per_process, usable_cores  # noqa: E402
from ctrflow.serve.server import http_stack  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "s3cret-token-for-the-processes-test"
pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads /proc")


# ---- the command line ---------------------------------------------------------------------------
def test_processes_parses_counts_and_auto():
    assert parse_processes("3") == 3 and parse_processes("auto") == usable_cores() >= 1
    assert parse_args(["--run", "r"]).processes == 1
    assert parse_args(["--run", "r", "--processes", "2"]).processes == 2
    for bad in ("0", "-1", "two"):
        with pytest.raises(ValueError):
            parse_processes(bad)


@pytest.mark.parametrize("value", ["0", "two"])
def test_a_bad_processes_value_is_one_line_and_exit_2(value, capsys):
    assert serve_main(["--run", "r", "--processes", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --processes") and err.count("\n") == 1


def test_torch_threads_are_shared_out_between_processes():
    cores = usable_cores()
    assert threads_per_process(1) is None  # one process: torch's default
    assert threads_per_process(2) == max(1, cores // 2) and threads_per_process(cores * 4) == 1
    assert threads_per_process(2, threads=3) == 3  # --threads wins


# ---- the real server ----------------------------------------------------------------------------
def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids.update(int(x) for x in f.read().split())
    return kids


def _servers(pid: int) -> set[int]:
    """The children that serve (multiprocessing's resource tracker is a child too)."""
    out = set()
    for k in _children(pid):
        try:
            with open(f"/proc/{k}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    out.add(k)
        except FileNotFoundError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids: set[int], timeout: float = 30.0) -> set[int]:
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return {p for p in pids if _alive(p)}


def _request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None
             ) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


class Server:
    """``python -m ctrflow.serve --processes 2`` on a free port (waits for its start-up line)."""

    def __init__(self, run_dir, tmp_path, *extra: str) -> None:
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        os.chmod(token_file, 0o600)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ctrflow.serve", "--run", str(run_dir), "--port", "0", "--processes", "2",
             "--device", "cpu", "--token-file", str(token_file), "--max-bytes", "100000", "--log-level", "warning",
             *extra], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        self.port, deadline = None, time.time() + 180
        while self.port is None:
            line = self.proc.stderr.readline()
            assert line or self.proc.poll() is None, f"the server exited with {self.proc.returncode}"
            m = re.search(r"at http://[^:]+:(\d+) \(2 processes\)", line)
            self.port = int(m.group(1)) if m else None
            self.banner = line
            assert time.time() < deadline, "the server did not start"
        self.children = _servers(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        for k in self.children:
            if _alive(k):
                os.kill(k, signal.SIGKILL)


@pytest.fixture
def rows(run):  # noqa: F811
    import pyarrow.parquet as pq

    df = pq.read_table(run[1]).to_pandas().drop(columns=["label"]).head(4)
    return json.dumps(json.loads(df.to_json(orient="records"))).encode()


@pytest.mark.slow
def test_two_processes_serve_one_port_with_the_same_rules_and_stop_on_sigterm(run, tmp_path, rows):  # noqa: F811
    s = Server(run[0], tmp_path, "--max-in-flight", "4")
    try:
        assert len(s.children) == 2, s.children
        stack = http_stack()  # the children name the parser and loop they serve with on the start-up line
        assert f"HTTP: {stack['http']} on {stack['loop']}" in s.banner, s.banner
        auth = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
        seen: set[int] = set()
        for _ in range(80):  # each new connection goes to the child that accepts it first
            status, body = _request(s.port, "GET", "/metadata", headers=auth)
            meta = json.loads(body)
            assert status == 200 and meta["server"]["processes"] == 2 and meta["limits"]["max_in_flight"] == 4
            seen.add(meta["server"]["pid"])
            status, body = _request(s.port, "POST", "/predict", rows, auth)
            assert status == 200 and len(json.loads(body)["scores"]) == 4
            if seen == s.children:
                break
        assert seen == s.children, (seen, s.children)
        conns = [http.client.HTTPConnection("127.0.0.1", s.port, timeout=60) for _ in range(16)]
        try:  # keep-alive clients connected at once spread over both (one shared socket gave one 7 or 8 of 8)
            for c in conns:
                c.connect()
            pids = []
            for c in conns:
                c.request("GET", "/metadata", headers=auth)
                pids.append(json.loads(c.getresponse().read())["server"]["pid"])
        finally:
            for c in conns:
                c.close()
        assert set(pids) == s.children, pids
        assert _request(s.port, "GET", "/health")[0] == 200  # no token needed
        assert _request(s.port, "GET", "/metadata")[0] == 401
        assert _request(s.port, "POST", "/predict", rows, {"authorization": f"Bearer {TOKEN}"})[0] == 415
        assert _request(s.port, "POST", "/predict", b"[" + b"{}," * 40_000 + b"{}]", auth)[0] == 413
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(60) == 0
        assert not _wait_gone(s.children), "a server process outlived SIGTERM"
    finally:
        s.stop()


@pytest.mark.slow
def test_sigint_stops_every_process_with_130(run, tmp_path):  # noqa: F811
    s = Server(run[0], tmp_path)
    try:
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(60) == 130
        assert not _wait_gone(s.children)
    finally:
        s.stop()


@pytest.mark.slow
def test_a_dead_child_stops_the_server_with_exit_1(run, tmp_path):  # noqa: F811
    s = Server(run[0], tmp_path)
    try:
        victim, other = sorted(s.children)
        os.kill(victim, signal.SIGKILL)
        assert s.proc.wait(60) == 1
        assert "exited with -9" in s.proc.stderr.read()
        assert not _wait_gone({other})
    finally:
        s.stop()


@pytest.mark.slow
def test_children_end_with_the_parent_even_on_sigkill(run, tmp_path):  # noqa: F811
    s = Server(run[0], tmp_path)
    try:
        s.proc.kill()
        s.proc.wait(30)
        assert not _wait_gone(s.children), "orphan server processes"
    finally:
        s.stop()


def test_a_run_that_cannot_load_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ctrflow.serve", "--run", str(tmp_path / "nope"), "--port", "0",
                           "--processes", "2"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
