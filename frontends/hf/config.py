"""Hugging Face config -> LayerSpec for the MoE families moe-ir models exactly.

Each family reads the keys its transformers (or DeepSeek remote-code) implementation reads for the MoE
block, with the defaults that implementation uses when a key is absent: `save_pretrained` omits keys
that equal the config class's defaults, so a config.json alone does not say everything. Keys whose
value asks for behaviour a layer spec cannot express (a different activation, router jitter, biased
shared experts, an unknown top-k method...) raise SpecError naming the key; nothing is approximated
silently. What the import decides that the config does not state is written into `LayerSpec.source`
and the YAML header (`spec_yaml_text`).

Semantics checked against transformers 5.23 by tests/test_hf_modules.py:
  deepseek     (deepseek-moe-16b remote code) softmax greedy top-k, optional renormalisation (k > 1)
  deepseek_v2  DeepseekV2Moe: softmax; greedy or group_limited_greedy (group score = max); x routed_scaling_factor
  deepseek_v3  DeepseekV3MoE: sigmoid; noaux_tc (selection on s + e_score_correction_bias, group score =
               sum of the top-2 biased scores, non-kept groups masked with -inf); norm_topk_prob; x scale
  mixtral      MixtralSparseMoeBlock: softmax top-k renormalised over the chosen k
  qwen2_moe    Qwen2MoeSparseMoeBlock: softmax top-k (norm_topk_prob), one shared expert gated by
               sigmoid(shared_expert_gate(x))
  olmoe        OlmoeSparseMoeBlock: softmax top-k (norm_topk_prob)
  longcat_flash LongcatFlashMoE: softmax over FFN + identity experts, selection with a correction bias, x scale
  llama4_text  Llama4TextMoe: sigmoid of the top-k logits scaling the chosen experts' inputs, one shared expert
  gpt_oss      GptOssMLP: router logit bias, softmax over the top-k logits, expert biases, clamped SwiGLU
  phimoe       PhimoeSparseMoeBlock in eval mode: SparseMixer (router.sparse_mixer, top-2 only), every layer MoE
  granitemoeshared  Granite's block (softmax over the top-k logits) and an ungated shared MLP beside it
  jetmoe       JetMoeMoE: softmax over the top-k logits, a bias added once to the block output (experts.output_bias)

Shared experts. DeepSeek stores its n_shared_experts shared experts as ONE MLP of width
n_shared_experts * moe_intermediate_size. The spec keeps the paper's reading (Ks = n_shared_experts
shared experts of width moe_intermediate_size, so `inspect` shows DeepSeekMoE's N/m/K/Ks): the fused MLP
splits exactly along its intermediate dimension, SwiGLU acting element-wise on that dimension, and the
parameter count is unchanged. The `fuse-shared-experts` pass fuses them back for backends.

Balance losses. transformers' Mixtral/Qwen2-MoE/OLMoE `load_balancing_loss_func` for one layer is
E * sum_i (count_i / T) * P_i, with count_i the top-k selections of expert i; DeepSeekMoE's expert-level
loss is alpha * sum_i (E * count_i / (k T)) * P_i, so router_aux_loss_coef c maps exactly to
`balance.expert = c * k`. The equality is per layer: over a whole model transformers pools counts and
probabilities across layers before multiplying, which no per-layer loss reproduces, and it adds the
loss only when output_router_logits is on. DeepSeek's aux_loss_alpha maps to the sequence-wise loss
when seq_aux is true (the remote code's per-sequence form) and to the expert-level loss otherwise.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping

from moe_ir.errors import SpecError
from moe_ir.spec import (MAX_EXPERTS, MAX_HEAD_DIM, MAX_HEADS, MAX_HIDDEN, MAX_LAYERS, MAX_SHARED_EXPERTS, MAX_VOCAB,
                         MAX_WIDTH, Activation, AuxFree, DType, GroupScore, LayerSpec, show_number, spec_from_dict,
                         spec_to_dict)
from .refused_families import refusal_of_family

__all__ = ["FAMILY_DEFAULTS", "SUPPORTED_MODEL_TYPES", "HFLayerInfo", "describe_hf_config", "describe_hf_config_file",
           "import_hf_config_file", "info_comment", "moe_layer_indices", "spec_from_hf_config", "spec_yaml_text"]

# Defaults of the MoE-relevant keys, as the implementation reads them when config.json omits a key.
# transformers families: the config class defaults of transformers 5.23 (tests/test_hf_config.py checks
# this table against the installed classes). Remote-code keys (scoring_func, topk_method, seq_aux,
# aux_loss_alpha, moe_layer_freq) follow DeepSeek's configuration_deepseek*.py.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek": {
        "hidden_size": 4096, "num_hidden_layers": 30, "hidden_act": "silu", "n_routed_experts": None,
        "n_shared_experts": None, "num_experts_per_tok": None, "moe_intermediate_size": 1407,
        "moe_layer_freq": 1, "first_k_dense_replace": 0, "norm_topk_prob": False, "scoring_func": "softmax",
        "aux_loss_alpha": 0.001, "seq_aux": True,
    },
    "deepseek_v2": {
        "hidden_size": 4096, "num_hidden_layers": 32, "hidden_act": "silu", "n_routed_experts": 64,
        "n_shared_experts": 2, "num_experts_per_tok": None, "moe_intermediate_size": 1407,
        "first_k_dense_replace": 0, "norm_topk_prob": False, "routed_scaling_factor": 1.0,
        "topk_method": "greedy", "n_group": None, "topk_group": None, "mlp_bias": False,
    },
    "deepseek_v3": {
        "hidden_size": 7168, "num_hidden_layers": 61, "hidden_act": "silu", "n_routed_experts": 256,
        "n_shared_experts": 1, "num_experts_per_tok": 8, "moe_intermediate_size": 2048,
        "first_k_dense_replace": 3, "norm_topk_prob": True, "routed_scaling_factor": 2.5, "n_group": 8,
        "topk_group": 4,
    },
    "mixtral": {
        "hidden_size": 4096, "num_hidden_layers": 32, "hidden_act": "silu", "num_local_experts": 8,
        "num_experts_per_tok": 2, "intermediate_size": 14336, "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
    },
    "qwen2_moe": {
        "hidden_size": 2048, "num_hidden_layers": 24, "hidden_act": "silu", "num_experts": 60,
        "num_experts_per_tok": 4, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
        "norm_topk_prob": False, "router_aux_loss_coef": 0.001, "decoder_sparse_step": 1, "mlp_only_layers": None,
    },
    "olmoe": {
        "hidden_size": 2048, "num_hidden_layers": 16, "hidden_act": "silu", "num_experts": 64,
        "num_experts_per_tok": 8, "intermediate_size": 2048, "norm_topk_prob": False, "router_aux_loss_coef": 0.01,
    },
    "gpt_oss": {
        "hidden_size": 2880, "num_hidden_layers": 36, "num_local_experts": 128, "num_experts_per_tok": 4,
        "intermediate_size": 2880, "router_aux_loss_coef": 0.001, "swiglu_alpha": 1.702, "swiglu_limit": 7.0,
    },
    "longcat_flash": {
        "hidden_size": 6144, "num_layers": 28, "hidden_act": "silu", "n_routed_experts": 512, "zero_expert_num": 256,
        "moe_topk": 12, "expert_ffn_hidden_size": 2048, "routed_scaling_factor": 6.0,
    },
    "llama4_text": {
        "hidden_size": 5120, "num_hidden_layers": 48, "hidden_act": "silu", "num_local_experts": 16,
        "num_experts_per_tok": 1, "intermediate_size": 8192, "interleave_moe_layer_step": 1, "moe_layers": None,
        "router_jitter_noise": 0.0,
    },
    "phimoe": {
        "hidden_size": 4096, "num_hidden_layers": 32, "hidden_act": "silu", "num_local_experts": 16,
        "num_experts_per_tok": 2, "intermediate_size": 6400, "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.01, "input_jitter_noise": 0.0,
    },
    # -- the families of issue 17 (their mappers: "families that fit today's layer" below) --
    "qwen3_moe": {
        "hidden_size": 2048, "num_hidden_layers": 24, "hidden_act": "silu", "num_experts": 128,
        "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": False,
        "router_aux_loss_coef": 0.001, "decoder_sparse_step": 1, "mlp_only_layers": None,
    },
    "glm4_moe": {
        "hidden_size": 4096, "num_hidden_layers": 46, "hidden_act": "silu", "n_routed_experts": 128,
        "n_shared_experts": 1, "num_experts_per_tok": 8, "moe_intermediate_size": 1408, "first_k_dense_replace": 1,
        "norm_topk_prob": True, "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1,
    },
    "glm4_moe_lite": {
        "hidden_size": 2048, "num_hidden_layers": 47, "hidden_act": "silu", "n_routed_experts": 64,
        "n_shared_experts": 1, "num_experts_per_tok": 4, "moe_intermediate_size": 1536, "norm_topk_prob": True,
        "routed_scaling_factor": 1.8, "n_group": 1, "topk_group": 1, "mlp_layer_types": None,
    },
    "dots1": {
        "hidden_size": 4608, "num_hidden_layers": 62, "hidden_act": "silu", "n_routed_experts": None,
        "n_shared_experts": None, "num_experts_per_tok": None, "moe_intermediate_size": 1408,
        "first_k_dense_replace": 0, "norm_topk_prob": False, "routed_scaling_factor": 1.0, "n_group": 1,
        "topk_group": 1,
    },
    "minimax_m2": {
        "hidden_size": 3072, "num_hidden_layers": 62, "hidden_act": "silu", "num_local_experts": 256,
        "num_experts_per_tok": 8, "intermediate_size": 1536, "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
    },
    "flex_olmo": {
        "hidden_size": 4096, "num_hidden_layers": 32, "hidden_act": "silu", "num_experts": 7,
        "num_experts_per_tok": 5, "intermediate_size": 11008, "norm_topk_prob": False, "router_aux_loss_coef": 0.01,
    },
    "exaone_moe": {
        "hidden_size": 4096, "num_hidden_layers": 32, "hidden_act": "silu", "n_routed_experts": 64,
        "n_shared_experts": 1, "num_experts_per_tok": 8, "moe_intermediate_size": 1024, "first_k_dense_replace": 1,
        "norm_topk_prob": True, "routed_scaling_factor": 2.5, "n_group": 1, "topk_group": 1, "mlp_layer_types": None,
    },
    "hunyuan_v1_moe": {
        "hidden_size": 4096, "num_hidden_layers": 32, "hidden_act": "silu", "num_experts": 1, "moe_topk": 1,
        "intermediate_size": 11008,
    },
    "granitemoe": {
        "hidden_size": 4096, "num_hidden_layers": 32, "hidden_act": "silu", "num_local_experts": 8,
        "num_experts_per_tok": 2, "intermediate_size": 11008, "router_aux_loss_coef": 0.001,
    },
    "granitemoeshared": {
        "hidden_size": 4096, "num_hidden_layers": 32, "hidden_act": "silu", "num_local_experts": 8,
        "num_experts_per_tok": 2, "intermediate_size": 11008, "router_aux_loss_coef": 0.001,
        "shared_intermediate_size": 0,
    },
    "granitemoe_swa": {
        "hidden_size": 4096, "num_hidden_layers": 32, "hidden_act": "silu", "num_local_experts": 8,
        "num_experts_per_tok": 2, "intermediate_size": 11008, "router_aux_loss_coef": 0.001,
        "shared_intermediate_size": 0,
    },
    "jetmoe": {
        "hidden_size": 2048, "num_hidden_layers": 12, "activation_function": "silu", "num_local_experts": 8,
        "num_experts_per_tok": 2, "intermediate_size": 5632, "aux_loss_coef": 0.01,
    },
    # DBRX nests its keys in attn_config / ffn_config, read as "section.key" (FamilyConfig)
    "dbrx": {
        "hidden_size": 2048, "num_hidden_layers": 24, "ffn_config.moe_num_experts": 4, "ffn_config.moe_top_k": 1,
        "ffn_config.ffn_hidden_size": 3584, "ffn_config.moe_normalize_expert_weights": 1.0,
        "ffn_config.moe_jitter_eps": None, "router_aux_loss_coef": 0.01, "ffn_config.ffn_act_fn": {"name": "silu"},
    },
    "ernie4_5_moe": {
        "hidden_size": 2560, "num_hidden_layers": 28, "hidden_act": "silu", "moe_num_experts": 64, "moe_k": 6,
        "moe_intermediate_size": 1536, "moe_num_shared_experts": 2, "moe_layer_start_index": 1,
        "moe_layer_end_index": -1, "moe_layer_interval": 1, "moe_norm_min": 1e-12, "router_aux_loss_coef": 0.001,
        "use_bias": False,
    },
}

# Alternative key names transformers accepts (its config classes' attribute_map, MoE keys only).
_ALIASES: dict[str, dict[str, str]] = {
    "deepseek_v2": {"num_experts": "n_routed_experts"},
    "deepseek_v3": {"num_local_experts": "n_routed_experts"},
    "mixtral": {"num_experts": "num_local_experts"},
    "olmoe": {"num_local_experts": "num_experts"},
    "qwen3_moe": {"num_local_experts": "num_experts"},
    "glm4_moe": {"num_local_experts": "n_routed_experts"},
    "glm4_moe_lite": {"num_local_experts": "n_routed_experts"},
    "dots1": {"num_local_experts": "n_routed_experts"},
    "minimax_m2": {"num_experts": "num_local_experts"},
    "flex_olmo": {"num_local_experts": "num_experts"},
    "exaone_moe": {"num_experts": "n_routed_experts", "num_shared_experts": "n_shared_experts"},
    "hunyuan_v1_moe": {"num_local_experts": "num_experts", "num_experts_per_tok": "moe_topk"},
    "ernie4_5_moe": {"num_experts": "moe_num_experts", "num_experts_per_tok": "moe_k"},
    "dbrx": {"d_model": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
             "max_seq_len": "max_position_embeddings", "attn_config.kv_n_heads": "num_key_value_heads",
             "attn_config.rope_theta": "rope_theta", "ffn_config.moe_loss_weight": "router_aux_loss_coef"},
    "longcat_flash": {"num_local_experts": "n_routed_experts", "num_experts_per_tok": "moe_topk",
                      "moe_intermediate_size": "expert_ffn_hidden_size"},
}

# Families that nest keys in sub-dicts of the config: read as "section.key".
_NESTED_SECTIONS: dict[str, tuple[str, ...]] = {"dbrx": ("attn_config", "ffn_config")}

SUPPORTED_MODEL_TYPES = tuple(FAMILY_DEFAULTS)

# Upper bounds of a config's sizes: the spec's own (moe_ir.spec), stated under the config's key names so
# that `num_hidden_layers: 10**12` is refused by name before any per-layer table is made. A config.json
# is a few KiB; MAX_CONFIG_BYTES bounds what is read before parsing.
_MAXIMA = {
    "hidden_size": MAX_HIDDEN, "num_hidden_layers": MAX_LAYERS, "vocab_size": MAX_VOCAB,
    "moe_intermediate_size": MAX_WIDTH, "intermediate_size": MAX_WIDTH, "shared_expert_intermediate_size": MAX_WIDTH,
    "n_routed_experts": MAX_EXPERTS, "num_local_experts": MAX_EXPERTS, "num_experts": MAX_EXPERTS,
    "num_experts_per_tok": MAX_EXPERTS, "moe_num_experts": MAX_EXPERTS, "moe_k": MAX_EXPERTS,
    "moe_intermediate_size": MAX_WIDTH, "moe_num_shared_experts": MAX_SHARED_EXPERTS, "n_group": MAX_EXPERTS, "topk_group": MAX_EXPERTS,
    "n_shared_experts": MAX_SHARED_EXPERTS, "decoder_sparse_step": MAX_LAYERS, "moe_layer_freq": MAX_LAYERS,
    "num_layers": MAX_LAYERS, "zero_expert_num": MAX_EXPERTS, "moe_topk": MAX_EXPERTS,
    "expert_ffn_hidden_size": MAX_WIDTH, "intermediate_size_mlp": MAX_WIDTH,
    "first_k_dense_replace": MAX_LAYERS, "num_attention_heads": MAX_HEADS, "num_key_value_heads": MAX_HEADS,
    "kv_lora_rank": MAX_HEAD_DIM, "q_lora_rank": MAX_HEAD_DIM, "qk_nope_head_dim": MAX_HEAD_DIM,
    "qk_rope_head_dim": MAX_HEAD_DIM, "v_head_dim": MAX_HEAD_DIM, "head_dim": MAX_HEAD_DIM,
}
MAX_CONFIG_BYTES = 1 << 20

# hidden_act -> gated activation of the experts. ACT2FN["gelu"] is the exact (erf) GELU, as ours;
# the tanh approximations ("gelu_new", "gelu_pytorch_tanh") are not, so they are refused.
_ACTIVATIONS = {"silu": Activation.SWIGLU, "swish": Activation.SWIGLU, "gelu": Activation.GEGLU}


@dataclasses.dataclass(frozen=True)
class HFLayerInfo:
    """What the import decided beyond the spec itself: the family, the layer and notes for the header."""

    model_type: str
    layer: int
    moe_layers: tuple[int, ...]
    num_layers: int
    notes: tuple[str, ...]


class FamilyConfig:
    """Typed access to one family's keys: given value, else the family default; errors name the key."""

    def __init__(self, data: Mapping[str, Any], model_type: str, file: str | None):
        self.model_type = model_type
        self.file = file
        self.data = dict(data)
        for section in _NESTED_SECTIONS.get(model_type, ()):  # DBRX: attn_config.kv_n_heads, ffn_config.moe_top_k ...
            nested = self.data.get(section)
            if nested is not None and not isinstance(nested, Mapping):
                raise self.fail(section, f"expected a mapping of {section} keys, found {str(nested)[:40]!r}")
            for key, value in (nested.items() if isinstance(nested, Mapping) else ()):
                self.data.setdefault(f"{section}.{key}", value)
        for alias, key in _ALIASES.get(model_type, {}).items():
            if alias in self.data and key not in self.data:
                self.data[key] = self.data[alias]
        self.defaults = FAMILY_DEFAULTS[model_type]

    def fail(self, key: str, message: str) -> SpecError:
        return SpecError(f"{message} (Hugging Face {self.model_type} config)", path=key, file=self.file)

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        value = self.data.get(key, self.defaults.get(key))
        if value is None:
            if optional:
                return None
            raise self.fail(key, f"'{key}' is required for an MoE layer and is missing or null")
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > 10**300:  # float() of a larger int overflows
                raise self.fail(key, f"expected a number a float holds, found {show_number(value)}")
            value = float(value)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            found = show_number(value) if isinstance(value, (int, float)) else repr(value)[:80]
            raise self.fail(key, f"expected {names}, found {found}")
        if isinstance(value, int) and not isinstance(value, bool) and value > _MAXIMA.get(key, 10**18):
            raise self.fail(key, f"{key}={show_number(value)} is above moe-ir's bound of "
                                 f"{_MAXIMA.get(key, 10**18):,} for this size")
        return value

    def positive(self, key: str) -> int:
        value = self.get(key, int)
        if value < 1:
            raise self.fail(key, f"expected a positive integer, found {value}")
        return value

    def require(self, key: str, allowed: tuple[Any, ...], why: str) -> Any:
        """The key's value (or default) must be one of `allowed`; otherwise a SpecError saying why."""
        value = self.data.get(key, self.defaults.get(key))
        if value not in allowed:
            raise self.fail(key, f"{key}={value!r} is not supported: {why}")
        return value


