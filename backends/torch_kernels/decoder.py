"""Whole-model ops (moe_ir/ir/model_ops.py): embedding, RMSNorm and LayerNorm, RoPE, causal self-attention and
MLA, and both attentions in decode form with a KV cache.
Nothing here branches on data: the branches read shapes of weights and string options only, so the
same functions serve eager, torch.compile (dynamic B, S) and torch.export.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def embedding(ids, weight):
    """ids [B, S] int64 -> rows of weight [V, H]: [B, S, H]."""
    return F.embedding(ids, weight)


def rms_norm(x, weight, eps):
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim; the statistics in float32 even for
    bfloat16/float16 activations (as transformers computes them), float64 stays float64."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last dim (biased variance), computed in float32 (float64 stays), rounded to x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.nn.functional.layer_norm(x.to(compute), (x.shape[-1],), weight.to(compute),
                                       None if bias is None else bias.to(compute), eps)
    return y.to(x.dtype)


def rope_inverse_frequencies(dim, rope, compute, device, long=False):
    """[dim/2] inverse frequencies 1/theta^(2i/dim) of the rotated dims. rope = (theta, layout, rotary_dim, yarn,
    attention_factor, llama3, longrope); yarn = (factor, original_max_positions, beta_fast, beta_slow, truncate) or
    None; llama3 = (factor, original_max_positions, low_freq_factor, high_freq_factor) or None; longrope =
    (short_factors, long_factors, original_max_positions, short_mscale, long_mscale) or None: each frequency
    divided by its factor (the long ones when `long`). YaRN blends them with
    the interpolated 1/(factor theta^(2i/dim)) along a linear ramp between the dims that turn beta_fast and
    beta_slow times over the original context. Llama 3 divides the long wavelengths (above original / low) by
    the factor, keeps the short ones (below original / high) and blends linearly in original / wavelength
    between them."""
    theta, yarn, llama3, longrope = rope[0], rope[3], rope[5], rope[6]
    powers = theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(compute) / dim)
    original = 1.0 / powers
    if longrope is not None:
        factors = torch.tensor(longrope[1] if long else longrope[0], dtype=torch.float32, device=device).to(compute)
        return 1.0 / (factors * powers)
    if llama3 is not None:
        factor, length, low, high = llama3
        wavelength = 2 * math.pi / original
        scaled = torch.where(wavelength > length / low, original / factor, original)
        if high > low:
            blend = (length / wavelength - low) / (high - low)
            between = (wavelength <= length / low) & (wavelength >= length / high)
            scaled = torch.where(between, (1 - blend) * original / factor + blend * original, scaled)
        return scaled
    if yarn is None:
        return original
    factor, length, beta_fast, beta_slow, truncate = yarn
    low = dim * math.log(length / (beta_fast * 2 * math.pi)) / (2 * math.log(theta))
    high = dim * math.log(length / (beta_slow * 2 * math.pi)) / (2 * math.log(theta))
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=compute, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    return 1.0 / (factor * powers) * (1 - keep) + original * keep


def rope_angles_cos_sin(freqs, rope, like, long=False):
    """cos and sin of the angles freqs (times the attention factor, and LongRoPE's short or long mscale), in
    like's dtype."""
    cos, sin = freqs.cos(), freqs.sin()
    factor = rope[4] if rope[6] is None else rope[4] * rope[6][4 if long else 3]
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.to(like.dtype), sin.to(like.dtype)


def rope_cos_sin(seq_len, dim, rope, like):
    """cos, sin [S, dim/2] of positions 0..S-1; angles in float32 (float64 stays), then like's dtype. LongRoPE
    takes its long factors when S passes the original context."""
    compute = torch.float64 if like.dtype == torch.float64 else torch.float32
    long = rope[6] is not None and seq_len > rope[6][2]
    inv_freq = rope_inverse_frequencies(dim, rope, compute, like.device, long)
    freqs = torch.arange(seq_len, device=like.device, dtype=compute)[:, None] * inv_freq[None, :]
    return rope_angles_cos_sin(freqs, rope, like, long)


def rope_dim(rope, head_dim):
    """Dims of each head that RoPE rotates (rotary_dim, or the whole head)."""
    return rope[2] if rope[2] is not None else head_dim


def apply_rope(x, cos, sin, layout):
    """x [..., S, d] rotated by cos/sin [S, r/2]: the first r dims rotate, the rest pass through (partial rotary).
    layout "half": dim j pairs with j + r/2; "interleaved": dim 2j pairs with 2j+1, and the result comes out
    de-interleaved ([even, odd]) as DeepSeek-V3 writes it (queries and keys alike, so q.k is the same as with the
    complex form)."""
    r = 2 * cos.shape[-1]
    rest = x[..., r:]
    x = x[..., :r]
    if layout == "half":
        x1, x2 = x[..., :r // 2], x[..., r // 2:]
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def attention_with_sinks(q, k, v, scale, visible, sinks):
    """Attention whose softmax has one more logit per head, sinks [h], with no value (gpt-oss): q [B, h, S, d],
    k [B, hk, L, d], v [B, hk, L, dv], visible bool [B|1, 1, S, L] -> [B, h, S, dv]. Written out (SDPA takes no
    sink); the softmax in float32 (float64 stays)."""
    b, h, s, _ = q.shape
    if k.shape[1] != h:
        k = k.repeat_interleave(h // k.shape[1], dim=1)
        v = v.repeat_interleave(h // v.shape[1], dim=1)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (torch.matmul(q, k.transpose(-1, -2)) * scale).masked_fill(~visible, float("-inf")).to(compute)
    sink = sinks.to(compute).view(1, h, 1, 1).expand(b, h, s, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return torch.matmul(probs.to(q.dtype), v)


def causal_seen(s, device, window=None, chunk=None):
    """bool [S, S]: query i sees key j <= i (with a sliding window W only i - W < j; with chunks of C only
    j // C == i // C)."""
    pos = torch.arange(s, device=device)
    seen = pos[None, :] <= pos[:, None]
    if window is not None:
        seen = seen & (pos[:, None] - pos[None, :] < window)
    if chunk is not None:
        seen = seen & (pos[:, None] // chunk == pos[None, :] // chunk)
    return seen


def causal_attention(q, k, v, scale, window=None, chunk=None):
    """q [B, h, S, d], k [B, hk, S, d], v [B, hk, S, dv] -> [B, S, h*dv]; query head i reads kv head
    i // (h / hk); with a sliding window W query i sees only keys j with i - W < j <= i, with chunks of C only
    those with j // C == i // C. The kv heads are expanded before the fused kernel rather than passed with
    enable_gqa, which not every SDPA backend (nor torch.export on every torch) takes."""
    b, h, s, _ = q.shape
    rep = h // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if window is None and chunk is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_seen(s, q.device, window, chunk), scale=scale)
    return y.transpose(1, 2).reshape(b, s, h * v.shape[-1])


def attention_qkv(x, w_q, w_k, w_v, b_q, b_k, b_v, q_norm, k_norm, cos, sin, heads, kv_heads, head_dim, qk_norm,
                  rope_layout, norm_eps, clip=None):
    """q [B, heads, S, d], k and v [B, kv_heads, S, d] of the tokens x [B, S, H]: projected, q and k normalised
    ("full": the whole projection, OLMoE; "head": each head, Qwen3), clamped to [-clip, clip] after the projection
    and a "full" norm (OLMoE, DBRX), and rotated by cos/sin ("head_after_rope": rotated, then each head
    normalised, Hunyuan)."""
    b, s, _ = x.shape
    q, k, v = F.linear(x, w_q, b_q), F.linear(x, w_k, b_k), F.linear(x, w_v, b_v)
    if qk_norm == "full":
        q, k = rms_norm(q, q_norm, norm_eps), rms_norm(k, k_norm, norm_eps)
    if clip is not None:
        q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
    q = q.view(b, s, heads, head_dim).transpose(1, 2)
    k = k.view(b, s, kv_heads, head_dim).transpose(1, 2)
    v = v.view(b, s, kv_heads, head_dim).transpose(1, 2)
    if qk_norm == "head":
        q, k = rms_norm(q, q_norm, norm_eps), rms_norm(k, k_norm, norm_eps)
    q, k = apply_rope(q, cos, sin, rope_layout), apply_rope(k, cos, sin, rope_layout)
    if qk_norm == "head_after_rope":
        q, k = rms_norm(q, q_norm, norm_eps), rms_norm(k, k_norm, norm_eps)
    elif qk_norm == "weightless_after_rope":  # Llama 4: no weight, the statistics in float32
        q, k = unit_rms(q, norm_eps), unit_rms(k, norm_eps)
    return q, k, v


def unit_rms(x, eps):
    """x * rsqrt(mean(x^2) + eps) over the last dim, no weight; in float32 (float64 stays), rounded to x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)


def tuned_queries(q, positions, temperature):
    """q [B, h, S, d] times Llama 4's temperature 1 + scale * ln(1 + floor((p + 1) / floor_scale)) of each
    token's position (positions [S] or [B, S]); temperature = (floor_scale, scale) or None."""
    if temperature is None:
        return q
    floor_scale, coefficient = temperature
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scales = torch.log1p(torch.floor((positions.to(compute) + 1.0) / floor_scale)) * coefficient + 1.0
    scales = scales[None, None, :, None] if scales.dim() == 1 else scales[:, None, :, None]
    return (q.to(compute) * scales).to(q.dtype)


def attention(x, w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o, q_norm, k_norm, sinks, heads, kv_heads, head_dim, qk_norm,
              rope, norm_eps, scale, window, clip=None, chunk=None, temperature=None):
    """Causal MHA/GQA self-attention with RoPE (rope: rope_inverse_frequencies) on x [B, S, H] (positions
    0..S-1), softmax scale `scale`; optional sinks [heads] (gpt-oss), q/k/v clamped to [-clip, clip] (DBRX),
    sliding window, chunks and query temperature (Llama 4: tuned_queries)."""
    cos, sin = rope_cos_sin(x.shape[1], rope_dim(rope, head_dim), rope, x)
    q, k, v = attention_qkv(x, w_q, w_k, w_v, b_q, b_k, b_v, q_norm, k_norm, cos, sin, heads, kv_heads, head_dim,
                            qk_norm, rope[1], norm_eps, clip)
    q = tuned_queries(q, torch.arange(x.shape[1], device=x.device), temperature)
    if sinks is not None:
        seen = causal_seen(x.shape[1], x.device, window, chunk)
        return F.linear(merge_heads(attention_with_sinks(q, k, v, scale, seen, sinks)), w_o, b_o)
    return F.linear(causal_attention(q, k, v, scale, window, chunk), w_o, b_o)


def mla_latents(x, w_q, w_q_a, q_a_norm, w_q_b, w_kv_a, kv_a_norm, b_q_a, b_kv_a, cos, sin, heads, kv_lora_rank,
                qk_nope_head_dim, qk_rope_head_dim, rope_layout, norm_eps, latent_scales=(1.0, 1.0)):
    """Of the tokens x [B, S, H]: q_nope [B, n, S, nope], q_rot [B, n, S, rope] (rotated), the normalised latent
    c_kv [B, 1, S, r] and the rotated key k_rot [B, 1, S, rope] that every head shares. q from w_q or the
    low-rank w_q_b(norm(w_q_a x)); [c_kv, k_rot] = w_kv_a x; q and the normalised c_kv times latent_scales
    (LongCat-Flash)."""
    b, s, _ = x.shape
    nope, rope = qk_nope_head_dim, qk_rope_head_dim
    q_scale, kv_scale = latent_scales
    if w_q is not None:
        q = F.linear(x, w_q)
    else:
        q = F.linear(rms_norm(F.linear(x, w_q_a, b_q_a), q_a_norm, norm_eps), w_q_b)
    if q_scale != 1.0:
        q = q * q_scale
    q_nope, q_rot = q.view(b, s, heads, nope + rope).transpose(1, 2).split([nope, rope], dim=-1)
    c_kv, k_rot = F.linear(x, w_kv_a, b_kv_a).split([kv_lora_rank, rope], dim=-1)
    c_kv = rms_norm(c_kv, kv_a_norm, norm_eps)
    if kv_scale != 1.0:
        c_kv = c_kv * kv_scale
    c_kv = c_kv.unsqueeze(1)
    return (q_nope, apply_rope(q_rot, cos, sin, rope_layout), c_kv,
            apply_rope(k_rot.unsqueeze(1), cos, sin, rope_layout))


def mla_expand(c_kv, k_rot, w_kv_b, heads, qk_nope_head_dim, v_head_dim):
    """Per-head k [B, n, L, nope + rope] and v [B, n, L, dv] from the latent c_kv [B, 1, L, r] (w_kv_b: [k_nope, v]
    of every head) and the shared rotary key k_rot [B, 1, L, rope]."""
    b, _, length, _ = c_kv.shape
    kv = F.linear(c_kv.squeeze(1), w_kv_b).view(b, length, heads, qk_nope_head_dim + v_head_dim).transpose(1, 2)
    k_nope, v = kv.split([qk_nope_head_dim, v_head_dim], dim=-1)
    return torch.cat([k_nope, k_rot.expand(-1, heads, -1, -1)], dim=-1), v


def mla_attention(x, w_q, w_q_a, q_a_norm, w_q_b, w_kv_a, kv_a_norm, w_kv_b, w_o, b_q_a, b_kv_a, b_o, heads,
                  kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, rope, norm_eps, scale,
                  latent_scales=(1.0, 1.0)):
    """DeepSeek multi-head latent attention on x [B, S, H] (positions 0..S-1): k and v expanded per head from the
    latent, one rotary key shared by every head."""
    nope, rot = qk_nope_head_dim, qk_rope_head_dim
    cos, sin = rope_cos_sin(x.shape[1], rot, rope, x)
    q_nope, q_rot, c_kv, k_rot = mla_latents(x, w_q, w_q_a, q_a_norm, w_q_b, w_kv_a, kv_a_norm, b_q_a, b_kv_a, cos,
                                             sin, heads, kv_lora_rank, nope, rot, rope[1], norm_eps, latent_scales)
    k, v = mla_expand(c_kv, k_rot, w_kv_b, heads, nope, v_head_dim)
    return F.linear(causal_attention(torch.cat([q_nope, q_rot], dim=-1), k, v, scale), w_o, b_o)


# ---------------------------------------------------------------------------------------------------
# the decode form (model_ops.py: cached_attention, cached_mla_attention): S new tokens after a cache of P.


def rope_cos_sin_at(positions, dim, rope, like):
    """cos, sin [B, 1, S, dim/2] of the positions [B, S] of each token (angles as rope_cos_sin computes them)."""
    compute = torch.float64 if like.dtype == torch.float64 else torch.float32
    freqs = positions.to(compute)[..., None] * rope_inverse_frequencies(dim, rope, compute, like.device)
    cos, sin = rope_angles_cos_sin(freqs, rope, like)
    if rope[6] is not None:  # LongRoPE: the long tables when the call's last position passes the original context
        long_freqs = positions.to(compute)[..., None] * rope_inverse_frequencies(dim, rope, compute, like.device, True)
        long_cos, long_sin = rope_angles_cos_sin(long_freqs, rope, like, True)
        long = positions.max() + 1 > rope[6][2]
        cos, sin = torch.where(long, long_cos, cos), torch.where(long, long_sin, sin)
    return cos[:, None], sin[:, None]


def visible_keys(attention_mask, new_len, window=None, chunk=None, position_ids=None):
    """bool [B, 1, S, L] from attention_mask [B, L] (1 = real token): new token i, in cache slot L-S+i, sees
    slot j when j <= L-S+i and the mask keeps j (with a sliding window W also L-S+i - j < W; with chunks of C
    also when key position cumsum(mask)[j] - 1 and the query's position_ids fall in one chunk); it always sees
    itself, so a padding token's row is never empty (no NaN) and no real token reads a padding slot."""
    total = attention_mask.shape[1]
    slot = torch.arange(new_len, device=attention_mask.device)[:, None] + (total - new_len)
    key = torch.arange(total, device=attention_mask.device)[None, :]
    seen = key <= slot
    if window is not None:
        seen = seen & (slot - key < window)
    seen = attention_mask.bool()[:, None, None, :] & seen
    if chunk is not None:
        key_chunk = torch.div(attention_mask.cumsum(-1) - 1, chunk, rounding_mode="floor")
        query_chunk = torch.div(position_ids, chunk, rounding_mode="floor")
        seen = seen & (key_chunk[:, None, None, :] == query_chunk[:, None, :, None])
    return seen | (key == slot)


def masked_attention(q, k, v, scale, visible):
    """q [B, h, S, d], k [B, hk, L, d], v [B, hk, L, dv], visible bool [B, 1, S, L] -> [B, h, S, dv]; query
    head i reads kv head i // (h / hk). One kv head (MLA's latent cache) is broadcast, not copied."""
    h, hk = q.shape[1], k.shape[1]
    if hk == 1 and h > 1:
        k, v = k.expand(-1, h, -1, -1), v.expand(-1, h, -1, -1)
    elif h != hk:
        k = k.repeat_interleave(h // hk, dim=1)
        v = v.repeat_interleave(h // hk, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)


def merge_heads(y):
    """[B, h, S, d] -> [B, S, h*d]."""
    b, h, s, d = y.shape
    return y.transpose(1, 2).reshape(b, s, h * d)


def cached_attention(x, position_ids, attention_mask, past_key, past_value, w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o,
                     q_norm, k_norm, sinks, heads, kv_heads, head_dim, qk_norm, rope, norm_eps, scale, window,
                     clip=None, chunk=None, temperature=None):
    """`attention` on the new tokens x [B, S, H] at position_ids [B, S] after the past K/V [B, kv_heads, P, d]:
    (y [B, S, H], present key, present value [B, kv_heads, P+S, d])."""
    cos, sin = rope_cos_sin_at(position_ids, rope_dim(rope, head_dim), rope, x)
    q, k, v = attention_qkv(x, w_q, w_k, w_v, b_q, b_k, b_v, q_norm, k_norm, cos, sin, heads, kv_heads, head_dim,
                            qk_norm, rope[1], norm_eps, clip)
    q = tuned_queries(q, position_ids, temperature)
    k = torch.cat([past_key.to(k.dtype), k], dim=2)
    v = torch.cat([past_value.to(v.dtype), v], dim=2)
    visible = visible_keys(attention_mask, x.shape[1], window, chunk, position_ids)
    if sinks is not None:
        y = attention_with_sinks(q, k, v, scale, visible, sinks)
    else:
        y = masked_attention(q, k, v, scale, visible)
    return F.linear(merge_heads(y), w_o, b_o), k, v


def cached_mla_attention(x, position_ids, attention_mask, past_key, past_value, w_q, w_q_a, q_a_norm, w_q_b, w_kv_a,
                         kv_a_norm, w_kv_b, w_o, b_q_a, b_kv_a, b_o, heads, kv_lora_rank, qk_nope_head_dim,
                         qk_rope_head_dim, v_head_dim, rope, norm_eps, scale, cache_layout,
                         latent_scales=(1.0, 1.0)):
    """`mla_attention` on the new tokens x [B, S, H] after the past cache: (y, present key slot, present value
    slot). cache_layout "expanded": per-head K [B, n, P+S, nope+rope] and V [B, n, P+S, dv]. "latent": the
    normalised latent c_kv [B, 1, P+S, r] and the rotated shared key [B, 1, P+S, rope]; w_kv_b is absorbed
    (DeepSeek-V2 §2.1.2): the query's nope part is taken into the latent space (q_nope W_UK), attention runs
    over [latent, rotary] dims with the latent as value, and W_UV maps the result back per head, so the cache
    is never expanded to heads."""
    nope, rot, dv, r = qk_nope_head_dim, qk_rope_head_dim, v_head_dim, kv_lora_rank
    cos, sin = rope_cos_sin_at(position_ids, rot, rope, x)
    q_nope, q_rot, c_kv, k_rot = mla_latents(x, w_q, w_q_a, q_a_norm, w_q_b, w_kv_a, kv_a_norm, b_q_a, b_kv_a, cos,
                                             sin, heads, r, nope, rot, rope[1], norm_eps, latent_scales)
    visible = visible_keys(attention_mask, x.shape[1])
    if cache_layout == "latent":
        c_kv = torch.cat([past_key.to(c_kv.dtype), c_kv], dim=2)
        k_rot = torch.cat([past_value.to(k_rot.dtype), k_rot], dim=2)
        w = w_kv_b.view(heads, nope + dv, r)
        q_latent = torch.matmul(q_nope, w[:, :nope])                          # [B, n, S, r]
        y_latent = masked_attention(torch.cat([q_latent, q_rot], dim=-1), torch.cat([c_kv, k_rot], dim=-1), c_kv,
                                    scale, visible)                             # [B, n, S, r]
        y = torch.matmul(y_latent, w[:, nope:].transpose(1, 2))               # [B, n, S, dv]
        return F.linear(merge_heads(y), w_o, b_o), c_kv, k_rot
    k, v = mla_expand(c_kv, k_rot, w_kv_b, heads, nope, dv)
    k = torch.cat([past_key.to(k.dtype), k], dim=2)
    v = torch.cat([past_value.to(v.dtype), v], dim=2)
    y = masked_attention(torch.cat([q_nope, q_rot], dim=-1), k, v, scale, visible)
    return F.linear(merge_heads(y), w_o, b_o), k, v
