"""moe-ir model spec + canonical weights -> a folder transformers loads (`config.json` + `model.safetensors`).

The config is written for one of the families moe-ir imports natively in transformers (EXPORT_FAMILIES:
deepseek_v2, deepseek_v3, mixtral, qwen2_moe, olmoe, qwen3_moe, glm4_moe, glm4_moe_lite, dots1, exaone_moe,
ernie4_5_moe, minimax_m2, hunyuan_v1_moe, flex_olmo, granitemoe, granitemoeshared, granitemoe_swa, phimoe, gpt_oss,
dbrx, longcat_flash) and then read back through the importer
(`model_spec_from_hf_config`): the export is accepted only if that gives the same spec, so the importer
stays the one statement of what each config key means and an export can never silently change the model.
Balance losses are the one exception: they shape training only and several have no config key in a given
family, so a difference there is reported as a note, not refused.

DeepSeekMoE (model_type `deepseek`) is remote code that transformers does not carry; a spec of that shape
(Llama attention, softmax routing, ungated shared experts) matches none of the families and is refused
with each family's reason.

The weights are written in the layout `save_pretrained` writes (hub layout: per-expert tensors, Mixtral's
under `block_sparse_moe` with w1/w3/w2), tensor by tensor from the canonical safetensors file, in the
canonical dtypes (a family's router and shared-MLP names where they differ: _BLOCK_NAMES; DBRX's own names,
fused Wqkv and [E*F, H] expert rows: tensor_map.dbrx_model_rules). The folder is staged beside the destination and
renamed when complete.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from moe_ir.artifacts import OutputFolder
from moe_ir.errors import SpecError, WeightsError
from moe_ir.model_spec import AttentionKind, ModelSpec, NormKind, RopeLayout, model_spec_to_dict
from moe_ir.spec import DESCRIPTIVE_FIELDS, Activation, GroupScore, ScoreFn
from .tensor_map import HFLayout, dbrx_model_rules, model_rules

__all__ = ["EXPORT_FAMILIES", "export_hf_checkpoint", "hf_config_from_model_spec"]

# family -> (architecture class, MoE module name and expert layout as save_pretrained writes them)
EXPORT_FAMILIES: dict[str, tuple[str, str, HFLayout]] = {
    "deepseek_v3": ("DeepseekV3ForCausalLM", "mlp", HFLayout.PER_EXPERT),
    "deepseek_v2": ("DeepseekV2ForCausalLM", "mlp", HFLayout.PER_EXPERT),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "mlp", HFLayout.PER_EXPERT),
    "olmoe": ("OlmoeForCausalLM", "mlp", HFLayout.PER_EXPERT),
    "mixtral": ("MixtralForCausalLM", "block_sparse_moe", HFLayout.PER_EXPERT_W123),
    # -- the families of issue 17 (transformers 5 names; save_pretrained writes per-expert tensors) --
    "qwen3_moe": ("Qwen3MoeForCausalLM", "mlp", HFLayout.PER_EXPERT),
    "glm4_moe": ("Glm4MoeForCausalLM", "mlp", HFLayout.PER_EXPERT),
    "dots1": ("Dots1ForCausalLM", "mlp", HFLayout.PER_EXPERT),
    "ernie4_5_moe": ("Ernie4_5_MoeForCausalLM", "mlp", HFLayout.PER_EXPERT),
    "minimax_m2": ("MiniMaxM2ForCausalLM", "block_sparse_moe", HFLayout.PER_EXPERT_W123),
    "hunyuan_v1_moe": ("HunYuanMoEV1ForCausalLM", "mlp", HFLayout.PER_EXPERT),
    "flex_olmo": ("FlexOlmoForCausalLM", "mlp", HFLayout.PER_EXPERT),
    "granitemoe": ("GraniteMoeForCausalLM", "block_sparse_moe", HFLayout.STACKED_LINEAR),
    "granitemoeshared": ("GraniteMoeSharedForCausalLM", "block_sparse_moe", HFLayout.STACKED_LINEAR),
    "phimoe": ("PhimoeForCausalLM", "block_sparse_moe", HFLayout.PER_EXPERT_W123),
    "gpt_oss": ("GptOssForCausalLM", "mlp", HFLayout.STACKED),
    "glm4_moe_lite": ("Glm4MoeLiteForCausalLM", "mlp", HFLayout.PER_EXPERT),
    "exaone_moe": ("ExaoneMoeForCausalLM", "mlp", HFLayout.PER_EXPERT),
    "granitemoe_swa": ("GraniteMoeSWAForCausalLM", "block_sparse_moe", HFLayout.STACKED),
    # DBRX names every tensor its own way (tensor_map.dbrx_model_rules): the block name and layout are unused
    "dbrx": ("DbrxForCausalLM", "ffn", HFLayout.STACKED),
    # stacked: gate_up_proj keeps (zero) rows for the identity experts, as the module holds them
    "longcat_flash": ("LongcatFlashForCausalLM", "mlp", HFLayout.STACKED),
    "jetmoe": ("JetMoeForCausalLM", "mlp", HFLayout.STACKED_LINEAR),
}
# Tensor names a family's checkpoint gives its router and shared MLP, where they are not the common ones
# (keyword arguments of tensor_map.model_rules; the names import-hf detects, tensor_map.detect_router_names).
_BLOCK_NAMES: dict[str, dict[str, str]] = {
    "ernie4_5_moe": {"router_bias": "moe_statics.e_score_correction_bias"},
    "minimax_m2": {"router_bias": "e_score_correction_bias"},
    "hunyuan_v1_moe": {"router_weight": "gate.wg.weight", "shared_mlp": "shared_mlp"},
    "granitemoe": {"router_weight": "router.layer.weight"},
    "jetmoe": {"router_weight": "router.layer.weight"},
    "granitemoeshared": {"router_weight": "router.layer.weight", "layer_shared_mlp": "shared_mlp"},
    # GraniteMoeSWA has no hub conversion: save_pretrained writes its module names (experts.gate_up_proj, router)
    "granitemoe_swa": {"router_weight": "router.weight", "layer_shared_mlp": "shared_mlp"},
}
# Families whose router scores are sigmoids (the rest take a softmax).
_SIGMOID_FAMILIES = ("deepseek_v3", "glm4_moe", "dots1", "minimax_m2", "glm4_moe_lite", "exaone_moe")

_HIDDEN_ACT = {Activation.SWIGLU: "silu", Activation.GEGLU: "gelu"}


class _Unfit(Exception):
    """The spec has something the family has no key for (message: what)."""


def _balance_coef(spec: ModelSpec) -> float:
    """router_aux_loss_coef of the transformers families: balance.expert = coef x top_k (config.py)."""
    expert = spec.moe.balance.expert
    return 0.0 if expert is None else expert / spec.moe.experts.top_k


def _common(spec: ModelSpec, family: str) -> dict[str, Any]:
    m, a, e = spec.model, spec.model.attention, spec.moe.experts
    clamped = family == "gpt_oss" and e.activation == Activation.CLAMPED_SWIGLU  # its experts read no hidden_act
    if e.activation not in _HIDDEN_ACT and not clamped:
        raise _Unfit(f"experts.activation {e.activation.value}: the families build gated MLPs (silu or gelu)")
    if m.dense_layers and m.dense_activation != e.activation:
        raise _Unfit(f"dense_activation {m.dense_activation.value} differs from the experts' "
                     f"{e.activation.value}: one hidden_act drives every MLP")
    config: dict[str, Any] = {
        "architectures": [EXPORT_FAMILIES[family][0]], "model_type": family, "vocab_size": m.vocab_size,
        "hidden_size": m.hidden, "num_hidden_layers": m.layers, "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads or a.heads, "hidden_act": _HIDDEN_ACT.get(e.activation, "silu"),
        "rms_norm_eps": m.rms_norm_eps, "tie_word_embeddings": m.tied_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta}, "dtype": m.dtype.value,
    }
    y = a.rope_scaling
    if y is not None:  # read back by the importer (model.py) to the same section, else the family is refused
        config["rope_parameters"] = {
            "rope_type": "yarn", "rope_theta": a.rope_theta, "factor": y.factor,
            "original_max_position_embeddings": y.original_max_positions, "beta_fast": y.beta_fast,
            "beta_slow": y.beta_slow, "truncate": y.truncate,
            **{k: v for k, v in (("mscale", y.mscale), ("mscale_all_dim", y.mscale_all_dim),
                                 ("attention_factor", y.attention_factor)) if v is not None}}
        config["max_position_embeddings"] = round(y.factor * y.original_max_positions)
    if m.dense_width is not None:
        config["intermediate_size"] = m.dense_width
    return config


def _llama_attention(spec: ModelSpec, config: dict, family: str) -> None:
    a = spec.model.attention
    if a.kind == AttentionKind.MLA:
        raise _Unfit("MLA attention is DeepSeek-V2/V3's")
    if a.head_dim is not None and a.head_dim != spec.model.hidden // a.heads:
        if family == "olmoe":
            raise _Unfit(f"head_dim {a.head_dim} other than hidden / heads: OLMoE has no head_dim key")
        config["head_dim"] = a.head_dim


def _first_dense_only(spec: ModelSpec, family: str) -> int:
    """The number of leading dense layers, when they are the only dense ones (first_k_dense_replace)."""
    m = spec.model
    leading = len(m.dense_layers)
    if m.dense_layers != tuple(range(leading)):
        raise _Unfit(f"dense layers {list(m.dense_layers)[:8]}: {family} makes every layer from "
                     "first_k_dense_replace on MoE")
    if leading and family in ("mixtral", "olmoe", "dbrx"):
        raise _Unfit(f"{leading} dense layers: every {family} layer is MoE")
    return leading


def _deepseek(spec: ModelSpec, family: str) -> dict:
    a, moe = spec.model.attention, spec.moe
    e, r = moe.experts, moe.router
    if a.kind != AttentionKind.MLA:
        raise _Unfit(f"{a.kind.value} attention: {family} attention is MLA")
    if not e.shared:
        raise _Unfit(f"no shared experts: transformers' {family} always builds n_shared_experts of them")
    leading = _first_dense_only(spec, family)
    config = _common(spec, family)
    config.update(n_routed_experts=e.routed, n_shared_experts=e.shared, moe_intermediate_size=e.width,
                  num_experts_per_tok=e.top_k, first_k_dense_replace=leading,
                  routed_scaling_factor=r.scaling, kv_lora_rank=a.kv_lora_rank, q_lora_rank=a.q_lora_rank,
                  qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim,
                  v_head_dim=a.v_head_dim, attention_bias=a.qkv_bias, head_dim=a.qk_rope_head_dim)
    if "intermediate_size" not in config:
        config["intermediate_size"] = e.width  # no dense layer reads it; a value keeps the class happy
    balance = moe.balance
    if balance.sequence is not None or balance.expert is not None:
        seq = balance.sequence is not None
        config.update(aux_loss_alpha=balance.sequence if seq else balance.expert, seq_aux=seq)
    g = r.group_limit
    if family == "deepseek_v2":
        config.update(topk_method="group_limited_greedy" if g else "greedy", norm_topk_prob=False,
                      n_group=g.groups if g else None, topk_group=g.kept if g else None)
    else:
        config.update(n_group=g.groups if g else 1, topk_group=g.kept if g else 1, norm_topk_prob=r.normalize,
                      rope_interleave=a.rope_layout == RopeLayout.INTERLEAVED)
    return config


def _mixtral(spec: ModelSpec) -> dict:
    e = spec.moe.experts
    _first_dense_only(spec, "mixtral")
    config = _common(spec, "mixtral")
    _llama_attention(spec, config, "mixtral")
    config.update(num_local_experts=e.routed, num_experts_per_tok=e.top_k, intermediate_size=e.width,
                  router_aux_loss_coef=_balance_coef(spec), router_jitter_noise=0.0, sliding_window=None)
    return config


def _olmoe(spec: ModelSpec) -> dict:
    e, a = spec.moe.experts, spec.model.attention
    _first_dense_only(spec, "olmoe")
    config = _common(spec, "olmoe")
    _llama_attention(spec, config, "olmoe")
    config.update(num_experts=e.routed, num_experts_per_tok=e.top_k, intermediate_size=e.width,
                  norm_topk_prob=spec.moe.router.normalize, router_aux_loss_coef=_balance_coef(spec),
                  attention_bias=a.qkv_bias, clip_qkv=a.clip_qkv)
    return config


def _qwen2_moe(spec: ModelSpec) -> dict:
    m, e, a = spec.model, spec.moe.experts, spec.model.attention
    if e.shared != 1 or not e.shared_gate:
        raise _Unfit("Qwen2-MoE has exactly one shared expert with a sigmoid gate")
    config = _common(spec, "qwen2_moe")
    _llama_attention(spec, config, "qwen2_moe")
    # mlp_only_layers lists every dense layer, so any first_dense/moe_every schedule maps.
    config.update(num_experts=e.routed, num_experts_per_tok=e.top_k, moe_intermediate_size=e.width,
                  shared_expert_intermediate_size=e.shared_ffn_width, norm_topk_prob=spec.moe.router.normalize,
                  router_aux_loss_coef=_balance_coef(spec), decoder_sparse_step=1,
                  mlp_only_layers=list(m.dense_layers), qkv_bias=a.qkv_bias, use_sliding_window=False)
    config.setdefault("intermediate_size", e.shared_ffn_width)
    return config


def _head_dim(spec: ModelSpec) -> int:
    a = spec.model.attention
    return a.head_dim or spec.model.hidden // a.heads


def _llama_family(spec: ModelSpec, family: str) -> dict:
    """The keys the Llama-attention families of issue 17 share: attention (head_dim written always, as some
    classes default it to a fixed number), biases, partial rotary embedding."""
    a = spec.model.attention
    config = _common(spec, family)
    _llama_attention(spec, config, family)
    config["head_dim"] = _head_dim(spec)
    config["attention_bias"] = a.qkv_bias
    # A spec carries no token ids; a class's default pad id (FlexOlmo's 100277) can lie outside the vocabulary,
    # which nn.Embedding refuses as its padding_idx.
    config["pad_token_id"] = None
    if a.rotary_dim is not None or family == "glm4_moe":  # glm4_moe's class rotates half a head by default
        config["partial_rotary_factor"] = (a.rotary_dim or _head_dim(spec)) / _head_dim(spec)
        config["rope_parameters"]["partial_rotary_factor"] = config["partial_rotary_factor"]
    return config


def _qwen3_moe(spec: ModelSpec) -> dict:
    m, e = spec.model, spec.moe.experts
    config = _llama_family(spec, "qwen3_moe")
    # mlp_only_layers lists every dense layer, so any schedule maps.
    config.update(num_experts=e.routed, num_experts_per_tok=e.top_k, moe_intermediate_size=e.width,
                  norm_topk_prob=spec.moe.router.normalize, router_aux_loss_coef=_balance_coef(spec),
                  decoder_sparse_step=1, mlp_only_layers=list(m.dense_layers), use_sliding_window=False)
    config.setdefault("intermediate_size", e.width)
    return config


def _sigmoid_grouped(spec: ModelSpec, family: str) -> dict:
    """GLM-4.5 and dots.llm1: DeepSeek-V3's routing with Llama attention, first_k_dense_replace."""
    e, r = spec.moe.experts, spec.moe.router
    leading = _first_dense_only(spec, family)
    config = _llama_family(spec, family)
    g = r.group_limit
    config.update(n_routed_experts=e.routed, n_shared_experts=e.shared, moe_intermediate_size=e.width,
                  num_experts_per_tok=e.top_k, first_k_dense_replace=leading, norm_topk_prob=r.normalize,
                  routed_scaling_factor=r.scaling, n_group=g.groups if g else 1, topk_group=g.kept if g else 1)
    config.setdefault("intermediate_size", e.width)
    if family == "glm4_moe":
        config["use_qk_norm"] = spec.model.attention.qk_norm.value != "none"
    else:  # dots1: every layer attends globally (its class would otherwise derive sliding layers)
        config.update(sliding_window=None, layer_types=["full_attention"] * spec.model.layers)
    return config


