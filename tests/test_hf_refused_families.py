"""Hugging Face MoE families whose attention moe-ir cannot express: refused by the exact missing feature (the
indexer of DeepSeek sparse attention, linear attention, Mamba), never with the generic list of families."""
from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers", reason="the configs come from the installed transformers")

from moe_ir.errors import SpecError  # noqa: E402
from moe_ir.frontends.hf import spec_from_hf_config  # noqa: E402



@pytest.mark.parametrize("model_type, feature", [("deepseek_v32", "index_topk"), ("glm_moe_dsa", "indexer"),
                                                 ("qwen3_next", "DeltaNet"), ("jamba", "Mamba"),
                                                 ("qwen3_5_moe", "DeltaNet"), ("nllb-moe", "encoder-decoder")])
def test_families_whose_attention_moe_ir_cannot_express_are_refused_by_feature(model_type, feature):
    from moe_ir.frontends.hf.model import model_spec_from_hf_config

    config = transformers.AutoConfig.for_model(model_type).to_dict()
    for importer in (spec_from_hf_config, model_spec_from_hf_config):
        with pytest.raises(SpecError, match=feature) as err:
            importer(config)
        assert err.value.path == "model_type" and "supported Hugging Face MoE families" not in str(err.value)
