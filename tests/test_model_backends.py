"""Whole models (model specs) on the eager torch, compile and AOTInductor backends.

Layered as the layer tests are: the eager `MoEModel` against the reference interpreter on tiny models of
every attention/routing family, in float64 (to rounding) and float32 (1e-5 relative); its gradients
against autograd through the reference semantics; the runner contract (exactly the graph's outputs);
the generated standalone model.py against the in-memory module (bitwise); then one compiled runner and
one AOTInductor package, each fed two (B, S) shapes through the same artifact. The reference itself is
checked against transformers in test_models.py.
"""
from __future__ import annotations

import ast
import subprocess
import sys

import pytest
import torch
import yaml

from moe_ir.backends import get_backend
from moe_ir.backends.aoti import AotiBackend, export_program, load_runner
from moe_ir.backends.torch_eager import MoELayer, MoEModel
from moe_ir.builder import build_graph
from moe_ir.errors import BackendError, WeightsError
from moe_ir.interpreter import interpret
from moe_ir.ir import ValueKind, op_def
from moe_ir.model_builder import build_model_graph
from moe_ir.model_spec import model_spec_from_dict
from moe_ir.params import init_weights
from moe_ir.spec import spec_from_dict

from conftest import import_file

VOCAB, HIDDEN = 80, 32
MLA = {"kind": "mla", "heads": 4, "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6}

# family -> (model section, moe section); each after the published model it imitates, shrunk.
FAMILIES = {
    # DeepSeekMoE 16B: MHA, a dense first layer, 2 shared experts, expert + device losses (here tied embeddings)
    "deepseek-moe-mha": ({"layers": 3, "first_dense": 1, "dense_width": 48, "tied_embeddings": True,
                          "attention": {"kind": "mha", "heads": 4}},
                         {"experts": {"routed": 8, "width": 16, "top_k": 2, "shared": 2},
                          "balance": {"expert": 0.01, "device": {"alpha": 0.05, "devices": 2}}}),
    # Mixtral: GQA, every layer MoE, renormalised softmax top-2, switch + z-loss
    "mixtral-gqa": ({"attention": {"kind": "gqa", "heads": 4, "kv_heads": 2, "rope_theta": 1e6}},
                    {"experts": {"routed": 4, "width": 24, "top_k": 2}, "router": {"normalize": True},
                     "balance": {"switch": 0.02, "z_loss": 0.001}}),
    # DeepSeek-V2-Lite: MLA with a full q_proj, group-limited softmax routing, scaling, 2 shared experts
    "deepseek-v2-lite-mla": ({"first_dense": 1, "dense_width": 48, "attention": MLA},
                             {"experts": {"routed": 8, "width": 16, "top_k": 3, "shared": 2},
                              "router": {"group_limit": {"groups": 4, "kept": 2}, "scaling": 2.0},
                              "balance": {"expert": 0.001}}),
    # DeepSeek-V3: MLA with q_lora, sigmoid scores, groups by top-2 sum, aux-loss-free bias, sequence loss
    "deepseek-v3-mla": ({"first_dense": 1, "dense_width": 48, "attention": {**MLA, "q_lora_rank": 12}},
                        {"experts": {"routed": 8, "width": 16, "top_k": 2, "shared": 1},
                         "router": {"score": "sigmoid", "normalize": True, "scaling": 2.5,
                                    "group_limit": {"groups": 4, "kept": 2, "score": "top2_sum"}},
                         "balance": {"aux_free": {"gamma": 0.001}, "sequence": 1e-4}}),
    # OLMoE: RMSNorm over the whole q and k projections, no renormalisation
    "olmoe-qk-norm-full": ({"attention": {"kind": "mha", "heads": 4, "qk_norm": "full"}},
                           {"experts": {"routed": 8, "width": 16, "top_k": 2}, "balance": {"switch": 0.01}}),
    # Qwen1.5-MoE: q/k/v biases, one sigmoid-gated shared expert of its own width
    "qwen-qkv-bias-gate": ({"attention": {"kind": "mha", "heads": 4, "qkv_bias": True}},
                           {"experts": {"routed": 8, "width": 16, "top_k": 2, "shared": 1, "shared_width": 32,
                                        "shared_gate": True}, "balance": {"switch": 0.001}}),
    # Qwen3-style per-head q/k norm with GQA, plus an output bias and an interleaved RoPE
    "gqa-head-norm": ({"attention": {"kind": "gqa", "heads": 4, "kv_heads": 2, "qk_norm": "head", "out_bias": True,
                                     "rope_layout": "interleaved"}},
                      {"experts": {"routed": 8, "width": 16, "top_k": 1}}),
    # Expert-choice MoE (routing record `rows`) after a gelu dense layer
    "expert-choice": ({"first_dense": 1, "dense_width": 40, "dense_activation": "gelu",
                       "attention": {"kind": "mha", "heads": 2}},
                      {"experts": {"routed": 4, "width": 16, "top_k": 2, "activation": "relu"},
                       "router": {"choice": "expert"}, "balance": {"z_loss": 0.001}}),
}


def make_spec(family: str):
    model, moe = FAMILIES[family]
    base = {"name": family, "vocab_size": VOCAB, "hidden": HIDDEN, "layers": 2, "rms_norm_eps": 1e-5}
    return model_spec_from_dict({"model": {**base, **model}, "moe": moe})


def random_weights(graph, seed=0):
    """Seeded init with every vector perturbed too (norm scales around 1, biases and the aux-free router
    bias around 0), so a misplaced norm or bias shows in the numbers."""
    weights = init_weights(graph, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for name in sorted(weights):
        w = weights[name]
        if w.dim() == 1:
            weights[name] = w + (0.1 if "norm" in name else 0.05) * torch.randn(w.shape, generator=gen, dtype=w.dtype)
    return weights


def token_ids(b, s, seed=0):
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def assert_matches_reference(got, ref, *, rtol, exact_routing=True):
    assert set(got) == set(ref)
    for key, r in ref.items():
        g = got[key]
        assert g.shape == r.shape, key
        if r.dtype == torch.int64:
            assert torch.equal(g.sort(dim=-1).values, r.sort(dim=-1).values) if exact_routing else True, key
        else:
            scale = float(r.abs().max())
            torch.testing.assert_close(g.to(r.dtype), r, rtol=rtol, atol=rtol * scale, msg=key)


# ------------------------------------------------------------------------------------------------
# eager against the reference interpreter


@pytest.mark.parametrize("family", list(FAMILIES))
def test_eager_runner_matches_reference_in_float64_and_float32(family):
    graph = build_model_graph(make_spec(family), routing=True)
    weights = random_weights(graph)
    ids = token_ids(2, 7)
    backend = get_backend("torch")
    assert backend.supports(graph) == (True, "")
    run32 = backend.prepare(graph, weights)
    got = run32(ids)
    assert set(got) == set(graph.outputs)  # the runner contract: exactly the graph's outputs
    assert got["logits"].dtype == torch.float32 and got["logits"].shape == (2, 7, VOCAB)
    assert_matches_reference(got, interpret(graph, {"input_ids": ids}, weights), rtol=1e-5)

    module64 = MoEModel(graph, weights).double().eval()
    with torch.no_grad():
        res = module64(ids)
    ref64 = interpret(graph, {"input_ids": ids}, weights, dtype=torch.float64)
    assert_matches_reference({"logits": res.logits, **res.routing}, ref64, rtol=1e-11)


@pytest.mark.parametrize("family", ["deepseek-moe-mha", "mixtral-gqa", "deepseek-v3-mla", "qwen-qkv-bias-gate",
                                    "olmoe-qk-norm-full", "expert-choice"])
def test_training_losses_and_gradients_match_reference_autograd(family):
    """logits.sum() + aux_loss backpropagates to the embedding, attention, router and experts, and every
    gradient equals autograd through the reference semantics (float64)."""
    spec = make_spec(family)
    graph = build_model_graph(spec, training=True)
    weights = {k: v.double() for k, v in random_weights(graph, 2).items()}
    ids = token_ids(2, 6, seed=3)

    module = MoEModel.from_spec(spec, weights=weights).double()
    res = module(ids)
    assert res.losses and all(".loss." in k for k in res.losses)
    assert float(res.aux_loss.detach()) > 0
    (res.logits.sum() + res.aux_loss).backward()

    leaves = {k: v.clone().requires_grad_(graph.weights[k].kind != ValueKind.BUFFER) for k, v in weights.items()}
    env = {"input_ids": ids, **leaves}
    for node in graph.nodes:  # the reference semantics op by op, with autograd on
        outs = op_def(node.op).reference(node.attrs, *[None if v is None else env[v.name] for v in node.inputs])
        env.update({v.name: t for v, t in zip(node.outputs, outs)})
    ref_losses = {k: env[v.name] for k, v in graph.outputs.items() if ".loss." in k}
    assert res.losses.keys() == ref_losses.keys()
    for key, loss in ref_losses.items():
        torch.testing.assert_close(res.losses[key], loss, rtol=1e-11, atol=1e-14, msg=key)
    (env[graph.outputs["logits"].name].sum() + sum(ref_losses.values())).backward()

    grads = {name: p.grad for name, p in module.canonical_weights().items() if p.requires_grad}
    reached = {name for name, g in grads.items() if g is not None and g.abs().sum() > 0}
    moe_layer = spec.model.moe_layers[0]
    attn = "w_q_a" if spec.model.attention.q_lora_rank else "w_q"
    for name in ("embed.weight", f"layers.0.attn.{attn}", f"layers.{moe_layer}.moe.router.weight",
                 f"layers.{moe_layer}.moe.experts.w_up", "norm.weight"):
        assert name in reached, name
    for name, g in grads.items():
        ref = leaves[name].grad
        if ref is None:
            assert g is None or not g.any(), name
            continue
        torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-12 * max(1.0, float(ref.abs().max())), msg=name)


def test_training_graph_outputs_every_layer_record_under_its_prefix():
    spec = make_spec("deepseek-moe-mha")
    graph = build_model_graph(spec, training=True)
    for i in spec.model.moe_layers:
        for key in ("expert_idx", "weights", "router_logits", "tokens_per_expert", "loss.expert", "loss.device",
                    "aux_loss"):
            assert f"layers.{i}.{key}" in graph.outputs, (i, key)
    assert not any(k.startswith("layers.0.") for k in graph.outputs)  # layer 0 is dense
    # The routing=True graph (what validation runs) is unchanged: logits and the routing record only.
    assert list(build_model_graph(spec, routing=True).outputs) == [
        "logits", "layers.1.expert_idx", "layers.1.weights", "layers.2.expert_idx", "layers.2.weights"]


def test_aux_free_bias_update_moves_every_moe_layer():
    spec = make_spec("deepseek-v3-mla")
    module = MoEModel.from_spec(spec, seed=1)
    res = module(token_ids(2, 9))
    module.update_bias(res.routing)
    for i in spec.model.moe_layers:
        load = res.routing[f"layers.{i}.tokens_per_expert"].double()
        expected = 0.001 * torch.sign(load.mean() - load)
        torch.testing.assert_close(module.canonical_weights()[f"layers.{i}.moe.router.bias"].double(), expected)


def test_safetensors_round_trip_and_strict_names(tmp_path):
    spec = make_spec("qwen-qkv-bias-gate")
    graph = build_model_graph(spec, routing=True)
    module = MoEModel(graph, random_weights(graph, 4)).eval()
    path = module.save_safetensors(tmp_path / "w.safetensors")
    other = MoEModel(graph).eval()
    other.load_safetensors(path)
    assert set(other.state_dict()) == set(graph.weights)
    assert "layers.1.moe.experts.w_up" in other.state_dict() and "layers.0.attn.b_q" in other.state_dict()
    ids = token_ids(1, 5)
    with torch.no_grad():
        assert torch.equal(module(ids).logits, other(ids).logits)
    wrong = dict(module.canonical_weights())
    wrong.pop("layers.0.attn.b_q")
    with pytest.raises(WeightsError, match="missing: layers.0.attn.b_q"):
        other.load_canonical(wrong)


def test_bad_inputs_and_mismatched_graphs_are_clear_errors():
    spec = make_spec("mixtral-gqa")
    graph = build_model_graph(spec, routing=True)
    run = get_backend("torch").prepare(graph, random_weights(graph))
    with pytest.raises(BackendError, match=r"input_ids must be int64 \[B, S\], got torch.int32 \[1, 4\]"):
        run(token_ids(1, 4).int())
    with pytest.raises(BackendError, match=r"token ids must be in \[0, 80\), got .*\.\.80"):
        run(torch.tensor([[1, 80]]))
    with pytest.raises(BackendError, match="int64 \\[B, S\\]"):
        run(torch.randn(1, 4, HIDDEN))
    layer_graph = build_graph(spec_from_dict({"hidden": 8, "experts": {"routed": 4, "width": 4, "top_k": 1}}))
    with pytest.raises(BackendError, match="MoEModel takes a model graph"):
        MoEModel(layer_graph)
    with pytest.raises(BackendError, match="is a model graph .*use MoEModel"):
        MoELayer(graph)
    stripped = build_model_graph(spec)
    del stripped.outputs["logits"]
    for name in ("torch", "compile", "aoti"):
        ok, reason = get_backend(name).supports(stripped)
        assert not ok and "has no 'logits' output" in reason, name


# ------------------------------------------------------------------------------------------------
# the generated standalone model.py


def import_generated(path):
    return import_file(path, f"generated_model_{path.parent.name.replace('-', '_')}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generated_model_equals_module(family, tmp_path):
    from safetensors.torch import load_file

    spec = make_spec(family)
    module = MoEModel.from_spec(spec, seed=3)
    with torch.no_grad():  # the seeded init has zero biases and unit norms; make them count
        module.load_canonical(random_weights(module.graph, 3))
    out = tmp_path / family
    result = get_backend("torch").build(spec, module.graph, module.canonical_weights(), out)
    assert sorted(p.name for p in result.files) == ["model.py", "spec.yaml", "weights.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == [family]  # no staging folder left behind
    assert model_spec_from_dict(yaml.safe_load((out / "spec.yaml").read_text())) == spec

    source = (out / "model.py").read_text()
    tree = ast.parse(source)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m for m in imported if m not in sys.stdlib_module_names} == {"torch"}  # runs without moe_ir
    assert ("mla_attention" in source) == (spec.model.attention.kind == "mla")

    generated = import_generated(out / "model.py").DecoderModel()
    generated.load_state_dict(load_file(str(out / "weights.safetensors")), strict=True)
    ids = token_ids(2, 6, seed=7)
    for train in (False, True):
        module.train(train)
        generated.train(train)
        logits, routing, losses = generated(ids)
        res = module(ids)
        assert torch.equal(logits, res.logits)
        assert routing.keys() == res.routing.keys() and losses.keys() == res.losses.keys()
        for key in routing:
            assert torch.equal(routing[key], res.routing[key]), key
        for key in losses:
            assert torch.equal(losses[key], res.losses[key]), key
    if spec.moe.balance.aux_free is not None:
        generated.update_bias(routing)
        module.update_bias(res.routing)
        for i in spec.model.moe_layers:
            bias = generated.layers[i].moe.router.bias
            assert torch.equal(bias, module.canonical_weights()[f"layers.{i}.moe.router.bias"]) and bias.abs().sum() > 0


def test_build_refuses_a_layer_spec_with_a_model_graph(tmp_path):
    spec = make_spec("mixtral-gqa")
    graph = build_model_graph(spec)
    with pytest.raises(BackendError, match="is a layer spec but graph 'mixtral-gqa' is a model graph"):
        get_backend("torch").build(spec.moe, graph, init_weights(graph), tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# torch.compile and AOTInductor: one artifact each, two (B, S) shapes through it


def test_compiled_model_runner_matches_reference_on_two_shapes():
    graph = build_model_graph(make_spec("gqa-head-norm"), routing=True)
    weights = random_weights(graph, 5)
    runner = get_backend("compile").prepare(graph, weights)
    # Sizes above 1 on the first call: dynamo specialises a dim it first sees as 1.
    for b, s in ((2, 5), (3, 8)):
        ids = token_ids(b, s, seed=s)
        got = runner(ids)
        assert set(got) == set(graph.outputs)
        assert_matches_reference(got, interpret(graph, {"input_ids": ids}, weights, dtype=torch.float64), rtol=1e-5)
    assert runner.compile_seconds is not None and runner.compile_seconds > 0


def test_mla_model_exports_with_dynamic_batch_and_sequence():
    """torch.export (no AOT compile) of the V3-style model: MLA and sigmoid/group routing trace with B, S symbolic."""
    graph = build_model_graph(make_spec("deepseek-v3-mla"), routing=True)
    weights = random_weights(graph, 6)
    program = export_program(graph, weights)
    for b, s in ((2, 3), (1, 11)):
        ids = token_ids(b, s, seed=b + s)
        ref = interpret(graph, {"input_ids": ids}, weights, dtype=torch.float64)
        assert_matches_reference(program.module()(ids), ref, rtol=1e-5)


AOTI_FAMILY = "mixtral-gqa"


@pytest.fixture(scope="module")
def model_package(tmp_path_factory):
    spec = make_spec(AOTI_FAMILY)
    graph = build_model_graph(spec, routing=True)
    weights = random_weights(graph, 7)
    backend = AotiBackend()
    assert backend.supports(graph) == (True, "")
    result = backend.build(spec, graph, weights, tmp_path_factory.mktemp("aoti-model"))
    assert "input_ids int64 [B, S]" in result.notes[0]
    return graph, weights, result.files[0]


def test_model_package_runs_two_shapes(model_package):
    graph, weights, path = model_package
    assert path.name == f"{AOTI_FAMILY}.pt2"
    run = load_runner(path)
    for b, s in ((1, 6), (3, 13)):
        ids = token_ids(b, s, seed=10 * b + s)
        got = run(ids)
        assert set(got) == set(graph.outputs)
        assert_matches_reference(got, interpret(graph, {"input_ids": ids}, weights, dtype=torch.float64), rtol=1e-5)


def test_model_package_checks_its_input(model_package):
    _, _, path = model_package
    run = load_runner(path)
    with pytest.raises(BackendError, match=r"aoti runner: input_ids must be int64 \[B, S\], got torch.int32"):
        run(token_ids(1, 4).int())
    with pytest.raises(BackendError, match=r"int64 \[B, S\], got torch.float32 \[1, 4, 32\]"):
        run(torch.randn(1, 4, HIDDEN))
    with pytest.raises(BackendError, match=r"token ids must be in \[0, 80\), got -1\.\."):
        run(torch.tensor([[3, -1, 5]]))


def test_model_package_loads_without_moe_ir(model_package):
    _, _, path = model_package
    code = ("import sys, torch\n"
            f"m = torch._inductor.aoti_load_package({str(path)!r})\n"
            f"out = m(torch.randint(0, {VOCAB}, (2, 5)))\n"
            f"assert out['logits'].shape == (2, 5, {VOCAB}) and out['layers.1.expert_idx'].shape == (10, 2)\n"
            "assert not [k for k in sys.modules if k.startswith('moe_ir')]\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_aoti_packages_a_training_model_graph_as_inference():
    graph = build_model_graph(make_spec("deepseek-v3-mla"), training=True)
    ok, reason = AotiBackend().supports(graph)
    assert ok, reason
