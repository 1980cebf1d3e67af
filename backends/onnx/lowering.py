"""IR graph -> ONNX model: the base class of the lowering, emitted node by node from the IR (no tracing).

Each IR node becomes one or more ONNX nodes. The ONNX node that produces an IR value carries the IR
node's name; helper nodes are named `<ir node>/<part>`, so every ONNX node maps back to the IR node it
came from by the text before the first '/'. Tensor names are the IR value names; graph outputs are
named by the IR's output keys (`out`, `expert_idx`, `weights`, `rows`; a model's `logits`,
`layers.{i}.expert_idx`, `layers.{i}.weights`). Graph weights become initializers under their canonical
names, weight-only subgraphs are folded at export (weights.py).

Where things are:
  lowering.py     the driver (`Lowering.run`: node by node, then outputs, opsets, metadata) and the checks
                  every flavour shares (`Lowering.refusal`);
  emit.py         the node emitter and ONNX/numpy type helpers;
  weights.py      initializers and weight folding;
  support.py      the support checks, as functions each flavour composes;
  moe_ops.py      the MoE layer ops (routing, dispatch, expert FFNs, combine, shared experts);
  decoder_ops.py  the whole-model ops (embedding, RMSNorm, attention, MLA);
  flavours.py     one lowering class per flavour (portable, ort, plugin), the one map from `Flavour` to
                  its class and pipeline, and `lower()` / `supports()`.
A node of op X is lowered by the method `_lower_X` of the flavour's class; a flavour that lowers an op
differently overrides that method.

Precision: the portable and plugin flavours export float32, float16 and bfloat16 graphs; every tensor
has the IR value's type, so activations and expert weights are in the spec dtype and the router runs
in its own dtype (float32). Where the two meet there is an explicit Cast, placed as the reference
semantics place it: tokens are cast to the router dtype before the router projection; in combine the
expert rows are cast to float32, weighted by the (float32) routing weights and summed there, and the
sum is rounded once to the activation type (ONNX Runtime's CPU ScatterND has no fp16 add, and this
is the more accurate sum). Selection (TopK) always runs on float32 scores, so routing does not depend
on a backend's low-precision TopK. Folded weights are computed in float32 and rounded once to their
type. The ort flavour is float32 only.
"""
from __future__ import annotations

import enum
from typing import ClassVar, Mapping

import onnx
import torch
from onnx import helper

from moe_ir.errors import BackendError
from moe_ir.ir import ElemType, Graph, GraphKind, Node, OpCode, Value
from moe_ir.model_builder import cache_entries, decode_contract_problem, is_decode_graph
from . import plugin_op, support
from .emit import MS_DOMAIN, ONNX_DTYPE, OPSET, Emitter, dims
from .weights import Initializers, LoweredModel


class Flavour(enum.StrEnum):
    PORTABLE = "portable"
    ORT = "ort"
    PLUGIN = "plugin"


def graph_metadata(graph: Graph) -> dict[str, str]:
    """What a runner needs to check its inputs without the IR: the kind of graph and its sizes.

    layer: x [B, S, hidden] in.  model: input_ids [B, S] in, ids in [0, vocab_size), logits [B, S, vocab_size]
    out; `moe_ir.routing` lists the per-layer routing outputs (comma-separated keys); a decode graph also has
    `moe_ir.form` = decode (its cache inputs and outputs follow ONNX Runtime GenAI's names)."""
    if graph.kind != GraphKind.MODEL:
        return {"moe_ir.kind": "layer", "moe_ir.hidden": str(graph.inputs[0].type.shape[-1])}
    embed = graph.find(OpCode.EMBEDDING)
    vocab, hidden = embed[0].inputs[1].type.shape if embed else (graph.outputs["logits"].type.shape[-1], "")
    decode = is_decode_graph(graph)
    cache = {e.present for e in cache_entries(graph)} if decode else set()
    meta = {"moe_ir.kind": "model", "moe_ir.hidden": str(hidden), "moe_ir.vocab_size": str(vocab),
            "moe_ir.routing": ",".join(k for k in graph.outputs if k != "logits" and k not in cache)}
    if decode:
        meta["moe_ir.form"] = "decode"
    return meta


