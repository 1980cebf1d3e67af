"""The ONNX decoder (a decode graph lowered to one file with a KV cache, GenAI's names and layout), run by
moe-ir's ONNX Runtime runner as a generation step, against the float64 reference interpreter.

Two oracles, both independent of the ONNX lowering: the reference's greedy tokens on left-padded prompts
(moe_ir.generation.reference_step on the decode graph) and the reference prefill graph's logits at every
position, which each ONNX decode step's logits must equal (the check that catches cache and RoPE-offset bugs).
"""
from __future__ import annotations

import json

import onnx
import pytest
import torch

from moe_ir.backends.onnx.flavours import lower
from moe_ir.backends.onnx.writer import embedded_model
from moe_ir.backends.registry import get_backend
from moe_ir.cli import main
from moe_ir.cli_generate import left_padded
from moe_ir.errors import BackendError
from moe_ir.frontends import load_model_spec_text
from moe_ir.generation import KVCache, decode_inputs, greedy_generate, reference_step
from moe_ir.interpreter import interpret
from moe_ir.model_builder import GraphForm, MLACacheLayout, build_model_graph, cache_entries
from moe_ir.params import init_weights
from moe_ir.passes import run_pipeline
from moe_ir.validate import left_padded_prompts

from test_generation import random_weights, tiny_spec

VOCAB = 61
NEW_TOKENS = 4
# (attention kind, MLA cache layout): MHA, GQA (both q/k norms, both RoPE layouts), MLA in both layouts.
CASES = [("mha-bias", None), ("gqa-head-norm", None), ("gqa-full-norm-interleaved", None),
         ("mla", MLACacheLayout.EXPANDED), ("mla-qlora-half", MLACacheLayout.LATENT),
         ("gqa-yarn-partial", None), ("mla-yarn", MLACacheLayout.LATENT), ("gqa-window-sinks", None)]


def decode_graph(spec, layout=None, backend=None):
    graph = build_model_graph(spec, form=GraphForm.DECODE, mla_cache=layout or MLACacheLayout.EXPANDED)
    return run_pipeline(graph, backend.pipeline) if backend is not None else graph


def onnx_step(spec, weights, flavour="portable", layout=None):
    backend = get_backend(f"onnx:{flavour}")
    graph = decode_graph(spec, layout, backend)
    ok, reason = backend.supports(graph)
    assert ok, reason
    return backend.prepare(graph, {k: v for k, v in weights.items() if k in graph.weights}), graph


@pytest.mark.parametrize("kind,layout", CASES, ids=[f"{k}-{lay or 'kv'}" for k, lay in CASES])
def test_decode_steps_equal_prefill_and_greedy_tokens_equal_reference(kind, layout):
    spec = tiny_spec(kind)
    weights = random_weights(build_model_graph(spec))
    step, graph = onnx_step(spec, weights, layout=layout)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))

    # Decode vs prefill: a prefill of 5 tokens, then one token per call, each call's logits against the
    # reference prefill of all 9 tokens at the same positions.
    cache = KVCache.empty(graph, 2)
    got = []
    for start, end in [(0, 5)] + [(t, t + 1) for t in range(5, 9)]:
        out = step(decode_inputs(ids[:, start:end], torch.ones(2, end, dtype=torch.int64), cache))
        cache.update(out, end - start)
        got.append(out["logits"])
    assert cache.length == 9
    prefill = interpret(build_model_graph(spec), {"input_ids": ids}, weights, dtype=torch.float64)["logits"]
    torch.testing.assert_close(torch.cat(got, dim=1).double(), prefill, rtol=1e-4, atol=1e-4)

    # Greedy on left-padded prompts of different lengths: the same tokens as the reference.
    prompts, mask = left_padded_prompts(ids[:, :6].repeat(2, 1)[:3])
    ref_graph = decode_graph(spec, layout)
    expected = greedy_generate(reference_step(ref_graph, weights), ref_graph, prompts, mask, max_new_tokens=NEW_TOKENS)
    run = greedy_generate(step, graph, prompts, mask, max_new_tokens=NEW_TOKENS)
    assert torch.equal(run.tokens, expected.tokens)
    torch.testing.assert_close(run.logits, expected.logits, rtol=1e-4, atol=1e-4)


