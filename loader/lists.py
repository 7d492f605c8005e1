"""List (variable-length) columns in the loader: read, carry over, permute and slice as values + offsets.

A list column of R rows is held as ``values [N]`` (the ids of all rows, one after the other) and
``offsets [R + 1]`` int64 (row ``i`` is ``values[offsets[i]:offsets[i + 1]]``; ``offsets[0] == 0``).
An optional weight column (``list<float32>``, same lengths) shares the offsets.

Everything here is vectorised: permuting rows builds one element index with ``repeat`` + ``arange``
index math (no per-row or per-element Python loop), and a batch is a view of the chunk's values
plus a rebased copy of ``B + 1`` offsets. The CPU path uses numpy (it runs in the producer thread,
where a torch op would start a second OpenMP team; see ``chunk.py``), the GPU path the same maths in
torch on the device.

Null lists are read as empty lists; null *elements* are an error (the ETL encodes them as id 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ctrflow.loader.pool import BufferPool

LIST_FORMATS = ("jagged", "padded")

# (values [N], offsets [R + 1] int64, weights [N] float32 or None) of one list column.
Lists = tuple[Any, Any, Any]


def arrow_list(arr: pa.Array, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(values [N], offsets [R + 1] int64 from 0)`` of one Arrow list array (zero-copy views).

    Handles sliced arrays (their offsets do not start at 0), ``large_list`` and null lists.
    """
    if arr.null_count:
        arr = arr.fill_null(pa.scalar([], type=arr.type))
    offsets = arr.offsets.to_numpy().astype(np.int64, copy=False)
    lo, hi = int(offsets[0]), int(offsets[-1])
    child = arr.values.slice(lo, hi - lo)
    if child.null_count:
        raise ValueError(f"list column {name!r} has {child.null_count} null elements; encode them before loading")
    values = child.to_numpy(zero_copy_only=False)
    return values, (offsets - lo) if lo else offsets


def read_lists(tables: list[pa.Table], name: str, weight: str | None, prefix: Lists | None = None,
               pool: BufferPool | None = None) -> Lists:
    """One list column (and its weights) of the concatenated ``tables``, as fresh writable arrays.

    ``prefix`` (numpy lists, e.g. carried-over rows) goes first, in the same single copy; ``pool``
    recycles the output buffers (first-touch page faults cost as much as the copy itself).
    """
    vals, offs, wts = [], [np.zeros(1, np.int64)], []
    base = 0
    if prefix is not None:
        vals.append(prefix[0])
        offs.append(prefix[1][1:])
        base = int(prefix[1][-1])
        if weight:
            wts.append(prefix[2])
    for t in tables:
        wchunks = t.column(weight).chunks if weight else None
        for i, ch in enumerate(t.column(name).chunks):
            if not len(ch):
                continue
            v, o = arrow_list(ch, name)
            vals.append(v)
            offs.append(o[1:] + base)
            base += int(o[-1])
            if wchunks is not None:
                w, wo = arrow_list(wchunks[i], weight)
                if wo.shape != o.shape or not np.array_equal(wo, o):
                    raise ValueError(f"weight column {weight!r} does not have the lengths of list column {name!r}")
                wts.append(w)
    values = _concat(vals, np.int32, pool)
    weights = _concat(wts, np.float32, pool) if weight else None
    return values, np.concatenate(offs), weights


def _empty(n: int, dtype: Any, pool: BufferPool | None) -> np.ndarray:
    if pool is None:
        return np.empty(n, dtype)
    return pool.get((n,), torch.from_numpy(np.empty(0, dtype)).dtype).numpy()


def _concat(parts: list[np.ndarray], default: Any, pool: BufferPool | None) -> np.ndarray:
    dtype = np.result_type(*parts) if parts else np.dtype(default)
    out = _empty(sum(p.shape[0] for p in parts), dtype, pool)
    if parts:
        np.concatenate(parts, out=out, casting="unsafe")
    return out


def gather_index(offsets: Any, rows: Any) -> tuple[Any, Any]:
    """Element index and offsets of the rows ``rows`` taken in that order (numpy or torch).

    Args:
        offsets: [R + 1] int64 offsets of the source rows.
        rows: [R'] source row of every output row.

    Returns:
        ``(index [N'], new offsets [R' + 1])`` with ``out_values = values[index]``.
    """
    if isinstance(offsets, torch.Tensor):
        rows = rows.to(offsets.device)
        starts = offsets.index_select(0, rows)
        lengths = offsets.index_select(0, rows + 1) - starts
        new = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=offsets.device)
        torch.cumsum(lengths, 0, out=new[1:])
        n = int(new[-1])
        shift = torch.repeat_interleave(starts - new[:-1], lengths, output_size=n)
        return shift + torch.arange(n, device=offsets.device), new
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    new = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=new[1:])
    # int32 element indices when they fit: half the memory traffic of the three passes over N.
    dtype = np.int32 if offsets[-1] < 2**31 and new[-1] < 2**31 else np.int64
    index = np.repeat((starts - new[:-1]).astype(dtype), lengths)
    index += np.arange(index.shape[0], dtype=dtype)
    return index, new


def _cat(xs: list[Any]) -> Any:
    return torch.cat(xs) if isinstance(xs[0], torch.Tensor) else np.concatenate(xs)


