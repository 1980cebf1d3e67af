"""LongCat-Flash's MoE block: zero-computation (identity) experts among the routed ones (experts.identity ->
grouped_ffn identity_experts -> reference) with softmax scores, selection on scores + correction bias and the
routed scaling, against transformers' LongcatFlashMoE; its import (config keys and aliases, weights both ways,
the identity experts' unused gate_up_proj rows), the backends that lower it (ONNX Runtime's MoE op on the FFN
experts, the identity experts' share beside it) and the refusals of the others.

The whole model: model.layer_form dual_shortcut_moe (two MLA attention + dense FFN sublayers per layer beside the
shortcut-connected MoE block) and MLA's latent_scales, against transformers' LongcatFlashForCausalLM: logits on every
backend that lowers it, greedy generation on the decode graph (two caches per layer), the import of config and
checkpoint, and the shipped spec of the released configuration. transformers is the independent oracle (random
weights, tiny odd configs, no download).
"""
from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the LongCat-Flash equivalence tests need transformers "
                                                          "(the `hf` / `test` extra)")
from transformers import LongcatFlashConfig  # noqa: E402
from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashMoE  # noqa: E402

from conftest import assert_logits_equal, logits_on_backends  # noqa: E402
from moe_ir.analysis import analyse  # noqa: E402
from moe_ir.backends import get_backend, resolve_backends  # noqa: E402
from moe_ir.builder import build_graph  # noqa: E402
from moe_ir.errors import SpecError  # noqa: E402
from moe_ir.frontends.hf import FAMILY_DEFAULTS, spec_from_hf_config, weights_from_hf, weights_to_hf  # noqa: E402
from moe_ir.interpreter import interpret  # noqa: E402
from moe_ir.passes import run_pipeline  # noqa: E402
from moe_ir.spec import spec_from_dict  # noqa: E402
from moe_ir.validate import validate  # noqa: E402

H = 24


def _config(**kw) -> LongcatFlashConfig:
    # Odd sizes: 5 FFN experts + 3 identity experts, width 14, top-3.
    base = dict(hidden_size=H, expert_ffn_hidden_size=14, n_routed_experts=5, zero_expert_num=3, moe_topk=3,
                routed_scaling_factor=1.7, num_layers=2, num_attention_heads=4, kv_lora_rank=8, q_lora_rank=8,
                qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4, ffn_hidden_size=20)
    return LongcatFlashConfig(**{**base, **kw})


