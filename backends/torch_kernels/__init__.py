"""The torch kernel set: fast, autograd-friendly torch implementations of the MoE ops and the whole-model ops,
depending on torch alone. Every torch backend (eager, compile, AOTInductor, expert parallel, the Triton
backend's reference, the TensorRT plugin's fallback) calls these, so each rule has one torch implementation.

Each function has the semantics of the op of the same name in moe_ir/ir/ops.py or model_ops.py (the
reference), written for speed: routing stays vectorised, expert FFNs run as one GEMM per expert on
contiguous rows of a token array sorted by expert (never a tokens x experts x hidden tensor), the
un-permute reads the expert outputs once, and attention runs through the fused scaled_dot_product_attention
kernel rather than a materialised [S, S] score matrix.

One module per concern: `routing`, `experts` (FFN kernels), `losses`, `decoder` (embedding, norms, RoPE,
attention), `moa` (mixture of attention heads), `quantized` (block-quantized weights).

These modules import nothing but torch, the standard library and each other, on purpose: the code generator
copies the functions a spec needs verbatim into the standalone `model.py` it writes (`torch_source`), so the
generated layer and the eager module run the same instructions and agree bitwise, and the copies call each
other by bare names. Options are therefore plain strings, ints and bools here, not moe_ir enums.
"""
from __future__ import annotations

from .routing import (router_logits, router_noise, score, route_topk, sparsemixer_route, scale_weights, count_ids,
    dispatch, expert_capacity, dispatch_capacity, expert_choice)
from .experts import (is_gated, activate, split_gate_up, needs_autograd, onednn_takes, onednn_linear, ffn_onednn,
    ffn, grouped_ffn, grouped_ffn_traced, expert_workers, reusable_rows, experts_in_place, experts_traced, combine,
    sigmoid_gate)
from .losses import selection_counts, switch_loss, expert_loss, device_loss, sequence_loss, z_loss, update_bias
from .decoder import (embedding, rms_norm, layer_norm, rope_inverse_frequencies, rope_angles_cos_sin, rope_cos_sin,
    rope_dim, apply_rope, attention_with_sinks, causal_seen, causal_attention, attention_qkv, unit_rms,
    tuned_queries, attention, mla_latents, mla_expand, mla_attention, rope_cos_sin_at, visible_keys,
    masked_attention, merge_heads, cached_attention, cached_mla_attention)
from .moa import add_bias, expert_linear, moa_queries, moa_output, moa_qkv, moa_attention, cached_moa_attention
from .quantized import (unpack_int4, dequantize_weight, int4_matmul_takes, int4_matmul_layout, int4_half_split,
    int4_fused_matmul, compiled_int4_matmul, packed_weight, is_packed, unpacked, packed_expert, packed_linear,
    ffn_packed, grouped_ffn_packed)

from . import decoder, experts, losses, moa, quantized, routing

# The modules in the order a standalone copy lists their functions (the order of the kernels' concerns).
MODULES = (routing, experts, losses, decoder, moa, quantized)
