"""ONNX lowering (portable | ort | plugin) against the reference interpreter, run in ONNX Runtime (CPU)."""
from __future__ import annotations

import onnx
import pytest
import torch

from moe_ir.builder import build_graph
from moe_ir.errors import BackendError
from moe_ir.interpreter import interpret
from moe_ir.params import init_weights
from moe_ir.spec import spec_from_dict

pytest.importorskip("onnxruntime")
from moe_ir.backends.onnx import Flavour, OnnxBackend, load_runner, lower, lowered_graph, write_model  # noqa: E402
from moe_ir.backends.onnx.plugin_op import DOMAIN, OP_TYPE, FusedMoEAttrs  # noqa: E402
from moe_ir.spec import Activation, GroupScore, ScoreFn  # noqa: E402

HIDDEN, EXPERTS = 32, 8
ATOL = RTOL = 1e-4  # float32, as moe_ir.validate.TOLERANCES


def make_spec(name="tiny", **sections):
    d = {"name": name, "hidden": HIDDEN, "experts": {"routed": EXPERTS, "width": 16, "top_k": 2, "shared": 2}}
    for key, value in sections.items():
        d[key] = {**d.get(key, {}), **value}
    return spec_from_dict(d)


# routing option -> spec sections; flavours that must refuse it -> a word of the reason
SPECS = {
    "softmax": ({}, {}),
    "softmax_norm_scale": ({"router": {"normalize": True, "scaling": 2.0}}, {}),
    "sigmoid_v3": ({"router": {"score": "sigmoid", "normalize": True, "scaling": 2.5,
                               "group_limit": {"groups": 4, "kept": 2, "score": "top2_sum"}},
                    "balance": {"aux_free": {}}}, {}),
    "group_max": ({"router": {"group_limit": {"groups": 4, "kept": 1}}}, {}),
    "shared_gate_geglu": ({"experts": {"activation": "geglu", "shared_gate": True}}, {"ort": "GEGLU"}),
    "gelu": ({"experts": {"activation": "gelu", "shared": 0}}, {"ort": "gelu"}),
    "relu_bias": ({"experts": {"activation": "relu", "bias": True}}, {"plugin": "biases"}),
    "capacity_score": ({"capacity": {"factor": 1.0}}, {"ort": "dropless", "plugin": "dropless"}),
    "capacity_position": ({"capacity": {"factor": 0.5, "drop": "position"}}, {"ort": "dropless", "plugin": "dropless"}),
    "expert_choice": ({"router": {"choice": "expert"}}, {"ort": "expert-choice", "plugin": "fused_moe"}),
    "noise": ({"router": {"noise": {"std": 1.0}}}, {"plugin": "fused_moe"}),
}


def _weights(graph, seed=0):
    w = init_weights(graph, seed)
    if "router.bias" in w:  # a non-zero correction bias, so selection and weights really differ
        w["router.bias"] = torch.linspace(-0.05, 0.05, EXPERTS)
    return w


def _check(got, ref):
    for key in ("out", "weights"):
        if key in ref:
            r, g = ref[key].double(), got[key].double()
            assert g.shape == r.shape, key
            scale = max(1.0, float(r.abs().max()))
            assert torch.allclose(g, r, atol=ATOL * scale, rtol=RTOL), (key, float((g - r).abs().max()))
    for key in ("expert_idx", "rows"):
        if key in ref:
            assert got[key].dtype == torch.int64
            assert torch.equal(got[key].sort(dim=-1).values, ref[key].sort(dim=-1).values), key


@pytest.mark.parametrize("flavour", [f.value for f in Flavour])
@pytest.mark.parametrize("case", list(SPECS))
def test_flavour_matches_reference(case, flavour):
    sections, refused = SPECS[case]
    spec = make_spec(**sections)
    graph = build_graph(spec)
    backend = OnnxBackend(flavour)
    ok, reason = backend.supports(graph)
    if flavour in refused:
        assert not ok and refused[flavour] in reason, reason
        with pytest.raises(BackendError, match=refused[flavour]):
            backend.prepare(graph, _weights(graph))
        return
    assert ok, reason
    weights = _weights(graph)
    x = torch.randn(3, 11, HIDDEN, generator=torch.Generator().manual_seed(1))
    ref = interpret(graph, {"x": x}, weights, dtype=torch.float64)
    _check(backend.prepare(graph, weights)(x), ref)