def _block(cfg, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    block = LongcatFlashMoE(cfg).eval()
    with torch.no_grad():
        for _, p in block.named_parameters():
            p.normal_(0.0, 1.0 / math.sqrt(H))
        block.router.e_score_correction_bias.uniform_(-0.1, 0.1)
    return block


def _sets(idx):
    return [frozenset(row.tolist()) for row in idx]


def test_layer_matches_transformers():
    cfg = _config()
    block = _block(cfg)
    spec = spec_from_hf_config(cfg)
    assert spec.experts.identity == 3 and spec.experts.routed == 5 and spec.balance.aux_free is not None
    weights = weights_from_hf(block, spec)
    x = torch.randn(2, 23, H, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = block(x)
        _, hf_w, hf_idx = block.router(x)
    ours = interpret(build_graph(spec), {"x": x}, weights)
    assert _sets(ours["expert_idx"]) == _sets(hf_idx)
    picks = ours["expert_idx"]
    assert (picks >= 5).any() and (picks < 5).any(), "the case must route to identity and FFN experts both"
    ours_w = torch.zeros(hf_idx.shape[0], 8).scatter_(1, picks, ours["weights"])
    torch.testing.assert_close(ours_w, torch.zeros_like(ours_w).scatter_(1, hf_idx, hf_w), rtol=1e-6, atol=1e-7)
    err = (ours["out"] - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), err


def test_backends_match_the_reference_or_say_why_not():
    cfg = _config()
    spec = spec_from_hf_config(cfg)
    weights = weights_from_hf(_block(cfg, seed=2), spec)
    report = validate(spec, resolve_backends(["reference", "torch", "onnx:portable", "onnx:ort"]), tokens=19, batch=2,
                      seed=4, weights=weights)
    assert report.ok, [r.to_dict() for r in report.results]
    assert all(r.status == "ok" for r in report.results)
    # ONNX Runtime's MoE op takes the FFN experts, the identity experts' share is added beside it: also when a
    # token chooses no FFN expert at all (every choice an identity expert), or one identity expert every time.
    from moe_ir.builder import ROUTER_BIAS

    for shift in ([0.0] * 5 + [10.0] * 3, [0.0] * 5 + [10.0, 0.0, 0.0]):
        shifted = dict(weights, **{ROUTER_BIAS: weights[ROUTER_BIAS] + torch.tensor(shift)})
        report = validate(spec, resolve_backends(["reference", "onnx:ort"]), tokens=19, batch=2, seed=4,
                          weights=shifted)
        assert report.ok and all(r.status == "ok" for r in report.results), [r.to_dict() for r in report.results]
    for name in ("triton", "tensorrt", "onnx:plugin", "expert_parallel:2"):
        backend = get_backend(name)
        graph = run_pipeline(build_graph(spec), backend.pipeline)
        try:
            ok, reason = backend.supports(graph)
        except Exception as err:  # noqa: BLE001 - an unavailable backend says so by raising
            pytest.skip(f"{name}: {err}")
        assert not ok and "identity experts" in reason, (name, reason)


def test_weights_round_trip_and_parameter_count():
    cfg = _config()
    block = _block(cfg, seed=1)
    spec = spec_from_hf_config(cfg)
    canonical = weights_from_hf(block, spec)
    back = weights_to_hf(canonical, spec)
    for name, t in block.state_dict().items():
        if name == "experts.gate_up_proj":  # the identity experts' rows are never read: exported as zeros
            assert torch.equal(back[name][:5], t[:5]) and not back[name][5:].any()
        else:
            assert torch.equal(back[name], t), name
    # Without identity experts the block keeps LongCat-Flash's router names, found in the source's names.
    plain_cfg = _config(zero_expert_num=0)
    plain = _block(plain_cfg, seed=1)
    plain_weights = weights_from_hf(plain, spec_from_hf_config(plain_cfg))
    assert torch.equal(plain_weights["router.weight"], plain.router.classifier.weight)
    assert torch.equal(plain_weights["router.bias"], plain.router.e_score_correction_bias)
    graph_total = sum(math.prod(v.type.shape) for v in build_graph(spec).weights.values())
    unused = 3 * 2 * 14 * H  # transformers' gate_up_proj rows of the identity experts
    block_total = sum(p.numel() for p in block.parameters()) + sum(b.numel() for b in block.buffers())
    assert analyse(spec).total_params == graph_total == block_total - unused


def test_defaults_aliases_and_refusals():
    from moe_ir.frontends.hf.model import model_spec_from_hf_config

    defaults = LongcatFlashConfig().to_dict()
    assert all(defaults[k] == v for k, v in FAMILY_DEFAULTS["longcat_flash"].items())
    via_alias = {k: v for k, v in _config().to_dict().items() if k not in ("n_routed_experts", "moe_topk")}
    via_alias.update(num_local_experts=5, num_experts_per_tok=3)
    assert spec_from_hf_config(via_alias).experts == spec_from_hf_config(_config()).experts
    with pytest.raises(SpecError) as err:
        spec_from_hf_config({**_config().to_dict(), "router_bias": True})
    assert err.value.path == "router_bias"
    for changes, path in (({"mla_scale_q_lora": False}, "mla_scale_q_lora"), ({"head_dim": 8}, "head_dim")):
        with pytest.raises(SpecError) as err:
            model_spec_from_hf_config({**_config(head_dim=4).to_dict(), **changes})
        assert err.value.path == path
    for changes, path in (({"router": {"choice": "expert"}}, "experts.identity"),
                          ({"capacity": {"factor": 1.0}}, "experts.identity"),
                          ({"experts": {"routed": 2, "identity": 1, "width": 4, "top_k": 4}}, "experts.top_k")):
        data = {"hidden": 8, "experts": {"routed": 4, "identity": 2, "width": 4, "top_k": 2}, **changes}
        with pytest.raises(SpecError) as err:
            spec_from_dict(data)
        assert err.value.path == path


# ------------------------------------------------------------------------------------------------
# the whole model


def _tiny_model(**kw):
    """A tiny odd LongCat-Flash causal LM (3 heads, ranks 12 / 10, qk 6 + 4, v 5, 5 FFN + 3 identity experts),
    every tensor random so a misplaced one shows."""
    from transformers import AutoModelForCausalLM

    cfg = _config(**{**dict(num_attention_heads=3, q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6,
                            qk_rope_head_dim=4, head_dim=4, v_head_dim=5, vocab_size=97,
                            rope_parameters={"rope_type": "default", "rope_theta": 1000.0}), **kw})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2 if p.dim() > 1 else 0.1)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.1, 0.1)
    return cfg, hf


