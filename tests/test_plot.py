"""curve.png: matplotlib when installed, the built-in drawing otherwise; both mark the best step."""

from __future__ import annotations

import builtins
import struct
import zlib

import pytest

from ctrflow.train.plot import plot_history

HISTORY = {"train": [{"step": i, "loss": 1 / i} for i in range(1, 101)],
           "valid": [{"step": s, "loss": 0.5 - s / 1000, "auc": 0.7 + s / 1000} for s in (20, 40, 60, 80, 100)]}


def _png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_matplotlib_curve(tmp_path):
    pytest.importorskip("matplotlib")
    w, h = _png_size(plot_history(str(tmp_path / "c.png"), HISTORY, "auc", best_step=60))
    assert w > 600 and h > 200


def test_builtin_curve_marks_the_best_step(tmp_path, monkeypatch):
    real = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    path = tmp_path / "c.png"
    plot_history(str(path), HISTORY, "auc", best_step=60)
    w, h = _png_size(path)
    assert (w, h) == (840, 300)
    raw = open(path, "rb").read()
    idat = b"".join(raw[i + 8 : i + 8 + struct.unpack(">I", raw[i : i + 4])[0]]
                    for i in range(8, len(raw)) if raw[i + 4 : i + 8] == b"IDAT")
    pix = zlib.decompress(idat)
    row = 150 * (1 + w * 3)  # a row in the middle of the plot area (each row: filter byte + RGB)
    # The AUC panel's x axis spans steps 20..100 over pixels 464..828: step 60 is at pixel 646.
    x = 420 + 44 + round((60 - 20) / 80 * (420 - 12 - 44))
    greys = [pix[row + 1 + 3 * i : row + 4 + 3 * i] for i in range(x - 1, x + 2)]
    assert any(g == bytes((90, 90, 90)) for g in greys)
