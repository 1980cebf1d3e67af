"""IR core: typed values, nodes and the graph that owns them.

networkx holds the data-flow edges (producer node -> consumer node, one edge per use); everything
else (operand order, types, attributes) lives on the slotted Value/Node objects. Passes and backends
use only the methods here, never the networkx attribute dicts.

Shapes use ints for static dims and strings for symbolic ones: 'B' (batch), 'S' (sequence),
'T' (tokens = B*S), 'A' (expert assignments) and 'C' (expert-choice capacity). The token dimension
stays symbolic all the way to the backends, which export it as a dynamic axis.
"""
from __future__ import annotations

import enum
from typing import Any, Iterable, Iterator, Mapping

import networkx as nx

from ..errors import IRError

Dim = int | str


class ElemType(enum.StrEnum):
    FLOAT32 = "f32"
    FLOAT16 = "f16"
    BFLOAT16 = "bf16"
    FLOAT64 = "f64"
    INT64 = "i64"
    # Storage of quantized weights (moe_ir.quantization): packed integer codes and fp8 values, read only
    # through a dequantize node, never computed with directly.
    INT8 = "i8"
    UINT8 = "u8"
    FLOAT8_E4M3 = "f8e4m3"

    @property
    def is_float(self) -> bool:
        """A dtype values are computed in (fp8 is storage only)."""
        return self in (ElemType.FLOAT32, ElemType.FLOAT16, ElemType.BFLOAT16, ElemType.FLOAT64)

    @property
    def torch(self):
        import torch

        return {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64,
                "i64": torch.int64, "i8": torch.int8, "u8": torch.uint8,
                "f8e4m3": torch.float8_e4m3fn}[self.value]

    @classmethod
    def from_name(cls, name: str) -> "ElemType":
        """From a spec dtype name ('float32', 'bfloat16', ...)."""
        return {"float32": cls.FLOAT32, "float16": cls.FLOAT16, "bfloat16": cls.BFLOAT16,
                "float64": cls.FLOAT64}[str(name)]


class TensorType:
    __slots__ = ("shape", "dtype")

    def __init__(self, shape: Iterable[Dim], dtype: ElemType):
        self.shape: tuple[Dim, ...] = tuple(shape)
        self.dtype = ElemType(dtype)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TensorType) and self.shape == other.shape and self.dtype == other.dtype

    def __hash__(self) -> int:
        return hash((self.shape, self.dtype))

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        return f"{self.dtype.value}[{','.join(str(d) for d in self.shape)}]"

    __repr__ = __str__


class ValueKind(enum.StrEnum):
    INPUT = "input"    # activations fed at run time
    PARAM = "param"    # trained weights (stored in safetensors under the value's name)
    BUFFER = "buffer"  # state that is stored but not trained by gradient (aux-loss-free bias)
    NODE = "node"      # produced by a node


class Value:
    __slots__ = ("name", "type", "kind", "producer", "index")

    def __init__(self, name: str, type: TensorType, kind: ValueKind, producer: "Node | None" = None, index: int = 0):
        self.name = name
        self.type = type
        self.kind = kind
        self.producer = producer
        self.index = index

    @property
    def is_weight(self) -> bool:
        return self.kind in (ValueKind.PARAM, ValueKind.BUFFER)

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    __slots__ = ("name", "op", "attrs", "inputs", "outputs")

    def __init__(self, name: str, op: Any, attrs: Mapping[str, Any], inputs: tuple[Value | None, ...]):
        self.name = name
        self.op = op  # an OpCode
        self.attrs = dict(attrs)
        self.inputs = inputs
        self.outputs: tuple[Value, ...] = ()

    def input(self, name: str) -> Value | None:
        """Operand by its name in the op's signature."""
        from .ops import op_def

        return self.inputs[op_def(self.op).input_index(name)]

    def output(self, name: str) -> Value:
        from .ops import op_def

        return self.outputs[op_def(self.op).output_names.index(name)]

    def __repr__(self) -> str:
        return f"<{self.op.value} {self.name}>"


class GraphKind(enum.StrEnum):
    """What a graph computes, set by the builder that made it; backends ask this, not the graph's shape."""
    LAYER = "layer"  # one MoE layer: x [B, S, H] -> out (moe_ir.builder)
    MODEL = "model"  # a whole decoder: input_ids [B, S] -> logits (moe_ir.model_builder)


