"""Llama 4 (text)'s MoE layer: the sigmoid router weight multiplying the chosen expert's input
(router.scale_input -> grouped_ffn row_scale + an unweighted combine -> reference) and the shared expert,
against transformers' Llama4TextMoe; its import (config keys, MoE layer schedule, weights both ways in the
[E, in, out] layout), the backends that lower it and the refusals of the ones that cannot. The whole model
(Llama4ForCausalLM): chunked attention, layers without RoPE with the query temperature, the weightless q/k
norm after RoPE, the dense layers' own width and Llama 3's RoPE scaling, against transformers' logits and
greedy generation, and the shipped Llama-4-Scout spec's parameter count.

transformers is the independent oracle (random weights, tiny odd configs built here, no download).
"""
from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Llama 4 equivalence tests need transformers "
                                                          "(the `hf` / `test` extra)")
from transformers import Llama4TextConfig  # noqa: E402
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe  # noqa: E402

from conftest import assert_greedy_equals_generate, assert_logits_equal, logits_on_backends
from moe_ir.analysis import analyse  # noqa: E402
from moe_ir.backends import get_backend, resolve_backends  # noqa: E402
from moe_ir.builder import build_graph  # noqa: E402
from moe_ir.errors import SpecError  # noqa: E402
from moe_ir.frontends.hf import (FAMILY_DEFAULTS, describe_hf_config, spec_from_hf_config,  # noqa: E402
                                 weights_from_hf, weights_to_hf)
from moe_ir.interpreter import interpret  # noqa: E402
from moe_ir.ir import to_text  # noqa: E402
from moe_ir.passes import run_pipeline  # noqa: E402
from moe_ir.spec import ScoreFn, spec_from_dict  # noqa: E402
from moe_ir.validate import validate  # noqa: E402

H = 28


def _config(**kw) -> Llama4TextConfig:
    # Odd sizes: 5 experts of width 18, top-2 (the released models route top-1), 3 layers.
    base = dict(hidden_size=H, intermediate_size=18, intermediate_size_mlp=30, num_local_experts=5,
                num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_hidden_layers=3)
    return Llama4TextConfig(**{**base, **kw})