def _ernie4_5_moe(spec: ModelSpec) -> dict:
    m, e = spec.model, spec.moe.experts
    moe = list(m.moe_layers)
    interval = moe[1] - moe[0] if len(moe) > 1 else 1
    if moe != list(range(moe[0], moe[-1] + 1, interval)):
        raise _Unfit(f"MoE layers {moe[:8]}: ERNIE's schedule is a start, an end and an interval")
    config = _common(spec, "ernie4_5_moe")
    _llama_attention(spec, config, "ernie4_5_moe")
    config["head_dim"] = _head_dim(spec)
    config.update(moe_num_experts=e.routed, moe_k=e.top_k, moe_intermediate_size=e.width,
                  moe_num_shared_experts=e.shared, moe_layer_start_index=moe[0], moe_layer_end_index=moe[-1],
                  moe_layer_interval=interval, router_aux_loss_coef=_balance_coef(spec), use_bias=False)
    config.setdefault("intermediate_size", e.width)
    return config


def _minimax_m2(spec: ModelSpec) -> dict:
    e = spec.moe.experts
    _first_dense_only(spec, "minimax_m2")
    config = _llama_family(spec, "minimax_m2")
    del config["attention_bias"]  # MiniMax-M2's attention has no biases and no such key
    config.update(num_local_experts=e.routed, num_experts_per_tok=e.top_k, intermediate_size=e.width,
                  router_jitter_noise=0.0)
    return config