# ----------------------------------------------------------------------------------------------
# families: each returns (spec fields, MoE layer predicate, notes)


@dataclasses.dataclass
class _Mapped:
    experts: dict
    router: dict
    balance: dict
    is_moe_layer: Callable[[int], bool]
    dense_reason: Callable[[int], str]
    notes: list[str]
    layers_key: str = "num_hidden_layers"  # the key that counts the decoder layers


def _activation(c: FamilyConfig) -> Activation:
    act = c.get("hidden_act", str)
    if act not in _ACTIVATIONS:
        raise c.fail("hidden_act", f"activation {act!r} is not modelled; supported: {', '.join(_ACTIVATIONS)} "
                                   "(gelu is the exact erf form)")
    return _ACTIVATIONS[act]


def _deepseek_layers(c: FamilyConfig) -> tuple[Callable[[int], bool], Callable[[int], str]]:
    # Remote code: MoE iff layer >= first_k_dense_replace and layer % moe_layer_freq == 0.
    # transformers' DeepseekV2/V3 read only first_k_dense_replace; a moe_layer_freq other than 1 would
    # make the two disagree on which layers are MoE.
    first_dense = c.get("first_k_dense_replace", int)
    freq = c.get("moe_layer_freq", int) if c.has("moe_layer_freq") or c.model_type == "deepseek" else 1
    if freq < 1:
        raise c.fail("moe_layer_freq", f"expected a positive integer, found {freq}")
    if freq != 1 and c.model_type != "deepseek":
        raise c.fail("moe_layer_freq", f"moe_layer_freq={freq}: transformers' {c.model_type} ignores it while "
                                       "the remote code honours it, so which layers are MoE is ambiguous")

    def is_moe(layer: int) -> bool:
        return layer >= first_dense and layer % freq == 0

    def reason(layer: int) -> str:
        if layer < first_dense:
            return f"first_k_dense_replace={first_dense} makes layers 0..{first_dense - 1} dense"
        return f"moe_layer_freq={freq} makes only layers divisible by {freq} MoE"
    return is_moe, reason


