"""Generation: the decode graph (KV cache) against the prefill graph, left padding, the greedy loop and
validate's generation check.

The oracle of a decode step is the prefill graph's reference (the established `attention` /
`mla_attention` ops, themselves checked against transformers in test_models.py): the logits a decode
step gives at position t must equal the logits prefill gives at t, in float64, for every attention kind
and both MLA cache layouts. That is the check that catches cache and RoPE-offset bugs.
"""
from __future__ import annotations

import pytest
import torch

from moe_ir.errors import BackendError, IRError
from moe_ir.frontends import load_model_spec_text
from moe_ir.generation import KVCache, decode_inputs, greedy_generate, position_ids_from_mask, reference_step
from moe_ir.interpreter import interpret
from moe_ir.ir import from_json, to_json, verify
from moe_ir.model_builder import GraphForm, MLACacheLayout, build_model_graph, cache_entries, is_decode_graph
from moe_ir.params import init_weights

from conftest import tiny_model_yaml


# Tiny odd configs of every attention kind: MHA, GQA, MLA with and without a low-rank query; RoPE half and
# interleaved; q/k norm per head and over the projection; biases.
ATTENTION = {
    "mha-bias": "{kind: mha, heads: 3, head_dim: 6, qkv_bias: true, out_bias: true}",
    "gqa-head-norm": "{kind: gqa, heads: 4, kv_heads: 2, head_dim: 6, qk_norm: head, rope_theta: 500.0}",
    "gqa-full-norm-interleaved": "{kind: gqa, heads: 6, kv_heads: 3, qk_norm: full, rope_layout: interleaved}",
    "mla": "{kind: mla, heads: 3, kv_lora_rank: 10, qk_nope_head_dim: 6, qk_rope_head_dim: 4, v_head_dim: 5}",
    "mla-qlora-half": "{kind: mla, heads: 2, q_lora_rank: 7, kv_lora_rank: 9, qk_nope_head_dim: 4, "
                      "qk_rope_head_dim: 6, v_head_dim: 3, qkv_bias: true, rope_layout: half}",
    # YaRN over a pretraining context shorter than the test's sequences, and a partly rotated head
    "gqa-yarn-partial": "{kind: gqa, heads: 4, kv_heads: 2, head_dim: 8, rotary_dim: 4, rope_scaling: {factor: 4.0, "
                        "original_max_positions: 4, mscale: 0.8, mscale_all_dim: 0.5}}",
    # a sliding layer and a global one without RoPE, q/k norm after RoPE, attention sinks
    "gqa-window-sinks": "{kind: gqa, heads: 4, kv_heads: 2, head_dim: 6, qk_norm: head_after_rope, sliding_window: 3, "
                        "sliding_layers: [0], global_nope: true, sinks: true}",
    "mla-yarn": "{kind: mla, heads: 3, kv_lora_rank: 10, qk_nope_head_dim: 6, qk_rope_head_dim: 4, v_head_dim: 5, "
                "rope_scaling: {factor: 8.0, original_max_positions: 4, mscale: 1.0, mscale_all_dim: 1.0}}",
}
CASES = [(kind, None) for kind in ATTENTION if not kind.startswith("mla")] + \
        [(kind, layout) for kind in ATTENTION if kind.startswith("mla") for layout in MLACacheLayout]


def tiny_spec(kind: str):
    return load_model_spec_text(tiny_model_yaml(name=kind, attention=ATTENTION[kind]))


