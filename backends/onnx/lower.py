"""IR graph -> ONNX model, emitted node by node from the IR (no tracing), in three flavours.

Each IR node becomes one or more ONNX nodes. The ONNX node that produces an IR value carries the IR
node's name; helper nodes are named `<ir node>/<part>`, so every ONNX node maps back to the IR node it
came from by the text before the first '/'. Tensor names are the IR value names; graph outputs are
named by the IR's output keys (`out`, `expert_idx`, `weights`, `rows`; a model's `logits`,
`layers.{i}.expert_idx`, `layers.{i}.weights`).

Weights: graph weights become initializers under their canonical names. Weight-only subgraphs that
passes leave behind (CONCAT/ADD nodes on weights from fuse-shared-experts and fuse-gate-up) are folded
here: they are evaluated once with the reference semantics and written as one initializer named by the
IR value, so the exported model computes nothing on weights at run time. Initializers are produced
lazily (one at a time) so that writing external data never holds more than the given weights plus the
largest folded tensor.

Flavours:
  portable  standard ONNX (opset 18) only. Routing with TopK/GatherElements/ScatterElements. Dispatch is
            a stable sort of the T*k assignments by expert, done with TopK(largest=0) on the unique
            int64 key `expert * A + assignment` (ONNX TopK has no stable sort of equal keys, unique keys
            make it unnecessary). Capacity dropping follows the reference (score or position rule).
            Expert FFNs are unrolled per expert: Split the gathered rows by the dynamic group sizes
            (plus one trailing group of dropped rows), one Gemm chain per expert, Concat back. Each
            expert's weights are their own initializers, named `<stacked weight>[e]` (e.g.
            `experts.w_down[3]`), sliced at export: a Gather on the stacked initializer would either
            copy the expert's weights on every run or, folded by ONNX Runtime at session creation,
            take minutes and twice the memory for a 2 GB layer (measured: 286 s to load).
            Unrolled rather than Loop because every slice keeps a static weight and a dynamic row
            count, which ONNX Runtime runs with no per-run copies; at 256 experts this is ~2.5k
            nodes, which loads in seconds.
            Combine regroups the weighted rows by token (a stable sort) and sums each token's k rows
            with ReduceSum (expert choice: differences of a float64 running sum), never ScatterND with
            reduction=add, which ONNX Runtime's CPU kernel computes racily on duplicate indices. Expert-choice
            routing is TopK over tokens per expert with a dynamic k. Nothing builds a tokens x experts
            x hidden tensor.
  ort       as portable, except that dispatch -> expert FFNs -> combine becomes ONNX Runtime's
            com.microsoft.MoE. The routing is computed with ordinary ops (so sigmoid scores, bias
            correction, group limits and scaling all work) and fed to the op as router_probs =
            log(w) at the chosen experts and -inf elsewhere with normalize_routing_weights=1: the op's
            softmax over those gives w / sum(w), and the output is multiplied back by sum(w). SwiGLU
            weights are stored interleaved (gate row, up row, ...) with swiglu_fusion=1, the only
            layout the CPU kernel implements.
  plugin    the FUSED_MOE node becomes one `moe_ir::FusedMoE` node (see plugin_op.py); everything
            else as portable.

Whole models (model_builder.build_model_graph: input_ids i64[B,S] -> logits [B,S,V] and the routing record
of every MoE layer, `layers.{i}.expert_idx` / `layers.{i}.weights`) lower in the portable and ort flavours;
the MoE layers inside lower as above, one per `layers.{i}.moe.` prefix. The decoder ops use standard ops only:
embedding is Gather; rms_norm takes its statistics in float32 as the reference; attention and mla_attention
project with Gemm(transB=1) on the flattened tokens, split heads with Reshape/Transpose, and build the causal
mask (Greater of two Ranges) and the RoPE cos/sin tables (Range(0, S) x inverse frequencies fixed at export)
from the run's S, so one file takes any B and S and has no maximum length. Mask and tables are emitted once
and shared by every layer. GQA broadcasts each kv head over its query heads in MatMul, copying nothing.
The plugin flavour exports layers only: its contract is one fused node per file.

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
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from moe_ir.errors import BackendError
from moe_ir.ir import ElemType, Graph, Node, OpCode, Value, WeightLayout, op_def
from moe_ir.model_spec import QKNorm, RopeLayout
from moe_ir.spec import Activation, DropRule, GroupScore, ScoreFn
from . import plugin_op

OPSET = 18  # Split(num_outputs), ReduceMax with axes as input; ONNX Runtime, TensorRT and onnx 1.14+ take it
MS_DOMAIN = "com.microsoft"
CONTRIB_DOMAIN = "ai.onnx.contrib"  # the only domain onnxruntime-extensions' Python ops register in


class Flavour(enum.StrEnum):
    PORTABLE = "portable"
    ORT = "ort"
    PLUGIN = "plugin"


PIPELINES: dict[Flavour, tuple[str, ...]] = {
    Flavour.PORTABLE: ("strip-training-outputs", "fuse-shared-experts", "fuse-gate-up", "dce"),
    Flavour.ORT: ("strip-training-outputs", "fuse-shared-experts", "fuse-gate-up", "dce"),
    Flavour.PLUGIN: ("strip-training-outputs", "fuse-shared-experts", "fuse-moe", "fuse-gate-up", "dce"),
}

_ONNX_DTYPE = {ElemType.FLOAT32: TensorProto.FLOAT, ElemType.INT64: TensorProto.INT64,
               ElemType.FLOAT16: TensorProto.FLOAT16, ElemType.BFLOAT16: TensorProto.BFLOAT16,
               ElemType.FLOAT64: TensorProto.DOUBLE}
# numpy storage of each float type (numpy has no bfloat16; onnx reads and writes ml_dtypes' one)
_NP_DTYPE = {ElemType.FLOAT32: np.float32, ElemType.FLOAT16: np.float16, ElemType.BFLOAT16: ml_dtypes.bfloat16,
             ElemType.FLOAT64: np.float64}
EXPORT_DTYPES = (ElemType.FLOAT32, ElemType.FLOAT16, ElemType.BFLOAT16)
_ORT_ACTIVATIONS = {Activation.SWIGLU: "swiglu", Activation.RELU: "relu"}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as numpy (bfloat16 as ml_dtypes.bfloat16, which torch cannot hand over directly)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def from_numpy(a: np.ndarray) -> torch.Tensor:
    """Inverse of to_numpy."""
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:  # torch warns on read-only memory (e.g. onnx.reference's constants)
        a = a.copy()
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


# ------------------------------------------------------------------------------------------------
# support


MODEL_OPS = frozenset({OpCode.EMBEDDING, OpCode.RMS_NORM, OpCode.ATTENTION, OpCode.MLA_ATTENTION})


def is_model_graph(graph: Graph) -> bool:
    """A whole decoder (input_ids in, logits out) rather than one MoE layer (x in, out out)."""
    return any(node.op in MODEL_OPS for node in graph.nodes)


def stored_values(graph: Graph) -> list[Value]:
    """The values whose type is the export's precision: weights and the activation input (a model's
    int64 token ids say nothing about it)."""
    ids = {node.inputs[0].name for node in graph.find(OpCode.EMBEDDING)}
    return [v for v in graph.inputs if v.name not in ids] + list(graph.weights.values())


def supports(graph: Graph, flavour: Flavour | str) -> tuple[bool, str]:
    """(ok, reason) for a graph that already went through PIPELINES[flavour]."""
    flavour = Flavour(flavour)
    if flavour == Flavour.PLUGIN and is_model_graph(graph):
        return False, (f"whole models export in the portable and ort flavours only: the plugin flavour's contract "
                       f"is one {plugin_op.PLUGIN_NAME} node per file, and a model has one per MoE layer")
    for v in stored_values(graph):
        if v.type.dtype not in EXPORT_DTYPES:
            return False, (f"the onnx backend exports f32, f16 and bf16 graphs ({v.name} is {v.type.dtype.value})")
        if flavour == Flavour.ORT and v.type.dtype != ElemType.FLOAT32:
            return False, (f"the ort flavour exports float32 graphs only ({v.name} is {v.type.dtype.value}); "
                           f"the portable and plugin flavours export f16 and bf16")
    for node in graph.nodes:
        if node.op == OpCode.BALANCE_LOSS:
            return False, "balance losses are training outputs; the onnx backend exports inference graphs"
        if node.op == OpCode.FUSED_MOE and flavour != Flavour.PLUGIN:
            return False, f"node {node.name}: fused_moe lowers only in the plugin flavour"
    if flavour == Flavour.ORT:
        return _ort_supports(graph)
    if flavour == Flavour.PLUGIN:
        fused = graph.find(OpCode.FUSED_MOE)
        if len(fused) != 1:
            routed = graph.find(OpCode.EXPERT_CHOICE_ROUTE) or graph.find(OpCode.ROUTER_NOISE)
            why = (f"{routed[0].op.value} is not fusable" if routed else "fuse-moe did not apply")
            return False, f"the plugin flavour needs the routed path as one fused_moe node ({why})"
        ok, reason = plugin_op.plugin_supports(fused[0])
        if ok:
            for port in ("w_router", "bias"):
                v = fused[0].input(port)
                if v is not None and v.type.dtype != ElemType.FLOAT32:
                    return False, (f"{plugin_op.PLUGIN_NAME} takes {port} in float32 ({v.name} is "
                                   f"{v.type.dtype.value}; spec router.dtype must be float32)")
        return ok, reason
    return True, ""


def _ort_supports(graph: Graph) -> tuple[bool, str]:
    if graph.find(OpCode.EXPERT_CHOICE_ROUTE):
        return False, "com.microsoft.MoE routes tokens to experts; expert-choice routing does not fit it"
    for combine in graph.find(OpCode.COMBINE):
        try:
            disp, ffn = _moe_chain(graph, combine)
        except BackendError as err:
            return False, str(err)
        if disp.attrs["capacity_factor"] is not None:
            return False, (f"com.microsoft.MoE is dropless; capacity factor {disp.attrs['capacity_factor']} "
                           f"is not supported")
        act = ffn.attrs["activation"]
        if act == Activation.GEGLU:
            return False, "com.microsoft.MoE implements GEGLU on CUDA only (the CPU kernel has SwiGLU)"
        if act == Activation.GELU:
            return False, ("com.microsoft.MoE's CPU gelu is an approximation (max error ~2e-4 against the erf "
                           "GELU of the spec), beyond the float32 tolerance")
        if act.gated and ffn.attrs["weight_layout"] != WeightLayout.GATE_UP_FUSED:
            return False, "com.microsoft.MoE takes gate/up fused weights; run fuse-gate-up before lowering"
    return True, ""


def _moe_chain(graph: Graph, combine: Node) -> tuple[Node, Node]:
    """(dispatch, grouped_ffn) feeding `combine`, when nothing else reads the dispatched rows."""
    ffn, disp = combine.inputs[0].producer, combine.inputs[1].producer
    if ffn is None or ffn.op != OpCode.GROUPED_FFN or disp is None or disp.op != OpCode.DISPATCH:
        raise BackendError(f"node {combine.name}: com.microsoft.MoE needs dispatch -> grouped_ffn -> combine")
    for v in (*disp.outputs, ffn.outputs[0]):
        if graph.is_graph_output(v) or any(u is not ffn and u is not combine for u in graph.users(v)):
            raise BackendError(f"node {combine.name}: {v.name} is used outside the routed path, which "
                               f"com.microsoft.MoE hides")
    return disp, ffn


def graph_metadata(graph: Graph) -> dict[str, str]:
    """What a runner needs to check its inputs without the IR: the kind of graph and its sizes.

    layer: x [B, S, hidden] in.  model: input_ids [B, S] in, ids in [0, vocab_size), logits [B, S, vocab_size]
    out; `moe_ir.routing` lists the per-layer routing outputs (comma-separated keys)."""
    if not is_model_graph(graph):
        return {"moe_ir.kind": "layer", "moe_ir.hidden": str(graph.inputs[0].type.shape[-1])}
    embed = graph.find(OpCode.EMBEDDING)
    vocab, hidden = embed[0].inputs[1].type.shape if embed else (graph.outputs["logits"].type.shape[-1], "")
    return {"moe_ir.kind": "model", "moe_ir.hidden": str(hidden), "moe_ir.vocab_size": str(vocab),
            "moe_ir.routing": ",".join(k for k in graph.outputs if k != "logits")}


# ------------------------------------------------------------------------------------------------
# lowering


Thunk = Callable[[], torch.Tensor]


@dataclass
class LoweredModel:
    """An ONNX model without initializer data, plus one thunk per initializer (called when written)."""

    model: onnx.ModelProto
    initializers: dict[str, Thunk] = field(default_factory=dict)

    def initializer_bytes(self) -> int:
        return sum(_nbytes(t) for t in self.initializers.values())


def _nbytes(thunk: Thunk) -> int:
    return getattr(thunk, "nbytes", 0)


class _Emitter:
    """Collects ONNX nodes and small constants; hands out unique tensor names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.constants: dict[str, np.ndarray] = {}
        self._used: set[str] = set()
        self.prefix = ""

    def _fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._used:
            i += 1
            name = f"{base}_{i}"
        self._used.add(name)
        return name

    def const(self, value, dtype=np.int64, hint: str = "c") -> str:
        name = self._fresh(f"{self.prefix}/{hint}")
        self.constants[name] = np.asarray(value, dtype=dtype)
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, *, out: list[str] | str | None = None,
           domain: str = "", name: str | None = None, **attrs) -> list[str] | str:
        if out is None:
            outs = [self._fresh(f"{self.prefix}/{op_type}") for _ in range(n_out)]
        else:
            outs = [out] if isinstance(out, str) else list(out)
            self._used.update(outs)
        node_name = name or self._fresh(f"{self.prefix}/{op_type}#node")
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 and n_out == 1 and not isinstance(out, list) else outs