def _deepseek_balance(c: FamilyConfig, *, remote_defaults: bool) -> tuple[dict, list[str]]:
    # aux_loss_alpha/seq_aux are remote-code keys. For model_type deepseek the remote code is the
    # implementation, so its defaults apply; transformers' DeepseekV2/V3 compute no aux loss, so for them
    # only a config that states aux_loss_alpha gets one.
    if not remote_defaults and not c.has("aux_loss_alpha"):
        return {}, ["no aux_loss_alpha in the config: transformers computes no balance loss for this family"]
    alpha = c.get("aux_loss_alpha", float) if c.has("aux_loss_alpha") else FAMILY_DEFAULTS["deepseek"]["aux_loss_alpha"]
    if alpha < 0:
        raise c.fail("aux_loss_alpha", f"expected a value >= 0, found {alpha}")
    if alpha == 0:
        return {}, []
    seq = c.get("seq_aux", bool) if c.has("seq_aux") else FAMILY_DEFAULTS["deepseek"]["seq_aux"]
    kind = "sequence" if seq else "expert"
    return {kind: alpha}, [f"aux_loss_alpha={alpha} with seq_aux={str(seq).lower()} -> balance.{kind}"]


def _shared(c: FamilyConfig) -> dict:
    n_shared = c.get("n_shared_experts", int, optional=True) or 0
    if n_shared < 0:
        raise c.fail("n_shared_experts", f"expected a value >= 0, found {n_shared}")
    return {"shared": n_shared} if n_shared else {}