def random_weights(graph, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded weights with norms away from 1 and biases away from 0, so a norm or bias applied to the wrong
    tensor (or not at all) changes the logits."""
    gen = torch.Generator().manual_seed(seed + 7)
    weights = init_weights(graph, seed)
    for name, w in weights.items():
        if name.endswith("norm.weight"):
            weights[name] = 1 + 0.3 * torch.randn(w.shape, generator=gen, dtype=w.dtype)
        elif name.rsplit(".", 1)[-1].startswith("b_"):
            weights[name] = 0.2 * torch.randn(w.shape, generator=gen, dtype=w.dtype)
    return weights


def decode_graph(spec, layout):
    return build_model_graph(spec, form=GraphForm.DECODE, mla_cache=layout or MLACacheLayout.EXPANDED)


def prefill_logits(spec, weights, ids):
    return interpret(build_model_graph(spec), {"input_ids": ids}, weights, dtype=torch.float64)["logits"]


# ------------------------------------------------------------------------------------------------
# the decode graph


def test_decode_graph_names_layouts_and_symbolic_dims():
    spec = tiny_spec("gqa-head-norm")
    g = decode_graph(spec, None)
    verify(g)
    assert is_decode_graph(g) and not is_decode_graph(build_model_graph(spec))
    assert [v.name for v in g.inputs][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert str(g.value("attention_mask").type) == "i64[B,P+S]"
    assert str(g.value("past_key_values.1.value").type) == "f32[B,2,P,6]"
    assert list(g.outputs)[:3] == ["logits", "present.0.key", "present.0.value"]
    assert str(g.outputs["present.1.key"].type) == "f32[B,2,P+S,6]"
    assert [(e.layer, e.past, e.present) for e in cache_entries(g)][1] == (0, "past_key_values.0.value", "present.0.value")
    assert to_json(from_json(to_json(g))) == to_json(g)

    mla = tiny_spec("mla-qlora-half")
    latent = decode_graph(mla, MLACacheLayout.LATENT)
    assert [(e.past, e.heads, e.dim) for e in cache_entries(latent)][:2] == [
        ("past_key_values.0.c_kv", 1, 9), ("past_key_values.0.k_rope", 1, 6)]
    expanded = decode_graph(mla, MLACacheLayout.EXPANDED)
    assert [(e.past, e.heads, e.dim) for e in cache_entries(expanded)][:2] == [
        ("past_key_values.0.key", 2, 10), ("past_key_values.0.value", 2, 3)]
    assert to_json(from_json(to_json(latent))) == to_json(latent)
    with pytest.raises(IRError, match="not a decode graph"):
        cache_entries(build_model_graph(mla))
    with pytest.raises(IRError, match="decode form is for inference"):
        build_model_graph(mla, form="decode", training=True)


@pytest.mark.parametrize("kind, layout", CASES, ids=[f"{k}-{l.value}" if l else k for k, l in CASES])
def test_decode_at_each_position_equals_prefill(kind, layout):
    """A 4-token prefill through the decode graph, then one token per call: the logits at every position
    equal the prefill graph's, and the cache holds every token after the last call."""
    spec = tiny_spec(kind)
    g = decode_graph(spec, layout)
    weights = random_weights(build_model_graph(spec))
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    want = prefill_logits(spec, weights, ids)

    step = reference_step(g, weights)
    cache = KVCache.empty(g, 2)
    out = step(decode_inputs(ids[:, :4], torch.ones(2, 4, dtype=torch.int64), cache))
    cache.update(out, 4)
    got = [out["logits"]]
    for t in range(4, 9):
        out = step(decode_inputs(ids[:, t:t + 1], torch.ones(2, t + 1, dtype=torch.int64), cache))
        cache.update(out, 1)
        got.append(out["logits"])
    got = torch.cat(got, dim=1)
    assert got.shape == want.shape == (2, 9, 61)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert cache.length == 9
    # the whole sequence in one call with an empty past is the prefill (one graph for both phases)
    one_call = step(decode_inputs(ids, torch.ones(2, 9, dtype=torch.int64), KVCache.empty(g, 2)))["logits"]
    torch.testing.assert_close(one_call, want, rtol=1e-12, atol=1e-12)


def test_a_wrong_rope_offset_is_caught():
    """The check above is not vacuous: decode steps that restart positions at 0 differ from prefill."""
    spec = tiny_spec("mha-bias")
    g = decode_graph(spec, None)
    weights = random_weights(build_model_graph(spec))
    ids = torch.randint(0, 61, (1, 5), generator=torch.Generator().manual_seed(4))
    want = prefill_logits(spec, weights, ids)
    step = reference_step(g, weights)
    cache = KVCache.empty(g, 1)
    cache.update(step(decode_inputs(ids[:, :4], torch.ones(1, 4, dtype=torch.int64), cache)), 4)
    inputs = decode_inputs(ids[:, 4:], torch.ones(1, 5, dtype=torch.int64), cache)
    inputs["position_ids"] = torch.zeros(1, 1, dtype=torch.int64)
    assert (step(inputs)["logits"][:, 0] - want[:, 4]).abs().max() > 1e-3


@pytest.mark.parametrize("kind, layout", [("gqa-full-norm-interleaved", None), ("mla", MLACacheLayout.LATENT),
                                          ("mla-qlora-half", MLACacheLayout.EXPANDED)])
def test_left_padded_batch_equals_unpadded_single_runs(kind, layout):
    """Prompts of lengths 6, 3 and 1 left-padded to 6, prefilled and decoded together: at every real position
    the logits equal each prompt run alone, and greedy continuations are the same."""
    spec = tiny_spec(kind)
    g = decode_graph(spec, layout)
    weights = random_weights(build_model_graph(spec), seed=1)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 61, (n,), generator=gen) for n in (6, 3, 1)]
    ids = torch.zeros(3, 6, dtype=torch.int64)
    mask = torch.zeros(3, 6, dtype=torch.int64)
    for row, p in enumerate(prompts):
        ids[row, 6 - len(p):], mask[row, 6 - len(p):] = p, 1
    step = reference_step(g, weights)
    batch = greedy_generate(step, g, ids, mask, max_new_tokens=4, keep_outputs=True)
    for row, p in enumerate(prompts):
        alone = greedy_generate(step, g, p[None], max_new_tokens=4, keep_outputs=True)
        assert torch.equal(batch.tokens[row], alone.tokens[0])
        torch.testing.assert_close(batch.logits[row], alone.logits[0], rtol=1e-12, atol=1e-12)
        prefill = batch.outputs[0]["logits"][row, 6 - len(p):]
        torch.testing.assert_close(prefill, alone.outputs[0]["logits"][0], rtol=1e-12, atol=1e-12)
        # and the unpadded prompt with its continuation through the prefill graph
        full = torch.cat([p, alone.tokens[0, :-1]])[None]
        torch.testing.assert_close(alone.logits[0], prefill_logits(spec, weights, full)[0, len(p) - 1:],
                                   rtol=1e-12, atol=1e-12)
    assert torch.isfinite(batch.outputs[0]["logits"]).all()  # padding rows stay finite


