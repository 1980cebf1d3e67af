"""Static analysis of a whole model: parameters (total, trainable, buffers, activated), a per-layer
breakdown and FLOPs per token, from the model graph's declared weight shapes (nothing is allocated, so
it is instant for a 671B model).

Conventions (the same as the layer analysis in analysis.py):
- total_params counts every stored tensor: embeddings, LM head (unless tied), every RMSNorm, attention
  projections (MLA's low-rank matrices and latent norms included), biases, routers, experts, and the
  aux-loss-free router bias, which is a buffer (not trained by gradient). trainable_params leaves the
  buffers out: it equals transformers' sum(p.numel() for p in model.parameters()), and total_params its
  state dict (transformers also registers DeepSeek-V3's e_score_correction_bias as a buffer).
- activated_params is what one token reads: everything except the routed experts it does not use
  (top_k of the routed experts per MoE layer, and of the experts of a mixture of attention heads), with the
  whole embedding and LM head counted, as the DeepSeekMoE paper does (its 2.0B/0.3B, 16.4B/2.8B,
  144.6B/22.2B; also Mixtral's 12.9B, Qwen1.5-MoE's 2.7B, OLMoE's 1.3B). DeepSeek-V2/V3 leave the input embedding out (V2-Lite 2.4B, V3 37B):
  activated_params_without_input_embedding. activated_params_non_embedding leaves out both.
- flops_per_token: forward, 2 per multiply-add, matmuls only (attention projections, of a mixture of
  attention heads the top_k chosen experts', dense FFNs,
  router, the top_k routed and every shared expert, LM head); elementwise work, norms and the
  embedding lookup are left out, as papers do. MLA is counted in its plain (not weight-absorbed) form.
  Attention scores (q.k and p.v) depend on the context: with `context=L`, attention_flops_per_token
  adds 2 * heads * L * (qk_head_dim + v_head_dim) per layer for a token attending to L positions
  (a prefill of S tokens averages L = (S + 1) / 2 under the causal mask).
- parallel (when the moe section sets `parallel:`): expert parallelism alone, i.e. every device holds
  everything except the routed experts (and, tensor-parallel, the shared experts) of each MoE layer,
  which the layer analysis splits (analysis.py); params_per_device is the model total less what each
  MoE layer keeps off a device, and the all-to-all bytes per token are the layer's times the MoE layers.
"""
from __future__ import annotations

import dataclasses

import math
from dataclasses import asdict, dataclass

from .analysis import LayerAnalysis, human_count, analyse
from .ir import ValueKind
from .model_builder import build_model_graph, layer_prefix
from .model_spec import ModelSpec, index_ranges

__all__ = ["LayerBreakdown", "ModelAnalysis", "analyse_model", "format_model_analysis"]


@dataclass(frozen=True)
class LayerBreakdown:
    index: int
    kind: str               # "dense" or "moe"
    attention_params: int   # projections, biases, q/k or latent norms
    norm_params: int        # the layer's two norms (RMSNorm weights, or LayerNorm weights and biases)
    ffn_params: int         # dense FFN, or the whole MoE layer (router, experts, shared, buffers)
    buffer_params: int      # stored, not trained (aux-loss-free router bias)
    total_params: int
    activated_params: int
    flops_per_token: int    # matmuls only, attention scores excluded

    def shape_key(self) -> tuple:
        return (self.kind, self.attention_params, self.norm_params, self.ffn_params, self.buffer_params,
                self.activated_params, self.flops_per_token)


@dataclass(frozen=True)
class ModelAnalysis:
    name: str
    total_params: int
    trainable_params: int
    buffer_params: int
    activated_params: int
    activated_params_without_input_embedding: int
    activated_params_non_embedding: int
    embedding_params: int
    lm_head_params: int     # 0 when tied to the embedding (its bias, if any, counts here too)
    final_norm_params: int
    flops_per_token: int
    context: int | None
    attention_flops_per_token: int  # 0 without a context
    moe_layers: tuple[int, ...]
    dense_layers: tuple[int, ...]
    layers: tuple[LayerBreakdown, ...]
    moe: LayerAnalysis
    parallel: dict | None = None  # per-device numbers of the whole model (see the module docstring)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        d["dense_layers"] = list(self.dense_layers)
        d["kind"] = "model"
        if d["parallel"] is None:
            del d["parallel"]  # models without placement keep their JSON as it was
        return d


def _numel(shape) -> int:
    return math.prod(int(d) for d in shape)