def _map_deepseek(c: FamilyConfig) -> _Mapped:
    """deepseek-moe-16b (remote code, model_type 'deepseek'): softmax, greedy top-k, no scaling."""
    c.require("scoring_func", ("softmax",), "the deepseek remote code implements softmax scoring only")
    if c.has("topk_method"):
        c.require("topk_method", ("greedy",), "model_type deepseek routes greedily; group-limited routing "
                                              "is DeepSeek-V2 (model_type deepseek_v2)")
    for key in ("n_group", "topk_group"):
        if c.has(key) and c.data[key] not in (None, 1):
            raise c.fail(key, f"{key}={c.data[key]!r}: model_type deepseek has no group-limited routing "
                              "(use model_type deepseek_v2 with topk_method group_limited_greedy)")
    if c.has("routed_scaling_factor") and c.data["routed_scaling_factor"] != 1:
        raise c.fail("routed_scaling_factor", f"routed_scaling_factor={c.data['routed_scaling_factor']!r}: the "
                                              "deepseek remote code does not read it, so its meaning is ambiguous")
    if c.get("n_routed_experts", int, optional=True) is None:
        raise c.fail("n_routed_experts", "n_routed_experts is null: this config describes a dense model")
    width, k = c.positive("moe_intermediate_size"), c.positive("num_experts_per_tok")
    # The remote gate renormalises only when top_k > 1 (a single weight would become 1).
    normalize = c.get("norm_topk_prob", bool) and k > 1
    balance, notes = _deepseek_balance(c, remote_defaults=True)
    is_moe, reason = _deepseek_layers(c)
    return _Mapped({"routed": c.positive("n_routed_experts"), "width": width, "top_k": k, **_shared(c)},
                   {"score": "softmax", "normalize": normalize}, balance, is_moe, reason, notes)


def _map_deepseek_v2(c: FamilyConfig) -> _Mapped:
    """DeepSeek-V2 / V2-Lite: softmax; greedy or group_limited_greedy; x routed_scaling_factor."""
    if c.has("scoring_func"):
        c.require("scoring_func", ("softmax",), "DeepSeek-V2 scores with softmax only")
    if c.get("mlp_bias", bool):
        raise c.fail("mlp_bias", "mlp_bias=true puts biases on the shared experts only, which a spec (one "
                                 "`bias` flag for every expert) cannot express")
    if c.get("norm_topk_prob", bool):
        raise c.fail("norm_topk_prob", "norm_topk_prob=true is ambiguous for DeepSeek-V2: the remote code "
                                       "renormalises and then skips routed_scaling_factor, transformers' "
                                       "DeepseekV2 ignores the key")
    method = c.require("topk_method", ("greedy", "group_limited_greedy"),
                       "DeepSeek-V2 implements greedy and group_limited_greedy")
    routed, width = c.positive("n_routed_experts"), c.positive("moe_intermediate_size")
    k = c.positive("num_experts_per_tok")
    router: dict = {"score": "softmax", "scaling": c.get("routed_scaling_factor", float)}
    if method == "group_limited_greedy":
        groups, kept = c.positive("n_group"), c.positive("topk_group")
        if groups > 1:
            router["group_limit"] = {"groups": groups, "kept": kept, "score": GroupScore.MAX.value}
    balance, notes = _deepseek_balance(c, remote_defaults=False)
    is_moe, reason = _deepseek_layers(c)
    return _Mapped({"routed": routed, "width": width, "top_k": k, **_shared(c)}, router, balance,
                   is_moe, reason, notes)


def _map_deepseek_v3(c: FamilyConfig) -> _Mapped:
    """DeepSeek-V3: sigmoid; noaux_tc group-limited selection on biased scores; normalise; x scale."""
    if c.has("scoring_func"):
        c.require("scoring_func", ("sigmoid",), "DeepSeek-V3 scores with sigmoid only")
    if c.has("topk_method"):
        c.require("topk_method", ("noaux_tc",), "DeepSeek-V3 implements noaux_tc only")
    routed, width = c.positive("n_routed_experts"), c.positive("moe_intermediate_size")
    k = c.positive("num_experts_per_tok")
    normalize = c.get("norm_topk_prob", bool)
    if normalize and k == 1 and c.model_type == "deepseek_v3":
        raise c.fail("norm_topk_prob", "norm_topk_prob=true with num_experts_per_tok=1 is ambiguous: "
                                       "transformers renormalises the single weight to 1, the remote code does not")
    router: dict = {"score": "sigmoid", "normalize": normalize, "scaling": c.get("routed_scaling_factor", float)}
    groups, kept = c.positive("n_group"), c.positive("topk_group")
    if groups > 1:
        router["group_limit"] = {"groups": groups, "kept": kept, "score": GroupScore.TOP2_SUM.value}
    balance, notes = _deepseek_balance(c, remote_defaults=False)
    # e_score_correction_bias is always present in V3; the spec carries it as the aux-free bias.
    balance["aux_free"] = {"gamma": AuxFree().gamma}
    notes.append(f"e_score_correction_bias -> router.bias (balance.aux_free); the bias update rate is not "
                 f"in the config: gamma={AuxFree().gamma} is the paper's value")
    # glm4_moe_lite lists its dense layers instead (_map_sigmoid_grouped)
    is_moe, reason = _deepseek_layers(c) if c.model_type not in _LISTED_MLP_LAYERS else (_all_layers, lambda i: "")
    return _Mapped({"routed": routed, "width": width, "top_k": k, **_shared(c)}, router, balance,
                   is_moe, reason, notes)


