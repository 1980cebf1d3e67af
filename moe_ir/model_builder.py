"""ModelSpec -> IR graph of the whole decoder, in prefill form (input_ids i64[B, S] in, logits [B, S, V] out) or in
decode form (the same with a KV cache; see "Decode form" below).

    x = embed(input_ids)
    for each layer i:  x = x + attn_i(rms_norm(x));  x = x + ffn_i(rms_norm(x))     (ffn_i: dense or MoE)
    logits = lm_head(rms_norm(x))

Attention is causal over positions 0..S-1; B and S stay symbolic. MoE layers are built by the layer
builder (`builder.add_moe_layer`) with the prefix `layers.{i}.moe.`, so their weights keep the layer's
canonical names under it. Weight names:

  embed.weight [V, H]                       norm.weight [H]             lm_head.weight [V, H] (untied only)
  layers.{i}.attn_norm.weight [H]           layers.{i}.ffn_norm.weight [H]
  norm.bias, layers.{i}.attn_norm.bias, layers.{i}.ffn_norm.bias [H]   (LayerNorm models: model.norm = layer)
  lm_head.bias [V]                          (model.lm_head_bias)
  layers.{i}.attn.w_q / w_k / w_v [out, H], w_o [H, heads*head_dim], b_q / b_k / b_v / b_o,
                 q_norm.weight / k_norm.weight, sinks [heads]                             (mha, gqa)
  layers.{i}.attn.w_q | (w_q_a, q_a_norm.weight, w_q_b), w_kv_a, kv_a_norm.weight, w_kv_b, w_o,
                 b_q_a / b_kv_a / b_o                                                     (mla)
  layers.{i}.attn.router.weight [E, H], w_q [E, kv*d, H], w_k / w_v [kv*d, H], w_o [E, H, kv*d], b_o [H]
                 (moa: E attention experts, their router's record feeds the moa_attention node)
  layers.{i}.ffn.w_up / w_down / w_gate [F, H] / [H, F] / [F, H]                          (dense layers)
  layers.{i}.moe.router.weight, layers.{i}.moe.experts.w_up, ... (see builder.py)        (MoE layers)

LongCat-Flash's layers (model.layer_form dual_shortcut_moe) hold sublayers j = 0, 1 with their own weights:
  layers.{i}.attn_norm.{j}.weight, layers.{i}.attn.{j}.<attention weights above>, layers.{i}.ffn_norm.{j}.weight,
  layers.{i}.ffn.{j}.w_up / w_down / w_gate, and the one MoE block layers.{i}.moe.* (model_spec.LayerForm has
  the dataflow); attention j of layer i keeps its cache as past_key_values.{2i+j} (transformers' cache index).

Matrices are in PyTorch Linear layout [out, in], as in the transformers checkpoints.
Outputs: `logits`; with `routing=True` also `layers.{i}.expert_idx` / `layers.{i}.weights` of every
token-choice MoE layer, and `layers.{i}.attn.expert_idx` / `.weights` of a mixture of attention heads (what
validation compares for routing flips). With `training=True` every MoE layer
adds all of its training outputs under `layers.{i}.` (the names `builder.build_graph` gives a layer):
`expert_idx`, `weights` (or `rows` for expert-choice), `router_logits`, `tokens_per_expert`, `loss.<kind>`,
`aux_loss`; training implies the routing record, since the balance losses are computed from it.

Decode form (`form=GraphForm.DECODE`; generation): the names and layouts follow ONNX Runtime GenAI.
  inputs   input_ids i64[B, S]            the S new tokens of each sequence
           attention_mask i64[B, P+S]     1 = a real token, 0 = padding, over the cached and the new tokens
                                          (left-padded batches of different prompt lengths)
           position_ids i64[B, S]         RoPE position of each new token (cumsum(mask) - 1 for left padding)
           past_key_values.{i}.key / .value   layer i's cache of P tokens (names below for MLA's latent layout)
  outputs  logits [B, S, V];  present.{i}.key / .value: the cache after the new tokens (P+S along dim 2)
B, S and P are symbolic ("B", "S", "P"; the total length is the dim "P+S"). Prefill is a call with P = 0
(empty past tensors), so one graph serves both phases. Cache layout of layer i (model_ops.py has the details):
  mha / gqa          .key / .value [B, kv_heads, P, head_dim]
  mla, expanded      .key [B, heads, P, qk_nope + qk_rope], .value [B, heads, P, v_head_dim]   (transformers)
  mla, latent        .c_kv [B, 1, P, kv_lora_rank], .k_rope [B, 1, P, qk_rope_head_dim]          (DeepSeek)
`cache_entries(graph)` lists them from the graph; consumers read that, not these rules.
"""
from __future__ import annotations