def _hunyuan_v1_moe(spec: ModelSpec) -> dict:
    e = spec.moe.experts
    _first_dense_only(spec, "hunyuan_v1_moe")
    config = _llama_family(spec, "hunyuan_v1_moe")
    config.update(num_experts=e.routed, moe_topk=e.top_k, intermediate_size=e.width)
    return config


def _flex_olmo(spec: ModelSpec) -> dict:
    e = spec.moe.experts
    _first_dense_only(spec, "flex_olmo")
    config = _llama_family(spec, "flex_olmo")
    config.update(num_experts=e.routed, num_experts_per_tok=e.top_k, intermediate_size=e.width,
                  norm_topk_prob=spec.moe.router.normalize, router_aux_loss_coef=_balance_coef(spec))
    return config


def _granitemoe(spec: ModelSpec, family: str = "granitemoe") -> dict:
    m, e, a = spec.model, spec.moe.experts, spec.model.attention
    _first_dense_only(spec, family)
    config = _llama_family(spec, family)
    if family in ("granitemoeshared", "granitemoe_swa"):  # one ungated shared MLP beside the block, or none
        config["shared_intermediate_size"] = e.shared_ffn_width if e.shared else 0
    mult = m.multipliers
    config.update(num_local_experts=e.routed, num_experts_per_tok=e.top_k, intermediate_size=e.width,
                  router_aux_loss_coef=_balance_coef(spec),
                  attention_multiplier=a.softmax_scale if a.softmax_scale is not None else _head_dim(spec) ** -0.5,
                  embedding_multiplier=mult.embedding if mult else 1.0,
                  residual_multiplier=mult.residual if mult else 1.0, logits_scaling=mult.logits if mult else 1.0)
    return config