def _transformers_balance_loss(c: FamilyConfig, top_k: int) -> tuple[dict, list[str]]:
    coef = c.get("router_aux_loss_coef", float)
    if coef < 0:
        raise c.fail("router_aux_loss_coef", f"expected a value >= 0, found {coef}")
    if coef == 0:
        return {}, []
    return {"expert": coef * top_k}, [
        f"router_aux_loss_coef={coef} -> balance.expert={coef * top_k:g} (= coef x top_k): equal to "
        "transformers' load_balancing_loss_func for this layer alone; over a whole model transformers pools "
        "counts across layers, and adds the loss only with output_router_logits"]


def _all_layers(layer: int) -> bool:
    return True


def _map_mixtral(c: FamilyConfig) -> _Mapped:
    """Mixtral: softmax top-k renormalised over the chosen k."""
    jitter = c.get("router_jitter_noise", float, optional=True) or 0.0  # granitemoe has no such key
    if jitter != 0:
        raise c.fail("router_jitter_noise", f"router_jitter_noise={jitter}: multiplicative input jitter in "
                                            "training is not modelled (router.noise is additive noisy top-k)")
    k = c.positive("num_experts_per_tok")
    balance, notes = _transformers_balance_loss(c, k)
    return _Mapped({"routed": c.positive("num_local_experts"), "width": c.positive("intermediate_size"), "top_k": k},
                   {"score": "softmax", "normalize": True}, balance, _all_layers, lambda i: "", notes)


def _map_granitemoeshared(c: FamilyConfig) -> _Mapped:
    """Granite's MoE block (as Mixtral's) plus, when shared_intermediate_size > 0, an ungated shared MLP of that
    width beside the block (its output added to the block's, layers.i.shared_mlp)."""
    mapped = _map_mixtral(c)
    width = c.get("shared_intermediate_size", int)
    if width < 0:
        raise c.fail("shared_intermediate_size", f"expected a value >= 0, found {width}")
    if width:
        mapped.experts.update(shared=1, shared_width=width)
    return mapped


def _map_qwen2_moe(c: FamilyConfig) -> _Mapped:
    """Qwen2-MoE / Qwen1.5-MoE: softmax top-k, one sigmoid-gated shared expert."""
    mapped = _map_qwen3_moe(c)
    mapped.experts.update(shared=1, shared_width=c.positive("shared_expert_intermediate_size"), shared_gate=True)
    return mapped


def _sparse_step_layers(c: FamilyConfig) -> tuple[Callable[[int], bool], Callable[[int], str]]:
    """Qwen2-MoE / Qwen3-MoE: layer i is MoE unless mlp_only_layers lists it, when (i + 1) % decoder_sparse_step
    == 0."""
    step = c.positive("decoder_sparse_step")
    only_mlp = c.get("mlp_only_layers", list, optional=True) or []
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in only_mlp):
        raise c.fail("mlp_only_layers", f"expected a list of layer indices, found {only_mlp!r}")

    def is_moe(layer: int) -> bool:
        return layer not in only_mlp and (layer + 1) % step == 0

    def reason(layer: int) -> str:
        if layer in only_mlp:
            return f"mlp_only_layers lists layer {layer}"
        return f"decoder_sparse_step={step} makes only layers with (layer + 1) % {step} == 0 MoE"
    return is_moe, reason


def _map_qwen3_moe(c: FamilyConfig) -> _Mapped:
    """Qwen3-MoE (and Qwen2-MoE's routed part): softmax top-k (norm_topk_prob), the decoder_sparse_step /
    mlp_only_layers schedule."""
    k = c.positive("num_experts_per_tok")
    routed = c.positive("num_experts")
    balance, notes = _transformers_balance_loss(c, k)
    is_moe, reason = _sparse_step_layers(c)
    return _Mapped({"routed": routed, "width": c.positive("moe_intermediate_size"), "top_k": k},
                   {"score": "softmax", "normalize": c.get("norm_topk_prob", bool)}, balance, is_moe, reason, notes)


def _map_olmoe(c: FamilyConfig) -> _Mapped:
    """OLMoE: softmax top-k (norm_topk_prob), every layer MoE."""
    k = c.positive("num_experts_per_tok")
    balance, notes = _transformers_balance_loss(c, k)
    return _Mapped({"routed": c.positive("num_experts"), "width": c.positive("intermediate_size"), "top_k": k},
                   {"score": "softmax", "normalize": c.get("norm_topk_prob", bool)}, balance, _all_layers,
                   lambda i: "", notes)


def _map_phimoe(c: FamilyConfig) -> _Mapped:
    """PhiMoE: SparseMixer routing (two sequential picks on the router logits, each weighted by a softmax over
    the experts within 2 * router_jitter_noise of it in relative terms), every layer MoE."""
    k = c.positive("num_experts_per_tok")
    if k != 2:
        raise c.fail("num_experts_per_tok", f"num_experts_per_tok={k}: transformers' PhiMoE SparseMixer picks 2 "
                                            "experts whatever this key says, so the config is ambiguous")
    eps = c.get("router_jitter_noise", float)
    if eps < 0:
        raise c.fail("router_jitter_noise", f"expected a value >= 0, found {eps}")
    notes = [f"router_jitter_noise={eps:g} -> router.sparse_mixer.jitter_eps (the SparseMixer threshold, used at "
             "inference too); the spec is the eval-mode layer (training samples experts and corrects gradients)"]
    jitter = c.get("input_jitter_noise", float)
    if jitter != 0:
        notes.append(f"input_jitter_noise={jitter:g} multiplies the router input by uniform noise in training "
                     "only; the eval-mode layer does not read it")
    balance, loss_notes = _transformers_balance_loss(c, k)
    return _Mapped({"routed": c.positive("num_local_experts"), "width": c.positive("intermediate_size"), "top_k": k},
                   {"score": "softmax", "sparse_mixer": {"jitter_eps": eps}}, balance, _all_layers, lambda i: "",
                   notes + loss_notes)


# ----------------------------------------------------------------------------------------------
# families that fit today's layer (issue 17): transformers 5.24's modules, read for what they compute


# Families whose decoder reads mlp_layer_types ("dense" / "sparse" per layer) for its schedule.
_LISTED_MLP_LAYERS = ("glm4_moe_lite", "exaone_moe")


def _map_sigmoid_grouped(c: FamilyConfig) -> _Mapped:
    """GLM-4.5 (glm4_moe), GLM-4.7-Flash (glm4_moe_lite), dots.llm1 (dots1) and EXAONE MoE (exaone_moe):
    DeepSeek-V3's router (sigmoid,
    selection on scores + e_score_correction_bias, groups scored by their top-2 sum, norm_topk_prob,
    routed_scaling_factor) under these families' own keys. Dense layers: the first first_k_dense_replace, or
    the mlp_layer_types of glm4_moe_lite and exaone_moe."""
    mapped = _map_deepseek_v3(c)
    if c.model_type not in _LISTED_MLP_LAYERS:
        return mapped
    kinds = c.get("mlp_layer_types", list, optional=True)
    if kinds is None:  # the class defaults: the first first_k_dense_replace layers dense (glm4_moe_lite: 1)
        first = c.get("first_k_dense_replace", int) if c.model_type == "exaone_moe" else 1
        kinds = ["dense"] * first + ["sparse"] * (c.positive("num_hidden_layers") - first)
    if any(kind not in ("dense", "sparse") for kind in kinds) or len(kinds) != c.positive("num_hidden_layers"):
        raise c.fail("mlp_layer_types", "expected one of 'dense' / 'sparse' per decoder layer")
    mapped.is_moe_layer = lambda layer: kinds[layer] == "sparse"
    mapped.dense_reason = lambda layer: f"mlp_layer_types[{layer}] is 'dense'"
    return mapped