# The interface of each kind of graph (what builders make and every backend's runner takes and gives).
LAYER_INPUT, LAYER_OUTPUT = "x", "out"            # x [B, S, H] -> out [B, S, H]
MODEL_INPUT, MODEL_OUTPUT = "input_ids", "logits"  # input_ids [B, S] int64 -> logits [B, S, V]


class Graph:
    """An MoE graph: inputs, weights (params and buffers), nodes in insertion order, named outputs."""

    def __init__(self, name: str = "moe", kind: GraphKind = GraphKind.LAYER):
        self.name = name
        self.kind = GraphKind(kind)
        self.inputs: list[Value] = []
        self.weights: dict[str, Value] = {}
        self.outputs: dict[str, Value] = {}
        self.meta: dict[str, Any] = {}  # provenance (spec hash, pipeline); printed, not interpreted
        self._nodes: dict[str, Node] = {}
        self._values: dict[str, Value] = {}
        self._edges = nx.MultiDiGraph()
        # Topological order of the node names, computed on demand and dropped by every change of the edges:
        # `nodes` and `users` are called in loops by passes, and sorting per call made them quadratic
        # (`moe-ir backends` on a 61-layer model took minutes in dce).
        self._order: list[str] | None = None

    # -- construction -----------------------------------------------------------------------------


    def contract_problem(self) -> str:
        """Why the graph breaks the interface of its kind (layer: x -> out; model: input_ids -> logits), or ""."""
        inputs = [v.name for v in self.inputs]
        if self.kind == GraphKind.MODEL:
            if any(name.startswith("past_key_values.") for name in inputs):
                return (f"model graph '{self.name}' is in decode form (a KV cache in and out); this target lowers "
                        f"the prefill form ({MODEL_INPUT} -> {MODEL_OUTPUT}) only")
            if inputs != [MODEL_INPUT]:
                return (f"model graph '{self.name}' has inputs {inputs}; expected [{MODEL_INPUT}] "
                        "(build it with moe_ir.model_builder.build_model_graph)")
            if MODEL_OUTPUT not in self.outputs:
                return (f"model graph '{self.name}' has no '{MODEL_OUTPUT}' output (outputs: {list(self.outputs)}); "
                        "build it with moe_ir.model_builder.build_model_graph and keep the logits through the passes")
            return ""
        if len(inputs) != 1 or LAYER_OUTPUT not in self.outputs:
            return (f"graph '{self.name}' has inputs {inputs} and outputs {list(self.outputs)}; expected a layer graph "
                    f"({LAYER_INPUT} -> {LAYER_OUTPUT}) or a model graph ({MODEL_INPUT} -> {MODEL_OUTPUT})")
        return ""
    def add_input(self, name: str, type: TensorType) -> Value:
        value = self._new_value(name, type, ValueKind.INPUT)
        self.inputs.append(value)
        return value

    def add_weight(self, name: str, type: TensorType, *, trainable: bool = True) -> Value:
        value = self._new_value(name, type, ValueKind.PARAM if trainable else ValueKind.BUFFER)
        self.weights[name] = value
        return value

    def add_node(self, op: Any, inputs: Iterable[Value | None], attrs: Mapping[str, Any] | None = None,
                 name: str | None = None, output_names: Iterable[str] | None = None) -> Node:
        """Append a node; its output types come from the op's shape/dtype inference."""
        from .ops import op_def

        definition = op_def(op)
        name = self._unique_node_name(name or definition.opcode.value)
        node = Node(name, definition.opcode, definition.complete_attrs(attrs or {}, name), tuple(inputs))
        for v in node.inputs:
            if v is not None and self._values.get(v.name) is not v:
                raise IRError(f"input {v.name!r} does not belong to this graph", node=name)
        types = definition.infer(node)
        names = list(output_names) if output_names is not None else (
            [name] if len(types) == 1 else [f"{name}.{out}" for out in definition.output_names])
        node.outputs = tuple(self._new_value(self._unique_value_name(n), t, ValueKind.NODE, node, i)
                             for i, (n, t) in enumerate(zip(names, types)))
        self._nodes[name] = node
        self._order = None
        self._edges.add_node(name)
        for v in node.inputs:
            if v is not None and v.producer is not None:
                self._edges.add_edge(v.producer.name, name)
        return node

    def set_output(self, name: str, value: Value) -> None:
        self.outputs[name] = value

    # -- queries ----------------------------------------------------------------------------------

    @property
    def nodes(self) -> list[Node]:
        """Nodes in a stable topological order (insertion order among independent nodes)."""
        if self._order is None:
            position = {n: i for i, n in enumerate(self._nodes)}
            self._order = list(nx.lexicographical_topological_sort(self._edges, key=lambda n: position[n]))
        return [self._nodes[n] for n in self._order]

    def node(self, name: str) -> Node:
        return self._nodes[name]

    def value(self, name: str) -> Value:
        return self._values[name]

    def has_value(self, name: str) -> bool:
        return name in self._values

    def find(self, op: Any) -> list[Node]:
        return [n for n in self.nodes if n.op == op]

    def users(self, value: Value) -> list[Node]:
        if value.producer is None:
            return [n for n in self.nodes if any(v is value for v in n.inputs)]
        return [self._nodes[s] for s in dict.fromkeys(self._edges.successors(value.producer.name))
                if any(v is value for v in self._nodes[s].inputs)]

    def is_graph_output(self, value: Value) -> bool:
        return any(v is value for v in self.outputs.values())

    def last_reads(self) -> list[tuple[str, ...]]:
        """For each node of `nodes`, the node outputs no later node reads and no graph output is: dead once
        that node has run (an output nobody reads, right after its producer). What a runner or generated
        code frees as it goes, so that an intermediate's memory returns once it is read (an inference run
        then peaks at one layer's intermediates, not the sum of every layer's)."""
        kept = {v.name for v in self.outputs.values()}
        last: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for value in node.outputs:
                last[value.name] = i
            for value in node.inputs:
                if value is not None and value.producer is not None:
                    last[value.name] = i
        dead: list[list[str]] = [[] for _ in self._nodes]
        for name, i in last.items():
            if name not in kept:
                dead[i].append(name)
        return [tuple(names) for names in dead]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    # -- rewriting --------------------------------------------------------------------------------

    def replace_uses(self, old: Value, new: Value) -> None:
        """Every operand and graph output that reads `old` reads `new` instead."""
        self._order = None
        for node in self.users(old):
            node.inputs = tuple(new if v is old else v for v in node.inputs)
            if old.producer is not None:
                while self._edges.has_edge(old.producer.name, node.name):
                    self._edges.remove_edge(old.producer.name, node.name)
            if new.producer is not None:
                self._edges.add_edge(new.producer.name, node.name)
        for key, v in list(self.outputs.items()):
            if v is old:
                self.outputs[key] = new
        self._order = None  # again: users() above sorted the graph before the new edges were in

    def remove_node(self, node: Node) -> None:
        for out in node.outputs:
            if self.users(out) or self.is_graph_output(out):
                raise IRError(f"cannot remove: output {out.name!r} is still used", node=node.name)
        for out in node.outputs:
            del self._values[out.name]
        self._edges.remove_node(node.name)
        del self._nodes[node.name]
        self._order = None

    def remove_weight(self, value: Value) -> None:
        if self.users(value):
            raise IRError(f"cannot remove weight {value.name!r}: it is still used")
        del self.weights[value.name]
        del self._values[value.name]

    # -- internals --------------------------------------------------------------------------------

    def _new_value(self, name: str, type: TensorType, kind: ValueKind, producer: Node | None = None,
                   index: int = 0) -> Value:
        if name in self._values:
            raise IRError(f"value name {name!r} is already used")
        value = Value(name, type, kind, producer, index)
        self._values[name] = value
        return value

    def _unique_node_name(self, base: str) -> str:
        return _unique(base, self._nodes)

    def _unique_value_name(self, base: str) -> str:
        return _unique(base, self._values)


def _unique(base: str, taken: Mapping[str, Any]) -> str:
    """`base`, or `base_1`, `base_2`, ... : the first name not in `taken`."""
    if base not in taken:
        return base
    i = 1
    while f"{base}_{i}" in taken:
        i += 1
    return f"{base}_{i}"
