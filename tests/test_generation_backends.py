"""Generation on the compiled backends: `compile` (torch.compile of the decode step) and `aoti` (a .pt2
package of the decode graph), against the float64 reference interpreter.

Two oracles, both independent of the backend under test: the reference's greedy tokens on the same
prompts (moe_ir.generation.reference_step), and the reference prefill graph's logits at every position,
which each decode step's logits must equal (the check that catches cache and RoPE-offset bugs). The
compile runner must also serve every decode step, other prompt lengths, another batch size and left
padding without recompiling (dynamo's `error_on_recompile`); batch 1 is a size class of its own.

Inductor compiles each graph of these one-layer models in ~5-10 s on 2 cores and an AOTI package builds in
~15-20 s (85 s for the file with an empty inductor cache), so the cases are few: GQA and MLA (latent
cache) on `compile`, one GQA model on `aoti`.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from moe_ir.backends.registry import get_backend
from moe_ir.errors import BackendError
from moe_ir.frontends import load_model_spec_text
from moe_ir.generation import greedy_generate, reference_step
from moe_ir.interpreter import interpret
from moe_ir.model_builder import GraphForm, MLACacheLayout, build_model_graph
from moe_ir.params import init_weights
from moe_ir.passes import run_pipeline
from moe_ir.validate import validate_generation

from conftest import tiny_model_yaml
from test_generation import ATTENTION, random_weights

NEW_TOKENS = 4
VOCAB = 61


def tiny_spec(kind: str):
    """One MoE layer (an attention cache, routed and shared experts): each compiled graph is about half the
    size of test_generation's two-layer models, and inductor's compile time follows the graph's size."""
    return load_model_spec_text(tiny_model_yaml(kind, ATTENTION[kind], layers=1, first_dense=0))


def decode_graph_for(backend, spec, layout=MLACacheLayout.EXPANDED):
    return run_pipeline(build_model_graph(spec, form=GraphForm.DECODE, mla_cache=layout), backend.pipeline)


def check_against_reference(step, graph, spec, weights, prompts, mask=None):
    """Greedy tokens of `step` equal the reference's, and every step's logits equal the reference prefill
    logits at that position (rows without padding: mask None)."""
    ref_graph = build_model_graph(spec, form=GraphForm.DECODE, mla_cache=MLACacheLayout.EXPANDED)
    expected = greedy_generate(reference_step(ref_graph, weights), ref_graph, prompts, mask,
                               max_new_tokens=NEW_TOKENS)
    got = greedy_generate(step, graph, prompts, mask, max_new_tokens=NEW_TOKENS)
    assert torch.equal(got.tokens, expected.tokens)
    if mask is None:
        # The last prompt token's logits and each generated token's, from one reference prefill of the
        # whole sequence: decode step t must give what prefill gives at position S0 - 1 + t.
        full = torch.cat([prompts, got.tokens[:, :-1]], dim=1)
        prefill = interpret(build_model_graph(spec), {"input_ids": full}, weights, dtype=torch.float64)["logits"]
        torch.testing.assert_close(got.logits, prefill[:, prompts.shape[1] - 1:], rtol=1e-4, atol=1e-4)
    return got