import enum
import math
from dataclasses import dataclass

from .builder import add_moe_layer, router_logits, topk_routing
from .errors import IRError
from .ir import ElemType, Graph, GraphKind, OpCode, TensorType, Value
from .ir.model_ops import MLACacheLayout, mla_cache_dims
from .model_spec import (AttentionKind, LayerForm, ModelSpec, NormKind, NormPosition, QKNorm, RopeScalingKind,
                         model_spec_to_dict)
from .spec import ScoreFn, canonical_spec_hash

__all__ = ["CacheEntry", "DECODE_INPUTS", "GraphForm", "MLACacheLayout", "build_model_graph", "cache_entries",
           "decode_contract_problem", "is_decode_graph", "layer_prefix", "model_spec_hash"]


class GraphForm(enum.StrEnum):
    PREFILL = "prefill"  # input_ids -> logits
    DECODE = "decode"    # input_ids, attention_mask, position_ids, past cache -> logits, present cache


# The decode form's activation inputs, before the cache inputs (in this order).
DECODE_INPUTS = ("input_ids", "attention_mask", "position_ids")
# Graph names of a layer's cache: (key slot, value slot) per layout.
_CACHE_NAMES = {None: ("key", "value"), MLACacheLayout.EXPANDED: ("key", "value"),
                MLACacheLayout.LATENT: ("c_kv", "k_rope")}
_CACHED_OPS = (OpCode.CACHED_ATTENTION, OpCode.CACHED_MLA_ATTENTION, OpCode.CACHED_MOA_ATTENTION)


MLA_LATENT_NORM_EPS = 1e-6


def model_spec_hash(spec: ModelSpec) -> str:
    """The model's spec hash (spec.canonical_spec_hash: names and source notes do not count)."""
    return canonical_spec_hash(model_spec_to_dict(spec))


def layer_prefix(i: int) -> str:
    return f"layers.{i}."


@dataclass(frozen=True)
class _DecodeInputs:
    """What a decode-form attention node reads besides x and its weights, and where its present cache goes."""
    position_ids: Value
    attention_mask: Value
    mla_cache: MLACacheLayout
    present: dict[str, Value]  # graph output name -> value, set as outputs after the logits


def _cache_inputs(g: Graph, layer: int, attrs: dict, decode: _DecodeInputs, dtype: ElemType,
                  layout: MLACacheLayout | None) -> list[Value]:
    """[position_ids, attention_mask, past key slot, past value slot] of layer `layer`."""
    if layout is None:
        key = value = (attrs["kv_heads"], attrs["head_dim"])
    else:
        key, value = mla_cache_dims(attrs, layout)
    names = _CACHE_NAMES[layout]
    past = [g.add_input(f"past_key_values.{layer}.{name}", TensorType(("B", heads, "P", dim), dtype))
            for name, (heads, dim) in zip(names, (key, value))]
    return [decode.position_ids, decode.attention_mask, *past]


