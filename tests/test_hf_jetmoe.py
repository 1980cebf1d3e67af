"""JetMoE: mixture of attention heads (attention kind moa -> moa_attention / cached_moa_attention -> reference, torch
kernels, ONNX) and the MoE block's output bias (experts.output_bias -> add_bias), against transformers' JetMoe
modules: the MLP block, whole-model logits on every backend that lowers them, greedy generation on the decode
graph, the import of config keys and weights, and the refusals of the backends that cannot lower it.

transformers is the independent oracle (random weights, tiny odd configs built here, no download).
"""
from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the JetMoE equivalence tests need transformers "
                                                          "(the `hf` / `test` extra)")
from transformers import JetMoeConfig  # noqa: E402
from transformers.models.jetmoe.modeling_jetmoe import JetMoeMoE  # noqa: E402

from conftest import assert_greedy_equals_generate, assert_logits_equal, logits_on_backends  # noqa: E402
from moe_ir.backends import get_backend  # noqa: E402
from moe_ir.builder import build_graph  # noqa: E402
from moe_ir.errors import SpecError  # noqa: E402
from moe_ir.frontends.hf import spec_from_hf_config, weights_from_hf  # noqa: E402
from moe_ir.interpreter import interpret  # noqa: E402
from moe_ir.passes import run_pipeline  # noqa: E402

H = 36


def _config(**kw) -> JetMoeConfig:
    # Odd sizes: 5 experts (attention and MLP), top-2, 3 kv heads of 6 dims (6 query heads), width 22.
    base = dict(vocab_size=97, hidden_size=H, intermediate_size=22, num_local_experts=5, num_experts_per_tok=2,
                num_key_value_heads=3, kv_channels=6, num_hidden_layers=3, tie_word_embeddings=False)
    cfg = JetMoeConfig(**{**base, **kw})
    cfg._attn_implementation = "eager"
    return cfg


def _randomise(module: torch.nn.Module) -> None:
    """Every tensor random (norms around 1, biases small but nonzero), so a misplaced one shows."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2 if p.dim() > 1 else 0.1)


def _tiny_model(**kw):
    from transformers import AutoModelForCausalLM

    cfg = _config(**kw)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).float().eval()
    _randomise(hf)
    return cfg, hf


def test_moe_block_with_its_output_bias_matches_transformers():
    cfg = _config()
    torch.manual_seed(3)
    block = JetMoeMoE(cfg).eval()
    _randomise(block)
    spec = spec_from_hf_config(cfg)
    e = spec.experts
    assert (e.routed, e.top_k, e.width, e.output_bias) == (5, 2, 22, True)
    assert spec.router.normalize and spec.router.score.value == "softmax"
    weights = weights_from_hf(block, spec)
    x = torch.randn(2, 11, H, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = block(x)
    got = interpret(build_graph(spec), {"x": x}, weights)["out"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # The bias is added once per token: without it the output moves by exactly the bias.
    zero = {k: (torch.zeros_like(v) if k == "output_bias" else v) for k, v in weights.items()}
    moved = interpret(build_graph(spec), {"x": x}, zero)["out"]
    torch.testing.assert_close(got - moved, weights["output_bias"].expand_as(got), rtol=1e-5, atol=1e-6)


# Two tiny odd layouts: 5 experts top-2 with 3 kv heads (rms_norm_eps 1e-5 for the final norm only, as
# transformers builds it), and 7 experts top-3 with 1 kv head, tied embeddings.
LAYOUTS = {"e5k2kv3": dict(rms_norm_eps=1e-5),
           "e7k3kv1": dict(num_local_experts=7, num_experts_per_tok=3, num_key_value_heads=1, kv_channels=10,
                           tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 500.0})}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_model_logits_equal_transformers_on_every_backend_that_lowers_it(layout):
    from moe_ir.frontends.hf.model import model_spec_from_hf_config, weights_from_hf_model
    from moe_ir.model_builder import build_model_graph

    cfg, hf = _tiny_model(**LAYOUTS[layout])
    spec = model_spec_from_hf_config(cfg)
    m, a = spec.model, spec.model.attention
    assert (a.kind.value, a.experts, a.top_k, a.kv_heads, a.head_dim) == (
        "moa", cfg.num_local_experts, cfg.num_experts_per_tok, cfg.num_key_value_heads, cfg.kv_channels)
    assert a.heads == cfg.num_attention_heads and a.out_bias and not a.qkv_bias
    assert m.moe_layers == tuple(range(cfg.num_hidden_layers)) and not m.dense_layers  # every layer MoE
    assert m.rms_norm_eps == 1e-6 and m.final_norm_eps == (1e-5 if cfg.rms_norm_eps != 1e-6 else None)
    weights = weights_from_hf_model(hf, spec)
    graph_total = sum(math.prod(v.type.shape) for v in build_model_graph(spec).weights.values())
    assert graph_total == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    got = logits_on_backends(spec, weights, ids, ("torch", "onnx:portable", "onnx:ort"))
    assert_logits_equal(got, expected, atol=2e-5, label="jetmoe")
    # The routing matters: the same attention experts for every token move the logits.
    fixed = {k: (torch.zeros_like(v) if k.endswith("attn.router.weight") else v) for k, v in weights.items()}
    moved = interpret(build_model_graph(spec), {"input_ids": ids}, fixed)["logits"]
    assert (moved - expected).abs().max() > 1e-2


def test_greedy_generation_on_the_decode_graph_equals_transformers():
    """Left-padded prompts: each backend's greedy tokens and per-step logits of the decode graph (shared K/V
    cached, the attention experts chosen per new token) equal transformers' generate."""
    from moe_ir.frontends.hf.model import model_spec_from_hf_config, weights_from_hf_model

    cfg, hf = _tiny_model(**LAYOUTS["e5k2kv3"])
    spec = model_spec_from_hf_config(cfg)
    weights = weights_from_hf_model(hf, spec)
    prompts = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(prompts)
    mask[1, :2] = 0
    assert_greedy_equals_generate(hf, spec, weights, prompts, mask, ("reference", "torch", "onnx:portable", "onnx:ort"))


