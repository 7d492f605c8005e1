"""Fixtures shared by the loader test modules (imported by them; autouse only where imported)."""

from __future__ import annotations

import threading

import pytest

import ctrflow.loader.source as source_mod


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    """Pieces of ~600 rows so that the small test files still give many chunks."""
    monkeypatch.setattr(source_mod, "MIN_PIECE_ROWS", 600)


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Every loader thread has ended when its test ends."""
    yield
    leaked = [t for t in threading.enumerate() if t.name.startswith("ctrflow-loader")]
    for t in leaked:
        t.join(10)
    assert not [t for t in leaked if t.is_alive()], "a loader thread outlived its test"