def _phimoe(spec: ModelSpec) -> dict:
    """PhiMoE: SparseMixer routing (its threshold is router_jitter_noise), LayerNorms with biases (eps in
    rms_norm_eps), attention biases on q, k, v and o together, an optional LM head bias."""
    m, e, r = spec.model, spec.moe.experts, spec.moe.router
    if r.sparse_mixer is None:
        raise _Unfit("PhiMoE routes by SparseMixer (router.sparse_mixer)")
    _first_dense_only(spec, "phimoe")
    config = _llama_family(spec, "phimoe")
    config.update(num_local_experts=e.routed, num_experts_per_tok=e.top_k, intermediate_size=e.width,
                  router_jitter_noise=r.sparse_mixer.jitter_eps, input_jitter_noise=0.0,
                  router_aux_loss_coef=_balance_coef(spec), lm_head_bias=m.lm_head_bias, sliding_window=None)
    return config


def _gpt_oss(spec: ModelSpec) -> dict:
    """gpt-oss: clamped SwiGLU experts with biases (swiglu_alpha / swiglu_limit), a router logit bias, attention
    sinks and biases, sliding-window layers by layer_types."""
    m, e, a = spec.model, spec.moe.experts, spec.model.attention
    if e.clamp is None:
        raise _Unfit("gpt-oss's experts are clamped SwiGLU (experts.clamp)")
    _first_dense_only(spec, "gpt_oss")
    config = _llama_family(spec, "gpt_oss")
    config.update(num_local_experts=e.routed, num_experts_per_tok=e.top_k, intermediate_size=e.width,
                  swiglu_alpha=e.clamp.alpha, swiglu_limit=e.clamp.limit, router_aux_loss_coef=_balance_coef(spec))
    sliding = set(range(m.layers)) if a.sliding_layers is None else set(a.sliding_layers)
    if a.sliding_window is None:
        sliding = set()
    config.update(sliding_window=a.sliding_window if sliding else None,
                  layer_types=["sliding_attention" if i in sliding else "full_attention" for i in range(m.layers)])
    return config


