"""Column selectors and the operator graph: ``cols >> Op() >> Op()`` and ``a + b``.

This is NVTabular's user-facing contract: a list of column names (or a ``ColumnSelector``) piped
into operators builds a ``Node``; ``+`` concatenates the outputs of several nodes. The workflow
evaluates the graph one partition at a time.

Example:
    >>> from ctrflow.etl.ops import Categorify, Normalize
    >>> graph = (["C1", "C2"] >> Categorify()) + (["I1"] >> Normalize()) + ["label"]
    >>> graph.output_columns
    ['C1', 'C2', 'I1', 'label']
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from ctrflow.etl.ops.base import Operator


class ColumnSelector:
    """An ordered set of input column names.

    Args:
        names: column names (a single name is accepted too).
    """

    def __init__(self, names: str | Iterable[str] | None = None) -> None:
        if names is None:
            names = []
        elif isinstance(names, str):
            names = [names]
        self.names: list[str] = list(dict.fromkeys(names))

    def __rshift__(self, op: Operator) -> Node:
        return Node.leaf(self) >> op

    def __add__(self, other: Selectable) -> Node:
        return Node.leaf(self) + other

    def __radd__(self, other: Selectable) -> Node:
        return as_node(other) + Node.leaf(self)

    def __repr__(self) -> str:
        return f"ColumnSelector({self.names})"


Selectable = Union["Node", ColumnSelector, str, list, tuple]


class Node:
    """One step of the graph: an operator applied to the concatenated outputs of its parents.

    A leaf selects input columns (``op is None`` and ``selector`` set); a concat node has
    ``op is None`` and several parents.
    """

    def __init__(
        self,
        op: Operator | None = None,
        parents: list[Node] | None = None,
        selector: ColumnSelector | None = None,
    ) -> None:
        self.op = op
        self.parents = parents or []
        self.selector = selector

    @classmethod
    def leaf(cls, selector: ColumnSelector) -> Node:
        return cls(selector=selector)

    @property
    def input_columns(self) -> list[str]:
        """Columns fed to this node's operator (its parents' outputs, in order)."""
        cols: list[str] = []
        for p in self.parents:
            cols.extend(c for c in p.output_columns if c not in cols)
        return cols

    @property
    def output_columns(self) -> list[str]:
        if self.selector is not None:
            return list(self.selector.names)
        if self.op is None:
            return self.input_columns
        return self.op.output_column_names(self.input_columns)

    def __rshift__(self, op: Operator) -> Node:
        # An op is recognised by what the graph calls on it, not by isinstance: ops/base.py imports this module.
        if not callable(getattr(op, "output_column_names", None)):
            raise TypeError(f"`>>` needs an operator on its right, got {type(op).__name__}")
        return Node(op=op, parents=[self])

    def __add__(self, other: Selectable) -> Node:
        return Node(parents=[self, as_node(other)])

    def __radd__(self, other: Selectable) -> Node:
        return Node(parents=[as_node(other), self])

    def walk(self) -> Iterator[Node]:
        """Every node once, parents before children (topological order)."""
        seen: set[int] = set()
        order: list[Node] = []

        def visit(n: Node) -> None:
            if id(n) in seen:
                return
            seen.add(id(n))
            for p in n.parents:
                visit(p)
            order.append(n)

        visit(self)
        return iter(order)

    def leaf_columns(self) -> list[str]:
        """Every input column the graph reads from the dataset."""
        cols: list[str] = []
        for n in self.walk():
            if n.selector is not None:
                cols.extend(c for c in n.selector.names if c not in cols)
        return cols

    def __repr__(self) -> str:
        what = type(self.op).__name__ if self.op else ("select" if self.selector else "concat")
        return f"Node({what} -> {self.output_columns})"


def as_node(obj: Selectable) -> Node:
    """Coerce a node, selector, column name or list of names into a ``Node``."""
    if isinstance(obj, Node):
        return obj
    if isinstance(obj, ColumnSelector):
        return Node.leaf(obj)
    if isinstance(obj, (str, list, tuple)):
        return Node.leaf(ColumnSelector(obj))
    raise TypeError(f"cannot use {type(obj).__name__} as columns: pass names, a ColumnSelector or a Node")


def graph_to_dict(root: Node, op_to_dict: Any) -> dict[str, Any]:
    """Serialise the graph as ``{"nodes": [...], "root": i}`` (JSON-safe)."""
    nodes = list(root.walk())
    index = {id(n): i for i, n in enumerate(nodes)}
    out = []
    for n in nodes:
        out.append(
            {
                "op": op_to_dict(n.op) if n.op is not None else None,
                "selector": n.selector.names if n.selector is not None else None,
                "parents": [index[id(p)] for p in n.parents],
            }
        )
    return {"nodes": out, "root": index[id(root)]}


def graph_from_dict(d: dict[str, Any], op_from_dict: Any) -> Node:
    """Inverse of ``graph_to_dict``."""
    nodes: list[Node] = []
    for spec in d["nodes"]:
        sel = ColumnSelector(spec["selector"]) if spec["selector"] is not None else None
        op = op_from_dict(spec["op"]) if spec["op"] is not None else None
        nodes.append(Node(op=op, parents=[nodes[i] for i in spec["parents"]], selector=sel))
    return nodes[d["root"]]