def test_compile_decode_equals_prefill_without_recompiling():
    spec = tiny_spec("gqa-head-norm")
    weights = random_weights(build_model_graph(spec))
    backend = get_backend("compile")
    graph = decode_graph_for(backend, spec)
    ok, reason = backend.supports(graph)
    assert ok, reason
    step = backend.prepare(graph, {k: v for k, v in weights.items() if k in graph.weights})
    gen = torch.Generator().manual_seed(3)

    before = counters["stats"]["unique_graphs"]
    check_against_reference(step, graph, spec, weights, torch.randint(0, VOCAB, (2, 5), generator=gen))
    # One graph for the prefill (past length 0 is specialised) and one for every decode step.
    assert counters["stats"]["unique_graphs"] - before == 2
    assert set(step.compile_seconds) == {"prefill", "decode"}

    # Another prompt length, another batch, left padding: the same two graphs, no recompilation.
    with torch._dynamo.config.patch(error_on_recompile=True):
        check_against_reference(step, graph, spec, weights, torch.randint(0, VOCAB, (2, 7), generator=gen))
        check_against_reference(step, graph, spec, weights, torch.randint(0, VOCAB, (3, 4), generator=gen))
        prompts = torch.randint(0, VOCAB, (3, 6), generator=gen)
        mask = torch.ones_like(prompts)
        mask[1, :2] = 0
        mask[2, :4] = 0
        check_against_reference(step, graph, spec, weights, prompts, mask)
    assert counters["stats"]["unique_graphs"] - before == 2

    # Batch 1 is a size class of its own (dynamo specialises sizes 1): one more prefill and decode graph,
    # then again none for another prompt length.
    check_against_reference(step, graph, spec, weights, torch.randint(0, VOCAB, (1, 5), generator=gen))
    assert counters["stats"]["unique_graphs"] - before == 4
    with torch._dynamo.config.patch(error_on_recompile=True):
        check_against_reference(step, graph, spec, weights, torch.randint(0, VOCAB, (1, 9), generator=gen))
    assert counters["stats"]["unique_graphs"] - before == 4


def test_compile_decode_refuses_bad_inputs_before_compiling():
    spec = tiny_spec("gqa-head-norm")
    backend = get_backend("compile")
    graph = decode_graph_for(backend, spec)
    step = backend.prepare(graph, init_weights(graph, 0))
    with pytest.raises(BackendError, match=r"token ids must be in \[0, 61\)"):
        greedy_generate(step, graph, torch.tensor([[1, 2, 61]]), max_new_tokens=1)
    with pytest.raises(BackendError, match=r"input\(s\) past_key_values\.0\.key, .* missing"):
        step({"input_ids": torch.tensor([[1]]), "attention_mask": torch.ones(1, 1, dtype=torch.int64),
              "position_ids": torch.zeros(1, 1, dtype=torch.int64)})


def test_compile_generation_mla_latent_through_validate():
    spec = tiny_spec("mla-qlora-half")
    weights = random_weights(build_model_graph(spec))
    report = validate_generation(spec, [get_backend("compile")], new_tokens=NEW_TOKENS, weights=weights,
                                 mla_cache="latent", strict_support=True)
    (result,) = report.results
    assert result.status == "ok", result.reason
    assert result.decode is not None and result.decode.status == "ok"
    assert result.tokens == result.agree == report.batch * NEW_TOKENS
    assert report.ok


def test_aoti_decode_package_generates_like_the_reference(tmp_path):
    """One .pt2 of the decode graph serves the prefill (empty past) and every decode step, for any batch
    and prompt length; it carries its integrity manifest and runs through torch's loader alone."""
    from moe_ir.backends.aoti import META_DECODE_INPUTS, compile_package, load_runner, verify_package

    spec = tiny_spec("gqa-full-norm-interleaved")
    weights = random_weights(build_model_graph(spec))
    backend = get_backend("aoti")
    graph = decode_graph_for(backend, spec)
    ok, reason = backend.supports(graph)
    assert ok, reason
    path = compile_package(graph, {k: v for k, v in weights.items() if k in graph.weights}, tmp_path / "decode.pt2")
    manifest = verify_package(path)
    assert manifest is not None and manifest["members"]
    step = load_runner(path)
    gen = torch.Generator().manual_seed(5)

    check_against_reference(step, graph, spec, weights, torch.randint(0, VOCAB, (2, 5), generator=gen))
    check_against_reference(step, graph, spec, weights, torch.randint(0, VOCAB, (1, 3), generator=gen))
    prompts = torch.randint(0, VOCAB, (3, 6), generator=gen)
    mask = torch.ones_like(prompts)
    mask[0, :3] = 0
    check_against_reference(step, graph, spec, weights, prompts, mask)

    # torch alone: the metadata names the inputs in call order; the outputs come back by graph name.
    package = torch._inductor.aoti_load_package(str(path))
    names = package.get_metadata()[META_DECODE_INPUTS].split(",")
    assert names == [v.name for v in graph.inputs]
    with pytest.raises(BackendError, match=r"token ids must be in \[0, 61\)"):
        greedy_generate(step, graph, torch.tensor([[3, 61]]), max_new_tokens=1)
