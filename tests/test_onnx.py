"""ONNX lowering (portable | ort | plugin) against the reference interpreter, run in ONNX Runtime (CPU)."""
from __future__ import annotations

import dataclasses

import onnx
import pytest
import torch

from moe_ir.builder import build_graph
from moe_ir.errors import BackendError
from moe_ir.interpreter import interpret
from moe_ir.params import init_weights
from moe_ir.passes import run_pipeline
from moe_ir.spec import spec_from_dict

pytest.importorskip("onnxruntime")
from moe_ir.backends.onnx import Flavour, OnnxBackend, load_runner, lower, lowered_graph, write_model  # noqa: E402
from moe_ir.backends.onnx import verify  # noqa: E402
from moe_ir.backends.onnx.emit import to_numpy  # noqa: E402
from moe_ir.backends.onnx.plugin_op import DOMAIN, OP_TYPE, FusedMoEAttrs  # noqa: E402
from moe_ir.spec import Activation, DType, GroupScore, ScoreFn  # noqa: E402
from moe_ir.validate import TOLERANCES  # noqa: E402

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


@pytest.mark.parametrize("flavour", [f.value for f in Flavour])
def test_empty_batch_runs(built, flavour):
    """B or S = 0 puts a 0 in the restore-tokens shape, which Reshape read as "copy this dim" (allowzero=0):
    x [1, 0, H] failed in onnxruntime with "cannot reshape {0,32} to {1,32,32}"."""
    graph, weights, files = built
    run = load_runner(files[flavour][0])
    for shape in [(1, 0), (0, 3)]:
        x = torch.randn(*shape, HIDDEN)
        got = run(x)
        ref = interpret(graph, {"x": x}, weights, dtype=torch.float64)
        assert {k: tuple(got[k].shape) for k in ref} == {k: tuple(v.shape) for k, v in ref.items()}
        assert got["out"].shape == x.shape


def test_missing_external_data_is_a_clear_error(tmp_path):
    graph = build_graph(BUILD_SPEC)
    weights = _weights(graph)
    for flavour in ("portable", "plugin"):
        model_path, data_path = OnnxBackend(flavour).build(BUILD_SPEC, graph, weights, tmp_path,
                                                           external_data=True).files
        data_path.unlink()
        # the plugin flavour loads the data itself (onnxruntime-extensions needs the model in memory)
        with pytest.raises(BackendError, match=f"dyn.{flavour}.onnx"):
            load_runner(model_path)


