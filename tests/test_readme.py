"""The README as written: every command and Python snippet in it runs, on small data, in a temp dir.

The commands are read out of README.md's ``bash`` blocks and run in order, as shown, in one scratch
directory (so a later command sees what an earlier one wrote, as a user's shell would). The only
changes are the ones small data and a 2-core CI machine need, listed in ``SMALL`` and ``ADAPT``;
commands that need several machines, GPUs or a package index are listed in ``NOT_HERE`` with the test
that covers them instead. A README command that none of these recognise fails the test, so a new
command cannot go unchecked. The ``curl`` bodies are posted to the server the README starts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
ROWS = 60_000  # 54k training rows: 106 steps at batch 512, so `--stop-after 100` stops before the end

# Commands these tests cannot run here, and where they are covered.
NOT_HERE = {
    "make ": "the Makefile itself (CI runs `make test`)",
    "pip install": "needs the package index (CI installs the project)",
    "torchrun ": "tests/test_ddp.py runs torchrun with 2 CPU ranks",
    "host0$": "a multi-machine cluster",
    "hostN$": "a multi-machine cluster",
}
# Appended for small data: the generated data set's size.
SMALL = {"etl/run.py": ["--synthetic-rows", str(ROWS)]}
# Replaced so the commands fit a 2-core machine (same code path, fewer processes).
ADAPT = {"--workers 8": "--workers 2"}


def _blocks(kind: str) -> list[str]:
    text = open(README, encoding="utf-8").read()
    return [m.group(1) for m in re.finditer(rf"```{kind}\n(.*?)```", text, re.S)]


def _commands() -> list[str]:
    """Shell commands of the README's bash blocks: continuation lines joined, comments dropped."""
    out: list[str] = []
    for block in _blocks("bash"):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines: list[str] = []
        for line in joined.splitlines():
            if lines and line.startswith("  "):  # a curl body wrapped over several lines
                lines[-1] += "\n" + line
            else:
                lines.append(line)
        for line in lines:
            code = _strip_comment(line).strip()
            if code:
                out.extend(part.strip() for part in code.split(" && "))
    return out


def _strip_comment(line: str) -> str:
    """The line without a trailing ``# ...`` comment (not one inside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if ch in "'\"" and quote in (None, ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None and (i == 0 or line[i - 1] == " "):
            return line[:i]
    return line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A user's directory: raw parquet (``raw/``, ``raw/train``, ``raw/valid``) and two days."""
    from ctrflow.etl.synthetic import generate

    d = tmp_path_factory.mktemp("readme")
    generate(str(d / "raw"), rows=ROWS, seed=1, part_rows=20_000)
    train = sorted((d / "raw" / "train").glob("*.parquet"))
    for i, f in enumerate(train):
        shutil.copy(f, d / "raw" / f"part-{i}.parquet")  # raw/*.parquet
    for day, files in (("day1", train[:2]), ("day2", train[2:])):
        (d / day).mkdir()
        for f in files:
            shutil.copy(f, d / day / f.name)
    return d


def _env(workdir) -> dict[str, str]:
    env = dict(os.environ, CTRFLOW_CACHE_DIR=str(workdir / "cache"), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [env.get("PYTHONPATH", "")] if p)
    return env


def _run(argv: list[str], workdir, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=600)
    if check:
        assert res.returncode == 0, f"{shlex.join(argv)} exited {res.returncode}:\n{res.stderr[-3000:]}"
    return res


def _python_argv(cmd: str) -> list[str]:
    argv = shlex.split(cmd)
    assert argv[0] == "python"
    argv[0] = sys.executable
    script = argv[1]
    if os.path.exists(os.path.join(ROOT, script)):
        argv[1] = os.path.join(ROOT, script)
        argv += [] if "--input" in argv or "--update" in argv else SMALL.get(script, [])
    return argv


def _serve_and_curl(server_cmd: str, curls: list[str], workdir) -> None:
    port = _free_port()
    argv = [*_python_argv(server_cmd), "--port", str(port)]
    proc = subprocess.Popen(argv, cwd=workdir, env=_env(workdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
                assert time.time() < deadline, "the server did not answer /health"
                time.sleep(0.5)
        for cmd in curls:
            argv = shlex.split(cmd)
            url = argv[2].replace("localhost:8000", f"127.0.0.1:{port}")
            body = argv[argv.index("-d") + 1].encode()
            req = urllib.request.Request(f"http://{url}" if "://" not in url else url, data=body,
                                         headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                reply = json.loads(r.read())
            assert r.status == 200 and reply, reply
            if "/predict" in url:
                assert all(0 < s < 1 for s in reply["scores"])
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_readme_commands_run_as_shown(workdir):
    before = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True,
                            text=True).stdout
    commands = _commands()
    ran, skipped = [], []
    i = 0
    while i < len(commands):
        cmd = commands[i]
        for old, new in ADAPT.items():
            cmd = cmd.replace(old, new)
        why = next((v for k, v in NOT_HERE.items() if cmd.startswith(k)), None)
        if why:
            skipped.append(cmd)
        elif cmd.startswith("python -m ctrflow.serve"):
            curls = []
            while i + 1 < len(commands) and commands[i + 1].startswith("curl "):
                curls.append(commands[i + 1])
                i += 1
            assert curls, "the README starts a server but sends it nothing"
            _serve_and_curl(cmd, curls, workdir)
            ran.append(cmd)
        elif cmd.startswith("python "):
            argv = _python_argv(cmd)
            if "--engine gpu" in cmd and not shutil.which("nvidia-smi"):
                res = _run(argv, workdir, check=False)  # on a CPU machine: one line naming the extra
                assert res.returncode == 2 and "gpu-cu1" in res.stderr, res.stderr
            else:
                _run(argv, workdir)
            ran.append(cmd)
        else:
            pytest.fail(f"README command not covered by tests/test_readme.py: {cmd!r}")
        i += 1
    assert len(ran) >= 10, ran
    assert any("--stop-after" in c for c in ran) and any("--resume" in c for c in ran)
    after = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True,
                           text=True).stdout
    new = {x for x in after.splitlines() if x not in before.splitlines() and x.startswith("!! ")}
    new = {x for x in new if "__pycache__" not in x and ".pytest_cache" not in x}
    assert not new, f"README commands wrote into the checkout: {new}"
    # The Python snippets, after the commands: they read data/processed, raw/ and runs/a.
    for n, code in enumerate(_blocks("python")):
        path = workdir / f"snippet_{n}.py"
        path.write_text(code)
        _run([sys.executable, str(path)], workdir)


def test_every_readme_command_is_known():
    # Fast and independent of the slow test: each command is run, served, or skipped for a stated reason.
    for cmd in _commands():
        known = cmd.startswith(("python ", "curl ")) or any(cmd.startswith(k) for k in NOT_HERE)
        assert known, f"README command not covered by tests/test_readme.py: {cmd!r}"
