"""gpt-oss's MoE layer: the router's logit bias (router.logit_bias), expert biases and the clamped SwiGLU
(activation clamped_swiglu with experts.clamp) against transformers' GptOssMLP, its import (config keys,
weights both ways in the [E, in, out] interleaved layout), the backends that lower it against the reference
(ONNX Runtime's MoE op with swiglu_limit / activation_alpha / activation_beta in the ort flavour), and the
refusals of the ones that cannot.

transformers is the independent oracle (random weights, tiny odd configs built here, no download).
"""
from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the gpt-oss equivalence tests need transformers "
                                                          "(the `hf` / `test` extra)")
from transformers import GptOssConfig  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP  # noqa: E402

from conftest import assert_greedy_equals_generate, assert_logits_equal, logits_on_backends
from moe_ir.analysis import analyse  # noqa: E402
from moe_ir.backends import get_backend, resolve_backends  # noqa: E402
from moe_ir.builder import build_graph  # noqa: E402
from moe_ir.errors import SpecError, WeightsError  # noqa: E402
from moe_ir.frontends.hf import (FAMILY_DEFAULTS, HFLayout, spec_from_hf_config, weights_from_hf,  # noqa: E402
                                 weights_to_hf)
from moe_ir.interpreter import interpret  # noqa: E402
from moe_ir.ir import to_text  # noqa: E402
from moe_ir.passes import run_pipeline  # noqa: E402
from moe_ir.spec import Activation, spec_from_dict  # noqa: E402
from moe_ir.validate import validate  # noqa: E402

H = 40


def _config(**kw) -> GptOssConfig:
    # Odd sizes: 7 experts, width 18, top-3; a small limit so the clamps bind on random weights.
    base = dict(hidden_size=H, intermediate_size=18, num_local_experts=7, num_experts_per_tok=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=10, num_hidden_layers=2, swiglu_limit=0.6)
    return GptOssConfig(**{**base, **kw})


def _block(cfg: GptOssConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    block = GptOssMLP(cfg).eval()
    with torch.no_grad():
        for name, p in block.named_parameters():
            if p.dim() == 1 or name.endswith("bias"):
                p.normal_(0.0, 0.3)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(H))
    return block