def _identity_rows(cfg) -> int:
    """transformers' gate_up_proj rows of the identity experts (never read; not in moe-ir's weights)."""
    return cfg.num_layers * (cfg.zero_expert_num or 0) * 2 * cfg.expert_ffn_hidden_size * cfg.hidden_size


@pytest.mark.parametrize("identity", [3, 0], ids=["identity-experts", "ffn-experts-only"])
def test_model_logits_equal_transformers_on_every_backend_that_lowers_it(identity):
    from moe_ir.frontends.hf.model import model_spec_from_hf_config, weights_from_hf_model
    from moe_ir.model_builder import build_model_graph
    from moe_ir.model_spec import LayerForm

    cfg, hf = _tiny_model(zero_expert_num=identity)
    spec = model_spec_from_hf_config(cfg)
    m = spec.model
    assert m.layer_form == LayerForm.DUAL_SHORTCUT_MOE and m.layers == 2 and m.dense_width == 20
    assert m.attention.latent_scales and m.attention.layout.value == "interleaved"
    weights = weights_from_hf_model(hf, spec)
    graph = build_model_graph(spec)
    stored = sum(t.numel() for t in hf.state_dict().values())
    assert sum(math.prod(v.type.shape) for v in graph.weights.values()) == stored - _identity_rows(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    got = logits_on_backends(spec, weights, ids, ("torch", "onnx:portable", "onnx:ort"))
    assert_logits_equal(got, expected, atol=2e-5, label=f"longcat_flash{'' if identity else ' (no identity experts)'}")
    if identity:  # each part of the layer counts: without the latent scales, or the MoE shortcut, the logits move
        unscaled = interpret(build_model_graph(_replace_attention(spec, latent_scales=False)), {"input_ids": ids},
                             weights)["logits"]
        no_moe = dict(weights, **{k: torch.zeros_like(v) for k, v in weights.items() if ".moe.experts." in k})
        for other in (unscaled, interpret(graph, {"input_ids": ids}, no_moe)["logits"]):
            assert (other - expected).abs().max() > 1e-2


def _replace_attention(spec, **changes):
    import dataclasses

    m = spec.model
    return dataclasses.replace(spec, model=dataclasses.replace(m, attention=dataclasses.replace(m.attention,
                                                                                                **changes)))


def test_greedy_generation_on_the_decode_graph_equals_transformers_generate():
    """Two caches per layer (past_key_values.{2i+j}, transformers' index); left-padded prompts; both MLA cache
    layouts; every step's logits transformers'."""
    from moe_ir.frontends.hf.model import model_spec_from_hf_config, weights_from_hf_model
    from moe_ir.generation import greedy_generate
    from moe_ir.model_builder import GraphForm, build_model_graph, cache_entries

    cfg, hf = _tiny_model()
    spec = model_spec_from_hf_config(cfg)
    weights = weights_from_hf_model(hf, spec)
    prompts = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(prompts)
    mask[1, :2] = 0  # the second prompt is 4 tokens, left-padded
    with torch.no_grad():
        out = hf.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=5, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    theirs = torch.stack(out.logits, dim=1)
    for name, layout in (("torch", "expanded"), ("torch", "latent"), ("onnx:portable", "latent"),
                         ("onnx:ort", "expanded")):
        backend = get_backend(name)
        decode = run_pipeline(build_model_graph(spec, form=GraphForm.DECODE, mla_cache=layout), backend.pipeline)
        entries = cache_entries(decode)
        assert [e.layer for e in entries] == [0, 0, 1, 1, 2, 2, 3, 3]  # 2 layers x 2 attention blocks
        step = backend.prepare(decode, {k: v for k, v in weights.items() if k in decode.weights})
        result = greedy_generate(step, decode, prompts, mask, max_new_tokens=5)
        assert torch.equal(result.tokens, out.sequences[:, prompts.shape[1]:]), (name, layout)
        torch.testing.assert_close(result.logits.float(), theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()),
                                   msg=f"{name} {layout}")


