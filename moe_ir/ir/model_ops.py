"""Whole-model ops: embedding, RMSNorm and causal self-attention (MHA/GQA with RoPE, and DeepSeek's
multi-head latent attention), in prefill form and in decode form (with a KV cache), declared like the layer
ops in ops.py and registered in the same registry.

Reference semantics follow the transformers implementations the tests compare against:
  rms_norm       x * rsqrt(mean(x^2) + eps) computed in float32 (float64 stays float64), times the weight
  attention      LlamaAttention-style: q/k/v projections (optional biases), optional RMSNorm on q and k
                 (per head, or over the whole projection as OLMoE does), RoPE on positions 0..S-1, causal
                 softmax(q k^T / sqrt(head_dim)) v with k/v heads shared by heads/kv_heads query heads, o_proj
  mla_attention  DeepseekV2/V3Attention: q = q_proj(x) or q_b(rms_norm(q_a(x))); [c_kv, k_rope] = kv_a(x);
                 [k_nope, v] = kv_b(rms_norm(c_kv)) per head; RoPE on the last qk_rope_head_dim dims of q
                 and on the single k_rope shared by every head; scale 1/sqrt(qk_nope + qk_rope); LongCat-Flash
                 multiplies q by q_latent_scale and the normalised c_kv by kv_latent_scale
RoPE (every attention op): inverse frequencies 1/theta^(2i/r) over the r rotated dims of a head (`rotary_dim`, the
leading dims, as transformers' partial rotary embedding; the rest pass through), or YaRN's blend of those with
the interpolated 1/(factor theta^(2i/r)) when `yarn_factor` is set (moe_ir.model_spec.RopeScaling); cos and sin
are multiplied by `rope_attention_factor`; the softmax scale is `softmax_scale` when set (DeepSeek's YaRN
correction), else 1/sqrt(query/key head dim). Llama 3's scaling (`llama3_factor`) divides the long wavelengths
by the factor and blends the middle band (moe_ir.model_spec.RopeScaling). LongRoPE (`longrope_*`) divides each
frequency by its own factor and multiplies cos/sin by an mscale, the short ones while a call's last position + 1
stays within longrope_original_max_positions and the long ones beyond (per call, as Phi-3 does: a decode step
past the boundary rotates new tokens by the long factors while the cache keeps keys rotated by the short ones).
Llama 4's attention (mha/gqa): `chunk_size` hides keys whose position falls in another chunk than the query's
(position // chunk_size); `temperature_floor_scale` multiplies the queries of a layer without RoPE by
1 + temperature_scale * ln(1 + floor((position + 1) / floor_scale)); qk_norm `weightless_after_rope` divides each
rotated query and key head by its root mean square (no weight). Positions are 0..S-1 in prefill and position_ids
in decode (keys: cumsum(attention_mask) - 1), so left padding does not shift chunks or temperatures.
RoPE layouts: `half` rotates dim j with j + d/2 (rotate_half); `interleaved` rotates dim 2j with 2j+1,
as DeepSeek's checkpoints expect (transformers' DeepseekV3 `rope_interleave`, DeepseekV2's complex form).
The interleaved result is written de-interleaved ([even dims, odd dims]) as DeepseekV3 does; queries and
keys are permuted alike, so q.k and the attention output are the same as with the complex form.

Decode form (`cached_attention`, `cached_mla_attention`): the same attention on S new tokens with a cache
of P earlier ones. Besides x [B, S, H] it takes `position_ids` i64 [B, S] (the RoPE position of each new
token), `attention_mask` i64 [B, P+S] (1 = a real token, 0 = padding, over past and new tokens) and the
past cache; it returns y and the present cache (past and new tokens, P+S along dim 2). New token i sits
in cache slot P+i and sees slot j when j <= P+i and the mask keeps j (it always sees itself, so a padding
token stays finite and no real token ever reads it). Prefill is the decode form with an empty past
(P = 0), positions 0..S-1 and a mask of ones: `attention` / `mla_attention` are exactly that (their
reference runs the same functions), so one graph can serve prefill and decode. Cache layouts:
  mha / gqa      key [B, kv_heads, L, head_dim] and value [B, kv_heads, L, head_dim], keys after q/k norm
                 and RoPE (what transformers caches)
  mla expanded   key [B, heads, L, qk_nope + qk_rope] (the rotary part repeated per head) and value
                 [B, heads, L, v_head_dim] (what transformers caches)
  mla latent     key slot: the normalised latent c_kv [B, 1, L, kv_lora_rank]; value slot: the rotated shared
                 key k_rope [B, 1, L, qk_rope_head_dim] (what DeepSeek's inference caches; a kernel absorbs
                 w_kv_b into the query and the output instead of expanding the cache)
The reference expands the latent cache back to per-head K/V and attends as the expanded layout does; that
is the obviously right form against which an absorbed kernel is checked.
"""
from __future__ import annotations

import enum
import math

from ..lazy import LazyModule

# Reference semantics import torch on first use: the declarations alone (inspect, graph) need none.
torch = LazyModule("torch")
F = LazyModule("torch.nn.functional")

from ..model_spec import QKNorm, RopeLayout
from .graph import ElemType, TensorType
from .ops import Attr, OpCode, OpDef, Port, expect, expect_dim, expect_float, expect_rank, register


class MLACacheLayout(enum.StrEnum):
    """What the decode form of multi-head latent attention caches (module docstring)."""
    EXPANDED = "expanded"  # per-head K and V, as transformers caches them
    LATENT = "latent"      # the compressed latent c_kv and the shared rotary key, as DeepSeek's inference does


