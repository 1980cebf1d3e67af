"""What the ONNX lowering can export, with the reason when it cannot.

The checks every flavour shares live here as functions; each lowering class (flavours.py) composes them in
its `refusal` and adds its own, so a flavour's support is stated next to the code that lowers it.
"""
from __future__ import annotations

from moe_ir.errors import BackendError
from moe_ir.ir import ElemType, Graph, Node, OpCode, Value, WeightLayout
from moe_ir.model_builder import DECODE_INPUTS
from moe_ir.passes import unfused_moe_reason
from moe_ir.spec import Activation
from . import plugin_op

EXPORT_DTYPES = (ElemType.FLOAT32, ElemType.FLOAT16, ElemType.BFLOAT16)


def stored_values(graph: Graph) -> list[Value]:
    """The values whose type is the export's precision: weights and the activation inputs (a model's
    int64 token ids, and a decode graph's int64 attention mask and positions, say nothing about it)."""
    ids = {node.inputs[0].name for node in graph.find(OpCode.EMBEDDING)} | set(DECODE_INPUTS)
    return [v for v in graph.inputs if v.name not in ids] + list(graph.weights.values())


def dtype_refusal(value: Value) -> str:
    if value.type.dtype not in EXPORT_DTYPES:
        return f"the onnx backend exports f32, f16 and bf16 graphs ({value.name} is {value.type.dtype.value})"
    return ""


def node_refusal(node: Node) -> str:
    """Ops no flavour lowers as they are."""
    if node.op == OpCode.BALANCE_LOSS:
        return "balance losses are training outputs; the onnx backend exports inference graphs"
    if node.op == OpCode.FUSED_MOE:
        return f"node {node.name}: fused_moe lowers only in the plugin flavour"
    return ""


def model_graph_refusal() -> str:
    return (f"whole models export in the portable and ort flavours only: the plugin flavour's contract "
            f"is one {plugin_op.PLUGIN_NAME} node per file, and a model has one per MoE layer")


# -- com.microsoft.MoE (ort flavour) ----------------------------------------------------------------


def ort_dtype_refusal(value: Value) -> str:
    if value.type.dtype != ElemType.FLOAT32:
        return (f"the ort flavour exports float32 graphs only ({value.name} is {value.type.dtype.value}); "
                f"the portable and plugin flavours export f16 and bf16")
    return ""


def ort_refusal(graph: Graph) -> str:
    """Why com.microsoft.MoE cannot take the routed path of this graph ('' when it can)."""
    if graph.find(OpCode.EXPERT_CHOICE_ROUTE):
        return "com.microsoft.MoE routes tokens to experts; expert-choice routing does not fit it"
    for combine in graph.find(OpCode.COMBINE):
        try:
            disp, ffn = moe_chain(graph, combine)
        except BackendError as err:
            return str(err)
        if ffn.input("row_scale") is not None:
            return ("com.microsoft.MoE weighs the expert outputs; routing weights on the expert inputs "
                    "(router.scale_input, Llama 4) do not fit it")
        if disp.attrs["capacity_factor"] is not None:
            return f"com.microsoft.MoE is dropless; capacity factor {disp.attrs['capacity_factor']} is not supported"
        act = ffn.attrs["activation"]
        if act == Activation.GEGLU:
            return "com.microsoft.MoE implements GEGLU on CUDA only (the CPU kernel has SwiGLU)"
        if act == Activation.GELU:
            return ("com.microsoft.MoE's CPU gelu is an approximation (max error ~2e-4 against the erf "
                    "GELU of the spec), beyond the float32 tolerance")
        quantized = ffn.inputs[3].producer is not None and ffn.inputs[3].producer.op == OpCode.DEQUANTIZE
        if act.gated and ffn.attrs["weight_layout"] != WeightLayout.GATE_UP_FUSED and not quantized:
            return "com.microsoft.MoE takes gate/up fused weights; run fuse-gate-up before lowering"
    return ""


def moe_chain(graph: Graph, combine: Node) -> tuple[Node, Node]:
    """(dispatch, grouped_ffn) feeding `combine`, when nothing else reads the dispatched rows."""
    ffn, disp = combine.inputs[0].producer, combine.inputs[1].producer
    if ffn is None or ffn.op != OpCode.GROUPED_FFN or disp is None or disp.op != OpCode.DISPATCH:
        raise BackendError(f"node {combine.name}: com.microsoft.MoE needs dispatch -> grouped_ffn -> combine")
    for v in (*disp.outputs, ffn.outputs[0]):
        if graph.is_graph_output(v) or any(u is not ffn and u is not combine for u in graph.users(v)):
            raise BackendError(f"node {combine.name}: {v.name} is used outside the routed path, which "
                               f"com.microsoft.MoE hides")
    return disp, ffn


# -- moe_ir::FusedMoE (plugin flavour) --------------------------------------------------------------


def plugin_refusal(graph: Graph) -> str:
    """Why the routed path of this graph is not one node of the plugin contract ('' when it is)."""
    fused = graph.find(OpCode.FUSED_MOE)
    if len(fused) != 1:
        return f"the plugin flavour needs the routed path as one fused_moe node ({unfused_moe_reason(graph)})"
    ok, reason = plugin_op.plugin_supports(fused[0])
    if not ok:
        return reason
    for port in ("w_router", "bias"):
        v = fused[0].input(port)
        if v is not None and v.type.dtype != ElemType.FLOAT32:
            return (f"{plugin_op.PLUGIN_NAME} takes {port} in float32 ({v.name} is {v.type.dtype.value}; "
                    f"spec router.dtype must be float32)")
    return ""