def lower(graph: Graph, weights: Mapping[str, torch.Tensor], flavour: Flavour | str) -> LoweredModel:
    """The ONNX model for a graph that went through PIPELINES[flavour] (supports() must hold)."""
    flavour = Flavour(flavour)
    ok, reason = supports(graph, flavour)
    if not ok:
        raise BackendError(f"onnx/{flavour.value}: {reason}")
    lowering = _Lowering(graph, weights, flavour)
    return lowering.run()


class _Lowering:
    def __init__(self, graph: Graph, weights: Mapping[str, torch.Tensor], flavour: Flavour):
        self.graph = graph
        self.weights = weights
        self.flavour = flavour
        self.em = _Emitter()
        self.thunks: dict[str, Thunk] = {}
        self.folded = self._weight_only_values()
        # Tensors every attention layer shares (causal mask, RoPE tables): emitted once, by the first
        # layer that needs them, since all layers see the same sequence length.
        self.shared: dict[tuple, str | tuple[str, str]] = {}

    # -- weights --------------------------------------------------------------------------------

    def _weight_only_values(self) -> set[str]:
        """Names of values computed from weights alone (graph weights included)."""
        names = set(self.graph.weights)
        for node in self.graph.nodes:
            operands = [v for v in node.inputs if v is not None]
            if operands and all(v.name in names for v in operands):
                names.update(v.name for v in node.outputs)
        return names

    def _given(self, value: Value) -> torch.Tensor:
        """A graph weight as given (its own dtype)."""
        if value.name not in self.weights:
            raise BackendError(f"weight {value.name!r} was not given")
        return self.weights[value.name].detach().cpu()

    def _evaluate_stored(self, value: Value) -> torch.Tensor:
        """What an initializer holds before rounding to its type: a given weight as is (no float32 copy of a
        large bf16 tensor), a folded one computed in float32."""
        return self._given(value) if value.producer is None else self._evaluate(value)

    def _evaluate(self, value: Value) -> torch.Tensor:
        if value.producer is None:
            return self._given(value).to(torch.float32)
        node = value.producer
        args = [None if v is None else self._evaluate(v) for v in node.inputs]
        with torch.no_grad():
            return op_def(node.op).reference(node.attrs, *args)[value.index]

    def _evaluate_slice(self, value: Value, e: int) -> torch.Tensor:
        """value[e] for a stacked expert weight, without building the whole folded tensor."""
        node = value.producer
        if node is None:
            return self._given(value)[e].contiguous()  # sliced before any cast: one expert, not all of them
        if node.op == OpCode.CONCAT and node.attrs["axis"] >= 1:
            parts = [self._evaluate_slice(v, e).to(torch.float32) for v in node.inputs]
            return torch.cat(parts, dim=node.attrs["axis"] - 1)
        if node.op == OpCode.ADD:
            return (self._evaluate_slice(node.inputs[0], e).to(torch.float32)
                    + self._evaluate_slice(node.inputs[1], e).to(torch.float32))
        return self._evaluate(value)[e].contiguous()

    def _evaluate_gate_up(self, value: Value) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The fused gate/up weight, as its (gate, up) parts when it is a two-part concat (saves a copy)."""
        node = value.producer
        if node is not None and node.op == OpCode.CONCAT and len(node.inputs) == 2 and node.attrs["axis"] == 1:
            return self._evaluate(node.inputs[0]), self._evaluate(node.inputs[1])
        return self._evaluate(value)

    def weight(self, value: Value, transform: Callable | None = None, name: str | None = None,
               evaluate: Callable | None = None) -> str:
        """Name of an initializer holding `value` (folded when computed), optionally transformed."""
        name = name or value.name
        if name not in self.thunks:
            dtype = value.type.dtype.torch

            def thunk(value=value, transform=transform, evaluate=evaluate or self._evaluate_stored, dtype=dtype):
                t = evaluate(value)
                # Folds computed in float32, rounded once to the value's type (given weights: a no-op
                # when they come in it).
                return (transform(t) if transform is not None else t).to(dtype)

            shape = value.type.shape[1:] if name.endswith("]") else value.type.shape  # "name[e]": one slice
            thunk.nbytes = math.prod(int(d) for d in shape) * dtype.itemsize
            self.thunks[name] = thunk
        return name

    def operand(self, value: Value | None) -> str:
        if value is None:
            return ""
        if value.name in self.folded:
            return self.weight(value)
        return value.name

    # -- driver ---------------------------------------------------------------------------------

    def run(self) -> LoweredModel:
        g = self.graph
        for node in g.nodes:
            if all(v.name in self.folded for v in node.outputs):
                continue  # folded into an initializer where it is used
            self.em.prefix = node.name
            lower_fn = getattr(self, f"_lower_{node.op.value}", None)
            if lower_fn is None:
                raise BackendError(f"node {node.name}: op {node.op.value} has no ONNX lowering")
            lower_fn(node)
        outputs = []
        for key, value in g.outputs.items():
            src = self.operand(value)
            if src != key:
                self.em.prefix = key
                self.em.op("Identity", [src], out=key, name=f"{key}/output")
            outputs.append(helper.make_tensor_value_info(key, _ONNX_DTYPE[value.type.dtype], _dims(value.type.shape)))
        inputs = [helper.make_tensor_value_info(v.name, _ONNX_DTYPE[v.type.dtype], _dims(v.type.shape))
                  for v in g.inputs]
        consts = [onnx.numpy_helper.from_array(arr, name) for name, arr in self.em.constants.items()]
        onnx_graph = helper.make_graph(self.em.nodes, g.name, inputs, outputs, initializer=consts)
        opsets = [helper.make_opsetid("", OPSET)]
        if any(n.domain == MS_DOMAIN for n in self.em.nodes):
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        if any(n.domain == plugin_op.DOMAIN for n in self.em.nodes):
            opsets.append(helper.make_opsetid(plugin_op.DOMAIN, 1))
        model = helper.make_model(onnx_graph, opset_imports=opsets, producer_name="moe-ir")
        model.ir_version = 9  # readable by onnxruntime >= 1.16 and the TensorRT parser
        meta = {"moe_ir.flavour": self.flavour.value, "moe_ir.pipeline": str(g.meta.get("pipeline", "")),
                "moe_ir.spec_hash": str(g.meta.get("spec_hash", "")), **graph_metadata(g)}
        for k, v in meta.items():
            model.metadata_props.add(key=k, value=v)
        used = {i for n in self.em.nodes for i in n.input}
        return LoweredModel(model, {k: t for k, t in self.thunks.items() if k in used})

    # -- shape helpers --------------------------------------------------------------------------

    def rows_of(self, tensor: str) -> str:
        """[1] int64: the leading (dynamic) dimension of `tensor`."""
        return self.em.op("Shape", [tensor], start=0, end=1)

    def scalar(self, vec1: str) -> str:
        return self.em.op("Squeeze", [vec1])

    def zeros(self, shape: str, dtype=TensorProto.FLOAT, fill: float = 0.0) -> str:
        return self.em.op("ConstantOfShape", [shape], value=helper.make_tensor("v", dtype, [1], [fill]))

    # -- type helpers ---------------------------------------------------------------------------

    def fconst(self, value, dtype: ElemType, hint: str = "c") -> str:
        """A float constant in `dtype` (the type of the tensor it meets: ONNX does not promote)."""
        return self.em.const(value, _NP_DTYPE[dtype], hint)

    def cast(self, tensor: str, src: ElemType, dst: ElemType) -> str:
        """`tensor` (of type src) as dst: an explicit Cast where the types differ, else the tensor."""
        if src == dst:
            return tensor
        return self.em.op("Cast", [tensor], to=_ONNX_DTYPE[dst])

    def cast_operand(self, value: Value, dst: ElemType) -> str:
        return self.cast(self.operand(value), value.type.dtype, dst)

    def as_float32(self, value: Value) -> str:
        """A score tensor as float32 for selection: TopK always runs on float32."""
        return self.cast_operand(value, ElemType.FLOAT32)

    # -- ops ------------------------------------------------------------------------------------

    def _lower_flatten_tokens(self, node: Node) -> None:
        h = node.outputs[0].type.shape[1]
        self.em.op("Reshape", [self.operand(node.inputs[0]), self.em.const([-1, h])], out=node.outputs[0].name,
                   name=node.name)

    def _lower_restore_tokens(self, node: Node) -> None:
        y, like = node.inputs
        lead = self.em.op("Shape", [self.operand(like)], start=0, end=2)
        shape = self.em.op("Concat", [lead, self.em.const([y.type.shape[1]])], axis=0)
        # allowzero: an empty batch (B or S = 0) puts a 0 in `shape`, which Reshape would otherwise read as
        # "copy this dim from the input" ([0, H] -> [1, H, H] for x [1, 0, H]) and fail.
        self.em.op("Reshape", [self.operand(y), shape], out=node.outputs[0].name, name=node.name, allowzero=1)

    def _lower_linear(self, node: Node) -> None:
        # Computed in out_dtype (the router's): the activation is cast to it first, as the reference does.
        dt = node.attrs["out_dtype"]
        ins = [self.cast_operand(v, dt) for v in node.inputs if v is not None]
        self.em.op("Gemm", ins, out=node.outputs[0].name, name=node.name, transB=1)

    def _lower_router_noise(self, node: Node) -> None:
        # Noise is a training-time perturbation; an inference export is the identity (as the reference).
        self.em.op("Identity", [self.operand(node.inputs[0])], out=node.outputs[0].name, name=node.name)

    def _lower_score(self, node: Node) -> None:
        op = "Softmax" if node.attrs["fn"] == ScoreFn.SOFTMAX else "Sigmoid"
        kw = {"axis": -1} if op == "Softmax" else {}
        self.em.op(op, [self.operand(node.inputs[0])], out=node.outputs[0].name, name=node.name, **kw)

    def _lower_topk_route(self, node: Node) -> None:
        em, a = self.em, node.attrs
        scores, bias = node.inputs
        scores_n = self.operand(scores)
        # Selection on float32 (scores + a float32 bias promote to it in the reference too).
        select = self.as_float32(scores)
        if bias is not None:
            select = em.op("Add", [select, self.as_float32(bias)])
        e = scores.type.shape[1]
        if a["groups"] > 1:
            groups = a["groups"]
            grouped = em.op("Reshape", [select, em.const([0, groups, e // groups])])
            if a["group_score"] == GroupScore.MAX:
                gscore = em.op("ReduceMax", [grouped, em.const([-1])], keepdims=0)
            else:
                top2 = em.op("TopK", [grouped, em.const([2])], 2, axis=-1)[0]
                gscore = em.op("ReduceSum", [top2, em.const([-1])], keepdims=0)
            keep = em.op("TopK", [gscore, em.const([a["kept"]])], 2, axis=-1)[1]
            ones = em.op("ConstantOfShape", [em.op("Shape", [keep])],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]))
            mask = em.op("ScatterElements", [self.zeros(em.op("Shape", [gscore])), keep, ones], axis=1)
            keep_mask = em.op("Cast", [em.op("Unsqueeze", [mask, em.const([-1])])], to=TensorProto.BOOL)
            # -inf, not 0: a biased score can be negative and must still lose to every kept expert.
            masked = em.op("Where", [keep_mask, grouped, em.const(-np.inf, np.float32, "neg_inf")])
            select = em.op("Reshape", [masked, em.const([0, e])])
        idx = em.op("TopK", [select, em.const([a["k"]])], 2, axis=-1, largest=1, sorted=1)[1]
        em.op("Identity", [idx], out=node.outputs[0].name, name=node.name)
        em.op("GatherElements", [scores_n, idx], out=node.outputs[1].name, axis=1)  # weights in the scores' type

    def _lower_scale_weights(self, node: Node) -> None:
        em, a = self.em, node.attrs
        w = self.operand(node.inputs[0])
        dt = node.inputs[0].type.dtype
        if a["normalize"]:
            total = em.op("ReduceSum", [w, em.const([-1])], keepdims=1)
            w = em.op("Div", [w, em.op("Add", [total, self.fconst(1e-20, dt)])])
        em.op("Mul", [w, self.fconst(a["scale"], dt, "scale")], out=node.outputs[0].name, name=node.name)

    def _lower_dispatch(self, node: Node) -> None:
        if self.flavour == Flavour.ORT:
            return  # com.microsoft.MoE dispatches internally; the combine node emits it
        em, a = self.em, node.attrs
        idx, w = (self.operand(v) for v in node.inputs)
        k = node.inputs[0].type.shape[1]
        n_exp = a["num_experts"]
        flat_e = em.op("Reshape", [idx, em.const([-1])])
        flat_w = em.op("Reshape", [w, em.const([-1])])
        n_assign = em.op("Shape", [flat_e])                   # [1]: A = T*k
        n_assign_s = self.scalar(n_assign)
        arange = em.op("Range", [em.const(0), n_assign_s, em.const(1)])

        def sort_by(key: str) -> str:
            """Permutation sorting int64 `key` ascending; keys are unique, so the order is total."""
            return em.op("TopK", [key, n_assign], 2, axis=0, largest=0, sorted=1)[1]

        def unique_key(major: str, minor: str) -> str:
            return em.op("Add", [em.op("Mul", [major, n_assign_s]), minor])

        if a["capacity_factor"] is None:
            key = flat_e
            kept_sorted = None
            order = sort_by(unique_key(flat_e, arange))
        else:
            if a["drop_rule"] == DropRule.POSITION:
                # GShard priority: slot-major, then token: rank of assignment t*k+j is j*T + t.
                n_tok = em.op("Div", [n_assign_s, em.const(k)])
                rank = em.op("Add", [em.op("Mul", [em.op("Mod", [arange, em.const(k)]), n_tok]),
                                     em.op("Div", [arange, em.const(k)])])
                by_priority = sort_by(unique_key(flat_e, rank))
            else:
                # Highest weight first within each expert (TopK keeps lower indices first on ties,
                # the reference's stable order), then regroup by expert keeping that order.
                by_weight = em.op("TopK", [flat_w, n_assign], 2, axis=0, largest=1, sorted=1)[1]
                regroup = sort_by(unique_key(em.op("Gather", [flat_e, by_weight]), arange))
                by_priority = em.op("Gather", [by_weight, regroup])
            capacity = self._capacity(n_assign, a["capacity_factor"], n_exp)
            sorted_e = em.op("Gather", [flat_e, by_priority])
            counts = self._bincount(flat_e, n_assign, n_exp)
            starts = em.op("CumSum", [counts, em.const(0)], exclusive=1)
            position = em.op("Sub", [arange, em.op("Gather", [starts, sorted_e])])
            kept_by_priority = em.op("Cast", [em.op("Less", [position, capacity])], to=TensorProto.INT64)
            kept = em.op("ScatterElements", [self.zeros(n_assign, TensorProto.INT64), by_priority, kept_by_priority],
                         axis=0)
            kept_b = em.op("Cast", [kept], to=TensorProto.BOOL)
            # Dropped assignments sort after every expert's group (key E), as in the reference.
            key = em.op("Where", [kept_b, flat_e, em.const(n_exp)])
            order = sort_by(unique_key(key, arange))
            kept_sorted = em.op("Gather", [kept_b, order])
        em.op("Div", [order, em.const(k)], out=node.outputs[0].name, name=node.name)
        row_w = em.op("Gather", [flat_w, order])
        if kept_sorted is not None:
            row_w = em.op("Where", [kept_sorted, row_w, self.fconst(0.0, node.inputs[1].type.dtype)])
        em.op("Identity", [row_w], out=node.outputs[1].name)
        sizes = self._bincount(key, n_assign, n_exp + 1)
        em.op("Slice", [sizes, em.const([0]), em.const([n_exp])], out=node.outputs[2].name)

    def _capacity(self, n_assign: str, factor: float, n_exp: int) -> str:
        """[1] int64: max(1, ceil(factor * A / E)), computed in double as the reference does."""
        em = self.em
        a = em.op("Cast", [n_assign], to=TensorProto.DOUBLE)
        cap = em.op("Ceil", [em.op("Div", [em.op("Mul", [a, em.const(factor, np.float64)]),
                                           em.const(float(n_exp), np.float64)])])
        return em.op("Max", [em.op("Cast", [cap], to=TensorProto.INT64), em.const([1])])

    def _bincount(self, keys: str, n_assign: str, length: int) -> str:
        em = self.em
        ones = em.op("ConstantOfShape", [n_assign], value=helper.make_tensor("v", TensorProto.INT64, [1], [1]))
        return em.op("ScatterElements", [self.zeros(em.const([length]), TensorProto.INT64), keys, ones], axis=0,
                     reduction="add")

    def _lower_expert_choice_route(self, node: Node) -> None:
        em, a = self.em, node.attrs
        scores = self.as_float32(node.inputs[0])
        n_exp = node.inputs[0].type.shape[1]
        n_tok = self.rows_of(scores)
        tk = em.op("Cast", [em.op("Mul", [n_tok, em.const([a["top_k"]])])], to=TensorProto.DOUBLE)
        cap = em.op("Ceil", [em.op("Div", [em.op("Mul", [tk, em.const(a["capacity_factor"], np.float64)]),
                                           em.const(float(n_exp), np.float64)])])
        cap = em.op("Min", [em.op("Max", [em.op("Cast", [cap], to=TensorProto.INT64), em.const([1])]), n_tok])
        by_expert = em.op("Transpose", [scores], perm=[1, 0])
        values, tokens = em.op("TopK", [by_expert, cap], 2, axis=-1, largest=1, sorted=1)
        em.op("Reshape", [tokens, em.const([-1])], out=node.outputs[0].name, name=node.name)
        values = self.cast(values, ElemType.FLOAT32, node.outputs[1].type.dtype)  # exact: they came from it
        em.op("Reshape", [values, em.const([-1])], out=node.outputs[1].name)
        em.op("Expand", [cap, em.const([n_exp])], out=node.outputs[2].name)

    def _ffn(self, x: str, node: Node, w: dict[str, str | None], out: str | None = None) -> str:
        """One FFN on rows `x` with [F,H]/[H,F] weights (names of tensors; None = absent)."""
        em = self.em
        act = node.attrs["activation"]
        fused = act.gated and node.attrs["weight_layout"] == WeightLayout.GATE_UP_FUSED

        def linear(inp: str, weight: str, bias: str | None) -> str:
            return em.op("Gemm", [inp, weight] + ([bias] if bias else []), transB=1)

        if fused:
            gate, up = em.op("Split", [linear(x, w["w_up"], w["b_up"])], 2, axis=1, num_outputs=2)
        else:
            up = linear(x, w["w_up"], w["b_up"])
            gate = linear(x, w["w_gate"], w["b_gate"]) if act.gated else None
        dt = node.inputs[0].type.dtype
        if act == Activation.SWIGLU:
            hidden = em.op("Mul", [em.op("Mul", [gate, em.op("Sigmoid", [gate])]), up])
        elif act == Activation.GEGLU:
            hidden = em.op("Mul", [self._gelu(gate, dt), up])
        elif act == Activation.GELU:
            hidden = self._gelu(up, dt)
        else:
            hidden = em.op("Relu", [up])
        ins = [hidden, w["w_down"]] + ([w["b_down"]] if w["b_down"] else [])
        return em.op("Gemm", ins, transB=1, **({"out": out} if out else {}))

    def _gelu(self, x: str, dt: ElemType) -> str:
        # Erf form: the spec's GELU is PyTorch's exact one (opset 20's Gelu would pin a newer opset).
        em = self.em
        erf = em.op("Erf", [em.op("Mul", [x, self.fconst(1 / math.sqrt(2), dt)])])
        return em.op("Mul", [em.op("Mul", [x, self.fconst(0.5, dt)]), em.op("Add", [erf, self.fconst(1.0, dt)])])

    def _weight_operands(self, node: Node) -> dict[str, Value | None]:
        return {k: node.input(k) for k in ("w_up", "w_down", "w_gate", "b_up", "b_down", "b_gate")}

    def _lower_ffn(self, node: Node) -> None:
        w = {k: (self.operand(v) if v is not None else None) for k, v in self._weight_operands(node).items()}
        self._ffn(self.operand(node.inputs[0]), node, w, out=node.outputs[0].name)

    def _lower_grouped_ffn(self, node: Node) -> None:
        if self.flavour == Flavour.ORT:
            return  # part of com.microsoft.MoE, emitted at the combine node
        em = self.em
        x, rows, sizes = (self.operand(v) for v in node.inputs[:3])
        weights = self._weight_operands(node)
        n_exp = int(weights["w_up"].type.shape[0])
        gathered = em.op("Gather", [x, rows], axis=0)                 # [A, H]
        n_rows = self.rows_of(gathered)
        dropped = em.op("Sub", [n_rows, em.op("ReduceSum", [sizes, em.const([0])], keepdims=1)])
        split = em.op("Concat", [sizes, dropped], axis=0)              # E groups, then dropped rows
        parts = em.op("Split", [gathered, split], n_exp + 1, axis=0)
        outs = []
        for e in range(n_exp):
            em.prefix = f"{node.name}/expert{e}"
            w = {}
            for key, value in weights.items():
                w[key] = None if value is None else self.weight(
                    value, name=f"{value.name}[{e}]", evaluate=lambda v, e=e: self._evaluate_slice(v, e))
            outs.append(self._ffn(parts[e], node, w))
        em.prefix = node.name
        # Dropped rows (past every group) are zeros, as in the reference.
        tail = em.op("Mul", [parts[n_exp], self.fconst(0.0, node.inputs[0].type.dtype)])
        em.op("Concat", outs + [tail], axis=0, out=node.outputs[0].name, name=node.name)

    def _lower_combine(self, node: Node) -> None:
        # Not ScatterND(reduction=add): ONNX Runtime's CPU kernel adds the update rows of duplicate indices
        # from several threads without synchronisation, so with intra-op threads a token summed from k rows
        # now and then loses one (measured on the DeepSeekMoE-16B layer at 1024 tokens: 1-2 tokens wrong by
        # ~1e-2 in most runs; onnxruntime issues 18048, 23396). The rows are regrouped by token instead and
        # summed with ordinary reductions, which is deterministic on every runtime.
        em = self.em
        if self.flavour == Flavour.ORT:
            self._lower_ort_moe(node)
            return
        _, rows, _, like = (self.operand(v) for v in node.inputs)
        dt = node.inputs[0].type.dtype
        # f16/bf16 rows are weighted and summed in float32, then rounded once to their type: the float32 sum
        # of a token's rows is the more accurate one.
        y = self.cast_operand(node.inputs[0], ElemType.FLOAT32)
        row_w = self.cast_operand(node.inputs[2], ElemType.FLOAT32)
        hidden = node.outputs[0].type.shape[1]
        weighted = em.op("Mul", [y, em.op("Unsqueeze", [row_w, em.const([1])])])
        n_assign = em.op("Shape", [rows])
        n_assign_s = self.scalar(n_assign)
        arange = em.op("Range", [em.const(0), n_assign_s, em.const(1)])
        # Stable order of the rows by token (unique keys token*A + position, as dispatch sorts).
        by_token = em.op("TopK", [em.op("Add", [em.op("Mul", [rows, n_assign_s]), arange]), n_assign], 2, axis=0,
                         largest=0, sorted=1)[1]
        grouped = em.op("Gather", [weighted, by_token])
        k = _rows_per_token(node)
        low = dt != ElemType.FLOAT32
        result = {} if low else {"out": node.outputs[0].name, "name": node.name}
        if k is not None:
            # Token choice: every token owns exactly k rows (dropped ones included, with weight 0).
            summed = em.op("ReduceSum", [em.op("Reshape", [grouped, em.const([-1, k, hidden])]), em.const([1])],
                           keepdims=0, **result)
        else:
            # Expert choice: a token owns any number of rows. Its sum is the difference of a running sum at
            # the ends of its segment, in float64 so that the subtraction loses nothing a float32 sum keeps.
            counts = em.op("ScatterElements", [self.zeros(self.rows_of(like), TensorProto.INT64), rows,
                                               self.zeros(n_assign, TensorProto.INT64, 1)], axis=0, reduction="add")
            ends = em.op("CumSum", [counts, em.const(0)])
            running = em.op("CumSum", [em.op("Cast", [grouped], to=TensorProto.DOUBLE), em.const(0)])
            running = em.op("Concat", [self.zeros(em.const([1, hidden]), TensorProto.DOUBLE), running], axis=0)
            total = em.op("Sub", [em.op("Gather", [running, ends]),
                                  em.op("Gather", [running, em.op("Sub", [ends, counts])])])
            summed = em.op("Cast", [total], to=TensorProto.FLOAT, **result)
        if low:
            em.op("Cast", [summed], out=node.outputs[0].name, name=node.name, to=_ONNX_DTYPE[dt])

    def _lower_ort_moe(self, combine: Node) -> None:
        em = self.em
        disp, ffn = _moe_chain(self.graph, combine)
        idx, w = (self.operand(v) for v in disp.inputs)
        tokens = self.operand(ffn.inputs[0])
        k = disp.inputs[0].type.shape[1]
        n_exp = disp.attrs["num_experts"]
        act = ffn.attrs["activation"]
        em.prefix = ffn.name
        # log(w) at the chosen experts, -inf elsewhere: the op's softmax over them gives w / sum(w).
        probs_shape = em.op("Concat", [self.rows_of(tokens), em.const([n_exp])], axis=0)
        neg_inf = self.zeros(probs_shape, fill=-np.inf)
        log_w = em.op("Log", [em.op("Max", [w, em.const(1e-30, np.float32)])])
        probs = em.op("ScatterElements", [neg_inf, idx, log_w], axis=1)
        ops = self._weight_operands(ffn)
        if act.gated:
            fc1 = self.weight(ops["w_up"], _interleave_gate_up, name=f"{ffn.name}.fc1_interleaved",
                              evaluate=self._evaluate_gate_up)
            fc1_b = (self.weight(ops["b_up"], _interleave_gate_up, name=f"{ffn.name}.fc1_bias_interleaved")
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

    def _lower_sigmoid_gate(self, node: Node) -> None:
        em = self.em
        y, x, w = node.inputs
        dt = x.type.dtype
        gate = em.op("Sigmoid", [em.op("Gemm", [self.operand(x), self.cast_operand(w, dt)], transB=1)])
        em.op("Mul", [self.operand(y), self.cast(gate, dt, y.type.dtype)], out=node.outputs[0].name, name=node.name)

    def _lower_add(self, node: Node) -> None:
        a, b = node.inputs
        self.em.op("Add", [self.operand(a), self.cast_operand(b, a.type.dtype)], out=node.outputs[0].name,
                   name=node.name)

    def _lower_concat(self, node: Node) -> None:
        self.em.op("Concat", [self.operand(v) for v in node.inputs], out=node.outputs[0].name, name=node.name,
                   axis=node.attrs["axis"])

    # -- whole-model ops ------------------------------------------------------------------------
    #
    # Activations [B, S, H] stay in the graph dtype; projections run as Gemm(transB=1) on the flattened
    # tokens [B*S, H] so weights stay in their stored [out, in] layout (a MatMul would need a transposed
    # copy of each). Shapes built at run time from Shape() use Reshape(allowzero=1), so an empty batch
    # is not misread as "copy this dim".

    def _lower_embedding(self, node: Node) -> None:
        ids, weight = node.inputs
        self.em.op("Gather", [self.operand(weight), self.operand(ids)], axis=0, out=node.outputs[0].name,
                   name=node.name)

    def _lower_rms_norm(self, node: Node) -> None:
        x, weight = node.inputs
        self._rms_norm(self.operand(x), weight, node.attrs["eps"], x.type.dtype, out=node.outputs[0].name,
                       name=node.name)

    def _rms_norm(self, x: str, weight: Value, eps: float, dt: ElemType, **out) -> str:
        """rms_norm_math: statistics in float32 (the reference's), the result rounded to dt, then * weight."""
        em = self.em
        xf = self.cast(x, dt, ElemType.FLOAT32)
        mean_sq = em.op("ReduceMean", [em.op("Mul", [xf, xf]), em.const([-1])], keepdims=1)
        inv = em.op("Reciprocal", [em.op("Sqrt", [em.op("Add", [mean_sq, em.const(eps, np.float32, "eps")])])])
        normed = self.cast(em.op("Mul", [xf, inv]), ElemType.FLOAT32, dt)
        return em.op("Mul", [self.cast_operand(weight, dt), normed], **out)

    def _project(self, tokens: str, w: Value, b: Value | None, dt: ElemType) -> str:
        """tokens [T, in] @ w[out, in]^T (+ b): [T, out]."""
        ins = [tokens, self.cast_operand(w, dt)] + ([self.cast_operand(b, dt)] if b is not None else [])
        return self.em.op("Gemm", ins, transB=1)

    def _split_heads(self, t: str, batch_seq: str, heads: int, dim: int) -> str:
        """[T, heads*dim] -> [B, heads, S, dim]."""
        em = self.em
        shape = em.op("Concat", [batch_seq, em.const([heads, dim])], axis=0)
        return em.op("Transpose", [em.op("Reshape", [t, shape], allowzero=1)], perm=[0, 2, 1, 3])

    def _rope_tables(self, x: str, dim: int, theta: float, dt: ElemType) -> tuple[str, str]:
        """cos, sin [S, dim/2] for positions 0..S-1 of x [B, S, .], as model_ops.rope_cos_sin computes them:
        the inverse frequencies in float32 at export (the same torch expression), positions from the run's S."""
        key = ("rope", dim, theta, dt)
        if key not in self.shared:
            em = self.em
            exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
            inv_freq = (1.0 / (theta ** exponent)).numpy()
            positions = em.op("Cast", [em.op("Range", [em.const(0), self._seq_len(x), em.const(1)])],
                              to=TensorProto.FLOAT)
            angles = em.op("Mul", [em.op("Unsqueeze", [positions, em.const([1])]),
                                   em.const(inv_freq, np.float32, "inv_freq")])
            cos = self.cast(em.op("Cos", [angles]), ElemType.FLOAT32, dt)
            sin = self.cast(em.op("Sin", [angles]), ElemType.FLOAT32, dt)
            self.shared[key] = (cos, sin)
        return self.shared[key]

    def _seq_len(self, x: str) -> str:
        """[] int64: S of x [B, S, .]."""
        return self.scalar(self.em.op("Shape", [x], start=1, end=2))

    def _rope(self, t: str, dim: int, tables: tuple[str, str], layout: RopeLayout) -> str:
        """apply_rope on the last axis (of size dim) of t [..., S, dim]."""
        em = self.em
        cos, sin = tables
        axis = em.const([-1])
        if layout == RopeLayout.HALF:
            half = dim // 2
            x1 = em.op("Slice", [t, em.const([0]), em.const([half]), axis])
            x2 = em.op("Slice", [t, em.const([half]), em.const([dim]), axis])
        else:  # even dims pair with the odd dim after them; written de-interleaved, as the reference
            x1 = em.op("Slice", [t, em.const([0]), em.const([dim]), axis, em.const([2])])
            x2 = em.op("Slice", [t, em.const([1]), em.const([dim]), axis, em.const([2])])
        first = em.op("Sub", [em.op("Mul", [x1, cos]), em.op("Mul", [x2, sin])])
        second = em.op("Add", [em.op("Mul", [x2, cos]), em.op("Mul", [x1, sin])])
        return em.op("Concat", [first, second], axis=-1)

    def _future_mask(self, x: str) -> str:
        """[S, S] bool, true where key position j > query position i (what causal attention hides)."""
        if "future" not in self.shared:
            em = self.em
            pos = em.op("Range", [em.const(0), self._seq_len(x), em.const(1)])
            self.shared["future"] = em.op("Greater", [em.op("Unsqueeze", [pos, em.const([0])]),
                                                      em.op("Unsqueeze", [pos, em.const([1])])])
        return self.shared["future"]

    def _causal_attention(self, x: str, q: str, k: str, v: str, heads: int, kv_heads: int, dv: int,
                          scale: float, dt: ElemType) -> str:
        """model_ops.causal_attention: q [B,h,S,d], k [B,hk,S,d], v [B,hk,S,dv] -> [B*S, h*dv]."""
        em = self.em
        rep = heads // kv_heads
        if rep > 1:
            # Query head i reads kv head i // rep: view the query heads as [B, hk, rep, S, d] and let MatMul
            # broadcast k/v [B, hk, 1, S, .] over rep, instead of materialising repeated k/v heads.
            shape = em.op("Concat", [em.op("Shape", [q], start=0, end=1), em.const([kv_heads, rep]),
                                     em.op("Shape", [q], start=2)], axis=0)
            q = em.op("Reshape", [q, shape], allowzero=1)
            k = em.op("Unsqueeze", [k, em.const([2])])
            v = em.op("Unsqueeze", [v, em.const([2])])
        perm = [0, 1, 2, 4, 3] if rep > 1 else [0, 1, 3, 2]
        scores = em.op("Mul", [em.op("MatMul", [q, em.op("Transpose", [k], perm=perm)]),
                               self.fconst(scale, dt, "scale")])
        scores = em.op("Where", [self._future_mask(x), self.fconst(-np.inf, dt, "neg_inf"), scores])
        # Softmax in float32 (the reference's compute type for f16/bf16 graphs), probabilities back in dt.
        probs = em.op("Softmax", [self.cast(scores, dt, ElemType.FLOAT32)], axis=-1)
        out = em.op("MatMul", [self.cast(probs, ElemType.FLOAT32, dt), v])   # [B, hk, (rep,) S, dv]
        if rep > 1:
            shape = em.op("Concat", [em.op("Shape", [out], start=0, end=1), em.const([heads]),
                                     em.op("Shape", [out], start=3)], axis=0)
            out = em.op("Reshape", [out, shape], allowzero=1)
        return em.op("Reshape", [em.op("Transpose", [out], perm=[0, 2, 1, 3]), em.const([-1, heads * dv])])

    def _output_projection(self, node: Node, o: str, batch_seq: str) -> None:
        """o [B*S, h*dv] @ w_o^T (+ b_o) -> the node's output [B, S, H]."""
        em = self.em
        dt = node.inputs[0].type.dtype
        y = self._project(o, node.input("w_o"), node.input("b_o"), dt)
        hidden = node.outputs[0].type.shape[2]
        shape = em.op("Concat", [batch_seq, em.const([hidden])], axis=0)
        em.op("Reshape", [y, shape], allowzero=1, out=node.outputs[0].name, name=node.name)

    def _lower_attention(self, node: Node) -> None:
        em, a = self.em, node.attrs
        x = node.inputs[0]
        dt = x.type.dtype
        heads, kv_heads, d = a["heads"], a["kv_heads"], a["head_dim"]
        norm, eps = a["qk_norm"], a["norm_eps"]
        xs = self.operand(x)
        tokens = em.op("Reshape", [xs, em.const([-1, x.type.shape[2]])])
        batch_seq = em.op("Shape", [xs], start=0, end=2)
        q, k, v = (self._project(tokens, node.input(f"w_{p}"), node.input(f"b_{p}"), dt) for p in "qkv")
        if norm == QKNorm.FULL:  # over the whole projection, before the split into heads (OLMoE)
            q = self._rms_norm(q, node.input("q_norm"), eps, dt)
            k = self._rms_norm(k, node.input("k_norm"), eps, dt)
        q = self._split_heads(q, batch_seq, heads, d)
        k = self._split_heads(k, batch_seq, kv_heads, d)
        v = self._split_heads(v, batch_seq, kv_heads, d)
        if norm == QKNorm.HEAD:  # over each head's head_dim (the last axis)
            q = self._rms_norm(q, node.input("q_norm"), eps, dt)
            k = self._rms_norm(k, node.input("k_norm"), eps, dt)
        tables = self._rope_tables(xs, d, a["rope_theta"], dt)
        q, k = (self._rope(t, d, tables, a["rope_layout"]) for t in (q, k))
        o = self._causal_attention(xs, q, k, v, heads, kv_heads, d, d ** -0.5, dt)
        self._output_projection(node, o, batch_seq)

    def _lower_mla_attention(self, node: Node) -> None:
        em, a = self.em, node.attrs
        x = node.inputs[0]
        dt = x.type.dtype
        n, eps = a["heads"], a["norm_eps"]
        nope, rope, dv, rank = a["qk_nope_head_dim"], a["qk_rope_head_dim"], a["v_head_dim"], a["kv_lora_rank"]
        xs = self.operand(x)
        tokens = em.op("Reshape", [xs, em.const([-1, x.type.shape[2]])])
        batch_seq = em.op("Shape", [xs], start=0, end=2)
        if node.input("w_q") is not None:
            q = self._project(tokens, node.input("w_q"), None, dt)
        else:  # low-rank query: q_b(rms_norm(q_a(x)))
            q_a = self._project(tokens, node.input("w_q_a"), node.input("b_q_a"), dt)
            q = self._project(self._rms_norm(q_a, node.input("q_a_norm"), eps, dt), node.input("w_q_b"), None, dt)
        q_nope, q_rot = em.op("Split", [self._split_heads(q, batch_seq, n, nope + rope), em.const([nope, rope])], 2,
                              axis=-1)
        # The compressed latent c_kv and the one rotary key every head shares.
        c_kv, k_rot = em.op("Split", [self._project(tokens, node.input("w_kv_a"), node.input("b_kv_a"), dt),
                                      em.const([rank, rope])], 2, axis=-1)
        kv = self._project(self._rms_norm(c_kv, node.input("kv_a_norm"), eps, dt), node.input("w_kv_b"), None, dt)
        k_nope, v = em.op("Split", [self._split_heads(kv, batch_seq, n, nope + dv), em.const([nope, dv])], 2, axis=-1)
        tables = self._rope_tables(xs, rope, a["rope_theta"], dt)
        q_rot = self._rope(q_rot, rope, tables, a["rope_layout"])
        k_rot = self._rope(self._split_heads(k_rot, batch_seq, 1, rope), rope, tables, a["rope_layout"])
        k_rot = em.op("Expand", [k_rot, em.op("Shape", [q_rot])])   # [B, 1, S, rope] -> [B, n, S, rope]
        q = em.op("Concat", [q_nope, q_rot], axis=-1)
        k = em.op("Concat", [k_nope, k_rot], axis=-1)
        o = self._causal_attention(xs, q, k, v, n, n, dv, (nope + rope) ** -0.5, dt)
        self._output_projection(node, o, batch_seq)

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


def _rows_per_token(combine: Node) -> int | None:
    """k when every token owns exactly k of the combined rows (token-choice dispatch), else None."""
    dispatch = combine.inputs[1].producer
    if dispatch is not None and dispatch.op == OpCode.DISPATCH:
        return int(dispatch.inputs[0].type.shape[1])
    return None


def _interleave_gate_up(t: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """[E, 2F, ...] gate rows then up rows (or the (gate, up) pair) -> rows g0, u0, g1, u1, ...
    (com.microsoft.MoE swiglu_fusion=1)."""
    axis = 1
    gate, up = t if isinstance(t, tuple) else t.chunk(2, dim=axis)
    return torch.stack([gate, up], dim=axis + 1).flatten(axis, axis + 1).contiguous()


def _dims(shape) -> list[int | str]:
    return [d if isinstance(d, int) else str(d) for d in shape]
