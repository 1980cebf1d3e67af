"""Quantized weights in ONNX (moe_ir.quantization's layout): each DEQUANTIZE node becomes a standard blocked
DequantizeLinear (opset 21: `block_size` along the input axis) on the stored codes, scales and zero points,
feeding the Gemm/MatMul that reads the weight, so the file holds the quantized weights, not float copies.

int8 codes are initializers as stored (int8, or uint8 with zero points); int4 codes are written one per
byte (uint8, the nibble as stored: code + 8 when symmetric, with zero point 8), since a 4-bit initializer
would need a packed-int4 writer; the dequantized values are the same. Routed experts are sliced per expert
(`<part>[e]` initializers, one DequantizeLinear each) as the float lowering slices them. fp8_e4m3 tiles are
not lowered (the portable lowering says so).
"""
from __future__ import annotations

import numpy as np
import torch

from moe_ir.ir import ElemType, Graph, Node, OpCode, Value
from moe_ir.quantization import dequantize_nodes
from moe_ir.spec import QuantFormat

# The opset whose DequantizeLinear takes `block_size` (blocked quantization).
BLOCKED_DQ_OPSET = 21
QUANTIZED_STORAGE = (ElemType.INT8, ElemType.UINT8)


def is_quantized(value: Value | None) -> bool:
    return value is not None and value.producer is not None and value.producer.op == OpCode.DEQUANTIZE


def dequantize_refusal(graph: Graph) -> str:
    """Why the portable lowering cannot export this graph's quantized weights ('' when it can)."""
    for node in dequantize_nodes(graph):
        if node.attrs["format"] == QuantFormat.FP8_E4M3:
            return (f"{node.name}: fp8_e4m3 tiles have no ONNX lowering here; import the checkpoint dequantized "
                    f"(--dequantize) or quantize it to int8/int4")
    return ""


def _unpack_int4(t: torch.Tensor) -> torch.Tensor:
    return torch.stack((t & 0xF, t >> 4), dim=-1).flatten(-2)


class QuantOps:
    """Mixin of the lowering classes: DEQUANTIZE as DequantizeLinear, never folded into a float initializer."""

    def __init__(self, graph: Graph, weights) -> None:
        super().__init__(graph, weights)
        # The dequantized values stay computed in the file (DequantizeLinear), so the initializers are the
        # quantized parts.
        self.inits.folded -= {v.name for n in dequantize_nodes(graph) for v in n.outputs}

    @classmethod
    def stored_dtype_ok(cls, value: Value) -> bool:
        return value.type.dtype in QUANTIZED_STORAGE

    def opset(self) -> int:
        return BLOCKED_DQ_OPSET if any(n.op_type == "DequantizeLinear" for n in self.em.nodes) else 0

    def _part(self, value: Value, fmt: QuantFormat, e: int | None, codes: bool) -> str:
        """Initializer of a stored part (whole, or expert e's slice); int4 codes unpacked to one per byte."""
        transform = _unpack_int4 if codes and fmt == QuantFormat.INT4 else None
        if e is None:
            return self.inits.add(value, transform, name=f"{value.name}.onnx" if transform else None)
        return self.inits.add(value, transform, name=f"{value.name}[{e}]",
                              evaluate=lambda v: self.inits.evaluate_slice(v, e))

    def _dequantize_linear(self, node: Node, e: int | None, out: str | None = None) -> str:
        em = self.em
        qweight, scales, zeros = node.inputs
        fmt, block = node.attrs["format"], node.attrs["block"]
        ins = [self._part(qweight, fmt, e, True), self._part(scales, fmt, e, False)]
        if zeros is not None:
            ins.append(self._part(zeros, fmt, e, False))
        elif fmt == QuantFormat.INT4:  # symmetric int4: the nibble is code + 8
            shape = scales.type.shape[1:] if e is not None else scales.type.shape
            ins.append(em.const(np.full([int(d) for d in shape], 8, dtype=np.uint8), np.uint8, hint="zero8"))
        y = em.op("DequantizeLinear", ins, axis=-1, block_size=block, **({"out": out} if out else {}))
        dtype = node.attrs["dtype"]
        return em.cast(y, ElemType.FLOAT32, dtype)

    def expert_weight(self, value: Value, e: int) -> str:
        if is_quantized(value):
            return self._dequantize_linear(value.producer, e)
        return super().expert_weight(value, e)

    def _lower_dequantize(self, node: Node) -> None:
        users = self.graph.users(node.outputs[0])
        if users and all(u.op == OpCode.GROUPED_FFN for u in users):
            return  # dequantized one expert at a time where the experts are lowered (expert_weight)
        out = node.outputs[0].name
        if node.attrs["dtype"] == ElemType.FLOAT32:
            self._dequantize_linear(node, None, out=out)
        else:
            self.em.op("Identity", [self._dequantize_linear(node, None)], out=out, name=node.name)
