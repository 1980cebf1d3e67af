"""The shipped MoE layer specs of the released PhiMoE, gpt-oss and Llama 4 configurations: each is what
`import-hf` gives for the published config (the keys the MoE layer reads), and its parameter count equals
transformers' own block built at that size on the meta device and the count by hand.

Their whole-model specs (specs/models/) are checked against transformers' models in tests/test_hf_families.py and
the family test files (tests/test_hf_phimoe.py, test_hf_gpt_oss.py, test_hf_llama4.py)."""
from __future__ import annotations

import math

import pytest

transformers = pytest.importorskip("transformers", reason="the meta-device blocks come from transformers")
import torch  # noqa: E402

from moe_ir.analysis import analyse  # noqa: E402
from moe_ir.builder import build_graph  # noqa: E402
from moe_ir.frontends import load_spec  # noqa: E402
from moe_ir.frontends.hf import spec_from_hf_config  # noqa: E402

from conftest import SPECS  # noqa: E402

# MoE-relevant keys of the published config.json files (Hugging Face hub).
RELEASED = {
    "phi-3.5-moe": {"model_type": "phimoe", "_name_or_path": "microsoft/Phi-3.5-MoE-instruct", "hidden_size": 4096,
                    "intermediate_size": 6400, "num_hidden_layers": 32, "num_local_experts": 16,
                    "num_experts_per_tok": 2, "router_jitter_noise": 0.01, "input_jitter_noise": 0.01,
                    "router_aux_loss_coef": 0.0, "hidden_act": "silu", "torch_dtype": "bfloat16"},
    "gpt-oss-20b": {"model_type": "gpt_oss", "_name_or_path": "openai/gpt-oss-20b", "hidden_size": 2880,
                    "intermediate_size": 2880, "num_hidden_layers": 24, "num_local_experts": 32,
                    "num_experts_per_tok": 4, "swiglu_limit": 7.0, "router_aux_loss_coef": 0.9,
                    "torch_dtype": "bfloat16"},
    "llama-4-scout": {"model_type": "llama4_text", "_name_or_path": "meta-llama/Llama-4-Scout-17B-16E-Instruct",
                      "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
                      "num_hidden_layers": 48, "num_local_experts": 16, "num_experts_per_tok": 1,
                      "interleave_moe_layer_step": 1, "router_jitter_noise": 0.0, "torch_dtype": "bfloat16"},
}
HAND_COUNTS = {
    "phi-3.5-moe": 16 * 4096 + 16 * 3 * 4096 * 6400,
    # router weight and bias; per expert gate/up/down matrices, gate/up biases, down bias
    "gpt-oss-20b": 32 * 2880 + 32 + 32 * (3 * 2880 * 2880 + 2 * 2880 + 2880),
    # router; 16 experts; one shared expert of the same width
    "llama-4-scout": 16 * 5120 + 16 * 3 * 5120 * 8192 + 3 * 5120 * 8192,
}


def _meta_block_params(name: str) -> int:
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe
    from transformers.models.phimoe.modeling_phimoe import PhimoeSparseMoeBlock

    d = {k: v for k, v in RELEASED[name].items() if k not in ("model_type", "_name_or_path", "torch_dtype")}
    cls, block = {"phimoe": (transformers.PhimoeConfig, PhimoeSparseMoeBlock),
                  "gpt_oss": (transformers.GptOssConfig, GptOssMLP),
                  "llama4_text": (transformers.Llama4TextConfig, Llama4TextMoe)}[RELEASED[name]["model_type"]]
    with torch.device("meta"):
        module = block(cls(**d))
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_shipped_layer_spec_is_the_released_layer(name):
    shipped = load_spec(SPECS / f"{name}.yaml")
    imported = spec_from_hf_config(RELEASED[name], name=name)
    assert shipped.experts == imported.experts and shipped.router == imported.router
    assert shipped.balance == imported.balance and shipped.hidden == imported.hidden
    graph_total = sum(math.prod(v.type.shape) for v in build_graph(shipped).weights.values())
    assert analyse(shipped).total_params == graph_total == HAND_COUNTS[name] == _meta_block_params(name)
