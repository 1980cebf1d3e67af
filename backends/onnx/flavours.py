"""One lowering class per ONNX flavour, and the one place that maps a `Flavour` to its class and pipeline.

  portable  standard ONNX (opset 18) only (moe_ops.py, decoder_ops.py); layers and whole models.
  ort       as portable, except that dispatch -> expert FFNs -> combine becomes ONNX Runtime's
            com.microsoft.MoE. The routing is computed with ordinary ops (so sigmoid scores, bias
            correction, group limits and scaling all work) and fed to the op as router_probs =
            log(w) at the chosen experts and -inf elsewhere with normalize_routing_weights=1: the op's
            softmax over those gives w / sum(w), and the output is multiplied back by sum(w). SwiGLU
            weights are stored interleaved (gate row, up row, ...) with swiglu_fusion=1, the only
            layout the CPU kernel implements. float32 only. int4 experts become com.microsoft.QMoE
            (quant_ops.py); other quantized weights DequantizeLinear as in portable.
  plugin    the FUSED_MOE node becomes one `moe_ir::FusedMoE` node (the contract in plugin_op.py);
            everything else as portable. Layers only: the contract is one fused node per file.

What differs between flavours is a method the flavour's class overrides: `dtype_refusal`, `node_refusal`
and `refusal` for what it exports, `_lower_<op>` for how it lowers an op.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from onnx import TensorProto

from moe_ir.errors import BackendError
from moe_ir.ir import Graph, GraphKind, Node, OpCode, Value
from moe_ir.quantization import quantized_formats
from moe_ir.spec import Activation
from . import plugin_op, support
from .decoder_ops import DecoderOps
from .emit import MS_DOMAIN
from .lowering import Flavour, Lowering
from .moe_ops import MoeOps
from .quant_ops import QuantOps, dequantize_refusal, is_quantized, qmoe_refusal
from .weights import LoweredModel

_INFERENCE = ("strip-training-outputs", "fuse-shared-experts", "fuse-gate-up", "dce")


class PortableLowering(QuantOps, MoeOps, DecoderOps):
    flavour = Flavour.PORTABLE
    pipeline = _INFERENCE
    needs = ()

    @classmethod
    def dtype_refusal(cls, value: Value) -> str:
        # the stored codes of quantized weights (their DEQUANTIZE nodes become DequantizeLinear)
        return "" if cls.stored_dtype_ok(value) else super().dtype_refusal(value)

    @classmethod
    def refusal(cls, graph: Graph) -> str:
        return dequantize_refusal(graph) or super().refusal(graph)


# -- ort --------------------------------------------------------------------------------------------

_ORT_ACTIVATIONS = {Activation.SWIGLU: "swiglu", Activation.RELU: "relu"}


def interleave_gate_up(t: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """[E, 2F, ...] in the IR's gate_up_fused layout (gate rows, then up rows), or the (gate, up) pair ->
    rows g0, u0, g1, u1, ... (com.microsoft.MoE swiglu_fusion=1). ONNX-only: no other target uses this
    layout."""
    axis = 1
    gate, up = t if isinstance(t, tuple) else t.chunk(2, dim=axis)
    return torch.stack([gate, up], dim=axis + 1).flatten(axis, axis + 1).contiguous()


class OrtLowering(PortableLowering):
    flavour = Flavour.ORT
    pipeline = _INFERENCE
    matmul_nbits = True  # quantized shared-expert and dense FFN projections: com.microsoft.MatMulNBits
    needs = ("needs onnxruntime (com.microsoft.MoE contrib op)",)

    @classmethod
    def dtype_refusal(cls, value: Value) -> str:
        if cls.stored_dtype_ok(value):  # the codes of quantized weights
            return ""
        return super().dtype_refusal(value) or support.ort_dtype_refusal(value)

    @classmethod
    def refusal(cls, graph: Graph) -> str:
        return qmoe_refusal(graph) or super().refusal(graph) or support.ort_refusal(graph)

    def _lower_dispatch(self, node: Node) -> None:
        pass  # com.microsoft.MoE dispatches internally; emitted at the combine node

    def _lower_grouped_ffn(self, node: Node) -> None:
        pass  # part of com.microsoft.MoE, emitted at the combine node

    def _lower_combine(self, combine: Node) -> None:
        # dispatch -> grouped_ffn -> combine as one com.microsoft.MoE node, emitted here (the last of the three).
        em = self.em
        disp, ffn = support.moe_chain(self.graph, combine)
        idx, w = (self.operand(v) for v in disp.inputs)
        tokens = self.operand(ffn.inputs[0])
        k = disp.inputs[0].type.shape[1]
        n_exp = disp.attrs["num_experts"]
        act = ffn.attrs["activation"]
        em.prefix = ffn.name
        # log(w) at the chosen experts, -inf elsewhere: the op's softmax over them gives w / sum(w).
        probs_shape = em.op("Concat", [em.rows_of(tokens), em.const([n_exp])], axis=0)
        neg_inf = em.zeros(probs_shape, fill=-np.inf)
        log_w = em.op("Log", [em.op("Max", [w, em.const(1e-30, np.float32)])])
        probs = em.op("ScatterElements", [neg_inf, idx, log_w], axis=1)
        ops = self._weight_operands(ffn)
        if is_quantized(ops["w_up"]):
            ins, qattrs = self.qmoe_inputs(ffn, tokens, probs)
            moe = em.op("QMoE", ins, domain=MS_DOMAIN, name=ffn.name, k=k, normalize_routing_weights=1, **qattrs)
            em.prefix = combine.name
            total = em.op("ReduceSum", [w, em.const([-1])], keepdims=1)
            em.op("Mul", [moe, total], out=combine.outputs[0].name, name=combine.name)
            return
        if act.gated:
            fc1 = self.inits.add(ops["w_up"], interleave_gate_up, name=f"{ffn.name}.fc1_interleaved",
                                 evaluate=self._gate_up_parts)
            fc1_b = (self.inits.add(ops["b_up"], interleave_gate_up, name=f"{ffn.name}.fc1_bias_interleaved")
                     if ops["b_up"] is not None else "")
            attrs = {"activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": 1.0,
                     "activation_beta": 0.0}
        else:
            fc1 = self.operand(ops["w_up"])
            fc1_b = self.operand(ops["b_up"])
            attrs = {"activation_type": _ORT_ACTIVATIONS[act]}
        ins = [tokens, probs, fc1, fc1_b, self.operand(ops["w_down"]), self.operand(ops["b_down"])]
        while ins[-1] == "":
            ins.pop()
        moe = em.op("MoE", ins, domain=MS_DOMAIN, name=ffn.name, k=k, normalize_routing_weights=1, **attrs)
        em.prefix = combine.name
        total = em.op("ReduceSum", [w, em.const([-1])], keepdims=1)
        em.op("Mul", [moe, total], out=combine.outputs[0].name, name=combine.name)

    def _gate_up_parts(self, value: Value) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The fused gate/up weight, as its (gate, up) parts when it is a two-part concat (saves a copy)."""
        node = value.producer
        if node is not None and node.op == OpCode.CONCAT and len(node.inputs) == 2 and node.attrs["axis"] == 1:
            return self.inits.evaluate(node.inputs[0]), self.inits.evaluate(node.inputs[1])
        return self.inits.evaluate(value)


