"""The typed whole-model spec: a decoder-only transformer whose FFNs are dense or MoE.

A model spec is a YAML document with two sections:

    model:            vocabulary, hidden size, layers, which layers are MoE, dense FFN width,
                      attention (MHA / GQA with RoPE, or DeepSeek's multi-head latent attention), RMSNorm
    moe:              the MoE layer spec (moe_ir.spec.LayerSpec) every MoE layer uses; `hidden` and `dtype`
                      are taken from `model:` and may be omitted

Layer i (0-based) is MoE when i >= first_dense and (i - first_dense) % moe_every == 0, or, when the spec lists
them, when moe_layer_indices holds i; the others use a dense FFN of width `dense_width`. A decoder layer is
pre-norm (norm_position pre, the default) or post-norm (OLMo 2 / FlexOlmo):
    pre:   h = x + attn(rms_norm(x));  y = h + ffn(rms_norm(h))
    post:  h = x + rms_norm(attn(x));  y = h + rms_norm(ffn(h))
and the model is embed -> layers -> rms_norm -> lm_head (tied to the embedding when `tied_embeddings`).
With layer_form dual_shortcut_moe (LongCat-Flash) each layer holds two attention + dense FFN sublayers and one MoE
block fed by the first FFN's norm whose output joins at the end of the layer (LayerForm has the dataflow).

Parsing reuses the layer spec's generic parser (types, bounds, did-you-mean, YAML lines); the `moe`
section is parsed as a layer spec in a context that prefixes its key paths with `moe.`.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import SpecError
from .spec import (QuantizationSpec, MAX_HEAD_DIM, MAX_HEADS, MAX_HIDDEN, MAX_LAYERS, MAX_VOCAB, MAX_WIDTH, NAME_PATTERN, Activation,
                   DType, LayerSpec, ParseContext, describe_value, join_key_path, parse_section, suggest_key,
                   schema_of_section, spec_field, spec_to_dict)

__all__ = ["AttentionKind", "AttentionSpec", "AttentionTemperature", "LayerForm", "ModelSection", "ModelSpec", "Multipliers",
           "NormKind", "NormPosition", "QKNorm", "RopeLayout", "RopeScaling", "RopeScalingKind", "model_json_schema",
           "model_spec_from_dict", "model_spec_to_dict", "yarn_mscale"]


class AttentionKind(enum.StrEnum):
    MHA = "mha"  # multi-head: as many key/value heads as query heads
    GQA = "gqa"  # grouped-query: kv_heads < heads, each kv head shared by heads / kv_heads query heads
    MLA = "mla"  # DeepSeek-V2/V3 multi-head latent attention (low-rank q/kv, decoupled RoPE dims)
    # Mixture of attention heads (JetMoE's MoA): a router picks top_k of `experts` query/output projection pairs per
    # token; each chosen expert's kv_heads query heads attend over the key/value heads every expert shares
    MOA = "moa"


class QKNorm(enum.StrEnum):
    NONE = "none"
    HEAD = "head"  # RMSNorm over each head's head_dim (Qwen3 style), weights [head_dim]
    FULL = "full"  # RMSNorm over the whole q / k projection (OLMoE), weights [heads*head_dim] / [kv_heads*head_dim]
    HEAD_AFTER_ROPE = "head_after_rope"  # RMSNorm over each head after RoPE (Hunyuan), weights [head_dim]
    # x * rsqrt(mean(x^2) + eps) over each head after RoPE, no weight, in the layers that apply RoPE only (Llama 4's
    # L2Norm, which divides by the root mean square)
    WEIGHTLESS_AFTER_ROPE = "weightless_after_rope"


class NormKind(enum.StrEnum):
    RMS = "rms"      # RMSNorm with a weight (Llama, DeepSeek, Mixtral, Qwen, OLMoE)
    LAYER = "layer"  # LayerNorm with a weight and a bias (PhiMoE)
    LAYER_NO_BIAS = "layer_no_bias"  # LayerNorm with a weight only (DBRX)


class RopeLayout(enum.StrEnum):
    HALF = "half"                # rotate_half: dim j pairs with j + d/2 (Llama, Mixtral, Qwen, OLMoE)
    INTERLEAVED = "interleaved"  # dim 2j pairs with 2j+1 (DeepSeek-V2/V3 checkpoints)


class RopeScalingKind(enum.StrEnum):
    YARN = "yarn"  # YaRN (Peng et al. 2023): per-frequency blend of interpolated and original RoPE, scaled cos/sin
    # Llama 3.1: frequencies whose wavelength exceeds original_max_positions / low_freq_factor are divided by the
    # factor, those below original_max_positions / high_freq_factor kept, the ones between blended smoothly
    LLAMA3 = "llama3"
    # LongRoPE (Phi-3): each frequency divided by its own factor, short_factor while a call's sequence (its last
    # position + 1) stays within original_max_positions and long_factor beyond; cos and sin times short_mscale /
    # long_mscale likewise
    LONGROPE = "longrope"


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE scaling that stretches a model past its pretraining context (YaRN or Llama 3's). YaRN: frequency i of
    the rotated dims blends the original 1/theta^(2i/d) and the interpolated 1/(factor theta^(2i/d)) by a linear
    ramp between the dims that turn beta_fast and beta_slow times over original_max_positions; cos and sin are
    multiplied by attention_factor (default mscale(factor, mscale) / mscale(factor, mscale_all_dim), or
    mscale(factor) when either is unset); DeepSeek-V2/V3 also multiply the softmax scale by
    mscale(factor, mscale_all_dim)^2. llama3: a frequency of wavelength w = 2 pi / f is divided by the factor when
    w > original_max_positions / low_freq_factor, kept when w < original_max_positions / high_freq_factor, and in
    between becomes (1 - s) f / factor + s f with s = (original_max_positions / w - low_freq_factor) /
    (high_freq_factor - low_freq_factor); cos and sin are not scaled."""

    kind: RopeScalingKind = spec_field(RopeScalingKind.YARN, doc="the scaling method (yarn or llama3)")
    factor: float = spec_field(doc="context extension factor", exclusive_minimum=0.0)
    original_max_positions: int = spec_field(doc="the pretraining context length", minimum=1, maximum=1 << 40)
    beta_fast: float = spec_field(32.0, doc="rotations over the original context above which dims keep their "
                                            "frequency (extrapolate)", exclusive_minimum=0.0)
    beta_slow: float = spec_field(1.0, doc="rotations below which dims are fully interpolated", exclusive_minimum=0.0)
    truncate: bool = spec_field(True, doc="round the ramp's ends to whole dims (floor / ceil)")
    mscale: float | None = spec_field(None, doc="numerator coefficient of the default attention_factor")
    mscale_all_dim: float | None = spec_field(None, doc="denominator coefficient of the default attention_factor; "
                                                        "the softmax-scale correction's coefficient")
    attention_factor: float | None = spec_field(None, doc="multiplier of cos and sin; default: from the mscales",
                                                exclusive_minimum=0.0)
    softmax_mscale: bool = spec_field(False, doc="multiply the softmax scale by mscale(factor, mscale_all_dim)^2 "
                                                 "(DeepSeek-V2/V3 attention)")
    low_freq_factor: float | None = spec_field(None, doc="llama3: wavelengths above original_max_positions / this "
                                                         "are interpolated (divided by the factor)",
                                               exclusive_minimum=0.0, omit_default=True)
    high_freq_factor: float | None = spec_field(None, doc="llama3: wavelengths below original_max_positions / this "
                                                          "keep their frequency", exclusive_minimum=0.0,
                                                omit_default=True)
    short_factor: tuple[float, ...] | None = spec_field(
        None, doc="longrope: one divisor per rotated pair while the sequence fits original_max_positions",
        exclusive_minimum=0.0, omit_default=True)
    long_factor: tuple[float, ...] | None = spec_field(
        None, doc="longrope: one divisor per rotated pair once the sequence is longer", exclusive_minimum=0.0,
        omit_default=True)
    short_mscale: float | None = spec_field(None, doc="longrope: cos/sin multiplier of short sequences",
                                            exclusive_minimum=0.0, omit_default=True)
    long_mscale: float | None = spec_field(None, doc="longrope: cos/sin multiplier of long sequences",
                                           exclusive_minimum=0.0, omit_default=True)

    def check(self, ctx: ParseContext, path: str) -> None:
        longrope = ("short_factor", "long_factor", "short_mscale", "long_mscale")
        if self.kind == RopeScalingKind.LONGROPE:
            for name in longrope:
                if getattr(self, name) is None:
                    ctx.fail(join_key_path(path, name), f"kind longrope needs {name}")
            if len(self.short_factor) != len(self.long_factor):
                ctx.fail(join_key_path(path, "long_factor"), f"{len(self.long_factor)} long factors for "
                                                             f"{len(self.short_factor)} short ones")
            for name in ("mscale", "mscale_all_dim", "attention_factor", "low_freq_factor", "high_freq_factor"):
                if getattr(self, name) is not None:
                    ctx.fail(join_key_path(path, name), f"{name} does not belong to kind longrope")
            if self.softmax_mscale:
                ctx.fail(join_key_path(path, "softmax_mscale"), "softmax_mscale belongs to kind yarn")
            return
        for name in longrope:
            if getattr(self, name) is not None:
                ctx.fail(join_key_path(path, name), f"{name} belongs to kind longrope; this scaling is "
                                                    f"{self.kind.value}")
        if self.kind == RopeScalingKind.LLAMA3:
            for name in ("low_freq_factor", "high_freq_factor"):
                if getattr(self, name) is None:
                    ctx.fail(join_key_path(path, name), f"kind llama3 needs {name}")
            if self.high_freq_factor < self.low_freq_factor:
                ctx.fail(join_key_path(path, "high_freq_factor"), f"high_freq_factor={self.high_freq_factor} is below "
                                                                  f"low_freq_factor={self.low_freq_factor}")
            for name in ("mscale", "mscale_all_dim", "attention_factor"):
                if getattr(self, name) is not None:
                    ctx.fail(join_key_path(path, name), f"{name} belongs to kind yarn; llama3 scales no cos/sin")
            if self.softmax_mscale:
                ctx.fail(join_key_path(path, "softmax_mscale"), "softmax_mscale belongs to kind yarn")
            return
        for name in ("low_freq_factor", "high_freq_factor"):
            if getattr(self, name) is not None:
                ctx.fail(join_key_path(path, name), f"{name} belongs to kind llama3; this scaling is {self.kind.value}")
        if self.softmax_mscale and not self.mscale_all_dim:
            ctx.fail(join_key_path(path, "softmax_mscale"), "softmax_mscale needs a non-zero mscale_all_dim (its "
                                                            "coefficient)")

    @property
    def cos_sin_factor(self) -> float:
        if self.kind in (RopeScalingKind.LLAMA3, RopeScalingKind.LONGROPE):
            return 1.0  # longrope: short_mscale / long_mscale, chosen per call
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    def softmax_scale(self, head_dim: int) -> float:
        """The softmax scale of heads of head_dim query/key dims (the multiplications in transformers' order)."""
        scale = head_dim ** -0.5
        if self.softmax_mscale:
            m = yarn_mscale(self.factor, self.mscale_all_dim)
            scale = scale * m * m
        return scale


