"""Every pass: the structure it produces, and the same numbers before and after (reference interpreter)."""
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from moe_ir.builder import build_graph
from moe_ir.errors import PassError
from moe_ir.frontends import load_spec_text
from moe_ir.interpreter import interpret
from moe_ir.ir import Graph, OpCode, WeightLayout, to_text
from moe_ir.params import init_weights
from moe_ir.passes import PIPELINES, Pass, run_pipeline

GOLDEN = Path(__file__).parent / "golden"

SHARED3_BIAS = """
hidden: 16
experts: {routed: 8, width: 12, top_k: 2, shared: 3, bias: true}
router: {score: sigmoid, group_limit: {groups: 4, kept: 2, score: top2_sum}, normalize: true, scaling: 2.5}
balance: {aux_free: {gamma: 0.001}}
"""
GELU_NO_SHARED = "hidden: 16\nexperts: {routed: 6, width: 10, top_k: 3, activation: gelu}\n"
CAPACITY = "hidden: 16\nexperts: {routed: 4, width: 8, top_k: 2, shared: 1}\ncapacity: {factor: 0.5}\n"
EXPERT_CHOICE = "hidden: 16\nexperts: {routed: 4, width: 8, top_k: 2, shared: 2}\nrouter: {choice: expert}\n"
NOISY = "hidden: 16\nexperts: {routed: 4, width: 8, top_k: 2}\nrouter: {noise: {std: 1.0}}\n"
SPECS = {"shared3_bias": SHARED3_BIAS, "gelu": GELU_NO_SHARED, "capacity": CAPACITY, "expert_choice": EXPERT_CHOICE,
         "noisy": NOISY}


def _run(spec_text: str, passes, training=False):
    spec = load_spec_text(spec_text)
    before = build_graph(spec, training=training)
    weights = {k: v.double() for k, v in init_weights(before, seed=1).items()}
    if "router.bias" in weights:
        weights["router.bias"] = torch.linspace(-0.05, 0.05, weights["router.bias"].numel(), dtype=torch.float64)
    x = torch.randn(3, 7, spec.hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = interpret(before, {"x": x}, weights, dtype=torch.float64)
    after = run_pipeline(build_graph(spec, training=training), passes)
    got = interpret(after, {"x": x}, {k: v for k, v in weights.items() if k in after.weights}, dtype=torch.float64)
    for key in got:
        if got[key].is_floating_point():
            torch.testing.assert_close(got[key], ref[key], rtol=1e-10, atol=1e-10)
        else:
            assert torch.equal(got[key], ref[key]), key
    return before, after


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("pipeline", ["inference", "optimize", "fused"])
def test_pipelines_preserve_numbers(name, pipeline):
    _run(SPECS[name], PIPELINES[pipeline])


def test_fuse_shared_experts_makes_one_ffn_of_total_width():
    _, g = _run(SHARED3_BIAS, ["fuse-shared-experts", "dce"])
    ffns = g.find(OpCode.FFN)
    assert len(ffns) == 1
    assert ffns[0].input("w_up").type.shape == (36, 16) and ffns[0].input("w_down").type.shape == (16, 36)
    concat = ffns[0].input("w_gate").producer
    assert concat.op == OpCode.CONCAT and [v.name for v in concat.inputs] == [f"shared.{i}.w_gate" for i in range(3)]
    assert ffns[0].input("b_down").producer.op == OpCode.ADD


def test_fuse_gate_up_concatenates_gate_then_up():
    _, g = _run(SHARED3_BIAS, ["fuse-gate-up"])
    (grouped,) = g.find(OpCode.GROUPED_FFN)
    assert grouped.attrs["weight_layout"] == WeightLayout.GATE_UP_FUSED
    assert grouped.input("w_gate") is None and grouped.input("b_gate") is None
    assert grouped.input("w_up").type.shape == (8, 24, 16)
    assert [v.name for v in grouped.input("w_up").producer.inputs] == ["experts.w_gate", "experts.w_up"]


def test_fuse_gate_up_leaves_ungated_ffns_alone():
    before, after = _run(GELU_NO_SHARED, ["fuse-gate-up"])
    assert to_text(before) == to_text(after).replace("  # pipeline: fuse-gate-up\n", "")


def test_fuse_moe_replaces_the_routed_chain():
    _, g = _run(SHARED3_BIAS, PIPELINES["fused"])
    ops = [n.op for n in g.nodes]
    assert ops.count(OpCode.FUSED_MOE) == 1
    for gone in (OpCode.LINEAR, OpCode.SCORE, OpCode.TOPK_ROUTE, OpCode.DISPATCH, OpCode.GROUPED_FFN, OpCode.COMBINE):
        assert gone not in ops
    (moe,) = g.find(OpCode.FUSED_MOE)
    assert moe.attrs["score"].value == "sigmoid" and moe.attrs["groups"] == 4 and moe.attrs["scale"] == 2.5
    assert g.outputs["expert_idx"] is moe.outputs[1]


def test_fuse_moe_keeps_training_graphs_and_unfusable_routers():
    for text, training in ((SHARED3_BIAS, True), (EXPERT_CHOICE, False), (NOISY, False)):
        g = run_pipeline(build_graph(load_spec_text(text), training=training), ["fuse-moe"])
        assert not g.find(OpCode.FUSED_MOE)


def test_dce_removes_unused_weights_and_nodes():
    g = build_graph(load_spec_text(SHARED3_BIAS.replace("balance: {", "balance: {expert: 0.01, z_loss: 0.001, ")),
                    training=True)
    n_before = len(g)
    g = run_pipeline(g, ["strip-training-outputs", "dce"])
    assert len(g) < n_before
    assert not g.find(OpCode.BALANCE_LOSS)
    assert set(g.outputs) == {"out", "expert_idx", "weights"}


def test_golden_fused_pipeline_text():
    g = run_pipeline(build_graph(load_spec_text(SHARED3_BIAS)), PIPELINES["fused"] + ("fuse-gate-up",))
    text = to_text(g)
    golden = GOLDEN / "fused_shared3_bias.txt"
    import os

    if os.environ.get("MOE_IR_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


@dataclass(frozen=True)
class _BreakingPass(Pass):
    name = "break-types"
    summary = "corrupts a type (test only)"

    def __call__(self, graph: Graph):
        graph.node("scores").outputs[0].type = graph.value("x").type
        return graph, True


def test_manager_names_the_failing_pass_and_what_ran_before():
    g = build_graph(load_spec_text(GELU_NO_SHARED))
    with pytest.raises(PassError, match=r"pass 'break-types' failed after \['strip-training-outputs', 'dce'\]"):
        run_pipeline(g, ["strip-training-outputs", "dce", _BreakingPass()])


def test_unknown_pass():
    with pytest.raises(PassError, match="unknown pass 'nope'"):
        run_pipeline(build_graph(load_spec_text(GELU_NO_SHARED)), ["nope"])


@dataclass(frozen=True)
class _ForgetfulPass(Pass):
    name = "forgetful"
    summary = "returns the graph alone (test only)"

    def __call__(self, graph: Graph):
        return graph


def test_manager_checks_the_pass_contract():
    g = build_graph(load_spec_text(GELU_NO_SHARED))
    with pytest.raises(PassError, match=r"pass 'forgetful' broke the pass contract after \['dce'\]: it must return "
                                         r"\(graph, modified: bool\), returned Graph"):
        run_pipeline(g, ["dce", _ForgetfulPass()])