def test_capacity_really_drops():
    """The capacity cases above only test something if assignments are dropped at that token count."""
    spec = make_spec(**SPECS["capacity_position"][0])
    graph = build_graph(spec)
    x = torch.randn(3, 11, HIDDEN, generator=torch.Generator().manual_seed(1))
    env = interpret(graph, {"x": x}, _weights(graph), keep_all=True)
    assert int(env["group_sizes"].sum()) < 3 * 11 * 2


# ------------------------------------------------------------------------------------------------
# exported files: one per flavour, run at several token counts


BUILD_SPEC = make_spec("dyn", router={"score": "sigmoid", "normalize": True, "scaling": 1.5},
                       balance={"aux_free": {}})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    graph = build_graph(BUILD_SPEC)
    weights = _weights(graph)
    files = {f.value: OnnxBackend(f).build(BUILD_SPEC, graph, weights, out).files for f in Flavour}
    return graph, weights, files


@pytest.mark.parametrize("flavour", [f.value for f in Flavour])
def test_one_file_runs_any_token_count(built, flavour):
    graph, weights, files = built
    (path,) = files[flavour]
    assert path.name == f"dyn.{flavour}.onnx"
    onnx.checker.check_model(str(path))
    run = load_runner(path)
    for shape in [(1, 1), (1, 7), (4, 250)]:
        x = torch.randn(*shape, HIDDEN, generator=torch.Generator().manual_seed(sum(shape)))
        got = run(x)
        assert got["out"].shape == x.shape and got["expert_idx"].shape == (shape[0] * shape[1], 2)
        _check(got, interpret(graph, {"x": x}, weights, dtype=torch.float64))


def test_model_has_dynamic_dims_and_names_that_map_back(built):
    graph, _, files = built
    model = onnx.load(str(files["portable"][0]))
    x = model.graph.input[0]
    assert [d.dim_param or d.dim_value for d in x.type.tensor_type.shape.dim] == ["B", "S", HIDDEN]
    assert [o.name for o in model.graph.output] == list(graph.outputs)
    ir_names = {n.name for n in lowered_graph(graph, "portable").nodes} | set(graph.outputs)
    assert {n.name.split("/")[0] for n in model.graph.node} <= ir_names
    assert {"router.weight", "router.bias", "experts.w_down[7]"} <= {t.name for t in model.graph.initializer}
    # the fused gate/up weight was folded at export: no Concat reads a weight at run time
    inits = {t.name for t in model.graph.initializer}
    assert not [n for n in model.graph.node if n.op_type == "Concat" and set(n.input) & inits
                and n.name.endswith("w_gate_up")]
    assert {o.domain for o in model.opset_import} == {""}
    assert model.opset_import[0].version >= 18


def test_plugin_graph_has_one_fused_node_with_encoded_attrs(built):
    graph, _, files = built
    model = onnx.load(str(files["plugin"][0]))
    fused = [n for n in model.graph.node if n.domain == DOMAIN]
    assert len(fused) == 1 and fused[0].op_type == OP_TYPE
    fields = {a.name: onnx.helper.get_attribute_value(a) for a in fused[0].attribute}
    attrs = FusedMoEAttrs.decode(fields)
    assert attrs == FusedMoEAttrs(score_fn=ScoreFn.SIGMOID, top_k=2, n_group=1, topk_group=1,
                                  group_score=GroupScore.MAX, normalize=True, scale=1.5, activation=Activation.SWIGLU)
    assert list(fused[0].input)[1:3] == ["router.weight", "router.bias"]
    assert [n.op_type for n in model.graph.node].count("Gemm") >= 2  # the fused shared expert stays ordinary ops


