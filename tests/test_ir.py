"""IR: verifier, printer (golden files), DOT, JSON round-trip, interpreter checks."""
import os
from pathlib import Path

import pytest
import torch

from moe_ir.builder import build_graph
from moe_ir.errors import IRError, WeightsError
from moe_ir.frontends import load_spec
from moe_ir.interpreter import interpret
from moe_ir.ir import ElemType, Graph, OpCode, TensorType, from_json, to_dot, to_json, to_text, verify
from moe_ir.params import init_weights

from conftest import SPEC_FILES, SPECS

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("training", [False, True])
def test_every_spec_builds_verifies_and_round_trips(path, training):
    g = build_graph(load_spec(path), training=training)
    verify(g)
    assert to_text(from_json(to_json(g))) == to_text(g)
    dot = to_dot(g)
    assert dot.startswith("digraph") and all(f'"{n.name}"' in dot for n in g.nodes)


@pytest.mark.parametrize("name, training", [("tiny", True), ("tiny-v3", False), ("switch-top1", False)])
def test_printer_matches_golden(name, training):
    text = to_text(build_graph(load_spec(SPECS / f"{name}.yaml"), training=training))
    golden = GOLDEN / f"{name}{'.training' if training else ''}.txt"
    if os.environ.get("MOE_IR_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"printer output changed; rerun with MOE_IR_UPDATE_GOLDEN=1 if intended"


def _tiny_graph() -> Graph:
    return build_graph(load_spec(SPECS / "tiny.yaml"))


def test_verifier_rejects_wrong_output_type_naming_the_node():
    g = _tiny_graph()
    node = g.node("scores")
    node.outputs[0].type = TensorType(("T", 3), ElemType.FLOAT32)
    with pytest.raises(IRError) as info:
        verify(g)
    assert info.value.node == "scores"
    assert "inference gives" in str(info.value) and "--- graph ---" in str(info.value)


def test_verifier_rejects_missing_required_operand():
    g = _tiny_graph()
    node = g.node("experts")
    node.inputs = (node.inputs[0], None) + node.inputs[2:]
    with pytest.raises(IRError, match="operand 'rows' of grouped_ffn is required") as info:
        verify(g)
    assert info.value.node == "experts"


def test_verifier_rejects_foreign_value():
    g, other = _tiny_graph(), _tiny_graph()
    node = g.node("combine")
    node.inputs = (other.value("experts"),) + node.inputs[1:]
    with pytest.raises(IRError, match="not a value of this graph"):
        verify(g)


def test_add_node_rejects_bad_shapes_and_attrs():
    g = Graph()
    x = g.add_input("x", TensorType(("T", 8), ElemType.FLOAT32))
    w = g.add_weight("w", TensorType((4, 9), ElemType.FLOAT32))
    with pytest.raises(IRError, match="w columns vs x features"):
        g.add_node(OpCode.LINEAR, [x, w, None], name="proj")
    with pytest.raises(IRError, match="has no attribute 'bogus'"):
        g.add_node(OpCode.SCORE, [x], {"bogus": 1})
    with pytest.raises(IRError, match="needs attribute 'k'"):
        g.add_node(OpCode.TOPK_ROUTE, [x, None])


def test_json_rejects_other_documents():
    with pytest.raises(IRError, match="not a moe-ir graph"):
        from_json('{"nodes": []}')
    with pytest.raises(IRError, match="not valid JSON"):
        from_json("{")


def test_interpreter_checks_weights_by_name_and_shape():
    g = _tiny_graph()
    w = init_weights(g)
    w["router.weight"] = torch.zeros(3, 3)
    del w["experts.w_up"]
    w["extra"] = torch.zeros(1)
    with pytest.raises(WeightsError) as info:
        interpret(g, {"x": torch.zeros(1, 2, 32)}, w)
    msg = str(info.value)
    assert "missing: experts.w_up" in msg and "unexpected: extra" in msg and "router.weight: expected [7, 32]" in msg


def test_interpreter_matches_hand_computed_layer():
    """The oracle itself against a direct transcription of the DeepSeekMoE layer formula."""
    spec = load_spec(SPECS / "tiny.yaml")
    g = build_graph(spec)
    w = {k: v.double() for k, v in init_weights(g, seed=3).items()}
    x = torch.randn(2, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = interpret(g, {"x": x}, w, dtype=torch.float64)["out"].reshape(-1, 32)
    u = x.reshape(-1, 32)

    def ffn(prefix, i=None):
        pick = (lambda t: t[i]) if i is not None else (lambda t: t)
        wg, wu, wd = (pick(w[f"{prefix}.{n}"]) for n in ("w_gate", "w_up", "w_down"))
        return (torch.nn.functional.silu(u @ wg.T) * (u @ wu.T)) @ wd.T

    s = torch.softmax(u @ w["router.weight"].T, dim=-1)
    expected = ffn("shared.0")
    for i in range(spec.experts.routed):
        g_i = torch.where(s.topk(spec.experts.top_k, dim=-1).indices.eq(i).any(-1), s[:, i], torch.zeros_like(s[:, i]))
        expected = expected + g_i.unsqueeze(-1) * ffn("experts", i)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("edit, message", [
    (lambda n: n.attrs.update(k="two"), "attribute k='two' has the wrong type"),
    (lambda n: n.attrs.update(bogus=1), "has no attribute 'bogus'"),
    (lambda n: n.attrs.pop("group_score"), "lacks attribute(s) group_score"),
])
def test_verifier_checks_attributes_naming_the_node(edit, message):
    """A pass that edits node.attrs in place gets an IRError from the verifier, not a TypeError from inference."""
    g = _tiny_graph()
    edit(g.node("route"))
    with pytest.raises(IRError) as info:
        verify(g)
    assert info.value.node == "route" and message in info.value.message


def test_verifier_checks_fused_moe_bias_and_k():
    from moe_ir.frontends import load_spec_text
    from moe_ir.passes import PIPELINES, run_pipeline

    spec = load_spec_text("hidden: 16\nexperts: {routed: 8, width: 8, top_k: 2}\nrouter: {score: sigmoid}\n"
                          "balance: {aux_free: {}}\n")
    g = run_pipeline(build_graph(spec), PIPELINES["fused"])
    moe = g.node("moe")
    moe.attrs["k"] = 9
    with pytest.raises(IRError, match="k=9 exceeds 8 experts") as info:
        verify(g)
    assert info.value.node == "moe"
    moe.attrs["k"] = 2
    g.weights["router.bias"].type = TensorType((7,), ElemType.FLOAT32)
    with pytest.raises(IRError, match=r"bias must be \[8\], found f32\[7\]"):
        verify(g)


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_json_round_trip_after_every_pipeline(path):
    """Pass outputs (concat on weights, fused_moe with enum and None attributes) survive JSON too."""
    from moe_ir.passes import PIPELINES, run_pipeline

    for name, passes in PIPELINES.items():
        g = run_pipeline(build_graph(load_spec(path)), list(passes) + ["fuse-gate-up"])
        back = from_json(to_json(g))
        verify(back)
        assert to_text(back) == to_text(g), name


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("nodes"), "missing key 'nodes'"),
    (lambda d: d["inputs"][0]["type"].update(dtype="f99"), "'f99' is not a valid ElemType"),
    (lambda d: d["nodes"][2]["attrs"].update(fn="softmx"), "'softmx' is not a valid ScoreFn"),
    (lambda d: d["outputs"].update(out="nope"), "missing key 'nope'"),
    (lambda d: d.update(weights=5), "not iterable"),
])
def test_json_rejects_damaged_documents_with_ir_errors(edit, message):
    import json

    doc = json.loads(to_json(_tiny_graph()))
    assert doc["nodes"][2]["op"] == "score"
    edit(doc)
    with pytest.raises(IRError, match="malformed moe-ir graph JSON") as info:
        from_json(json.dumps(doc))
    assert message in str(info.value)