def _jetmoe(spec: ModelSpec) -> dict:
    """JetMoE: mixture of attention heads with as many attention experts as MLP experts and one top-k, every layer
    MoE, the layer norms' eps 1e-6 and the final norm's rms_norm_eps."""
    m, a, e = spec.model, spec.model.attention, spec.moe.experts
    if a.kind != AttentionKind.MOA:
        raise _Unfit(f"{a.kind.value} attention: JetMoE's attention is a mixture of attention heads (kind moa)")
    if (a.experts, a.top_k) != (e.routed, e.top_k):
        raise _Unfit(f"{a.experts} attention experts, top-{a.top_k}, beside {e.routed} MLP experts, top-{e.top_k}: "
                     "JetMoE's num_local_experts and num_experts_per_tok size both")
    if m.dense_layers:
        raise _Unfit(f"dense layers {list(m.dense_layers)[:8]}: every JetMoE layer is MoE")
    config = _common(spec, "jetmoe")
    config.pop("hidden_act", None)
    config.update(activation_function=_HIDDEN_ACT[e.activation], num_local_experts=e.routed,
                  num_experts_per_tok=e.top_k, intermediate_size=e.width, num_key_value_heads=a.kv_heads,
                  kv_channels=a.dim(m.hidden), aux_loss_coef=0.0,
                  rms_norm_eps=m.final_norm_eps if m.final_norm_eps is not None else m.rms_norm_eps)
    return config


def _mlp_layer_types(spec: ModelSpec) -> list[str]:
    """GLM-4.7-Flash's and EXAONE MoE's schedule: "dense" / "sparse" per layer, so any pattern maps."""
    return ["sparse" if spec.model.is_moe_layer(i) else "dense" for i in range(spec.model.layers)]


def _glm4_moe_lite(spec: ModelSpec) -> dict:
    """GLM-4.7-Flash: DeepSeek-V3's MLA and routing under GLM's keys, the schedule as mlp_layer_types."""
    a, e, r = spec.model.attention, spec.moe.experts, spec.moe.router
    if a.kind != AttentionKind.MLA:
        raise _Unfit(f"{a.kind.value} attention: glm4_moe_lite's attention is MLA")
    g = r.group_limit
    config = _common(spec, "glm4_moe_lite")
    config.update(n_routed_experts=e.routed, n_shared_experts=e.shared, moe_intermediate_size=e.width,
                  num_experts_per_tok=e.top_k, norm_topk_prob=r.normalize, routed_scaling_factor=r.scaling,
                  n_group=g.groups if g else 1, topk_group=g.kept if g else 1, mlp_layer_types=_mlp_layer_types(spec),
                  kv_lora_rank=a.kv_lora_rank, q_lora_rank=a.q_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim,
                  qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim, attention_bias=a.qkv_bias,
                  rope_interleave=a.rope_layout == RopeLayout.INTERLEAVED, pad_token_id=None)
    config.setdefault("intermediate_size", e.width)
    return config