def _attention(g: Graph, spec: ModelSpec, x: Value, p: str, dtype: ElemType, layer: int,
               decode: _DecodeInputs | None) -> Value:
    """The layer's attention output; in decode form its present cache also becomes a graph output."""
    m = spec.model
    a, h = m.attention, m.hidden

    def weight(name: str, *shape: int) -> Value:
        return g.add_weight(f"{p}{name}", TensorType(shape, dtype))

    rope = {"rope_theta": a.rope_theta, "rope_layout": a.layout, "norm_eps": m.rms_norm_eps,
            "rotary_dim": a.rotary_dim if a.kind != AttentionKind.MLA else None}
    scaling = a.rope_scaling
    if scaling is not None and scaling.kind == RopeScalingKind.LONGROPE:
        rope.update(longrope_short_factors=tuple(scaling.short_factor),
                    longrope_long_factors=tuple(scaling.long_factor),
                    longrope_original_max_positions=scaling.original_max_positions,
                    longrope_short_mscale=scaling.short_mscale, longrope_long_mscale=scaling.long_mscale)
    elif scaling is not None and scaling.kind == RopeScalingKind.LLAMA3:
        rope.update(llama3_factor=scaling.factor, llama3_original_max_positions=scaling.original_max_positions,
                    llama3_low_freq_factor=scaling.low_freq_factor, llama3_high_freq_factor=scaling.high_freq_factor)
    elif scaling is not None:
        rope.update(yarn_factor=scaling.factor, yarn_original_max_positions=scaling.original_max_positions,
                    yarn_beta_fast=scaling.beta_fast, yarn_beta_slow=scaling.beta_slow,
                    yarn_truncate=scaling.truncate, rope_attention_factor=scaling.cos_sin_factor,
                    softmax_scale=scaling.softmax_scale(a.qk_head_dim(h)) if scaling.softmax_mscale else None)
    if a.softmax_scale is not None:
        rope["softmax_scale"] = a.softmax_scale
    if a.kind == AttentionKind.MOA:
        return _moa_attention(g, spec, x, p, dtype, layer, decode, rope)
    if a.kind == AttentionKind.MLA:
        n, dqk = a.heads, a.qk_nope_head_dim + a.qk_rope_head_dim
        if a.q_lora_rank is None:
            q = [weight("w_q", n * dqk, h), None, None, None]
        else:
            q = [None, weight("w_q_a", a.q_lora_rank, h), weight("q_a_norm.weight", a.q_lora_rank),
                 weight("w_q_b", n * dqk, a.q_lora_rank)]
        kv = [weight("w_kv_a", a.kv_lora_rank + a.qk_rope_head_dim, h), weight("kv_a_norm.weight", a.kv_lora_rank),
              weight("w_kv_b", n * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank)]
        w_o = weight("w_o", h, n * a.v_head_dim)
        b_q_a = weight("b_q_a", a.q_lora_rank) if a.qkv_bias and a.q_lora_rank is not None else None
        b_kv_a = weight("b_kv_a", a.kv_lora_rank + a.qk_rope_head_dim) if a.qkv_bias else None
        b_o = weight("b_o", h) if a.out_bias else None
        # DeepSeek's code (remote and transformers) builds the q_a / kv_a latent norms with the RMSNorm
        # default eps 1e-6 whatever rms_norm_eps says; released configs have rms_norm_eps 1e-6 anyway.
        attrs = {"heads": n, "kv_lora_rank": a.kv_lora_rank, "qk_nope_head_dim": a.qk_nope_head_dim,
                 "qk_rope_head_dim": a.qk_rope_head_dim, "v_head_dim": a.v_head_dim, **rope,
                 "norm_eps": MLA_LATENT_NORM_EPS}
        if a.latent_scales:  # LongCat-Flash: sqrt(hidden / rank) on the query and on the normalised kv latent
            attrs.update(q_latent_scale=math.sqrt(h / a.q_lora_rank), kv_latent_scale=math.sqrt(h / a.kv_lora_rank))
        weights = [*q, *kv, w_o, b_q_a, b_kv_a, b_o]
        if decode is None:
            return g.add_node(OpCode.MLA_ATTENTION, [x, *weights], attrs, name=p.rstrip(".")).outputs[0]
        attrs["cache_layout"] = decode.mla_cache
        cache = _cache_inputs(g, layer, attrs, decode, dtype, decode.mla_cache)
        node = g.add_node(OpCode.CACHED_MLA_ATTENTION, [x, *cache, *weights], attrs, name=p.rstrip("."))
        return _present_outputs(node, layer, decode, decode.mla_cache)
    d, nq, nkv = a.dim(h), a.heads, a.num_kv_heads
    if a.sliding_window is not None:
        sliding = a.sliding_layers is None or layer in a.sliding_layers
        rope["sliding_window"] = a.sliding_window if sliding else None
    if not a.applies_rope(layer):
        rope["rotary_dim"] = 0  # no positional encoding in this layer
        if a.temperature is not None:
            rope.update(temperature_floor_scale=a.temperature.floor_scale, temperature_scale=a.temperature.scale)
    if a.chunk_size is not None:
        rope["chunk_size"] = a.layer_chunk(layer)
    qk_norm = a.qk_norm
    if qk_norm == QKNorm.WEIGHTLESS_AFTER_ROPE and not a.applies_rope(layer):
        qk_norm = QKNorm.NONE  # Llama 4 normalises q/k in its RoPE layers only
    w = [weight("w_q", nq * d, h), weight("w_k", nkv * d, h), weight("w_v", nkv * d, h), weight("w_o", h, nq * d)]
    biases = [weight(f"b_{k}", size) if a.qkv_bias else None for k, size in (("q", nq * d), ("k", nkv * d), ("v", nkv * d))]
    biases.append(weight("b_o", h) if a.out_bias else None)
    norms = [None, None]
    if a.qk_norm in (QKNorm.HEAD, QKNorm.HEAD_AFTER_ROPE):
        norms = [weight("q_norm.weight", d), weight("k_norm.weight", d)]
    elif a.qk_norm == QKNorm.FULL:
        norms = [weight("q_norm.weight", nq * d), weight("k_norm.weight", nkv * d)]
    sinks = weight("sinks", nq) if a.sinks else None
    attrs = {"heads": nq, "kv_heads": nkv, "head_dim": d, "qk_norm": qk_norm, "clip_qkv": a.clip_qkv, **rope}
    if decode is None:
        return g.add_node(OpCode.ATTENTION, [x, *w, *biases, *norms, sinks], attrs, name=p.rstrip(".")).outputs[0]
    cache = _cache_inputs(g, layer, attrs, decode, dtype, None)
    node = g.add_node(OpCode.CACHED_ATTENTION, [x, *cache, *w, *biases, *norms, sinks], attrs, name=p.rstrip("."))
    return _present_outputs(node, layer, decode, None)


