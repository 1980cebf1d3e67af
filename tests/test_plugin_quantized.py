"""Quantized routed experts through the plugin contract (moe_ir::QFusedMoE): fuse-gate-up-quantized, the ONNX
plugin flavour run in onnxruntime with the onnxruntime-extensions op, the TensorRT plugin's torch reference,
shape logic and plugin fields, all against the quantized reference interpreter; malformed contracts and
formats the plugin cannot take are refused by name."""
import os

import numpy as np
import pytest
import torch

from moe_ir.backends import get_backend
from moe_ir.backends.onnx import plugin_op
from moe_ir.backends.onnx.extensions import qfused_moe_torch
from moe_ir.builder import build_graph
from moe_ir.errors import BackendError
from moe_ir.interpreter import interpret
from moe_ir.ir import OpCode, op_def
from moe_ir.ir.quant_ops import dequantize
from moe_ir.params import init_weights
from moe_ir.passes import run_pipeline
from moe_ir.spec import spec_from_dict

# odd sizes: 5 routed experts of width 96 (3 blocks of 32), hidden 64, top-3, sigmoid scores, one shared expert
LAYER = {"name": "qplug", "hidden": 64, "experts": {"routed": 5, "shared": 1, "width": 96, "top_k": 3},
         "router": {"score": "sigmoid", "normalize": True, "scaling": 1.5}}
CASES = [("int4", True), ("int4", False), ("int8", True), ("int8", False)]
IDS = [f"{f}-{'sym' if s else 'zp'}" for f, s in CASES]
TOL = dict(rtol=1e-5, atol=1e-5)
PIPELINE = ("strip-training-outputs", "fuse-shared-experts", "fuse-moe", "fuse-gate-up-quantized", "dce")


def quantized_layer(fmt: str, symmetric: bool, block: int = 32, **overrides):
    graph = build_graph(spec_from_dict({**LAYER, **overrides,
                                        "quantization": {"format": fmt, "block": block, "symmetric": symmetric}}))
    return graph, init_weights(graph, 3)


def inputs(tokens: int) -> torch.Tensor:
    return torch.randn(2, tokens, 64, generator=torch.Generator().manual_seed(tokens))


# ------------------------------------------------------------------------------------------------
# the pass


@pytest.mark.parametrize("fmt,symmetric", CASES[:2], ids=IDS[:2])
def test_fuse_gate_up_quantized_concatenates_the_stored_parts(fmt, symmetric):
    graph, weights = quantized_layer(fmt, symmetric)
    fused = run_pipeline(quantized_layer(fmt, symmetric)[0], PIPELINE)  # passes rewrite the graph in place
    (moe,) = fused.find(OpCode.FUSED_MOE)
    assert moe.input("w_gate") is None
    dq = moe.input("w_up").producer
    assert dq.op == OpCode.DEQUANTIZE and dq.attrs["block"] == 32
    # the parts are concatenations of the stored gate and up parts along the rows (gate first)
    for i, part in enumerate(("qweight", "scales", "zeros")):
        concat = dq.inputs[i].producer if dq.inputs[i] is not None else None
        if part == "zeros" and symmetric:
            assert dq.inputs[i] is None
            continue
        assert concat.op == OpCode.CONCAT and concat.attrs["axis"] == 1
        assert [v.name for v in concat.inputs] == [f"experts.w_gate.{part}", f"experts.w_up.{part}"]
    # exact: the reference gives the same numbers before and after
    kept = {k: v for k, v in weights.items() if k in fused.weights}
    x = inputs(5)
    before = interpret(graph, {"x": x}, weights, dtype=torch.float64)["out"]
    after = interpret(fused, {"x": x}, kept, dtype=torch.float64)["out"]
    assert torch.equal(before, after)
    # plain fuse-gate-up (the other backends' pipelines) keeps quantized gate/up apart
    apart = run_pipeline(quantized_layer(fmt, symmetric)[0],
                         ("strip-training-outputs", "fuse-moe", "fuse-gate-up", "dce"))
    (moe,) = apart.find(OpCode.FUSED_MOE)
    assert moe.input("w_gate") is not None


# ------------------------------------------------------------------------------------------------
# the ONNX plugin flavour in onnxruntime (onnxruntime-extensions' CPU op)