def _exaone_moe(spec: ModelSpec) -> dict:
    """EXAONE MoE: the sigmoid routing of GLM-4.5 with q/k norms per head, sliding-window layers by layer_types and
    no RoPE in the global ones once a sliding_window is set; the schedule as mlp_layer_types."""
    m, e, r, a = spec.model, spec.moe.experts, spec.moe.router, spec.model.attention
    g = r.group_limit
    config = _llama_family(spec, "exaone_moe")
    del config["attention_bias"]  # EXAONE MoE's attention has no biases and no such key
    sliding = set(range(m.layers)) if a.sliding_layers is None else set(a.sliding_layers)
    if a.sliding_window is not None and not a.global_nope and len(sliding) < m.layers:
        raise _Unfit("global layers with RoPE: exaone_moe's global layers apply none once a sliding_window is set")
    config.update(num_experts=e.routed, num_shared_experts=e.shared, moe_intermediate_size=e.width,
                  num_experts_per_tok=e.top_k, norm_topk_prob=r.normalize, routed_scaling_factor=r.scaling,
                  n_group=g.groups if g else 1, topk_group=g.kept if g else 1, mlp_layer_types=_mlp_layer_types(spec),
                  sliding_window=a.sliding_window,
                  layer_types=["sliding_attention" if a.sliding_window is not None and i in sliding
                               else "full_attention" for i in range(m.layers)])
    config.setdefault("intermediate_size", e.width)
    return config


def _granitemoe_swa(spec: ModelSpec) -> dict:
    """GraniteMoeSWA: GraniteMoeShared's keys plus a sink per head, sliding layers by layer_types (all of them
    written: the class's default is every fourth layer global) and, when the global layers have no RoPE,
    layer_rope_theta with 0 there and the base on the sliding layers."""
    m, a = spec.model, spec.model.attention
    if not a.sinks:
        raise _Unfit("GraniteMoeSWA's attention has a sink per head (attention.sinks)")
    config = _granitemoe(spec, "granitemoe_swa")
    sliding = set() if a.sliding_window is None else \
        set(range(m.layers)) if a.sliding_layers is None else set(a.sliding_layers)
    config.update(sliding_window=a.sliding_window if sliding else None,
                  layer_types=["sliding_attention" if i in sliding else "full_attention" for i in range(m.layers)])
    if a.global_nope:
        config["layer_rope_theta"] = [a.rope_theta if i in sliding else 0.0 for i in range(m.layers)]
    return config


# DBRX's top-level keys for the common ones (DbrxConfig's attribute_map read the other way).
_DBRX_KEYS = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
              "max_position_embeddings": "max_seq_len"}


def _dbrx(spec: ModelSpec) -> dict:
    """DBRX: biasless LayerNorms (nn.LayerNorm's eps, no key), the fused Wqkv clamped by attn_config.clip_qkv,
    softmax routing whose top-k weights are divided by their 1-norm (moe_normalize_expert_weights 1) or left,
    every layer MoE; the attention and FFN keys nested in attn_config / ffn_config.

    transformers 5.24's DBRX rotates with rope_parameters' base and never reads attn_config.rope_theta, yet its
    attention fails without one (and without a clip_qkv): the base is written in both places, so transformers
    and the importer (which reads rope_parameters first) rotate with the spec's."""
    m, a, e, r = spec.model, spec.model.attention, spec.moe.experts, spec.moe.router
    if m.norm != NormKind.LAYER_NO_BIAS:
        raise _Unfit(f"norm {m.norm.value}: DBRX's norms are LayerNorms without bias (layer_no_bias)")
    if m.rms_norm_eps != 1e-5:
        raise _Unfit(f"norm eps {m.rms_norm_eps:g}: DBRX's LayerNorms take nn.LayerNorm's 1e-5 (there is no key)")
    if e.activation != Activation.SWIGLU:
        raise _Unfit(f"experts.activation {e.activation.value}: DBRX's experts are modelled with silu (swiglu)")
    if a.kind == AttentionKind.MLA:
        raise _Unfit("MLA attention is DeepSeek-V2/V3's")
    if a.head_dim is not None and a.head_dim != m.hidden // a.heads:
        raise _Unfit(f"head_dim {a.head_dim} other than hidden / heads: DBRX has no head_dim key")
    _first_dense_only(spec, "dbrx")
    common = _common(spec, "dbrx")
    config = {_DBRX_KEYS.get(k, k): v for k, v in common.items()
              if k not in ("num_key_value_heads", "hidden_act", "rms_norm_eps", "intermediate_size")}
    config["attn_config"] = {"kv_n_heads": a.num_kv_heads, "clip_qkv": a.clip_qkv, "rope_theta": a.rope_theta}
    config["ffn_config"] = {"ffn_act_fn": {"name": "silu"}, "ffn_hidden_size": e.width, "moe_num_experts": e.routed,
                            "moe_top_k": e.top_k, "moe_jitter_eps": None, "moe_loss_weight": _balance_coef(spec),
                            "moe_normalize_expert_weights": 1.0 if r.normalize else None}
    return config


