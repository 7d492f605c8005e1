"""``FastTransform``: a fitted workflow's transform on arrow / numpy columns, planned once (serving's hot path).

``Workflow.transform_frame`` re-derives on every call what never changes between requests -- the graph's
column lists, the output schema and its dtypes, each Categorify vocabulary's hash table -- and builds a
pandas frame per op: ~13 ms per call whether it holds 256 rows or 2,048. Here the graph is walked once,
when the predictor loads, into steps; each runs one op's ``array_transform`` (``etl/ops/*``: the functions
the op's pandas ``transform`` calls, so each op has one implementation) on a dict of host columns, and
the output is cast to the schema's dtypes as the workflow casts it. Chains of elementwise ops
(``FillMissing >> Clip >> LogOp >> Normalize``) run fused through ``elementwise_chain``, as the workflow
runs them. An op without an array path (a user's op) runs its pandas ``transform`` on a frame of its
inputs, said once in the log when the plan is made.

The input is what ``transform_frame``'s frame holds: ``readers.normalize_arrow`` of the validated columns
(strings dictionary-encoded, ints int64, ±inf as null ...), so the outputs are bit-identical to it and
to the Dask transform (``tests/test_serve_fastpath.py`` checks every op).

Example:
    >>> fast = FastTransform(workflow)                                  # doctest: +SKIP
    >>> fast({"C1": pa.array(["a", None]), "I1": pa.array([3, None])}).to_frame()   # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ctrflow.etl.ops.base import OpNotFittedError, elementwise_chain, host_series, host_values
from ctrflow.etl.readers import normalize_arrow
from ctrflow.etl.workflow import Workflow

log = logging.getLogger("ctrflow.serve")


class Processed:
    """Transformed rows: ``{output column: array}`` of ``n`` rows (numpy; a pyarrow array for list columns).

    What ``Predictor.predict_processed`` reads without building a DataFrame; :meth:`to_frame` gives the
    frame ``Workflow.transform_frame`` returns.

    Args:
        data: output column -> its values, in the workflow's output order.
        n: rows.
    """

    def __init__(self, data: dict[str, Any], n: int) -> None:
        self.data, self.n = data, int(n)

    def __len__(self) -> int:
        return self.n

    @property
    def columns(self) -> list[str]:
        return list(self.data)

    def __getitem__(self, name: str) -> pd.Series:
        """A column as the Series the frame would hold (a view, no copy)."""
        return host_series(self.data[name], name)

    def numpy(self, name: str, dtype: Any = None) -> np.ndarray:
        """A column as numpy (``Series.to_numpy(dtype=dtype)`` of the frame's column)."""
        v = self.data[name]
        if isinstance(v, np.ndarray):
            return v if dtype is None else v.astype(dtype, copy=False)
        return host_series(v, name).to_numpy(dtype=dtype)

    def slice(self, lo: int, hi: int) -> Processed:
        """Rows ``lo:hi`` (views)."""
        lo, hi = min(lo, self.n), min(hi, self.n)

        def cut(v: Any) -> Any:
            if isinstance(v, pa.Array):
                return v.slice(lo, hi - lo)
            return v.iloc[lo:hi].reset_index(drop=True) if isinstance(v, pd.Series) else v[lo:hi]

        return Processed({c: cut(v) for c, v in self.data.items()}, max(0, hi - lo))

    def to_frame(self) -> pd.DataFrame:
        """The rows as the DataFrame ``Workflow.transform_frame`` returns for them."""
        return pd.DataFrame({c: host_series(v, c) for c, v in self.data.items()}, index=pd.RangeIndex(self.n),
                            copy=False)


def column_numpy(processed: pd.DataFrame | Processed, name: str, dtype: Any = None) -> np.ndarray:
    """A processed column as numpy, from a :class:`Processed` or a DataFrame (``Series.to_numpy(dtype=dtype)``)."""
    if isinstance(processed, Processed):
        return processed.numpy(name, dtype)
    return processed[name].to_numpy(dtype=dtype)


class FastTransform:
    """A fitted workflow's transform, planned once, on host columns.

    Args:
        workflow: a fitted workflow. Plan after its last ``fit`` / ``update``: the plan holds its
            lookup tables (a Categorify whose vocabulary changed since falls back to ``index_in``).
        outputs: the output columns to make (default: all, in the workflow's order); the ops that only
            feed others (e.g. ``Label`` for a predictor, whose model never reads the label) are left out.

    Attributes:
        slow_ops: names of the ops that run their pandas transform on a frame (no array path).
    """

    def __init__(self, workflow: Workflow, outputs: list[str] | None = None) -> None:
        if not workflow.fitted:
            raise RuntimeError("FastTransform of an unfitted workflow: fit it on a dataset first")
        schema = workflow.output_schema()
        self.outputs = list(workflow.output_columns if outputs is None else outputs)
        unknown = [c for c in self.outputs if c not in workflow.output_columns]
        if unknown:
            raise ValueError(f"the workflow makes no output column(s) {unknown}")
        # The workflow's final cast (Workflow._partition_fn): every column but kind other / list.
        self.cast = [(c.name, c.dtype, _numpy_dtype(c.dtype)) for c in schema.columns
                     if c.kind not in ("other", "list") and c.dtype and c.name in self.outputs]
        nodes = _needed(workflow.output_node, set(self.outputs))
        self.input_columns = [c for c in workflow.input_columns
                              if any(n.selector is not None and c in n.selector.names for n in nodes)]
        index = {id(n): i for i, n in enumerate(nodes)}
        consumers = [0] * len(nodes)
        for n in nodes:
            for p in n.parents:
                if id(p) in index:  # a concat node's parents that give no needed column are left out
                    consumers[index[id(p)]] += 1
        steps: dict[int, tuple] = {}
        chains: dict[int, list[Any]] = {}  # node -> its fused chain of elementwise ops
        self.slow_ops: list[str] = []
        for i, n in enumerate(nodes):
            parents = [index[id(p)] for p in n.parents if id(p) in index]
            if n.selector is not None:
                steps[i] = ("select", parents, list(n.selector.names))
            elif n.op is None:
                steps[i] = ("concat", parents, None)
            elif n.op.elementwise:
                if not n.op.fitted:
                    raise OpNotFittedError(f"{type(n.op).__name__} is not fitted: call Workflow.fit(dataset) first")
                ops, up = [n.op], parents
                p = parents[0] if len(parents) == 1 else None
                if p is not None and p in chains and consumers[p] == 1:  # extend the parent's chain (fused)
                    ops, up = chains.pop(p) + ops, steps.pop(p)[1]
                chains[i] = ops
                steps[i] = ("chain", up, (ops, n.input_columns))
            else:
                fn = n.op.array_transform(n.input_columns)
                if fn is None:
                    self.slow_ops.append(type(n.op).__name__)
                    steps[i] = ("frame", parents, (n.op, n.input_columns))
                else:
                    steps[i] = ("op", parents, fn)
        self.steps = [(i, *steps[i]) for i in sorted(steps)]
        self.root = index[id(workflow.output_node)]
        if self.slow_ops:
            log.warning("serving: no array transform for %s: these run their pandas transform on a frame per "
                        "request (same values, slower)", ", ".join(sorted(set(self.slow_ops))))

    def __call__(self, columns: Mapping[str, pa.Array]) -> Processed:
        """Transform validated raw columns (``Predictor.columns``: B rows each).

        Args:
            columns: ``{input column: pa.Array [B]}`` holding every column of ``input_columns``.

        Returns:
            The B output rows (:class:`Processed`), equal to ``Workflow.transform_frame(to_frame(columns))``.
        """
        missing = [c for c in self.input_columns if c not in columns]
        if missing:
            raise ValueError(f"transform_frame: the frame lacks input column(s) {missing}")
        table = normalize_arrow(pa.Table.from_arrays([columns[c] for c in self.input_columns],
                                                     names=self.input_columns))
        n = table.num_rows
        inputs = {c: a.chunk(0) if a.num_chunks == 1 else a.combine_chunks()
                  for c, a in zip(self.input_columns, table.columns, strict=True)}
        env: dict[int, dict[str, Any]] = {}
        for i, kind, parents, arg in self.steps:
            if kind == "select":
                env[i] = {c: inputs[c] for c in arg}
                continue
            if len(parents) == 1:
                inp = env[parents[0]]
            else:  # the workflow's concat: first occurrence's position, a later duplicate's value
                inp = {}
                for p in parents:
                    inp.update(env[p])
            if kind == "op":
                env[i] = arg(inp)
            elif kind == "chain":
                ops, cols = arg
                env[i] = {c: elementwise_chain(ops, c, host_series(inp[c], c)) for c in cols}
            elif kind == "frame":
                env[i] = _frame_step(arg[0], arg[1], inp, n)
            else:
                env[i] = inp
        out = env[self.root]
        return Processed(self._cast({c: out[c] for c in self.outputs}), n)

    def _cast(self, out: dict[str, Any]) -> dict[str, Any]:
        """The workflow's final ``astype`` to the schema's dtypes, column by column (in place)."""
        for c, t, nt in self.cast:
            v = out[c]
            if isinstance(v, np.ndarray) and nt is not None:
                if v.dtype == nt:
                    continue
                if (v.dtype.kind in "iu" and nt.kind in "iuf") or v.dtype.kind == nt.kind == "f":
                    out[c] = v.astype(nt)  # what pandas' astype does for these
                    continue
            series = host_series(v, c)
            if series.dtype != t:  # e.g. NaN to int: pandas' own rules (and errors)
                out[c] = host_values(series.astype(t))
        return out


def plan(workflow: Workflow, outputs: list[str] | None = None) -> FastTransform | None:
    """The workflow's :class:`FastTransform` (of ``outputs``), or None (logged once) when no plan can be made:
    the caller then runs ``Workflow.transform_frame``."""
    try:
        return FastTransform(workflow, outputs)
    except Exception as e:  # noqa: BLE001 - a plan that cannot be made must not stop serving
        log.warning("serving: no fast transform plan (%s: %s); requests use Workflow.transform_frame",
                    type(e).__name__, e)
        return None


def _needed(root: Any, columns: set[str]) -> list[Any]:
    """The graph's nodes that ``columns`` of ``root``'s output depend on, parents first (``Node.walk``'s order).

    A concat node (no op) needs only the parents that give one of the columns it must give (the last
    parent holding a name gives its value); an op node needs every parent (all its input columns).
    """
    want: dict[int, set[str]] = {id(root): columns}
    order = list(root.walk())
    for n in reversed(order):  # children before parents
        cols = want.get(id(n))
        if cols is None:
            continue
        if n.op is None and n.selector is None:
            for c in cols:
                giver = next(p for p in reversed(n.parents) if c in p.output_columns)
                want.setdefault(id(giver), set()).add(c)
        else:
            for p in n.parents:
                want.setdefault(id(p), set()).update(p.output_columns)
    return [n for n in order if id(n) in want]


def _frame_step(op: Any, columns: list[str], inp: dict[str, Any], n: int) -> dict[str, Any]:
    """An op without an array path: its pandas transform on a frame of its inputs (as the workflow runs it)."""
    frame = pd.DataFrame({c: host_series(v, c) for c, v in inp.items()}, index=pd.RangeIndex(n), copy=False)
    out = op.transform(columns, frame)
    return {c: host_values(out[c]) for c in out.columns}


def _numpy_dtype(dtype: str) -> np.dtype | None:
    try:
        return np.dtype(dtype)
    except TypeError:
        return None