def test_position_ids_from_left_padded_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask, 5).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert position_ids_from_mask(mask, 1).tolist() == [[2], [4]]


def test_bad_cache_inputs_get_one_clear_error():
    spec = tiny_spec("gqa-head-norm")
    g = decode_graph(spec, None)
    weights = random_weights(build_model_graph(spec))
    step = reference_step(g, weights)
    cache = KVCache.empty(g, 2)
    cache.update(step(decode_inputs(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int64),
                                    cache)), 3)
    inputs = decode_inputs(torch.ones(2, 1, dtype=torch.int64), torch.ones(2, 4, dtype=torch.int64), cache)
    short = dict(inputs, **{"past_key_values.1.key": inputs["past_key_values.1.key"][:, :, :2]})
    with pytest.raises(IRError, match="past_key_values.1.key.*has 2 along dim 2 \\(P\\)"):
        step(short)
    with pytest.raises(IRError, match="attention_mask.*expected P\\+S = 4"):
        step(dict(inputs, attention_mask=torch.ones(2, 5, dtype=torch.int64)))
    with pytest.raises(BackendError, match="must cover the 3 cached and 1 new"):
        decode_inputs(torch.ones(2, 1, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int64), cache)
    with pytest.raises(BackendError, match="S >= 1"):
        greedy_generate(step, g, torch.ones(1, 0, dtype=torch.int64), max_new_tokens=2)


