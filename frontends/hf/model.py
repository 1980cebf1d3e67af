"""Hugging Face whole models <-> moe-ir model specs and weights.

`model_spec_from_hf_config` reads the decoder keys (vocabulary, layers, attention, norms, which layers
are MoE) of the families moe-ir models exactly and takes the MoE layer from the layer importer
(`frontends/hf/config.py`), so the `moe:` section is what `moe-ir import-hf` gives for the same config.
`weights_from_hf_model` maps a causal-LM state dict (transformers' names) to the model graph's canonical
names; MoE blocks go through the layer importer's `weights_from_hf`. Both refuse what they cannot map
exactly: a key with behaviour the spec cannot express is a SpecError naming it, a tensor no weight
takes is a WeightsError listing it.

Attention per family (transformers 5.23):
  deepseek (remote code)            Llama attention; attention_bias puts biases on q, k, v and o
  mixtral                           Llama attention without biases (MixtralAttention ignores attention_bias,
                                    so attention_bias=true is refused as ambiguous)
  qwen2_moe                         biases on q, k, v only (qkv_bias); sliding windows are refused
  olmoe                             RMSNorm over the whole q and k projections, then clip_qkv's clamp
  gpt_oss                           Llama attention (half RoPE), attention_bias on q, k, v and o, head_dim, attention
                                    sinks; sliding_attention layers and YaRN are refused (not modelled yet)
  phimoe                            Llama attention, attention_bias on q, k, v and o; LayerNorm (weight and
                                    bias) norms; lm_head_bias; a sliding window in every layer; LongRoPE (long factors
                                    past the original context, where transformers' PhiMoE keeps the short ones)
  llama4_text                       Llama attention, RoPE on complex pairs (interleaved), NoPE layers (no_rope_layers)
                                    with the query temperature, chunked attention in the layers layer_types names,
                                    the weightless q/k norm after RoPE (use_qk_norm), dense layers of
                                    intermediate_size_mlp, Llama 3 RoPE scaling
  jetmoe                            mixture of attention heads (kind moa): num_local_experts query/output projection
                                    pairs, num_experts_per_tok of them per token over num_key_value_heads shared K/V
                                    heads of kv_channels dims, the output projections' bias; its layer norms take
                                    eps 1e-6 whatever rms_norm_eps says, the final norm rms_norm_eps
  deepseek_v2, deepseek_v3          MLA; attention_bias on q_a, kv_a and o; DeepseekV2's complex RoPE and
                                    V3's rope_interleave are the interleaved layout, V3 without it the half one
  longcat_flash                     MLA as DeepSeek-V3's with interleaved RoPE and its LoRA scales (latent_scales);
                                    layer_form dual_shortcut_moe: num_layers layers of two attention blocks and two
                                    dense MLPs (ffn_hidden_size) each beside one MoE block

Keys a config.json omits take the defaults of the family's config class (MODEL_DEFAULTS, checked against
the installed transformers by tests/test_models.py), as the layer importer does for the MoE keys. For the
remote-code family `deepseek` the decoder sizes have no checked default: a missing one is a SpecError.
The dense FFNs use the experts' activation (the families build every MLP from hidden_act).
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch

from moe_ir.model_spec import AttentionKind, ModelSpec, model_spec_from_dict
from moe_ir.spec import spec_to_dict
from .config import FAMILY_DEFAULTS, FamilyConfig, config_dict, describe_hf_config

__all__ = ["MODEL_DEFAULTS", "model_spec_from_hf_config", "weights_from_hf_model"]

_LLAMA_ATTENTION = ("deepseek", "mixtral", "qwen2_moe", "olmoe", "qwen3_moe", "glm4_moe", "dots1", "minimax_m2",
                    "ernie4_5_moe", "flex_olmo", "granitemoe", "exaone_moe", "hunyuan_v1_moe", "phimoe",
                    "gpt_oss", "granitemoeshared", "granitemoe_swa", "dbrx", "llama4_text")
# Families whose attention reads layer_types for its sliding-window layers (transformers 5.24).
_SLIDING_BY_LAYER_TYPES = ("qwen2_moe", "dots1", "exaone_moe", "gpt_oss", "granitemoe_swa")
# Families whose global (non-sliding) layers apply no RoPE once a sliding_window is set (EXAONE 4 style).
_GLOBAL_NOPE = ("exaone_moe",)
# Families whose decoder layers normalise the attention and FFN outputs (post-norm) instead of their inputs.
_POST_NORM = ("flex_olmo",)
_MLA = ("deepseek_v2", "deepseek_v3", "glm4_moe_lite", "longcat_flash")
# q/k RMSNorm per family: over each head (Qwen3 style) or the whole projection (OLMoE style); glm4_moe has it
# when use_qk_norm is set.
_QK_NORM = {"olmoe": "full", "minimax_m2": "full", "flex_olmo": "full", "qwen3_moe": "head", "dots1": "head",
            "exaone_moe": "head", "hunyuan_v1_moe": "head_after_rope"}
# Families whose attention_bias puts biases on q, k and v only (the output projection has none).
_QKV_BIAS_ONLY = ("glm4_moe",)
# The rotated fraction of each head when the config states none (glm4_moe's class default).
_DEFAULT_PARTIAL_ROTARY = {"glm4_moe": 0.5}


# Decoder keys' defaults as each family's config class sets them (transformers 5.23), for keys a
# config.json leaves out. rope_theta is the class's default_theta (transformers 5 keeps it in
# rope_parameters). `deepseek` (remote code) lists only keys whose absence has one meaning.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek": {"tie_word_embeddings": False, "attention_bias": False, "rope_theta": 10000.0},
    "deepseek_v2": {"vocab_size": 102400, "num_attention_heads": 32, "num_key_value_heads": 32,
                    "intermediate_size": 11008, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                    "attention_bias": False, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
                    "qk_rope_head_dim": 64, "v_head_dim": 128, "rope_theta": 10000.0},
    "deepseek_v3": {"vocab_size": 129280, "num_attention_heads": 128, "num_key_value_heads": 128,
                    "intermediate_size": 18432, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                    "attention_bias": False, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
                    "qk_rope_head_dim": 64, "v_head_dim": 128, "rope_interleave": True, "rope_theta": 10000.0},
    "mixtral": {"vocab_size": 32000, "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "head_dim": None, "sliding_window": None,
                "rope_theta": 1e6},
    "qwen2_moe": {"vocab_size": 151936, "num_attention_heads": 16, "num_key_value_heads": 16,
                  "intermediate_size": 5632, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "qkv_bias": True,
                  "use_sliding_window": False, "rope_theta": 10000.0},
    "gpt_oss": {"vocab_size": 201088, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
                "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": True, "rope_theta": 150000.0},
    "phimoe": {"vocab_size": 32064, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
               "tie_word_embeddings": False, "attention_bias": False, "lm_head_bias": False, "sliding_window": None,
               "rope_theta": 1e6},
    "olmoe": {"vocab_size": 50304, "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False, "clip_qkv": None,
              "rope_theta": 10000.0},
    "qwen3_moe": {"vocab_size": 151936, "num_attention_heads": 32, "num_key_value_heads": 4, "intermediate_size": 6144,
                  "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
                  "use_sliding_window": False, "rope_theta": 10000.0, "max_position_embeddings": 32768},
    "glm4_moe": {"vocab_size": 151552, "num_attention_heads": 96, "num_key_value_heads": 8, "intermediate_size": 10944,
                 "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False, "use_qk_norm": False,
                 "rope_theta": 10000.0, "max_position_embeddings": 131072},
    "glm4_moe_lite": {"vocab_size": 154880, "num_attention_heads": 20, "num_key_value_heads": 20,
                      "intermediate_size": 10240, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                      "attention_bias": False, "kv_lora_rank": 512, "q_lora_rank": 768, "qk_nope_head_dim": 192,
                      "qk_rope_head_dim": 64, "v_head_dim": 256, "rope_interleave": True, "rope_theta": 10000.0,
                      "max_position_embeddings": 202752},
    "dots1": {"vocab_size": 152064, "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 10944,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False, "rope_theta": 10000.0,
              "max_position_embeddings": 2048},
    "ernie4_5_moe": {"vocab_size": 103424, "num_attention_heads": 20, "num_key_value_heads": 4,
                     "intermediate_size": 12288, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
                     "rope_theta": 500000.0, "max_position_embeddings": 131072},
    "flex_olmo": {"vocab_size": 100352, "num_attention_heads": 32, "num_key_value_heads": 32,
                  "intermediate_size": 11008, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                  "attention_bias": False, "rope_theta": 500000.0, "max_position_embeddings": 4096},
    "exaone_moe": {"vocab_size": 102400, "num_attention_heads": 32, "num_key_value_heads": 32,
                   "intermediate_size": 16384, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                   "rope_theta": 10000.0, "max_position_embeddings": 2048, "sliding_window": 4096},
    "hunyuan_v1_moe": {"vocab_size": 290943, "num_attention_heads": 32, "num_key_value_heads": None,
                       "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False,
                       "rope_theta": 10000.0, "max_position_embeddings": 2048},
    "granitemoe": {"vocab_size": 32000, "num_attention_heads": 32, "num_key_value_heads": 32,
                   "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False, "rope_theta": 10000.0,
                   "max_position_embeddings": 2048, "embedding_multiplier": 1.0, "residual_multiplier": 1.0,
                   "attention_multiplier": 1.0, "logits_scaling": 1.0},
    # DBRX: no rms_norm_eps key, its biasless LayerNorms take nn.LayerNorm's default eps 1e-5
    "dbrx": {"vocab_size": 32000, "num_attention_heads": 16, "num_key_value_heads": 1, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": False, "attention_bias": False, "rope_theta": 10000.0,
             "max_position_embeddings": 2048, "attn_config.clip_qkv": None},
    "granitemoe_swa": {"vocab_size": 32000, "num_attention_heads": 32, "num_key_value_heads": None,
                       "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
                       "rope_theta": 10000.0, "max_position_embeddings": 2048, "embedding_multiplier": 1.0,
                       "residual_multiplier": 1.0, "attention_multiplier": 1.0, "logits_scaling": 1.0,
                       "sliding_window": 128},
    "granitemoeshared": {"vocab_size": 32000, "num_attention_heads": 32, "num_key_value_heads": 32,
                         "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
                         "rope_theta": 10000.0, "max_position_embeddings": 2048, "embedding_multiplier": 1.0,
                         "residual_multiplier": 1.0, "attention_multiplier": 1.0, "logits_scaling": 1.0},
    "minimax_m2": {"vocab_size": 200064, "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128,
                   "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 5e6,
                   "max_position_embeddings": 196608},
    "longcat_flash": {"vocab_size": 131072, "num_attention_heads": 64, "ffn_hidden_size": 12288, "rms_norm_eps": 1e-5,
                      "tie_word_embeddings": False, "attention_bias": False, "kv_lora_rank": 512, "q_lora_rank": 1536,
                      "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "rope_theta": 1e7,
                      "max_position_embeddings": 131072, "head_dim": 64},
    "llama4_text": {"vocab_size": 202048, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
                    "intermediate_size_mlp": 16384, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                    "attention_bias": False, "rope_theta": 500000.0, "max_position_embeddings": 131072,
                    "no_rope_layers": None, "no_rope_layer_interval": 4, "attention_chunk_size": 8192,
                    "layer_types": None, "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1,
                    "use_qk_norm": True},
    # JetMoE: num_attention_heads is not a key of its own (the class sets it to num_key_value_heads x
    # num_experts_per_tok); its head dim is kv_channels
    "jetmoe": {"vocab_size": 32000, "num_key_value_heads": 16, "kv_channels": 128, "rms_norm_eps": 1e-6,
               "tie_word_embeddings": True, "rope_theta": 10000.0, "max_position_embeddings": 4096},
}


# Families whose MoE layer imports but whose decoder needs what a model spec does not express yet:
# model_type -> (the config key at fault, the missing features).
DECODER_REFUSALS: dict[str, tuple[str, str]] = {}


def _config(data: Mapping[str, Any], model_type: str, file: str | None) -> FamilyConfig:
    """The layer importer's typed key access, with the decoder keys' defaults added."""
    c = FamilyConfig(data, model_type, file)
    c.defaults = {**FAMILY_DEFAULTS[model_type], **MODEL_DEFAULTS[model_type]}
    return c


# rope_type -> what moe-ir lacks to model it (one line for the refusal).
_ROPE_TYPES_MISSING = {
    "linear": "linear position interpolation", "dynamic": "dynamic NTK scaling (frequencies that change with "
    "the sequence length)",
    "proportional": "proportional RoPE",
}


def _rope_section(c: FamilyConfig) -> tuple[str, Mapping[str, Any]]:
    """(key, section) of the config's RoPE parameters. Both spellings are read: transformers 5 writes
    rope_parameters, older and hub configs rope_scaling, and transformers honours a scaled rope_scaling even
    next to a default rope_parameters."""
    found = ("rope_parameters", {})
    for key in ("rope_parameters", "rope_scaling"):
        section = c.data.get(key) or {}
        if not isinstance(section, Mapping):
            raise c.fail(key, f"expected a mapping, found {section!r}")
        if (section.get("rope_type") or section.get("type") or "default") != "default":
            return key, section
        if key == "rope_parameters":
            found = (key, section)
    return found


def _rope_number(c: FamilyConfig, key: str, section: Mapping[str, Any], name: str, kind=float) -> Any:
    """A number of the RoPE section, read like a top-level key (the error names where it sits)."""
    return FamilyConfig({f"{key}.{name}": section[name]}, c.model_type, c.file).get(f"{key}.{name}", kind)


def _rope(c: FamilyConfig) -> dict[str, Any]:
    """The attention section's RoPE keys: rope_theta and, for YaRN, rope_scaling (softmax_mscale where the
    family's attention applies DeepSeek's correction); other scalings are refused naming what is missing."""
    key, section = _rope_section(c)
    rope_type = section.get("rope_type") or section.get("type") or "default"
    out: dict[str, Any] = {}
    if "rope_theta" in section:
        out["rope_theta"] = _rope_number(c, key, section, "rope_theta")
    else:
        params = c.data.get("rope_parameters") or {}
        out["rope_theta"] = _rope_number(c, "rope_parameters", params, "rope_theta") if "rope_theta" in params \
            else c.get("rope_theta", float)
    if rope_type == "default":
        return out
    if rope_type == "dynamic" and c.model_type in _NTK_ALPHA and section.get("alpha") is not None:
        out["rope_theta"] = _ntk_alpha_theta(c, key, section, out["rope_theta"])
        return out
    if rope_type == "longrope":
        return {**out, "rope_scaling": _longrope(c, key, section)}
    if rope_type == "llama3":
        scaling = {"kind": "llama3"}
        for name, ours, kind in (("factor", "factor", float), ("original_max_position_embeddings",
                                 "original_max_positions", int), ("low_freq_factor", "low_freq_factor", float),
                                 ("high_freq_factor", "high_freq_factor", float)):
            if section.get(name) is None:
                raise c.fail(f"{key}.{name}", f"RoPE scaling llama3 needs {name}")
            scaling[ours] = _rope_number(c, key, section, name, kind)
        out["rope_scaling"] = scaling
        return out
    if rope_type != "yarn":
        missing = _ROPE_TYPES_MISSING.get(rope_type, f"the RoPE type {str(rope_type)[:40]!r}")
        raise c.fail(key, f"RoPE scaling '{str(rope_type)[:40]}' needs {missing}, which moe-ir does not model; "
                          "it models plain RoPE, YaRN, Llama 3's scaling and LongRoPE")
    original = section.get("original_max_position_embeddings")
    if original is None:
        original = c.get("max_position_embeddings", int)
    else:
        original = _rope_number(c, key, section, "original_max_position_embeddings", int)
    factor = _rope_number(c, key, section, "factor") if section.get("factor") is not None else \
        c.get("max_position_embeddings", int) / original
    scaling: dict[str, Any] = {"kind": "yarn", "factor": factor, "original_max_positions": original}
    for name, ours in (("beta_fast", "beta_fast"), ("beta_slow", "beta_slow"), ("mscale", "mscale"),
                       ("mscale_all_dim", "mscale_all_dim"), ("attention_factor", "attention_factor")):
        if section.get(name):  # transformers reads these with `or` defaults: 0 and null mean unset
            scaling[ours] = _rope_number(c, key, section, name)
    if "truncate" in section:
        scaling["truncate"] = _rope_number(c, key, section, "truncate", bool)
    # DeepSeek-V2/V3's attention multiplies its softmax scale by mscale(factor, mscale_all_dim)^2.
    if c.model_type in _MLA and scaling.get("mscale_all_dim"):
        scaling["softmax_mscale"] = True
    out["rope_scaling"] = scaling
    return out


# Families whose "dynamic" RoPE with an `alpha` is static NTK-alpha scaling: the base becomes
# theta * alpha^(d / (d - 2)) for head dim d, whatever the sequence length (Hunyuan's released configs).
_NTK_ALPHA = ("hunyuan_v1_moe",)


def _ntk_alpha_theta(c: FamilyConfig, key: str, section: Mapping[str, Any], theta: float) -> float:
    """The RoPE base NTK-alpha scaling gives: one plain rope_theta, as transformers computes it."""
    alpha = _rope_number(c, key, section, "alpha")
    if alpha <= 0:
        raise c.fail(key, f"alpha={alpha}: NTK-alpha scaling needs a positive alpha")
    dim = c.get("head_dim", int, optional=True) or _positive(c, "hidden_size") // _positive(c, "num_attention_heads")
    if dim <= 2:
        raise c.fail("head_dim", f"head_dim={dim}: NTK-alpha scaling needs a head of more than 2 dims")
    return theta * alpha ** (dim / (dim - 2))


def _longrope(c: FamilyConfig, key: str, section: Mapping[str, Any]) -> dict[str, Any]:
    """LongRoPE's section: the short and long per-pair factors and the original context; the cos/sin multipliers
    PhiMoE states (short_mscale, long_mscale), or else attention_factor for both (default
    sqrt(1 + ln(factor) / ln(original)), factor = max_position_embeddings / original, as transformers computes it)."""
    original = section.get("original_max_position_embeddings")
    if original is None:
        raise c.fail(f"{key}.original_max_position_embeddings", "LongRoPE needs original_max_position_embeddings")
    original = _rope_number(c, key, section, "original_max_position_embeddings", int)
    factors = {}
    for name in ("short_factor", "long_factor"):
        values = section.get(name)
        if not isinstance(values, list) or not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
            raise c.fail(f"{key}.{name}", f"expected a list of positive numbers, found {str(values)[:60]}")
        factors[name] = [float(v) for v in values]
    factor = _rope_number(c, key, section, "factor") if section.get("factor") is not None else \
        c.get("max_position_embeddings", int) / original
    if section.get("short_mscale") is not None and section.get("long_mscale") is not None:
        short, long = (_rope_number(c, key, section, name) for name in ("short_mscale", "long_mscale"))
    else:
        if section.get("attention_factor") is not None:
            short = _rope_number(c, key, section, "attention_factor")
        else:
            short = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        long = short
    return {"kind": "longrope", "factor": factor, "original_max_positions": original, **factors,
            "short_mscale": short, "long_mscale": long}


def _rotary_dim(c: FamilyConfig, head_dim: int) -> int | None:
    """The leading dims of each head RoPE rotates (transformers: int(head_dim * partial_rotary_factor), the
    factor in rope_parameters or at the top level; MiniMax-M2's legacy rotary_dim key), or None for all."""
    factor = None
    for where, data in (("rope_parameters", c.data.get("rope_parameters") or {}), ("", c.data)):
        if data.get("partial_rotary_factor") is not None:
            key = f"{where}.partial_rotary_factor" if where else "partial_rotary_factor"
            factor = FamilyConfig({key: data["partial_rotary_factor"]}, c.model_type, c.file).get(key, float)
            break
    if factor is None and c.data.get("rotary_dim") is not None:
        factor = c.get("rotary_dim", int) / head_dim
    if factor is None:
        factor = _DEFAULT_PARTIAL_ROTARY.get(c.model_type, 1.0)
    if not 0 < factor <= 1:
        raise c.fail("partial_rotary_factor", f"expected a fraction in (0, 1], found {factor}")
    dim = int(head_dim * factor)
    if dim % 2 or dim < 2:
        raise c.fail("partial_rotary_factor", f"rotates {dim} dims of a head of {head_dim}; RoPE rotates pairs")
    return None if dim == head_dim else dim


def _sliding_window(c: FamilyConfig, num_layers: int) -> dict[str, Any]:
    """The attention section's sliding_window / sliding_layers: from layer_types (a sliding_attention entry per
    sliding layer) where the family has them, else every layer for Mixtral's sliding_window and Qwen3-MoE's
    use_sliding_window (their masks slide in every layer)."""
    t = c.model_type
    layer_types = c.get("layer_types", list, optional=True) or []
    if layer_types:
        if any(kind not in ("full_attention", "sliding_attention") for kind in layer_types) or \
                len(layer_types) != num_layers:
            raise c.fail("layer_types", f"expected full_attention / sliding_attention per layer, found "
                                        f"{sorted(set(map(str, layer_types)))[:4]} for {num_layers} layers")
        sliding = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
        nope = t in _GLOBAL_NOPE and c.get("sliding_window", int, optional=True) is not None
        if not sliding and not nope:
            return {}
        if t not in _SLIDING_BY_LAYER_TYPES:
            raise c.fail("layer_types", f"sliding_attention layers of {t} are not read by moe-ir")
        window = c.get("sliding_window", int, optional=True)
        if not window or window < 1:
            raise c.fail("layer_types", f"sliding_attention layers need a positive sliding_window, found {window}")
        out: dict[str, Any] = {"sliding_window": window}
        if len(sliding) < num_layers:
            out["sliding_layers"] = sliding
        if nope:
            out["global_nope"] = True
        return out
    window = None
    if t in ("mixtral", "phimoe"):  # a sliding window mask in every layer whenever the key is set
        window = c.get("sliding_window", int, optional=True)
    elif t == "qwen3_moe" and c.get("use_sliding_window", bool):
        window = c.positive("sliding_window")
    return {} if window is None else {"sliding_window": window}


def _layer_schedule(moe_layers: tuple[int, ...], num_layers: int, c: FamilyConfig) -> dict:
    """The spec's schedule of the config's MoE layers: first_dense / moe_every when they follow that rule (a lone
    MoE layer before dense ones included), otherwise the list itself (moe_layer_indices)."""
    first = moe_layers[0]
    every = moe_layers[1] - moe_layers[0] if len(moe_layers) > 1 else num_layers - first
    if moe_layers == tuple(range(first, num_layers, every)):
        return {"first_dense": first, "moe_every": every}
    return {"moe_layer_indices": list(moe_layers)}


def _stated(c: FamilyConfig, key: str) -> None:
    """The remote-code family must state its decoder sizes: moe-ir checks no default for them."""
    if c.model_type == "deepseek" and key not in c.data:
        raise c.fail(key, f"'{key}' is missing; moe-ir checks no default of the deepseek remote-code config "
                          "for it, so the config must give it")


def _positive(c: FamilyConfig, key: str) -> int:
    _stated(c, key)
    return c.positive(key)


def _name_from_path(name_or_path: str, model_type: str) -> str:
    """A spec name from a config's `_name_or_path` (a hub id or a local folder): its last part, with what a
    spec name cannot hold (it becomes a file name) replaced by '_'; the model type when nothing is left."""
    last = name_or_path.rstrip("/\\").replace("\\", "/").split("/")[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", last).lstrip("._-")[:128]
    return cleaned or model_type


def _phimoe_decoder(c: FamilyConfig) -> dict:
    """PhiMoE's decoder keys beyond Llama attention (biases from attention_bias on q, k, v and o): LayerNorm
    (weight and bias, eps rms_norm_eps) for every norm, an optional LM head bias. Its sliding window (a mask
    transformers applies in every layer whenever the key is set) is read by _sliding_window."""
    return {"norm": "layer", "lm_head_bias": c.get("lm_head_bias", bool)}


def _gpt_oss_attention(c: FamilyConfig) -> dict:
    """gpt-oss's attention beyond Llama's (biases from attention_bias, head_dim from the config): a learned sink
    logit per head in every softmax. Its sliding-window layers and YaRN RoPE are refused by the generic checks
    (layer_types, rope_parameters), naming the feature."""
    return {"sinks": True}


def _granitemoe_swa_layer_types(c: FamilyConfig, num_layers: int) -> None:
    """GraniteMoeSWA's layer_types when the config omits them, as its class fills them: every fourth layer
    (0, 4, ...) global, the rest sliding."""
    if not c.data.get("layer_types"):
        c.data["layer_types"] = ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(num_layers)]


def _granitemoe_swa_attention(c: FamilyConfig, num_layers: int, attention: Mapping[str, Any]) -> dict:
    """GraniteMoeSWA's attention beyond Granite's: a learned sink per head (its sigmoid(lse - sink) scaling of the
    output is the extra softmax-denominator logit moe-ir's `sinks` are) and a RoPE base per layer
    (layer_rope_theta, 0 for a layer without RoPE): one base everywhere, or one on the sliding layers and none on
    the global ones (global_nope); other patterns are refused naming the key."""
    out: dict[str, Any] = {"sinks": True}
    thetas = c.get("layer_rope_theta", list, optional=True)
    if thetas is None:
        return out
    if len(thetas) != num_layers or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                                            for v in thetas):
        raise c.fail("layer_rope_theta", f"expected a RoPE base >= 0 per layer, found {str(thetas)[:60]}")
    sliding = set(attention.get("sliding_layers", range(num_layers)) if attention.get("sliding_window") else ())
    roped = {float(v) for v in thetas if v}
    if len(roped) > 1:
        raise c.fail("layer_rope_theta", f"RoPE bases {sorted(roped)[:4]} differ by layer; a model spec has one")
    nope = {i for i, v in enumerate(thetas) if not v}
    if nope and (nope != set(range(num_layers)) - sliding or not sliding):
        raise c.fail("layer_rope_theta", "layers without RoPE (0) other than exactly the global layers of a sliding "
                                         "model are not modelled (global_nope leaves RoPE out of every global layer)")
    if roped:
        out["rope_theta"] = roped.pop()
    if nope:
        out["global_nope"] = True
    return out


