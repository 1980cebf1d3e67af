"""Graph verifier: structure, operand ownership, attributes, re-inferred types, acyclicity and outputs.

Errors name the offending node and carry the printed graph, so a broken pass shows where it broke.
"""
from __future__ import annotations

import networkx as nx

from ..errors import IRError
from .graph import Graph, ValueKind
from .ops import op_def
from .printer import to_text


def verify(graph: Graph) -> None:
    def fail(message: str, node: str | None = None):
        raise IRError(message, node=node, graph_text=to_text(graph))

    if not nx.is_directed_acyclic_graph(graph._edges):
        fail("the graph has a cycle: " + " -> ".join(str(e[0]) for e in nx.find_cycle(graph._edges)))
    seen: set[int] = {id(v) for v in graph.inputs} | {id(v) for v in graph.weights.values()}
    for v in graph.inputs:
        if v.kind != ValueKind.INPUT:
            fail(f"graph input {v.name!r} has kind {v.kind.value}")
    for node in graph.nodes:
        try:
            definition = op_def(node.op)
            # Attributes are checked when a node is added; a pass that edits node.attrs in place must not
            # slip an unknown, missing or mistyped one past the type inference below.
            completed = definition.complete_attrs(node.attrs, node.name)
        except IRError as err:
            fail(err.message, node.name)
        missing = sorted(set(completed) - set(node.attrs))
        if missing:
            fail(f"{definition.opcode.value} node lacks attribute(s) {', '.join(missing)}", node.name)
        for i, v in enumerate(node.inputs):
            if v is None:
                continue
            if not graph.has_value(v.name) or graph.value(v.name) is not v:
                fail(f"operand {i} ({v.name!r}) is not a value of this graph", node.name)
            if id(v) not in seen:
                fail(f"operand {i} ({v.name!r}) is used before it is defined", node.name)
        try:
            types = definition.infer(node)
        except IRError as err:
            fail(err.message, node.name)
        if len(types) != len(node.outputs):
            fail(f"{node.op.value} produces {len(types)} outputs, the node has {len(node.outputs)}", node.name)
        for out, expected in zip(node.outputs, types):
            if out.type != expected:
                fail(f"output {out.name!r} has type {out.type}, inference gives {expected}", node.name)
            if out.producer is not node:
                fail(f"output {out.name!r} does not point back at its node", node.name)
            seen.add(id(out))
    if not graph.outputs:
        fail("the graph has no outputs")
    for key, v in graph.outputs.items():
        if id(v) not in seen:
            fail(f"graph output {key!r} reads {v.name!r}, which no node or input defines")