def _map_minimax_m2(c: FamilyConfig) -> _Mapped:
    """MiniMax-M2: sigmoid scores, top-k selection on scores + e_score_correction_bias (a buffer of the block),
    the chosen unbiased scores renormalised; no groups, no shared experts, every layer MoE."""
    jitter = c.get("router_jitter_noise", float)
    if jitter != 0:
        raise c.fail("router_jitter_noise", f"router_jitter_noise={jitter}: multiplicative input jitter in "
                                            "training is not modelled")
    k = c.positive("num_experts_per_tok")
    notes = [f"e_score_correction_bias -> router.bias (balance.aux_free); the bias update rate is not in the "
             f"config: gamma={AuxFree().gamma} is the paper's value",
             "router_aux_loss_coef is not mapped: transformers' loss takes a softmax of the router logits, which "
             "this sigmoid router never computes"]
    return _Mapped({"routed": c.positive("num_local_experts"), "width": c.positive("intermediate_size"),
                    "top_k": k}, {"score": "sigmoid", "normalize": True}, {"aux_free": {"gamma": AuxFree().gamma}},
                   _all_layers, lambda i: "", notes)


def _map_ernie4_5_moe(c: FamilyConfig) -> _Mapped:
    """ERNIE-4.5 MoE: softmax scores; top-k chosen on scores + e_score_correction_bias, the chosen unbiased
    scores renormalised (divided by max(sum, moe_norm_min)); moe_num_shared_experts shared experts as one MLP;
    MoE layers (i + 1) % moe_layer_interval == 0 between moe_layer_start_index and moe_layer_end_index."""
    if c.get("use_bias", bool):
        raise c.fail("use_bias", "use_bias=true puts biases on the shared experts, the dense MLPs and the LM head "
                                 "but not on the routed experts, which a spec (one experts.bias flag, no LM-head "
                                 "bias) cannot express")
    norm_min = c.get("moe_norm_min", float)
    if not 0 <= norm_min <= 1e-6:
        raise c.fail("moe_norm_min", f"moe_norm_min={norm_min}: a floor on the weights' sum that can bind is not "
                                     "modelled (renormalisation divides by the sum itself)")
    k, layers = c.positive("moe_k"), c.positive("num_hidden_layers")
    start, interval = c.get("moe_layer_start_index", int), c.positive("moe_layer_interval")
    end = c.get("moe_layer_end_index", int)
    end = layers - 1 if end == -1 else end
    balance, notes = _transformers_balance_loss(c, k)
    balance["aux_free"] = {"gamma": AuxFree().gamma}
    notes.append(f"moe_statics.e_score_correction_bias -> router.bias (balance.aux_free); gamma={AuxFree().gamma} "
                 "is not in the config")
    shared = c.get("moe_num_shared_experts", int)
    if shared < 0:
        raise c.fail("moe_num_shared_experts", f"expected a value >= 0, found {shared}")

    def is_moe(layer: int) -> bool:
        return (layer + 1) % interval == 0 and start <= layer <= end

    def reason(layer: int) -> str:
        return (f"moe_layer_start_index={start}, moe_layer_end_index={end} and moe_layer_interval={interval} make "
                f"layer {layer} dense")
    return _Mapped({"routed": c.positive("moe_num_experts"), "width": c.positive("moe_intermediate_size"),
                    "top_k": k, **({"shared": shared} if shared else {})},
                   {"score": "softmax", "normalize": True}, balance, is_moe, reason, notes)


def _map_gpt_oss(c: FamilyConfig) -> _Mapped:
    """gpt-oss: router with a logit bias, softmax over the top-k logits (= softmax, top-k, renormalised), experts
    with biases and the clamped SwiGLU (swiglu_alpha, swiglu_limit), every layer MoE."""
    k = c.positive("num_experts_per_tok")
    alpha, limit = c.get("swiglu_alpha", float), c.get("swiglu_limit", float)
    for key, value in (("swiglu_alpha", alpha), ("swiglu_limit", limit)):
        if value <= 0:
            raise c.fail(key, f"expected a value > 0, found {value}")
    balance, notes = _transformers_balance_loss(c, k)
    notes.insert(0, f"swiglu_alpha={alpha:g}, swiglu_limit={limit:g} -> experts.clamp (clamped_swiglu); "
                    "hidden_act is not read by gpt-oss's experts")
    experts = {"routed": c.positive("num_local_experts"), "width": c.positive("intermediate_size"), "top_k": k,
               "bias": True, "activation": "clamped_swiglu", "clamp": {"alpha": alpha, "limit": limit}}
    return _Mapped(experts, {"score": "softmax", "normalize": True, "logit_bias": True}, balance, _all_layers,
                   lambda i: "", notes)


def _map_longcat_flash(c: FamilyConfig) -> _Mapped:
    """LongCat-Flash's MoE block: softmax over n_routed_experts + zero_expert_num, selection on the scores plus
    e_score_correction_bias, weights x routed_scaling_factor; a zero (identity) expert returns the token itself.
    One MoE block per decoder layer (num_layers; each layer also has two attention blocks and two dense MLPs)."""
    if c.data.get("router_bias"):
        raise c.fail("router_bias", "router_bias=true: transformers' LongCat-Flash router creates the bias but "
                                    "computes its logits without it, so the config is ambiguous")
    identity = c.get("zero_expert_num", int, optional=True) or 0
    if identity < 0:
        raise c.fail("zero_expert_num", f"expected a value >= 0, found {identity}")
    experts = {"routed": c.positive("n_routed_experts"), "width": c.positive("expert_ffn_hidden_size"),
               "top_k": c.positive("moe_topk")}
    if identity:
        experts["identity"] = identity
    notes = [f"zero_expert_num={identity} -> experts.identity",
             f"e_score_correction_bias -> router.bias (balance.aux_free); the bias update rate is not in the config: "
             f"gamma={AuxFree().gamma} is the paper's value",
             "transformers' gate_up_proj also holds rows for the identity experts, which nothing reads: the import "
             "drops them, the export writes zeros"]
    return _Mapped(experts, {"score": "softmax", "scaling": c.get("routed_scaling_factor", float)},
                   {"aux_free": {"gamma": AuxFree().gamma}}, _all_layers, lambda i: "", notes, layers_key="num_layers")