def test_ort_flavour_uses_contrib_moe(built):
    _, _, files = built
    model = onnx.load(str(files["ort"][0]))
    moe = [n for n in model.graph.node if n.op_type == "MoE"]
    assert len(moe) == 1 and moe[0].domain == "com.microsoft"
    fields = {a.name: onnx.helper.get_attribute_value(a) for a in moe[0].attribute}
    assert fields["swiglu_fusion"] == 1 and fields["normalize_routing_weights"] == 1 and fields["k"] == 2


def test_expert_with_zero_tokens():
    """x all positive and one router row all negative: that expert's logit is the lowest for every token."""
    spec = make_spec("zero", experts={"shared": 0})
    graph = build_graph(spec)
    weights = _weights(graph)
    weights["router.weight"][3] = -1.0
    x = torch.rand(2, 9, HIDDEN, generator=torch.Generator().manual_seed(3)) + 0.1
    env = interpret(graph, {"x": x}, weights, dtype=torch.float64, keep_all=True)
    assert int(env["group_sizes"][3]) == 0
    ref = {k: env[v.name] for k, v in graph.outputs.items()}
    for flavour in Flavour:
        _check(OnnxBackend(flavour).prepare(graph, weights)(x), ref)


def test_external_data(tmp_path):
    graph = build_graph(BUILD_SPEC)
    weights = _weights(graph)
    result = OnnxBackend("ort").build(BUILD_SPEC, graph, weights, tmp_path, external_data=True)
    model_path, data_path = result.files
    assert data_path.name == "dyn.ort.onnx.data" and data_path.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dyn.ort.onnx", "dyn.ort.onnx.data"]
    x = torch.randn(1, 5, HIDDEN)
    _check(load_runner(model_path)(x), interpret(graph, {"x": x}, weights, dtype=torch.float64))


def test_failed_write_leaves_nothing(tmp_path):
    graph = build_graph(BUILD_SPEC)
    lowered = lower(lowered_graph(graph, "portable"), _weights(graph), "portable")
    name = next(iter(lowered.initializers))

    def broken():
        raise RuntimeError("disk on fire")

    lowered.initializers[name] = broken
    for external in (False, True):
        with pytest.raises(RuntimeError):
            write_model(lowered, tmp_path / "m.onnx", external_data=external)
    assert list(tmp_path.iterdir()) == []


def test_corrupted_file_is_a_clear_error(built, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf at all" * 10)
    with pytest.raises(BackendError, match="bad.onnx"):
        load_runner(bad)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(built[2]["portable"][0].read_bytes()[:2000])
    with pytest.raises(BackendError, match="truncated.onnx"):
        load_runner(truncated)
    with pytest.raises(BackendError, match="no such"):
        load_runner(tmp_path / "missing.onnx")


def test_wrong_input_shape_is_a_clear_error(built):
    run = load_runner(built[2]["portable"][0])
    with pytest.raises(BackendError, match=r"x must be \[B, S, 32\]"):
        run(torch.randn(1, 4, HIDDEN + 1))
    with pytest.raises(BackendError, match=r"x must be \[B, S, 32\]"):
        run(torch.randn(4, HIDDEN))


def test_unknown_flavour_and_bad_dtype():
    with pytest.raises(BackendError, match="unknown onnx flavour"):
        OnnxBackend("tflite")
    graph = build_graph(spec_from_dict({"hidden": HIDDEN, "dtype": "bfloat16",
                                        "experts": {"routed": EXPERTS, "width": 16, "top_k": 2}}))
    ok, reason = OnnxBackend().supports(graph)
    assert not ok and "float32" in reason


def test_lowering_does_not_mutate_the_graph():
    graph = build_graph(BUILD_SPEC)
    before = [n.name for n in graph.nodes]
    OnnxBackend("plugin").prepare(graph, _weights(graph))
    assert [n.name for n in graph.nodes] == before
