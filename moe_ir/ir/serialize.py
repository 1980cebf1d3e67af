"""JSON round-trip of a graph: text(graph) == text(from_json(to_json(graph)))."""
from __future__ import annotations

import enum
import json
from typing import Any

from ..errors import IRError
from .graph import ElemType, Graph, GraphKind, TensorType, ValueKind
from .ops import op_def

FORMAT_VERSION = 1


def _type_to_json(t: TensorType) -> dict:
    return {"shape": list(t.shape), "dtype": t.dtype.value}


def _type_from_json(d: dict) -> TensorType:
    return TensorType(d["shape"], ElemType(d["dtype"]))


def _attr_to_json(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def _attr_from_json(spec_type: Any, value: Any) -> Any:
    types = spec_type if isinstance(spec_type, tuple) else (spec_type,)
    for t in types:
        if isinstance(t, type) and issubclass(t, enum.Enum) and isinstance(value, str):
            return t(value)
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if t is tuple and isinstance(value, list):
            return tuple(float(v) for v in value)
    return value


def to_json(graph: Graph) -> str:
    doc = {
        "format": "moe-ir-graph",
        "version": FORMAT_VERSION,
        "name": graph.name,
        "kind": graph.kind.value,
        "meta": graph.meta,
        "inputs": [{"name": v.name, "type": _type_to_json(v.type)} for v in graph.inputs],
        "weights": [{"name": v.name, "type": _type_to_json(v.type), "kind": v.kind.value}
                    for v in graph.weights.values()],
        "nodes": [{"name": n.name, "op": n.op.value,
                   "attrs": {k: _attr_to_json(v) for k, v in sorted(n.attrs.items())},
                   "inputs": [None if v is None else v.name for v in n.inputs],
                   "outputs": [v.name for v in n.outputs]} for n in graph.nodes],
        "outputs": {k: v.name for k, v in graph.outputs.items()},
    }
    return json.dumps(doc, indent=1)


def from_json(text: str) -> Graph:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise IRError(f"graph JSON is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != "moe-ir-graph":
        raise IRError("not a moe-ir graph JSON document (missing \"format\": \"moe-ir-graph\")")
    if doc.get("version") != FORMAT_VERSION:
        raise IRError(f"graph JSON version {doc.get('version')} is not supported (expected {FORMAT_VERSION})")
    try:
        return _graph_from_doc(doc)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        # A missing field, a wrong type or an unknown enum value: a damaged or hand-edited document.
        what = f"missing key {err}" if isinstance(err, KeyError) else str(err)
        raise IRError(f"malformed moe-ir graph JSON: {what}") from None


def _graph_from_doc(doc: dict) -> Graph:
    g = Graph(doc["name"], GraphKind(doc.get("kind", GraphKind.LAYER)))
    g.meta = dict(doc.get("meta", {}))
    for v in doc["inputs"]:
        g.add_input(v["name"], _type_from_json(v["type"]))
    for v in doc["weights"]:
        g.add_weight(v["name"], _type_from_json(v["type"]), trainable=ValueKind(v["kind"]) == ValueKind.PARAM)
    for n in doc["nodes"]:
        definition = op_def(n["op"])
        attrs = {k: _attr_from_json(definition.attrs[k].type, v) if k in definition.attrs else v
                 for k, v in n["attrs"].items()}
        try:
            inputs = [None if name is None else g.value(name) for name in n["inputs"]]
        except KeyError as err:
            raise IRError(f"operand {err} is not defined before use", node=n["name"]) from None
        # Graphs written before an op gained a trailing optional port (attention sinks, an FFN's row scale)
        # lack its operand: absent, as they meant.
        ports = definition.inputs
        if len(inputs) < len(ports) and not ports[-1].variadic and all(p.optional for p in ports[len(inputs):]):
            inputs += [None] * (len(ports) - len(inputs))
        node = g.add_node(definition.opcode, inputs, attrs, name=n["name"], output_names=n["outputs"])
        if node.name != n["name"]:
            raise IRError("duplicate node name in graph JSON", node=n["name"])
    for key, name in doc["outputs"].items():
        g.set_output(key, g.value(name))
    return g