def _map_llama4_text(c: FamilyConfig) -> _Mapped:
    """Llama 4 (text): sigmoid of the top-k router logits, the weight multiplying the chosen expert's input
    (router.scale_input), one shared expert of the experts' width; MoE layers listed by moe_layers (default:
    every interleave_moe_layer_step-th, ending each step). transformers computes no balance loss for it."""
    jitter = c.get("router_jitter_noise", float)
    if jitter != 0:
        raise c.fail("router_jitter_noise", f"router_jitter_noise={jitter}: training-time jitter is not modelled")
    layers, step = c.positive("num_hidden_layers"), c.positive("interleave_moe_layer_step")
    listed = c.get("moe_layers", list, optional=True)
    if listed is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in listed):
        raise c.fail("moe_layers", f"expected a list of layer indices, found {listed!r}")
    moe = set(listed) if listed is not None else set(range(step - 1, layers, step))

    def reason(layer: int) -> str:
        if listed is not None:
            return f"moe_layers does not list layer {layer}"
        return f"interleave_moe_layer_step={step} makes only layers with (layer + 1) % {step} == 0 MoE"
    width = c.positive("intermediate_size")
    return _Mapped({"routed": c.positive("num_local_experts"), "width": width,
                    "top_k": c.positive("num_experts_per_tok"), "shared": 1},
                   {"score": "sigmoid", "scale_input": True}, {}, lambda i: i in moe, reason,
                   ["transformers computes no balance loss for Llama 4: no balance section",
                    "the shared expert has the experts' width (intermediate_size)"])


def _map_dbrx(c: FamilyConfig) -> _Mapped:
    """DBRX's block: a softmax over the experts (in the model dtype), the top-k weights divided by their p-norm
    (moe_normalize_expert_weights: p = 1, their sum, is the renormalisation; none leaves them), GLU experts of
    ffn_act_fn, every layer MoE; the balance loss is Mixtral's with moe_loss_weight."""
    act = c.get("ffn_config.ffn_act_fn", dict)
    if act.get("name", "silu") not in ("silu", "swish"):
        raise c.fail("ffn_config.ffn_act_fn", f"activation {str(act.get('name'))[:40]!r} is not modelled for DBRX's "
                                              "experts (silu is)")
    p = c.get("ffn_config.moe_normalize_expert_weights", float, optional=True)
    if p is not None and p != 1:
        raise c.fail("ffn_config.moe_normalize_expert_weights",
                     f"router weights divided by their {p:g}-norm are not modelled; p = 1 (their sum) is the "
                     "renormalisation moe-ir has")
    k = c.positive("ffn_config.moe_top_k")
    balance, notes = _transformers_balance_loss(c, k)
    if c.get("ffn_config.moe_jitter_eps", float, optional=True):
        notes.append("moe_jitter_eps scales the router's input by noise in training only; the spec is the model in "
                     "eval mode")
    experts = {"routed": c.positive("ffn_config.moe_num_experts"), "width": c.positive("ffn_config.ffn_hidden_size"),
               "top_k": k, "activation": "swiglu"}
    return _Mapped(experts, {"score": "softmax", "normalize": p is not None},
                   balance, _all_layers, lambda i: "", notes)


def _per_layer_constant(c: FamilyConfig, key: str) -> int:
    """An int, or a per-layer list of equal ints (every MoE layer of a spec has one expert count and top-k)."""
    value = c.data.get(key, c.defaults.get(key))
    if isinstance(value, list):
        if not value or len(set(value)) != 1 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                        for v in value):
            raise c.fail(key, f"{key}={str(value)[:60]} varies by layer: per-layer expert counts and top-k are "
                              "not modelled (every MoE layer of a spec has the same)")
        return value[0]
    return c.positive(key)


def _map_hunyuan_v1_moe(c: FamilyConfig) -> _Mapped:
    """Hunyuan-A13B (hunyuan_v1_moe): a float32 softmax router, top-k renormalised, and one ungated shared MLP
    of the experts' width (intermediate_size) in every layer."""
    return _Mapped({"routed": _per_layer_constant(c, "num_experts"), "width": c.positive("intermediate_size"),
                    "top_k": _per_layer_constant(c, "moe_topk"), "shared": 1},
                   {"score": "softmax", "normalize": True}, {}, _all_layers, lambda i: "",
                   ["transformers computes no balance loss for this family"])


def _map_jetmoe(c: FamilyConfig) -> _Mapped:
    """JetMoE's MLP block (JetMoeMoE): softmax over the top-k router logits (the top-k softmax renormalised),
    gate and up fused in input_linear, a learned bias added once to the block output; every layer MoE. Its
    attention experts are the decoder's (model.py)."""
    act = c.get("activation_function", str)
    if act not in _ACTIVATIONS:
        raise c.fail("activation_function", f"activation {act!r} is not modelled; supported: "
                                            f"{', '.join(_ACTIVATIONS)} (gelu is the exact erf form)")
    notes = []
    coef = c.get("aux_loss_coef", float)
    if coef:
        notes.append(f"aux_loss_coef={coef:g} is not mapped to a balance loss: transformers' JetMoE pools the router "
                     "logits of every MoA and MoE block of the model into one loss, which no per-layer loss equals")
    return _Mapped({"routed": c.positive("num_local_experts"), "width": c.positive("intermediate_size"),
                    "top_k": c.positive("num_experts_per_tok"), "output_bias": True, "activation": _ACTIVATIONS[act]},
                   {"score": "softmax", "normalize": True}, {}, _all_layers, lambda i: "", notes)


_FAMILIES: dict[str, Callable[[FamilyConfig], _Mapped]] = {
    "deepseek": _map_deepseek, "deepseek_v2": _map_deepseek_v2, "deepseek_v3": _map_deepseek_v3,
    "mixtral": _map_mixtral, "qwen2_moe": _map_qwen2_moe, "olmoe": _map_olmoe, "phimoe": _map_phimoe,
    "qwen3_moe": _map_qwen3_moe, "glm4_moe": _map_sigmoid_grouped, "glm4_moe_lite": _map_sigmoid_grouped,
    "dots1": _map_sigmoid_grouped, "minimax_m2": _map_minimax_m2, "ernie4_5_moe": _map_ernie4_5_moe,
    "gpt_oss": _map_gpt_oss, "llama4_text": _map_llama4_text,
    "flex_olmo": _map_olmoe,  # OLMoE's block; its post-norm layers are the decoder's (model.py)
    "exaone_moe": _map_sigmoid_grouped,
    "hunyuan_v1_moe": _map_hunyuan_v1_moe,
    "granitemoe": _map_mixtral,  # softmax over the top-k logits = the top-k softmax renormalised; multipliers: model.py
    "granitemoeshared": _map_granitemoeshared,
    "dbrx": _map_dbrx,
    "granitemoe_swa": _map_granitemoeshared,  # its sinks, sliding layers and per-layer RoPE bases: model.py
    "longcat_flash": _map_longcat_flash,
    "jetmoe": _map_jetmoe,
}


# ----------------------------------------------------------------------------------------------
# public API


def config_dict(config: Any) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)  # a transformers PretrainedConfig
    if callable(to_dict):
        return dict(to_dict())
    raise SpecError(f"expected a config dict or a transformers PretrainedConfig, found {type(config).__name__}")


def _dtype(c: FamilyConfig) -> tuple[DType, list[str]]:
    # transformers 5 writes "dtype"; older configs "torch_dtype". Absent: transformers loads float32.
    key = "dtype" if c.data.get("dtype") is not None else "torch_dtype"
    value = c.data.get(key)
    if value is None:
        return DType.FLOAT32, ["no dtype in the config: float32"]
    if not isinstance(value, str) or value not in {d.value for d in DType}:
        raise c.fail(key, f"{key}={value!r} is not a dtype moe-ir models ({', '.join(d.value for d in DType)})")
    return DType(value), []