def test_cli_build_shows_progress_and_refuses_options_it_does_not_take(tmp_path, capsys):
    from conftest import SPECS
    from moe_ir.cli import main

    assert main(["build", str(SPECS / "tiny.yaml"), "--backend", "onnx", "-o", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "  weights: " in err and "(100%)" in err
    for option, value in (("--precision", "bf16"), ("--profile", "1,2,3")):
        code = main(["build", str(SPECS / "tiny.yaml"), "--backend", "onnx", option, value, "-o",
                     str(tmp_path / "b")])
        err = capsys.readouterr().err
        assert code == 2 and f"backend 'onnx' does not take {option}" in err and err.count("moe-ir: error:") == 1
        assert not (tmp_path / "b").exists()


def test_unknown_flavour_and_bad_dtype():
    with pytest.raises(BackendError, match="unknown onnx flavour"):
        OnnxBackend("tflite")
    def graph_in(dtype):
        return build_graph(spec_from_dict({"hidden": HIDDEN, "dtype": dtype,
                                           "experts": {"routed": EXPERTS, "width": 16, "top_k": 2}}))

    # bf16 exports in the portable and plugin flavours (tests below); the ort flavour stays float32.
    ok, reason = OnnxBackend("ort").supports(graph_in("bfloat16"))
    assert not ok and "float32" in reason
    ok, reason = OnnxBackend().supports(graph_in("float64"))
    assert not ok and "f64" in reason


def test_lowering_does_not_mutate_the_graph():
    graph = build_graph(BUILD_SPEC)
    before = [n.name for n in graph.nodes]
    OnnxBackend("plugin").prepare(graph, _weights(graph))
    assert [n.name for n in graph.nodes] == before


# ------------------------------------------------------------------------------------------------
# float16 / bfloat16 exports (portable and plugin flavours)
#
# What runs where: fp16 files run in ONNX Runtime on CPU (prepare/load_runner); bf16 files do not (no
# bf16 arithmetic kernels on ORT's CPU provider, no numpy bf16 in its Python API), so prepare refuses
# with the reason while build writes them. Every low-precision file is checked structurally (types of
# every initializer, input and output; onnx's strict type inference with the FusedMoE schema) and
# numerically through onnx's reference evaluator (verify.evaluate), against the reference interpreter
# in float64 on the same rounded weights, with the per-dtype tolerance of moe-ir validate.

LOW = {"float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16}
F32, I64, I32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.INT32
LOW_CASES = ("sigmoid_v3", "shared_gate_geglu")


def _low_spec(case, dtype):
    return dataclasses.replace(make_spec(f"{case}-{dtype}", **SPECS[case][0]), dtype=DType(dtype))


@pytest.fixture(scope="module")
def low_built(tmp_path_factory):
    """(spec, graph, weights, {flavour: path}) per (case, dtype), built once."""
    out = tmp_path_factory.mktemp("onnx_low")
    built = {}
    for case in LOW_CASES:
        for dtype in LOW:
            spec = _low_spec(case, dtype)
            graph = build_graph(spec)
            weights = _weights(graph)
            files = {f: OnnxBackend(f).build(spec, graph, weights, out).files[0] for f in ("portable", "plugin")}
            built[case, dtype] = (spec, graph, weights, files)
    return built


def _close(got, ref, dtype):
    atol, rtol = TOLERANCES[dtype]
    r, g = ref.double(), got.double()
    assert g.shape == r.shape
    bound = atol * max(1.0, float(r.abs().max())) + rtol * r.abs()
    assert bool(((g - r).abs() <= bound).all()), float((g - r).abs().max())


def _types(model):
    """Element type of every tensor: initializers, graph inputs/outputs, inferred values."""
    inferred = verify.infer_strict(model)
    types = {t.name: t.data_type for t in model.graph.initializer}
    for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        types.setdefault(v.name, v.type.tensor_type.elem_type)
    return types


@pytest.mark.parametrize("dtype", list(LOW))
@pytest.mark.parametrize("flavour", ["portable", "plugin"])
@pytest.mark.parametrize("case", LOW_CASES)
def test_low_precision_graph_types(low_built, case, dtype, flavour):
    spec, graph, weights, files = low_built[case, dtype]
    model = onnx.load(str(files[flavour]))
    onnx.checker.check_model(model, full_check=True)
    types = _types(model)  # strict: raises on any type or shape inconsistency
    low = LOW[dtype]
    # Weights (named by IR values; lowering constants are "<node>/<hint>"): the router's in float32,
    # every expert/shared weight in the spec dtype.
    weight_inits = [t for t in model.graph.initializer if "/" not in t.name]
    assert {t.name.split("[")[0] for t in weight_inits} >= {"router.weight", "experts.w_down"}
    for t in weight_inits:
        assert t.data_type == (F32 if t.name.startswith("router.") else low), (t.name, t.data_type)
    assert {t.data_type for t in model.graph.initializer} <= {F32, low, I64}
    assert [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input] == [("x", low)]
    assert [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output] == \
        [("out", low), ("expert_idx", I64), ("weights", F32)]
    # Selection runs on float32 scores (TopK on int64 keys sorts dispatch in portable).
    for node in model.graph.node:
        if node.op_type == "TopK":
            assert types[node.input[0]] in (F32, I64), node.name
    # The router projection reads the tokens through an explicit Cast to float32.
    router = next(n for n in model.graph.node if n.name == "router_logits") if flavour == "portable" else None
    if router is not None:
        cast = next(n for n in model.graph.node if n.output[0] == router.input[0])
        assert cast.op_type == "Cast" and types[cast.input[0]] == low and router.input[1] == "router.weight"
    if flavour == "plugin":
        fused = [n for n in model.graph.node if n.op_type == OP_TYPE]
        assert len(fused) == 1 and fused[0].domain == DOMAIN
        node = fused[0]
        assert [types[i] for i in node.input] == [low, F32, F32, low, low]
        bias = "router.bias" if spec.balance.aux_free else "moe.fused/bias_zeros"  # the contract's fixed signature
        assert list(node.input[1:]) == ["router.weight", bias, "moe.w_gate_up", "experts.w_down"]
        assert [types[o] for o in node.output] == [low, I32, F32]
        assert not [n for n in model.graph.node if n.op_type in ("TopK", "ScatterND")]  # all inside the plugin


@pytest.mark.parametrize("dtype", list(LOW))
@pytest.mark.parametrize("flavour", ["portable", "plugin"])
@pytest.mark.parametrize("case", LOW_CASES)
def test_low_precision_graph_matches_reference(low_built, case, dtype, flavour):
    """The exported f16/bf16 graph, run op by op in its own types by onnx's reference evaluator."""
    spec, graph, weights, files = low_built[case, dtype]
    model = onnx.load(str(files[flavour]))
    for shape in [(1, 1), (2, 7)]:
        x = torch.randn(*shape, HIDDEN, generator=torch.Generator().manual_seed(sum(shape))).to(spec.dtype.torch)
        got = verify.evaluate(model, x)
        ref = interpret(graph, {"x": x}, weights, dtype=torch.float64)
        assert got["out"].dtype == spec.dtype.torch and got["weights"].dtype == torch.float32
        _close(got["out"], ref["out"], dtype)
        _close(got["weights"], ref["weights"], "float32")  # the router is float32 end to end
        assert torch.equal(got["expert_idx"].sort(dim=-1).values, ref["expert_idx"].sort(dim=-1).values)


@pytest.mark.parametrize("case", [c for c, (_, refused) in SPECS.items() if "portable" not in refused])
def test_every_portable_case_in_bfloat16(case):
    """Every routing option's lowering (capacity drops, expert choice, gelu, biases) type-checks in bf16
    and means what the IR means, through the reference evaluator."""
    spec = _low_spec(case, "bfloat16")
    graph = build_graph(spec)
    weights = _weights(graph)
    lowered = lower(lowered_graph(graph, "portable"), weights, "portable")
    model = onnx.ModelProto()
    model.CopyFrom(lowered.model)
    model.graph.initializer.extend(onnx.numpy_helper.from_array(to_numpy(t()), n)
                                   for n, t in lowered.initializers.items())
    verify.infer_strict(model)
    x = torch.randn(3, 11, HIDDEN, generator=torch.Generator().manual_seed(1)).bfloat16()
    got, ref = verify.evaluate(model, x), interpret(graph, {"x": x}, weights, dtype=torch.float64)
    _close(got["out"], ref["out"], "bfloat16")
    for key in ("expert_idx", "rows"):
        if key in ref:
            assert torch.equal(got[key].sort(dim=-1).values, ref[key].sort(dim=-1).values), key
    if "weights" in ref:
        _close(got["weights"], ref["weights"], "float32")


def test_low_precision_checks_can_fail(low_built):
    """A type slip the exporter could make (an expert weight left in float32, a bf16 router) is caught by
    the strict inference the tests above rely on."""
    _, _, _, files = low_built["sigmoid_v3", "bfloat16"]
    portable = onnx.load(str(files["portable"]))
    w = next(t for t in portable.graph.initializer if t.name == "experts.w_down[0]")
    w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w).astype("float32"), w.name))
    with pytest.raises(onnx.shape_inference.InferenceError):
        verify.infer_strict(portable)
    plugin = onnx.load(str(files["plugin"]))
    r = next(t for t in plugin.graph.initializer if t.name == "router.weight")
    r.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(r).astype("float16"), r.name))
    with pytest.raises(onnx.shape_inference.InferenceError):
        verify.infer_strict(plugin)