@pytest.mark.parametrize("path", [SPECS / "deepseekmoe-16b.yaml", SPECS / "models" / "olmoe-1b-7b.yaml"],
                         ids=["layer", "model"])
def test_last_reads_free_each_intermediate_once_after_its_last_reader(path):
    """Graph.last_reads, written out here from the nodes' operands: every node output that is no graph output
    is listed exactly once, at the last node reading it (at its producer when nothing reads it); graph
    inputs, weights and outputs never."""
    from moe_ir.frontends import load_model_spec
    from moe_ir.model_builder import build_model_graph

    if path.parent.name == "models":
        graph = build_model_graph(load_model_spec(path), routing=True)
    else:
        graph = build_graph(load_spec(path))
    nodes = graph.nodes
    dead = graph.last_reads()
    assert len(dead) == len(nodes)
    where = {}
    for i, names in enumerate(dead):
        for name in names:
            assert name not in where, f"{name} released twice"
            where[name] = i
    outputs = {v.name for v in graph.outputs.values()}
    for i, node in enumerate(nodes):
        for value in node.outputs:
            readers = [j for j, n in enumerate(nodes) if any(v is not None and v.name == value.name for v in n.inputs)]
            if value.name in outputs:
                assert value.name not in where
            else:
                assert where[value.name] == max(readers, default=i)
    assert not set(where) & ({v.name for v in graph.inputs} | set(graph.weights))