def test_backends_that_cannot_lower_it_say_why():
    from moe_ir.frontends.hf.model import model_spec_from_hf_config
    from moe_ir.model_builder import build_model_graph

    spec = model_spec_from_hf_config(_config())
    for name, fragment in (("triton", "one MoE layer per graph"), ("onnx:plugin", "portable and ort flavours only"),
                           ("expert_parallel:2", "one MoE layer"), ("tensorrt", "i64")):
        backend = get_backend(name)
        try:
            ok, reason = backend.supports(run_pipeline(build_model_graph(spec), backend.pipeline))
        except Exception as err:  # noqa: BLE001 - an unavailable backend says so by raising
            pytest.skip(f"{name}: {err}")
        assert not ok and fragment in reason, (name, reason)
    # The MoE layer alone: the Triton backend has no kernel for the output bias beside its fused layer.
    layer = spec_from_hf_config(_config())
    backend = get_backend("triton")
    ok, reason = backend.supports(run_pipeline(build_graph(layer), backend.pipeline))
    assert not ok and "add_bias" in reason


def test_import_hf_model_cli_with_weights(tmp_path):
    """`moe-ir import-hf --model --weights` on the folder transformers saved gives its logits."""
    from moe_ir.cli import main
    from moe_ir.frontends import load_model_spec
    from moe_ir.model_builder import build_model_graph
    from moe_ir.params import load_weights

    cfg, hf = _tiny_model()
    hf.save_pretrained(tmp_path / "hf")
    spec_file, weights_file = tmp_path / "model.yaml", tmp_path / "model.safetensors"
    assert main(["import-hf", str(tmp_path / "hf"), "--model", "--weights", str(tmp_path / "hf"), "-o", str(spec_file),
                 "--weights-out", str(weights_file)]) == 0
    spec = load_model_spec(spec_file)
    assert spec.model.attention.kind.value == "moa" and spec.moe.experts.output_bias
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    graph = build_model_graph(spec)
    got = interpret(graph, {"input_ids": ids}, load_weights(weights_file, graph))["logits"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)


def test_defaults_and_refusals():
    from moe_ir.frontends.hf.model import MODEL_DEFAULTS, model_spec_from_hf_config
    from moe_ir.frontends.hf.config import FAMILY_DEFAULTS
    from moe_ir.model_spec import model_spec_from_dict

    defaults = JetMoeConfig().to_dict()
    for key, value in {**FAMILY_DEFAULTS["jetmoe"], **MODEL_DEFAULTS["jetmoe"]}.items():
        theirs = defaults["rope_parameters"]["rope_theta"] if key == "rope_theta" else defaults[key]
        assert theirs == value, key
    # {"model_type": "jetmoe"} alone is the class defaults.
    plain = model_spec_from_hf_config({"model_type": "jetmoe"}, name="m")
    assert plain.model.attention.heads == JetMoeConfig().num_attention_heads == 32
    cfg = _config().to_dict()
    with pytest.raises(SpecError) as err:
        model_spec_from_hf_config({**cfg, "num_attention_heads": 5})
    assert err.value.path == "num_attention_heads"

    base = {"vocab_size": 9, "hidden": 8, "layers": 1,
            "attention": {"kind": "moa", "heads": 4, "kv_heads": 2, "experts": 3, "top_k": 2, "head_dim": 2}}
    moe = {"experts": {"routed": 4, "width": 4, "top_k": 2}}
    model_spec_from_dict({"model": base, "moe": moe})
    for change, path in ((dict(heads=6), "heads"), (dict(top_k=4), "top_k"), (dict(sliding_window=3), "sliding_window"),
                         (dict(qkv_bias=True), "qkv_bias"), (dict(experts=None), "experts"),
                         (dict(rotary_dim=1), "rotary_dim"),
                         (dict(kind="gqa"), "experts")):
        with pytest.raises(SpecError) as err:
            model_spec_from_dict({"model": {**base, "attention": {**base["attention"], **change}}, "moe": moe})
        assert err.value.path == f"model.attention.{path}", (change, err.value.path)
    # Quantized attention weights are refused rather than left in float silently.
    with pytest.raises(SpecError) as err:
        model_spec_from_dict({"model": base, "moe": moe, "quantization": {"format": "int8",
                                                                          "weights": {"attention": True}}})
    assert err.value.path == "quantization.weights.attention"


