"""Names for the temporaries of atomic writes, and the removal of those a killed writer left behind.

Outputs (processed datasets, generated data, checkpoints) are written under a temporary name beside
their final path and renamed into place when complete. A writer killed with ``kill -9`` cannot clean
up, so every temporary carries its writer's process id: ``.NAME.tmp-<pid>-<random>``. The next writer
of the same output removes the temporaries whose process is gone (never those of a live writer) and
says so on the log.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil

log = logging.getLogger("ctrflow")


def temp_path(path: str, kind: str = "tmp") -> str:
    """A fresh temporary name beside ``path``: ``dir/.base.<kind>-<pid>-<random>`` (nothing is created)."""
    parent, base = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{base}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def unwritable(path: str) -> str | None:
    """Why ``path`` cannot be written (its nearest existing ancestor takes no new file), or None.

    Probes by creating and removing a temporary file there, which also catches read-only mounts and
    pseudo file systems that ``os.access`` reports writable (``/proc`` as root).
    """
    import tempfile

    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a directory"
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        return f"{parent} is not writable ({e.strerror or e})"
    return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(path: str, kinds: tuple[str, ...] = ("tmp", "old")) -> list[str]:
    """Remove the temporaries of ``path`` (see :func:`temp_path`) whose writer process is gone.

    Args:
        path: the final output path whose temporaries to look for (in its parent directory).
        kinds: the temporary kinds to consider.

    Returns:
        The removed paths (each also logged as a warning with its size).
    """
    parent, base = os.path.split(os.path.abspath(path))
    if not os.path.isdir(parent):
        return []
    pattern = re.compile(rf"^\.{re.escape(base)}\.(?:{'|'.join(map(re.escape, kinds))})-(\d+)-[0-9a-f]+(?:\.old)?$")
    removed = []
    for name in os.listdir(parent):
        m = pattern.match(name)
        if m is None or _alive(int(m.group(1))):
            continue
        stale = os.path.join(parent, name)
        size = _size(stale)
        if os.path.isdir(stale) and not os.path.islink(stale):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            try:
                os.unlink(stale)
            except FileNotFoundError:
                continue
        log.warning("removed %s (%.1f MB), left by an interrupted run (process %s is gone)", stale, size / 1e6,
                    m.group(1))
        removed.append(stale)
    return removed


def _size(path: str) -> int:
    if not os.path.isdir(path):
        return os.path.getsize(path) if os.path.exists(path) else 0
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total