def _llama4_attention(c: FamilyConfig, num_layers: int) -> dict:
    """Llama 4's attention beyond Llama's: RoPE on complex pairs (the interleaved layout); no RoPE in the layers
    no_rope_layers marks 0 (default: every no_rope_layer_interval-th), whose queries take the temperature when
    attn_temperature_tuning is set; chunked attention (attention_chunk_size) in the layers layer_types calls
    chunked_attention (default: the RoPE layers); the weightless q/k norm after RoPE (use_qk_norm) in the RoPE
    layers."""
    flags = c.get("no_rope_layers", list, optional=True)
    if not flags:  # transformers fills an empty or missing list from the interval
        interval = c.positive("no_rope_layer_interval")
        flags = [int((i + 1) % interval != 0) for i in range(num_layers)]
    if len(flags) != num_layers or any(f not in (0, 1) or isinstance(f, float) for f in flags):
        raise c.fail("no_rope_layers", f"expected 0 (no RoPE) or 1 per layer for {num_layers} layers, found "
                                       f"{str(flags)[:60]}")
    nope = [i for i, f in enumerate(flags) if not f]
    chunk = c.get("attention_chunk_size", int, optional=True)
    layer_types = c.get("layer_types", list, optional=True) or [
        "chunked_attention" if f and chunk is not None else "full_attention" for f in flags]
    if len(layer_types) != num_layers or any(t not in ("chunked_attention", "full_attention") for t in layer_types):
        raise c.fail("layer_types", f"expected chunked_attention / full_attention per layer, found "
                                    f"{sorted(set(map(str, layer_types)))[:4]} for {num_layers} layers")
    chunked = [i for i, t in enumerate(layer_types) if t == "chunked_attention"]
    out: dict[str, Any] = {"rope_layout": "interleaved"}
    if nope:
        out["nope_layers"] = nope
        tuning = c.data.get("attn_temperature_tuning", c.defaults["attn_temperature_tuning"])
        if not isinstance(tuning, (bool, int)):
            raise c.fail("attn_temperature_tuning", f"expected true or false, found {str(tuning)[:40]}")
        if tuning:  # the released Scout config has 4 here, which transformers reads as true
            out["temperature"] = {"floor_scale": c.get("floor_scale", float), "scale": c.get("attn_scale", float)}
    if chunked:
        if chunk is None or chunk < 1:
            raise c.fail("attention_chunk_size", f"chunked_attention layers need a positive attention_chunk_size, "
                                                 f"found {chunk}")
        out["chunk_size"] = chunk
        if len(chunked) < num_layers:
            out["chunked_layers"] = chunked
    if c.get("use_qk_norm", bool):
        out["qk_norm"] = "weightless_after_rope"
    return out