def _moa_attention(g: Graph, spec: ModelSpec, x: Value, p: str, dtype: ElemType, layer: int,
                   decode: _DecodeInputs | None, rope: dict) -> Value:
    """Mixture of attention heads (JetMoE): the router is the MoE layer's softmax top-k routing with the top-k
    weights renormalised (JetMoE's softmax over the top-k logits), its record feeds the attention node."""
    a, h = spec.model.attention, spec.model.hidden
    d, kv = a.dim(h), a.num_kv_heads

    def weight(name: str, *shape: int) -> Value:
        return g.add_weight(f"{p}{name}", TensorType(shape, dtype))

    tokens = g.add_node(OpCode.FLATTEN_TOKENS, [x], name=f"{p}tokens").outputs[0]
    logits = router_logits(g, tokens, weight("router.weight", a.experts, h), None, ElemType.FLOAT32, p)
    scores = g.add_node(OpCode.SCORE, [logits], {"fn": ScoreFn.SOFTMAX}, name=f"{p}scores").outputs[0]
    expert_idx, weights = topk_routing(g, scores, None, a.top_k, {}, True, 1.0, p)
    w = [weight("w_q", a.experts, kv * d, h), weight("w_k", kv * d, h), weight("w_v", kv * d, h),
         weight("w_o", a.experts, h, kv * d), weight("b_o", h) if a.out_bias else None]
    attrs = {"kv_heads": kv, "head_dim": d, **{k: v for k, v in rope.items() if k != "norm_eps"}}
    routing = [expert_idx, weights]
    if decode is None:
        return g.add_node(OpCode.MOA_ATTENTION, [x, *routing, *w], attrs, name=p.rstrip(".")).outputs[0]
    cache = _cache_inputs(g, layer, {"kv_heads": kv, "head_dim": d}, decode, dtype, None)
    node = g.add_node(OpCode.CACHED_MOA_ATTENTION, [x, *cache, *routing, *w], attrs, name=p.rstrip("."))
    return _present_outputs(node, layer, decode, None)


