"""Stable text form (golden tests, `moe-ir graph`) and Graphviz DOT of a graph.

The text lists inputs, weights, then nodes in topological order, one per line:
    node_name: %out1: f32[T,8], %out2: i64[T,2] = opcode(%in1, _, %in3) {attr=value, ...}
`_` is an absent optional operand; attributes are sorted by name so the text is diffable.
"""
from __future__ import annotations

import enum
from typing import Any

from .graph import Graph, Node
from .ops import op_def


def format_attr(value) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float):
        return repr(value)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def shown_attrs(node: Node) -> list[tuple[str, Any]]:
    """The node's attributes as the text form shows them: sorted, without quiet ones at their default."""
    declared = op_def(node.op).attrs
    return [(k, v) for k, v in sorted(node.attrs.items())
            if not (k in declared and declared[k].quiet and v == declared[k].default)]


def format_node(node: Node) -> str:
    outs = ", ".join(f"%{v.name}: {v.type}" for v in node.outputs)
    ports = op_def(node.op).inputs
    shown = [v for i, v in enumerate(node.inputs) if not (v is None and i < len(ports) and ports[i].quiet)]
    args = ", ".join("_" if v is None else f"%{v.name}" for v in shown)
    attrs = ", ".join(f"{k}={format_attr(v)}" for k, v in shown_attrs(node))
    return f"{node.name}: {outs} = {node.op.value}({args})" + (f" {{{attrs}}}" if attrs else "")


def to_text(graph: Graph) -> str:
    lines = [f"graph {graph.name} {{"]
    for key, value in sorted(graph.meta.items()):
        lines.append(f"  # {key}: {value}")
    for v in graph.inputs:
        lines.append(f"  input %{v.name}: {v.type}")
    for v in graph.weights.values():
        lines.append(f"  {v.kind.value} %{v.name}: {v.type}")
    for node in graph.nodes:
        lines.append("  " + format_node(node))
    for key, v in graph.outputs.items():
        lines.append(f"  output {key} = %{v.name}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_dot(graph: Graph) -> str:
    """Nodes as boxes, weights as grey notes, edges labelled with the value's type."""
    def q(s: str) -> str:
        return '"' + s.replace('"', r'\"') + '"'

    nl = "\\n"  # a DOT line break inside a label
    lines = [f"digraph {q(graph.name)} {{", "  rankdir=TB;", '  node [fontname="monospace"];']
    for v in graph.inputs:
        lines.append(f"  {q('in:' + v.name)} [label={q(v.name + nl + str(v.type))}, shape=oval];")
    for v in graph.weights.values():
        lines.append(f"  {q('w:' + v.name)} [label={q(v.name + nl + str(v.type))}, shape=note, color=grey, "
                     "fontcolor=grey];")
    for node in graph.nodes:
        attrs = "\\n".join(f"{k}={format_attr(v)}" for k, v in shown_attrs(node))
        label = f"{node.name}\\n[{node.op.value}]" + (f"\\n{attrs}" if attrs else "")
        lines.append(f"  {q(node.name)} [label={q(label)}, shape=box];")
        for v in node.inputs:
            if v is None:
                continue
            src = v.producer.name if v.producer is not None else ("w:" if v.is_weight else "in:") + v.name
            lines.append(f"  {q(src)} -> {q(node.name)} [label={q(str(v.type))}];")
    for key, v in graph.outputs.items():
        lines.append(f"  {q('out:' + key)} [label={q(key)}, shape=oval];")
        src = v.producer.name if v.producer is not None else "in:" + v.name
        lines.append(f"  {q(src)} -> {q('out:' + key)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
