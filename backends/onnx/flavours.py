"""One lowering class per ONNX flavour, and the one place that maps a `Flavour` to its class and pipeline.

  portable  standard ONNX (opset 18) only (moe_ops.py, decoder_ops.py); layers and whole models.
  ort       as portable, except that dispatch -> expert FFNs -> combine becomes ONNX Runtime's
            com.microsoft.MoE. The routing is computed with ordinary ops (so sigmoid scores, bias
            correction, group limits and scaling all work) and fed to the op as router_probs =
            log(w) at the chosen experts and -inf elsewhere with normalize_routing_weights=1: the op's
            softmax over those gives w / sum(w), and the output is multiplied back by sum(w). SwiGLU
            weights are stored interleaved (gate row, up row, ...) with swiglu_fusion=1, the only
            layout the CPU kernel implements. float32 only. SparseMixer routing (PhiMoE) takes the same
            path: onnxruntime 1.32's CPU kernel accepts use_sparse_mixer=1 but computes plain softmax top-2
            with it (measured: max error 1.1 on outputs of ~1.4 against SparseMixer, 1e-7 against softmax
            top-2), so the op is not asked to route. int4 and int8 experts become com.microsoft.QMoE
            (quant_ops.py; int8 needs float activations asked for when the session is created:
            QMOE_FLOAT_ACTIVATIONS_ENV); other quantized weights DequantizeLinear as in portable. In decoders (decode graphs)
            also: cached MHA/GQA attention as com.microsoft.GroupQueryAttention (the KV cache append and the
            attention; seqlens_k and
            total_sequence_length computed in the graph from attention_mask's length, the mask's padding as
            its attention_bias) and each residual add + RMSNorm as SkipSimplifiedLayerNormalization;
            `OrtLowering.contrib_notes` reports what was used and why not elsewhere (gqa_refusal: MLA, head_dim
            not a multiple of 16, interleaved RoPE). RoPE stays outside GQA: its in-kernel rotary rotates the
            cached keys by their cache slot rather than by position_ids, which differ for left-padded prompts.
  plugin    the FUSED_MOE node becomes one `moe_ir::FusedMoE` node (the contract in plugin_op.py);
            everything else as portable. Layers only: the contract is one fused node per file.

What differs between flavours is a method the flavour's class overrides: `dtype_refusal`, `node_refusal`
and `refusal` for what it exports, `_lower_<op>` for how it lowers an op.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from onnx import TensorProto

from moe_ir.errors import BackendError
from moe_ir.ir import ElemType, Graph, GraphKind, Node, OpCode, Value
from moe_ir.ir.model_ops import attention_scale
from moe_ir.model_builder import is_decode_graph
from moe_ir.model_spec import QKNorm, RopeLayout
from moe_ir.ir.quant_ops import implicit_zero
from moe_ir.spec import Activation, QuantFormat
from . import plugin_op, support
from .decoder_ops import DecoderOps
from .moa_ops import MoaOps
from .emit import MS_DOMAIN
from .lowering import Flavour, Lowering
from .moe_ops import MoeOps
from .quant_ops import (INT8_ACTIVATIONS_LEVEL, QMOE_FLOAT_ACTIVATIONS_ENV, QuantOps, dequantize_nodes,
                        dequantize_refusal, is_quantized, qmoe_int8_note, qmoe_refusal)
from .weights import LoweredModel

_INFERENCE = ("strip-training-outputs", "fuse-shared-experts", "fuse-gate-up", "dce")


class PortableLowering(QuantOps, MoeOps, MoaOps, DecoderOps):
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
_ORT_CONTRIB_OPS = ("MoE", "QMoE", "MatMulNBits", "GroupQueryAttention", "SkipSimplifiedLayerNormalization")


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
        identity = ffn.attrs["identity_experts"]
        if identity:  # the op sees the FFN experts' columns only; the identity experts' share is added after it
            probs = em.op("Slice", [probs, em.const([0]), em.const([n_exp - identity]), em.const([1])])
        ops = self._weight_operands(ffn)
        if is_quantized(ops["w_up"]):
            ins, qattrs = self.qmoe_inputs(ffn, tokens, probs)
            moe = em.op("QMoE", ins, domain=MS_DOMAIN, name=ffn.name, k=k, normalize_routing_weights=1, **qattrs)
            self._rescale_moe(combine, moe, tokens, idx, w, n_exp - identity, identity)
            return
        if act.gated:
            fc1 = self.inits.add(ops["w_up"], interleave_gate_up, name=f"{ffn.name}.fc1_interleaved",
                                 evaluate=self._gate_up_parts)
            fc1_b = (self.inits.add(ops["b_up"], interleave_gate_up, name=f"{ffn.name}.fc1_bias_interleaved")
                     if ops["b_up"] is not None else "")
            attrs = {"activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": 1.0,
                     "activation_beta": 0.0}
            if act == Activation.CLAMPED_SWIGLU:
                # The op's SwiGLU is g * sigmoid(alpha * g) * (u + beta) with g <= limit, |u| <= limit: gpt-oss's
                # form at beta = 1 (checked against the reference in tests/test_hf_gpt_oss.py).
                attrs.update(activation_alpha=float(ffn.attrs["clamp_alpha"]), activation_beta=1.0,
                             swiglu_limit=float(ffn.attrs["clamp_limit"]))
        else:
            fc1 = self.operand(ops["w_up"])
            fc1_b = self.operand(ops["b_up"])
            attrs = {"activation_type": _ORT_ACTIVATIONS[act]}
        ins = [tokens, probs, fc1, fc1_b, self.operand(ops["w_down"]), self.operand(ops["b_down"])]
        while ins[-1] == "":
            ins.pop()
        moe = em.op("MoE", ins, domain=MS_DOMAIN, name=ffn.name, k=k, normalize_routing_weights=1, **attrs)
        self._rescale_moe(combine, moe, tokens, idx, w, n_exp - identity, identity)

    def _rescale_moe(self, combine: Node, moe: str, tokens: str, idx: str, w: str, ffn_experts: int,
                     identity: int) -> None:
        """The combine's output from the op's (weights renormalised over the chosen experts): times the sum of the
        weights; with identity experts (LongCat-Flash) the sum over the chosen FFN experts only, 0 for a token
        that chose none (the op's softmax over no finite logit is NaN there), plus the identity experts' weights
        times the token itself."""
        em = self.em
        em.prefix = combine.name
        if not identity:
            total = em.op("ReduceSum", [w, em.const([-1])], keepdims=1)
            em.op("Mul", [moe, total], out=combine.outputs[0].name, name=combine.name)
            return
        is_ffn = em.op("Less", [idx, em.const(ffn_experts)])
        zero = em.const(0.0, np.float32)
        total = em.op("ReduceSum", [em.op("Where", [is_ffn, w, zero]), em.const([-1])], keepdims=1)
        passed = em.op("ReduceSum", [em.op("Where", [is_ffn, zero, w]), em.const([-1])], keepdims=1)
        routed = em.op("Where", [em.op("Greater", [total, zero]), em.op("Mul", [moe, total]), zero])
        em.op("Add", [routed, em.op("Mul", [tokens, passed])], out=combine.outputs[0].name, name=combine.name)

    def _gate_up_parts(self, value: Value) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The fused gate/up weight, as its (gate, up) parts when it is a two-part concat (saves a copy)."""
        node = value.producer
        if node is not None and node.op == OpCode.CONCAT and len(node.inputs) == 2 and node.attrs["axis"] == 1:
            return self.inits.evaluate(node.inputs[0]), self.inits.evaluate(node.inputs[1])
        return self.inits.evaluate(value)


    # -- decoders: ONNX Runtime's attention and norm kernels -------------------------------------

    def __init__(self, graph: Graph, weights: Mapping[str, torch.Tensor], *, int8_activations: bool = False):
        self.int8_activations = int8_activations  # QuantOps: accuracy_level 4 on QMoE and MatMulNBits
        super().__init__(graph, weights)
        # Residual ADD -> RMS_NORM pairs of a decoder, each lowered as one SkipSimplifiedLayerNormalization
        # (emitted at the norm; the ADD's sum is its fourth output).
        self.skip_norms = skip_norm_pairs(graph) if is_decode_graph(graph) else {}
        self.fused_adds = {add.name for add in self.skip_norms.values()}

    @classmethod
    def contrib_notes(cls, graph: Graph, op_types: Sequence[str], *, int8_activations: bool = False) -> list[str]:
        """What the export used of ONNX Runtime's contrib kernels (counted in the lowered nodes), and why the
        rest of the model kept standard ops: the build's notes."""
        counts = {op: op_types.count(op) for op in _ORT_CONTRIB_OPS if op in op_types}
        notes = ["ort contrib ops: " + (", ".join(f"{op} x{n}" for op, n in counts.items()) or "none")]
        why = {}
        fused_norms = skip_norm_pairs(graph)
        for node in graph.nodes:
            reason = ""
            if node.op in (OpCode.CACHED_ATTENTION, OpCode.CACHED_MLA_ATTENTION):
                reason = gqa_refusal(node)
            elif node.op in (OpCode.ATTENTION, OpCode.MLA_ATTENTION, OpCode.RMS_NORM) and not is_decode_graph(graph):
                reason = ("prefill-only files keep standard attention and RMSNorm; GroupQueryAttention and "
                          "SkipSimplifiedLayerNormalization are used in decoders (`build --decoder`)")
            elif node.op == OpCode.RMS_NORM and node.name not in fused_norms:
                reason = ("an RMSNorm without a residual add before it: SimplifiedLayerNormalization would fit, but "
                          "ONNX Runtime registers it in the ONNX domain, where it is no ONNX op (onnx.checker "
                          "refuses the file)")
            if reason:
                why.setdefault(reason, []).append(node.name)
        for reason, names in why.items():
            notes.append(f"ort: standard ops for {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}: {reason}")
        if int8_activations:
            notes.append(f"ort: {'/'.join(op for op in ('QMoE', 'MatMulNBits') if op in counts)} on int8 "
                         f"activations (accuracy_level {INT8_ACTIVATIONS_LEVEL}): faster, not exact (about 1e-2 "
                         f"relative against the quantized reference); moe-ir's runners leave "
                         f"{QMOE_FLOAT_ACTIVATIONS_ENV[0]} unset for this file")
        elif "QMoE" in counts and qmoe_int8_note(graph):
            notes.append(qmoe_int8_note(graph))
        return notes

    def _lower_add(self, node: Node) -> None:
        if node.name not in self.fused_adds:
            super()._lower_add(node)   # else: emitted by the SkipSimplifiedLayerNormalization of its norm

    def _lower_rms_norm(self, node: Node) -> None:
        weight = node.inputs[1]
        eps = node.attrs["eps"]
        add = self.skip_norms.get(node.name)
        if add is None:
            return super()._lower_rms_norm(node)
        a, b = add.inputs
        self.em.op("SkipSimplifiedLayerNormalization", [self.operand(a), self.operand(b), self.operand(weight)],
                   out=[node.outputs[0].name, "", "", add.outputs[0].name], domain=MS_DOMAIN, name=node.name,
                   epsilon=eps)

    def _lower_cached_attention(self, node: Node) -> None:
        if gqa_refusal(node):
            return super()._lower_cached_attention(node)
        em, a, dt = self.em, node.attrs, node.inputs[0].type.dtype
        heads, kv_heads, d = a["heads"], a["kv_heads"], a["head_dim"]
        positions = self.operand(node.input("position_ids"))
        # the portable front (projections, q/k norms, RoPE at position_ids), then GroupQueryAttention with its own
        # rotary off
        xs, batch_seq, q, k, v = self._mha_heads(node, lambda xs, r: self._rope_tables_at(positions, r, a, dt))

        def tokens_of(t: str, n: int) -> str:
            """[B, n, S, d] -> [B, S, n*d], GroupQueryAttention's layout."""
            t = em.op("Transpose", [t], perm=[0, 2, 1, 3])
            return em.op("Reshape", [t, em.op("Concat", [batch_seq, em.const([n * d])], axis=0)], allowzero=1)

        query, key, value = tokens_of(q, heads), tokens_of(k, kv_heads), tokens_of(v, kv_heads)
        seqlens, total, bias = self._gqa_inputs(xs, node)
        out = em.op("GroupQueryAttention", [query, key, value, self.operand(node.input("past_key")),
                                            self.operand(node.input("past_value")), seqlens, total, "", "", "", bias],
                    out=[f"{node.name}/GroupQueryAttention_out", node.output("present_key").name,
                         node.output("present_value").name],
                    domain=MS_DOMAIN, name=f"{node.name}/GroupQueryAttention", num_heads=heads, kv_num_heads=kv_heads,
                    scale=attention_scale(a, d), do_rotary=0)[0]
        self._output_projection(node, em.op("Reshape", [out, em.const([-1, heads * d])]), batch_seq)

    def _gqa_inputs(self, x: str, node: Node) -> tuple[str, str, str]:
        """seqlens_k i32 [B] (L - 1 for every row: the mask's padding goes into attention_bias instead),
        total_sequence_length i32 [] (L, the mask's length) and attention_bias [B, 1, S, L] (-inf where
        model_ops.visible_keys hides a key), computed from attention_mask; shared by every layer."""
        if "gqa" not in self.shared:
            em = self.em
            mask = self.operand(node.input("attention_mask"))
            total32 = em.op("Cast", [em.scalar(em.op("Shape", [mask], start=1, end=2))], to=TensorProto.INT32)
            seqlens = em.op("Expand", [em.op("Sub", [total32, em.const(1, np.int32)]),
                                       em.op("Shape", [mask], start=0, end=1)])
            hidden = self._hidden_keys(x, mask)[0]
            bias = em.op("Where", [hidden, em.const(-np.inf, np.float32, "neg_inf"), em.const(0.0, np.float32)])
            self.shared["gqa"] = (seqlens, total32, bias)
        return self.shared["gqa"]


def skip_norm_pairs(graph: Graph) -> dict[str, Node]:
    """RMS_NORM node name -> the residual ADD feeding it, where the two can be one
    SkipSimplifiedLayerNormalization: an ADD of two activations whose sum nothing reads before the norm."""
    pairs = {}
    order = {node.name: i for i, node in enumerate(graph.nodes)}
    for norm in graph.find(OpCode.RMS_NORM):
        add = norm.inputs[0].producer
        if add is None or add.op != OpCode.ADD or any(v.producer is None for v in add.inputs):
            continue
        if graph.is_graph_output(add.outputs[0]) or any(
                order[u.name] < order[norm.name] for u in graph.users(add.outputs[0]) if u is not norm):
            continue
        pairs[norm.name] = add
    return pairs


def gqa_refusal(node: Node) -> str:
    """Why com.microsoft.GroupQueryAttention (CPU) cannot be this cached attention node ('' when it can)."""
    if node.op == OpCode.CACHED_MLA_ATTENTION:
        return ("MLA: GroupQueryAttention rotates whole heads and takes one head size for K and V (MLA rotates "
                "qk_rope_head_dim of each head, its values are v_head_dim wide)")
    if node.op != OpCode.CACHED_ATTENTION:
        return f"{node.op.value} is not cached attention"
    a = node.attrs
    if a["head_dim"] % 16:
        return f"GroupQueryAttention's CPU kernel needs head_dim a multiple of 16 (this model: {a['head_dim']})"
    if a["rope_layout"] != RopeLayout.HALF:
        return ("interleaved RoPE: GroupQueryAttention's rotary_interleaved caches keys interleaved, where the "
                "decode graph's cache holds them de-interleaved")
    if node.inputs[0].type.dtype != ElemType.FLOAT32:
        return "the ort flavour is float32 only"
    if a["sliding_window"] is not None:
        return "a sliding window: the decoder keeps it as a mask in standard ops"
    if a["qk_norm"] in (QKNorm.HEAD_AFTER_ROPE, QKNorm.WEIGHTLESS_AFTER_ROPE) or a["rotary_dim"] == 0:
        return "q/k norm after RoPE or a layer without RoPE: the decoder keeps them in standard ops"
    if a["chunk_size"] is not None:
        return "chunked attention (Llama 4): the decoder keeps it as a mask in standard ops"
    if node.input("sinks") is not None:
        return "attention sinks (gpt-oss): the decoder keeps them as one more softmax column in standard ops"
    if a["clip_qkv"] is not None:
        return "q/k/v clipping (DBRX): the decoder clamps the projections in standard ops"
    return ""


# -- plugin -----------------------------------------------------------------------------------------


class PluginLowering(PortableLowering):
    flavour = Flavour.PLUGIN
    # fuse-gate-up-quantized: quantized routed experts reach QFusedMoE as one gate/up weight's stored parts
    pipeline = ("strip-training-outputs", "fuse-shared-experts", "fuse-moe", "fuse-gate-up-quantized", "dce")
    needs = (f"needs an implementation of {plugin_op.PLUGIN_NAME} ({plugin_op.QUANT_PLUGIN_NAME} for quantized "
             f"experts) (TensorRT plugin; on CPU: moe_ir.backends.onnx.load_runner)",)

    @classmethod
    def refusal(cls, graph: Graph) -> str:
        if graph.kind == GraphKind.MODEL:
            return support.model_graph_refusal()
        # the plugin's own reasons first: they name what QFusedMoE takes (fp8 tiles, blocks)
        return support.plugin_refusal(graph) or super().refusal(graph)

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
        ins = [self.operand(node.input("x")), self.operand(node.input("w_router")), bias_name]
        op_type = plugin_op.OP_TYPE
        if plugin_op.quantized_parts(node) is None:
            ins += [self.operand(node.input("w_up")), self.operand(node.input("w_down"))]
        else:
            op_type = plugin_op.QUANT_OP_TYPE
            quant = plugin_op.quant_attrs_of(node)
            attrs.update(quant.encode())
            ins += [self._stored_bytes(value) if value is not None else
                    em.const(np.array([implicit_zero(quant.format)], np.int8), np.int8, "implicit_zero")
                    for _, value in plugin_op.quantized_inputs(node)]
        out, idx32, w = node.outputs[0].name, f"{node.outputs[1].name}.i32", node.outputs[2].name
        em.op(op_type, ins, out=[out, idx32, w], domain=plugin_op.DOMAIN, name=node.name, **attrs)
        # The plugin gives int32 indices (TensorRT's native type); the IR's routing record is int64.
        em.op("Cast", [idx32], out=node.outputs[1].name, to=TensorProto.INT64)

    def _stored_bytes(self, value: Value) -> str:
        """A stored part of a quantized weight as QFusedMoE takes it: scales as they are; codes and zero points
        as int8 holding the stored bytes bit for bit (uint8 reinterpreted: TensorRT plugins take no uint8)."""
        stored = value.type.dtype.torch
        if not stored.is_floating_point:
            return self.inits.add(value, lambda t: t.to(stored).view(torch.int8), dtype=torch.int8)
        return self.operand(value)


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


def lower(graph: Graph, weights: Mapping[str, torch.Tensor], flavour: Flavour | str, *,
          int4_activations: str | None = None) -> LoweredModel:
    """The ONNX model for a graph that went through PIPELINES[flavour] (supports() must hold).
    int4_activations "int8" (the ort flavour, int4/int8 weights): ONNX Runtime's quantized matmuls on int8
    activations (int8_activations_refusal says where it does not apply)."""
    cls = lowering_class(flavour)
    ok, reason = cls.supports(graph)
    if not ok:
        raise BackendError(f"onnx/{cls.flavour.value}: {reason}")
    if int4_activations is None:
        return cls(graph, weights).run()
    reason = int8_activations_refusal(graph, cls.flavour, int4_activations)
    if reason:
        raise BackendError(f"onnx/{cls.flavour.value}: {reason}")
    return cls(graph, weights, int8_activations=True).run()


def int8_activations_refusal(graph: Graph, flavour: Flavour, int4_activations: str) -> str:
    """Why int4_activations cannot apply to this export ('' when it can): only "int8", only the ort flavour
    (its QMoE / MatMulNBits nodes carry it), only with int4/int8 weights that lower to them."""
    if int4_activations != "int8":
        return (f"int4_activations={int4_activations!r}: the ONNX backend takes 'int8' (ONNX Runtime's "
                f"quantized matmuls on int8 activations); 'bf16' and 'fused' are the torch backend's")
    if flavour != Flavour.ORT:
        return ("int8 activations are an option of the ort flavour (com.microsoft.QMoE / MatMulNBits "
                "accuracy_level 4); add --flavour ort")
    if not any(n.attrs["format"] in (QuantFormat.INT4, QuantFormat.INT8) for n in dequantize_nodes(graph)):
        return "int8 activations need int4 or int8 weights; add --quantize int4:32 (or int8), or drop the option"
    return ""
