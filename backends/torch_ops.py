"""The one op table of the torch backends: OpCode -> how a node of the IR graph runs on the torch kernels.

Every torch-based lowering reads this table: the eager `GraphModule` (and through it torch.compile), AOTI's
`ExportableMoE`, the Triton backend for the ops it does not run as Triton kernels, and the generated
standalone `model.py`, which calls the same functions one line per node.

  `lower_node(node) -> OpCall`: the function to call and the node's attributes as plain values (strings,
  ints, floats, bools, torch dtypes), in the order the function takes them after the node's operands.
  Some ops also take run-time arguments, named in `OpCall.runtime` (RUNTIME_ARGS says what each means).

The functions below ("op functions") adapt a node's operands to the kernels of `torch_kernels`; where a
kernel already takes (operands..., attributes...) the table points at the kernel itself. Like the kernels
they depend on torch alone and call kernels by their bare names: the code generator copies them verbatim
into model.py beside the kernels they call.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from moe_ir.errors import BackendError
from moe_ir.ir import ElemType, Graph, LossKind, Node, OpCode, ValueKind
from moe_ir.spec import Activation
from .torch_kernels import (add_bias, attention, cached_attention, cached_mla_attention, cached_moa_attention,
                            combine, device_loss, dispatch, dispatch_capacity, embedding, expert_choice,
                            expert_loss, ffn, ffn_packed, grouped_ffn, grouped_ffn_packed, is_packed, layer_norm,
                            mla_attention, moa_attention, packed_linear, packed_weight, rms_norm, route_topk,
                            router_logits, router_noise, scale_weights, score, sequence_loss, sigmoid_gate,
                            sparsemixer_route, split_gate_up, switch_loss, unpacked, z_loss)

# ---------------------------------------------------------------------------------------------------
# op functions: a node's operands in the op's port order, then its attributes as plain values


def flatten_tokens(x):
    """x [B, S, H] -> tokens [B*S, H]."""
    return x.reshape(-1, x.shape[-1])


def restore_tokens(y, like):
    """y [B*S, H'] -> [B, S, H'] in the batch/sequence shape of `like`."""
    return y.view(like.shape[0], like.shape[1], y.shape[-1])


def linear(x, w, b, out_dtype):
    """x @ w.T (+ b) in out_dtype (float64 inputs stay float64); w may be a packed quantized weight (a head)."""
    if is_packed(w):
        return packed_linear(x.to(torch.float64 if x.dtype == torch.float64 else out_dtype), w, b)
    y = router_logits(x, w, out_dtype)
    return y if b is None else y + b.to(y.dtype)


def noisy_logits(logits, x, w_noise, std, training, generator):
    """The router noise of noisy top-k gating: only while training; in inference the logits pass through."""
    return router_noise(logits, x, w_noise, std, generator) if training else logits


def scale(x, factor):
    """x * factor (a model's multipliers)."""
    return x * factor


def topk_route(scores, bias, k, groups, kept, group_score):
    """(expert_idx [T, k], weights [T, k]); the selection bias (a float32 buffer) in the scores' dtype."""
    return route_topk(scores, None if bias is None else bias.to(scores.dtype), k, groups, kept, group_score)


def combine_rows(y, rows, row_weights, like):
    """The weighted un-permute back to the T tokens of `like`."""
    return combine(y, rows, row_weights, like.shape[0])


def expert_ffns(x, rows, group_sizes, w_up, w_down, w_gate, b_up, b_down, b_gate, row_scale, activation, layout,
                expert_kernel, packed_expert_kernel):
    """The grouped expert FFN of a node: gate/up of a fused layout split into views, then `expert_kernel`
    (grouped_ffn, or what a backend swaps in for it, with grouped_ffn's signature); quantized experts take
    `packed_expert_kernel` (grouped_ffn_packed or its swap). With row_scale (Llama 4: the routing weight scales
    each row's input) the rows are gathered and scaled once, then read in order."""
    if row_scale is not None:
        x = x.index_select(0, rows) * row_scale.to(x.dtype).unsqueeze(-1)
        rows = torch.arange(rows.shape[0], device=rows.device)
    if is_packed(w_up):  # quantized experts (never gate/up fused: the fusion leaves quantized weights alone)
        return packed_expert_kernel(x, rows, group_sizes, w_up, w_down, w_gate, b_up, b_down, b_gate, activation)
    w_up, w_gate, b_up, b_gate = split_gate_up(w_up, w_gate, b_up, b_gate, activation, layout)
    return expert_kernel(x, rows, group_sizes, w_up, w_down, w_gate, b_up, b_down, b_gate, activation)


def identity_expert_ffns(x, rows, group_sizes, w_up, w_down, w_gate, b_up, b_down, b_gate, row_scale, activation,
                         layout, identity, expert_kernel, packed_expert_kernel):
    """`expert_ffns` when `identity` groups follow the FFN experts' (LongCat-Flash's zero-computation experts):
    the kernel runs the FFN groups (the rows after them come back 0), then the identity rows take their
    tokens. No size is read on the host, so the graph stays traceable."""
    y = expert_ffns(x, rows, group_sizes[:w_up.shape[0]], w_up, w_down, w_gate, b_up, b_down, b_gate, row_scale,
                    activation, layout, expert_kernel, packed_expert_kernel)
    ends = torch.cumsum(group_sizes, 0)
    position = torch.arange(rows.shape[0], device=rows.device)
    passed = (position >= ends[w_up.shape[0] - 1]) & (position < ends[-1])
    return torch.where(passed.unsqueeze(-1), x.index_select(0, rows), y)


def combine_unweighted(y, rows, row_weights, like):
    """The un-permute as a plain sum: the weights were applied to the expert inputs."""
    return combine(y, rows, torch.ones_like(row_weights), like.shape[0])


def dense_ffn(x, w_up, w_down, w_gate, b_up, b_down, b_gate, activation, layout):
    """One FFN (a shared expert, several fused, or a dense layer's), gate/up of a fused layout split first."""
    if is_packed(w_up):
        return ffn_packed(x, w_up, w_down, w_gate, b_up, b_down, b_gate, activation)
    w_up, w_gate, b_up, b_gate = split_gate_up(w_up, w_gate, b_up, b_gate, activation, layout)
    return ffn(x, w_up, w_down, w_gate, b_up, b_down, b_gate, activation)


def add(a, b):
    return a + b


def concat(*parts, axis):
    """Weights concatenated by a fusion pass."""
    return torch.cat(parts, dim=axis)


def switch_balance_loss(scores, expert_idx, logits, like, alpha):
    return switch_loss(alpha, scores, expert_idx)


def expert_balance_loss(scores, expert_idx, logits, like, alpha, top_k):
    return expert_loss(alpha, scores, expert_idx, top_k)


def device_balance_loss(scores, expert_idx, logits, like, alpha, top_k, devices):
    return device_loss(alpha, scores, expert_idx, top_k, devices)


def sequence_balance_loss(scores, expert_idx, logits, like, alpha, top_k):
    """Sequence-wise loss: `like` is the layer input [B, S, H], whose S is the sequence length."""
    return sequence_loss(alpha, scores, expert_idx, top_k, like.shape[1])


def router_z_loss(scores, expert_idx, logits, like, alpha):
    return z_loss(alpha, logits)


def fused_moe(x, w_router, bias, w_up, w_down, w_gate, b_up, b_down, b_gate, score_fn, k, groups, kept, group_score,
              normalize, scale, capacity_factor, drop_rule, router_dtype, activation, layout, expert_kernel):
    """The whole routed path of a FUSED_MOE node: (out [T, H], expert_idx [T, k], weights [T, k])."""
    scores = score(router_logits(x, w_router, router_dtype), score_fn)
    expert_idx, weights = topk_route(scores, bias, k, groups, kept, group_score)
    weights = scale_weights(weights, normalize, scale)
    experts = w_up[0].shape[0] if is_packed(w_up) else w_up.shape[0]
    if capacity_factor is None:
        rows, row_weights, group_sizes = dispatch(expert_idx, weights, experts)
    else:
        rows, row_weights, group_sizes = dispatch_capacity(expert_idx, weights, experts, capacity_factor, drop_rule)
    y = expert_ffns(x, rows, group_sizes, w_up, w_down, w_gate, b_up, b_down, b_gate, None, activation, layout,
                    expert_kernel, grouped_ffn_packed)
    return combine(y, rows, row_weights, x.shape[0]), expert_idx, weights


# ---------------------------------------------------------------------------------------------------
# the table


# Run-time arguments an op function may take after its attributes, and what the caller passes:
RUNTIME_ARGS = {
    "training": "whether the module is training (router noise is training-only)",
    "generator": "the torch.Generator of the router noise (None: the global RNG)",
    "expert_kernel": "the grouped expert FFN kernel (torch_kernels.grouped_ffn unless a backend swaps it)",
    "packed_expert_kernel": "the grouped expert FFN kernel on quantized experts (torch_kernels.grouped_ffn_packed "
                            "unless a backend swaps it)",
    "int4_activations": "None: quantized weights compute exactly in float32; \"bf16\": int4 decode runs torch's "
                        "int4 matmul on bfloat16 activations (torch_kernels.packed_weight)",
}


@dataclass(frozen=True)
class OpCall:
    """One node as a call: fn(*operands, *attrs, *[runtime value of each name in `runtime`]).
    `attrs` are plain values (model.py writes them as literals); `keywords` are attrs passed by name;
    `unpack`: the operands that are quantized weights the function reads whole, passed through `unpacked`."""

    fn: Callable[..., Any]
    attrs: tuple = ()
    runtime: tuple[str, ...] = ()
    keywords: tuple[tuple[str, Any], ...] = ()
    unpack: tuple[int, ...] = ()

    def __call__(self, operands: list, runtime: Mapping[str, Any]) -> Any:
        if self.unpack:
            operands = [unpacked(v) if i in self.unpack else v for i, v in enumerate(operands)]
        extra = [runtime[name] for name in self.runtime] if self.runtime else ()
        if self.keywords:
            return self.fn(*operands, *self.attrs, *extra, **dict(self.keywords))
        return self.fn(*operands, *self.attrs, *extra)


def _plain(value: Any) -> Any:
    """An attribute as the kernels take it: enums by their string value (ElemType as a torch dtype)."""
    if isinstance(value, ElemType):
        return value.torch
    return getattr(value, "value", value)


def kernel_ffn_attrs(node: Node) -> tuple:
    """(activation, layout) as the kernels take them: clamped SwiGLU as ("clamped_swiglu", alpha, limit)."""
    a = node.attrs
    activation = _plain(a["activation"])
    if a["activation"] == Activation.CLAMPED_SWIGLU:
        activation = (activation, a["clamp_alpha"], a["clamp_limit"])
    return activation, _plain(a["weight_layout"])


_LOSSES = {
    LossKind.SWITCH: (switch_balance_loss, ()),
    LossKind.EXPERT: (expert_balance_loss, ("top_k",)),
    LossKind.DEVICE: (device_balance_loss, ("top_k", "devices")),
    LossKind.SEQUENCE: (sequence_balance_loss, ("top_k",)),
    LossKind.Z: (router_z_loss, ()),
}


def _balance_loss(node: Node) -> OpCall:
    fn, extra = _LOSSES[node.attrs["kind"]]
    return OpCall(fn, (node.attrs["alpha"], *(node.attrs[name] for name in extra)))


def _dispatch(node: Node) -> OpCall:
    a = node.attrs
    if a["capacity_factor"] is None:
        return OpCall(dispatch, (a["num_experts"],))
    return OpCall(dispatch_capacity, (a["num_experts"], a["capacity_factor"], _plain(a["drop_rule"])))


def _fused_moe(node: Node) -> OpCall:
    a = node.attrs
    attrs = (_plain(a["score"]), a["k"], a["groups"], a["kept"], _plain(a["group_score"]), a["normalize"],
             a["scale"], a["capacity_factor"], _plain(a["drop_rule"]), _plain(a["router_dtype"]),
             *kernel_ffn_attrs(node))
    return OpCall(fused_moe, attrs, ("expert_kernel",))


def rope_descriptor(attrs) -> tuple:
    """The kernels' RoPE argument (torch_kernels.rope_inverse_frequencies): (theta, layout, rotary_dim, yarn,
    attention_factor, llama3, longrope), yarn = (factor, original_max_positions, beta_fast, beta_slow, truncate) or
    None, llama3 = (factor, original_max_positions, low_freq_factor, high_freq_factor) or None, longrope =
    (short_factors, long_factors, original_max_positions, short_mscale, long_mscale) or None."""
    yarn = llama3 = None
    if attrs["yarn_factor"] is not None:
        yarn = (attrs["yarn_factor"], attrs["yarn_original_max_positions"], attrs["yarn_beta_fast"],
                attrs["yarn_beta_slow"], attrs["yarn_truncate"])
    if attrs["llama3_factor"] is not None:
        llama3 = (attrs["llama3_factor"], attrs["llama3_original_max_positions"], attrs["llama3_low_freq_factor"],
                  attrs["llama3_high_freq_factor"])
    longrope = None
    if attrs["longrope_short_factors"] is not None:
        longrope = (tuple(attrs["longrope_short_factors"]), tuple(attrs["longrope_long_factors"]),
                    attrs["longrope_original_max_positions"], attrs["longrope_short_mscale"],
                    attrs["longrope_long_mscale"])
    return (attrs["rope_theta"], _plain(attrs["rope_layout"]), attrs["rotary_dim"], yarn,
            attrs["rope_attention_factor"], llama3, longrope)


def _softmax_scale(attrs, qk_head_dim: int) -> float:
    return attrs["softmax_scale"] if attrs["softmax_scale"] is not None else qk_head_dim ** -0.5


def _attention(node: Node) -> OpCall:
    a = node.attrs
    temperature = None if a["temperature_floor_scale"] is None else (a["temperature_floor_scale"],
                                                                     a["temperature_scale"])
    return OpCall(attention, (a["heads"], a["kv_heads"], a["head_dim"], _plain(a["qk_norm"]), rope_descriptor(a),
                              a["norm_eps"], _softmax_scale(a, a["head_dim"]), a["sliding_window"], a["clip_qkv"],
                              a["chunk_size"], temperature))


def _mla_attrs(a) -> tuple:
    """The MLA kernels' attributes before the decode form's cache layout (the latent scales last)."""
    return (a["heads"], a["kv_lora_rank"], a["qk_nope_head_dim"], a["qk_rope_head_dim"], a["v_head_dim"],
            rope_descriptor(a), a["norm_eps"], _softmax_scale(a, a["qk_nope_head_dim"] + a["qk_rope_head_dim"]))


def _latent_scales(a) -> tuple:
    """(q, kv) latent scales as one more argument where they are set (LongCat-Flash), else none, so the calls
    (and generated sources) of other MLA models stay as they were."""
    scales = (a["q_latent_scale"], a["kv_latent_scale"])
    return () if scales == (1.0, 1.0) else (scales,)


def _mla_attention(node: Node) -> OpCall:
    return OpCall(mla_attention, _mla_attrs(node.attrs) + _latent_scales(node.attrs))


def _cached_mla_attention(node: Node) -> OpCall:
    a = node.attrs
    return OpCall(cached_mla_attention, _mla_attrs(a) + (_plain(a["cache_layout"]),) + _latent_scales(a))


def _moa_attention(node: Node) -> OpCall:
    a = node.attrs
    attrs = (a["kv_heads"], a["head_dim"], rope_descriptor(a), _softmax_scale(a, a["head_dim"]))
    return OpCall(cached_moa_attention if node.op == OpCode.CACHED_MOA_ATTENTION else moa_attention, attrs)


TORCH_OPS: dict[OpCode, Callable[[Node], OpCall]] = {
    OpCode.FLATTEN_TOKENS: lambda n: OpCall(flatten_tokens),
    OpCode.RESTORE_TOKENS: lambda n: OpCall(restore_tokens),
    OpCode.LINEAR: lambda n: OpCall(linear, (_plain(n.attrs["out_dtype"]),)),
    OpCode.ROUTER_NOISE: lambda n: OpCall(noisy_logits, (n.attrs["std"],), ("training", "generator")),
    OpCode.SCORE: lambda n: OpCall(score, (_plain(n.attrs["fn"]),)),
    OpCode.TOPK_ROUTE: lambda n: OpCall(topk_route, (n.attrs["k"], n.attrs["groups"], n.attrs["kept"],
                                                     _plain(n.attrs["group_score"]))),
    OpCode.SPARSEMIXER_ROUTE: lambda n: OpCall(sparsemixer_route, (n.attrs["k"], n.attrs["eps"])),
    OpCode.SCALE_WEIGHTS: lambda n: OpCall(scale_weights, (n.attrs["normalize"], n.attrs["scale"])),
    OpCode.DISPATCH: _dispatch,
    OpCode.EXPERT_CHOICE_ROUTE: lambda n: OpCall(expert_choice, (n.attrs["capacity_factor"], n.attrs["top_k"])),
    OpCode.GROUPED_FFN: lambda n: (OpCall(identity_expert_ffns, kernel_ffn_attrs(n) + (n.attrs["identity_experts"],),
                                          ("expert_kernel", "packed_expert_kernel")) if n.attrs["identity_experts"] else
                                   OpCall(expert_ffns, kernel_ffn_attrs(n), ("expert_kernel", "packed_expert_kernel"))),
    OpCode.COMBINE: lambda n: OpCall(combine_rows if n.attrs["weighted"] else combine_unweighted),
    OpCode.FFN: lambda n: OpCall(dense_ffn, kernel_ffn_attrs(n)),
    OpCode.SIGMOID_GATE: lambda n: OpCall(sigmoid_gate),
    OpCode.ADD: lambda n: OpCall(add),
    OpCode.CONCAT: lambda n: OpCall(concat, keywords=(("axis", n.attrs["axis"]),)),
    OpCode.BALANCE_LOSS: _balance_loss,
    OpCode.FUSED_MOE: _fused_moe,
    OpCode.EMBEDDING: lambda n: OpCall(embedding),
    OpCode.RMS_NORM: lambda n: OpCall(rms_norm, (n.attrs["eps"],)),
    OpCode.LAYER_NORM: lambda n: OpCall(layer_norm, (n.attrs["eps"],)),
    OpCode.SCALE: lambda n: OpCall(scale, (n.attrs["factor"],)),
    OpCode.ATTENTION: _attention,
    OpCode.MOA_ATTENTION: _moa_attention,
    OpCode.CACHED_MOA_ATTENTION: _moa_attention,
    OpCode.ADD_BIAS: lambda n: OpCall(add_bias),
    OpCode.MLA_ATTENTION: _mla_attention,
    # decode form: the same attributes, the cache operands before the weights; MLA adds its cache layout
    OpCode.CACHED_ATTENTION: lambda n: OpCall(cached_attention, _attention(n).attrs),
    OpCode.CACHED_MLA_ATTENTION: _cached_mla_attention,
    OpCode.DEQUANTIZE: lambda n: OpCall(packed_weight, (_plain(n.attrs["format"]), n.attrs["block"]),
                                        ("int4_activations",)),
}

# Ops whose functions take a packed quantized weight (moe_ir.quantization) where they take a weight; any
# other op reading a DEQUANTIZE output gets it dequantized whole (`OpCall.unpack`).
TAKES_PACKED = frozenset({OpCode.LINEAR, OpCode.FFN, OpCode.GROUPED_FFN, OpCode.FUSED_MOE})

# The run-time arguments of an inference run (what AOTI exports, what the Triton backend folds with).
INFERENCE_RUNTIME: Mapping[str, Any] = {"training": False, "generator": None, "expert_kernel": grouped_ffn,
                                         "packed_expert_kernel": grouped_ffn_packed, "int4_activations": None}


def unsupported_ops(graph: Graph, table: Mapping[OpCode, Any] = TORCH_OPS) -> list[str]:
    return sorted({n.op.value for n in graph.nodes if n.op not in table})


def lower_node(node: Node) -> OpCall:
    rule = TORCH_OPS.get(node.op)
    if rule is None:
        raise BackendError(f"node '{node.name}': the torch backends have no implementation of op {node.op.value}")
    call = rule(node)
    if node.op not in TAKES_PACKED:
        unpack = tuple(i for i, v in enumerate(node.inputs)
                       if v is not None and v.producer is not None and v.producer.op == OpCode.DEQUANTIZE)
        if unpack:
            return dataclasses.replace(call, unpack=unpack)
    return call


def node_results(node: Node, result: Any) -> tuple:
    """An op function's result as one value per node output (single-output functions return the tensor)."""
    return (result,) if len(node.outputs) == 1 else tuple(result)


# ---------------------------------------------------------------------------------------------------
# weight folding: nodes that read only weights (CONCAT/ADD made by the fusion passes)


def weight_only_nodes(graph: Graph) -> list[Node]:
    """Nodes whose operands are all weights or outputs of such nodes, in graph order: their results do not
    depend on the input, so a backend may compute them once (fold them) instead of on every call."""
    constant = {name for name, value in graph.weights.items() if value.kind in (ValueKind.PARAM, ValueKind.BUFFER)}
    found = []
    for node in graph.nodes:
        operands = [v for v in node.inputs if v is not None]
        if operands and all(v.name in constant for v in operands):
            found.append(node)
            constant.update(v.name for v in node.outputs)
    return found


def fold_weights(graph: Graph, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The outputs of every weight-only node, computed once (no autograd) with the op table, by value name."""
    env: dict[str, Any] = dict(weights)
    folded: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for node in weight_only_nodes(graph):
            call = lower_node(node)
            results = node_results(node, call([None if v is None else env[v.name] for v in node.inputs],
                                              INFERENCE_RUNTIME))
            for value, result in zip(node.outputs, results):
                env[value.name] = folded[value.name] = result
    return folded
