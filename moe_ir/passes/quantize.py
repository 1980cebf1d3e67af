"""The quantize pass: a float graph -> the same computation on block-quantized weights (moe_ir.quantization).

Each selected weight is replaced by its stored parts and a DEQUANTIZE node, so the reference interpreter
computes with exactly the dequantized values every backend must reproduce. The graph alone changes; the
weights for it come from `moe_ir.quantization.quantize_weights` (or `init_weights`, which quantizes its float
draw), since a pass never holds tensors."""
from __future__ import annotations

import dataclasses

from ..ir import Graph
from ..spec import QuantFormat, QuantizationSpec
from .manager import Pass, register_pass


@register_pass
@dataclasses.dataclass(frozen=True)
class Quantize(Pass):
    name = "quantize"
    summary = "block-quantize the selected weights (default: int8, block 32, routed and shared experts)"
    config: QuantizationSpec = QuantizationSpec(format=QuantFormat.INT8)

    def __call__(self, graph: Graph) -> tuple[Graph, bool]:
        from ..quantization import quantize_graph

        return graph, bool(quantize_graph(graph, self.config))