def test_one_file_serves_prefill_and_decode_with_genai_names_and_dynamic_dims():
    spec = tiny_spec("gqa-head-norm")
    backend = get_backend("onnx:portable")
    graph = decode_graph(spec, backend=backend)
    weights = random_weights(build_model_graph(spec))
    model = embedded_model(lower(graph, {k: v for k, v in weights.items() if k in graph.weights}, "portable"))
    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name: o for o in model.graph.output}
    layers = spec.model.layers
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{s}" for i in range(layers) for s in ("key", "value")]
    assert list(outputs) == ["logits"] + [f"present.{i}.{s}" for i in range(layers) for s in ("key", "value")]

    def dims(info):
        return [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]

    assert dims(inputs["past_key_values.0.key"]) == ["B", 2, "P", 6]     # [batch, kv_heads, past, head_dim]
    assert dims(outputs["present.1.value"]) == ["B", 2, "P+S", 6]
    assert dims(inputs["attention_mask"]) == ["B", "P+S"]
    assert inputs["past_key_values.0.key"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    onnx.checker.check_model(model)


def test_ort_flavour_decoder_generates_the_reference_tokens():
    spec = tiny_spec("gqa-full-norm-interleaved")
    weights = random_weights(build_model_graph(spec))
    step, graph = onnx_step(spec, weights, flavour="ort")
    prompts, mask = left_padded_prompts(torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2)))
    ref_graph = decode_graph(spec)
    expected = greedy_generate(reference_step(ref_graph, weights), ref_graph, prompts, mask, max_new_tokens=NEW_TOKENS)
    run = greedy_generate(step, graph, prompts, mask, max_new_tokens=NEW_TOKENS)
    assert torch.equal(run.tokens, expected.tokens)
    torch.testing.assert_close(run.logits, expected.logits, rtol=1e-4, atol=1e-4)


def test_latent_cache_holds_the_latent_and_the_shared_rotary_key():
    spec = tiny_spec("mla")
    weights = random_weights(build_model_graph(spec))
    step, graph = onnx_step(spec, weights, layout=MLACacheLayout.LATENT)
    entries = cache_entries(graph)
    assert [(e.past, e.heads, e.dim) for e in entries[:2]] == [("past_key_values.0.c_kv", 1, 10),
                                                               ("past_key_values.0.k_rope", 1, 4)]
    ids = torch.randint(0, VOCAB, (1, 3), generator=torch.Generator().manual_seed(1))
    out = step(decode_inputs(ids, torch.ones(1, 3, dtype=torch.int64), KVCache.empty(graph, 1)))
    ref = interpret(decode_graph(spec, MLACacheLayout.LATENT), decode_inputs(ids, torch.ones(1, 3, dtype=torch.int64),
                    KVCache.empty(graph, 1, dtype=torch.float64)), weights, dtype=torch.float64)
    for e in entries:
        torch.testing.assert_close(out[e.present].double(), ref[e.present], rtol=1e-4, atol=1e-5)


def test_wrong_cache_is_one_clear_error():
    spec = tiny_spec("gqa-head-norm")
    weights = random_weights(build_model_graph(spec))
    step, graph = onnx_step(spec, weights)
    ids = torch.randint(0, VOCAB, (1, 3), generator=torch.Generator().manual_seed(1))
    cache = KVCache.empty(graph, 1)
    out = step(decode_inputs(ids, torch.ones(1, 3, dtype=torch.int64), cache))
    cache.update(out, 3)
    inputs = decode_inputs(ids[:, :1], torch.ones(1, 4, dtype=torch.int64), cache)
    # One layer's cache a token short: the lengths disagree.
    short = dict(inputs, **{"past_key_values.1.value": inputs["past_key_values.1.value"][:, :, :2]})
    with pytest.raises(BackendError, match="different lengths"):
        step(short)
    # A cache of another layout (heads and head_dim swapped).
    other = dict(inputs, **{"past_key_values.0.key": inputs["past_key_values.0.key"].transpose(1, 3)})
    with pytest.raises(BackendError, match=r"past_key_values\.0\.key is \[1, 6, 3, 2\]"):
        step(other)
    # The mask does not cover past + new tokens.
    with pytest.raises(BackendError, match="attention_mask covers 5 tokens, but the past cache holds 3"):
        step(dict(inputs, attention_mask=torch.ones(1, 5, dtype=torch.int64)))


# ------------------------------------------------------------------------------------------------
# the command line: generate from a built folder, validate's generation checks, bad folders


def _built(tmp_path, kind="gqa-head-norm", *extra):
    from conftest import tiny_model_yaml
    from test_generation import ATTENTION

    text = tiny_model_yaml(kind, ATTENTION[kind])
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "m.yaml").write_text(text)
    out = tmp_path / "out"
    assert main(["build", str(tmp_path / "m.yaml"), "--backend", "onnx", "--decoder", "-o", str(out), *extra]) == 0
    return out, tiny_spec(kind)