def _present_outputs(node, layer: int, decode: _DecodeInputs, layout: MLACacheLayout | None) -> Value:
    """Records the node's present cache under its graph output names; returns its attention output."""
    key, value = _CACHE_NAMES[layout]
    decode.present[f"present.{layer}.{key}"] = node.output("present_key")
    decode.present[f"present.{layer}.{value}"] = node.output("present_value")
    return node.output("y")


def _norm(g: Graph, spec: ModelSpec, x: Value, name: str, dtype: ElemType, eps: float | None = None) -> Value:
    """The decoder norm `name` of x: RMSNorm (`name.weight`) or LayerNorm (`name.weight`, and `name.bias` unless
    layer_no_bias); eps: rms_norm_eps unless given."""
    m = spec.model
    eps = m.rms_norm_eps if eps is None else eps
    weight = g.add_weight(f"{name}.weight", TensorType((m.hidden,), dtype))
    if m.norm in (NormKind.LAYER, NormKind.LAYER_NO_BIAS):
        bias = g.add_weight(f"{name}.bias", TensorType((m.hidden,), dtype)) if m.norm == NormKind.LAYER else None
        return g.add_node(OpCode.LAYER_NORM, [x, weight, bias], {"eps": eps}, name=name).outputs[0]
    return g.add_node(OpCode.RMS_NORM, [x, weight], {"eps": eps}, name=name).outputs[0]


def _shortcut_moe_layer(g: Graph, spec: ModelSpec, x: Value, i: int, dtype: ElemType, decode: _DecodeInputs | None,
                        training: bool, routing_outputs: dict[str, Value]) -> Value:
    """Layer i in LongCat-Flash's form (model_spec.LayerForm.DUAL_SHORTCUT_MOE): two attention + dense FFN
    sublayers; the MoE block reads the first FFN's normalised input and its output joins after the second FFN.
    Attention j keeps cache 2i + j."""
    p = layer_prefix(i)
    shortcut = None
    for j in range(2):
        h = _norm(g, spec, x, f"{p}attn_norm.{j}", dtype)
        a = _attention(g, spec, h, f"{p}attn.{j}.", dtype, 2 * i + j, decode)
        x = g.add_node(OpCode.ADD, [x, a], name=f"{p}attn_residual.{j}").outputs[0]
        f = _norm(g, spec, x, f"{p}ffn_norm.{j}", dtype)
        if j == 0:
            layer = add_moe_layer(g, spec.moe, f, prefix=f"{p}moe.", training=training)
            shortcut = layer.pop("out")
            for key, value in layer.items():
                if training or key in ("expert_idx", "weights"):
                    routing_outputs[f"{p}{key}"] = value
        f = _dense_ffn(g, spec, f, f"{p}ffn.{j}.", dtype)
        x = g.add_node(OpCode.ADD, [x, f], name=f"{p}ffn_residual.{j}").outputs[0]
    return g.add_node(OpCode.ADD, [x, shortcut], name=f"{p}moe_residual").outputs[0]


def _dense_ffn(g: Graph, spec: ModelSpec, x: Value, p: str, dtype: ElemType) -> Value:
    m = spec.model
    f, h = m.dense_width, m.hidden
    w_up = g.add_weight(f"{p}w_up", TensorType((f, h), dtype))
    w_down = g.add_weight(f"{p}w_down", TensorType((h, f), dtype))
    w_gate = g.add_weight(f"{p}w_gate", TensorType((f, h), dtype)) if m.dense_activation.gated else None
    tokens = g.add_node(OpCode.FLATTEN_TOKENS, [x], name=f"{p}tokens").outputs[0]
    y = g.add_node(OpCode.FFN, [tokens, w_up, w_down, w_gate, None, None, None],
                   {"activation": m.dense_activation}, name=p.rstrip(".")).outputs[0]
    return g.add_node(OpCode.RESTORE_TOKENS, [y, x], name=f"{p}out").outputs[0]