@dataclass(frozen=True, kw_only=True)
class Multipliers:
    """Constant factors of a decoder (Granite's muP settings): the embedding output is multiplied by `embedding`,
    each attention and FFN output by `residual` before it joins the residual stream, and the logits are divided by
    `logits`."""

    embedding: float = spec_field(1.0, doc="multiplier of the embedding output", exclusive_minimum=0.0)
    residual: float = spec_field(1.0, doc="multiplier of each attention / FFN output before the residual add",
                                 exclusive_minimum=0.0)
    logits: float = spec_field(1.0, doc="divisor of the logits", exclusive_minimum=0.0)


@dataclass(frozen=True, kw_only=True)
class AttentionTemperature:
    """Llama 4's attention temperature tuning in the layers without RoPE: the query of the token at position p
    is multiplied by 1 + scale * ln(1 + floor((p + 1) / floor_scale)), which grows with the context."""

    floor_scale: float = spec_field(doc="positions per step of the temperature (Llama 4: 8192)", exclusive_minimum=0.0)
    scale: float = spec_field(doc="the temperature's coefficient (Llama 4's attn_scale, 0.1)", minimum=0.0)


class LayerForm(enum.StrEnum):
    """What one decoder layer holds and how its parts connect (pre-norm in both forms)."""
    STANDARD = "standard"  # h = x + attn(norm(x));  y = h + ffn(norm(h)), the FFN dense or MoE
    # LongCat-Flash's shortcut-connected MoE: two sublayers of attention + dense FFN, and one MoE block that reads
    # the first sublayer's FFN input and joins the residual stream at the end of the layer:
    #   h1 = x + attn_0(attn_norm_0(x));   n = ffn_norm_0(h1);   s = moe(n);   h2 = h1 + ffn_0(n)
    #   h3 = h2 + attn_1(attn_norm_1(h2)); y = h3 + ffn_1(ffn_norm_1(h3)) + s
    # Every layer has the MoE block; both dense FFNs are dense_width wide; each attention has a KV cache of its own.
    DUAL_SHORTCUT_MOE = "dual_shortcut_moe"