# ------------------------------------------------------------------------------------------------
# validate's generation check


class CacheDroppingBackend:
    """A deliberately broken decode backend: the reference, except that it forgets layer 0's cached values
    (zeros in their place) before every call, as a cache that is never written would."""

    label = "broken-cache"
    pipeline = ("dce",)

    def supports(self, graph):
        return True, ""

    def prepare(self, graph, weights, **options):
        step = reference_step(graph, weights, dtype=torch.float32)

        def run(inputs):
            inputs = dict(inputs)
            past = next(name for name in inputs if name.startswith("past_key_values.0."))
            inputs[past] = torch.zeros_like(inputs[past])
            return step(inputs)

        return run


class PrefillOnlyBackend(CacheDroppingBackend):
    label = "prefill-only"

    def supports(self, graph):
        return False, "no decode graphs here"


def test_validate_generation_passes_the_reference_and_catches_a_broken_cache():
    from moe_ir.backends import get_backend
    from moe_ir.validate import validate_generation

    spec = tiny_spec("mla-qlora-half")
    report = validate_generation(spec, [get_backend("reference"), CacheDroppingBackend(), PrefillOnlyBackend()],
                                 prompt=5, new_tokens=3, batch=3, mla_cache="latent")
    good, broken, skipped = report.results
    assert good.status == "ok" and good.agree == good.tokens == 9 and not good.near_ties
    assert good.decode.outputs["logits"].max_abs < 1e-5 and good.decode.routing.flips == 0
    assert broken.status == "mismatch" and "decode steps differ from prefill" in broken.reason
    assert broken.decode.outputs["logits"].max_abs > 1e-3
    assert skipped.status == "skipped" and skipped.ok and "no decode graphs" in skipped.reason
    assert not report.ok
    table = report.to_table()
    assert "MISMATCH" in table and "MLA cache latent" in table and "9/9 equal" in table


def test_near_tie_tokens_are_reported_not_failed():
    """A greedy difference at a step whose reference top-2 gap is under the threshold is a near-tie."""
    from moe_ir.validate import GenerationResult, _compare_tokens
    from moe_ir.generation import Generation

    expected = Generation(torch.tensor([[3, 4, 5], [1, 2, 3]]), torch.zeros(2, 3, 8), torch.tensor([[1.0, 1e-7, 1.0],
                                                                                                     [1.0, 1.0, 0.5]], dtype=torch.float64))
    near = torch.full((2, 3), 1e-4, dtype=torch.float64)
    result = GenerationResult("x", "ok")
    _compare_tokens(result, torch.tensor([[3, 9, 9], [1, 2, 3]]), expected, near)
    assert result.status == "ok" and result.agree == 4 and result.tokens == 5
    assert result.near_ties == [{"row": 0, "step": 1, "margin": 1e-7, "threshold": 1e-4}]
    _compare_tokens(result, torch.tensor([[3, 4, 5], [1, 2, 0]]), expected, near)
    assert result.status == "mismatch"