def build_model_graph(spec: ModelSpec, *, routing: bool = False, training: bool = False,
                      form: GraphForm | str = GraphForm.PREFILL,
                      mla_cache: MLACacheLayout | str = MLACacheLayout.EXPANDED) -> Graph:
    """The whole decoder as one IR graph; `training` adds every MoE layer's losses, router logits and loads
    as outputs; `form` decode adds the KV cache, `mla_cache` chooses what an MLA model caches (module
    docstring). The outputs come in this order: logits, the present cache of each layer, the routing record."""
    m = spec.model
    form, mla_cache = GraphForm(form), MLACacheLayout(mla_cache)
    if form == GraphForm.DECODE and training:
        raise IRError("the decode form is for inference; build the training graph in prefill form "
                      "(form='prefill') and the generation graph without training=True")
    dtype = ElemType.from_name(m.dtype)
    g = Graph(m.name, GraphKind.MODEL)
    g.meta["spec_hash"] = model_spec_hash(spec)
    ids = g.add_input("input_ids", TensorType(("B", "S"), ElemType.INT64))
    decode = None
    if form == GraphForm.DECODE:
        g.meta["form"] = form.value
        mask = g.add_input("attention_mask", TensorType(("B", "P+S"), ElemType.INT64))
        positions = g.add_input("position_ids", TensorType(("B", "S"), ElemType.INT64))
        decode = _DecodeInputs(positions, mask, mla_cache, {})
    embed = g.add_weight("embed.weight", TensorType((m.vocab_size, m.hidden), dtype))
    x = g.add_node(OpCode.EMBEDDING, [ids, embed], name="embed").outputs[0]
    mult = m.multipliers

    def scaled(v: Value, factor: float, name: str) -> Value:
        return v if factor == 1.0 else g.add_node(OpCode.SCALE, [v], {"factor": factor}, name=name).outputs[0]

    if mult is not None:
        x = scaled(x, mult.embedding, "embed.scale")
    residual = 1.0 if mult is None else mult.residual
    routing_outputs: dict[str, Value] = {}
    for i in range(m.layers):
        if m.layer_form == LayerForm.DUAL_SHORTCUT_MOE:
            x = _shortcut_moe_layer(g, spec, x, i, dtype, decode, training, routing_outputs)
            continue
        p = layer_prefix(i)
        post = m.norm_position == NormPosition.POST

        def norm(v: Value, name: str) -> Value:
            return _norm(g, spec, v, f"{p}{name}", dtype)

        a = _attention(g, spec, x if post else norm(x, "attn_norm"), f"{p}attn.", dtype, i, decode)
        if a.producer.op in (OpCode.MOA_ATTENTION, OpCode.CACHED_MOA_ATTENTION):  # the attention experts' routing
            for key in ("expert_idx", "weights"):
                routing_outputs[f"{p}attn.{key}"] = a.producer.input(key)
        a = scaled(norm(a, "attn_norm") if post else a, residual, f"{p}attn_scale")
        x = g.add_node(OpCode.ADD, [x, a], name=f"{p}attn_residual").outputs[0]
        f = x if post else norm(x, "ffn_norm")
        if m.is_moe_layer(i):
            layer = add_moe_layer(g, spec.moe, f, prefix=f"{p}moe.", training=training)
            f = layer.pop("out")
            for key, value in layer.items():
                if training or key in ("expert_idx", "weights"):
                    routing_outputs[f"{p}{key}"] = value
        else:
            f = _dense_ffn(g, spec, f, f"{p}ffn.", dtype)
        f = scaled(norm(f, "ffn_norm") if post else f, residual, f"{p}ffn_scale")
        x = g.add_node(OpCode.ADD, [x, f], name=f"{p}ffn_residual").outputs[0]
    x = _norm(g, spec, x, "norm", dtype, m.final_norm_eps)
    head = embed if m.tied_embeddings else g.add_weight("lm_head.weight", TensorType((m.vocab_size, m.hidden), dtype))
    head_bias = g.add_weight("lm_head.bias", TensorType((m.vocab_size,), dtype)) if m.lm_head_bias else None
    tokens = g.add_node(OpCode.FLATTEN_TOKENS, [x], name="lm_head.tokens").outputs[0]
    logits = g.add_node(OpCode.LINEAR, [tokens, head, head_bias], {"out_dtype": dtype}, name="lm_head").outputs[0]
    if mult is not None:
        logits = scaled(logits, 1.0 / mult.logits, "lm_head.scale")
    g.set_output("logits", g.add_node(OpCode.RESTORE_TOKENS, [logits, x], name="logits").outputs[0])
    for key, value in (decode.present.items() if decode is not None else ()):
        g.set_output(key, value)
    if routing or training:
        for key, value in routing_outputs.items():
            g.set_output(key, value)
    if spec.quantization is not None:
        from .quantization import quantize_graph

        quantize_graph(g, spec.quantization)
    return g


