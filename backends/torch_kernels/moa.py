"""Mixture of attention heads (JetMoE; model_ops.py: moa_attention, cached_moa_attention). The router's record
(expert_idx, weights [T, k]) comes from the graph's routing ops. The experts' query and output projections are
grouped linear maps (`expert_linear`): at eager inference each expert's chosen rows run as one GEMM, as the expert
FFNs do; under torch.compile / torch.export and with autograd, every expert's projection runs as one GEMM over the
stacked weights and the chosen ones are picked, a form with no routing-dependent shape (E/k times the work).
Query heads are kv-head-major (h*k + j), so query head i reads kv head i // k.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .routing import count_ids
from .experts import needs_autograd
from .decoder import apply_rope, masked_attention, rope_cos_sin, rope_cos_sin_at, rope_dim, visible_keys


def add_bias(y, bias):
    """y [..., H] + bias [H] (experts.output_bias)."""
    return y + bias.to(y.dtype)


def expert_linear(x, expert_idx, w):
    """y [T, k, out]: slot j of token t is x_tj @ w[expert_idx[t, j]]^T, w [E, out, in]; x [T, in] (every slot reads
    the token) or [T, k, in] (each slot its own row)."""
    t, k = expert_idx.shape
    experts, out, width = w.shape
    rows = x if x.dim() == 2 else x.reshape(t * k, width)
    if torch.compiler.is_compiling() or needs_autograd(x, w):
        if x.dim() == 2:   # every expert on every token, the chosen ones picked
            every = F.linear(x, w.reshape(experts * out, width)).view(t, experts, out)
            return every.gather(1, expert_idx.unsqueeze(-1).expand(-1, -1, out))
        # each slot's row in its expert's place (zeros elsewhere), one batched GEMM per expert
        slots = x.new_zeros(t, experts, width).scatter(1, expert_idx.unsqueeze(-1).expand(-1, -1, width), x)
        every = torch.matmul(slots.transpose(0, 1), w.transpose(1, 2))                 # [E, T, out]
        return every.transpose(0, 1).gather(1, expert_idx.unsqueeze(-1).expand(-1, -1, out))
    order = torch.argsort(expert_idx.reshape(-1), stable=True)
    y = x.new_empty(t * k, out)
    start = 0
    for e, size in enumerate(count_ids(expert_idx.reshape(-1), experts).tolist()):
        if size:
            chosen = order[start:start + size]
            y[chosen] = F.linear(rows.index_select(0, chosen // k if x.dim() == 2 else chosen), w[e])
            start += size
    return y.view(t, k, out)


def moa_queries(x, expert_idx, w_q, kv_heads):
    """q [B, kv_heads*k, S, d] of x [B, S, H] through the query projections of each token's k experts."""
    b, s, hidden = x.shape
    k, width = expert_idx.shape[1], w_q.shape[1]
    q = expert_linear(x.reshape(-1, hidden), expert_idx, w_q)                          # [T, k, kv*d]
    return q.view(b, s, k, kv_heads, -1).permute(0, 3, 2, 1, 4).reshape(b, kv_heads * k, s, width // kv_heads)


def moa_output(y, expert_idx, weights, w_o, b_o, kv_heads):
    """[B, S, H]: y [B, kv_heads*k, S, d] of each chosen expert through its output projection, weighted by the
    routing weights and summed, plus b_o."""
    b, _, s, d = y.shape
    hidden, width = w_o.shape[1], w_o.shape[2]
    k = expert_idx.shape[1]
    chosen = y.view(b, kv_heads, k, s, d).permute(0, 3, 2, 1, 4).reshape(b * s, k, width)
    out = (expert_linear(chosen, expert_idx, w_o) * weights.to(y.dtype).unsqueeze(-1)).sum(dim=1)
    if b_o is not None:
        out = out + b_o
    return out.view(b, s, hidden)


def moa_qkv(x, expert_idx, w_q, w_k, w_v, cos, sin, kv_heads, head_dim, rope_layout):
    """q [B, kv_heads*k, S, d], k and v [B, kv_heads, S, d], q and k rotated."""
    b, s, _ = x.shape
    q = moa_queries(x, expert_idx, w_q, kv_heads)
    k = F.linear(x, w_k).view(b, s, kv_heads, head_dim).transpose(1, 2)
    v = F.linear(x, w_v).view(b, s, kv_heads, head_dim).transpose(1, 2)
    return apply_rope(q, cos, sin, rope_layout), apply_rope(k, cos, sin, rope_layout), v


def moa_attention(x, expert_idx, weights, w_q, w_k, w_v, w_o, b_o, kv_heads, head_dim, rope, scale):
    """Mixture of attention heads on x [B, S, H] (positions 0..S-1, causal)."""
    cos, sin = rope_cos_sin(x.shape[1], rope_dim(rope, head_dim), rope, x)
    q, k, v = moa_qkv(x, expert_idx, w_q, w_k, w_v, cos, sin, kv_heads, head_dim, rope[1])
    rep = q.shape[1] // kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return moa_output(y, expert_idx, weights, w_o, b_o, kv_heads)


def cached_moa_attention(x, position_ids, attention_mask, past_key, past_value, expert_idx, weights, w_q, w_k, w_v,
                         w_o, b_o, kv_heads, head_dim, rope, scale):
    """`moa_attention` on the new tokens x [B, S, H] at position_ids [B, S] after the past shared K/V
    [B, kv_heads, P, d]: (y [B, S, H], present key, present value [B, kv_heads, P+S, d])."""
    cos, sin = rope_cos_sin_at(position_ids, rope_dim(rope, head_dim), rope, x)
    q, k, v = moa_qkv(x, expert_idx, w_q, w_k, w_v, cos, sin, kv_heads, head_dim, rope[1])
    k = torch.cat([past_key.to(k.dtype), k], dim=2)
    v = torch.cat([past_value.to(v.dtype), v], dim=2)
    y = masked_attention(q, k, v, scale, visible_keys(attention_mask, x.shape[1]))
    return moa_output(y, expert_idx, weights, w_o, b_o, kv_heads), k, v