def _longcat_attention(c: FamilyConfig) -> dict:
    """LongCat-Flash's MLA beyond DeepSeek-V3's: the LoRA scales, which transformers applies whatever
    mla_scale_q_lora / mla_scale_kv_lora say (a config that turns one off is refused as ambiguous)."""
    for key in ("mla_scale_q_lora", "mla_scale_kv_lora"):
        if c.data.get(key, True) is not True:
            raise c.fail(key, f"{key}={c.data[key]!r}: transformers' LongCat-Flash scales the latents whatever this "
                              "says, so the config is ambiguous")
    if c.get("q_lora_rank", int, optional=True) is None:
        raise c.fail("q_lora_rank", "LongCat-Flash's attention always projects its query through q_lora_rank")
    # transformers' LongCat-Flash builds its RoPE frequencies over head_dim dims and rotates qk_rope_head_dim
    rope, head_dim = c.positive("qk_rope_head_dim"), c.get("head_dim", int, optional=True)
    if head_dim != rope:
        raise c.fail("head_dim", f"head_dim={head_dim}: transformers' LongCat-Flash computes its RoPE over head_dim "
                                 f"dims, which must equal qk_rope_head_dim={rope}")
    return {"latent_scales": True}


def _longcat_decoder(c: FamilyConfig) -> dict:
    """LongCat-Flash's layers: two attention + dense MLP sublayers (ffn_hidden_size wide) beside one
    shortcut-connected MoE block each (layer_form dual_shortcut_moe; num_layers counts these layers)."""
    return {"layer_form": "dual_shortcut_moe", "dense_width": c.positive("ffn_hidden_size")}


