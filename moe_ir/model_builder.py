"""ModelSpec -> IR graph of the whole decoder, prefill form: input_ids i64[B, S] in, logits [B, S, V] out.

    x = embed(input_ids)
    for each layer i:  x = x + attn_i(rms_norm(x));  x = x + ffn_i(rms_norm(x))     (ffn_i: dense or MoE)
    logits = lm_head(rms_norm(x))

Attention is causal over positions 0..S-1; B and S stay symbolic. MoE layers are built by the layer
builder (`builder.add_moe_layer`) with the prefix `layers.{i}.moe.`, so their weights keep the layer's
canonical names under it. Weight names:

  embed.weight [V, H]                       norm.weight [H]             lm_head.weight [V, H] (untied only)
  layers.{i}.attn_norm.weight [H]           layers.{i}.ffn_norm.weight [H]
  layers.{i}.attn.w_q / w_k / w_v [out, H], w_o [H, heads*head_dim], b_q / b_k / b_v / b_o,
                 q_norm.weight / k_norm.weight                                            (mha, gqa)
  layers.{i}.attn.w_q | (w_q_a, q_a_norm.weight, w_q_b), w_kv_a, kv_a_norm.weight, w_kv_b, w_o,
                 b_q_a / b_kv_a / b_o                                                     (mla)
  layers.{i}.ffn.w_up / w_down / w_gate [F, H] / [H, F] / [F, H]                          (dense layers)
  layers.{i}.moe.router.weight, layers.{i}.moe.experts.w_up, ... (see builder.py)        (MoE layers)

Matrices are in PyTorch Linear layout [out, in], as in the transformers checkpoints.
Outputs: `logits`; with `routing=True` also `layers.{i}.expert_idx` / `layers.{i}.weights` of every
token-choice MoE layer (what validation compares for routing flips). With `training=True` every MoE layer
adds all of its training outputs under `layers.{i}.` (the names `builder.build_graph` gives a layer):
`expert_idx`, `weights` (or `rows` for expert-choice), `router_logits`, `tokens_per_expert`, `loss.<kind>`,
`aux_loss`; training implies the routing record, since the balance losses are computed from it.
"""
from __future__ import annotations


from .builder import add_moe_layer
from .ir import ElemType, Graph, GraphKind, OpCode, TensorType, Value
from .model_spec import AttentionKind, ModelSpec, QKNorm, model_spec_to_dict
from .spec import canonical_spec_hash

__all__ = ["build_model_graph", "model_spec_hash", "layer_prefix"]


MLA_LATENT_NORM_EPS = 1e-6


def model_spec_hash(spec: ModelSpec) -> str:
    """The model's spec hash (spec.canonical_spec_hash: names and source notes do not count)."""
    return canonical_spec_hash(model_spec_to_dict(spec))


def layer_prefix(i: int) -> str:
    return f"layers.{i}."


def _attention(g: Graph, spec: ModelSpec, x: Value, p: str, dtype: ElemType) -> Value:
    m = spec.model
    a, h = m.attention, m.hidden

    def weight(name: str, *shape: int) -> Value:
        return g.add_weight(f"{p}{name}", TensorType(shape, dtype))

    rope = {"rope_theta": a.rope_theta, "rope_layout": a.layout, "norm_eps": m.rms_norm_eps}
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
        return g.add_node(OpCode.MLA_ATTENTION, [x, *q, *kv, w_o, b_q_a, b_kv_a, b_o], attrs,
                          name=p.rstrip(".")).outputs[0]
    d, nq, nkv = a.dim(h), a.heads, a.num_kv_heads
    w = [weight("w_q", nq * d, h), weight("w_k", nkv * d, h), weight("w_v", nkv * d, h), weight("w_o", h, nq * d)]
    biases = [weight(f"b_{k}", size) if a.qkv_bias else None for k, size in (("q", nq * d), ("k", nkv * d), ("v", nkv * d))]
    biases.append(weight("b_o", h) if a.out_bias else None)
    norms = [None, None]
    if a.qk_norm == QKNorm.HEAD:
        norms = [weight("q_norm.weight", d), weight("k_norm.weight", d)]
    elif a.qk_norm == QKNorm.FULL:
        norms = [weight("q_norm.weight", nq * d), weight("k_norm.weight", nkv * d)]
    attrs = {"heads": nq, "kv_heads": nkv, "head_dim": d, "qk_norm": a.qk_norm, **rope}
    return g.add_node(OpCode.ATTENTION, [x, *w, *biases, *norms], attrs, name=p.rstrip(".")).outputs[0]


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


def build_model_graph(spec: ModelSpec, *, routing: bool = False, training: bool = False) -> Graph:
    """The whole decoder as one IR graph (prefill); `training` adds every MoE layer's losses, router
    logits and loads as outputs (module docstring)."""
    m = spec.model
    dtype = ElemType.from_name(m.dtype)
    eps = {"eps": m.rms_norm_eps}
    g = Graph(m.name, GraphKind.MODEL)
    g.meta["spec_hash"] = model_spec_hash(spec)
    ids = g.add_input("input_ids", TensorType(("B", "S"), ElemType.INT64))
    embed = g.add_weight("embed.weight", TensorType((m.vocab_size, m.hidden), dtype))
    x = g.add_node(OpCode.EMBEDDING, [ids, embed], name="embed").outputs[0]
    routing_outputs: dict[str, Value] = {}
    for i in range(m.layers):
        p = layer_prefix(i)
        norm_w = g.add_weight(f"{p}attn_norm.weight", TensorType((m.hidden,), dtype))
        a = g.add_node(OpCode.RMS_NORM, [x, norm_w], eps, name=f"{p}attn_norm").outputs[0]
        a = _attention(g, spec, a, f"{p}attn.", dtype)
        x = g.add_node(OpCode.ADD, [x, a], name=f"{p}attn_residual").outputs[0]
        norm_w = g.add_weight(f"{p}ffn_norm.weight", TensorType((m.hidden,), dtype))
        f = g.add_node(OpCode.RMS_NORM, [x, norm_w], eps, name=f"{p}ffn_norm").outputs[0]
        if m.is_moe_layer(i):
            layer = add_moe_layer(g, spec.moe, f, prefix=f"{p}moe.", training=training)
            f = layer.pop("out")
            for key, value in layer.items():
                if training or key in ("expert_idx", "weights"):
                    routing_outputs[f"{p}{key}"] = value
        else:
            f = _dense_ffn(g, spec, f, f"{p}ffn.", dtype)
        x = g.add_node(OpCode.ADD, [x, f], name=f"{p}ffn_residual").outputs[0]
    norm_w = g.add_weight("norm.weight", TensorType((m.hidden,), dtype))
    x = g.add_node(OpCode.RMS_NORM, [x, norm_w], eps, name="norm").outputs[0]
    head = embed if m.tied_embeddings else g.add_weight("lm_head.weight", TensorType((m.vocab_size, m.hidden), dtype))
    tokens = g.add_node(OpCode.FLATTEN_TOKENS, [x], name="lm_head.tokens").outputs[0]
    logits = g.add_node(OpCode.LINEAR, [tokens, head, None], {"out_dtype": dtype}, name="lm_head").outputs[0]
    g.set_output("logits", g.add_node(OpCode.RESTORE_TOKENS, [logits, x], name="logits").outputs[0])
    if routing or training:
        for key, value in routing_outputs.items():
            g.set_output(key, value)
    return g
