"""PhiMoE: SparseMixer routing (router.sparse_mixer -> sparsemixer_route -> reference) against transformers'
PhimoeSparseMoeBlock in eval mode, its import (config keys, weights both ways, hub names), the backends that
lower it against the reference, and the refusals of the ones that cannot.

transformers is the independent oracle (random weights, tiny odd configs built here, no download).
"""
from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the PhiMoE equivalence tests need transformers "
                                                          "(the `hf` / `test` extra)")
from transformers import PhimoeConfig  # noqa: E402
from transformers.models.phimoe.modeling_phimoe import PhimoeSparseMoeBlock  # noqa: E402

from conftest import assert_logits_equal, logits_on_backends  # noqa: E402
from moe_ir.analysis import analyse  # noqa: E402
from moe_ir.backends import get_backend, resolve_backends  # noqa: E402
from moe_ir.builder import build_graph  # noqa: E402
from moe_ir.errors import SpecError  # noqa: E402
from moe_ir.frontends.hf import (FAMILY_DEFAULTS, HFLayout, describe_hf_config, spec_from_hf_config,  # noqa: E402
                                 weights_from_hf, weights_to_hf)
from moe_ir.interpreter import interpret  # noqa: E402
from moe_ir.passes import run_pipeline  # noqa: E402
from moe_ir.spec import spec_from_dict  # noqa: E402
from moe_ir.validate import validate  # noqa: E402

H = 36


def _config(**kw) -> PhimoeConfig:
    # Odd sizes: 7 experts, width 22, 3 heads of 12.
    base = dict(hidden_size=H, intermediate_size=22, num_local_experts=7, num_experts_per_tok=2,
                num_attention_heads=3, num_key_value_heads=1, num_hidden_layers=2)
    return PhimoeConfig(**{**base, **kw})