def test_cli_validate_reports_generation(tmp_path, capsys):
    import json

    from moe_ir.cli import main

    spec = tmp_path / "tiny-mla.yaml"
    spec.write_text(tiny_model_yaml(name="tiny-mla", attention=ATTENTION["mla"]))
    rc = main(["validate", str(spec), "--backends", "reference", "--tokens", "4", "--generate", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["ok"]
    assert [g["mla_cache"] for g in report["generation"]] == ["expanded", "latent"]
    row = report["generation"][1]["results"][0]
    assert row["backend"] == "reference" and row["status"] == "ok" and row["agree"] == row["tokens"] == 4
    assert row["decode"]["outputs"]["logits"]["max_abs"] < 1e-9
    rc = main(["validate", str(spec), "--backends", "reference", "--tokens", "4", "--generate", "0", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["generation"] == []


# ------------------------------------------------------------------------------------------------
# the eager backend and the generated model.py


def eager_decode_model(kind, layout, seed=0):
    from moe_ir.backends.torch_eager.module import MoEModel

    spec = tiny_spec(kind)
    weights = random_weights(build_model_graph(spec), seed)
    return spec, weights, MoEModel(decode_graph(spec, layout), weights).double().eval()


@pytest.mark.parametrize("kind, layout", CASES, ids=[f"{k}-{l.value}" if l else k for k, l in CASES])
def test_eager_decode_equals_prefill_and_the_reference(kind, layout):
    """The eager module of the decode graph (the torch kernels; MLA latent: absorbed up-projections) with its
    cache object: decode steps equal the reference prefill at every position (float64), left-padded greedy
    tokens equal the reference's."""
    spec, weights, model = eager_decode_model(kind, layout)
    ids = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(6))
    want = prefill_logits(spec, weights, ids)
    cache = model.new_cache(2)
    with torch.no_grad():
        got = [model(ids[:, :3], cache=cache).logits]
        for t in range(3, 8):
            got.append(model(ids[:, t:t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(got, dim=1), want, rtol=1e-11, atol=1e-11)
    assert cache.length == 8

    mask = torch.ones(2, 5, dtype=torch.int64)
    mask[1, :2] = 0
    prompts = ids[:, :5] * mask
    g = decode_graph(spec, layout)
    expected = greedy_generate(reference_step(g, weights), g, prompts, mask, max_new_tokens=4)
    assert torch.equal(model.generate(prompts, mask, max_new_tokens=4), expected.tokens)


def test_eager_generate_refuses_a_prefill_graph_and_bad_ids():
    from moe_ir.backends.torch_eager.module import MoEModel

    spec = tiny_spec("mha-bias")
    prefill = MoEModel(build_model_graph(spec))
    with pytest.raises(BackendError, match="form='decode'"):
        prefill.generate(torch.ones(1, 3, dtype=torch.int64), max_new_tokens=2)
    _, _, model = eager_decode_model("mha-bias", None)
    with pytest.raises(BackendError, match="token ids must be in"):
        model.generate(torch.full((1, 3), 61, dtype=torch.int64), max_new_tokens=2)


def test_validate_generation_through_the_eager_backend():
    from moe_ir.backends import get_backend
    from moe_ir.validate import validate_generation

    for kind, layout in (("gqa-head-norm", "expanded"), ("mla-qlora-half", "latent")):
        report = validate_generation(tiny_spec(kind), [get_backend("torch")], mla_cache=layout)
        (row,) = report.results
        assert row.status == "ok", report.to_table()
        assert row.agree == row.tokens == 8 and row.decode.outputs["logits"].max_abs < 1e-4


@pytest.mark.parametrize("kind, layout", [("gqa-full-norm-interleaved", None), ("mla-qlora-half", MLACacheLayout.LATENT)])
def test_generated_model_py_generates_like_the_module(tmp_path, kind, layout):
    """model.py emitted from the decode graph: its forward with a cache dict and its generate equal the eager
    module bitwise (same kernels, copied)."""
    from conftest import import_file
    from moe_ir.backends.torch_eager.codegen import generate_source

    spec, weights, model = eager_decode_model(kind, layout)
    path = tmp_path / "model.py"
    path.write_text(generate_source(decode_graph(spec, layout)))
    standalone = import_file(path, f"generated_{kind}").DecoderModel().double()
    standalone.load_state_dict({k: v.double() for k, v in weights.items()})
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(8))
    mask = torch.ones(2, 6, dtype=torch.int64)
    mask[0, :3] = 0
    with torch.no_grad():
        assert torch.equal(standalone.generate(ids, mask, max_new_tokens=3), model.generate(ids, mask, max_new_tokens=3))
        logits, cache, _, _ = standalone(ids, mask)
        assert torch.equal(logits, model(ids, mask, cache=model.new_cache(2)).logits)
        assert all(t.shape[2] == 6 for t in cache.values())
