"""Golden text of the emitted ONNX, per flavour: a change in the lowering shows as a readable diff.

Each flavour lowers the tiny layer spec (specs/tiny.yaml), and the portable and ort flavours a tiny
two-layer model (a dense first layer, then an MoE layer), through the flavour's own pass pipeline; the
model's text form (backends/onnx/text.py: nodes, attributes, tensor names, initializer names with dtype
and shape, no weight values) must equal the checked-in file in tests/golden/onnx/. After an intended
change, regenerate with MOE_IR_UPDATE_GOLDEN=1 and review the diff.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from moe_ir.builder import build_graph
from moe_ir.frontends import load_model_spec_text, load_spec
from moe_ir.model_builder import build_model_graph
from moe_ir.params import init_weights

from conftest import SPECS

pytest.importorskip("onnx")
from moe_ir.backends.onnx import Flavour, lower, lowered_graph  # noqa: E402
from moe_ir.backends.onnx.text import lowered_text  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "onnx"

TINY_MODEL = """\
model:
  name: tiny-model
  vocab_size: 16
  hidden: 16
  layers: 2
  first_dense: 1
  dense_width: 24
  attention: {kind: gqa, heads: 4, kv_heads: 2}
moe:
  experts: {routed: 4, shared: 1, width: 8, top_k: 2}
  router: {score: softmax, normalize: true}
"""


def _layer():
    return build_graph(load_spec(SPECS / "tiny.yaml"))


def _model():
    return build_model_graph(load_model_spec_text(TINY_MODEL), routing=True)


def _check_golden(graph, flavour: str, stem: str) -> None:
    lowered = lower(lowered_graph(graph, flavour), init_weights(graph, 0), flavour)
    text = lowered_text(lowered)
    golden = GOLDEN / f"{stem}.{flavour}.txt"
    if os.environ.get("MOE_IR_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"{golden} is missing; rerun with MOE_IR_UPDATE_GOLDEN=1 to write it"
    assert text == golden.read_text(), f"ONNX lowering output changed; rerun with MOE_IR_UPDATE_GOLDEN=1 if intended"


@pytest.mark.parametrize("flavour", [f.value for f in Flavour])
def test_layer_lowering_matches_golden(flavour):
    _check_golden(_layer(), flavour, "tiny")


@pytest.mark.parametrize("flavour", [Flavour.PORTABLE.value, Flavour.ORT.value])
def test_model_lowering_matches_golden(flavour):
    _check_golden(_model(), flavour, "tiny-model")


def test_golden_text_pins_what_the_flavour_emits():
    """The text form carries what tells flavours apart and leaves weight values out."""
    texts = {f: (GOLDEN / f"tiny.{f}.txt").read_text() for f in ("portable", "ort", "plugin")}
    assert "com.microsoft::MoE<" in texts["ort"] and "MoE" not in texts["portable"].replace("moe", "")
    assert "moe_ir::FusedMoE<" in texts["plugin"] and "FusedMoE" not in texts["portable"]
    assert "weight %experts.w_down[0]: float32[" in texts["portable"]  # per-expert slices, by name and shape
    assert "meta moe_ir.spec_hash = <spec hash>" in texts["portable"]


def test_golden_text_changes_when_the_lowering_does():
    """The printer shows an attribute change: a golden test over it cannot pass on a different lowering."""
    graph = _layer()
    lowered = lower(lowered_graph(graph, "ort"), init_weights(graph, 0), "ort")
    before = lowered_text(lowered)
    moe = next(n for n in lowered.model.graph.node if n.op_type == "MoE")
    next(a for a in moe.attribute if a.name == "k").i += 1
    assert lowered_text(lowered) != before