def analyse_model(spec: ModelSpec, *, context: int | None = None) -> ModelAnalysis:
    """Counts and FLOPs of `spec` (see the module docstring for the conventions)."""
    m = spec.model
    # parameters are counted as the model's (a quantized spec stores them as codes and scales)
    graph = build_model_graph(dataclasses.replace(spec, quantization=None))
    sizes = {name: _numel(v.type.shape) for name, v in graph.weights.items()}
    buffers = {name for name, v in graph.weights.items() if v.kind == ValueKind.BUFFER}
    moe = analyse(spec.moe)
    a = m.attention
    h = m.hidden

    # Weights grouped by layer once: filtering every name per layer is quadratic in the layer count.
    by_layer: dict[str, dict[str, int]] = {}
    for k, n in sizes.items():
        if k.startswith("layers."):
            by_layer.setdefault(layer_prefix(int(k.split(".", 2)[1])), {})[k] = n
    layers = []
    for i in range(m.layers):
        p = layer_prefix(i)
        mine = by_layer.get(p, {})
        attn = sum(n for k, n in mine.items() if k.startswith(p + "attn."))
        norms = sum(n for k, n in mine.items() if k.startswith((p + "attn_norm.", p + "ffn_norm.")))
        ffn_prefix = p + ("moe." if m.is_moe_layer(i) else "ffn.")
        ffn = sum(n for k, n in mine.items() if k.startswith(ffn_prefix))
        # LongCat-Flash's layers have two dense FFNs beside the MoE block: counted with it, as matrices only
        dense = sum(n for k, n in mine.items() if k.startswith(p + "ffn.")) if m.attention_blocks > 1 else 0
        ffn += dense
        buf = sum(n for k, n in mine.items() if k in buffers)
        assert attn + norms + ffn == sum(mine.values()), f"unclassified weights in layer {i}"
        # Matmul FLOPs of the attention: every matrix (ndim 2) of the attention, applied to each token.
        attn_flops = sum(2 * n for k, n in mine.items()
                         if k.startswith(p + "attn.") and len(graph.weights[k].type.shape) == 2)
        # Mixture of attention heads: the experts' stacked query/output projections [E, ., .], of which a token
        # reads and multiplies by its top_k.
        stacked = sum(n for k, n in mine.items() if k.startswith(p + "attn.") and len(graph.weights[k].type.shape) == 3)
        chosen = stacked * a.top_k // a.experts if stacked else 0
        attn_flops += 2 * chosen
        unused_attn = stacked - chosen
        if m.is_moe_layer(i):
            unused = moe.routed_expert_params - spec.moe.experts.top_k * moe.params_per_routed_expert
            activated = attn + norms + ffn - unused - unused_attn
            flops = attn_flops + moe.flops_per_token + 2 * dense
        else:
            activated = attn + norms + ffn - unused_attn
            flops = attn_flops + 2 * ffn  # a dense FFN is matrices only
        layers.append(LayerBreakdown(index=i, kind="moe" if m.is_moe_layer(i) else "dense", attention_params=attn,
                                     norm_params=norms, ffn_params=ffn, buffer_params=buf,
                                     total_params=attn + norms + ffn, activated_params=activated,
                                     flops_per_token=flops))

    embedding = sizes["embed.weight"]
    head_bias = sizes.get("lm_head.bias", 0)
    head = sizes.get("lm_head.weight", 0) + head_bias
    final_norm = sizes["norm.weight"] + sizes.get("norm.bias", 0)
    total = sum(sizes.values())
    assert total == embedding + head + final_norm + sum(lb.total_params for lb in layers)
    buffer_total = sum(sizes[k] for k in buffers)
    activated_layers = sum(lb.activated_params for lb in layers)
    # The LM head matmul runs on every token whether or not it is tied to the embedding.
    flops = sum(lb.flops_per_token for lb in layers) + 2 * m.vocab_size * h
    attention_flops = 0
    if context is not None:
        per_layer = 2 * a.heads * context * (a.qk_head_dim(h) + a.value_head_dim(h))
        attention_flops = per_layer * m.layers * m.attention_blocks
    return ModelAnalysis(
        parallel=_model_parallel(moe, total, len(m.moe_layers)),
        name=m.name, total_params=total, trainable_params=total - buffer_total, buffer_params=buffer_total,
        activated_params=embedding + head + final_norm + activated_layers,
        # Tied: the embedding matrix is the LM head, which every token reads in full.
        activated_params_without_input_embedding=(head if head > head_bias else embedding + head_bias) + final_norm
        + activated_layers,
        activated_params_non_embedding=final_norm + activated_layers,
        embedding_params=embedding, lm_head_params=head, final_norm_params=final_norm, flops_per_token=flops,
        context=context, attention_flops_per_token=attention_flops, moe_layers=m.moe_layers,
        dense_layers=m.dense_layers, layers=tuple(layers), moe=moe)


def _model_parallel(moe: LayerAnalysis, total: int, moe_layers: int) -> dict | None:
    q = moe.parallel
    if q is None:
        return None
    off_device = moe.total_params - q["params_per_device"]  # what one MoE layer keeps on other devices
    return {"expert_parallel": q["expert_parallel"], "device_limit": q["device_limit"], "shared": q["shared"],
            "moe_layers": moe_layers, "experts_per_device": q["experts_per_device"],
            "expert_params_per_device": moe_layers * q["expert_params_per_device"],
            "params_per_device": total - moe_layers * off_device,
            "a2a_bytes_per_token_max": moe_layers * q["a2a_bytes_per_token_max"],
            "a2a_bytes_per_token_expected": round(moe_layers * q["a2a_bytes_per_token_expected"], 1),
            "a2a_assumption": q["a2a_assumption"] + "; summed over the MoE layers",
            "assumption": "expert parallelism only: all but the split experts is replicated on every device"}