def _longcat_flash(spec: ModelSpec) -> dict:
    """LongCat-Flash: shortcut-connected layers (num_layers of them, two attention blocks each) with MLA and its
    latent scales, softmax routing over FFN + identity experts with a correction bias. The importer's read-back
    (_try_family) checks the rest."""
    m, a, e, r = spec.model, spec.model.attention, spec.moe.experts, spec.moe.router
    if m.attention_blocks != 2:
        raise _Unfit("standard layers: every longcat_flash layer has two attention blocks beside its MoE block")
    if a.kind != AttentionKind.MLA:
        raise _Unfit(f"{a.kind.value} attention: longcat_flash's attention is MLA")
    config = _common(spec, "longcat_flash")
    for key in ("num_hidden_layers", "intermediate_size"):  # num_layers counts its layers; the FFN width has its key
        config.pop(key, None)
    config.update(num_layers=m.layers, ffn_hidden_size=m.dense_width, n_routed_experts=e.routed,
                  zero_expert_num=e.identity, moe_topk=e.top_k, expert_ffn_hidden_size=e.width,
                  routed_scaling_factor=r.scaling, kv_lora_rank=a.kv_lora_rank, q_lora_rank=a.q_lora_rank,
                  qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim,
                  head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim, attention_bias=a.qkv_bias,
                  mla_scale_q_lora=True, mla_scale_kv_lora=True)
    return config


_BUILDERS = {"deepseek_v3": lambda s: _deepseek(s, "deepseek_v3"), "deepseek_v2": lambda s: _deepseek(s, "deepseek_v2"),
             "qwen2_moe": _qwen2_moe, "olmoe": _olmoe, "mixtral": _mixtral, "qwen3_moe": _qwen3_moe,
             "glm4_moe": lambda s: _sigmoid_grouped(s, "glm4_moe"), "dots1": lambda s: _sigmoid_grouped(s, "dots1"),
             "ernie4_5_moe": _ernie4_5_moe, "minimax_m2": _minimax_m2, "hunyuan_v1_moe": _hunyuan_v1_moe,
             "flex_olmo": _flex_olmo, "granitemoe": _granitemoe,
             "granitemoeshared": lambda s: _granitemoe(s, "granitemoeshared"), "phimoe": _phimoe,
             "gpt_oss": _gpt_oss, "glm4_moe_lite": _glm4_moe_lite, "exaone_moe": _exaone_moe,
             "granitemoe_swa": _granitemoe_swa, "dbrx": _dbrx, "longcat_flash": _longcat_flash,
             "jetmoe": _jetmoe}


def _semantic(data: Any, key: str = "") -> Any:
    """The spec's plain data without descriptive fields, the paper view and balance (compared separately)."""
    if isinstance(data, Mapping):
        return {k: _semantic(v, k) for k, v in data.items()
                if k not in DESCRIPTIVE_FIELDS and k != "balance" and not (key == "experts" and k == "paper")}
    return data


def _first_difference(ours: Any, theirs: Any, family: str, path: str = "") -> str | None:
    if isinstance(ours, Mapping) and isinstance(theirs, Mapping):
        for k in list(ours) + [k for k in theirs if k not in ours]:
            found = _first_difference(ours.get(k), theirs.get(k), family, f"{path}.{k}" if path else k)
            if found:
                return found
        return None
    return None if ours == theirs else f"{path}: the spec has {ours!r}, the {family} config gives {theirs!r}"


def _family_hint(spec: ModelSpec) -> str | None:
    source = spec.model.source
    return next((f for f in EXPORT_FAMILIES if f"Hugging Face {f} config" in source), None)


def _try_family(spec: ModelSpec, family: str) -> tuple[dict, list[str]]:
    """(config, notes) or _Unfit with the reason."""
    from .model import model_spec_from_hf_config

    if spec.moe.router.score == ScoreFn.SIGMOID and family not in _SIGMOID_FAMILIES:
        raise _Unfit(f"{family} scores experts with a softmax, not sigmoids")
    g = spec.moe.router.group_limit
    if g is not None and family == "deepseek_v2" and g.score != GroupScore.MAX:
        raise _Unfit(f"group score {g.score.value}: DeepSeek-V2's group_limited_greedy scores a group by its max")
    config = _BUILDERS[family](spec)
    try:
        back = model_spec_from_hf_config(config, name=spec.name)
    except SpecError as err:
        raise _Unfit(str(err)) from None
    ours, theirs = model_spec_to_dict(spec), model_spec_to_dict(back)
    diff = _first_difference(_semantic(ours), _semantic(theirs), family)
    if diff:
        raise _Unfit(diff)
    notes = []
    ours_balance, theirs_balance = ours["moe"].get("balance", {}), theirs["moe"].get("balance", {})
    if ours_balance != theirs_balance:
        notes.append(f"balance {ours_balance} is a training loss that the {family} config expresses as "
                     f"{theirs_balance or 'none'}; the forward pass (logits) is exact")
    if family == "dbrx" and spec.model.attention.clip_qkv is None:
        notes.append("attn_config.clip_qkv is null (no clamp), as the spec has; transformers 5.24's DBRX attention "
                     "clamps unconditionally and fails without a clip_qkv, so run this folder elsewhere or give "
                     "the spec one")
    return config, notes