@pytest.mark.parametrize("flavour", ["portable", "plugin"])
def test_float16_runs_in_onnxruntime(low_built, flavour):
    spec, graph, weights, files = low_built["sigmoid_v3", "float16"]
    run = load_runner(files[flavour])
    prepared = OnnxBackend(flavour).prepare(graph, weights)
    for shape in [(1, 1), (1, 7), (4, 250)]:
        x = torch.randn(*shape, HIDDEN, generator=torch.Generator().manual_seed(sum(shape))).half()
        ref = interpret(graph, {"x": x}, weights, dtype=torch.float64)
        for got in (run(x), prepared(x)):
            _close(got["out"], ref["out"], "float16")
            _close(got["weights"], ref["weights"], "float32")
            assert torch.equal(got["expert_idx"].sort(dim=-1).values, ref["expert_idx"].sort(dim=-1).values)
    assert prepared(x)["out"].dtype == torch.float16


@pytest.mark.parametrize("flavour", ["portable", "plugin"])
def test_bfloat16_is_exported_but_not_run_here(low_built, flavour):
    from moe_ir.validate import validate

    spec, graph, weights, files = low_built["sigmoid_v3", "bfloat16"]
    with pytest.raises(BackendError, match="bfloat16 models do not run in ONNX Runtime.*not installed"):
        OnnxBackend(flavour).prepare(graph, weights)
    with pytest.raises(BackendError, match=f"{files[flavour].name}: bfloat16 models do not run"):
        load_runner(files[flavour])
    # validate reports it as skipped with that reason; the float16 run of the same spec passes.
    (row,) = validate(spec, [OnnxBackend(flavour)], dtype="bfloat16", tokens=4).results
    assert row.status == "skipped" and "bfloat16 models do not run" in row.reason
    (row,) = validate(spec, [OnnxBackend(flavour)], dtype="float16", tokens=4).results
    assert row.status == "ok", row