def _copy(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x.copy()


def _tensor(x: Any) -> Any:
    return x if x is None or isinstance(x, torch.Tensor) else torch.from_numpy(x)


def join(a: Lists, b: Lists) -> Lists:
    """Rows of ``a`` followed by rows of ``b``."""
    va, oa, wa = a
    vb, ob, wb = b
    w = None if wa is None else _cat([wa, wb])
    return _cat([va, vb]), _cat([oa, ob[1:] + oa[-1]]), w


def take_rows(x: Lists, rows: Any) -> Lists:
    """Rows ``rows`` of ``x`` in that order (a copy)."""
    v, o, w = x
    if isinstance(v, torch.Tensor):
        index, new = gather_index(o, rows)
        return v.index_select(0, index), new, None if w is None else w.index_select(0, index)
    return _take_blocked(v, o, w, rows)


def _take_blocked(v: np.ndarray, o: np.ndarray, w: np.ndarray | None, rows: np.ndarray, block: int = 8192,
                  pool: BufferPool | None = None) -> Lists:
    """``take_rows`` on the CPU, ``block`` rows at a time so the element index stays in cache (~25% faster)."""
    starts = o[rows]
    lengths = o[rows + 1] - starts
    new = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=new[1:])
    total = int(new[-1])
    dtype = np.int32 if max(total, int(o[-1])) < 2**31 else np.int64  # half the index traffic
    out_v = _empty(total, v.dtype, pool)
    out_w = None if w is None else _empty(total, w.dtype, pool)
    shift = (starts - new[:-1]).astype(dtype)
    ramp = np.arange(min(total, 1 << 22), dtype=dtype)
    for s in range(0, len(rows), block):
        e = min(s + block, len(rows))
        lo, hi = int(new[s]), int(new[e])
        index = np.repeat(shift[s:e], lengths[s:e])
        index += ramp[: hi - lo] if hi - lo <= ramp.shape[0] else np.arange(hi - lo, dtype=dtype)
        index += lo
        # mode="wrap": no bounds check (the index is in range by construction), as in chunk.py.
        np.take(v, index, out=out_v[lo:hi], mode="wrap")
        if out_w is not None:
            np.take(w, index, out=out_w[lo:hi], mode="wrap")
    return out_v, new, out_w


def row_range(x: Lists, start: int, stop: int, copy: bool = False) -> Lists:
    """Rows ``[start, stop)`` of ``x``: values as views (``copy``: copies), offsets rebased."""
    v, o, w = x
    lo, hi = int(o[start]), int(o[stop])
    off = o[start : stop + 1] - lo
    vs, ws = v[lo:hi], None if w is None else w[lo:hi]
    if copy:
        vs, ws = _copy(vs), None if ws is None else _copy(ws)
    return vs, off, ws


@dataclass
class ListStage:
    """Carries a builder's list columns from chunk to chunk (leftover rows, row permutation).

    Args:
        names: list columns.
        weights: the weight column of each (``None`` for none), aligned with ``names``.
        device: ``None`` for the CPU path (numpy), else the torch device values are moved to.
    """

    names: tuple[str, ...]
    weights: tuple[str | None, ...]
    device: torch.device | None = None
    left: dict[str, Lists] | None = None
    pool: BufferPool = field(default_factory=lambda: BufferPool(capacity=8))

    def build(self, tables: list[pa.Table], has_left: bool, perm: Any, rows: int, keep_from: int | None
              ) -> dict[str, Lists]:
        """This chunk's list columns.

        Args:
            tables: the chunk's decoded slices.
            has_left: the builder prepends leftover rows (``self.left``) to this chunk.
            perm: permutation of leftover + new rows (numpy or torch, matching ``device``), or ``None``.
            rows: rows handed out in this chunk (the first ``rows`` after the permutation).
            keep_from: rows from here on are the new leftover (``None``: no leftover).

        Returns:
            ``{name: (values, offsets, weights)}`` as torch tensors, rows ``[0, rows)``.
        """
        out, left = {}, {}
        for name, weight in zip(self.names, self.weights, strict=True):
            prev = self.left[name] if has_left and self.left is not None else None
            if self.device is None:
                x = read_lists(tables, name, weight, prefix=prev, pool=self.pool)  # one copy, leftover first
            else:
                x = read_lists(tables, name, weight)
                x = tuple(None if a is None else torch.from_numpy(a).to(self.device) for a in x)
                if prev is not None:
                    x = join(prev, x)
            if perm is not None:
                x = take_rows(x, perm) if self.device is not None else _take_blocked(*x, perm, pool=self.pool)
            if keep_from is not None:
                left[name] = row_range(x, keep_from, int(x[1].shape[0]) - 1, copy=True)
            out[name] = tuple(_tensor(a) for a in row_range(x, 0, rows))
        self.left = left or None
        return out


def batch_lists(
    lists: dict[str, Lists], start: int, rows: int, fmt: str = "jagged", lengths: dict[str, int] | None = None
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """The list features of batch rows ``[start, start + rows)`` of a chunk.

    Returns:
        ``(lists, weights)`` for :class:`~ctrflow.loader.batch.Batch`. ``jagged``: ``(values [N] view,
        offsets [B + 1] int64)``; ``padded``: ``(values [B, L] padded with 0, lengths [B] int64)`` and
        weights ``[B, L]`` (0 past each row's end). Lists longer than ``L`` keep their first ``L`` ids.
    """
    from ctrflow.loader.jagged import to_padded

    out, wts = {}, {}
    for name, x in lists.items():
        v, o, w = row_range(x, start, start + rows)
        if fmt == "padded":
            length = (lengths or {}).get(name) or (int((o[1:] - o[:-1]).max()) if rows else 0)
            out[name] = (to_padded(v, o, length), (o[1:] - o[:-1]).clamp_(max=length))
            if w is not None:
                wts[name] = to_padded(w, o, length)
        else:
            out[name] = (v, o)
            if w is not None:
                wts[name] = w
    return out, wts