def _block(cfg: PhimoeConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    block = PhimoeSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for _, p in block.named_parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    return block


def _hf_routing(block, x):
    with torch.no_grad():
        logits, weights, idx = block.router(x.reshape(-1, x.shape[-1]))
    return logits, weights, idx


# eps 0.01 is the released value (the threshold keeps almost only the pick); 0.4 lets several experts into
# each pick's softmax, so the mask itself is exercised.
@pytest.mark.parametrize("eps", [0.01, 0.4])
def test_layer_matches_transformers_eval(eps):
    cfg = _config(router_jitter_noise=eps)
    block = _block(cfg)
    spec = spec_from_hf_config(cfg)
    assert spec.router.sparse_mixer.jitter_eps == eps and spec.experts.top_k == 2
    weights = weights_from_hf(block, spec)
    x = torch.randn(2, 23, H, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = block(x)
    ours = interpret(build_graph(spec), {"x": x}, weights)
    logits, hf_w, hf_idx = _hf_routing(block, x)
    # Same experts in the same order (first pick, then second), same weights.
    assert torch.equal(ours["expert_idx"], hf_idx)
    torch.testing.assert_close(ours["weights"], hf_w, rtol=1e-6, atol=1e-7)
    err = (ours["out"] - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), err
    # SparseMixer is not softmax top-k: the weights differ from the plain softmax at the same experts, and
    # with the wide threshold they differ from a renormalised top-2 softmax too.
    plain = logits.softmax(-1).gather(1, hf_idx)
    assert (plain - hf_w).abs().max() > 1e-2
    if eps > 0.1:
        assert (plain / plain.sum(-1, keepdim=True) - hf_w).abs().max() > 1e-2


def test_backends_match_the_reference_or_say_why_not():
    spec = spec_from_hf_config(_config(router_jitter_noise=0.4))
    report = validate(spec, resolve_backends(["reference", "torch", "onnx:portable", "onnx:ort"]), tokens=19,
                      batch=2, seed=2)
    assert report.ok, [r.to_dict() for r in report.results]
    assert all(r.status == "ok" and r.routing.flips == 0 for r in report.results)
    graph_of = lambda backend: run_pipeline(build_graph(spec), backend.pipeline)  # noqa: E731
    for name, fragment in (("triton", "SparseMixer"), ("tensorrt", "sparsemixer_route is not fusable"),
                           ("expert_parallel:2", "SparseMixer"), ("onnx:plugin", "sparsemixer_route is not fusable")):
        backend = get_backend(name)
        graph = graph_of(backend)
        try:
            ok, reason = backend.supports(graph)
        except Exception as err:  # noqa: BLE001 - an unavailable backend says so by raising
            pytest.skip(f"{name}: {err}")
        assert not ok and fragment in reason, (name, reason)


def test_sparse_mixer_torch_kernel_equals_reference_on_ties_and_negative_logits():
    from moe_ir.backends.torch_kernels import sparsemixer_route as kernel
    from moe_ir.ir.ops import sparsemixer_route as reference

    logits = torch.tensor([[-1.0, -1.0, -3.0, -0.5], [2.0, 2.0, 2.0, 2.0], [0.0, -1e-3, 5.0, -5.0]])
    for eps in (0.0, 0.01, 0.5):
        for a, b in zip(kernel(logits, 2, eps), reference(logits, 2, eps)):
            assert torch.equal(a, b)
    idx, w = reference(logits, 2, 0.5)
    assert idx[0].tolist() == [3, 0] and idx[1].tolist() == [0, 1]
    # Row 1: four equal logits, threshold keeps all: the first pick weighs 1/4, the second 1/3.
    torch.testing.assert_close(w[1], torch.tensor([0.25, 1 / 3]))


def test_weights_round_trip_and_hub_names():
    cfg = _config()
    block = _block(cfg, seed=1)
    spec = spec_from_hf_config(cfg)
    canonical = weights_from_hf(block, spec)
    # transformers' module: router.weight, stacked experts; loads back strictly.
    fresh = PhimoeSparseMoeBlock(cfg)
    fresh.load_state_dict(weights_to_hf(canonical, spec), strict=True)
    for name, t in block.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name
    # Hub checkpoints (Phi-3.5-MoE): block_sparse_moe.gate.weight and experts.{i}.w1/w2/w3.
    hub = weights_to_hf(canonical, spec, HFLayout.PER_EXPERT_W123, prefix="model.layers.1.block_sparse_moe.")
    assert "model.layers.1.block_sparse_moe.gate.weight" in hub
    assert "model.layers.1.block_sparse_moe.experts.6.w3.weight" in hub
    back = weights_from_hf(hub, spec, "model.layers.1.block_sparse_moe.")
    assert all(torch.equal(back[k], canonical[k]) for k in canonical)


def test_parameter_count_and_defaults_match_transformers():
    cfg = _config()
    spec = spec_from_hf_config(cfg)
    block = _block(cfg)
    graph_total = sum(math.prod(v.type.shape) for v in build_graph(spec).weights.values())
    assert analyse(spec).total_params == graph_total == sum(p.numel() for p in block.parameters())
    defaults = PhimoeConfig().to_dict()
    assert all(defaults[k] == v for k, v in FAMILY_DEFAULTS["phimoe"].items())
    # A config.json that omits the defaults imports like the full one.
    assert spec_from_hf_config({"model_type": "phimoe", "hidden_size": H, "intermediate_size": 22,
                                "num_local_experts": 7}).router == spec.router


@pytest.mark.parametrize("changes, key", [
    ({"num_experts_per_tok": 3}, "num_experts_per_tok"),
    ({"router_jitter_noise": -0.1}, "router_jitter_noise"),
])
def test_ambiguous_configs_are_refused_by_key(changes, key):
    with pytest.raises(SpecError) as err:
        spec_from_hf_config(_config(**changes))
    assert err.value.path == key


def test_input_jitter_is_a_training_note():
    _, info = describe_hf_config(_config(input_jitter_noise=0.01))
    assert any("input_jitter_noise=0.01" in note and "training" in note for note in info.notes)


@pytest.mark.parametrize("changes, path", [
    ({"experts": {"routed": 8, "width": 4, "top_k": 3}}, "experts.top_k"),
    ({"router": {"sparse_mixer": {}, "group_limit": {"groups": 2, "kept": 1}}}, "router.sparse_mixer"),
    ({"router": {"sparse_mixer": {}, "score": "sigmoid"}}, "router.score"),
    ({"balance": {"aux_free": {}}}, "balance.aux_free"),
    ({"router": {"sparse_mixer": {"jitter_eps": -1}}}, "router.sparse_mixer.jitter_eps"),
])
def test_spec_refuses_what_sparse_mixer_cannot_combine_with(changes, path):
    data = {"hidden": 8, "experts": {"routed": 8, "width": 4, "top_k": 2}, "router": {"sparse_mixer": {}}}
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value}
    with pytest.raises(SpecError) as err:
        spec_from_dict(data)
    assert err.value.path == path



# ------------------------------------------------------------------------------------------------
# the whole model: LayerNorm norms (weight and bias), attention biases, an LM head bias


def _tiny_model(**kw):
    from transformers import AutoModelForCausalLM

    cfg = _config(**{**dict(vocab_size=97, num_hidden_layers=3, num_local_experts=5, router_jitter_noise=0.3,
                            attention_bias=True, lm_head_bias=True), **kw})
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # every tensor random (norm weights around 1), so a misplaced one shows
        for name, p in hf.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2 if p.dim() > 1 else 0.1)
    return cfg, hf


