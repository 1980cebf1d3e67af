"""Hugging Face config.json -> LayerSpec: published model sizes, refusals that name the key, the YAML text,
the `import-hf` subcommand, and the family default table against the installed transformers."""
from __future__ import annotations

import argparse
import json
import math

import pytest

from moe_ir.builder import build_graph
from moe_ir.errors import SpecError
from moe_ir.frontends.hf import (FAMILY_DEFAULTS, add_import_hf_command, describe_hf_config, import_hf_config_file,
                                 spec_from_hf_config, spec_yaml_text)
from moe_ir.frontends.yaml_spec import load_spec, load_spec_text
from moe_ir.spec import Activation, DType

# Released config.json contents (MoE-relevant keys and the layer layout).
# DeepSeek configs are remote-code dicts as published; the others come from the transformers classes.
DEEPSEEK_MOE_16B_BASE = {
    "model_type": "deepseek", "architectures": ["DeepseekForCausalLM"], "hidden_size": 2048,
    "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 28, "num_attention_heads": 16,
    "num_key_value_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "norm_topk_prob": False, "scoring_func": "softmax",
    "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu", "vocab_size": 102400,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
DEEPSEEK_V2_LITE = {
    "model_type": "deepseek_v2", "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "num_hidden_layers": 27, "num_attention_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2,
    "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1, "norm_topk_prob": False,
    "routed_scaling_factor": 1.0, "scoring_func": "softmax", "topk_method": "greedy", "n_group": 1,
    "topk_group": 1, "aux_loss_alpha": 0.001, "seq_aux": True, "kv_lora_rank": 512, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 102400,
    "hidden_act": "silu", "torch_dtype": "bfloat16",
}
DEEPSEEK_V2 = {
    **DEEPSEEK_V2_LITE, "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536,
    "num_hidden_layers": 60, "num_attention_heads": 128, "n_routed_experts": 160, "routed_scaling_factor": 16.0,
    "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3, "q_lora_rank": 1536,
}
del DEEPSEEK_V2["aux_loss_alpha"], DEEPSEEK_V2["seq_aux"]
DEEPSEEK_V3 = {
    "model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1, "norm_topk_prob": True,
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 8,
    "topk_group": 4, "hidden_act": "silu", "vocab_size": 129280, "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
}


def _transformers_dicts() -> dict[str, dict]:
    transformers = pytest.importorskip("transformers", reason="these configs are built with the transformers classes")
    return {
        "Mixtral-8x7B": transformers.MixtralConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
            router_aux_loss_coef=0.02, dtype="bfloat16").to_dict(),
        "Qwen1.5-MoE-A2.7B": transformers.Qwen2MoeConfig(
            hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
            moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4,
            norm_topk_prob=False, vocab_size=151936, dtype="bfloat16").to_dict(),
        "OLMoE-1B-7B": transformers.OlmoeConfig(
            hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16, num_experts=64,
            num_experts_per_tok=8, vocab_size=50304, dtype="bfloat16").to_dict(),
    }


# name -> (hidden, routed, width, top_k, shared, shared_width, first MoE layer, router summary, balance losses)
PUBLISHED = {
    "deepseek-moe-16b-base": (2048, 64, 1408, 6, 2, 1408, 1, ("softmax", None, False, 1.0), {"sequence": 0.001}),
    "DeepSeek-V2-Lite": (2048, 64, 1408, 6, 2, 1408, 1, ("softmax", None, False, 1.0), {"sequence": 0.001}),
    "DeepSeek-V2": (5120, 160, 1536, 6, 2, 1536, 1, ("softmax", (8, 3, "max"), False, 16.0), {}),
    "DeepSeek-V3": (7168, 256, 2048, 8, 1, 2048, 3, ("sigmoid", (8, 4, "top2_sum"), True, 2.5), {}),
    "Mixtral-8x7B": (4096, 8, 14336, 2, 0, 14336, 0, ("softmax", None, True, 1.0), {"expert": 0.04}),
    "Qwen1.5-MoE-A2.7B": (2048, 60, 1408, 4, 1, 5632, 0, ("softmax", None, False, 1.0), {"expert": 0.004}),
    "OLMoE-1B-7B": (2048, 64, 1024, 8, 0, 1024, 0, ("softmax", None, False, 1.0), {"expert": 0.08}),
}