def test_import_hf_model_cli_from_a_saved_checkpoint(tmp_path):
    """`moe-ir import-hf --model --weights` on the folder transformers saves gives its logits; a released
    checkpoint's multi-token-prediction tensors (model.mtp.*), which transformers skips, are skipped too."""
    from safetensors.torch import load_file, save_file

    from moe_ir.cli import main
    from moe_ir.frontends import load_model_spec
    from moe_ir.model_builder import build_model_graph
    from moe_ir.params import load_weights

    cfg, hf = _tiny_model()
    hf.save_pretrained(tmp_path / "hf")
    shard = tmp_path / "hf" / "model.safetensors"
    save_file({**load_file(shard), "model.mtp.layers.0.eh_proj.weight": torch.zeros(H, 2 * H)}, shard)
    spec_file, weights_file = tmp_path / "model.yaml", tmp_path / "model.safetensors"
    assert main(["import-hf", str(tmp_path / "hf"), "--model", "--weights", str(tmp_path / "hf"), "-o", str(spec_file),
                 "--weights-out", str(weights_file)]) == 0
    spec = load_model_spec(spec_file)
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    graph = build_model_graph(spec)
    got = interpret(graph, {"input_ids": ids}, load_weights(weights_file, graph))["logits"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)


# meituan-longcat/LongCat-Flash-Chat's config.json (the keys the importer reads), as specs/models/longcat-flash.yaml
# cites it
RELEASED = {"model_type": "longcat_flash", "attention_bias": False, "expert_ffn_hidden_size": 2048,
            "ffn_hidden_size": 12288, "hidden_size": 6144, "kv_lora_rank": 512, "max_position_embeddings": 131072,
            "mla_scale_kv_lora": True, "mla_scale_q_lora": True, "moe_topk": 12, "n_routed_experts": 512,
            "num_attention_heads": 64, "num_layers": 28, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64, "rms_norm_eps": 1e-05, "rope_theta": 10000000.0, "routed_scaling_factor": 6.0,
            "v_head_dim": 128, "vocab_size": 131072, "zero_expert_num": 256, "zero_expert_type": "identity"}


