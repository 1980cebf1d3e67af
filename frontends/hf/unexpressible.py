"""Hugging Face MoE families whose attention (or token mixer) moe-ir cannot express: the exact missing feature,
so `import-hf` says what stops it instead of listing the families it takes.

Each entry was read from the family's transformers 5 modeling file: the class that does what moe-ir's
attention ops (MHA / GQA / MLA with RoPE, causal softmax over every earlier key) do not.
"""
from __future__ import annotations

__all__ = ["UNEXPRESSIBLE_FAMILIES", "unexpressible_reason"]

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
}


def unexpressible_reason(model_type: object) -> str | None:
    """Why moe-ir cannot import this family ('' -> None when it is not one of them)."""
    return UNEXPRESSIBLE_FAMILIES.get(model_type) if isinstance(model_type, str) else None