@pytest.mark.parametrize("biases, window", [(True, None), (False, None), (True, 3)],
                         ids=["biases", "no-biases", "sliding-3"])
def test_model_logits_equal_transformers_on_every_backend_that_lowers_it(biases, window):
    from moe_ir.frontends.hf.model import model_spec_from_hf_config, weights_from_hf_model
    from moe_ir.model_builder import build_model_graph
    from moe_ir.model_spec import NormKind

    cfg, hf = _tiny_model(sliding_window=window) if biases else _tiny_model(attention_bias=False, lm_head_bias=False)
    spec = model_spec_from_hf_config(cfg)
    m = spec.model
    # the window binds on the 9-token prompts (a window of 3 in every layer, as transformers masks it)
    assert m.attention.sliding_window == window and m.attention.sliding_layers is None
    assert m.norm == NormKind.LAYER and m.lm_head_bias == biases and m.attention.qkv_bias == biases
    assert m.attention.out_bias == biases and spec.moe.router.sparse_mixer.jitter_eps == 0.3
    weights = weights_from_hf_model(hf, spec)
    graph_total = sum(math.prod(v.type.shape) for v in build_model_graph(spec).weights.values())
    assert graph_total == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    got = logits_on_backends(spec, weights, ids, ("torch", "onnx:portable", "onnx:ort"))
    assert_logits_equal(got, expected, atol=2e-5, label="phimoe")
    if window is not None:  # the window matters: without it the logits move
        import dataclasses

        full = dataclasses.replace(spec, model=dataclasses.replace(
            m, attention=dataclasses.replace(m.attention, sliding_window=None)))
        moved = interpret(build_model_graph(full), {"input_ids": ids}, weights)["logits"]
        assert float((moved - expected).abs().max()) > 1e-3


def test_model_generation_and_decode_equal_prefill():
    from moe_ir.frontends.hf.model import model_spec_from_hf_config, weights_from_hf_model
    from moe_ir.validate import validate_model

    cfg, hf = _tiny_model()
    spec = model_spec_from_hf_config(cfg)
    report = validate_model(spec, resolve_backends(["reference", "torch"]), tokens=7, batch=2,
                            weights=weights_from_hf_model(hf, spec), generate=3)
    assert report.ok, report.to_table()
    assert all(r.status == "ok" for r in report.results)


def test_model_defaults_and_refusals():
    from moe_ir.frontends.hf.model import MODEL_DEFAULTS, model_spec_from_hf_config

    defaults = PhimoeConfig().to_dict()
    for key, value in MODEL_DEFAULTS["phimoe"].items():
        theirs = defaults["rope_parameters"]["rope_theta"] if key == "rope_theta" else defaults.get(key)
        assert theirs == value, key
    for changes, key in (({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 6,
                                            "long_factor": [1.0] * 6}},
                          "rope_scaling.original_max_position_embeddings"),
                         ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0, "x"], "long_factor": [1.0],
                                            "original_max_position_embeddings": 4}}, "rope_scaling.short_factor")):
        data = {**_config().to_dict(), **changes}
        with pytest.raises(SpecError) as err:
            model_spec_from_hf_config(data)
        assert err.value.path == key, err.value


# ------------------------------------------------------------------------------------------------
# LongRoPE (Phi-3.5-MoE's rope_scaling): per-pair factors, short within the original context, long beyond


def _longrope(original: int, long_equal_short: bool) -> dict:
    pairs = H // 3 // 2  # head_dim of _config's 3 heads, in pairs
    short = [1.0 + 0.5 * i for i in range(pairs)]
    return {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": short, "short_mscale": 1.3,
            "long_factor": short if long_equal_short else [2.0 + 1.5 * i for i in range(pairs)], "long_mscale": 1.7,
            "original_max_position_embeddings": original}


