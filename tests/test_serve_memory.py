"""A burst of oversized bodies is refused before it is read: the server's memory stays where it was.

Before the fix a 32 MiB body of ``[{}, {}, ...]`` got its 413 only after parsing (RSS 674 -> 1,464 MiB,
four at once peaking at 2.5 GB, 1.55 GB held afterwards). This runs the real server (uvicorn, its own
process) and reads its resident memory from ``/proc``.
"""

from __future__ import annotations

import http.client
import os
import re
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from test_serve import run  # noqa: E402,F401 - the module fixture: a tiny trained run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024


def _post_big(port: int, size: int, out: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = b"[" + b"{}, " * (size // 4) + b"{}]"
    try:
        conn.request("POST", "/predict", body=body, headers={"content-type": "application/json"})
        out.append(conn.getresponse().status)
    except (ConnectionError, OSError):
        out.append("reset")  # refused before reading: a client that sends everything first may see a reset
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_a_burst_of_oversized_bodies_leaves_memory_where_it_was(run):  # noqa: F811
    proc = subprocess.Popen([sys.executable, "-m", "ctrflow.serve", "--run", str(run[0]), "--port", "0",
                             "--device", "cpu", "--max-bytes", "1000000"], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True)
    try:
        port = None
        deadline = time.time() + 120
        while port is None and time.time() < deadline:
            line = proc.stderr.readline()
            m = re.search(r"at http://[^:]+:(\d+)", line)
            port = int(m.group(1)) if m else None
            assert proc.poll() is None, line
        assert port, "the server did not start"
        while True:  # the port is bound before the model loads; it answers once uvicorn runs
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("GET", "/health")
                assert conn.getresponse().status == 200
                break
            except ConnectionError:
                assert time.time() < deadline and proc.poll() is None, "the server did not answer /health"
                time.sleep(0.3)
        time.sleep(1)
        before = _rss_mb(proc.pid)
        statuses: list = []
        for _ in range(2):  # two waves of four 32 MiB bodies at once
            threads = [threading.Thread(target=_post_big, args=(port, 32 << 20, statuses)) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        time.sleep(1)
        after = _rss_mb(proc.pid)
        assert len(statuses) == 8 and all(s in (413, "reset") for s in statuses), statuses
        assert after - before < 50, f"RSS {before:.0f} -> {after:.0f} MiB"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # and it still serves
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
    finally:
        proc.terminate()
        proc.wait(30)
