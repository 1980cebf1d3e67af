"""Hugging Face MoE families `import-hf` refuses, each with the exact missing feature, so a user learns what
stops it instead of reading the list of families it takes: those whose attention (or token mixer) moe-ir's
ops cannot express, and those it does not model yet.

Each entry was read from the family's transformers 5 modeling file: the class that does what moe-ir's
attention ops (MHA / GQA / MLA with RoPE, causal softmax over every earlier key) do not.
"""
from __future__ import annotations

__all__ = ["NOT_MODELLED", "UNEXPRESSIBLE_FAMILIES", "refusal_of_family", "unexpressible_reason"]

# model_type -> the missing feature, named as the modeling file names it.
UNEXPRESSIBLE_FAMILIES: dict[str, str] = {
    "deepseek_v32": "DeepSeek sparse attention: a lightning indexer (DeepseekV32Indexer) scores every earlier key "
                    "and each query attends only to the index_topk best; moe-ir's attention reads every earlier key",
    "deepseek_v4": "an indexer that selects the keys each query attends to (DeepseekV4Indexer); moe-ir's attention "
                   "reads every earlier key",
    "glm_moe_dsa": "DeepSeek sparse attention: an indexer (GlmMoeDsaIndexer) selects the keys each query attends "
                   "to; moe-ir's attention reads every earlier key",
    "qwen3_next": "gated DeltaNet linear-attention layers (Qwen3NextGatedDeltaNet) between the softmax-attention "
                  "ones; moe-ir models softmax attention only",
    "minimax": "lightning (linear) attention layers (MiniMaxLightningAttention); moe-ir models softmax attention "
               "only",
    "bailing_hybrid": "linear-attention layers with a forget gate (BailingHybridDeltaAttention); moe-ir models "
                      "softmax attention only",
    "jamba": "Mamba state-space layers (JambaMambaMixer) in place of attention; moe-ir models softmax attention "
             "only",
    "nemotron_h": "Mamba state-space layers (NemotronHMamba); moe-ir models softmax attention only",
    "granitemoehybrid": "Mamba state-space layers (GraniteMoeHybridMambaLayer); moe-ir models softmax attention "
                        "only",
    "lfm2_moe": "short-convolution token mixers (Lfm2MoeShortConv) in place of attention in most layers; moe-ir "
                "models softmax attention only",
    "qwen3_5_moe": "gated DeltaNet linear-attention layers (Qwen3_5MoeGatedDeltaNet) between the softmax-attention "
                   "ones; moe-ir models softmax attention only",
    "qwen3_5_moe_text": "gated DeltaNet linear-attention layers (Qwen3_5MoeGatedDeltaNet) between the "
                        "softmax-attention ones; moe-ir models softmax attention only",
    "nllb-moe": "an encoder-decoder translation model (NllbMoeEncoderLayer, cross-attention in NllbMoeDecoderLayer); "
                "moe-ir models decoder-only language models",
}


def unexpressible_reason(model_type: object) -> str | None:
    """Why moe-ir cannot import this family ('' -> None when it is not one of them)."""
    return UNEXPRESSIBLE_FAMILIES.get(model_type) if isinstance(model_type, str) else None


# MoE families moe-ir does not read yet -> what they need that it lacks (read from their modeling
# files in transformers 5.24), so a user learns what is missing rather than which families are supported.
NOT_MODELLED: dict[str, str] = {
    "afmoe": "a sigmoid gate on each head's attention output (self_attn.gate_proj) and norms both before and after "
             "the attention and the FFN (four per layer: input_layernorm, post_attention_layernorm, "
             "pre_mlp_layernorm, post_mlp_layernorm), where a model spec's layer has one of the two",
    "cohere2_moe": "parallel attention and FFN (Cohere2MoeDecoderLayer adds both to the residual from one norm), "
                   "where a model spec's layer runs them in sequence, and a logit_scale on the logits",
    "sarvam_moe": "a modelling implementation: transformers 5.24 carries only its configuration (a Glm4MoeConfig), "
                  "so there is no model to check an import against",
    # Vision-language models: their text decoders are MoE decoders, but transformers builds them only inside the
    # multimodal model, whose RoPE takes 3-D positions (mrope_section).
    **{model_type: f"its text decoder taken out of a vision-language model ({extra}; RoPE over 3-D multimodal "
                   "positions, mrope_section), and transformers 5.24 has no text-only causal LM of it to check an "
                   "import against"
       for model_type, extra in (
           ("qwen3_vl_moe", "visual features added into early decoder layers, deepstack"),
           ("qwen3_vl_moe_text", "visual features added into early decoder layers, deepstack"),
           ("qwen3_omni_moe", "audio and vision encoders and a speech talker"),
           ("glm4v_moe", "a vision encoder"), ("glm4v_moe_text", "a vision encoder"),
           ("ernie4_5_vl_moe", "separate text and vision experts chosen by token type"),
           ("ernie4_5_vl_moe_text", "separate text and vision experts chosen by token type"))},
}


def refusal_of_family(model_type: object) -> str | None:
    """The one-line refusal of a family import-hf does not take, naming what it lacks (None: not one of them)."""
    missing = unexpressible_reason(model_type)
    if missing is not None:
        return f"model_type {model_type} cannot be imported: {missing}"
    if isinstance(model_type, str) and model_type in NOT_MODELLED:
        return f"model_type {model_type} needs {NOT_MODELLED[model_type]}, which moe-ir does not model yet"
    return None