class Lowering:
    """Lowers one graph that went through `pipeline` (and that `supports` accepts) to one ONNX model."""

    flavour: ClassVar[Flavour]
    pipeline: ClassVar[tuple[str, ...]]     # the passes a graph goes through before this lowering
    needs: ClassVar[tuple[str, ...]] = ()   # what running the exported file takes, beyond ONNX (build notes)

    def __init__(self, graph: Graph, weights: Mapping[str, torch.Tensor]):
        self.graph = graph
        self.em = Emitter()
        self.inits = Initializers(graph, weights)
        # Tensors every attention layer shares (causal mask, RoPE tables): emitted once, by the first
        # layer that needs them, since all layers see the same sequence length.
        self.shared: dict[tuple | str, str | tuple[str, str]] = {}

    def metadata(self) -> dict[str, str]:
        """Metadata a flavour's options add to the file (beside the flavour, pipeline and graph_metadata)."""
        return {}

    # -- support --------------------------------------------------------------------------------

    @classmethod
    def supports(cls, graph: Graph) -> tuple[bool, str]:
        """(ok, reason) for a graph that already went through `pipeline`."""
        reason = cls.refusal(graph)
        return not reason, reason

    @classmethod
    def refusal(cls, graph: Graph) -> str:
        """Why this flavour cannot lower `graph` ('' when it can): the first failing check."""
        if is_decode_graph(graph):
            problem = decode_contract_problem(graph)
            if problem:
                return problem
        for value in support.stored_values(graph):
            reason = cls.dtype_refusal(value)
            if reason:
                return reason
        for node in graph.nodes:
            reason = cls.node_refusal(node)
            if reason:
                return reason
        return ""

    @classmethod
    def dtype_refusal(cls, value: Value) -> str:
        return support.dtype_refusal(value)

    @classmethod
    def node_refusal(cls, node: Node) -> str:
        return support.node_refusal(node)

    def opset(self) -> int:
        """The default-domain opset the emitted nodes need beyond OPSET (0: none)."""
        return 0

    # -- operands -------------------------------------------------------------------------------

    def operand(self, value: Value | None) -> str:
        """The ONNX tensor name of an IR value ('' for an absent optional input)."""
        if value is None:
            return ""
        if self.inits.is_folded(value):
            return self.inits.add(value)
        return value.name

    def cast_operand(self, value: Value, dst: ElemType) -> str:
        return self.em.cast(self.operand(value), value.type.dtype, dst)

    def as_float32(self, value: Value) -> str:
        """A score tensor as float32 for selection: TopK always runs on float32."""
        return self.cast_operand(value, ElemType.FLOAT32)

    # -- driver ---------------------------------------------------------------------------------

    def run(self) -> LoweredModel:
        g, em = self.graph, self.em
        for node in g.nodes:
            if all(self.inits.is_folded(v) for v in node.outputs):
                continue  # folded into an initializer where it is used
            em.prefix = node.name
            lower_fn = getattr(self, f"_lower_{node.op.value}", None)
            if lower_fn is None:
                raise BackendError(f"node {node.name}: op {node.op.value} has no ONNX lowering")
            lower_fn(node)
        outputs = []
        for key, value in g.outputs.items():
            src = self.operand(value)
            if src != key:
                em.prefix = key
                em.op("Identity", [src], out=key, name=f"{key}/output")
            outputs.append(helper.make_tensor_value_info(key, ONNX_DTYPE[value.type.dtype], dims(value.type.shape)))
        inputs = [helper.make_tensor_value_info(v.name, ONNX_DTYPE[v.type.dtype], dims(v.type.shape))
                  for v in g.inputs]
        consts = [onnx.numpy_helper.from_array(arr, name) for name, arr in em.constants.items()]
        onnx_graph = helper.make_graph(em.nodes, g.name, inputs, outputs, initializer=consts)
        opsets = [helper.make_opsetid("", max(OPSET, self.opset()))]
        for domain in (MS_DOMAIN, plugin_op.DOMAIN):
            if any(n.domain == domain for n in em.nodes):
                opsets.append(helper.make_opsetid(domain, 1))
        model = helper.make_model(onnx_graph, opset_imports=opsets, producer_name="moe-ir")
        # 9: readable by onnxruntime >= 1.16 and the TensorRT parser; opset 21 (blocked DequantizeLinear on
        # 4-bit tensors) needs 10
        model.ir_version = 10 if max(OPSET, self.opset()) >= 21 else 9
        meta = {"moe_ir.flavour": self.flavour.value, "moe_ir.pipeline": str(g.meta.get("pipeline", "")),
                "moe_ir.spec_hash": str(g.meta.get("spec_hash", "")), **graph_metadata(g), **self.metadata()}
        for k, v in meta.items():
            model.metadata_props.add(key=k, value=v)
        return LoweredModel(model, self.inits.used_by(em.nodes))