def test_released_config_is_the_shipped_spec_with_transformers_parameter_count():
    """The shipped spec is what the importer reads from the released config; its parameters are transformers'
    model of that config on the meta device (state dict: correction biases included) less the identity experts'
    gate_up_proj rows."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    from moe_ir.frontends import load_model_spec
    from moe_ir.frontends.hf.model import model_spec_from_hf_config
    from moe_ir.model_analysis import analyse_model
    from moe_ir.model_spec import model_spec_to_dict

    ours = load_model_spec(Path(__file__).resolve().parent.parent / "specs" / "models" / "longcat-flash.yaml")
    imported = model_spec_from_hf_config(RELEASED, name=ours.model.name)
    strip = lambda d: {**d, "model": {k: v for k, v in d["model"].items() if k != "source"}}  # noqa: E731
    assert strip(model_spec_to_dict(imported)) == strip(model_spec_to_dict(ours))
    config = dict(RELEASED)
    cfg = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    stored = sum(t.numel() for t in model.state_dict().values())
    analysis = analyse_model(ours)
    assert analysis.total_params == stored - _identity_rows(cfg) == 560_664_980_480
    assert round(analysis.activated_params_without_input_embedding / 1e9, 2) == 31.38  # the report's 31.3B at most


def test_layer_form_and_latent_scales_are_checked():
    from moe_ir.model_spec import model_spec_from_dict

    mla = {"kind": "mla", "heads": 2, "q_lora_rank": 4, "kv_lora_rank": 4, "qk_nope_head_dim": 2,
           "qk_rope_head_dim": 2, "v_head_dim": 2}
    base = {"vocab_size": 9, "hidden": 8, "layers": 2, "dense_width": 6, "layer_form": "dual_shortcut_moe",
            "attention": {**mla, "latent_scales": True}}
    moe = {"experts": {"routed": 4, "width": 4, "top_k": 2}}
    spec = model_spec_from_dict({"model": base, "moe": moe})
    assert spec.model.attention_blocks == 2
    # The text form shows the latent scales on the MLA nodes that have them only; the names carry the sublayer.
    from moe_ir.ir import to_text
    from moe_ir.model_builder import build_model_graph

    graph = build_model_graph(spec)
    assert {"layers.1.attn.1.w_q_a", "layers.1.attn_norm.1.weight", "layers.1.ffn.0.w_up"} <= set(graph.weights)
    assert to_text(graph).count("q_latent_scale=") == 4
    unscaled = model_spec_from_dict({"model": {**base, "attention": mla}, "moe": moe})
    assert "latent_scale" not in to_text(build_model_graph(unscaled))
    for changes, path in (({"first_dense": 1}, "model.layer_form"), ({"dense_width": None}, "model.dense_width"),
                          ({"norm_position": "post"}, "model.norm_position"),
                          ({"attention": {**mla, "q_lora_rank": None, "latent_scales": True}},
                           "model.attention.latent_scales"),
                          ({"attention": {"kind": "mha", "heads": 2, "latent_scales": True}},
                           "model.attention.latent_scales")):
        with pytest.raises(SpecError) as err:
            model_spec_from_dict({"model": {**base, **changes}, "moe": moe})
        assert err.value.path == path, (changes, err.value)


def test_shipped_spec_validates_shrunk(capsys):
    """`moe-ir validate specs/models/longcat-flash.yaml --shrink 32` on the reference, torch and both ONNX flavours:
    logits and every MoE layer's routing agree (shortcut layers, latent scales, identity experts kept)."""
    import json
    from pathlib import Path

    from moe_ir.cli import main

    spec_file = Path(__file__).resolve().parent.parent / "specs" / "models" / "longcat-flash.yaml"
    rc = main(["validate", str(spec_file), "--shrink", "32", "--tokens", "6", "--backends", "reference", "torch",
               "onnx:portable", "onnx:ort", "--generate", "0", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["ok"], out
    assert {r["backend"] for r in out["results"] if r["status"] == "ok"} == {"reference", "torch", "onnx:portable",
                                                                             "onnx:ort"}


def test_export_hf_loads_in_transformers_with_moe_ir_logits(tmp_path):
    """export-hf of the imported tiny model (stacked experts, zero rows for the identity experts): transformers
    loads every tensor, its logits equal the reference's, and the folder's config imports as the same spec; a
    standard-layer spec is not a longcat_flash model."""
    import json

    from transformers import AutoModelForCausalLM

    from moe_ir.frontends.hf.export import export_hf_checkpoint, hf_config_from_model_spec
    from moe_ir.frontends.hf.model import model_spec_from_hf_config, weights_from_hf_model
    from moe_ir.model_builder import build_model_graph
    from moe_ir.model_spec import LayerForm, model_spec_to_dict

    cfg, hf = _tiny_model()
    spec = model_spec_from_hf_config(cfg)
    weights = weights_from_hf_model(hf, spec)
    assert export_hf_checkpoint(spec, weights, tmp_path / "out")[0] == "longcat_flash"
    back, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True,
                                                      attn_implementation="eager", output_loading_info=True,
                                                      dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = back.eval()(input_ids=ids).logits
    ours = interpret(build_model_graph(spec), {"input_ids": ids}, weights)["logits"]
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=2e-5)
    again = model_spec_from_hf_config(json.loads((tmp_path / "out" / "config.json").read_text()), name=spec.name)
    strip = lambda d: {**d, "model": {k: v for k, v in d["model"].items() if k != "source"}}  # noqa: E731
    assert strip(model_spec_to_dict(again)) == strip(model_spec_to_dict(spec))
    import dataclasses

    standard = dataclasses.replace(spec, model=dataclasses.replace(spec.model, layer_form=LayerForm.STANDARD))
    with pytest.raises(SpecError, match="two attention blocks"):
        hf_config_from_model_spec(standard, "longcat_flash")


def test_generated_model_py_gives_transformers_logits(tmp_path):
    """`moe-ir build --backend torch` of the model: the standalone model.py (the kernels copied, torch only) with
    its weights gives transformers' logits; the latent scales are in its MLA calls."""
    import importlib.util

    import yaml
    from safetensors.torch import load_file, save_file

    from moe_ir.cli import main
    from moe_ir.frontends.hf.model import model_spec_from_hf_config, weights_from_hf_model
    from moe_ir.model_spec import model_spec_to_dict

    cfg, hf = _tiny_model()
    spec = model_spec_from_hf_config(cfg)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(model_spec_to_dict(spec)))
    save_file({k: v.contiguous() for k, v in weights_from_hf_model(hf, spec).items()}, str(tmp_path / "w.safetensors"))
    assert main(["build", str(tmp_path / "spec.yaml"), "--backend", "torch", "-o", str(tmp_path / "out"), "--weights",
                 str(tmp_path / "w.safetensors")]) == 0
    source = (tmp_path / "out" / "model.py").read_text()
    assert f"({math.sqrt(H / 12)!r}, {math.sqrt(H / 10)!r}, )" in source
    loader = importlib.util.spec_from_file_location("generated_longcat", tmp_path / "out" / "model.py")
    generated = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(generated)
    model = generated.DecoderModel()
    model.load_state_dict(load_file(str(tmp_path / "out" / "weights.safetensors")), strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got, routing, _ = model.eval()(ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1)) and "layers.1.expert_idx" in routing