def _jetmoe_heads(c: FamilyConfig) -> int:
    """JetMoE's query heads: num_key_value_heads per chosen attention expert (the class derives
    num_attention_heads so; a config stating another count is refused)."""
    heads = c.positive("num_key_value_heads") * c.positive("num_experts_per_tok")
    stated = c.get("num_attention_heads", int, optional=True)
    if stated is not None and stated != heads:
        raise c.fail("num_attention_heads", f"num_attention_heads={stated}: JetMoE has num_key_value_heads x "
                                            f"num_experts_per_tok = {heads} query heads")
    c.data["num_attention_heads"] = heads
    return heads


def _jetmoe_attention(c: FamilyConfig) -> dict:
    """JetMoE's mixture of attention heads (JetMoeMoA + JetMoeAttention): as many attention experts as MLP experts
    (num_local_experts), num_experts_per_tok per token (softmax over the top-k router logits), head dim
    kv_channels, the output projections' shared bias (out_bias), RoPE on the half layout."""
    return {"kind": AttentionKind.MOA.value, "experts": c.positive("num_local_experts"),
            "top_k": c.positive("num_experts_per_tok"), "kv_heads": c.positive("num_key_value_heads"),
            "head_dim": c.positive("kv_channels"), "qkv_bias": False, "out_bias": True}