# -- plugin -----------------------------------------------------------------------------------------


class PluginLowering(PortableLowering):
    flavour = Flavour.PLUGIN
    pipeline = ("strip-training-outputs", "fuse-shared-experts", "fuse-moe", "fuse-gate-up", "dce")
    needs = (f"needs an implementation of {plugin_op.PLUGIN_NAME} (TensorRT plugin; on CPU: "
             f"moe_ir.backends.onnx.load_runner)",)

    @classmethod
    def refusal(cls, graph: Graph) -> str:
        if graph.kind == GraphKind.MODEL:
            return support.model_graph_refusal()
        formats = quantized_formats(graph)
        if formats:
            return (f"quantized weights ({', '.join(sorted(f.value for f in formats))}): the {plugin_op.PLUGIN_NAME} "
                    "plugin takes float expert weights; the portable flavour exports them (DequantizeLinear)")
        return super().refusal(graph) or support.plugin_refusal(graph)

    @classmethod
    def node_refusal(cls, node: Node) -> str:
        return "" if node.op == OpCode.FUSED_MOE else super().node_refusal(node)

    def _lower_fused_moe(self, node: Node) -> None:
        em = self.em
        attrs = plugin_op.FusedMoEAttrs.from_node(node).encode()
        bias = node.input("bias")
        if bias is not None:
            bias_name = self.operand(bias)
        else:
            n_exp = int(node.input("w_router").type.shape[0])
            bias_name = em.const(np.zeros(n_exp, np.float32), np.float32, "bias_zeros")
        ins = [self.operand(node.input("x")), self.operand(node.input("w_router")), bias_name,
               self.operand(node.input("w_up")), self.operand(node.input("w_down"))]
        out, idx32, w = node.outputs[0].name, f"{node.outputs[1].name}.i32", node.outputs[2].name
        em.op(plugin_op.OP_TYPE, ins, out=[out, idx32, w], domain=plugin_op.DOMAIN, name=node.name, **attrs)
        # The plugin gives int32 indices (TensorRT's native type); the IR's routing record is int64.
        em.op("Cast", [idx32], out=node.outputs[1].name, to=TensorProto.INT64)


# -- the flavours -----------------------------------------------------------------------------------

LOWERINGS: dict[Flavour, type[Lowering]] = {cls.flavour: cls for cls in (PortableLowering, OrtLowering,
                                                                            PluginLowering)}
PIPELINES: dict[Flavour, tuple[str, ...]] = {flavour: cls.pipeline for flavour, cls in LOWERINGS.items()}


def parse_flavour(value: Flavour | str) -> Flavour:
    """A flavour from its name; an unknown one is a BackendError listing the flavours."""
    try:
        return Flavour(value)
    except ValueError:
        raise BackendError(f"unknown onnx flavour '{value}'; choose one of "
                           f"{', '.join(f.value for f in Flavour)}") from None


def lowering_class(flavour: Flavour | str) -> type[Lowering]:
    return LOWERINGS[Flavour(flavour)]


def supports(graph: Graph, flavour: Flavour | str) -> tuple[bool, str]:
    """(ok, reason) for a graph that already went through PIPELINES[flavour]."""
    return lowering_class(flavour).supports(graph)


def lower(graph: Graph, weights: Mapping[str, torch.Tensor], flavour: Flavour | str) -> LoweredModel:
    """The ONNX model for a graph that went through PIPELINES[flavour] (supports() must hold)."""
    cls = lowering_class(flavour)
    ok, reason = cls.supports(graph)
    if not ok:
        raise BackendError(f"onnx/{cls.flavour.value}: {reason}")
    return cls(graph, weights).run()
