"""The end-of-run curve: training loss, validation logloss and AUC against the step, as a PNG.

Uses matplotlib when it is importable (the ``plot`` extra: labelled ticks, a grid, a legend, the best
checkpoint marked); otherwise draws the two panels itself (lines, axes, a light grid with labelled
quarters, the best step dashed, and a 3x5 pixel font) and encodes the PNG with zlib.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from collections.abc import Sequence
from typing import Any

Series = tuple[str, Sequence[float], Sequence[float], tuple[int, int, int]]  # name, x, y, colour

# 3x5 glyphs, rows top to bottom, 3 bits per row (MSB = left column).
_FONT = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0),
    " ": (0, 0, 0, 0, 0), ":": (0, 2, 0, 2, 0), "/": (1, 1, 2, 4, 4), "(": (1, 2, 2, 2, 1), ")": (4, 2, 2, 2, 4),
    "A": (2, 5, 7, 5, 5), "C": (7, 4, 4, 4, 7), "D": (6, 5, 5, 5, 6), "E": (7, 4, 6, 4, 7),
    "G": (7, 4, 5, 5, 7), "I": (7, 2, 2, 2, 7), "L": (4, 4, 4, 4, 7), "N": (5, 7, 7, 7, 5),
    "O": (7, 5, 5, 5, 7), "P": (7, 5, 7, 4, 4), "R": (6, 5, 6, 5, 5), "S": (7, 4, 7, 1, 7),
    "T": (7, 2, 2, 2, 2), "U": (5, 5, 5, 5, 7), "V": (5, 5, 5, 5, 2), "W": (5, 5, 7, 7, 5),
    "X": (5, 5, 2, 5, 5), "Y": (5, 5, 2, 2, 2), "M": (5, 7, 7, 5, 5), "B": (6, 5, 6, 5, 6),
    "F": (7, 4, 6, 4, 4), "H": (5, 5, 7, 5, 5), "K": (5, 5, 6, 5, 5),
}


def plot_curves(path: str, panels: Sequence[tuple[str, Sequence[Series]]], mark: int | None = None,
                mark_label: str = "best") -> str:
    """Write a PNG with one panel per ``(title, series)`` side by side; returns the path written.

    Args:
        path: output ``.png`` (written to a temporary name, then renamed).
        panels: e.g. ``[("loss", [("train", steps, losses, (31, 119, 180))]), ("auc", [...])]``.
        mark: a step to mark with a vertical line in every panel (the best checkpoint's), or None.
        mark_label: the mark's legend text.
    """
    tmp = f"{path}.tmp"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # matplotlib missing: draw it ourselves
        _write_png(tmp, _draw(panels, mark=mark))
    else:
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
        for ax, (title, series) in zip(axes if len(panels) > 1 else [axes], panels, strict=False):
            for name, x, y, colour in series:
                if len(x):
                    ax.plot(x, y, label=name, color=[c / 255 for c in colour], marker="." if len(x) < 30 else None)
            if mark is not None:
                ax.axvline(mark, color="0.35", linestyle="--", linewidth=1, label=f"{mark_label} (step {mark})")
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:  # nothing drawn (e.g. a one-step run): no empty legend
                ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_history(path: str, history: dict[str, list[dict[str, Any]]], metric: str = "auc",
                 best_step: int | None = None) -> str:
    """Plot a trainer's history: train / valid loss in one panel, the valid ``metric`` in the other, with
    the best checkpoint's step marked."""
    tr, va = history.get("train", []), history.get("valid", [])
    nan = float("nan")
    loss = [("train loss", [r["step"] for r in tr], [r["loss"] for r in tr], (31, 119, 180)),
            ("valid loss", [r["step"] for r in va], [r.get("loss", nan) for r in va], (214, 39, 40))]
    second = [(f"valid {metric}", [r["step"] for r in va], [r.get(metric, nan) for r in va], (44, 160, 44))]
    return plot_curves(path, [("loss", loss), (metric, second)], mark=best_step, mark_label=f"best {metric}")


def _draw(panels: Sequence[tuple[str, Sequence[Series]]], w: int = 420, h: int = 300,
          mark: int | None = None) -> list[bytearray]:
    width = w * len(panels)
    img = [bytearray(b"\xff" * (width * 3)) for _ in range(h)]
    for k, (title, series) in enumerate(panels):
        x0, y0, x1, y1 = k * w + 44, 24, k * w + w - 12, h - 30  # plot area
        _text(img, k * w + w // 2 - 2 * len(title), 8, title.upper(), (0, 0, 0), 2)
        pts = [(float(a), float(b)) for _, xs, ys, _ in series for a, b in zip(xs, ys, strict=False) if _finite(a, b)]
        for i in range(x0, x1 + 1):
            _px(img, i, y1, (0, 0, 0))
        for j in range(y0, y1 + 1):
            _px(img, x0, j, (0, 0, 0))
        if not pts:
            continue
        xmin, xmax = min(p[0] for p in pts), max(p[0] for p in pts)
        ymin, ymax = min(p[1] for p in pts), max(p[1] for p in pts)
        if xmax == xmin:  # a single step: centre it
            xmin, xmax = xmin - 1, xmax + 1
        if ymax == ymin:
            ymin, ymax = ymin - abs(ymin) * 0.01 - 1e-6, ymax + abs(ymax) * 0.01 + 1e-6
        pad = 0.05 * (ymax - ymin)
        ymin, ymax = ymin - pad, ymax + pad
        _text(img, k * w + 2, y0, f"{ymax:.4g}", (80, 80, 80))
        _text(img, k * w + 2, y1 - 5, f"{ymin:.4g}", (80, 80, 80))
        _text(img, x0, y1 + 6, f"{xmin:.0f}", (80, 80, 80))
        _text(img, x1 - 4 * len(f"{xmax:.0f}"), y1 + 6, f"{xmax:.0f}", (80, 80, 80))
        _text(img, (x0 + x1) // 2 - 8, y1 + 6, "STEP", (80, 80, 80))
        for t in range(1, 4):  # a light grid at the quarters, each horizontal line labelled
            gy = y0 + round(t * (y1 - y0) / 4)
            for i in range(x0 + 1, x1 + 1, 3):
                _px(img, i, gy, (215, 215, 215))
            _text(img, k * w + 2, gy - 2, f"{ymax - t * (ymax - ymin) / 4:.4g}", (120, 120, 120))
        if mark is not None and xmin <= mark <= xmax:  # the best checkpoint: a dashed vertical line
            mx = x0 + round((mark - xmin) / (xmax - xmin) * (x1 - x0))
            for j in range(y0, y1, 4):
                _line(img, (mx, j), (mx, min(j + 2, y1)), (90, 90, 90))
            _text(img, min(mx + 3, x1 - 16), y0 - 10, "BEST", (90, 90, 90))
        for n, (name, xs, ys, colour) in enumerate(series):
            _text(img, x1 - 60, y0 + 4 + 10 * n, name.upper()[:12], colour)
            prev = None
            for a, b in zip(xs, ys, strict=False):
                if not _finite(a, b):
                    prev = None
                    continue
                p = (x0 + round((a - xmin) / (xmax - xmin) * (x1 - x0)),
                     y1 - round((b - ymin) / (ymax - ymin) * (y1 - y0)))
                if prev is not None:
                    _line(img, prev, p, colour)
                if len(xs) < 30:  # few points (evaluations): mark each
                    for dx in range(-2, 3):
                        _line(img, (p[0] + dx, p[1] - 2), (p[0] + dx, p[1] + 1), colour)
                prev = p
    return img


def _finite(a: float, b: float) -> bool:
    return a is not None and b is not None and math.isfinite(a) and math.isfinite(b)


def _px(img: list[bytearray], x: int, y: int, c: tuple[int, int, int]) -> None:
    if 0 <= y < len(img) and 0 <= x < len(img[0]) // 3:
        img[y][3 * x : 3 * x + 3] = bytes(c)


def _line(img: list[bytearray], p: tuple[int, int], q: tuple[int, int], c: tuple[int, int, int]) -> None:
    (xa, ya), (xb, yb) = p, q
    n = max(abs(xb - xa), abs(yb - ya), 1)
    for i in range(n + 1):
        x, y = xa + (xb - xa) * i / n, ya + (yb - ya) * i / n
        _px(img, round(x), round(y), c)
        _px(img, round(x), round(y) + 1, c)  # two pixels thick


def _text(img: list[bytearray], x: int, y: int, s: str, c: tuple[int, int, int], scale: int = 1) -> None:
    for ch in s:
        for r, bits in enumerate(_FONT.get(ch.upper(), _FONT[" "])):
            for col in range(3):
                if bits & (4 >> col):
                    for dy in range(scale):
                        for dx in range(scale):
                            _px(img, x + col * scale + dx, y + r * scale + dy, c)
        x += 4 * scale


def _write_png(path: str, img: list[bytearray]) -> None:
    h, w = len(img), len(img[0]) // 3
    raw = b"".join(b"\x00" + bytes(row) for row in img)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 6)))
        f.write(chunk(b"IEND", b""))