def _layer_groups(layers: tuple[LayerBreakdown, ...]) -> list[tuple[int, int, LayerBreakdown]]:
    """Runs of consecutive layers with identical breakdowns: (first, last, breakdown)."""
    groups: list[tuple[int, int, LayerBreakdown]] = []
    for lb in layers:
        if groups and groups[-1][2].shape_key() == lb.shape_key() and groups[-1][1] == lb.index - 1:
            groups[-1] = (groups[-1][0], lb.index, groups[-1][2])
        else:
            groups.append((lb.index, lb.index, lb))
    return groups


def format_model_analysis(r: ModelAnalysis, spec: ModelSpec | None = None) -> str:
    def count(n: int) -> str:
        return f"{n:,} ({human_count(n)})"

    rows = [("model", r.name)]
    if spec is not None:
        m, a = spec.model, spec.model.attention
        attn = f"{a.kind.value}, {a.heads} heads"
        if a.kind.value == "gqa":
            attn += f", {a.num_kv_heads} kv heads"
        if a.kind.value == "moa":
            attn += f" ({a.kv_heads} kv heads x top-{a.top_k} of {a.experts} attention experts)"
        if a.kind.value == "mla":
            attn += (f", q_lora {a.q_lora_rank or 'none'}, kv_lora {a.kv_lora_rank}, qk {a.qk_nope_head_dim}+"
                     f"{a.qk_rope_head_dim} (nope+rope), v {a.v_head_dim}")
        else:
            attn += f", head_dim {a.dim(m.hidden)}"
        if m.attention_blocks > 1:  # LongCat-Flash's shortcut-connected layers
            attn += (f"; {m.attention_blocks} attention + dense FFN (width {m.dense_width}) sublayers per layer "
                     f"beside the MoE block ({m.layer_form.value})")
        rows += [("shape", f"{m.layers} layers, hidden {m.hidden}, vocab {m.vocab_size:,}"
                           f"{', tied embeddings' if m.tied_embeddings else ''}"),
                 ("attention", attn),
                 ("MoE layers", f"{len(r.moe_layers)} of {m.layers}"
                                + (f" (dense: {index_ranges(tuple(r.dense_layers))}, width {m.dense_width})" if r.dense_layers else "")),
                 ("MoE layer", f"{spec.moe.experts.routed} routed + {spec.moe.experts.shared} shared experts of width "
                               f"{spec.moe.experts.width}, top-{spec.moe.experts.top_k}"
                               + (f", {spec.moe.experts.identity} identity experts among the routed choices"
                                  if spec.moe.experts.identity else ""))]
    rows += [
        ("total params", count(r.total_params) + " (every stored tensor)"),
        ("  trainable", count(r.trainable_params)),
        ("  buffers", f"{r.buffer_params:,} (aux-loss-free router bias)" if r.buffer_params else "0"),
        ("activated params", count(r.activated_params) + " per token, embedding and LM head included"),
        ("  without input embedding", count(r.activated_params_without_input_embedding)),
        ("  non-embedding", count(r.activated_params_non_embedding)),
        ("embedding", count(r.embedding_params)),
        ("LM head", count(r.lm_head_params) if r.lm_head_params else "tied to the embedding"),
        ("final norm", f"{r.final_norm_params:,}"),
        ("FLOPs per token", count(r.flops_per_token) + " forward, 2 per MAC, matmuls (no attention scores)"),
    ]
    if r.context is not None:
        rows.append(("  + attention scores", count(r.attention_flops_per_token) + f" at {r.context:,} positions"))
    if r.parallel is not None:
        q = r.parallel
        limit = f", device limit M={q['device_limit']}" if q["device_limit"] is not None else ""
        rows += [
            ("expert parallel", f"EP={q['expert_parallel']}{limit}, shared experts {q['shared']}; nothing else "
                                "split"),
            ("  per device", f"{q['experts_per_device']} routed experts of each of {q['moe_layers']} MoE layers, "
                             f"{count(q['expert_params_per_device'])} expert params; {count(q['params_per_device'])} "
                             "params in all"),
            ("  all-to-all/token", f"{q['a2a_bytes_per_token_expected']:,.0f} B expected (uniform routing), "
                                   f"{q['a2a_bytes_per_token_max']:,} B at most, over the {q['moe_layers']} MoE "
                                   "layers"),
        ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines.append("")
    lines.append("per layer (each layer of a run)")
    lines.append(f"  {'layers':<10} {'kind':<5} {'attention':>13} {'norms':>8} {'ffn / moe':>16} {'total':>16} "
                 f"{'activated':>15} {'FLOPs/token':>15}")
    for first, last, lb in _layer_groups(r.layers):
        which = f"{first}" if first == last else f"{first}-{last}"
        lines.append(f"  {which:<10} {lb.kind:<5} {lb.attention_params:>13,} {lb.norm_params:>8,} "
                     f"{lb.ffn_params:>16,} {lb.total_params:>16,} {lb.activated_params:>15,} {lb.flops_per_token:>15,}")
    return "\n".join(lines) + "\n"