@pytest.mark.parametrize("fmt,symmetric", CASES, ids=IDS)
def test_onnx_plugin_quantized_equals_the_reference(tmp_path, fmt, symmetric):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime_extensions")
    graph, weights = quantized_layer(fmt, symmetric)
    backend = get_backend("onnx:plugin")
    piped = run_pipeline(graph, backend.pipeline)
    assert backend.supports(piped) == (True, "")
    run = backend.prepare(piped, weights)
    for tokens in (1, 7):
        x = inputs(tokens)
        ref = interpret(graph, {"x": x}, weights, dtype=torch.float64)
        got = run(x)
        assert torch.equal(got["expert_idx"], ref["expert_idx"])
        torch.testing.assert_close(got["out"].double(), ref["out"], **TOL)
    spec = spec_from_dict({**LAYER, "quantization": {"format": fmt, "block": 32, "symmetric": symmetric}})
    result = backend.build(spec, piped, weights, tmp_path / "onnx")
    model = onnx.load(str(next(p for p in result.files if p.suffix == ".onnx")))
    (node,) = [n for n in model.graph.node if n.domain == plugin_op.DOMAIN]
    assert node.op_type == plugin_op.QUANT_OP_TYPE and len(node.input) == len(plugin_op.QUANT_INPUT_NAMES)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    bits = 4 if fmt == "int4" else 8
    assert (attrs["quant_format"], attrs["bits"], attrs["block"], attrs["symmetric"]) == \
        (int(fmt == "int4"), bits, 32, int(symmetric))
    init = {t.name: t for t in model.graph.initializer}
    codes, scales, zeros, d_codes, d_scales, d_zeros = (init.get(name) for name in node.input[3:])
    assert codes.data_type == onnx.TensorProto.INT8 and list(codes.dims) == [5, 192, 64 * bits // 8]
    assert scales.data_type == onnx.TensorProto.FLOAT and list(scales.dims) == [5, 192, 2]
    assert list(d_codes.dims) == [5, 64, 96 * bits // 8] and list(d_scales.dims) == [5, 64, 3]
    zeros = zeros if zeros is not None else next(  # a small constant: the symmetric placeholder
        a.t for n in model.graph.node if n.output[0] == node.input[5] for a in n.attribute)
    assert list(zeros.dims) == ([1] if symmetric else [5, 192, 2]) and zeros.data_type == onnx.TensorProto.INT8
    if symmetric:
        assert onnx.numpy_helper.to_array(zeros).tolist() == [8 if fmt == "int4" else 0]
    # the codes are the stored bytes, gate rows then up rows, bit for bit
    stored = torch.cat([weights["experts.w_gate.qweight"], weights["experts.w_up.qweight"]], dim=1)
    got_bytes = onnx.numpy_helper.to_array(codes).view(np.uint8 if stored.dtype == torch.uint8 else np.int8)
    assert np.array_equal(got_bytes, stored.numpy())
    # no float copy of a routed expert matrix, no DequantizeLinear for the routed experts
    assert not [n for n in model.graph.node if n.op_type == "DequantizeLinear" and "experts" in n.input[0]]


def test_onnx_plugin_refuses_what_qfusedmoe_cannot_take():
    backend = get_backend("onnx:plugin")
    graph, _ = quantized_layer("fp8_e4m3", True, block=16)
    ok, reason = backend.supports(run_pipeline(graph, backend.pipeline))
    assert not ok and "fp8_e4m3" in reason and plugin_op.QUANT_PLUGIN_NAME in reason, reason
    graph = build_graph(spec_from_dict({**LAYER, "hidden": 512, "experts": {**LAYER["experts"], "width": 512},
                                        "quantization": {"format": "int8", "block": 512}}))  # the IR takes it
    ok, reason = backend.supports(run_pipeline(graph, backend.pipeline))
    assert not ok and "block 512 does not fit" in reason, reason


# ------------------------------------------------------------------------------------------------
# the contract's attribute and shape checks (the extensions op, as a runtime meets a malformed file)


def _contract_args(fmt="int4", symmetric=False):
    graph, weights = quantized_layer(fmt, symmetric)
    piped = run_pipeline(graph, PIPELINE)
    (moe,) = piped.find(OpCode.FUSED_MOE)
    kept = {k: v for k, v in weights.items() if k in piped.weights}
    fields = {**plugin_op.FusedMoEAttrs.from_node(moe).encode(), **plugin_op.quant_attrs_of(moe).encode()}
    from moe_ir.backends.onnx.weights import Initializers

    inits = Initializers(piped, kept)
    parts = []
    for _, value in plugin_op.quantized_inputs(moe):
        if value is None:
            parts.append(torch.tensor([8 if fmt == "int4" else 0], dtype=torch.int8))
            continue
        t = inits.evaluate_stored(value)
        stored = value.type.dtype.torch
        parts.append(t if stored.is_floating_point else t.to(stored).view(torch.int8))
    x = inputs(4).reshape(-1, 64)
    # the reference: the fused_moe op of the IR on the dequantized weights, in float64
    float_weights = {}
    for key in ("w_up", "w_down"):
        dq = moe.input(key).producer
        args = [None if v is None else inits.evaluate_stored(v).to(v.type.dtype.torch) for v in dq.inputs]
        float_weights[key] = dequantize(args[0], args[1].double(), args[2], dq.attrs["format"], dq.attrs["block"])
    ref = op_def(OpCode.FUSED_MOE).reference(moe.attrs, x.double(), kept["router.weight"].double(), None,
                                            float_weights["w_up"], float_weights["w_down"], None, None, None, None)
    return x, kept["router.weight"], torch.zeros(5), parts, fields, ref


def test_extensions_op_equals_the_reference_and_checks_its_contract():
    x, w_router, bias, parts, fields, (r_out, r_idx, r_w) = _contract_args()
    out, idx, w = qfused_moe_torch(x, w_router, bias, *parts, **fields)
    assert torch.equal(idx.long(), r_idx) and idx.dtype == torch.int32
    torch.testing.assert_close(w.double(), r_w, **TOL)
    torch.testing.assert_close(out.double(), r_out, **TOL)
    bad_scales = list(parts)
    bad_scales[1] = parts[1][:, :, :1].contiguous()
    with pytest.raises(BackendError, match=r"w_gate_up_scales has shape \(5, 192, 1\), expected \(5, 192, 2\)"):
        qfused_moe_torch(x, w_router, bias, *bad_scales, **fields)
    with pytest.raises(BackendError, match="attribute block=48 is not one of 16, 32"):
        qfused_moe_torch(x, w_router, bias, *parts, **dict(fields, block=48))
    with pytest.raises(BackendError, match="block=64 does not divide the expert width 96$"):
        qfused_moe_torch(x, w_router, bias, *parts, **dict(fields, block=64))  # a real block, not this file's
    with pytest.raises(BackendError, match=r"w_gate_up_scales has shape \(5, 192, 2\), expected \(5, 192, 4\)"):
        qfused_moe_torch(x, w_router, bias, *parts, **dict(fields, block=16))
    with pytest.raises(BackendError, match="bits=8 does not match quant_format int4"):
        qfused_moe_torch(x, w_router, bias, *parts, **dict(fields, bits=8))
    with pytest.raises(BackendError, match="missing attribute 'symmetric'"):
        qfused_moe_torch(x, w_router, bias, *parts, **{k: v for k, v in fields.items() if k != "symmetric"})
    bad_zeros = list(parts)
    bad_zeros[2] = torch.tensor([8], dtype=torch.int8)  # a symmetric placeholder where zero points belong
    with pytest.raises(BackendError, match=r"w_gate_up_zeros has shape \(1,\), expected \(5, 192, 2\)"):
        qfused_moe_torch(x, w_router, bias, *bad_zeros, **fields)


# ------------------------------------------------------------------------------------------------
# the TensorRT plugin (backends/tensorrt/plugin.py, standalone): tables, torch reference, shape logic, fields

from moe_ir.backends.tensorrt import plugin as P  # noqa: E402


def test_quantized_tables_match_the_onnx_contract():
    assert P.QUANT_PLUGIN_OP == plugin_op.QUANT_OP_TYPE and P.QUANT_PLUGIN_ID == plugin_op.QUANT_PLUGIN_NAME
    assert P.QUANT_INPUT_NAMES == plugin_op.QUANT_INPUT_NAMES
    assert P.QUANT_ATTRIBUTE_NAMES == plugin_op.QUANT_ATTRIBUTE_NAMES and P.QUANT_BLOCKS == plugin_op.QUANT_BLOCKS
    assert {P.QUANT_FORMATS[c]: c for c in range(len(P.QUANT_FORMATS))} == \
        {k.value: v for k, v in plugin_op.QUANT_FORMAT_CODES.items()}
    assert P.QUANT_BITS == {k.value: v for k, v in plugin_op.QUANT_BITS.items()}
    for fmt, symmetric in CASES:
        quant = P.QuantConfig(fmt, 32, symmetric)
        assert quant.to_fields() == plugin_op.QuantAttrs.decode(quant.to_fields()).encode()
        assert P.QuantConfig.from_fields({k: np.array([v], np.int32) for k, v in quant.to_fields().items()}) == quant


def _trt_configs(fields):
    return (P.MoEConfig.from_fields({k: fields[k] for k in P.ATTRIBUTE_NAMES}),
            P.QuantConfig.from_fields({k: fields[k] for k in P.QUANT_ATTRIBUTE_NAMES}))


@pytest.mark.parametrize("fmt,symmetric", CASES, ids=IDS)
def test_plugin_torch_reference_equals_the_reference(fmt, symmetric):
    x, w_router, bias, parts, fields, (r_out, r_idx, r_w) = _contract_args(fmt, symmetric)
    cfg, quant = _trt_configs(fields)
    out, idx, w = P.fused_moe_quantized_torch(x, w_router, bias, *parts, cfg, quant)
    assert torch.equal(idx.long(), r_idx) and idx.dtype == torch.int32 and w.dtype == torch.float32
    torch.testing.assert_close(w.double(), r_w, **TOL)
    torch.testing.assert_close(out.double(), r_out, **TOL)


def test_plugin_torch_reference_dequantizes_one_expert_at_a_time():
    x, w_router, bias, parts, fields, _ = _contract_args("int4", False)
    cfg, quant = _trt_configs(fields)
    float_stack = 5 * 192 * 64 * 4  # every expert's gate/up weight in float32
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        P.fused_moe_quantized_torch(x, w_router, bias, *parts, cfg, quant)
    largest = max(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
    assert largest < float_stack / 2, largest  # one expert's matrix (192 x 64 floats) at most


def test_plugin_shape_logic_is_symbolic_and_names_mismatches():
    cfg = P.MoEConfig("sigmoid", 3, 1, 1, "max", True, 1.5, "swiglu")
    quant = P.QuantConfig("int4", 32, False)
    gate_up = [(5, 192, 32), (5, 192, 2), (5, 192, 2)]
    down = [(5, 64, 48), (5, 64, 3), (5, 64, 3)]
    assert P.check_quantized_shapes(("T", 64), (5, 64), (5,), gate_up, down, cfg, quant) == (5, 64, 96)
    assert P.output_shapes(("T", 64), cfg) == (("T", 64), ("T", 3), ("T", 3))  # unchanged by quantization
    with pytest.raises(P.PluginError, match=r"w_down_scales has shape \(5, 64, 2\), expected \(5, 64, 3\)"):
        P.check_quantized_shapes(("T", 64), (5, 64), (5,), gate_up, [down[0], (5, 64, 2), down[2]], cfg, quant)
    with pytest.raises(P.PluginError, match=r"w_gate_up_zeros must have rank 1"):
        P.check_quantized_shapes(("T", 64), (5, 64), (5,), gate_up, down, cfg, P.QuantConfig("int4", 32, True))
    with pytest.raises(P.PluginError, match="block=64 does not divide the expert width 96"):
        P.check_quantized_shapes(("T", 64), (5, 64), (5,), gate_up, down, cfg, P.QuantConfig("int4", 64, False))
    with pytest.raises(P.PluginError, match="attribute block=48 is not one of"):
        P.QuantConfig.from_fields({"quant_format": 1, "bits": 4, "block": 48, "symmetric": 1})
    with pytest.raises(P.PluginError, match="attribute quant_format=2 is not one of 0 \\(int8\\), 1 \\(int4\\)"):
        P.QuantConfig.from_fields({"quant_format": 2, "bits": 8, "block": 32, "symmetric": 1})
    with pytest.raises(P.PluginError, match="w_down_codes must be int8, got uint8"):
        P.quantized_output_dtypes("float32", "float32", "float32",
                                  ["int8", "float32", "int8", "uint8", "float32", "int8"])
    assert P.quantized_output_dtypes("float16", "float32", "float32",
                                     ["int8", "float32", "int8", "int8", "float32", "int8"]) == \
        ("float16", "int32", "float32")


def test_quantized_plugin_needs_python_plugins():
    assert P.implementation_for((10, 9), quantized=True) == P.implementation_for((11, 0), quantized=True) == "aot"
    assert P.implementation_for((10, 9), prefer_aot=False, quantized=True) == "python"
    assert P.implementation_for((10, 6), quantized=True) == "python"
    with pytest.raises(P.PluginError, match="IPluginV3 fallback takes float experts only"):
        P.implementation_for((10, 5), quantized=True)


ROUTED_ONLY = {"format": "int4", "block": 32, "symmetric": False, "weights": {"shared_experts": False}}


@pytest.mark.skipif(P.triton is None, reason="triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="the Triton kernel runs on CPU only in Triton's interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("fmt,symmetric", CASES, ids=IDS)
def test_aot_quantized_kernel_equals_the_reference(fmt, symmetric):
    """The one-kernel implementation of QFusedMoE (@aot_impl), each tile dequantized where it is loaded, in
    Triton's interpreter (or on a GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, w_router, bias, parts, fields, (r_out, r_idx, r_w) = _contract_args(fmt, symmetric)
    cfg, quant = _trt_configs(fields)
    out, idx, w = P.launch_fused_moe_quantized_kernel(*(t.to(device) for t in (x[:3], w_router, bias, *parts)),
                                                      cfg=cfg, quant=quant)
    assert torch.equal(idx.cpu().long(), r_idx[:3])
    torch.testing.assert_close(w.cpu().double(), r_w[:3], **TOL)
    torch.testing.assert_close(out.cpu().double(), r_out[:3], **TOL)


_PTX_SCRIPT = """
import sys
from triton.backends.compiler import GPUTarget
sys.path.insert(0, {repo!r})
from moe_ir.backends.tensorrt import plugin as P
cfg = P.MoEConfig("sigmoid", 3, 1, 1, "max", True, 1.5, "swiglu")
quant = P.QuantConfig("int4", 32, False)
name, ptx, const, warps, shared = P.compile_fused_moe_quantized_kernel(cfg, quant, 5, 64, 96, "bfloat16",
                                                                       target=GPUTarget("cuda", 90, 32))
params = [line for line in ptx.splitlines() if line.strip().startswith(".param")]
print(name, warps, len(params), ".entry " + name in ptx, const["QBLOCK"], const["INT4"])
"""


@pytest.mark.skipif(P.triton is None, reason="triton is not installed")
def test_aot_quantized_kernel_compiles_to_ptx_without_a_gpu():
    """What QFusedMoE's @aot_impl hands TensorRT, compiled in a subprocess (the test session runs Triton's
    interpreter, which cannot compile)."""
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TRITON_INTERPRET="0")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    repo = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run([sys.executable, "-c", _PTX_SCRIPT.format(repo=repo)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    name, warps, params, has_entry, qblock, int4 = done.stdout.split()
    assert name == "fused_moe_quantized_token_kernel" and has_entry == "True" and int(warps) >= 1
    assert (qblock, int4) == ("32", "1")
    assert int(params) >= 13  # 9 input pointers, T, 3 output pointers


def test_tensorrt_supports_routed_quantized_experts_and_refuses_the_rest():
    from moe_ir.backends.tensorrt import TensorRTBackend

    backend = TensorRTBackend()
    graph = build_graph(spec_from_dict({**LAYER, "quantization": ROUTED_ONLY}))
    assert backend.supports_graph(run_pipeline(graph, backend.pipeline)) == (True, "")
    fp8 = build_graph(spec_from_dict({**LAYER, "quantization": {"format": "fp8_e4m3", "block": 32,
                                                                "weights": {"shared_experts": False}}}))
    ok, reason = backend.supports_graph(run_pipeline(fp8, backend.pipeline))
    assert not ok and "fp8_e4m3 storage does not fit moe_ir::QFusedMoE" in reason, reason


def test_tensorrt_bundle_carries_the_quantized_plugin_node_and_its_fields(tmp_path, capsys):
    """`moe-ir build --backend tensorrt` of a routed-quantized spec (honest absence here): the plugin ONNX the
    parser sees has one QFusedMoE node, whose attributes (less the parser's own) become exactly the plugin
    fields the plugin's creator decodes (INT32, and FLOAT32 for scale)."""
    import json

    import yaml

    from moe_ir.backends.tensorrt.engine import parser_model, parser_plugin_fields, plugin_node
    from moe_ir.cli import main

    spec = tmp_path / "qtrt.yaml"
    spec.write_text(yaml.safe_dump({**LAYER, "name": "qtrt", "quantization": ROUTED_ONLY}))
    out = tmp_path / "out"
    code = main(["build", str(spec), "--backend", "tensorrt", "-o", str(out)])
    err = capsys.readouterr().err
    if code == 0:
        pytest.skip("TensorRT and a GPU are present: the engine was built")
    assert "TensorRT is not installed" in err or "no CUDA GPU" in err
    bundle = json.loads((out / "qtrt.tensorrt.json").read_text())
    assert bundle["plugin"]["name"] == "QFusedMoE" and sorted(bundle["plugin"]["implementations"]) == ["aot", "python"]
    model = parser_model(out / "qtrt.plugin.onnx", aot=True)
    node = plugin_node(model)
    assert node.op_type == "QFusedMoE" and {"aot", "plugin_namespace"} <= {a.name for a in node.attribute}
    fields = parser_plugin_fields(node)
    cfg = P.MoEConfig("sigmoid", 3, 1, 1, "max", True, 1.5, "swiglu")
    quant = P.QuantConfig("int4", 32, False)
    expected = P.plugin_fields(cfg, quant)
    assert sorted((n, k) for n, _, k in fields) == sorted((n, k) for n, _, k in expected)  # fields go by name
    got = {n: a for n, a, _ in fields}
    assert all(np.array_equal(got[n], a) and got[n].dtype == a.dtype for n, a, _ in expected)
    assert _trt_configs({n: a for n, a, _ in fields}) == (cfg, quant)
    init = {t.name: t for t in model.graph.initializer}
    types = [init[name].data_type for name in node.input[3:]]
    assert types == [3, 1, 3, 3, 1, 3]  # int8 codes and zero points, float32 scales


def test_bundled_plugin_runs_quantized_experts_without_moe_ir(tmp_path):
    import importlib.util
    import sys

    from moe_ir.backends.tensorrt import PLUGIN_BUNDLE_NAME, plugin_bundle_source

    copy = tmp_path / PLUGIN_BUNDLE_NAME
    copy.write_text(plugin_bundle_source())
    spec = importlib.util.spec_from_file_location("bundled_qplugin_under_test", copy)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    x, w_router, bias, parts, fields, (r_out, r_idx, _) = _contract_args("int8", False)
    cfg = module.MoEConfig.from_fields({k: fields[k] for k in module.ATTRIBUTE_NAMES})
    quant = module.QuantConfig.from_fields({k: fields[k] for k in module.QUANT_ATTRIBUTE_NAMES})
    out, idx, _ = module.fused_moe_quantized_torch(x, w_router, bias, *parts, cfg, quant)
    assert torch.equal(idx.long(), r_idx)
    torch.testing.assert_close(out.double(), r_out, **TOL)


# ------------------------------------------------------------------------------------------------
# the command line


def test_build_onnx_plugin_quantize_from_the_cli(tmp_path, capsys):
    """`moe-ir build SPEC --backend onnx:plugin --quantize int4:16` on a shipped layer spec (tiny-v3: hidden 32,
    experts of width 16, so blocks of 16): one QFusedMoE file that onnxruntime runs with the extensions op,
    equal to the quantized reference of the same seeded weights."""
    pytest.importorskip("onnxruntime_extensions")
    from pathlib import Path

    from moe_ir.backends.onnx import load_runner
    from moe_ir.cli import main
    from moe_ir.frontends.yaml_spec import load_spec
    from moe_ir.quantization import parse_quantize_option, with_quantization

    shipped = Path(__file__).resolve().parent.parent / "specs" / "tiny-v3.yaml"
    out = tmp_path / "out"
    assert main(["build", str(shipped), "--backend", "onnx:plugin", "--quantize", "int4:16", "-o", str(out)]) == 0
    printed = capsys.readouterr()
    assert "quantization error per tensor (int4:16)" in printed.out + printed.err
    (path,) = out.glob("*.onnx")
    import onnx

    assert [n.op_type for n in onnx.load(str(path)).graph.node if n.domain == plugin_op.DOMAIN] == ["QFusedMoE"]
    graph = build_graph(with_quantization(load_spec(shipped), parse_quantize_option("int4:16")))
    weights = init_weights(graph, 0)  # build's default: the seeded float draw (seed 0), quantized
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(1))
    ref = interpret(graph, {"x": x}, weights, dtype=torch.float64)
    got = load_runner(path)(x)
    torch.testing.assert_close(got["out"].double(), ref["out"], **TOL)
    # the flavour twice, disagreeing, is a usage error before any work
    assert main(["build", str(shipped), "--backend", "onnx:plugin", "--flavour", "ort", "-o", str(tmp_path / "x")]) == 2
    assert "name different flavours" in capsys.readouterr().err


def test_a_malformed_plugin_file_is_refused_before_it_runs(tmp_path):
    """onnxruntime-extensions aborts the process when its Python op raises, so a file whose QFusedMoE contract
    does not hold (a wrong block attribute, scales of the wrong shape) is refused when it is loaded, naming
    the file, the node and what is wrong."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime_extensions")
    from moe_ir.backends.onnx import load_runner

    graph, weights = quantized_layer("int4", False)
    spec = spec_from_dict({**LAYER, "quantization": {"format": "int4", "block": 32, "symmetric": False}})
    backend = get_backend("onnx:plugin")
    result = backend.build(spec, run_pipeline(graph, backend.pipeline), weights, tmp_path / "ok")
    good = onnx.load(str(next(p for p in result.files if p.suffix == ".onnx")))

    def broken(name, edit):
        model = onnx.ModelProto()
        model.CopyFrom(good)
        edit(model, next(n for n in model.graph.node if n.op_type == plugin_op.QUANT_OP_TYPE))
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, str(path))
        return path

    def block(model, node):
        next(a for a in node.attribute if a.name == "block").i = 16

    def scales(model, node):
        t = next(t for t in model.graph.initializer if t.name == node.input[7])
        t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t)[:, :, :2].copy(), t.name))

    with pytest.raises(BackendError, match=r"block\.onnx: node moe\.fused: moe_ir::QFusedMoE: input w_gate_up_scales "
                                           r"has shape \(5, 192, 2\), expected \(5, 192, 4\)"):
        load_runner(broken("block", block))
    with pytest.raises(BackendError, match=r"input w_down_scales has shape \(5, 64, 2\), expected \(5, 64, 3\)"):
        load_runner(broken("scales", scales))


def test_bf16_quantized_plugin_export_type_checks_and_evaluates(tmp_path):
    """A bf16 layer with int4 experts: onnx's strict type inference accepts the file with QFusedMoE's schema,
    and onnx's reference evaluator (the extensions' op on CPU takes float32 only) gives the bf16 reference."""
    onnx = pytest.importorskip("onnx")
    from moe_ir.backends.onnx import verify

    spec = spec_from_dict({**LAYER, "dtype": "bfloat16",
                           "quantization": {"format": "int4", "block": 32, "symmetric": False}})
    graph = build_graph(spec)
    weights = init_weights(graph, 3)
    backend = get_backend("onnx:plugin")
    piped = run_pipeline(build_graph(spec), backend.pipeline)
    assert backend.supports(piped) == (True, "")
    path = next(p for p in backend.build(spec, piped, weights, tmp_path / "bf16").files if p.suffix == ".onnx")
    inferred = verify.infer_strict(onnx.load(str(path)))
    out_type = next(v for v in inferred.graph.output if v.name == "out").type.tensor_type.elem_type
    assert out_type == onnx.TensorProto.BFLOAT16
    x = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(5))
    got = verify.evaluate(str(path), x)["out"]
    ref = interpret(graph, {"x": x.to(torch.bfloat16)}, weights)["out"]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2 * float(ref.float().abs().max()))