def _block(cfg, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    block = Llama4TextMoe(cfg).eval()
    with torch.no_grad():
        for _, p in block.named_parameters():
            p.normal_(0.0, 1.0 / math.sqrt(H))
    return block


@pytest.mark.parametrize("k", [1, 2])
def test_layer_matches_transformers(k):
    cfg = _config(num_experts_per_tok=k)
    block = _block(cfg)
    spec = spec_from_hf_config(cfg)
    assert spec.router.scale_input and spec.router.score == ScoreFn.SIGMOID and spec.experts.shared == 1
    weights = weights_from_hf(block, spec)
    x = torch.randn(2, 17, H, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, logits = block(x)
    ours = interpret(build_graph(spec), {"x": x}, weights)
    chosen = logits.topk(k, dim=-1)
    assert torch.equal(ours["expert_idx"], chosen.indices)
    torch.testing.assert_close(ours["weights"], chosen.values.sigmoid(), rtol=1e-6, atol=1e-7)
    err = (ours["out"].reshape(-1, H) - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), err
    # Weighing the outputs instead (every other family) gives another layer: the test tells them apart.
    output_weighted = spec_from_dict({"hidden": H, "experts": {"routed": 5, "width": 18, "top_k": k, "shared": 1},
                                      "router": {"score": "sigmoid"}})
    other = interpret(build_graph(output_weighted), {"x": x}, weights)["out"].reshape(-1, H)
    assert (other - ref).abs().max() > 1e-2


def test_backends_match_the_reference_or_say_why_not():
    cfg = _config()
    spec = spec_from_hf_config(cfg)
    report = validate(spec, resolve_backends(["reference", "torch", "onnx:portable"]), tokens=19, batch=2, seed=4,
                      weights=weights_from_hf(_block(cfg, seed=2), spec))
    assert report.ok, [r.to_dict() for r in report.results]
    assert all(r.status == "ok" and r.routing.flips == 0 for r in report.results)
    for name, fragment in (("onnx:ort", "router.scale_input"), ("triton", "router.scale_input"),
                           ("tensorrt", "router.scale_input"), ("onnx:plugin", "router.scale_input"),
                           ("expert_parallel:2", "router.scale_input")):
        backend = get_backend(name)
        graph = run_pipeline(build_graph(spec), backend.pipeline)
        try:
            ok, reason = backend.supports(graph)
        except Exception as err:  # noqa: BLE001 - an unavailable backend says so by raising
            pytest.skip(f"{name}: {err}")
        assert not ok and fragment in reason, (name, reason)
    # The new operand and attribute show only where they are used.
    text = to_text(build_graph(spec))
    assert "weighted=false" in text
    plain = to_text(build_graph(spec_from_dict({"hidden": 8, "experts": {"routed": 4, "width": 4, "top_k": 2}})))
    assert "weighted" not in plain


def test_weights_round_trip_schedule_and_parameter_count():
    cfg = _config(interleave_moe_layer_step=2, num_hidden_layers=5)
    block = _block(cfg, seed=1)
    spec, info = describe_hf_config(cfg)
    assert info.moe_layers == (1, 3)
    canonical = weights_from_hf(block, spec)
    fresh = Llama4TextMoe(cfg)
    fresh.load_state_dict(weights_to_hf(canonical, spec), strict=True)
    for name, t in block.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name
    graph_total = sum(math.prod(v.type.shape) for v in build_graph(spec).weights.values())
    assert analyse(spec).total_params == graph_total == sum(p.numel() for p in block.parameters())
    assert describe_hf_config(_config(moe_layers=[0, 2]))[1].moe_layers == (0, 2)


def test_defaults_and_refusals():
    from moe_ir.frontends.hf.model import model_spec_from_hf_config

    defaults = Llama4TextConfig().to_dict()
    for key, value in FAMILY_DEFAULTS["llama4_text"].items():
        assert defaults[key] == value or (key == "moe_layers" and value is None), key
    with pytest.raises(SpecError) as err:
        spec_from_hf_config(_config(router_jitter_noise=0.1))
    assert err.value.path == "router_jitter_noise"
    with pytest.raises(SpecError, match="attention_chunk_size") as err:
        model_spec_from_hf_config({**_config().to_dict(), "attention_chunk_size": None})
    assert err.value.path == "attention_chunk_size"
    with pytest.raises(SpecError) as err:
        model_spec_from_hf_config({**_config().to_dict(), "no_rope_layers": [1, 0]})
    assert err.value.path == "no_rope_layers"
    with pytest.raises(SpecError) as err:
        spec_from_dict({"hidden": 8, "experts": {"routed": 4, "width": 4, "top_k": 2},
                        "router": {"scale_input": True, "choice": "expert"}})
    assert err.value.path == "router.scale_input"


# ------------------------------------------------------------------------------------------------
# the whole model


# Llama 3 RoPE scaling over a 64-token original context: the smoothed band falls inside the 4 rotary pairs.
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
# Released Scout's layout in small: MoE every other layer (dense ones of intermediate_size_mlp), no RoPE every
# other layer with a temperature that moves every 2 positions, chunks of 3 positions in the RoPE layers (the
# 9-token prompts cross two chunk boundaries), the weightless q/k norm, Llama 3 RoPE scaling.
SCOUT_LIKE = dict(interleave_moe_layer_step=2, no_rope_layer_interval=2, attention_chunk_size=3, floor_scale=2,
                  attn_scale=0.3, rope_parameters=LLAMA3)
# The options the other way: every layer MoE, plain RoPE, no q/k norm, no temperature, attention biases.
PLAIN = dict(no_rope_layer_interval=3, attention_chunk_size=4, use_qk_norm=False, attn_temperature_tuning=False,
             attention_bias=True)


def _tiny_model(**kw):
    from transformers import AutoModelForCausalLM

    cfg = _config(**{**dict(vocab_size=97, num_hidden_layers=4, pad_token_id=0, bos_token_id=1, eos_token_id=None),
                     **kw})
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # every tensor random (norms around 1), so a misplaced one shows
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2 if p.dim() > 1 else 0.1)
    return cfg, hf


def _ids(b=2, s=9, seed=1):
    return torch.randint(0, 97, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("options", [SCOUT_LIKE, PLAIN], ids=["scout-like", "plain"])
def test_model_logits_equal_transformers_on_every_backend_that_lowers_it(options):
    from moe_ir.frontends.hf.model import model_spec_from_hf_config, weights_from_hf_model
    from moe_ir.model_builder import build_model_graph

    cfg, hf = _tiny_model(**options)
    spec = model_spec_from_hf_config(cfg)
    a = spec.model.attention
    assert a.nope_layers == ((1, 3) if options is SCOUT_LIKE else (2,))
    assert a.chunk_size == cfg.attention_chunk_size and a.chunked_layers == tuple(
        i for i in range(4) if i not in a.nope_layers)
    assert (a.temperature is not None) == (a.qk_norm.value == "weightless_after_rope") == (options is SCOUT_LIKE)
    assert spec.model.moe_layers == ((1, 3) if options is SCOUT_LIKE else (0, 1, 2, 3))
    weights = weights_from_hf_model(hf, spec)
    graph_total = sum(math.prod(v.type.shape) for v in build_model_graph(spec).weights.values())
    assert graph_total == sum(p.numel() for p in hf.parameters())
    ids = _ids()
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    got = logits_on_backends(spec, weights, ids, ("torch", "onnx:portable"))
    assert_logits_equal(got, expected, atol=2e-5 * float(expected.abs().max()), label="llama4_text")
    ort = get_backend("onnx:ort")
    ok, reason = ort.supports(run_pipeline(build_model_graph(spec), ort.pipeline))
    assert not ok and "router.scale_input" in reason


def test_each_attention_feature_changes_the_logits():
    """The test above is not passing by accident: without the chunks, the temperature, the q/k norm, the NoPE
    layers or the Llama 3 scaling, the same weights give other logits."""
    import dataclasses

    from moe_ir.frontends.hf.model import model_spec_from_hf_config, weights_from_hf_model
    from moe_ir.model_builder import build_model_graph
    from moe_ir.model_spec import QKNorm

    cfg, hf = _tiny_model(**SCOUT_LIKE)
    spec = model_spec_from_hf_config(cfg)
    weights = weights_from_hf_model(hf, spec)
    ids = _ids(s=12)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    a = spec.model.attention
    for change in ({"chunk_size": None, "chunked_layers": None}, {"temperature": None}, {"qk_norm": QKNorm.NONE},
                   {"nope_layers": None, "temperature": None}, {"rope_scaling": None}):
        other = dataclasses.replace(spec, model=dataclasses.replace(spec.model,
                                                                    attention=dataclasses.replace(a, **change)))
        got = interpret(build_model_graph(other), {"input_ids": ids}, weights)["logits"]
        assert float((got - expected).abs().max()) > 1e-3, change


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_greedy_generation_equals_transformers(padded):
    """Greedy tokens of the decode graph (torch and portable ONNX) equal transformers' generate, each step's
    logits its logits. transformers' temperature reads a token's cache slot where moe-ir reads its position
    (position_ids); they differ only in left-padded rows, so the padded case runs without the temperature:
    its chunks are still positions (left padding not counted), as transformers' chunked mask has them."""
    from moe_ir.frontends.hf.model import model_spec_from_hf_config, weights_from_hf_model

    cfg, hf = _tiny_model(**{**SCOUT_LIKE, **({"attn_temperature_tuning": False} if padded else {})})
    spec = model_spec_from_hf_config(cfg)
    weights = weights_from_hf_model(hf, spec)
    prompts = _ids(2, 6, seed=4)
    mask = torch.ones_like(prompts)
    if padded:
        mask[1, :2] = 0
    assert_greedy_equals_generate(hf, spec, weights, prompts, mask, ("torch", "onnx:portable"))


def test_import_hf_model_cli_with_weights(tmp_path):
    """`moe-ir import-hf --model --weights` on the folder transformers saved (sharded; dense and MoE FFNs both
    under feed_forward) gives transformers' logits through the reference interpreter."""
    from moe_ir.cli import main
    from moe_ir.frontends import load_model_spec
    from moe_ir.model_builder import build_model_graph
    from moe_ir.params import load_weights

    cfg, hf = _tiny_model(**SCOUT_LIKE)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    spec_file, weights_file = tmp_path / "model.yaml", tmp_path / "model.safetensors"
    assert main(["import-hf", str(tmp_path / "hf"), "--model", "--weights", str(tmp_path / "hf"), "-o", str(spec_file),
                 "--weights-out", str(weights_file)]) == 0
    spec = load_model_spec(spec_file)
    assert spec.model.dense_layers == (0, 2) and spec.model.attention.chunk_size == 3
    graph = build_model_graph(spec)
    ids = _ids()
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    got = interpret(graph, {"input_ids": ids}, load_weights(weights_file, graph))["logits"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5 * float(expected.abs().max()))


def _attention_only_spec():
    """A model of the scout-like attention with an output-weighted MoE layer: what the backends that lower Llama 4's
    attention but not its MoE layer (router.scale_input) can run."""
    from moe_ir.frontends.hf.model import model_spec_from_hf_config
    from moe_ir.model_spec import model_spec_from_dict, model_spec_to_dict

    data = model_spec_to_dict(model_spec_from_hf_config(_tiny_model(**SCOUT_LIKE)[0]))
    data["moe"] = {"experts": {"routed": 5, "width": 6, "top_k": 2, "shared": 1}, "router": {"score": "softmax"}}
    return model_spec_from_dict(data)


@pytest.mark.parametrize("backend, generate", [("onnx:ort", 3), ("compile", 0)])
def test_llama4_attention_on_ort_and_compile(backend, generate):
    """Against the reference: onnx:ort keeps chunks, temperature and the weightless norm in standard ops beside
    the MoE contrib op, in prefill and decode (decode == prefill at every position, greedy tokens); torch.compile
    runs the eager kernels compiled, in prefill only (its decode graphs take minutes of compiling on 2 cores;
    the eager decode kernels are checked against transformers above)."""
    from moe_ir.validate import validate_model

    report = validate_model(_attention_only_spec(), resolve_backends(["reference", backend]), tokens=9, batch=2,
                            seed=3, generate=generate)
    assert report.ok, report.to_table()
    assert all(r.status == "ok" for r in report.results), report.to_table()
    assert all(r.status == "ok" for g in report.generation for r in g.results), report.to_table()
    assert len(report.generation) == (1 if generate else 0)


# The released Llama-4-Scout text_config (the keys the decoder reads), attn_temperature_tuning as released (4).
RELEASED_SCOUT = {
    "model_type": "llama4_text", "attention_bias": False, "attention_chunk_size": 8192, "attn_scale": 0.1,
    "attn_temperature_tuning": 4, "floor_scale": 8192, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
    "interleave_moe_layer_step": 1, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
    "max_position_embeddings": 10485760, "num_attention_heads": 40, "num_experts_per_tok": 1,
    "num_hidden_layers": 48, "num_key_value_heads": 8, "num_local_experts": 16, "rms_norm_eps": 1e-05,
    "no_rope_layers": [1, 1, 1, 0] * 12,
    "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_qk_norm": True, "vocab_size": 202048}


def test_released_scout_imports_as_the_shipped_spec_with_transformers_parameter_count():
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from moe_ir.frontends import load_model_spec
    from moe_ir.frontends.hf.model import model_spec_from_hf_config
    from moe_ir.model_analysis import analyse_model
    from moe_ir.model_spec import model_spec_to_dict

    ours = load_model_spec(Path(__file__).resolve().parent.parent / "specs" / "models" / "llama-4-scout.yaml")
    imported = model_spec_from_hf_config(RELEASED_SCOUT, name=ours.model.name)
    strip = lambda d: {**d, "model": {k: v for k, v in d["model"].items() if k != "source"}}  # noqa: E731
    assert strip(model_spec_to_dict(imported)) == strip(model_spec_to_dict(ours))
    config = {k: v for k, v in RELEASED_SCOUT.items() if k != "model_type"}
    config["attn_temperature_tuning"] = True  # transformers' config class types it as a bool
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Llama4TextConfig(**config))
    a = analyse_model(ours)
    assert a.total_params == sum(t.numel() for t in model.state_dict().values()) == 107_769_861_120
    assert round(a.activated_params / 1e9) == 17  # the model card's 17B active


@pytest.mark.parametrize("attention, path", [
    ({"chunked_layers": [0]}, "model.attention.chunked_layers"),
    ({"chunk_size": 4, "sliding_window": 4}, "model.attention.chunk_size"),
    ({"temperature": {"floor_scale": 8.0, "scale": 0.1}}, "model.attention.temperature"),
    ({"nope_layers": [1, 0]}, "model.attention.nope_layers"),
    ({"nope_layers": [5]}, "model.attention.nope_layers"),
    ({"rope_scaling": {"kind": "llama3", "factor": 8.0, "original_max_positions": 64, "low_freq_factor": 1.0}},
     "model.attention.rope_scaling.high_freq_factor"),
    ({"rope_scaling": {"kind": "yarn", "factor": 8.0, "original_max_positions": 64, "low_freq_factor": 1.0}},
     "model.attention.rope_scaling.low_freq_factor"),
])
def test_attention_spec_errors_name_the_key(attention, path):
    from moe_ir.model_spec import model_spec_from_dict

    with pytest.raises(SpecError) as err:
        model_spec_from_dict({"model": {"vocab_size": 9, "hidden": 8, "layers": 2, "attention": {
            "kind": "gqa", "heads": 2, "kv_heads": 1, **attention}}, "moe": {"experts": {"routed": 4, "width": 4,
                                                                                          "top_k": 2}}})
    assert err.value.path == path