def test_generated_model_py_equals_the_eager_backend(tmp_path):
    """`moe-ir build --backend torch` writes a standalone model.py with the MoA kernels copied in; its logits are
    the eager backend's, bit for bit."""
    from safetensors.torch import load_file

    from conftest import import_file
    from moe_ir.frontends.hf.model import model_spec_from_hf_config, weights_from_hf_model
    from moe_ir.model_builder import build_model_graph

    cfg, hf = _tiny_model()
    spec = model_spec_from_hf_config(cfg)
    weights = weights_from_hf_model(hf, spec)
    backend = get_backend("torch")
    graph = run_pipeline(build_model_graph(spec), backend.pipeline)
    backend.build(spec, graph, {k: v for k, v in weights.items() if k in graph.weights}, tmp_path / "jm")
    source = (tmp_path / "jm" / "model.py").read_text()
    assert "def moa_attention" in source and "def add_bias" in source and "moe_ir" not in source.split('"""', 2)[2]
    generated = import_file(tmp_path / "jm" / "model.py", "generated_jetmoe").DecoderModel()
    generated.load_state_dict(load_file(str(tmp_path / "jm" / "weights.safetensors")), strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # as the backend runs: inference kernels (the sparse un-permute) on both sides
        logits = generated(ids)[0]
    eager = backend.prepare(graph, {k: v for k, v in weights.items() if k in graph.weights})(ids)["logits"]
    assert torch.equal(logits, eager)


def test_onnxruntime_genai_generates_transformers_tokens_of_a_saved_checkpoint(tmp_path, capsys):
    """`moe-ir build --backend onnx --decoder` of a saved JetMoE folder: onnxruntime-genai's generator gives
    transformers' greedy tokens."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install "
                                                         "'moe-ir[onnx]')")
    import json

    import numpy as np

    from moe_ir.cli import main

    cfg, hf = _tiny_model()
    hf.config.eos_token_id = hf.generation_config.eos_token_id = 96
    hf.config.bos_token_id, hf.config.pad_token_id = 1, 0
    hf.save_pretrained(tmp_path / "ckpt")
    assert main(["build", str(tmp_path / "ckpt"), "--backend", "onnx", "--decoder", "-o", str(tmp_path / "out"),
                 "--json"]) == 0
    capsys.readouterr()
    config = json.loads((tmp_path / "out" / "genai_config.json").read_text())["model"]["decoder"]
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_size"]) == (6, 3, 6)
    prompts = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=5, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[:, 7:]
    model = og.Model(str(tmp_path / "out"))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=12, do_sample=False, batch_size=2)
    generator = og.Generator(model, params)
    generator.append_tokens(prompts.numpy().astype(np.int32))
    steps = []
    while not generator.is_done():
        generator.generate_next_token()
        steps.append(generator.get_next_tokens().tolist())
    for row, want in zip(np.array(steps).T.tolist(), expected.tolist()):
        stop = row.index(96) + 1 if 96 in row else len(row)   # GenAI stops a row at eos, transformers here does not
        assert row[:stop] == want[:stop]


def test_activated_parameters_and_flops_count_the_chosen_attention_experts():
    """A token reads top_k of the experts' stacked query/output projections (and top_k MLP experts); the counts
    are computed here from the config, independently of the graph."""
    from moe_ir.frontends.hf.model import model_spec_from_hf_config
    from moe_ir.model_analysis import analyse_model

    cfg = _config()
    spec = model_spec_from_hf_config(cfg)
    r = analyse_model(spec)
    h, e, k, kvd, f = cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok, \
        cfg.num_key_value_heads * cfg.kv_channels, cfg.intermediate_size
    attention = e * h + 2 * kvd * h + 2 * e * kvd * h + h     # router, kv_proj, input/output_linear, bias
    moe = e * h + e * 3 * f * h + h                           # router, experts, output bias
    layer = attention + moe + 2 * h
    assert r.total_params == cfg.vocab_size * h * 2 + h + cfg.num_hidden_layers * layer
    activated = layer - (e - k) * 2 * kvd * h - (e - k) * 3 * f * h
    assert r.layers[0].activated_params == activated
    assert r.layers[0].flops_per_token == 2 * (e * h + 2 * kvd * h + k * 2 * kvd * h) + 2 * (e * h + k * 3 * f * h)


def test_export_hf_writes_a_folder_transformers_loads_with_the_same_logits(tmp_path):
    """export-hf of the imported spec and weights: JetMoeForCausalLM.from_pretrained on the folder gives the
    original model's logits, and import-hf of it gives the spec back."""
    from transformers import JetMoeForCausalLM

    from moe_ir.frontends.hf.export import export_hf_checkpoint
    from moe_ir.frontends.hf.model import model_spec_from_hf_config, weights_from_hf_model
    from moe_ir.model_spec import model_spec_to_dict

    cfg, hf = _tiny_model(**LAYOUTS["e5k2kv3"])
    spec = model_spec_from_hf_config(cfg)
    family, _ = export_hf_checkpoint(spec, weights_from_hf_model(hf, spec), tmp_path / "out")
    assert family == "jetmoe"
    back = JetMoeForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    theirs, ours = hf.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the loaded model may pick another attention kernel (sdpa): not bit for bit
        torch.testing.assert_close(back(input_ids=ids).logits, hf(input_ids=ids).logits, rtol=1e-5, atol=2e-5)
    again = model_spec_from_hf_config(back.config, name=spec.name)
    assert model_spec_to_dict(again)["model"] | {"source": ""} == model_spec_to_dict(spec)["model"] | {"source": ""}


@pytest.mark.parametrize("per_slot", [False, True], ids=["token-rows", "slot-rows"])
def test_expert_linear_grouped_and_stacked_forms_equal_the_gathered_matrices(per_slot):
    """The MoA projections' kernel: one GEMM per expert on its rows (eager inference) and the routing-independent
    form over the stacked experts (autograd, compile) both equal each slot's own matrix product, written here
    with the chosen matrices gathered; an expert no token chose (6) is skipped."""
    from moe_ir.backends.torch_kernels import expert_linear

    g = torch.Generator().manual_seed(0)
    t, k, e, i, o = 11, 3, 7, 5, 4
    idx = torch.stack([torch.randperm(e - 1, generator=g)[:k] for _ in range(t)])
    w = torch.randn(e, o, i, generator=g)
    x = torch.randn(t, k, i, generator=g) if per_slot else torch.randn(t, i, generator=g)
    rows = x if per_slot else x[:, None].expand(t, k, i)
    want = torch.einsum("tjoi,tji->tjo", w[idx], rows)
    with torch.no_grad():
        grouped = expert_linear(x, idx, w)
    stacked = expert_linear(x, idx, w.clone().requires_grad_())
    torch.testing.assert_close(grouped, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stacked.detach(), want, rtol=1e-5, atol=1e-5)


def test_moe_layer_with_output_bias_on_the_layer_backends():
    """The MoE layer alone (its output bias an add_bias node after the combine): every layer backend that runs it
    agrees with the reference, routing included."""
    from moe_ir.backends import resolve_backends
    from moe_ir.validate import validate

    spec = spec_from_hf_config(_config())
    report = validate(spec, resolve_backends(["reference", "torch", "onnx:portable", "onnx:ort", "onnx:plugin",
                                              "expert_parallel:2"]), tokens=7, batch=2, seed=2)
    assert report.ok, report.to_table()
    assert all(r.status == "ok" and r.routing.flips == 0 for r in report.results), report.to_table()


def test_validation_compares_the_attention_experts_routing_too():
    """validate_model's routing record holds both routers of each layer (layers.i.attn.expert_idx beside
    layers.i.expert_idx): 2 x 7 tokens x 3 layers x 2 routers agree on every backend, prefill and decode."""
    from moe_ir.backends import resolve_backends
    from moe_ir.frontends.hf.model import model_spec_from_hf_config, weights_from_hf_model
    from moe_ir.model_builder import build_model_graph
    from moe_ir.validate import validate_model

    cfg, hf = _tiny_model()
    spec = model_spec_from_hf_config(cfg)
    outputs = build_model_graph(spec, routing=True).outputs
    assert {"layers.2.attn.expert_idx", "layers.2.attn.weights", "layers.2.expert_idx"} <= set(outputs)
    report = validate_model(spec, resolve_backends(["reference", "torch", "onnx:portable", "onnx:ort"]), tokens=7,
                            batch=2, weights=weights_from_hf_model(hf, spec), generate=2)
    assert report.ok, report.to_table()
    assert all(r.status == "ok" and r.routing.units == 2 * 7 * 3 * 2 and r.routing.flips == 0
               for r in report.results), report.to_table()