def test_generate_from_a_built_decoder_folder(tmp_path, capsys):
    out, spec = _built(tmp_path, "mla", "--mla-cache", "latent", "--flavour", "ort")
    (tmp_path / "prompts.txt").write_text("5 17 3 60 9\n8 2\n")
    capsys.readouterr()
    assert main(["generate", str(out), "--backend", "onnx:ort", "--prompt-file", str(tmp_path / "prompts.txt"),
                 "--max-new-tokens", "5", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["tokens"]
    graph = decode_graph(spec, MLACacheLayout.LATENT)
    weights = init_weights(build_model_graph(spec), 0)   # build's seeded init
    prompts, mask = left_padded([[5, 17, 3, 60, 9], [8, 2]])
    expected = greedy_generate(reference_step(graph, weights), graph, prompts, mask, max_new_tokens=5)
    assert got == expected.tokens.tolist()
    # The folder's flavour is fixed at build time; torch runs the spec, not the folder.
    assert main(["generate", str(out), "--backend", "onnx:portable", "--prompt-ids", "1 2"]) == 2
    assert "was built with --flavour ort; use --backend onnx:ort, or rebuild it with --flavour portable" in capsys.readouterr().err
    assert main(["generate", str(out), "--backend", "torch", "--prompt-ids", "1 2"]) == 2
    assert "holds an ONNX decoder" in capsys.readouterr().err


def test_generate_on_a_spec_through_the_onnx_flavours(tmp_path, capsys):
    from conftest import tiny_model_yaml
    from test_generation import ATTENTION

    (tmp_path / "m.yaml").write_text(tiny_model_yaml("gqa", ATTENTION["gqa-full-norm-interleaved"]))
    runs = {}
    for backend in ("torch", "onnx:portable", "onnx:ort"):
        assert main(["generate", str(tmp_path / "m.yaml"), "--backend", backend, "--prompt-ids", "4 9 33 2",
                     "--max-new-tokens", "6", "--json"]) == 0
        runs[backend] = json.loads(capsys.readouterr().out)["tokens"]
    spec = load_model_spec_text(tiny_model_yaml("gqa", ATTENTION["gqa-full-norm-interleaved"]))
    graph = decode_graph(spec)
    expected = greedy_generate(reference_step(graph, init_weights(build_model_graph(spec), 0)), graph,
                               torch.tensor([[4, 9, 33, 2]]), max_new_tokens=6)
    assert runs == {b: expected.tokens.tolist() for b in runs}


def test_validate_checks_generation_on_both_onnx_flavours(tmp_path, capsys):
    from conftest import tiny_model_yaml
    from test_generation import ATTENTION

    (tmp_path / "m.yaml").write_text(tiny_model_yaml("mla", ATTENTION["mla-qlora-half"], layers=1, first_dense=0))
    assert main(["validate", str(tmp_path / "m.yaml"), "--backends", "onnx:portable", "onnx:ort", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [g["mla_cache"] for g in report["generation"]] == ["expanded", "latent"]
    for gen in report["generation"]:
        assert [(r["backend"], r["status"]) for r in gen["results"]] == [("onnx:portable", "ok"), ("onnx:ort", "ok")]
        for r in gen["results"]:
            assert r["agree"] == r["tokens"] == 8 and r["decode"]["outputs"]["logits"]["max_abs"] < 1e-4


def test_missing_or_escaping_external_data_is_one_clear_error(tmp_path, capsys):
    out, _ = _built(tmp_path, "gqa-head-norm", "--external-data")
    data = out / "model.onnx.data"
    data.rename(tmp_path / "elsewhere.data")
    assert main(["generate", str(out), "--backend", "onnx:portable", "--prompt-ids", "1 2"]) == 1
    assert "model.onnx.data does not exist" in capsys.readouterr().err
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../elsewhere.data"
    onnx.save(model, str(out / "model.onnx"))
    assert main(["generate", str(out), "--backend", "onnx:portable", "--prompt-ids", "1 2"]) == 1
    assert "location '../elsewhere.data' is refused because it contains '..'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# the ort flavour's decoder: ONNX Runtime's contrib kernels where they fit

GQA16 = "{kind: gqa, heads: 4, kv_heads: 2, head_dim: 16, qk_norm: head, rope_theta: 500.0}"


def test_ort_decoder_uses_group_query_attention_and_skip_norms(tmp_path, capsys):
    from conftest import tiny_model_yaml

    text = tiny_model_yaml("gqa16", GQA16, layers=3)
    (tmp_path / "m.yaml").write_text(text)
    assert main(["build", str(tmp_path / "m.yaml"), "--backend", "onnx", "--flavour", "ort", "--decoder",
                 "-o", str(tmp_path / "out"), "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    # 3 attention layers; 6 residual add + norm pairs (every norm after a residual add, the final norm
    # included); 2 MoE layers. Layer 0's first norm reads the embedding: no add to fuse.
    assert "ort contrib ops: MoE x2, GroupQueryAttention x3, SkipSimplifiedLayerNormalization x6" in notes
    assert any(n.startswith("ort: standard ops for layers.0.attn_norm: an RMSNorm without a residual add") for n in notes)
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert sum(n.op_type == "GroupQueryAttention" for n in model.graph.node) == 3

    # Left-padded prompts of different lengths: the same tokens as the reference, decode equal to prefill.
    spec = load_model_spec_text(text)
    weights = random_weights(build_model_graph(spec))
    step, graph = onnx_step(spec, weights, flavour="ort")
    ids = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(8))
    prompts, mask = left_padded_prompts(ids[:, :5])
    ref_graph = decode_graph(spec)
    expected = greedy_generate(reference_step(ref_graph, weights), ref_graph, prompts, mask, max_new_tokens=NEW_TOKENS)
    run = greedy_generate(step, graph, prompts, mask, max_new_tokens=NEW_TOKENS)
    assert torch.equal(run.tokens, expected.tokens)
    torch.testing.assert_close(run.logits, expected.logits, rtol=1e-4, atol=1e-4)
    cache = KVCache.empty(graph, 3)
    got = []
    for start, end in [(0, 5)] + [(t, t + 1) for t in range(5, 8)]:
        out = step(decode_inputs(ids[:, start:end], torch.ones(3, end, dtype=torch.int64), cache))
        cache.update(out, end - start)
        got.append(out["logits"])
    prefill = interpret(build_model_graph(spec), {"input_ids": ids}, weights, dtype=torch.float64)["logits"]
    torch.testing.assert_close(torch.cat(got, dim=1).double(), prefill, rtol=1e-4, atol=1e-4)


def test_ort_decoder_says_why_it_keeps_standard_attention(tmp_path, capsys):
    for kind, needle in (("gqa-head-norm", "needs head_dim a multiple of 16 (this model: 6)"),
                         ("mla", "MLA: GroupQueryAttention rotates whole heads")):
        out, _ = _built(tmp_path / kind, kind, "--flavour", "ort", "--json")
        notes = json.loads(capsys.readouterr().out)["notes"]
        assert any(n.startswith("ort: standard ops for layers.0.attn, layers.1.attn: ") and needle in n for n in notes)
        assert "GroupQueryAttention" not in {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}


def test_ort_group_query_attention_with_yarn_and_partial_rotary():
    """RoPE stays outside GroupQueryAttention, so YaRN's tables, its softmax-scale correction and a partly
    rotated head reach the op's inputs and scale: the same tokens and logits as the reference."""
    from conftest import tiny_model_yaml

    attention = GQA16.replace("}", ", rotary_dim: 8, rope_scaling: {factor: 4.0, original_max_positions: 4, "
                                   "mscale: 0.9, mscale_all_dim: 0.6}}")
    spec = load_model_spec_text(tiny_model_yaml("gqa16-yarn", attention))
    weights = random_weights(build_model_graph(spec))
    step, graph = onnx_step(spec, weights, flavour="ort")
    prompts, mask = left_padded_prompts(torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4)))
    ref_graph = decode_graph(spec)
    expected = greedy_generate(reference_step(ref_graph, weights), ref_graph, prompts, mask, max_new_tokens=NEW_TOKENS)
    run = greedy_generate(step, graph, prompts, mask, max_new_tokens=NEW_TOKENS)
    assert torch.equal(run.tokens, expected.tokens)
    torch.testing.assert_close(run.logits, expected.logits, rtol=1e-4, atol=1e-4)


def test_build_decoder_options_are_checked(tmp_path, capsys, spec_dir):
    from conftest import tiny_model_yaml
    from test_generation import ATTENTION

    (tmp_path / "m.yaml").write_text(tiny_model_yaml("gqa", ATTENTION["gqa-head-norm"]))
    model, out = str(tmp_path / "m.yaml"), str(tmp_path / "out")
    cases = [(["--backend", "onnx", "--mla-cache", "latent"], 2, "--mla-cache chooses the cache layout of a decoder "
                                                                 "build; add --decoder"),
             (["--backend", "onnx", "--decoder", "--mla-cache", "latent"], 2, "gqa has gqa attention"),
             (["--backend", "triton", "--decoder"], 1, "backend 'triton' cannot build"),
             (["--backend", "onnx", "--flavour", "plugin", "--decoder"], 1, "the plugin flavour's contract"),
             ]
    for argv, rc, needle in cases:
        assert main(["build", model, "-o", out, *argv]) == rc
        err = capsys.readouterr().err
        assert needle in err and "building" not in err  # refused before it announces a build
    assert main(["build", str(spec_dir / "deepseekmoe-2b.yaml"), "--backend", "onnx", "--decoder", "-o", out]) == 2
    assert "--decoder builds a whole model's decode graph; deepseekmoe-2b is a layer spec" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