@pytest.mark.parametrize("changes", [{}, {"num_experts_per_tok": 1, "swiglu_limit": 7.0, "swiglu_alpha": 1.0}])
def test_layer_matches_transformers(changes):
    cfg = _config(**changes)
    block = _block(cfg)
    spec = spec_from_hf_config(cfg)
    e = spec.experts
    assert e.activation == Activation.CLAMPED_SWIGLU and e.bias and spec.router.logit_bias
    assert (e.clamp.alpha, e.clamp.limit) == (cfg.swiglu_alpha, cfg.swiglu_limit)
    weights = weights_from_hf(block, spec)
    x = torch.randn(2, 21, H, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, hf_scores = block(x)
        _, _, hf_idx = block.router(x.reshape(-1, H))
    ours = interpret(build_graph(spec), {"x": x}, weights)
    assert torch.equal(ours["expert_idx"], hf_idx)
    torch.testing.assert_close(ours["weights"], hf_scores, rtol=1e-6, atol=1e-7)
    err = (ours["out"] - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), err
    if changes == {}:
        # The limit binds: a plain SwiGLU, or dropping the router bias, gives another output.
        plain = spec_from_dict({**spec_to_plain(spec), "experts": {**spec_to_plain(spec)["experts"],
                                                                  "activation": "swiglu", "clamp": None}})
        other = interpret(build_graph(plain), {"x": x}, weights)["out"]
        assert (other - ref).abs().max() > 1e-2
        no_bias = dict(weights, **{"router.logit_bias": torch.zeros_like(weights["router.logit_bias"])})
        assert not torch.equal(interpret(build_graph(spec), {"x": x}, no_bias)["expert_idx"], hf_idx)


def spec_to_plain(spec):
    from moe_ir.spec import spec_to_dict

    return spec_to_dict(spec)


def test_backends_match_the_reference_or_say_why_not():
    cfg = _config()
    spec = spec_from_hf_config(cfg)
    weights = weights_from_hf(_block(cfg, seed=2), spec)
    report = validate(spec, resolve_backends(["reference", "torch", "onnx:portable", "onnx:ort", "expert_parallel:2"]),
                      tokens=17, batch=2, seed=4, weights=weights)
    assert report.ok, [r.to_dict() for r in report.results]
    assert all(r.status == "ok" and r.routing.flips == 0 for r in report.results)
    for name, fragment in (("triton", "router.logit_bias"), ("tensorrt", "router.logit_bias"),
                           ("onnx:plugin", "router.logit_bias")):
        backend = get_backend(name)
        graph = run_pipeline(build_graph(spec), backend.pipeline)
        try:
            ok, reason = backend.supports(graph)
        except Exception as err:  # noqa: BLE001 - an unavailable backend says so by raising
            pytest.skip(f"{name}: {err}")
        assert not ok and fragment in reason, (name, reason)


def test_clamped_swiglu_without_router_bias_fuses_and_is_refused_by_the_fused_kernels():
    spec = spec_from_dict({"hidden": 16, "experts": {"routed": 4, "width": 8, "top_k": 2,
                                                     "activation": "clamped_swiglu",
                                                     "clamp": {"alpha": 1.5, "limit": 2.0}}})
    for name, fragment in (("triton", "clamped_swiglu"), ("onnx:plugin", "clamped_swiglu")):
        backend = get_backend(name)
        graph = run_pipeline(build_graph(spec), backend.pipeline)
        ok, reason = backend.supports(graph)
        assert not ok and fragment in reason, (name, reason)
    # The text form shows the clamp on the nodes that have it and nothing new on the others.
    text = to_text(build_graph(spec))
    assert "clamp_alpha=1.5" in text and "clamp_limit=2.0" in text
    plain = to_text(build_graph(spec_from_dict({"hidden": 16, "experts": {"routed": 4, "width": 8, "top_k": 2}})))
    assert "clamp_" not in plain


def test_weights_round_trip_and_parameter_count():
    cfg = _config()
    block = _block(cfg, seed=1)
    spec = spec_from_hf_config(cfg)
    canonical = weights_from_hf(block, spec)
    fresh = GptOssMLP(cfg)
    fresh.load_state_dict(weights_to_hf(canonical, spec), strict=True)
    for name, t in block.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name
    graph_total = sum(math.prod(v.type.shape) for v in build_graph(spec).weights.values())
    assert analyse(spec).total_params == graph_total == sum(p.numel() for p in block.parameters())
    with pytest.raises(WeightsError, match="stacked"):
        weights_to_hf(canonical, spec, HFLayout.PER_EXPERT)


def test_defaults_and_refusals():
    defaults = GptOssConfig().to_dict()
    assert all(defaults[k] == v for k, v in FAMILY_DEFAULTS["gpt_oss"].items())
    with pytest.raises(SpecError) as err:
        spec_from_hf_config(_config(swiglu_limit=0.0))
    assert err.value.path == "swiglu_limit"
    for experts, path in (({"activation": "clamped_swiglu"}, "experts.clamp"),
                          ({"activation": "swiglu", "clamp": {}}, "experts.clamp")):
        with pytest.raises(SpecError) as err:
            spec_from_dict({"hidden": 8, "experts": {"routed": 4, "width": 4, "top_k": 2, **experts}})
        assert err.value.path == path


# ------------------------------------------------------------------------------------------------
# the whole model: attention sinks, attention biases, head_dim; sliding-window layers and YaRN refused


def _tiny_model(**kw):
    from transformers import AutoModelForCausalLM

    cfg = _config(**{**dict(vocab_size=97, num_hidden_layers=3, num_local_experts=5, num_experts_per_tok=2,
                            swiglu_limit=0.8, head_dim=12, layer_types=["full_attention"] * 3,
                            rope_parameters={"rope_type": "default", "rope_theta": 150000.0}), **kw})
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # every tensor random (norms around 1, sinks of either sign), so a misplaced one shows
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("sinks"):
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 0.2 if p.dim() > 1 else 0.1)
    return cfg, hf


# gpt-oss's released RoPE is YaRN without rounding the ramp's ends (truncate false); a 4-token original
# context makes the blend reach the test's positions.
YARN = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False, "original_max_position_embeddings": 4}