@pytest.mark.parametrize("original, long_equal_short", [(16, False), (4, True)], ids=["short", "long-mscale"])
def test_longrope_logits_equal_transformers_on_every_backend(original, long_equal_short):
    """Within the original context (9 tokens of 16) the short factors and short_mscale; past it (9 of 4) the long
    mscale, with long factors equal to the short ones: transformers' PhimoeRotaryEmbedding recomputes its
    frequencies without the sequence length, so it rotates by the short factors at every length, while LongRoPE
    (Phi-3, and this import) takes the long factors past the original context (checked by hand below)."""
    from moe_ir.frontends.hf.model import model_spec_from_hf_config, weights_from_hf_model
    from moe_ir.model_builder import build_model_graph

    cfg, hf = _tiny_model(rope_parameters=_longrope(original, long_equal_short), max_position_embeddings=64)
    spec = model_spec_from_hf_config(cfg)
    scaling = spec.model.attention.rope_scaling
    assert scaling.kind.value == "longrope" and (scaling.short_mscale, scaling.long_mscale) == (1.3, 1.7)
    weights = weights_from_hf_model(hf, spec)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    got = logits_on_backends(spec, weights, ids, ("torch", "onnx:portable", "onnx:ort"))
    assert_logits_equal(got, expected, atol=2e-5, label=f"phimoe-longrope-{original}")
    # the mscale (or the factors) matter: plain RoPE gives other logits
    import dataclasses

    a = spec.model.attention
    plain = dataclasses.replace(spec, model=dataclasses.replace(spec.model, attention=dataclasses.replace(
        a, rope_scaling=None)))
    moved = interpret(build_model_graph(plain), {"input_ids": ids}, weights)["logits"]
    assert float((moved - expected).abs().max()) > 1e-3


def test_longrope_frequencies_equal_transformers_longrope_and_switch_per_call():
    """The long factors past the original context equal transformers' own LongRoPE frequencies at that length
    (its rope init function, as Phi-3 calls it); the decode form switches on the call's last position, and in
    the short regime decode equals prefill on every backend that lowers the model."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from moe_ir.frontends.hf.model import model_spec_from_hf_config, weights_from_hf_model
    from moe_ir.ir.model_ops import rope_cos_sin, rope_cos_sin_at, rope_inverse_frequencies
    from moe_ir.model_builder import build_model_graph
    from moe_ir.validate import validate_model

    cfg, hf = _tiny_model(rope_parameters=_longrope(6, False), max_position_embeddings=64)
    spec = model_spec_from_hf_config(cfg)
    attrs = next(n for n in build_model_graph(spec).nodes if n.op.value == "attention").attrs
    d = H // 3
    for long in (False, True):
        theirs, _ = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu", seq_len=7 if long else 6)
        torch.testing.assert_close(rope_inverse_frequencies(attrs, d, torch.float32, long=long), theirs,
                                   rtol=1e-6, atol=0)
    x = torch.zeros(1, 1, dtype=torch.float64)
    for length, mscale in ((6, 1.3), (7, 1.7)):  # prefill of 6 tokens: short; of 7: long
        cos, _ = rope_cos_sin(length, d, attrs, x)
        inv = rope_inverse_frequencies(attrs, d, torch.float64, long=length > 6)
        torch.testing.assert_close(cos, mscale * (torch.arange(length, dtype=torch.float64)[:, None] * inv).cos())
        at, _ = rope_cos_sin_at(torch.arange(length)[None], d, attrs, x)
        torch.testing.assert_close(at[0, 0], cos)
    cfg, hf = _tiny_model(rope_parameters=_longrope(16, False), max_position_embeddings=64)
    spec = model_spec_from_hf_config(cfg)  # generation's 6-token prompts and 2 new tokens stay short
    report = validate_model(spec, resolve_backends(["reference", "torch", "onnx:portable", "onnx:ort"]), tokens=6,
                            batch=2, weights=weights_from_hf_model(hf, spec), generate=2)
    assert report.ok, report.to_table()


def test_longrope_miniature_keeps_a_factor_per_pair_and_validates():
    """A miniature of a LongRoPE model (validate --shrink) takes one factor per pair of its smaller heads,
    evenly spaced over the published ones, and validates (prefill and decode) where the short and long regimes
    both occur (an original context of 4 positions)."""
    from moe_ir.model_spec import miniature_model, model_spec_from_dict
    from moe_ir.validate import validate_model

    spec = model_spec_from_dict({"model": {"vocab_size": 300, "hidden": 96, "layers": 2, "attention": {
        "kind": "gqa", "heads": 4, "kv_heads": 2, "rope_scaling": {
            "kind": "longrope", "factor": 16.0, "original_max_positions": 4, "short_mscale": 1.2, "long_mscale": 1.4,
            "short_factor": [1.0 + 0.1 * i for i in range(12)], "long_factor": [2.0 + 0.5 * i for i in range(12)]}}},
        "moe": {"experts": {"routed": 4, "width": 16, "top_k": 2}}})
    mini = miniature_model(spec, 32)
    assert mini.model.attention.rope_scaling.short_factor == pytest.approx((1.0, 1.4, 1.7, 2.1))
    report = validate_model(mini, resolve_backends(["reference", "torch", "onnx:portable", "onnx:ort"]), tokens=5,
                            batch=2, generate=2)
    assert report.ok, report.to_table()