def describe_hf_config(config: Any, *, layer: int | None = None, name: str | None = None,
                       file: str | None = None) -> tuple[LayerSpec, HFLayerInfo]:
    """The spec of one MoE layer of a Hugging Face config and what the import decided (family, layer, notes).

    `layer` picks the decoder layer (default: the first MoE layer); a dense layer is a SpecError saying
    which key makes it dense. Every MoE layer of these families has the same settings, so the layer only
    names the spec and selects which weights `weights_from_hf` reads."""
    data = config_dict(config)
    model_type = data.get("model_type")
    refusal = refusal_of_family(model_type)
    if refusal is not None:
        raise SpecError(refusal, path="model_type", file=file)
    if not isinstance(model_type, str) or model_type not in _FAMILIES:
        found = "no model_type" if model_type is None else f"model_type {repr(model_type)[:60]}"
        raise SpecError(f"{found}; supported Hugging Face MoE families: {', '.join(SUPPORTED_MODEL_TYPES)}",
                        path="model_type", file=file)
    c = FamilyConfig(data, model_type, file)
    mapped = _FAMILIES[model_type](c)
    hidden = c.positive("hidden_size")
    num_layers = c.positive(mapped.layers_key)
    moe_layers = tuple(i for i in range(num_layers) if mapped.is_moe_layer(i))
    if not moe_layers:
        raise c.fail("num_hidden_layers", "no decoder layer of this config is an MoE layer")
    if layer is None:
        layer = moe_layers[0]
    elif not 0 <= layer < num_layers:
        raise SpecError(f"layer {layer} is out of range: the model has {num_layers} layers (0..{num_layers - 1})",
                        path="layer", file=file)
    elif layer not in moe_layers:
        raise SpecError(f"layer {layer} is a dense layer: {mapped.dense_reason(layer)}; MoE layers: "
                        f"{index_ranges(moe_layers)}", path="layer", file=file)

    dtype, dtype_notes = _dtype(c)
    notes = dtype_notes + mapped.notes
    # A family whose experts fix their own activation (gpt-oss) states it in its mapping.
    activation = Activation(mapped.experts["activation"]) if "activation" in mapped.experts else _activation(c)
    if "quantization_config" in c.data:
        method = (c.data["quantization_config"] or {}).get("quant_method", "?") \
            if isinstance(c.data["quantization_config"], Mapping) else "?"
        notes.append(f"quantization_config ({method}) describes weight storage; the spec is the dequantized "
                     "layer and weights_from_hf refuses quantized tensors")
    experts = {**mapped.experts, "activation": activation.value}
    # Router projection and scores in float32: DeepSeek casts explicitly; Mixtral/Qwen2-MoE/OLMoE
    # project in the model dtype and take the softmax in float32.
    router = {**mapped.router, "dtype": DType.FLOAT32.value}
    if dtype != DType.FLOAT32 and model_type in ("mixtral", "qwen2_moe", "olmoe", "qwen3_moe", "minimax_m2",
                                                 "flex_olmo", "granitemoe", "granitemoeshared",
                                                 "granitemoe_swa", "dbrx"):
        notes.append(f"transformers projects this router in {dtype.value} before a float32 softmax; the spec "
                     "projects in float32, so near-tied experts may rank differently in low precision")
    if dtype != DType.FLOAT32 and model_type in ("phimoe", "gpt_oss"):
        notes.append(f"transformers runs this router and its expert weights in {dtype.value}; the spec in float32, "
                     "so near-tied experts may rank differently in low precision")
    layer_name = name or f"{model_type}_layer{layer}"
    where = f" {file}" if file else (f" {data['_name_or_path']}" if data.get("_name_or_path") else "")
    source = f"Hugging Face {model_type} config{where}, layer {layer}"
    spec = spec_from_dict({"name": layer_name, "source": source, "hidden": hidden, "dtype": dtype.value,
                           "experts": experts, "router": router, "balance": mapped.balance}, file=file)
    return spec, HFLayerInfo(model_type, layer, moe_layers, num_layers, tuple(notes))


def spec_from_hf_config(config: Any, *, name: str | None = None, layer: int | None = None,
                        file: str | None = None) -> LayerSpec:
    """LayerSpec of one MoE layer from a transformers config object or a config.json dict."""
    return describe_hf_config(config, layer=layer, name=name, file=file)[0]


def moe_layer_indices(config: Any) -> tuple[int, ...]:
    """Decoder layers of the config that are MoE layers."""
    return describe_hf_config(config)[1].moe_layers


def read_config_json(path: str | Path) -> tuple[dict, str]:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    file = str(path)
    if not path.exists():
        raise SpecError("no such config file", file=file)
    try:
        with path.open("rb") as f:  # read one byte past the bound: a pipe or /dev/zero states no size
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise SpecError(f"the file is larger than {MAX_CONFIG_BYTES >> 20} MiB; a config.json is a few KiB",
                            file=file)
        data = json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as err:
        raise SpecError(f"not valid JSON: {err.msg}", line=err.lineno, file=file) from None
    except RecursionError:
        raise SpecError("not a config: the JSON nests too deeply", file=file) from None
    except ValueError as err:  # an integer of more digits than Python converts; a bad UTF-8 byte
        raise SpecError(f"cannot read the config: {str(err).split(';')[0][:160]}", file=file) from None
    except OSError as err:
        raise SpecError(f"cannot read the config: {err}", file=file) from None
    if not isinstance(data, dict):
        raise SpecError("a Hugging Face config.json must hold a JSON object", file=file)
    return data, file


def import_hf_config_file(path: str | Path, *, layer: int | None = None, name: str | None = None) -> LayerSpec:
    """LayerSpec from a config.json file (or a model folder holding one)."""
    data, file = read_config_json(path)
    return spec_from_hf_config(data, layer=layer, name=name, file=file)


def describe_hf_config_file(path: str | Path, *, layer: int | None = None,
                            name: str | None = None) -> tuple[LayerSpec, HFLayerInfo]:
    data, file = read_config_json(path)
    return describe_hf_config(data, layer=layer, name=name, file=file)


def index_ranges(indices: tuple[int, ...]) -> str:
    parts, start = [], None
    for i, v in enumerate(indices):
        if start is None:
            start = v
        if i + 1 == len(indices) or indices[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}..{v}")
            start = None
    return ", ".join(parts)


def spec_yaml_text(spec: LayerSpec, source_comment: str | list[str] | tuple[str, ...]) -> str:
    """The spec as YAML (canonical explicit form) under a '#' comment header naming where it came from.

    The text loads back to an equal spec with `load_spec_text`."""
    import yaml

    lines = [source_comment] if isinstance(source_comment, str) else list(source_comment)
    header = "".join(f"# {ln}".rstrip() + "\n" for block in lines for ln in str(block).splitlines())
    body = yaml.safe_dump(spec_to_dict(spec), sort_keys=False, default_flow_style=False, allow_unicode=True)
    return header + body


def info_comment(info: HFLayerInfo, config_path: str | None = None) -> list[str]:
    """Header lines for `spec_yaml_text`: source, layer choice and every decision the import made."""
    src = config_path or "a Hugging Face config"
    lines = [f"Imported by `moe-ir import-hf` from {src} (model_type {info.model_type}).",
             f"Layer {info.layer}; MoE layers of this model: {index_ranges(info.moe_layers)} of {info.num_layers}."]
    lines += [f"- {note}" for note in info.notes]
    return lines