def test_bfloat16_external_data_round_trip(low_built, tmp_path):
    spec, graph, weights, files = low_built["shared_gate_geglu", "bfloat16"]
    result = OnnxBackend("portable").build(spec, graph, weights, tmp_path, external_data=True)
    external = onnx.load(str(result.files[0]))
    embedded = onnx.load(str(files["portable"]))
    ext = {t.name: onnx.numpy_helper.to_array(t) for t in external.graph.initializer}
    emb = {t.name: onnx.numpy_helper.to_array(t) for t in embedded.graph.initializer}
    assert ext.keys() == emb.keys()
    for name in emb:
        assert ext[name].dtype == emb[name].dtype and ext[name].tobytes() == emb[name].tobytes(), name


def test_combine_is_deterministic_with_intra_op_threads():
    """ONNX Runtime's CPU ScatterND(reduction=add) races on duplicate indices (a token's k rows) when it runs
    on several threads; at this shape that lost a row of some token in most runs. Combine must not use it."""
    spec = spec_from_dict({"name": "wide", "hidden": 2048, "experts": {"routed": 16, "width": 32, "top_k": 6}})
    backend = OnnxBackend("portable")
    graph = run_pipeline(build_graph(spec), backend.pipeline)
    weights = {k: v for k, v in init_weights(build_graph(spec), 0).items() if k in graph.weights}
    assert not [n for n in lower(graph, weights, "portable").model.graph.node if n.op_type == "ScatterND"]
    x = torch.randn(1, 1024, 2048, generator=torch.Generator().manual_seed(0))
    ref = interpret(graph, {"x": x}, weights, dtype=torch.float64)["out"]
    run = backend.prepare(graph, weights, threads=2)
    errors = [(run(x)["out"].double() - ref).abs().max().item() for _ in range(6)]
    assert max(errors) < 1e-5, errors