# The released layout: sliding-window layers alternating with global ones (a window shorter than the test's 9
# tokens, so it binds).
SLIDING = {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"], "sliding_window": 3}


@pytest.mark.parametrize("rope, layers", [(None, None), (YARN, None), (YARN, SLIDING)],
                         ids=["rope", "yarn", "yarn-sliding"])
def test_model_logits_equal_transformers_on_every_backend_that_lowers_it(rope, layers):
    from moe_ir.frontends.hf.model import model_spec_from_hf_config, weights_from_hf_model
    from moe_ir.model_builder import build_model_graph

    cfg, hf = _tiny_model(**({"rope_parameters": rope} if rope else {}), **(layers or {}))
    spec = model_spec_from_hf_config(cfg)
    a = spec.model.attention
    assert a.sinks and a.qkv_bias and a.out_bias and a.head_dim == 12 and a.rope_theta == 150000.0
    assert (a.rope_scaling is not None) == (rope is not None)
    weights = weights_from_hf_model(hf, spec)
    graph_total = sum(math.prod(v.type.shape) for v in build_model_graph(spec).weights.values())
    assert graph_total == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    got = logits_on_backends(spec, weights, ids, ("torch", "onnx:portable", "onnx:ort"))
    assert_logits_equal(got, expected, atol=2e-5, label="gpt_oss")
    # The sinks matter: without them the logits move.
    no_sinks = {k: (torch.full_like(v, -1e4) if k.endswith("sinks") else v) for k, v in weights.items()}
    moved = interpret(build_model_graph(spec), {"input_ids": ids}, no_sinks)["logits"]
    assert (moved - expected).abs().max() > 1e-2


def test_model_generation_and_decode_equal_prefill():
    from moe_ir.frontends.hf.model import model_spec_from_hf_config, weights_from_hf_model
    from moe_ir.validate import validate_model

    cfg, hf = _tiny_model()
    spec = model_spec_from_hf_config(cfg)
    report = validate_model(spec, resolve_backends(["reference", "torch"]), tokens=7, batch=2,
                            weights=weights_from_hf_model(hf, spec), generate=3)
    assert report.ok, report.to_table()
    assert all(r.status == "ok" for r in report.results)


def test_model_defaults_and_refusals_name_the_missing_feature():
    from moe_ir.frontends.hf.model import MODEL_DEFAULTS, model_spec_from_hf_config

    defaults = GptOssConfig().to_dict()
    for key, value in MODEL_DEFAULTS["gpt_oss"].items():
        theirs = defaults["rope_parameters"]["rope_theta"] if key == "rope_theta" else defaults.get(key)
        assert theirs == value, key
    # The class defaults alternate sliding-window layers and use YaRN: both modelled.
    a = model_spec_from_hf_config(_config()).model.attention
    assert a.rope_scaling is not None and a.sliding_window == 128 and a.sliding_layers == (0,)
    from moe_ir.model_spec import model_spec_from_dict

    with pytest.raises(SpecError) as err:
        model_spec_from_dict({"model": {"vocab_size": 9, "hidden": 8, "layers": 1, "attention": {
            "kind": "mla", "heads": 2, "kv_lora_rank": 4, "qk_nope_head_dim": 2, "qk_rope_head_dim": 2,
            "v_head_dim": 2, "sinks": True}}, "moe": {"experts": {"routed": 4, "width": 4, "top_k": 2}}})
    assert err.value.path == "model.attention.sinks"



def test_import_hf_model_cli_and_greedy_generation_equal_transformers(tmp_path):
    """The released layout in small (YaRN, alternating sliding layers, sinks, biases): `moe-ir import-hf --model
    --weights` on the folder transformers saved (sharded) gives its logits; greedy tokens of the decode graph on
    torch and both ONNX flavours equal transformers' generate on left-padded prompts, each step's logits its."""
    from moe_ir.cli import main
    from moe_ir.frontends import load_model_spec
    from moe_ir.model_builder import build_model_graph
    from moe_ir.params import load_weights

    cfg, hf = _tiny_model(rope_parameters=YARN, **SLIDING)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    spec_file, weights_file = tmp_path / "model.yaml", tmp_path / "model.safetensors"
    assert main(["import-hf", str(tmp_path / "hf"), "--model", "--weights", str(tmp_path / "hf"), "-o", str(spec_file),
                 "--weights-out", str(weights_file)]) == 0
    spec = load_model_spec(spec_file)
    assert spec.model.attention.sliding_layers == (0, 2) and spec.model.attention.sinks
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    graph = build_model_graph(spec)
    weights = load_weights(weights_file, graph)
    got = interpret(graph, {"input_ids": ids}, weights)["logits"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5 * float(expected.abs().max()))

    prompts = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(prompts)
    mask[1, :2] = 0  # the second prompt is 4 tokens, left-padded; 11 positions in all pass the window of 3
    assert_greedy_equals_generate(hf, spec, weights, prompts, mask, ("torch", "onnx:portable", "onnx:ort"))