def hf_config_from_model_spec(spec: ModelSpec, family: str | None = None) -> tuple[str, dict, list[str]]:
    """(family, config.json dict, notes) of a model spec. `family` None: the one named in the spec's
    source (an imported model), else the first of EXPORT_FAMILIES that expresses the spec exactly.
    A spec no family expresses is a SpecError giving each family's reason."""
    if family is not None and family not in EXPORT_FAMILIES:
        raise SpecError(f"family {family!r} cannot be exported; transformers families moe-ir writes: "
                        f"{', '.join(EXPORT_FAMILIES)}", path="--family")
    hint = _family_hint(spec)
    candidates = [family] if family else ([hint] if hint else []) + [f for f in EXPORT_FAMILIES if f != hint]
    reasons = []
    for candidate in candidates:
        try:
            config, notes = _try_family(spec, candidate)
        except _Unfit as why:
            reasons.append(f"{candidate}: {why}")
            continue
        return candidate, config, notes
    raise SpecError(f"model spec '{spec.name}' is not exactly a transformers model of "
                    f"{'family ' + family if family else 'any family moe-ir exports'}: " + "; ".join(reasons))


def export_hf_checkpoint(spec: ModelSpec, weights: Any, out_dir: str | os.PathLike, *,
                         family: str | None = None) -> tuple[str, list[str]]:
    """Write `out_dir` (config.json + model.safetensors, transformers' names) from a model spec and its
    canonical weights (a safetensors path or a name -> tensor mapping); returns (family, notes).

    `out_dir` must not exist or be empty; both files are staged in it and swapped in together when complete."""
    from moe_ir.model_builder import build_model_graph
    from .safetensors_io import FLOAT_DTYPES, Checkpoint, SafetensorsWriter, torch_dtype_of

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise WeightsError(f"{out_dir}: already exists and is not an empty folder; choose a new folder or remove it")
    family, config, notes = hf_config_from_model_spec(spec, family)
    graph = build_model_graph(spec)
    _, block, layout = EXPORT_FAMILIES[family]
    if family == "dbrx":  # its own names and fused tensors throughout
        rules = dbrx_model_rules(spec, graph.weights)
    else:
        rules = model_rules(spec, graph.weights, moe_block=block, layout=layout, **_BLOCK_NAMES.get(family, {}))
    with Checkpoint(weights) as ckpt:
        where = ckpt.description
        missing = sorted(set(graph.weights) - set(ckpt.entries))
        unexpected = sorted(set(ckpt.entries) - set(graph.weights))
        wrong = [f"{n}: expected {list(v.type.shape)}, found {list(ckpt.entries[n].shape)}"
                 for n, v in graph.weights.items() if n in ckpt.entries and ckpt.entries[n].shape != v.type.shape]
        wrong += [f"{n}: dtype {ckpt.entries[n].dtype} is not a float dtype" for n in graph.weights
                  if n in ckpt.entries and ckpt.entries[n].dtype not in FLOAT_DTYPES]
        if missing or unexpected or wrong:
            parts = [f"{label}: " + ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
                     for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong", wrong)) if names]
            raise WeightsError(f"{where}: weights do not match spec '{spec.name}': " + " | ".join(parts))
        our_shapes = {n: tuple(v.type.shape) for n, v in graph.weights.items()}
        entries = []
        for rule in rules:
            dtype = torch_dtype_of(ckpt.entries[rule.ours[0]])
            entries += [(name, dtype, shape) for name, shape in rule.their_shapes(our_shapes).items()]
        # One output (moe_ir.artifacts): both files are staged in the folder and swapped in together.
        with OutputFolder(out_dir, what="export-hf") as out:
            out.path("config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            writer = SafetensorsWriter(out.path("model.safetensors"), entries, {"format": "pt"})
            try:
                for rule in rules:
                    sources = ckpt.read_many(list(rule.ours))
                    for name, tensor in zip(rule.theirs, rule.to_theirs(sources)):
                        writer.write(name, tensor.to(torch_dtype_of(ckpt.entries[rule.ours[0]])))
                    del sources
            except BaseException:
                writer.abort()
                raise
            writer.finish()
    return family, notes