# ---------------------------------------------------------------------------------------------------
# reading a decode graph


@dataclass(frozen=True)
class CacheEntry:
    """One cache tensor of a decode graph: graph input `past` [B, heads, P, dim] becomes graph output
    `present` [B, heads, P+S, dim] (the past and the new tokens along dim 2) after a call."""
    layer: int
    past: str        # "past_key_values.3.key"
    present: str     # "present.3.key"
    heads: int       # dim 1 (1 for MLA's latent layout)
    dim: int         # dim 3
    dtype: ElemType


def is_decode_graph(graph: Graph) -> bool:
    """Whether the graph is a model graph in decode form (it has cached attention nodes)."""
    return graph.kind == GraphKind.MODEL and any(n.op in _CACHED_OPS for n in graph.nodes)


def cache_entries(graph: Graph) -> list[CacheEntry]:
    """The cache tensors of a decode graph in layer order (key slot, then value slot), read from its
    cached attention nodes: what a generation loop feeds back from each call's outputs to the next."""
    present_name = {id(v): key for key, v in graph.outputs.items()}
    entries = []
    for node in graph.nodes:
        if node.op not in _CACHED_OPS:
            continue
        for port, out in (("past_key", "present_key"), ("past_value", "present_value")):
            past, present = node.input(port), node.output(out)
            if past.producer is not None or id(present) not in present_name:
                raise IRError(f"the {port} of a decode graph must be a graph input and its {out} a graph output",
                              node=node.name)
            _, heads, _, dim = past.type.shape
            layer = int(past.name.split(".")[1]) if past.name.startswith("past_key_values.") else len(entries) // 2
            entries.append(CacheEntry(layer, past.name, present_name[id(present)], heads, dim, past.type.dtype))
    if graph.kind != GraphKind.MODEL or not entries:
        raise IRError(f"graph '{graph.name}' is not a decode graph (no cached attention); build it with "
                      "build_model_graph(spec, form='decode')")
    return entries


def decode_contract_problem(graph: Graph) -> str:
    """Why the graph breaks the decode form's interface (inputs input_ids, attention_mask, position_ids and
    the past cache; outputs logits and the present cache), or "" (what Graph.contract_problem is to prefill)."""
    if not is_decode_graph(graph):
        return f"graph '{graph.name}' is not a model graph in decode form (build_model_graph(spec, form='decode'))"
    try:
        entries = cache_entries(graph)
    except IRError as err:
        return str(err).splitlines()[0]
    inputs = [v.name for v in graph.inputs]
    expected = list(DECODE_INPUTS) + [e.past for e in entries]
    if sorted(inputs) != sorted(expected) or inputs[:len(DECODE_INPUTS)] != list(DECODE_INPUTS):
        return f"decode graph '{graph.name}' has inputs {inputs[:6]}...; expected {expected[:6]}..."
    if "logits" not in graph.outputs:
        return f"decode graph '{graph.name}' has no 'logits' output; keep the logits through the passes"
    return ""