def _published(name: str) -> dict:
    fixed = {"deepseek-moe-16b-base": DEEPSEEK_MOE_16B_BASE, "DeepSeek-V2-Lite": DEEPSEEK_V2_LITE,
             "DeepSeek-V2": DEEPSEEK_V2, "DeepSeek-V3": DEEPSEEK_V3}
    return dict(fixed[name]) if name in fixed else _transformers_dicts()[name]


def _write(tmp_path, data: dict, name: str = "config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data, indent=2))
    return path


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_import_to_their_numbers(name, tmp_path):
    hidden, routed, width, top_k, shared, shared_width, first, router, losses = PUBLISHED[name]
    spec = import_hf_config_file(_write(tmp_path, _published(name)))
    e, r = spec.experts, spec.router
    assert (spec.hidden, e.routed, e.width, e.top_k, e.shared, e.shared_ffn_width) == \
        (hidden, routed, width, top_k, shared, shared_width)
    assert e.activation == Activation.SWIGLU and spec.dtype == DType.BFLOAT16 and r.dtype == DType.FLOAT32
    group = (r.group_limit.groups, r.group_limit.kept, r.group_limit.score.value) if r.group_limit else None
    assert (r.score.value, group, r.normalize, r.scaling) == router
    assert spec.balance.losses == pytest.approx(losses)
    assert (spec.balance.aux_free is not None) == (name == "DeepSeek-V3")
    assert e.shared_gate == name.startswith("Qwen")
    assert spec.name.endswith(f"_layer{first}")


def _meta_block_param_count(name: str) -> int:
    """Parameters (+ buffers) of transformers' own MoE block at the published size, built on the meta device."""
    transformers = pytest.importorskip("transformers")
    import torch
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    d = _published(name)
    keep = lambda cls: {k: v for k, v in d.items() if k in cls().to_dict() and k != "model_type"}  # noqa: E731
    if d["model_type"] in ("deepseek", "deepseek_v2"):
        # deepseek-moe-16b's block has DeepseekV2Moe's parameters (router, stacked experts, fused shared MLP).
        cfg = transformers.DeepseekV2Config(**{**keep(transformers.DeepseekV2Config), "topk_method": "greedy",
                                               "n_group": None, "topk_group": None})
        block_cls = DeepseekV2Moe
    elif d["model_type"] == "deepseek_v3":
        cfg, block_cls = transformers.DeepseekV3Config(**keep(transformers.DeepseekV3Config)), DeepseekV3MoE
    else:
        config_cls = {"mixtral": transformers.MixtralConfig, "qwen2_moe": transformers.Qwen2MoeConfig,
                      "olmoe": transformers.OlmoeConfig}[d["model_type"]]
        block_cls = {"mixtral": MixtralSparseMoeBlock, "qwen2_moe": Qwen2MoeSparseMoeBlock,
                     "olmoe": OlmoeSparseMoeBlock}[d["model_type"]]
        cfg = config_cls(**{k: v for k, v in d.items() if k not in ("model_type", "transformers_version")})
    with torch.device("meta"):
        block = block_cls(cfg)
    return sum(p.numel() for p in block.parameters()) + sum(b.numel() for b in block.buffers())


# MoE-layer parameter counts by hand: router E*H (+E bias for V3) + 3*H*(E*F + shared widths) (+H Qwen gate).
HAND_COUNTS = {
    "deepseek-moe-16b-base": 64 * 2048 + 3 * 2048 * (64 * 1408 + 2 * 1408),
    "DeepSeek-V2-Lite": 64 * 2048 + 3 * 2048 * (64 * 1408 + 2 * 1408),
    "DeepSeek-V2": 160 * 5120 + 3 * 5120 * (160 * 1536 + 2 * 1536),
    "DeepSeek-V3": 256 * 7168 + 256 + 3 * 7168 * (256 * 2048 + 2048),
    "Mixtral-8x7B": 8 * 4096 + 3 * 4096 * 8 * 14336,
    "Qwen1.5-MoE-A2.7B": 60 * 2048 + 3 * 2048 * (60 * 1408 + 5632) + 2048,
    "OLMoE-1B-7B": 64 * 2048 + 3 * 2048 * 64 * 1024,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts_match_transformers_blocks(name, tmp_path, capsys):
    """`moe-ir import-hf` then `moe-ir inspect --json`: the layer's total equals transformers' block."""
    from moe_ir.cli import main

    spec_path = tmp_path / "spec.yaml"
    assert main(["import-hf", str(_write(tmp_path, _published(name))), "-o", str(spec_path)]) == 0
    capsys.readouterr()
    assert main(["inspect", "--json", str(spec_path)]) == 0
    total = json.loads(capsys.readouterr().out)["total_params"]
    graph_total = sum(math.prod(v.type.shape) for v in build_graph(load_spec(spec_path)).weights.values())
    assert total == graph_total == HAND_COUNTS[name] == _meta_block_param_count(name)


def test_family_defaults_match_installed_transformers():
    """config.json omits keys equal to the class defaults, so our table must equal them."""
    transformers = pytest.importorskip("transformers")
    classes = {"deepseek_v2": transformers.DeepseekV2Config, "deepseek_v3": transformers.DeepseekV3Config,
               "mixtral": transformers.MixtralConfig, "qwen2_moe": transformers.Qwen2MoeConfig,
               "olmoe": transformers.OlmoeConfig, "qwen3_moe": transformers.Qwen3MoeConfig,
               "glm4_moe": transformers.Glm4MoeConfig, "glm4_moe_lite": transformers.Glm4MoeLiteConfig,
               "dots1": transformers.Dots1Config, "minimax_m2": transformers.MiniMaxM2Config,
               "ernie4_5_moe": transformers.Ernie4_5_MoeConfig, "phimoe": transformers.PhimoeConfig,
               "gpt_oss": transformers.GptOssConfig, "llama4_text": transformers.Llama4TextConfig,
               "flex_olmo": transformers.FlexOlmoConfig, "granitemoe": transformers.GraniteMoeConfig,
               "exaone_moe": transformers.ExaoneMoeConfig, "hunyuan_v1_moe": transformers.HunYuanMoEV1Config,
               "longcat_flash": transformers.LongcatFlashConfig, "granitemoe_swa": transformers.GraniteMoeSWAConfig,
               "granitemoeshared": transformers.GraniteMoeSharedConfig, "dbrx": transformers.DbrxConfig,
               "jetmoe": transformers.JetMoeConfig}
    # Keys whose class default is computed or renamed: the number of experts of Qwen3-MoE is num_local_experts
    # (num_experts an alias), glm4_moe_lite's mlp_layer_types is filled from num_hidden_layers, ERNIE's -1 (the last
    # layer) of moe_layer_end_index is replaced by that layer's index.
    renamed = {("qwen3_moe", "num_experts"): "num_local_experts", ("exaone_moe", "n_routed_experts"): "num_experts",
               ("exaone_moe", "n_shared_experts"): "num_shared_experts", ("dbrx", "hidden_size"): "d_model",
               ("dbrx", "num_hidden_layers"): "n_layers"}
    computed = {("glm4_moe_lite", "mlp_layer_types"): None, ("exaone_moe", "mlp_layer_types"): None,
                ("ernie4_5_moe", "moe_layer_end_index"): -1, ("llama4_text", "moe_layers"): None}
    assert set(FAMILY_DEFAULTS) == set(classes) | {"deepseek"}
    for model_type, cls in classes.items():
        defaults = cls().to_dict()
        for section in ("attn_config", "ffn_config"):  # DBRX's nested keys, read as "section.key"
            defaults.update({f"{section}.{k}": v for k, v in (defaults.get(section) or {}).items()})
        if model_type == "dbrx":  # its loss weight sits in ffn_config
            defaults["router_aux_loss_coef"] = defaults["ffn_config.moe_loss_weight"]
        defaults.update({key: defaults[theirs] for (family, key), theirs in renamed.items() if family == model_type})
        defaults.update({key: v for (family, key), v in computed.items() if family == model_type})
        for key, value in FAMILY_DEFAULTS[model_type].items():
            assert defaults[key] == value or (key == "mlp_only_layers" and defaults[key] == [] and value is None), \
                (model_type, key, defaults[key], value)


def test_key_aliases_match_transformers_attribute_maps():
    transformers = pytest.importorskip("transformers")
    from moe_ir.frontends.hf.config import _ALIASES

    for cls in (transformers.DeepseekV2Config, transformers.DeepseekV3Config, transformers.MixtralConfig,
                transformers.Qwen2MoeConfig, transformers.OlmoeConfig):
        moe_aliases = {k: v for k, v in cls.attribute_map.items() if v in FAMILY_DEFAULTS[cls.model_type]}
        assert _ALIASES.get(cls.model_type, {}) == moe_aliases, cls.model_type
    olmoe = spec_from_hf_config({"model_type": "olmoe", "num_local_experts": 16, "num_experts_per_tok": 2})
    assert olmoe.experts.routed == 16


def test_config_object_and_dict_agree():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DeepseekV3Config(hidden_size=256, moe_intermediate_size=64, n_routed_experts=32, n_group=4,
                                        topk_group=2, num_attention_heads=4)
    assert spec_from_hf_config(cfg) == spec_from_hf_config(cfg.to_dict())
    # A minimal config.json as save_pretrained writes it (defaults omitted) gives the same spec too.
    minimal = {"model_type": "deepseek_v3", "hidden_size": 256, "moe_intermediate_size": 64, "n_routed_experts": 32,
               "n_group": 4, "topk_group": 2, "num_attention_heads": 4}
    assert spec_from_hf_config(minimal) == spec_from_hf_config(cfg)


@pytest.mark.parametrize("changes, key, fragment", [
    ({"hidden_act": "gelu_pytorch_tanh"}, "hidden_act", "not modelled"),
    ({"topk_method": "device_limited"}, "topk_method", "greedy and group_limited_greedy"),
    ({"norm_topk_prob": True}, "norm_topk_prob", "ambiguous"),
    ({"scoring_func": "sigmoid"}, "scoring_func", "softmax only"),
    ({"mlp_bias": True}, "mlp_bias", "shared experts only"),
    ({"moe_layer_freq": 2}, "moe_layer_freq", "ambiguous"),
    ({"num_experts_per_tok": None}, "num_experts_per_tok", "required"),
    ({"n_routed_experts": "64"}, "n_routed_experts", "expected int"),
])
def test_unmodelled_deepseek_v2_keys_are_refused(changes, key, fragment):
    with pytest.raises(SpecError) as err:
        spec_from_hf_config({**DEEPSEEK_V2_LITE, **changes}, file="config.json")
    assert err.value.path == key and fragment in err.value.message
    assert str(err.value).startswith(f"config.json: {key}:")


@pytest.mark.parametrize("base, changes, key", [
    (DEEPSEEK_V3, {"scoring_func": "softmax"}, "scoring_func"),
    (DEEPSEEK_V3, {"topk_method": "group_limited_greedy"}, "topk_method"),
    (DEEPSEEK_V3, {"num_experts_per_tok": 1}, "norm_topk_prob"),
    (DEEPSEEK_V3, {"n_group": 5}, "router.group_limit.groups"),  # 5 groups do not divide 256 experts
    (DEEPSEEK_MOE_16B_BASE, {"routed_scaling_factor": 2.0}, "routed_scaling_factor"),
    (DEEPSEEK_MOE_16B_BASE, {"topk_method": "group_limited_greedy"}, "topk_method"),
    (DEEPSEEK_MOE_16B_BASE, {"n_routed_experts": None}, "n_routed_experts"),
    ({"model_type": "mixtral"}, {"router_jitter_noise": 0.01}, "router_jitter_noise"),
    ({"model_type": "qwen2_moe"}, {"num_experts": 8, "num_experts_per_tok": 9}, "experts.top_k"),
    ({"model_type": "llama"}, {}, "model_type"),
    ({}, {}, "model_type"),
])
def test_other_refusals_name_the_key(base, changes, key):
    with pytest.raises(SpecError) as err:
        spec_from_hf_config({**base, **changes})
    assert err.value.path == key


def test_layer_selection():
    spec, info = describe_hf_config(DEEPSEEK_V3, layer=10)
    assert info.layer == 10 and info.moe_layers == tuple(range(3, 61)) and spec.name == "deepseek_v3_layer10"
    with pytest.raises(SpecError, match=r"layer 2 is a dense layer: first_k_dense_replace=3 makes layers 0..2 dense"):
        describe_hf_config(DEEPSEEK_V3, layer=2)
    with pytest.raises(SpecError, match="out of range"):
        describe_hf_config(DEEPSEEK_V3, layer=61)
    qwen = {"model_type": "qwen2_moe", "num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    assert describe_hf_config(qwen)[1].moe_layers == (1, 5)
    with pytest.raises(SpecError, match="mlp_only_layers lists layer 3"):
        describe_hf_config(qwen, layer=3)
    with pytest.raises(SpecError, match=r"decoder_sparse_step=2"):
        describe_hf_config(qwen, layer=2)
    v1 = {**DEEPSEEK_MOE_16B_BASE, "moe_layer_freq": 2}
    assert describe_hf_config(v1)[1].moe_layers == tuple(range(2, 28, 2))


def test_deepseek_v1_renormalises_only_above_top1():
    assert spec_from_hf_config({**DEEPSEEK_MOE_16B_BASE, "norm_topk_prob": True}).router.normalize
    assert not spec_from_hf_config({**DEEPSEEK_MOE_16B_BASE, "norm_topk_prob": True,
                                    "num_experts_per_tok": 1}).router.normalize


def test_gelu_maps_to_exact_geglu():
    assert spec_from_hf_config({**DEEPSEEK_V2_LITE, "hidden_act": "gelu"}).experts.activation == Activation.GEGLU


def test_yaml_text_round_trips_with_source_comment(tmp_path):
    spec, info = describe_hf_config(DEEPSEEK_V3, file="DeepSeek-V3/config.json")
    text = spec_yaml_text(spec, ["from DeepSeek-V3/config.json", "second line"])
    assert text.startswith("# from DeepSeek-V3/config.json\n# second line\n")
    assert load_spec_text(text) == spec
    assert any("fp8" in note for note in info.notes)  # the quantization is reported, not hidden


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moe-ir")
    add_import_hf_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_import_hf_command_writes_a_loadable_spec(tmp_path, capsys):
    config = _write(tmp_path, DEEPSEEK_MOE_16B_BASE)
    out = tmp_path / "spec.yaml"
    assert _cli(["import-hf", str(config), "-o", str(out), "--layer", "5"]) == 0
    text = out.read_text()
    assert f"# Imported by `moe-ir import-hf` from {config} (model_type deepseek)." in text
    assert "balance.sequence" in text and "MoE layers of this model: 1..27 of 28" in text
    assert load_spec(out) == spec_from_hf_config(DEEPSEEK_MOE_16B_BASE, layer=5, file=str(config))
    assert _cli(["import-hf", str(tmp_path)]) == 0  # a model folder; spec to stdout
    assert load_spec_text(capsys.readouterr().out).experts.routed == 64


def test_import_hf_command_with_weights(tmp_path):
    torch = pytest.importorskip("torch")
    from moe_ir.frontends.hf import hf_layer_prefix, weights_to_hf
    from moe_ir.params import init_weights, load_weights, save_weights

    small = {**DEEPSEEK_V3, "hidden_size": 32, "moe_intermediate_size": 8, "n_routed_experts": 16, "n_group": 4,
             "topk_group": 2, "num_experts_per_tok": 4, "num_hidden_layers": 5}
    small.pop("quantization_config")
    config = _write(tmp_path, small)
    spec = spec_from_hf_config(small, layer=4)
    weights = init_weights(build_graph(spec), seed=3)
    save_weights(weights_to_hf(weights, spec, prefix=hf_layer_prefix(4)), tmp_path / "model.safetensors")
    assert _cli(["import-hf", str(config), "-o", str(tmp_path / "s.yaml"), "--layer", "4",
                 "--weights", str(tmp_path / "model.safetensors"),
                 "--weights-out", str(tmp_path / "w.safetensors")]) == 0
    got = load_weights(tmp_path / "w.safetensors", build_graph(load_spec(tmp_path / "s.yaml")))
    assert all(torch.equal(got[k], weights[k]) for k in weights)


def test_bad_config_files(tmp_path):
    with pytest.raises(SpecError, match="no such config file"):
        import_hf_config_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"model_type": "mixtral",\n "hidden_size": }')
    with pytest.raises(SpecError) as err:
        import_hf_config_file(bad)
    assert err.value.line == 2 and "not valid JSON" in err.value.message


def test_weights_flags_go_together(tmp_path):
    from moe_ir.errors import MoeIRError

    config = _write(tmp_path, DEEPSEEK_V2_LITE)
    with pytest.raises(MoeIRError, match="--weights and --weights-out go together"):
        _cli(["import-hf", str(config), "--weights", str(tmp_path / "model.safetensors")])


def test_specs_without_a_hugging_face_layout_are_refused():
    pytest.importorskip("torch")
    import dataclasses

    from moe_ir.errors import WeightsError
    from moe_ir.frontends.hf import weights_to_hf
    from moe_ir.spec import Activation as Act

    spec = spec_from_hf_config(DEEPSEEK_V2_LITE)
    relu = dataclasses.replace(spec, experts=dataclasses.replace(spec.experts, activation=Act.RELU, bias=True))
    with pytest.raises(WeightsError, match="relu is not gated.*experts.bias is set"):
        weights_to_hf({}, relu)