def model_spec_from_hf_config(config: Any, *, name: str | None = None, file: str | None = None) -> ModelSpec:
    """ModelSpec of a transformers config object or config.json dict of a supported MoE family.

    Keys the spec cannot express exactly are SpecErrors naming the key; absent keys take the family's
    defaults (MODEL_DEFAULTS)."""
    data = config_dict(config)
    layer_spec, info = describe_hf_config(data, file=file)
    t = info.model_type
    if t in DECODER_REFUSALS:
        key, missing = DECODER_REFUSALS[t]
        raise FamilyConfig(data, t, file).fail(key, f"the {t} decoder cannot be imported as a whole model: {missing}; "
                                                    "import its MoE layer (without --model)")
    c = _config(data, t, file)
    if t == "jetmoe":
        _jetmoe_heads(c)
    hidden, heads = layer_spec.hidden, _positive(c, "num_attention_heads")
    _stated(c, "num_key_value_heads")
    kv_heads = c.get("num_key_value_heads", int, optional=True)
    if kv_heads is None:  # null: as many as query heads
        kv_heads = heads
    elif kv_heads < 1:  # not "unset": 0 would otherwise read as multi-head attention
        raise c.fail("num_key_value_heads", f"expected a positive integer, found {kv_heads}")
    model_name = name or _name_from_path(str(data.get("_name_or_path") or ""), t)
    attention: dict[str, Any] = {"heads": heads, **_rope(c)}
    if t == "granitemoe_swa":
        _granitemoe_swa_layer_types(c, info.num_layers)
    if t != "llama4_text":  # its layer_types name chunked layers (_llama4_attention)
        attention.update(_sliding_window(c, info.num_layers))
    if t == "mixtral" and c.data.get("attention_bias"):
        raise c.fail("attention_bias", "attention_bias=true: transformers' Mixtral ignores it (its attention has no "
                                       "biases), so the config is ambiguous")
    # Qwen2-MoE reads qkv_bias instead (below); Mixtral and MiniMax-M2 have no attention biases; ERNIE's come with
    # use_bias, which the layer import refuses.
    bias = c.get("attention_bias", bool) if t not in ("mixtral", "qwen2_moe", "minimax_m2", "ernie4_5_moe",
                                                      "exaone_moe", "jetmoe") else False
    if t in _MLA:
        attention.update(kind=AttentionKind.MLA.value, q_lora_rank=c.get("q_lora_rank", int, optional=True),
                         kv_lora_rank=c.positive("kv_lora_rank"), qk_nope_head_dim=c.positive("qk_nope_head_dim"),
                         qk_rope_head_dim=c.positive("qk_rope_head_dim"), v_head_dim=c.positive("v_head_dim"),
                         qkv_bias=bias, out_bias=bias)
        interleaved = t in ("deepseek_v2", "longcat_flash") or c.get("rope_interleave", bool)
        attention["rope_layout"] = "interleaved" if interleaved else "half"
    else:
        attention["kind"] = AttentionKind.MHA.value if kv_heads == heads else AttentionKind.GQA.value
        if kv_heads != heads:
            attention["kv_heads"] = kv_heads
        head_dim = c.get("head_dim", int, optional=True)
        if head_dim and head_dim != hidden // heads:
            attention["head_dim"] = head_dim
        if t == "ernie4_5_moe":  # pairs (2j, 2j+1), as its rotate_half does
            attention["rope_layout"] = "interleaved"
        rotary = _rotary_dim(c, head_dim or hidden // heads)
        if rotary is not None:
            attention["rotary_dim"] = rotary
        if t == "qwen2_moe":
            if c.get("use_sliding_window", bool) and not c.data.get("layer_types"):
                raise c.fail("use_sliding_window", "use_sliding_window without layer_types: state which layers slide "
                                                   "(transformers derives them from max_window_layers)")
            attention["qkv_bias"] = c.get("qkv_bias", bool)
        else:
            attention.update(qkv_bias=bias, out_bias=bias and t not in _QKV_BIAS_ONLY)
        if t == "olmoe" and c.get("clip_qkv", float, optional=True) is not None:
            attention["clip_qkv"] = c.get("clip_qkv", float)
        if t in _QK_NORM or (t == "glm4_moe" and c.get("use_qk_norm", bool)):
            attention["qk_norm"] = _QK_NORM.get(t, "head")
    decoder = _phimoe_decoder(c) if t == "phimoe" else {}
    if t == "dbrx":  # biasless LayerNorms; q/k/v clamped on the fused Wqkv, which is the same element-wise
        decoder = {"norm": "layer_no_bias"}
        if c.get("attn_config.clip_qkv", float, optional=True) is not None:
            attention["clip_qkv"] = c.get("attn_config.clip_qkv", float)
    if t == "gpt_oss":
        attention.update(_gpt_oss_attention(c))
    if t == "llama4_text":
        attention.update(_llama4_attention(c, info.num_layers))
    if t == "longcat_flash":
        attention.update(_longcat_attention(c))
        decoder = _longcat_decoder(c)
    if t == "jetmoe":
        attention.pop("head_dim", None)
        attention.update(_jetmoe_attention(c))
    _stated(c, "rms_norm_eps")
    eps = c.get("rms_norm_eps", float)
    if t == "jetmoe" and eps != 1e-6:  # its decoder layers build their norms with the default eps
        decoder["final_norm_eps"] = eps
        eps = 1e-6
    model = {"name": model_name, "source": layer_spec.source.rsplit(", layer", 1)[0],
             "vocab_size": _positive(c, "vocab_size"), "hidden": hidden, "layers": info.num_layers,
             "tied_embeddings": c.get("tie_word_embeddings", bool),
             **_layer_schedule(info.moe_layers, info.num_layers, c), "attention": attention,
             "rms_norm_eps": eps, "dtype": layer_spec.dtype.value,
             "norm_position": "post" if t in _POST_NORM else "pre", **decoder}
    if t == "granitemoe_swa":
        attention.update(_granitemoe_swa_attention(c, info.num_layers, attention))
    if t in ("granitemoe", "granitemoeshared", "granitemoe_swa"):  # muP multipliers; attention's is the softmax scale
        model["multipliers"] = {"embedding": c.get("embedding_multiplier", float),
                                "residual": c.get("residual_multiplier", float),
                                "logits": c.get("logits_scaling", float)}
        attention["softmax_scale"] = c.get("attention_multiplier", float)
    if t == "longcat_flash":
        model["dense_activation"] = layer_spec.experts.activation.value
    if len(info.moe_layers) < info.num_layers:  # Llama 4's dense layers have a width of their own
        model["dense_width"] = _positive(c, "intermediate_size_mlp" if t == "llama4_text" else "intermediate_size")
        model["dense_activation"] = layer_spec.experts.activation.value
    moe = spec_to_dict(layer_spec)
    for key in ("hidden", "dtype", "name", "source"):
        moe.pop(key, None)
    return model_spec_from_dict({"model": model, "moe": moe}, file=file)


def weights_from_hf_model(state_dict: Mapping[str, torch.Tensor] | torch.nn.Module, spec: ModelSpec,
                          *, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Canonical weights of the model graph from a transformers causal-LM state dict (or the model).

    Every graph weight must be found and every tensor of the source used; WeightsError lists what is not.
    Tensors take the dtype the graph declares. The names are frontends/hf/tensor_map.py's rules, which the
    streamed checkpoint import (frontends/hf/checkpoint.py) and the export to transformers use too."""
    from .checkpoint import canonical_tensors, plan_import
    from .safetensors_io import Checkpoint

    with Checkpoint(state_dict) as ckpt:
        graph, rules = plan_import(spec, ckpt, prefix=prefix)
        weights = dict(canonical_tensors(graph, rules, ckpt))
    return {name: weights[name] for name in graph.weights}