class NormPosition(enum.StrEnum):
    PRE = "pre"    # h = x + attn(norm(x)); y = h + ffn(norm(h))   (Llama, DeepSeek, Mixtral, ...)
    POST = "post"  # h = x + norm(attn(x)); y = h + norm(ffn(h))   (OLMo 2, FlexOlmo)


_MLA_FIELDS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


@dataclass(frozen=True, kw_only=True)
class AttentionSpec:
    """Self-attention of every layer: causal, RoPE on positions 0..S-1, softmax scale 1/sqrt(q head dim)."""

    kind: AttentionKind = spec_field(AttentionKind.MHA, doc="mha, gqa or mla")
    heads: int = spec_field(doc="query heads", minimum=1, maximum=MAX_HEADS)
    kv_heads: int | None = spec_field(None, doc="key/value heads (gqa; mha: equal to heads)", minimum=1,
                                       maximum=MAX_HEADS)
    head_dim: int | None = spec_field(None, doc="per-head dim for mha/gqa; default: hidden / heads", minimum=1,
                                       maximum=MAX_HEAD_DIM)
    rope_theta: float = spec_field(10000.0, doc="RoPE base", exclusive_minimum=0.0)
    rope_layout: RopeLayout | None = spec_field(
        None, doc="which dims RoPE rotates together; default: interleaved for mla (DeepSeek), half otherwise")
    rotary_dim: int | None = spec_field(None, doc="mha/gqa: the leading dims of each query/key head that RoPE rotates "
                                                  "(partial rotary embedding); default: all of head_dim",
                                        minimum=2, maximum=MAX_HEAD_DIM)
    rope_scaling: RopeScaling | None = spec_field(None, doc="RoPE scaling (YaRN); absent: plain RoPE")
    sliding_window: int | None = spec_field(None, doc="mha/gqa: a query sees only the W latest keys (itself "
                                                      "included) in the layers that slide; absent: every earlier key",
                                            minimum=1, maximum=1 << 40)
    sliding_layers: tuple[int, ...] | None = spec_field(
        None, doc="the layers (0-based) that use sliding_window, the others attend globally; absent: every layer",
        minimum=0, maximum=MAX_LAYERS - 1)
    global_nope: bool | None = spec_field(None, doc="true: the global (non-sliding) layers apply no RoPE (EXAONE 4 "
                                                    "style); absent: false")
    nope_layers: tuple[int, ...] | None = spec_field(
        None, doc="mha/gqa: the layers (0-based) that apply no RoPE (Llama 4's no_rope_layers); absent: none",
        minimum=0, maximum=MAX_LAYERS - 1, omit_default=True)
    chunk_size: int | None = spec_field(None, doc="mha/gqa: chunked attention in the chunked layers: a query at "
                                                  "position p sees only the earlier keys at positions q with "
                                                  "q // chunk_size == p // chunk_size (Llama 4); absent: none",
                                        minimum=1, maximum=1 << 40, omit_default=True)
    chunked_layers: tuple[int, ...] | None = spec_field(
        None, doc="the layers (0-based) that use chunk_size, the others attend globally; absent: every layer",
        minimum=0, maximum=MAX_LAYERS - 1, omit_default=True)
    temperature: AttentionTemperature | None = spec_field(
        None, doc="attention temperature tuning of the queries in the layers without RoPE (Llama 4); absent: none",
        omit_default=True)
    softmax_scale: float | None = spec_field(None, doc="the attention softmax scale (Granite's attention_multiplier); "
                                                      "default: 1/sqrt(query/key head dim)", exclusive_minimum=0.0)
    qkv_bias: bool = spec_field(False, doc="q/k/v projections carry biases (mla: the q_a and kv_a down-projections)")
    out_bias: bool = spec_field(False, doc="the output projection carries a bias")
    qk_norm: QKNorm = spec_field(QKNorm.NONE, doc="RMSNorm on queries and keys (before RoPE, or after it with "
                                                 "head_after_rope)")
    sinks: bool = spec_field(False, doc="a learned logit per query head joins every softmax with no value, so "
                                        "attention may attend to nothing (gpt-oss); mha/gqa only",
                              omit_default=True)
    clip_qkv: float | None = spec_field(None, doc="mha/gqa: the q, k and v projections clamped to [-clip_qkv, "
                                                  "clip_qkv], after a whole-projection q/k norm (qk_norm full) and "
                                                  "before per-head norms and RoPE (OLMoE, DBRX); absent: none",
                                        exclusive_minimum=0.0, omit_default=True)
    q_lora_rank: int | None = spec_field(None, doc="mla: rank of the query down-projection; absent: a full q_proj",
                                         minimum=1, maximum=MAX_HEAD_DIM)
    kv_lora_rank: int | None = spec_field(None, doc="mla: rank of the compressed key/value latent", minimum=1,
                                           maximum=MAX_HEAD_DIM)
    qk_nope_head_dim: int | None = spec_field(None, doc="mla: per-head query/key dims without RoPE", minimum=1,
                                               maximum=MAX_HEAD_DIM)
    qk_rope_head_dim: int | None = spec_field(None, doc="mla: per-head query/key dims with RoPE (key part shared)",
                                              minimum=2, maximum=MAX_HEAD_DIM)
    v_head_dim: int | None = spec_field(None, doc="mla: per-head value dim", minimum=1, maximum=MAX_HEAD_DIM)
    latent_scales: bool = spec_field(False, doc="mla: the query times sqrt(hidden / q_lora_rank) and the normalised "
                                                "kv latent times sqrt(hidden / kv_lora_rank), after their "
                                                "projections (LongCat-Flash's mla_scale_q_lora / mla_scale_kv_lora)",
                                     omit_default=True)
    experts: int | None = spec_field(None, doc="moa: attention experts (query/output projection pairs) the router "
                                               "chooses from", minimum=1, maximum=MAX_HEADS, omit_default=True)
    top_k: int | None = spec_field(None, doc="moa: attention experts per token (softmax over the top_k router logits "
                                             "weighs their outputs); heads = top_k * kv_heads", minimum=1,
                                   maximum=MAX_HEADS, omit_default=True)

    def check(self, ctx: ParseContext, path: str) -> None:
        if self.kind == AttentionKind.MOA:
            self._check_moa(ctx, path)
            return
        for name in ("experts", "top_k"):
            if getattr(self, name) is not None:
                ctx.fail(join_key_path(path, name), f"{name} belongs to kind moa; this attention is {self.kind.value}")
        if self.softmax_scale is not None and self.rope_scaling is not None and self.rope_scaling.softmax_mscale:
            ctx.fail(join_key_path(path, "softmax_scale"), "rope_scaling.softmax_mscale sets the softmax scale; give "
                                                           "one of them")
        if self.sliding_window is None:
            for name in ("sliding_layers", "global_nope"):
                if getattr(self, name) is not None:
                    ctx.fail(join_key_path(path, name), f"{name} needs a sliding_window")
        elif self.kind == AttentionKind.MLA:
            ctx.fail(join_key_path(path, "sliding_window"), "sliding-window attention is for mha/gqa")
        for name in ("sliding_layers", "nope_layers", "chunked_layers"):
            listed = getattr(self, name)
            if listed is not None and list(listed) != sorted(set(listed)):
                ctx.fail(join_key_path(path, name), "expected increasing layer indices")
        if self.chunk_size is None and self.chunked_layers is not None:
            ctx.fail(join_key_path(path, "chunked_layers"), "chunked_layers needs a chunk_size")
        if self.chunk_size is not None and self.sliding_window is not None:
            ctx.fail(join_key_path(path, "chunk_size"), "give a sliding_window or a chunk_size, not both")
        if self.nope_layers is not None and self.global_nope:
            ctx.fail(join_key_path(path, "nope_layers"), "give nope_layers or global_nope, not both")
        if self.temperature is not None and self.nope_layers is None and not self.global_nope:
            ctx.fail(join_key_path(path, "temperature"), "the temperature applies in the layers without RoPE; give "
                                                         "nope_layers (or global_nope)")
        if self.kind == AttentionKind.MLA:
            for name in ("nope_layers", "chunk_size", "temperature"):
                if getattr(self, name) is not None:
                    ctx.fail(join_key_path(path, name), f"{name} is modelled for mha/gqa attention, not mla")
        if self.kind == AttentionKind.MLA:
            for name in _MLA_FIELDS:
                if getattr(self, name) is None:
                    ctx.fail(join_key_path(path, name), f"kind mla needs {name}")
            for name in ("kv_heads", "head_dim"):
                if getattr(self, name) is not None:
                    ctx.fail(join_key_path(path, name), f"kind mla has no {name}: its head dims are qk_nope_head_dim + "
                                                "qk_rope_head_dim (queries, keys) and v_head_dim (values)")
            if self.qk_norm != QKNorm.NONE:
                ctx.fail(join_key_path(path, "qk_norm"), "kind mla normalises its latents instead; qk_norm must be none")
            if self.rotary_dim is not None:
                ctx.fail(join_key_path(path, "rotary_dim"), "kind mla rotates qk_rope_head_dim dims; rotary_dim is for "
                                                            "mha/gqa")
            if self.sinks:
                ctx.fail(join_key_path(path, "sinks"), "attention sinks are modelled for mha/gqa attention, not mla")
            if self.clip_qkv is not None:
                ctx.fail(join_key_path(path, "clip_qkv"), "q/k/v clipping is modelled for mha/gqa attention, not mla")
            if self.qk_rope_head_dim % 2:
                ctx.fail(join_key_path(path, "qk_rope_head_dim"), f"RoPE rotates pairs of dims; {self.qk_rope_head_dim} is odd")
            if self.latent_scales and self.q_lora_rank is None:
                ctx.fail(join_key_path(path, "latent_scales"), "latent_scales scales the low-rank query; give "
                                                               "q_lora_rank")
            return
        if self.latent_scales:
            ctx.fail(join_key_path(path, "latent_scales"), f"latent_scales belongs to kind mla; this attention is "
                                                           f"{self.kind.value}")
        if self.rotary_dim is not None and self.rotary_dim % 2:
            ctx.fail(join_key_path(path, "rotary_dim"), f"RoPE rotates pairs of dims; {self.rotary_dim} is odd")
        for name in ("q_lora_rank",) + _MLA_FIELDS:
            if getattr(self, name) is not None:
                ctx.fail(join_key_path(path, name), f"{name} belongs to kind mla; this attention is {self.kind.value}")
        if self.kind == AttentionKind.MHA:
            if self.kv_heads is not None and self.kv_heads != self.heads:
                ctx.fail(join_key_path(path, "kv_heads"), f"mha has kv_heads == heads ({self.heads}); for {self.kv_heads} "
                                                  "key/value heads use kind: gqa")
        else:
            if self.kv_heads is None:
                ctx.fail(join_key_path(path, "kv_heads"), "kind gqa needs kv_heads")
            if self.kv_heads >= self.heads:
                ctx.fail(join_key_path(path, "kv_heads"), f"gqa needs fewer kv_heads than heads ({self.heads}); with "
                                                  f"{self.kv_heads} use kind: mha")
            if self.heads % self.kv_heads:
                ctx.fail(join_key_path(path, "kv_heads"), f"kv_heads={self.kv_heads} must divide heads={self.heads}")

    def _check_moa(self, ctx: ParseContext, path: str) -> None:
        """Mixture of attention heads as JetMoE has it: softmax top-k routing, causal RoPE attention, the
        output projections' shared bias (out_bias); what JetMoE does not combine with it is refused."""
        for name in ("experts", "top_k", "kv_heads"):
            if getattr(self, name) is None:
                ctx.fail(join_key_path(path, name), f"kind moa needs {name}")
        if self.top_k > self.experts:
            ctx.fail(join_key_path(path, "top_k"), f"top_k={self.top_k} exceeds the {self.experts} attention experts")
        if self.heads != self.top_k * self.kv_heads:
            ctx.fail(join_key_path(path, "heads"), f"kind moa has heads = top_k * kv_heads = "
                                                   f"{self.top_k * self.kv_heads}, found {self.heads}")
        for name in ("q_lora_rank",) + _MLA_FIELDS:
            if getattr(self, name) is not None:
                ctx.fail(join_key_path(path, name), f"{name} belongs to kind mla; this attention is moa")
        if self.rotary_dim is not None and self.rotary_dim % 2:
            ctx.fail(join_key_path(path, "rotary_dim"), f"RoPE rotates pairs of dims; {self.rotary_dim} is odd")
        unmodelled = {"sliding_window": None, "nope_layers": None, "chunk_size": None, "temperature": None,
                      "clip_qkv": None, "global_nope": None, "qkv_bias": False, "sinks": False, "qk_norm": QKNorm.NONE}
        for name, plain in unmodelled.items():
            if getattr(self, name) != plain:
                ctx.fail(join_key_path(path, name), f"{name} is not modelled with mixture-of-attention heads "
                                                    "(kind moa)")

    # -- derived sizes ---------------------------------------------------------------------------

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads if self.kv_heads is not None else self.heads

    def dim(self, hidden: int) -> int:
        """mha/gqa head dim (given, or hidden / heads)."""
        return self.head_dim if self.head_dim is not None else hidden // self.heads

    def qk_head_dim(self, hidden: int) -> int:
        if self.kind == AttentionKind.MLA:
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.dim(hidden)

    def value_head_dim(self, hidden: int) -> int:
        return self.v_head_dim if self.kind == AttentionKind.MLA else self.dim(hidden)

    def rope_dim(self, hidden: int) -> int:
        """Dims of each query/key head that RoPE rotates."""
        if self.kind == AttentionKind.MLA:
            return self.qk_rope_head_dim
        return self.rotary_dim if self.rotary_dim is not None else self.dim(hidden)

    def applies_rope(self, layer: int) -> bool:
        """Whether layer `layer` rotates its queries and keys (not a nope_layers entry, nor a global layer of
        global_nope)."""
        if self.nope_layers is not None and layer in self.nope_layers:
            return False
        sliding = self.sliding_layers is None or layer in self.sliding_layers
        return not (self.global_nope and self.sliding_window is not None and not sliding)

    def layer_chunk(self, layer: int) -> int | None:
        """The chunk size of layer `layer`'s chunked attention, or None where it attends globally."""
        if self.chunk_size is None or (self.chunked_layers is not None and layer not in self.chunked_layers):
            return None
        return self.chunk_size

    @property
    def layout(self) -> RopeLayout:
        if self.rope_layout is not None:
            return self.rope_layout
        return RopeLayout.INTERLEAVED if self.kind == AttentionKind.MLA else RopeLayout.HALF


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    """The decoder: embedding, layers (attention + dense or MoE FFN), final norm, LM head."""

    name: str = spec_field("model", doc="a name for the model, used in artifact names (letters, digits, '.', '_', "
                                        "'-'; starts with a letter or digit; at most 128)", pattern=NAME_PATTERN)
    source: str = spec_field("", doc="where the settings come from (paper, config)")
    vocab_size: int = spec_field(doc="vocabulary size", minimum=1, maximum=MAX_VOCAB)
    hidden: int = spec_field(doc="hidden size", minimum=1, maximum=MAX_HIDDEN)
    layers: int = spec_field(doc="decoder layers", minimum=1, maximum=MAX_LAYERS)
    tied_embeddings: bool = spec_field(False, doc="the LM head reuses the embedding matrix")
    first_dense: int = spec_field(0, doc="the first k layers use a dense FFN", minimum=0, maximum=MAX_LAYERS)
    moe_every: int = spec_field(1, doc="from layer first_dense on, every n-th layer is MoE, starting with the first",
                                minimum=1, maximum=MAX_LAYERS)
    moe_layer_indices: tuple[int, ...] | None = spec_field(
        None, doc="the MoE layers (0-based, increasing) when they are not 'first_dense, then every moe_every-th' "
                  "(Qwen2-MoE's mlp_only_layers, ERNIE's interval); the others are dense", minimum=0,
        maximum=MAX_LAYERS - 1)
    dense_width: int | None = spec_field(None, doc="FFN width of the dense layers (needed when there are any)",
                                         minimum=1, maximum=MAX_WIDTH)
    dense_activation: Activation = spec_field(Activation.SWIGLU, doc="activation of the dense FFNs")
    attention: AttentionSpec = spec_field(doc="self-attention")
    multipliers: Multipliers | None = spec_field(None, doc="embedding / residual / logits factors (Granite); "
                                                          "absent: none")
    norm_position: NormPosition = spec_field(NormPosition.PRE, doc="where each layer's two RMSNorms sit: before "
                                                                   "attention and FFN (pre) or on their outputs "
                                                                   "inside the residual (post)")
    rms_norm_eps: float = spec_field(1e-6, doc="epsilon of every decoder norm (RMSNorm or LayerNorm)",
                                     exclusive_minimum=0.0)
    final_norm_eps: float | None = spec_field(None, doc="epsilon of the final norm; default: rms_norm_eps (JetMoE "
                                                         "builds its layer norms with 1e-6 whatever rms_norm_eps, "
                                                         "the final one with it)",
                                              exclusive_minimum=0.0, omit_default=True)
    norm: NormKind = spec_field(NormKind.RMS, doc="the decoder norms (before attention, before the FFN, final): "
                                                  "rms (RMSNorm, a weight), layer (LayerNorm, a weight and a bias) "
                                                  "or layer_no_bias (LayerNorm, a weight)",
                                omit_default=True)
    lm_head_bias: bool = spec_field(False, doc="the LM head carries a bias [vocab_size] (PhiMoE lm_head_bias)",
                                    omit_default=True)
    layer_form: LayerForm = spec_field(LayerForm.STANDARD, doc="what a layer holds: standard (attention, then a "
                                                              "dense or MoE FFN) or dual_shortcut_moe (LongCat-Flash: "
                                                              "two attention + dense FFN sublayers beside one MoE "
                                                              "block whose output joins at the layer's end)",
                                       omit_default=True)
    dtype: DType = spec_field(DType.FLOAT32, doc="dtype of activations and weights")

    def check(self, ctx: ParseContext, path: str) -> None:
        a = self.attention
        if a.kind != AttentionKind.MLA and a.head_dim is None and self.hidden % a.heads:
            ctx.fail(join_key_path(path, "attention.heads"), f"{a.heads} heads do not divide hidden={self.hidden}; give "
                                                     "attention.head_dim")
        for name in ("sliding_layers", "nope_layers", "chunked_layers"):
            listed = getattr(a, name)
            if listed and listed[-1] >= self.layers:
                ctx.fail(join_key_path(path, f"attention.{name}"), f"layer {listed[-1]} is not below "
                                                                   f"layers={self.layers}")
        scaling = a.rope_scaling
        if scaling is not None and scaling.kind == RopeScalingKind.LONGROPE and \
                2 * len(scaling.short_factor) != a.rope_dim(self.hidden):
            ctx.fail(join_key_path(path, "attention.rope_scaling.short_factor"),
                     f"{len(scaling.short_factor)} factors for {a.rope_dim(self.hidden) // 2} rotated pairs")
        if a.rotary_dim is not None and a.kind != AttentionKind.MLA and a.rotary_dim > a.dim(self.hidden):
            ctx.fail(join_key_path(path, "attention.rotary_dim"), f"rotary_dim={a.rotary_dim} is more than the "
                                                                  f"head dim {a.dim(self.hidden)}")
        if self.moe_layer_indices is not None:
            key = join_key_path(path, "moe_layer_indices")
            if self.first_dense or self.moe_every != 1:
                ctx.fail(key, "give either moe_layer_indices or first_dense / moe_every, not both")
            found = self.moe_layer_indices
            if not found or list(found) != sorted(set(found)) or found[-1] >= self.layers:
                ctx.fail(key, f"expected increasing layer indices below layers={self.layers} (at least one), "
                              f"found {list(found)[:8]}")
        elif self.first_dense >= self.layers:
            ctx.fail(join_key_path(path, "first_dense"), f"first_dense={self.first_dense} leaves no MoE layer among "
                                                 f"{self.layers} layers")
        if self.dense_activation == Activation.CLAMPED_SWIGLU:
            ctx.fail(join_key_path(path, "dense_activation"), "clamped_swiglu is an expert activation (its alpha and "
                                                              "limit are in moe.experts.clamp); dense FFNs take "
                                                              "swiglu, geglu, gelu or relu")
        if self.layer_form == LayerForm.DUAL_SHORTCUT_MOE:
            self._check_dual(ctx, path)
        has_dense = any(not self.is_moe_layer(i) for i in range(self.layers))
        if has_dense and self.dense_width is None:
            ctx.fail(join_key_path(path, "dense_width"), f"layers {index_ranges(self.dense_layers)} are dense; give their FFN "
                                                 "width as dense_width")

    def _check_dual(self, ctx: ParseContext, path: str) -> None:
        """dual_shortcut_moe: every layer has its MoE block and two dense FFNs, pre-norm, no multipliers."""
        key = join_key_path(path, "layer_form")
        if self.moe_layer_indices is not None or self.first_dense or self.moe_every != 1:
            ctx.fail(key, "dual_shortcut_moe puts an MoE block in every layer; leave out moe_layer_indices, "
                          "first_dense and moe_every")
        if self.dense_width is None:
            ctx.fail(join_key_path(path, "dense_width"), "dual_shortcut_moe layers have two dense FFNs; give their "
                                                         "width as dense_width")
        if self.norm_position != NormPosition.PRE:
            ctx.fail(join_key_path(path, "norm_position"), "dual_shortcut_moe is modelled pre-norm")
        if self.multipliers is not None:
            ctx.fail(join_key_path(path, "multipliers"), "multipliers are modelled for standard layers")

    @property
    def attention_blocks(self) -> int:
        """Attention blocks (each with its own KV cache) per layer."""
        return 2 if self.layer_form == LayerForm.DUAL_SHORTCUT_MOE else 1

    def is_moe_layer(self, i: int) -> bool:
        if self.moe_layer_indices is not None:
            return i in self.moe_layer_indices
        return i >= self.first_dense and (i - self.first_dense) % self.moe_every == 0

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.layers) if self.is_moe_layer(i))

    @property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.layers) if not self.is_moe_layer(i))


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A whole model: the `model:` section and the MoE layer every MoE layer uses."""

    model: ModelSection = spec_field(doc="the decoder")
    moe: LayerSpec = spec_field(doc="the MoE layer spec (hidden and dtype default to the model's)")
    quantization: QuantizationSpec | None = spec_field(None, doc="block-wise weight quantization of the whole "
                                                                "model; absent: float weights")

    @property
    def name(self) -> str:
        return self.model.name


def index_ranges(indices: tuple[int, ...]) -> str:
    parts, start = [], None
    for j, i in enumerate(indices):
        if start is None:
            start = i
        if j + 1 == len(indices) or indices[j + 1] != i + 1:
            parts.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(parts)


class _NestedCtx(ParseContext):
    """Parses a section as if it were a document of its own (so a LayerSpec's checks, which name keys
    relative to the layer, stay right) and reports paths and lines under `prefix`."""

    def __init__(self, parent: ParseContext, prefix: str):
        lead = prefix + "."
        lines = {k[len(lead):]: v for k, v in parent.lines.items() if k.startswith(lead)}
        lines[""] = parent.line_of(prefix)
        super().__init__(lines, parent.file)
        self.prefix = prefix

    def fail(self, path: str, message: str):
        raise SpecError(message, path=join_key_path(self.prefix, path), line=self.line_of(path), file=self.file)


_TOP_KEYS = ("model", "moe", "quantization")
# Keys of the moe section the model supplies: absent -> the model's value; present -> must agree.
_INHERITED = ("hidden", "dtype")


def model_spec_from_dict(data: Any, *, lines: Mapping[str, int] | None = None, file: str | None = None) -> ModelSpec:
    """Parse and check a model spec given as plain data (`lines`: key path -> YAML line, for errors)."""
    ctx = ParseContext(lines, file)
    if not isinstance(data, dict):
        ctx.fail("", f"a model spec must be a mapping at the top level, found {describe_value(data)}")
    for key in data:
        if key not in _TOP_KEYS:
            ctx.fail(str(key), f"unknown top-level key '{key}'{suggest_key(str(key), list(_TOP_KEYS))}; a model spec "
                               f"has: {', '.join(_TOP_KEYS)}")
    for key in ("model", "moe"):  # quantization is optional
        if key not in data:
            what = "the decoder (vocab_size, hidden, layers, attention, ...)" if key == "model" else \
                "the MoE layer spec (experts, router, ...)"
            ctx.fail(key, f"missing required section '{key}' ({what})")
    model = parse_section(ModelSection, data["model"], "model", ctx)
    moe_data = data["moe"]
    if not isinstance(moe_data, dict):
        ctx.fail("moe", f"expected a mapping, found {describe_value(moe_data)}")
    moe_data = dict(moe_data)
    inherited = {"hidden": model.hidden, "dtype": model.dtype.value}
    for key, value in inherited.items():
        if key not in moe_data:
            moe_data[key] = value
        elif moe_data[key] != value:
            ctx.fail(f"moe.{key}", f"moe.{key}={moe_data[key]!r} disagrees with model.{key}={value!r}; omit it "
                                   "(the MoE layers take the model's)")
    moe_data.setdefault("name", default_moe_name(model.name))
    if moe_data.get("quantization") is not None:
        ctx.fail("moe.quantization", "a model spec quantizes at the top level (`quantization:` beside `model:` "
                                     "and `moe:`, with `weights:` choosing routed/shared experts, attention, ...)")
    moe = parse_section(LayerSpec, moe_data, "", _NestedCtx(ctx, "moe"))
    quantization = (parse_section(QuantizationSpec, data["quantization"], "quantization", ctx)
                    if data.get("quantization") is not None else None)
    if quantization is not None and quantization.weights.attention and model.attention.kind == AttentionKind.MOA:
        ctx.fail("quantization.weights.attention", "the stacked query/output projections of a mixture of attention "
                                                   "heads (kind moa) are not quantized by moe-ir; set attention: false")
    return ModelSpec(model=model, moe=moe, quantization=quantization)


def default_moe_name(model_name: str) -> str:
    """The MoE section's name when the spec gives none: `<model name>.moe`, cut so that it stays a valid name
    (NAME_PATTERN's 128 characters) for the longest model name."""
    return f"{model_name[:124]}.moe"


def model_spec_to_dict(spec: ModelSpec) -> dict:
    """Canonical plain data; the moe section leaves out what it inherits from the model."""
    moe = spec_to_dict(spec.moe)
    for key in _INHERITED:
        moe.pop(key, None)
    if moe.get("name") == default_moe_name(spec.model.name):
        moe.pop("name")
    out = {"model": spec_to_dict(spec.model), "moe": moe}
    if spec.quantization is not None:
        out["quantization"] = spec_to_dict(spec.quantization)
    return out


def model_json_schema() -> dict:
    """JSON Schema of the model spec (draft 2020-12); the moe section's hidden/dtype are optional."""
    schema = schema_of_section(ModelSpec, title="moe-ir model spec", schema_id="https://moe-ir/model-spec.schema.json")
    defs = schema["$defs"]
    moe = dict(defs["LayerSpec"])
    moe["required"] = [k for k in moe.get("required", []) if k not in _INHERITED]
    moe["description"] = "the MoE layer spec; hidden and dtype default to the model's"
    moe["properties"] = {k: v for k, v in moe["properties"].items() if k != "quantization"}  # top level only
    defs["ModelMoE"] = moe
    schema["properties"]["moe"] = {**schema["properties"]["moe"], "$ref": "#/$defs/ModelMoE"}
    return schema


# Latent sizes of a miniature MLA: the published ranks (512 / 1536) scaled to a hidden size of 64 would
# fall to single digits, so a miniature keeps the structure (low-rank q or not, decoupled RoPE dims) at
# fixed small sizes instead.
_MINI_MLA = {"kv_lora_rank": 32, "q_lora_rank": 48, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}


def miniature_model(spec: ModelSpec, hidden: int, *, vocab_size: int = 128, heads: int = 4) -> ModelSpec:
    """The same decoder at hidden size `hidden`, small enough to validate on a laptop: attention kind, q/k
    norm, biases, RoPE layout and theta, tied embeddings, dense/MoE schedule (at most one leading dense
    layer, then two MoE layers) and the whole MoE layer spec (through `miniature`) are kept; head counts
    keep their query:kv ratio; widths scale with the hidden size."""
    from .spec import miniature

    m, a = spec.model, spec.model.attention
    ratio = hidden / m.hidden
    group = max(1, a.heads // a.num_kv_heads)  # query heads per kv head
    heads = max(heads, group if a.kind == AttentionKind.GQA and group > 1 else 1)
    changes: dict[str, Any] = {"heads": heads, "head_dim": None}
    if a.kind == AttentionKind.GQA:
        kv = max(1, heads // group)
        changes["kv_heads"] = kv if kv < heads else heads // 2
    elif a.kind == AttentionKind.MOA:  # the expert count and top_k kept; kv heads per expert so heads stay ~4
        kv = max(1, heads // a.top_k)
        heads = changes["heads"] = kv * a.top_k
        changes["kv_heads"] = kv
    elif a.kind == AttentionKind.MLA:
        changes.update({k: v for k, v in _MINI_MLA.items() if k != "q_lora_rank"}, head_dim=None)
        changes["q_lora_rank"] = None if a.q_lora_rank is None else _MINI_MLA["q_lora_rank"]
    head_dim = hidden // heads
    if a.kind != AttentionKind.MLA and hidden % heads:
        # heads that do not divide the hidden size (a 6:1 GQA ratio at hidden 64) get an explicit even head_dim
        head_dim = max(2, head_dim // 2 * 2)
        changes["head_dim"] = head_dim
    if a.sliding_window is not None:  # a window the validation's short sequences reach; the sliding layers kept
        changes["sliding_window"] = min(a.sliding_window, 5)
        if a.sliding_layers is not None:
            changes["sliding_layers"] = tuple(i for i in a.sliding_layers if i < 2) or (0,)
    if a.rotary_dim is not None and a.kind != AttentionKind.MLA:  # keep the rotated fraction of each head
        changes["rotary_dim"] = max(2, round(a.rotary_dim / a.dim(m.hidden) * head_dim / 2) * 2)
    first_dense = min(m.first_dense, 1)
    layers = min(m.layers, first_dense + m.moe_every + 1)  # two MoE layers (with the dense ones between)
    schedule: dict[str, Any] = {"first_dense": first_dense}
    if m.moe_layer_indices is not None:
        # The listed pattern with each run of dense or MoE layers cut to one layer, up to the second MoE run.
        runs: list[bool] = []
        for i in range(m.layers):
            if not runs or runs[-1] != m.is_moe_layer(i):
                runs.append(m.is_moe_layer(i))
        kept = [j for j, moe in enumerate(runs) if moe][:2]
        runs = runs[:kept[-1] + 1 + (1 if len(kept) == 1 and kept[-1] + 1 < len(runs) else 0)]
        layers = len(runs)
        schedule["moe_layer_indices"] = tuple(j for j, moe in enumerate(runs) if moe)
    if a.nope_layers is not None:  # the last kept layer without RoPE, the others with it
        changes["nope_layers"] = (layers - 1,)
    if a.chunk_size is not None:  # a chunk the validation's short sequences cross; the chunked layers kept
        changes["chunk_size"] = min(a.chunk_size, 3)
        if a.chunked_layers is not None:
            changes["chunked_layers"] = tuple(i for i in a.chunked_layers if i < layers - 1) or (0,)
    if a.temperature is not None:  # a temperature that moves within a short sequence
        changes["temperature"] = dataclasses.replace(a.temperature, floor_scale=min(a.temperature.floor_scale, 2.0))
    dense_width = None if m.dense_width is None else max(2, round(m.dense_width * ratio / 2) * 2)
    attention = dataclasses.replace(a, **changes)
    scaling = attention.rope_scaling
    if scaling is not None and scaling.kind == RopeScalingKind.LONGROPE:  # one factor per pair of the smaller heads
        pairs = attention.rope_dim(hidden) // 2

        def pick(factors: tuple[float, ...]) -> tuple[float, ...]:
            return tuple(factors[round(i * (len(factors) - 1) / max(pairs - 1, 1))] for i in range(pairs))
        attention = dataclasses.replace(attention, rope_scaling=dataclasses.replace(
            scaling, short_factor=pick(scaling.short_factor), long_factor=pick(scaling.long_factor)))
    model = dataclasses.replace(m, name=f"{m.name}-h{hidden}", hidden=hidden, vocab_size=min(vocab_size, m.vocab_size),
                                layers=layers, **schedule, dense_width=dense_width, attention=attention)
    moe = dataclasses.replace(miniature(spec.moe, hidden), name=default_moe_name(model.name))
    return ModelSpec(model=model, moe=moe, quantization=spec.quantization)
