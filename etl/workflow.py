"""``Workflow``: fit the stats of an op graph over a Dataset, then transform it partition by partition.

Example:
    >>> import pandas as pd
    >>> from ctrflow.etl import Dataset, Workflow
    >>> from ctrflow.etl.ops import Categorify, Normalize
    >>> wf = Workflow((["c"] >> Categorify()) + (["x"] >> Normalize()))
    >>> out = wf.fit_transform(Dataset(pd.DataFrame({"c": ["a", "b", "a"], "x": [1.0, 2.0, 3.0]})))
    >>> out.compute()["c"].tolist(), get_embedding_sizes(wf)
    ([3, 4, 3], {'c': (5, 16)})
"""

from __future__ import annotations

import json
import logging
import os
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ctrflow.etl import dispatch, lists
from ctrflow.etl.dataset import Dataset
from ctrflow.etl.graph import Node, Selectable, as_node, graph_from_dict, graph_to_dict
from ctrflow.etl.ops.base import Operator, elementwise_chain, op_from_dict, op_to_dict
from ctrflow.etl.schema import ColumnSchema, Schema
from ctrflow.etl.update import check_not_seen, input_fingerprint
from ctrflow.etl.versions import library_versions
from ctrflow.etl.writer import atomic_dir

log = logging.getLogger("ctrflow.etl")
WORKFLOW_FORMAT = "ctrflow.workflow/1"


class WorkflowError(ValueError):
    """A saved workflow that is corrupt or incompatible."""


class _Evaluator:
    """Evaluates nodes of the graph on one partition (memoised within the call)."""

    def __init__(self, targets: list[Node], cast: dict[str, str] | None = None) -> None:
        self.targets = targets
        self.cast = cast
        self.token = uuid.uuid4().hex

    def __dask_tokenize__(self) -> str:
        # Dask would otherwise pickle the whole graph (vocabularies included) to name each task.
        return self.token

    def __call__(self, df: Any) -> Any:
        memo: dict[int, Any] = {}
        outs = [self._eval(t, df, memo) for t in self.targets]
        out = outs[0] if len(outs) == 1 else _concat(outs)
        if self.cast:
            out = out.astype({c: t for c, t in self.cast.items() if t and out[c].dtype != t})
        return out

    def _eval(self, node: Node, df: Any, memo: dict[int, Any]) -> Any:
        key = id(node)
        if key in memo:
            return memo[key]
        if node.selector is not None:
            out = df[node.selector.names]
        elif node.op is not None and node.op.elementwise:
            out = self._eval_elementwise(node, df, memo)
        else:
            parts = [self._eval(p, df, memo) for p in node.parents]
            inp = parts[0] if len(parts) == 1 else _concat(parts)
            out = inp if node.op is None else node.op.transform(node.input_columns, inp)
        memo[key] = out
        return out

    def _eval_elementwise(self, node: Node, df: Any, memo: dict[int, Any]) -> Any:
        """A chain of elementwise ops (``FillMissing >> Clip >> LogOp >> Normalize``) in one pass per
        column on one float64 array: each op writes in place, so no intermediate arrays or Series."""
        chain = [node]
        while (len(chain[-1].parents) == 1 and (p := chain[-1].parents[0]).op is not None and p.op.elementwise
               and id(p) not in memo):
            chain.append(p)
        chain.reverse()
        for n in chain:
            n.op._require_fitted()
        parents = [self._eval(p, df, memo) for p in chain[0].parents]
        inp = parents[0] if len(parents) == 1 else _concat(parents)
        ops = [n.op for n in chain]
        out = {}
        for c in node.input_columns:
            series = inp[c]  # one lookup: pandas column access is not free
            out[c] = dispatch.series_like(series, elementwise_chain(ops, c, series), name=c)
        return dispatch.frame_from_columns(inp, out)


def _concat(frames: list[Any]) -> Any:
    """Column-wise concat of frames sharing an index (a later duplicate column wins)."""
    cols: dict[str, Any] = {}
    for f in frames:
        for c, s in f.items():  # by position: cheaper than a label lookup per column
            cols[c] = s
    return dispatch.frame_from_columns(frames[0], cols)