def rms_norm_math(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def _yarn_ramp_ends(attrs, dim: int) -> tuple[float, float]:
    """The dims (in pairs) where YaRN's ramp from original to interpolated frequencies starts and ends: those that
    turn beta_fast and beta_slow times over the original context, rounded outwards when truncating."""
    theta, length = attrs["rope_theta"], attrs["yarn_original_max_positions"]

    def dim_of(rotations: float) -> float:
        return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(attrs["yarn_beta_fast"]), dim_of(attrs["yarn_beta_slow"])
    if attrs["yarn_truncate"]:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def _llama3_frequencies(attrs, original: torch.Tensor) -> torch.Tensor:
    """Llama 3's scaling of the inverse frequencies (moe_ir.model_spec.RopeScaling, kind llama3): by wavelength,
    divided by the factor (long), kept (short), or blended linearly in original_max_positions / wavelength."""
    factor, length = attrs["llama3_factor"], attrs["llama3_original_max_positions"]
    low, high = attrs["llama3_low_freq_factor"], attrs["llama3_high_freq_factor"]
    wavelength = 2 * math.pi / original
    scaled = torch.where(wavelength > length / low, original / factor, original)
    if high > low:  # equal factors leave no band between the two
        blend = (length / wavelength - low) / (high - low)
        between = (wavelength <= length / low) & (wavelength >= length / high)
        scaled = torch.where(between, (1 - blend) * original / factor + blend * original, scaled)
    return scaled


def is_longrope(attrs) -> bool:
    return attrs.get("longrope_short_factors") is not None


def rope_inverse_frequencies(attrs, dim: int, compute: torch.dtype, device=None, long: bool = False) -> torch.Tensor:
    """[dim/2] inverse frequencies of the rotated dims: 1/theta^(2i/dim), blended by YaRN (RopeScaling) with the
    interpolated 1/(factor theta^(2i/dim)) when yarn_factor is set, scaled as Llama 3 does when llama3_factor
    is, or divided by LongRoPE's per-pair factors (the long ones when `long`)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(compute) / dim
    powers = attrs["rope_theta"] ** exponents
    original = 1.0 / powers
    if is_longrope(attrs):
        factors = attrs["longrope_long_factors" if long else "longrope_short_factors"]
        return 1.0 / (torch.tensor(factors, dtype=torch.float32, device=device).to(compute) * powers)
    if attrs.get("llama3_factor") is not None:
        return _llama3_frequencies(attrs, original)
    factor = attrs["yarn_factor"]
    if factor is None:
        return original
    low, high = _yarn_ramp_ends(attrs, dim)
    if low == high:
        high += 0.001  # a one-dim ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=compute, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # the weight of the original frequency
    return 1.0 / (factor * powers) * (1 - keep) + original * keep


def rope_dims(attrs, head_dim: int) -> int:
    """Dims of each head RoPE rotates: rotary_dim, or all of head_dim."""
    return attrs["rotary_dim"] if attrs.get("rotary_dim") is not None else head_dim


def rope_cos_sin(seq_len: int, dim: int, attrs, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, dim/2] for positions 0..S-1 (float32 as transformers computes them; float64 stays), times
    rope_attention_factor."""
    positions = torch.arange(seq_len, device=like.device)
    long = is_longrope(attrs) and seq_len > attrs["longrope_original_max_positions"]
    return _cos_sin(positions[:, None].to(torch.float64 if like.dtype == torch.float64 else torch.float32),
                    dim, attrs, like, long)


def rope_cos_sin_at(positions: torch.Tensor, dim: int, attrs, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, S, dim/2] for the positions i64 [B, S] of each token (broadcast over heads)."""
    compute = torch.float64 if like.dtype == torch.float64 else torch.float32
    cos, sin = _cos_sin(positions.to(compute)[..., None], dim, attrs, like)
    if is_longrope(attrs):  # the long tables when the call's last position passes the original context
        long_cos, long_sin = _cos_sin(positions.to(compute)[..., None], dim, attrs, like, True)
        long = positions.max() + 1 > attrs["longrope_original_max_positions"]
        cos, sin = torch.where(long, long_cos, cos), torch.where(long, long_sin, sin)
    return cos[:, None], sin[:, None]


def rope_cos_sin_factor(attrs, long: bool = False) -> float:
    """The multiplier of cos and sin: rope_attention_factor, times LongRoPE's short or long mscale."""
    factor = attrs["rope_attention_factor"]
    if is_longrope(attrs):
        factor = factor * attrs["longrope_long_mscale" if long else "longrope_short_mscale"]
    return factor


def _cos_sin(positions: torch.Tensor, dim: int, attrs, like: torch.Tensor,
             long: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions * rope_inverse_frequencies(attrs, dim, positions.dtype, like.device, long)
    cos, sin = freqs.cos(), freqs.sin()
    factor = rope_cos_sin_factor(attrs, long)
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.to(like.dtype), sin.to(like.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: RopeLayout) -> torch.Tensor:
    """x [..., S, d] rotated by the angles of cos/sin [S, r/2] (or [B, 1, S, r/2]): the first r dims rotate, the
    rest pass through (partial rotary embedding when r < d)."""
    r = 2 * cos.shape[-1]
    rest = x[..., r:]
    x = x[..., :r]
    if layout == RopeLayout.HALF:
        x1, x2 = x[..., :r // 2], x[..., r // 2:]
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def attention_scale(attrs, qk_head_dim: int) -> float:
    """The softmax scale: softmax_scale when set (YaRN's DeepSeek correction), else 1/sqrt(qk head dim)."""
    scale = attrs.get("softmax_scale")
    return scale if scale is not None else qk_head_dim ** -0.5


def visible_keys(attention_mask: torch.Tensor, new_len: int, window: int | None = None, chunk: int | None = None,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """bool [B, 1, S, L] from attention_mask [B, L]: new token i (cache slot L-S+i) sees slot j when
    j <= L-S+i and the mask keeps j (with a sliding window W, also when L-S+i - j < W: the W latest slots; with
    chunked attention of chunk C, also when the key's position and the query's fall in one chunk: key position
    cumsum(mask)[j] - 1, the query's position_ids [B, S]), and always sees itself (a padding token attends to
    itself only, so no row is all -inf and no NaN reaches a later layer through the padding's keys and values)."""
    total = attention_mask.shape[1]
    slot = torch.arange(new_len, device=attention_mask.device)[:, None] + (total - new_len)
    key = torch.arange(total, device=attention_mask.device)[None, :]
    seen = key <= slot
    if window is not None:
        seen = seen & (slot - key < window)
    seen = attention_mask.bool()[:, None, None, :] & seen
    if chunk is not None:
        key_positions = attention_mask.cumsum(-1) - 1
        seen = seen & (torch.div(key_positions, chunk, rounding_mode="floor")[:, None, None, :] ==
                       torch.div(position_ids, chunk, rounding_mode="floor")[:, None, :, None])
    return seen | (key == slot)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, visible: torch.Tensor,
           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [B,h,S,d], k [B,hk,L,d], v [B,hk,L,dv], visible bool [B|1, 1, S, L] -> [B,S,h*dv];
    query head i reads kv head i // (h/hk). `sinks` [h] (gpt-oss): one more logit per head in each softmax,
    with no value: the weights of the real keys sum to less than 1."""
    b, h, s, _ = q.shape
    rep = h // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = scores.to(compute)
    if sinks is not None:
        sink = sinks.to(compute).view(1, h, 1, 1).expand(b, h, s, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1].to(q.dtype)
    else:
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, v).transpose(1, 2).reshape(b, s, -1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     sinks: torch.Tensor | None = None, window: int | None = None,
                     chunk: int | None = None) -> torch.Tensor:
    """q [B,h,S,d], k [B,hk,S,d], v [B,hk,S,dv] -> [B,S,h*dv]: `attend` with no past and no padding (query i
    sees keys j <= i, with a sliding window W only those with i - j < W, with chunks of C only those with
    j // C == i // C)."""
    s = q.shape[2]
    hidden = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    if window is not None:
        hidden = hidden | torch.ones(s, s, dtype=torch.bool, device=q.device).tril(-window)
    if chunk is not None:
        block = torch.arange(s, device=q.device) // chunk
        hidden = hidden | (block[:, None] != block[None, :])
    return attend(q, k, v, scale, ~hidden, sinks)


def temperature_scales(attrs, positions: torch.Tensor) -> torch.Tensor:
    """Llama 4's query temperature at the positions (any shape): 1 + scale * ln(1 + floor((p + 1) / floor_scale)),
    in float32 (float64 stays)."""
    compute = torch.float64 if positions.dtype == torch.float64 else torch.float32
    steps = torch.floor((positions.to(compute) + 1.0) / attrs["temperature_floor_scale"])
    return torch.log1p(steps) * attrs["temperature_scale"] + 1.0


def tuned_queries(attrs, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """q [B, h, S, d] times the temperature of each token's position ([S] or [B, S]) when the node has one."""
    if attrs.get("temperature_floor_scale") is None:
        return q
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scales = temperature_scales(attrs, positions.to(compute))
    scales = scales[None, None, :, None] if scales.dim() == 1 else scales[:, None, :, None]
    return (q.to(compute) * scales).to(q.dtype)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, heads*d] -> [B, heads, S, d]."""
    b, s, _ = t.shape
    return t.view(b, s, heads, -1).transpose(1, 2)


def _expect_linear(node, w: TensorType | None, rows, cols, what: str) -> None:
    expect(w is not None and w.rank == 2, node, f"{what} must be a matrix, found {w}")
    expect(w.shape == (rows, cols), node, f"{what} must be [{rows}, {cols}], found {w}")


def _expect_vector(node, b: TensorType | None, size, what: str) -> None:
    if b is not None:
        expect(b.shape == (size,), node, f"{what} must be [{size}], found {b}")


# Ports of the decode form, between x and the weights.
_CACHE_PORTS = (Port("position_ids"), Port("attention_mask"), Port("past_key"), Port("past_value"))


def _cache_types(node, x: TensorType, position_ids: TensorType, mask: TensorType, past_key: TensorType,
                 past_value: TensorType, key: tuple[int, int], value: tuple[int, int]) -> list[TensorType]:
    """Checks of the decode-form operands; the present key and value types ([B, heads, L, dim] each, with
    (heads, dim) of `key` / `value`), L being the attention mask's length."""
    expect_rank(x, 3, node, "x")
    b, s = x.shape[:2]
    for t, what in ((position_ids, "position_ids"), (mask, "attention_mask")):
        expect(t.dtype == ElemType.INT64 and t.rank == 2, node, f"{what} must be i64[B, ...], found {t}")
        expect_dim(t.shape[0], b, node, f"{what} batch vs x")
    expect_dim(position_ids.shape[1], s, node, "position_ids length vs the new tokens of x")
    for t, (heads, dim), what in ((past_key, key, "past_key"), (past_value, value, "past_value")):
        expect(t.rank == 4 and t.dtype == x.dtype, node, f"{what} must be {x.dtype.value}[B, {heads}, P, {dim}], "
                                                         f"found {t}")
        expect_dim(t.shape[0], b, node, f"{what} batch vs x")
        expect(t.shape[1] == heads and t.shape[3] == dim, node, f"{what} must be [B, {heads}, P, {dim}], found {t}")
    expect_dim(past_key.shape[2], past_value.shape[2], node, "past_key length vs past_value length")
    total = mask.shape[1]
    if all(isinstance(d, int) for d in (past_key.shape[2], s, total)):
        expect(total == past_key.shape[2] + s, node, f"attention_mask covers {total} tokens; past {past_key.shape[2]} "
                                                     f"+ new {s} = {past_key.shape[2] + s}")
    return [TensorType((b, key[0], total, key[1]), x.dtype), TensorType((b, value[0], total, value[1]), x.dtype)]


@register
class Embedding(OpDef):
    opcode = OpCode.EMBEDDING
    doc = "token ids [B, S] -> rows of the embedding matrix [V, H]: [B, S, H]"
    inputs = (Port("ids"), Port("weight"))
    output_names = ("x",)

    def infer_types(self, node, ids, weight):
        expect(ids.dtype == ElemType.INT64 and ids.rank == 2, node, f"ids must be i64[B,S], found {ids}")
        expect_rank(weight, 2, node, "embedding weight")
        return [TensorType(ids.shape + (weight.shape[1],), weight.dtype)]

    def reference(self, attrs, ids, weight):
        return (F.embedding(ids, weight),)


@register
class Scale(OpDef):
    opcode = OpCode.SCALE
    doc = "x * factor, in x's dtype"
    inputs = (Port("x"),)
    output_names = ("y",)
    attrs = {"factor": Attr(float)}

    def infer_types(self, node, x):
        expect_float(x, node, "x")
        return [x]

    def reference(self, attrs, x):
        return (x * attrs["factor"],)


@register
class RMSNorm(OpDef):
    opcode = OpCode.RMS_NORM
    doc = "x * rsqrt(mean(x^2, last dim) + eps) * weight, the statistics in float32"
    inputs = (Port("x"), Port("weight"))
    output_names = ("y",)
    attrs = {"eps": Attr(float, 1e-6)}

    def infer_types(self, node, x, weight):
        expect_float(x, node, "x")
        expect(weight.shape == (x.shape[-1],), node, f"weight must be [{x.shape[-1]}], found {weight}")
        return [x]

    def reference(self, attrs, x, weight):
        return (rms_norm_math(x, weight, attrs["eps"]),)


def layer_norm_math(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim (biased variance), computed in float32
    (float64 stays), rounded to x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    centred = xf - xf.mean(dim=-1, keepdim=True)
    normed = centred * torch.rsqrt(centred.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.to(compute)
    return (normed if bias is None else normed + bias.to(compute)).to(x.dtype)


@register
class LayerNorm(OpDef):
    opcode = OpCode.LAYER_NORM
    doc = "LayerNorm over the last dim: (x - mean) * rsqrt(var + eps) * weight (+ bias), statistics in float32"
    inputs = (Port("x"), Port("weight"), Port("bias", optional=True))
    output_names = ("y",)
    attrs = {"eps": Attr(float, 1e-5)}

    def infer_types(self, node, x, weight, bias):
        expect_float(x, node, "x")
        expect(weight.shape == (x.shape[-1],), node, f"weight must be [{x.shape[-1]}], found {weight}")
        if bias is not None:
            expect(bias.shape == (x.shape[-1],), node, f"bias must be [{x.shape[-1]}], found {bias}")
        return [x]

    def reference(self, attrs, x, weight, bias):
        return (layer_norm_math(x, weight, bias, attrs["eps"]),)


_ROPE_ATTRS = {"rope_theta": Attr(float, 10000.0), "rope_layout": Attr(RopeLayout, RopeLayout.HALF),
               "norm_eps": Attr(float, 1e-6, "epsilon of the q/k (or latent) RMSNorms"),
               "rotary_dim": Attr((int, type(None)), None, "leading dims of each head RoPE rotates; None: all, 0: none"),
               "yarn_factor": Attr((float, type(None)), None, "YaRN context factor; None: plain RoPE"),
               "yarn_original_max_positions": Attr(int, 4096, "YaRN: the pretraining context"),
               "yarn_beta_fast": Attr(float, 32.0), "yarn_beta_slow": Attr(float, 1.0),
               "yarn_truncate": Attr(bool, True),
               "rope_attention_factor": Attr(float, 1.0, "multiplier of cos and sin (YaRN)"),
               "softmax_scale": Attr((float, type(None)), None, "None: 1/sqrt(query/key head dim)"),
               # Llama 3 scaling; quiet: a text form shows them only where they are set
               "llama3_factor": Attr((float, type(None)), None, "Llama 3 RoPE scaling factor; None: none", quiet=True),
               "llama3_original_max_positions": Attr(int, 8192, "Llama 3 scaling: the pretraining context",
                                                     quiet=True),
               "llama3_low_freq_factor": Attr(float, 1.0, quiet=True),
               "llama3_high_freq_factor": Attr(float, 4.0, quiet=True),
               # LongRoPE (Phi-3): per-pair divisors and cos/sin multipliers, short or long by the call's length
               "longrope_short_factors": Attr((tuple, type(None)), None, "LongRoPE divisors per rotated pair while "
                                              "the sequence fits the original context; None: none", quiet=True),
               "longrope_long_factors": Attr((tuple, type(None)), None, "LongRoPE divisors beyond it", quiet=True),
               "longrope_original_max_positions": Attr(int, 4096, "LongRoPE: the pretraining context", quiet=True),
               "longrope_short_mscale": Attr(float, 1.0, quiet=True),
               "longrope_long_mscale": Attr(float, 1.0, quiet=True)}


# ---------------------------------------------------------------------------------------------------
# MHA / GQA


_MHA_WEIGHTS = (Port("w_q"), Port("w_k"), Port("w_v"), Port("w_o"), Port("b_q", optional=True),
                Port("b_k", optional=True), Port("b_v", optional=True), Port("b_o", optional=True),
                Port("q_norm", optional=True), Port("k_norm", optional=True), Port("sinks", optional=True))
_MHA_ATTRS = {"heads": Attr(int), "kv_heads": Attr(int), "head_dim": Attr(int),
              "qk_norm": Attr(QKNorm, QKNorm.NONE), **_ROPE_ATTRS,
              "sliding_window": Attr((int, type(None)), None, "a query sees only the W latest keys (itself "
                                                              "included); None: every earlier key"),
              "clip_qkv": Attr((float, type(None)), None, "q, k and v clamped to [-c, c] after their projections "
                                                          "and a whole-projection q/k norm, before the split into "
                                                          "heads (OLMoE, DBRX); None: not clamped"),
              "chunk_size": Attr((int, type(None)), None, "a query sees only the keys whose position falls in its "
                                                          "own chunk (position // chunk_size); None: no chunks",
                                 quiet=True),
              "temperature_floor_scale": Attr((float, type(None)), None, "queries times 1 + temperature_scale * "
                                              "ln(1 + floor((position + 1) / this)); None: no temperature",
                                              quiet=True),
              "temperature_scale": Attr(float, 0.0, "the temperature's coefficient", quiet=True)}


def _mha_types(node, x, w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o, q_norm, k_norm, sinks) -> TensorType:
    """Checks of x and the weights; the type of y."""
    a = node.attrs
    expect_rank(x, 3, node, "x")
    h = x.shape[2]
    nq, nkv, d = a["heads"] * a["head_dim"], a["kv_heads"] * a["head_dim"], a["head_dim"]
    expect(a["heads"] % a["kv_heads"] == 0, node, f"kv_heads={a['kv_heads']} must divide heads={a['heads']}")
    r = rope_dims(a, d)
    expect(r % 2 == 0 and 0 <= r <= d, node, f"RoPE rotates pairs of dims: {r} rotated dims of a head of {d}")
    if is_longrope(a) and r:
        for key in ("longrope_short_factors", "longrope_long_factors"):
            expect(a[key] is not None and 2 * len(a[key]) == r, node, f"{key} must have one factor per rotated pair "
                                                                      f"({r // 2})")
    expect(a["sliding_window"] is None or a["sliding_window"] >= 1, node, "sliding_window must be at least 1")
    expect(a["clip_qkv"] is None or a["clip_qkv"] > 0, node, "clip_qkv must be positive")
    _expect_linear(node, w_q, nq, h, "w_q")
    _expect_linear(node, w_k, nkv, h, "w_k")
    _expect_linear(node, w_v, nkv, h, "w_v")
    expect_dim(w_o.shape[1], nq, node, "w_o columns vs heads*head_dim")
    for b, size, what in ((b_q, nq, "b_q"), (b_k, nkv, "b_k"), (b_v, nkv, "b_v"), (b_o, w_o.shape[0], "b_o")):
        _expect_vector(node, b, size, what)
    norm = a["qk_norm"]
    expect(a["chunk_size"] is None or a["chunk_size"] >= 1, node, "chunk_size must be at least 1")
    expect(a["temperature_floor_scale"] is None or r == 0, node, "the attention temperature is for layers without "
                                                                  "RoPE (rotary_dim 0)")
    if norm in (QKNorm.NONE, QKNorm.WEIGHTLESS_AFTER_ROPE):
        expect(q_norm is None and k_norm is None, node, f"qk_norm {norm.value} takes no q/k norm weights")
    else:
        qs, ks = (nq, nkv) if norm == QKNorm.FULL else (d, d)
        _expect_vector(node, q_norm, qs, "q_norm")
        _expect_vector(node, k_norm, ks, "k_norm")
        expect(q_norm is not None and k_norm is not None, node, f"qk_norm {norm.value} needs q_norm and k_norm")
    _expect_vector(node, sinks, a["heads"], "sinks")
    return TensorType(x.shape[:2] + (w_o.shape[0],), x.dtype)


def _mha_qkv(attrs, x, cos, sin, w_q, w_k, w_v, b_q, b_k, b_v, q_norm, k_norm):
    """q [B, heads, S, d], k and v [B, kv_heads, S, d] of the tokens x, q and k normalised and rotated."""
    heads, kv_heads = attrs["heads"], attrs["kv_heads"]
    norm, eps = attrs["qk_norm"], attrs["norm_eps"]
    q, k, v = F.linear(x, w_q, b_q), F.linear(x, w_k, b_k), F.linear(x, w_v, b_v)
    if norm == QKNorm.FULL:
        q, k = rms_norm_math(q, q_norm, eps), rms_norm_math(k, k_norm, eps)
    clip = attrs["clip_qkv"]
    if clip is not None:
        q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
    q, k, v = _heads(q, heads), _heads(k, kv_heads), _heads(v, kv_heads)
    if norm == QKNorm.HEAD:
        q, k = rms_norm_math(q, q_norm, eps), rms_norm_math(k, k_norm, eps)
    q, k = apply_rope(q, cos, sin, attrs["rope_layout"]), apply_rope(k, cos, sin, attrs["rope_layout"])
    if norm == QKNorm.HEAD_AFTER_ROPE:
        q, k = rms_norm_math(q, q_norm, eps), rms_norm_math(k, k_norm, eps)
    elif norm == QKNorm.WEIGHTLESS_AFTER_ROPE:
        q, k = unit_rms(q, eps), unit_rms(k, eps)
    return q, k, v


def unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) over the last dim, no weight (Llama 4's q/k norm), in float32 (float64 stays)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)


@register
class Attention(OpDef):
    opcode = OpCode.ATTENTION
    doc = "causal multi-head / grouped-query self-attention with RoPE on x [B, S, H] (positions 0..S-1)"
    inputs = (Port("x"),) + _MHA_WEIGHTS
    output_names = ("y",)
    attrs = _MHA_ATTRS

    def infer_types(self, node, x, *weights):
        return [_mha_types(node, x, *weights)]

    def reference(self, attrs, x, w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o, q_norm, k_norm, sinks):
        d = attrs["head_dim"]
        cos, sin = rope_cos_sin(x.shape[1], rope_dims(attrs, d), attrs, x)
        q, k, v = _mha_qkv(attrs, x, cos, sin, w_q, w_k, w_v, b_q, b_k, b_v, q_norm, k_norm)
        q = tuned_queries(attrs, q, torch.arange(x.shape[1], device=x.device))
        return (F.linear(causal_attention(q, k, v, attention_scale(attrs, d), sinks, attrs["sliding_window"],
                                          attrs["chunk_size"]), w_o, b_o),)


@register
class CachedAttention(OpDef):
    opcode = OpCode.CACHED_ATTENTION
    doc = ("attention in decode form: S new tokens x [B, S, H] at position_ids, after the past K/V "
           "[B, kv_heads, P, head_dim]; y and the present K/V [B, kv_heads, P+S, head_dim]")
    inputs = (Port("x"),) + _CACHE_PORTS + _MHA_WEIGHTS
    output_names = ("y", "present_key", "present_value")
    attrs = _MHA_ATTRS

    def infer_types(self, node, x, position_ids, attention_mask, past_key, past_value, *weights):
        a = node.attrs
        kv = (a["kv_heads"], a["head_dim"])
        return [_mha_types(node, x, *weights),
                *_cache_types(node, x, position_ids, attention_mask, past_key, past_value, kv, kv)]

    def reference(self, attrs, x, position_ids, attention_mask, past_key, past_value, w_q, w_k, w_v, w_o, b_q, b_k,
                  b_v, b_o, q_norm, k_norm, sinks):
        d = attrs["head_dim"]
        cos, sin = rope_cos_sin_at(position_ids, rope_dims(attrs, d), attrs, x)
        q, k, v = _mha_qkv(attrs, x, cos, sin, w_q, w_k, w_v, b_q, b_k, b_v, q_norm, k_norm)
        q = tuned_queries(attrs, q, position_ids)
        k, v = torch.cat([past_key.to(k.dtype), k], dim=2), torch.cat([past_value.to(v.dtype), v], dim=2)
        visible = visible_keys(attention_mask, x.shape[1], attrs["sliding_window"], attrs["chunk_size"], position_ids)
        y = attend(q, k, v, attention_scale(attrs, d), visible, sinks)
        return F.linear(y, w_o, b_o), k, v


# ---------------------------------------------------------------------------------------------------
# multi-head latent attention


_MLA_WEIGHTS = (Port("w_q", optional=True), Port("w_q_a", optional=True), Port("q_a_norm", optional=True),
                Port("w_q_b", optional=True), Port("w_kv_a"), Port("kv_a_norm"), Port("w_kv_b"), Port("w_o"),
                Port("b_q_a", optional=True), Port("b_kv_a", optional=True), Port("b_o", optional=True))
_MLA_ATTRS = {"heads": Attr(int), "kv_lora_rank": Attr(int), "qk_nope_head_dim": Attr(int),
              "qk_rope_head_dim": Attr(int), "v_head_dim": Attr(int), **_ROPE_ATTRS,
              # LongCat-Flash's LoRA scales; quiet: a text form shows them only where they are set
              "q_latent_scale": Attr(float, 1.0, "multiplier of the query after its projection", quiet=True),
              "kv_latent_scale": Attr(float, 1.0, "multiplier of the normalised kv latent (cached so in the latent "
                                                  "layout)", quiet=True)}


def _mla_types(node, x, w_q, w_q_a, q_a_norm, w_q_b, w_kv_a, kv_a_norm, w_kv_b, w_o, b_q_a, b_kv_a, b_o) -> TensorType:
    """Checks of x and the weights; the type of y."""
    a = node.attrs
    expect_rank(x, 3, node, "x")
    h, n = x.shape[2], a["heads"]
    dqk = a["qk_nope_head_dim"] + a["qk_rope_head_dim"]
    r, rope = a["kv_lora_rank"], a["qk_rope_head_dim"]
    expect(rope % 2 == 0, node, f"RoPE needs an even qk_rope_head_dim, found {rope}")
    if w_q is not None:
        expect(w_q_a is None and q_a_norm is None and w_q_b is None and b_q_a is None, node,
               "give either w_q or the low-rank w_q_a / q_a_norm / w_q_b, not both")
        _expect_linear(node, w_q, n * dqk, h, "w_q")
    else:
        expect(w_q_a is not None and q_a_norm is not None and w_q_b is not None, node,
               "without w_q the low-rank query needs w_q_a, q_a_norm and w_q_b")
        rank = w_q_a.shape[0]
        _expect_linear(node, w_q_a, rank, h, "w_q_a")
        _expect_vector(node, q_a_norm, rank, "q_a_norm")
        _expect_linear(node, w_q_b, n * dqk, rank, "w_q_b")
        _expect_vector(node, b_q_a, rank, "b_q_a")
    _expect_linear(node, w_kv_a, r + rope, h, "w_kv_a")
    _expect_vector(node, b_kv_a, r + rope, "b_kv_a")
    _expect_vector(node, kv_a_norm, r, "kv_a_norm")
    _expect_linear(node, w_kv_b, n * (a["qk_nope_head_dim"] + a["v_head_dim"]), r, "w_kv_b")
    expect_dim(w_o.shape[1], n * a["v_head_dim"], node, "w_o columns vs heads*v_head_dim")
    _expect_vector(node, b_o, w_o.shape[0], "b_o")
    return TensorType(x.shape[:2] + (w_o.shape[0],), x.dtype)


def _mla_latents(attrs, x, cos, sin, w_q, w_q_a, q_a_norm, w_q_b, w_kv_a, kv_a_norm, b_q_a, b_kv_a):
    """The query halves q_nope [B, n, S, nope] and q_rot [B, n, S, rope] (rotated), the normalised latent
    c_kv [B, 1, S, r] and the rotated shared key k_rot [B, 1, S, rope] of the tokens x."""
    n, eps = attrs["heads"], attrs["norm_eps"]
    nope, rope, r = attrs["qk_nope_head_dim"], attrs["qk_rope_head_dim"], attrs["kv_lora_rank"]
    if w_q is not None:
        q = F.linear(x, w_q)
    else:
        q = F.linear(rms_norm_math(F.linear(x, w_q_a, b_q_a), q_a_norm, eps), w_q_b)
    if attrs["q_latent_scale"] != 1.0:
        q = q * attrs["q_latent_scale"]
    q_nope, q_rot = _heads(q, n).split([nope, rope], dim=-1)
    c_kv, k_rot = F.linear(x, w_kv_a, b_kv_a).split([r, rope], dim=-1)
    c_kv = rms_norm_math(c_kv, kv_a_norm, eps)
    if attrs["kv_latent_scale"] != 1.0:
        c_kv = c_kv * attrs["kv_latent_scale"]
    c_kv = c_kv.unsqueeze(1)
    layout = attrs["rope_layout"]
    return q_nope, apply_rope(q_rot, cos, sin, layout), c_kv, apply_rope(k_rot.unsqueeze(1), cos, sin, layout)


def _mla_expand(attrs, c_kv, k_rot, w_kv_b):
    """Per-head k [B, n, L, nope + rope] and v [B, n, L, dv] from the latent c_kv [B, 1, L, r] and the shared
    rotary key k_rot [B, 1, L, rope]."""
    n, nope, dv = attrs["heads"], attrs["qk_nope_head_dim"], attrs["v_head_dim"]
    kv = _heads(F.linear(c_kv.squeeze(1), w_kv_b), n)  # [B, n, L, nope + dv]
    k_nope, v = kv.split([nope, dv], dim=-1)
    return torch.cat([k_nope, k_rot.expand(-1, n, -1, -1)], dim=-1), v


def _mla_scale(attrs) -> float:
    return attention_scale(attrs, attrs["qk_nope_head_dim"] + attrs["qk_rope_head_dim"])


@register
class MLAAttention(OpDef):
    opcode = OpCode.MLA_ATTENTION
    doc = ("DeepSeek multi-head latent attention on x [B, S, H]: low-rank q (optional) and compressed kv latent, "
           "decoupled RoPE dims with one shared rotary key")
    inputs = (Port("x"),) + _MLA_WEIGHTS
    output_names = ("y",)
    attrs = _MLA_ATTRS

    def infer_types(self, node, x, *weights):
        return [_mla_types(node, x, *weights)]

    def reference(self, attrs, x, w_q, w_q_a, q_a_norm, w_q_b, w_kv_a, kv_a_norm, w_kv_b, w_o, b_q_a, b_kv_a, b_o):
        cos, sin = rope_cos_sin(x.shape[1], attrs["qk_rope_head_dim"], attrs, x)
        q_nope, q_rot, c_kv, k_rot = _mla_latents(attrs, x, cos, sin, w_q, w_q_a, q_a_norm, w_q_b, w_kv_a, kv_a_norm,
                                                  b_q_a, b_kv_a)
        k, v = _mla_expand(attrs, c_kv, k_rot, w_kv_b)
        y = causal_attention(torch.cat([q_nope, q_rot], dim=-1), k, v, _mla_scale(attrs))
        return (F.linear(y, w_o, b_o),)


def mla_cache_dims(attrs, layout: MLACacheLayout) -> tuple[tuple[int, int], tuple[int, int]]:
    """(heads, dim) of the key slot and of the value slot of an MLA cache in `layout`."""
    n = attrs["heads"]
    if layout == MLACacheLayout.LATENT:
        return (1, attrs["kv_lora_rank"]), (1, attrs["qk_rope_head_dim"])
    return (n, attrs["qk_nope_head_dim"] + attrs["qk_rope_head_dim"]), (n, attrs["v_head_dim"])


@register
class CachedMLAAttention(OpDef):
    opcode = OpCode.CACHED_MLA_ATTENTION
    doc = ("multi-head latent attention in decode form: S new tokens x [B, S, H] at position_ids after the past "
           "cache (cache_layout expanded: per-head K/V; latent: c_kv [B,1,P,kv_lora_rank] in the key slot and the "
           "rotated shared key [B,1,P,qk_rope_head_dim] in the value slot); y and the present cache (P+S)")
    inputs = (Port("x"),) + _CACHE_PORTS + _MLA_WEIGHTS
    output_names = ("y", "present_key", "present_value")
    attrs = {**_MLA_ATTRS, "cache_layout": Attr(MLACacheLayout, MLACacheLayout.EXPANDED)}

    def infer_types(self, node, x, position_ids, attention_mask, past_key, past_value, *weights):
        key, value = mla_cache_dims(node.attrs, node.attrs["cache_layout"])
        return [_mla_types(node, x, *weights),
                *_cache_types(node, x, position_ids, attention_mask, past_key, past_value, key, value)]

    def reference(self, attrs, x, position_ids, attention_mask, past_key, past_value, w_q, w_q_a, q_a_norm, w_q_b,
                  w_kv_a, kv_a_norm, w_kv_b, w_o, b_q_a, b_kv_a, b_o):
        cos, sin = rope_cos_sin_at(position_ids, attrs["qk_rope_head_dim"], attrs, x)
        q_nope, q_rot, c_kv, k_rot = _mla_latents(attrs, x, cos, sin, w_q, w_q_a, q_a_norm, w_q_b, w_kv_a, kv_a_norm,
                                                  b_q_a, b_kv_a)
        if attrs["cache_layout"] == MLACacheLayout.LATENT:
            present_key = torch.cat([past_key.to(c_kv.dtype), c_kv], dim=2)
            present_value = torch.cat([past_value.to(k_rot.dtype), k_rot], dim=2)
            k, v = _mla_expand(attrs, present_key, present_value, w_kv_b)
        else:
            k, v = _mla_expand(attrs, c_kv, k_rot, w_kv_b)
            present_key = k = torch.cat([past_key.to(k.dtype), k], dim=2)
            present_value = v = torch.cat([past_value.to(v.dtype), v], dim=2)
        y = attend(torch.cat([q_nope, q_rot], dim=-1), k, v, _mla_scale(attrs), visible_keys(attention_mask, x.shape[1]))
        return F.linear(y, w_o, b_o), present_key, present_value


# ---------------------------------------------------------------------------------------------------
# mixture of attention heads (JetMoE's MoA)
#
# The router (a top-k routing of the MoE layer's ops, read from the graph as expert_idx [T, k] and weights
# [T, k]) picks k of E attention experts per token. Expert e owns a query projection w_q[e] [kv_heads*d, H] and an
# output projection w_o[e] [H, kv_heads*d]; the key/value projections are shared. The token's j-th expert gives
# kv_heads query heads; query head h of it attends with kv head h. Each expert's attention output goes through
# its own output projection, the k results are summed weighted by the routing weights, and b_o is added once.
# Query heads are laid out kv-head-major (head h*k + j: kv head h of the j-th chosen expert), so query head i
# reads kv head i // k, the grouped-query rule of `attend`.


_MOA_WEIGHTS = (Port("w_q"), Port("w_k"), Port("w_v"), Port("w_o"), Port("b_o", optional=True))
_MOA_ROUTING = (Port("expert_idx"), Port("weights"))
_MOA_ATTRS = {"kv_heads": Attr(int), "head_dim": Attr(int), **_ROPE_ATTRS}


def _moa_types(node, x, expert_idx, weights, w_q, w_k, w_v, w_o, b_o) -> TensorType:
    """Checks of x, the routing and the weights; the type of y."""
    a = node.attrs
    expect_rank(x, 3, node, "x")
    h, d = x.shape[2], a["head_dim"]
    kvd = a["kv_heads"] * d
    expect(expert_idx.dtype == ElemType.INT64 and expert_idx.rank == 2, node,
           f"expert_idx must be i64[T, k], found {expert_idx}")
    expect(isinstance(expert_idx.shape[1], int), node, f"the expert count per token must be static, found {expert_idx}")
    expect(weights.shape == expert_idx.shape and weights.dtype.is_float, node,
           f"weights must be float{list(expert_idx.shape)}, found {weights}")
    expect(w_q.rank == 3 and w_q.shape[1:] == (kvd, h), node, f"w_q must be [experts, {kvd}, {h}], found {w_q}")
    expect(w_o.rank == 3 and w_o.shape == (w_q.shape[0], h, kvd), node,
           f"w_o must be [{w_q.shape[0]}, {h}, {kvd}], found {w_o}")
    expect(expert_idx.shape[1] <= w_q.shape[0], node, f"{expert_idx.shape[1]} experts per token exceed the "
                                                       f"{w_q.shape[0]} attention experts")
    _expect_linear(node, w_k, kvd, h, "w_k")
    _expect_linear(node, w_v, kvd, h, "w_v")
    _expect_vector(node, b_o, h, "b_o")
    r = rope_dims(a, d)
    expect(r % 2 == 0 and 0 <= r <= d, node, f"RoPE rotates pairs of dims: {r} rotated dims of a head of {d}")
    return TensorType(x.shape, x.dtype)


def moa_queries(x: torch.Tensor, expert_idx: torch.Tensor, w_q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """q [B, kv_heads*k, S, d] of x [B, S, H]: each token through the query projections of its k experts, in
    head order h*k + j."""
    b, s, h = x.shape
    k = expert_idx.shape[1]
    q = torch.einsum("tjoh,th->tjo", w_q[expert_idx], x.reshape(-1, h))   # [T, k, kv_heads*d]
    return q.view(b, s, k, kv_heads, -1).permute(0, 3, 2, 1, 4).reshape(b, kv_heads * k, s, -1)


def moa_output(y: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor, w_o: torch.Tensor,
               b_o: torch.Tensor | None, kv_heads: int) -> torch.Tensor:
    """[B, S, H]: the attention output y [B, S, kv_heads*k*d] (head order h*k + j) of each chosen expert through
    its output projection, weighted by the routing weights and summed, plus b_o."""
    b, s, _ = y.shape
    k = expert_idx.shape[1]
    per_expert = y.reshape(b * s, kv_heads, k, -1).transpose(1, 2).reshape(b * s, k, -1)   # [T, k, kv_heads*d]
    out = torch.einsum("tjho,tjo->tjh", w_o[expert_idx], per_expert)
    out = (out * weights.to(out.dtype).unsqueeze(-1)).sum(dim=1)
    if b_o is not None:
        out = out + b_o
    return out.view(b, s, -1)


def _moa_qkv(attrs, x, expert_idx, cos, sin, w_q, w_k, w_v):
    kv_heads = attrs["kv_heads"]
    q = moa_queries(x, expert_idx, w_q, kv_heads)
    k, v = _heads(F.linear(x, w_k), kv_heads), _heads(F.linear(x, w_v), kv_heads)
    layout = attrs["rope_layout"]
    return apply_rope(q, cos, sin, layout), apply_rope(k, cos, sin, layout), v


@register
class MoAAttention(OpDef):
    opcode = OpCode.MOA_ATTENTION
    doc = ("mixture of attention heads (JetMoE) on x [B, S, H] (positions 0..S-1): each token's k chosen experts' "
           "query projections over shared K/V heads, their output projections weighted by the routing weights")
    inputs = (Port("x"),) + _MOA_ROUTING + _MOA_WEIGHTS
    output_names = ("y",)
    attrs = _MOA_ATTRS

    def infer_types(self, node, x, expert_idx, weights, *w):
        return [_moa_types(node, x, expert_idx, weights, *w)]

    def reference(self, attrs, x, expert_idx, weights, w_q, w_k, w_v, w_o, b_o):
        d = attrs["head_dim"]
        cos, sin = rope_cos_sin(x.shape[1], rope_dims(attrs, d), attrs, x)
        q, k, v = _moa_qkv(attrs, x, expert_idx, cos, sin, w_q, w_k, w_v)
        y = causal_attention(q, k, v, attention_scale(attrs, d))
        return (moa_output(y, expert_idx, weights, w_o, b_o, attrs["kv_heads"]),)


@register
class CachedMoAAttention(OpDef):
    opcode = OpCode.CACHED_MOA_ATTENTION
    doc = ("mixture of attention heads in decode form: S new tokens x [B, S, H] at position_ids after the past "
           "shared K/V [B, kv_heads, P, head_dim]; y and the present K/V [B, kv_heads, P+S, head_dim]")
    inputs = (Port("x"),) + _CACHE_PORTS + _MOA_ROUTING + _MOA_WEIGHTS
    output_names = ("y", "present_key", "present_value")
    attrs = _MOA_ATTRS

    def infer_types(self, node, x, position_ids, attention_mask, past_key, past_value, expert_idx, weights, *w):
        a = node.attrs
        kv = (a["kv_heads"], a["head_dim"])
        return [_moa_types(node, x, expert_idx, weights, *w),
                *_cache_types(node, x, position_ids, attention_mask, past_key, past_value, kv, kv)]

    def reference(self, attrs, x, position_ids, attention_mask, past_key, past_value, expert_idx, weights, w_q, w_k,
                  w_v, w_o, b_o):
        d = attrs["head_dim"]
        cos, sin = rope_cos_sin_at(position_ids, rope_dims(attrs, d), attrs, x)
        q, k, v = _moa_qkv(attrs, x, expert_idx, cos, sin, w_q, w_k, w_v)
        k, v = torch.cat([past_key.to(k.dtype), k], dim=2), torch.cat([past_value.to(v.dtype), v], dim=2)
        y = attend(q, k, v, attention_scale(attrs, d), visible_keys(attention_mask, x.shape[1]))
        return moa_output(y, expert_idx, weights, w_o, b_o, attrs["kv_heads"]), k, v
