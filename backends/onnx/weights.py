"""Initializers of a lowered model: the graph's weights, and weight-only subgraphs folded into one tensor.

Passes leave small subgraphs on weights behind (CONCAT/ADD nodes from fuse-shared-experts and fuse-gate-up).
The exported model computes nothing on weights at run time: such a subgraph is evaluated once with the IR's
reference semantics (`op_def(op).reference`, the one statement of what CONCAT and ADD mean) and written as
one initializer named by the IR value. Initializers are produced lazily, one thunk each, called when the
model is written, so writing external data never holds more than the given weights plus the largest
folded tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import onnx
import torch

from moe_ir.errors import BackendError
from moe_ir.ir import Graph, OpCode, Value, op_def

Thunk = Callable[[], torch.Tensor]


@dataclass
class LoweredModel:
    """An ONNX model without initializer data, plus one thunk per initializer (called when written)."""

    model: onnx.ModelProto
    initializers: dict[str, Thunk] = field(default_factory=dict)

    def initializer_bytes(self) -> int:
        return sum(getattr(t, "nbytes", 0) for t in self.initializers.values())


def weight_only_values(graph: Graph) -> set[str]:
    """Names of values computed from weights alone (graph weights included)."""
    names = set(graph.weights)
    for node in graph.nodes:
        operands = [v for v in node.inputs if v is not None]
        if operands and all(v.name in names for v in operands):
            names.update(v.name for v in node.outputs)
    return names


# Ops that commute with taking one expert's slice of a stacked [E, ...] weight: elementwise ADD, and CONCAT
# along any axis but the expert axis. Folding them slice by slice never builds the whole folded tensor.
_SLICEWISE = {OpCode.ADD: lambda attrs: attrs,
              OpCode.CONCAT: lambda attrs: {**attrs, "axis": attrs["axis"] - 1} if attrs["axis"] >= 1 else None}


@dataclass(frozen=True)
class FourBit:
    """An initializer of 4-bit elements: its ONNX type (TensorProto.INT4 or UINT4) and logical dims; its
    thunk returns the elements packed two a byte (ONNX's layout for both types)."""

    elem_type: int
    dims: tuple[int, ...]


class Initializers:
    """Hands out initializer names for IR values, registering one thunk per initializer."""

    def __init__(self, graph: Graph, weights: Mapping[str, torch.Tensor]):
        self._weights = weights
        self.folded = weight_only_values(graph)
        self.thunks: dict[str, Thunk] = {}

    def is_folded(self, value: Value) -> bool:
        return value.name in self.folded

    def given(self, value: Value) -> torch.Tensor:
        """A graph weight as given (its own dtype)."""
        if value.name not in self._weights:
            raise BackendError(f"weight {value.name!r} was not given")
        return self._weights[value.name].detach().cpu()

    def evaluate(self, value: Value) -> torch.Tensor:
        """The value in float32, folded through its producers' reference semantics."""
        if value.producer is None:
            return self.given(value).to(torch.float32)
        node = value.producer
        args = [None if v is None else self.evaluate(v) for v in node.inputs]
        with torch.no_grad():
            return op_def(node.op).reference(node.attrs, *args)[value.index]

    def evaluate_stored(self, value: Value) -> torch.Tensor:
        """What an initializer holds before rounding to its type: a given weight as is (no float32 copy of a
        large bf16 tensor), a folded one computed in float32."""
        return self.given(value) if value.producer is None else self.evaluate(value)

    def evaluate_slice(self, value: Value, e: int) -> torch.Tensor:
        """value[e] for a stacked expert weight, without building the whole folded tensor."""
        node = value.producer
        if node is None:
            return self.given(value)[e].contiguous()  # sliced before any cast: one expert, not all of them
        sliced_attrs = _SLICEWISE[node.op](node.attrs) if node.op in _SLICEWISE else None
        if sliced_attrs is None:
            return self.evaluate(value)[e].contiguous()
        parts = [self.evaluate_slice(v, e).to(torch.float32) for v in node.inputs]
        with torch.no_grad():
            return op_def(node.op).reference(sliced_attrs, *parts)[value.index]

    def add(self, value: Value, transform: Callable | None = None, name: str | None = None,
            evaluate: Callable | None = None, dtype: torch.dtype | None = None,
            four_bit: "FourBit | None" = None) -> str:
        """Name of an initializer holding `value` (folded when computed), optionally transformed, in `dtype`
        (default: the value's). With `four_bit` the transform yields its elements packed two a byte (uint8,
        flattened order, the lower index in the low nibble), written as an ONNX INT4/UINT4 tensor."""
        name = name or value.name
        if name not in self.thunks:
            dtype = torch.uint8 if four_bit else dtype or value.type.dtype.torch

            def thunk(value=value, transform=transform, evaluate=evaluate or self.evaluate_stored, dtype=dtype):
                t = evaluate(value)
                # Folds computed in float32, rounded once to the value's type (given weights: a no-op
                # when they come in it).
                return (transform(t) if transform is not None else t).to(dtype)

            shape = value.type.shape[1:] if name.endswith("]") else value.type.shape  # "name[e]": one slice
            thunk.nbytes = math.prod(int(d) for d in shape) * dtype.itemsize
            if four_bit:
                thunk.four_bit = four_bit
                thunk.nbytes = -(-math.prod(four_bit.dims) // 2)
            self.thunks[name] = thunk
        return name

    def expert_slice(self, value: Value, e: int) -> str:
        """Initializer `<value>[e]`: expert e's slice of a stacked [E, ...] weight, sliced at export."""
        return self.add(value, name=f"{value.name}[{e}]", evaluate=lambda v: self.evaluate_slice(v, e))

    def used_by(self, nodes: list[onnx.NodeProto]) -> dict[str, Thunk]:
        """The thunks of initializers some node reads, in the order they were registered."""
        used = {i for n in nodes for i in n.input}
        return {k: t for k, t in self.thunks.items() if k in used}