class Workflow:
    """A graph of ops with fitted statistics.

    Args:
        graph: a ``Node`` (``cols >> Op()`` ...), a selector, or column names.
    """

    def __init__(self, graph: Selectable) -> None:
        self.output_node = as_node(graph)
        self.fitted = not any(n.op is not None and n.op.is_stat for n in self.output_node.walk())
        self.meta: dict[str, Any] = {}
        self.input_dtypes: dict[str, str] = {}  # dtype of each input column at fit time (serving parses to it)
        self.list_columns: list[str] = []  # list-typed outputs (etl/lists.py: schema kind "list")
        self.seen: list[dict[str, Any]] = []  # fingerprints of the inputs fitted / updated on (etl/update.py)

    # ---- structure ------------------------------------------------------------------------
    @property
    def input_columns(self) -> list[str]:
        return self.output_node.leaf_columns()

    @property
    def output_columns(self) -> list[str]:
        return self.output_node.output_columns

    @property
    def ops(self) -> list[Operator]:
        return [n.op for n in self.output_node.walk() if n.op is not None]

    def _stat_levels(self) -> list[list[Node]]:
        """Stat nodes grouped by dependency level (a level needs only lower levels fitted)."""
        level: dict[int, int] = {}
        for n in self.output_node.walk():
            below = max((level[id(p)] for p in n.parents), default=-1)
            level[id(n)] = below + 1 if (n.op is not None and n.op.is_stat) else below
        groups: dict[int, list[Node]] = {}
        for n in self.output_node.walk():
            if n.op is not None and n.op.is_stat:
                groups.setdefault(level[id(n)], []).append(n)
        return [groups[k] for k in sorted(groups)]

    def _fit_levels(self, ddf: Any, finalize: Callable[[Any, Any], None]) -> None:
        """Compute every stat op's partials, level by level, and hand each op its merged stats.

        One ``dask.compute`` per dependency level; a level's inputs go through the stats already
        finalized below it. ``finalize(op, stats)`` is ``fit_finalize`` for a fit and
        ``update_finalize`` for ``Workflow.update``.
        """
        for nodes in self._stat_levels():
            lazy = []
            for node in nodes:
                parents_eval = _Evaluator(node.parents)
                inp = ddf.map_partitions(parents_eval, meta=parents_eval(ddf._meta))
                lazy.append(node.op.fit(node.input_columns, inp))
            computed = dispatch.compute(*lazy)
            for node, stats in zip(nodes, computed, strict=True):
                finalize(node.op, stats)

    # ---- fit / transform -------------------------------------------------------------------
    def fit(self, dataset: Dataset) -> Workflow:
        """Compute every stat op's statistics: one ``dask.compute`` per dependency level."""
        dataset.check_columns(self.input_columns)
        ddf = dataset.to_ddf(self.input_columns)
        self.input_dtypes = {str(c): str(t) for c, t in ddf._meta.dtypes.items()}
        self.seen = [r] if (r := input_fingerprint(dataset)) else []
        self._fit_levels(ddf, lambda op, stats: op.fit_finalize(stats))
        self.fitted = True
        self.list_columns = lists.list_outputs(_Evaluator([self.output_node])(ddf._meta))
        return self

    def transform(self, dataset: Dataset) -> Dataset:
        """Apply the fitted graph lazily; returns a Dataset of the output columns (cast to schema)."""
        if not self.fitted:
            raise RuntimeError("Workflow.transform before Workflow.fit: fit it on a dataset first")
        dataset.check_columns(self.input_columns)
        ddf = dataset.to_ddf(self.input_columns)
        self.list_columns = lists.list_outputs(_Evaluator([self.output_node])(ddf._meta))
        schema = self.output_schema()
        evaluator = self._partition_fn(schema)
        out = ddf.map_partitions(evaluator, meta=evaluator(ddf._meta))
        return Dataset(out, schema=schema)

    def _partition_fn(self, schema: Schema) -> _Evaluator:
        """The per-partition function of :meth:`transform` (also :meth:`transform_frame`'s: no skew)."""
        return _Evaluator([self.output_node],
                          {c.name: c.dtype for c in schema.columns if c.kind not in ("other", "list")})

    def transform_frame(self, df: Any) -> Any:
        """Apply the fitted graph to one in-memory frame (pandas or cudf) without Dask, e.g. to serve.

        Runs exactly the function :meth:`transform` maps over each partition, so online and offline
        outputs are the same for the same input rows (and dtypes: pass them as the fit data had them,
        see ``input_dtypes``).

        Args:
            df: a frame holding every column of ``input_columns`` (others are ignored), B rows.

        Returns:
            A frame of the B output rows with ``output_columns``, cast to the output schema's dtypes.
        """
        if not self.fitted:
            raise RuntimeError("Workflow.transform_frame before Workflow.fit: fit it on a dataset first")
        missing = [c for c in self.input_columns if c not in df.columns]
        if missing:
            raise ValueError(f"transform_frame: the frame lacks input column(s) {missing}")
        return self._partition_fn(self.output_schema())(df)  # the leaf nodes select their own columns

    def update(self, dataset: Dataset, decay: float | None = None, force: bool = False,
               source: dict[str, Any] | None = None) -> Workflow:
        """Merge a new day's stats into the fitted ones (in place); ids stay, new categories get ids at the end.

        Level by level like :meth:`fit`, each stat op's ``update_finalize`` gets the partials its ``fit``
        computes on ``dataset`` (see :mod:`ctrflow.etl.update` for what each op keeps).

        Args:
            dataset: the new data (same input columns).
            decay: multiply the stored category counts by this (0 < decay <= 1) before adding the new ones.
            force: ingest an input whose files the workflow has seen before.
            source: the fingerprint to record (default: ``input_fingerprint(dataset)``); the CLI passes
                the raw input's when ``dataset`` is a split of it.

        Returns:
            This workflow, with updated stats and the input appended to ``seen``.
        """
        if not self.fitted:
            raise RuntimeError("Workflow.update before Workflow.fit: fit it on the first day first")
        if decay is not None and not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        stuck = sorted({type(o).__name__ for o in self.ops if o.is_stat
                        and type(o).update_finalize is Operator.update_finalize})
        if stuck:  # checked first, so a failed update leaves the workflow as it was
            raise ValueError(f"{', '.join(stuck)} cannot be updated incrementally: refit the workflow")
        record = source if source is not None else input_fingerprint(dataset)
        if not force:
            check_not_seen(self.seen, record)
        dataset.check_columns(self.input_columns)
        ddf = dataset.to_ddf(self.input_columns)
        # a level's new partials are computed through the already-updated stats below it
        self._fit_levels(ddf, lambda op, stats: op.update_finalize(stats, decay))
        if record is not None:
            self.seen.append({**record, "decay": decay, "forced": bool(force)})
        return self

    def fit_transform(self, dataset: Dataset) -> Dataset:
        return self.fit(dataset).transform(dataset)

    # ---- schema -----------------------------------------------------------------------------
    def _origin(self, node: Node, column: str) -> tuple[Operator | None, str]:
        """The op that last produced ``column`` on the way to ``node`` and its name there.

        ``(None, column)`` means the column passes through from the input unchanged.
        """
        if node.op is not None and column in node.output_columns:
            source = node.op.source_column(column, node.input_columns)
            if source is None:
                return node.op, column
            node = Node(parents=node.parents)
            column = source
        for p in reversed(node.parents):
            if column in p.output_columns:
                return self._origin(p, column)
        return None, column

    def output_schema(self, input_dtypes: dict[str, str] | None = None) -> Schema:
        """Kind, dtype, cardinality and embedding dim of every output column."""
        cols = []
        for name in self.output_columns:
            op, source = self._origin(self.output_node, name)
            if op is None:
                dtype = (input_dtypes or {}).get(source)
                cols.append(ColumnSchema(name, "other", dtype or "unknown"))
            else:
                info = op.column_info(source)
                cols.append(ColumnSchema(name, info["kind"], info["dtype"] or "unknown",
                                         info.get("cardinality"), info.get("embedding_dim"),
                                         max_length=info.get("max_length"), vocabulary=info.get("vocabulary"),
                                         quantiles=info.get("quantiles")))
        return lists.list_schema(self, Schema(cols))

    # ---- persistence ------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, overwrite: bool = True) -> None:
        """Write ``workflow.json`` plus one parquet file per vocabulary (atomically; never pickle)."""
        nodes = list(self.output_node.walk())
        tables_index: dict[str, dict[str, int]] = {}
        writes: list[tuple[pa.Table, str]] = []
        with atomic_dir(path, overwrite=overwrite) as tmp:

            def dump(op: Operator) -> dict[str, Any]:
                i = next(k for k, n in enumerate(nodes) if n.op is op)
                state, tables = op.get_state()
                for name, table in tables.items():
                    rel = f"ops/{i}/{name}.parquet"
                    os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
                    writes.append((table, os.path.join(tmp, rel)))
                    tables_index.setdefault(str(i), {})[name] = table.num_rows
                return {**op_to_dict(op), "state": state}

            doc = {
                "format": WORKFLOW_FORMAT,
                "versions": library_versions(),
                "fitted": self.fitted,
                "graph": graph_to_dict(self.output_node, dump),
                "tables": tables_index,
                "meta": self.meta,
                "input_dtypes": self.input_dtypes,
                "list_columns": self.list_columns,
                "seen": self.seen,
            }
            # one vocabulary per thread (the writer releases the GIL); values are distinct, so
            # dictionary encoding would only hash them all for nothing
            dispatch.thread_map(lambda w: pq.write_table(w[0], w[1], use_dictionary=False), writes)
            with open(os.path.join(tmp, "workflow.json"), "w") as f:
                json.dump(doc, f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Workflow:
        """Read a saved workflow; warns on a library-version mismatch, refuses a corrupt save."""
        path = os.fspath(path)
        doc_path = os.path.join(path, "workflow.json")
        try:
            with open(doc_path) as f:
                doc = json.load(f)
        except FileNotFoundError:
            raise WorkflowError(f"{path} is not a saved workflow (no workflow.json)") from None
        except json.JSONDecodeError as e:
            raise WorkflowError(f"{doc_path} is corrupt ({e}); re-run the ETL") from None
        if doc.get("format") != WORKFLOW_FORMAT:
            raise WorkflowError(f"{doc_path}: format {doc.get('format')!r}, expected {WORKFLOW_FORMAT!r}")
        saved, now = doc.get("versions", {}), library_versions()
        diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        if diff:
            warnings.warn(f"workflow saved with other library versions {diff}; ids are stable, stats may differ",
                          stacklevel=2)
        try:
            return cls._from_doc(path, doc)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            if isinstance(e, WorkflowError):
                raise
            raise WorkflowError(f"{doc_path} does not describe a valid workflow ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_doc(cls, path: str, doc: dict[str, Any]) -> Workflow:
        tables = doc.get("tables", {})

        def build(d: dict[str, Any]) -> Operator:
            op = op_from_dict(d)
            i = next(k for k, n in enumerate(doc["graph"]["nodes"]) if n["op"] is d)
            loaded = {}
            for name, rows in tables.get(str(i), {}).items():
                file = os.path.join(path, f"ops/{i}/{name}.parquet")
                try:
                    t = pq.read_table(file)
                except Exception as e:
                    raise WorkflowError(f"{file} is missing or corrupt ({e}); re-run the ETL") from None
                if t.num_rows != rows:
                    raise WorkflowError(f"{file} has {t.num_rows} rows, workflow.json says {rows}: corrupt save")
                loaded[name] = t
            op.set_state(d.get("state", {}), loaded)
            return op

        wf = cls(graph_from_dict(doc["graph"], build))
        wf.fitted = bool(doc.get("fitted"))
        wf.meta = doc.get("meta", {})
        wf.input_dtypes = doc.get("input_dtypes", {})
        wf.list_columns = doc.get("list_columns", [])
        wf.seen = doc.get("seen", [])
        return wf

    def __repr__(self) -> str:
        return f"Workflow({self.output_node!r}, fitted={self.fitted})"


def get_embedding_sizes(workflow: Workflow) -> dict[str, tuple[int, int]]:
    """``{column: (cardinality, embedding dim)}`` for every categorical output of a fitted workflow."""
    return workflow.output_schema().embedding_sizes()


__all__ = ["Workflow", "WorkflowError", "get_embedding_sizes"]
