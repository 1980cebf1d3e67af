"""TensorRT backend: everything that can be checked without TensorRT, for real; the rest skips with a reason.

Layers: the plugin's contract tables against plugin_op.py; attribute encode/decode; shape and dtype logic
as plain functions; the plugin's computation (torch path, the dispatching @impl path, and the one-kernel
Triton AOT kernel in Triton's interpreter) against the FusedMoE reference of moe_ir.ir.ops; the ONNX graph
the TensorRT parser will see; the engine manifest; the honest-absence bundle through the CLI.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_ir.backends.onnx import plugin_op
from moe_ir.cli import PRECISION_DTYPES
from moe_ir.validate import with_dtype
from moe_ir.backends.tensorrt import PLUGIN_BUNDLE_NAME, TensorRTBackend, environment_problems, plugin_bundle_source
from moe_ir.backends.tensorrt import plugin as P
from moe_ir.backends.tensorrt.engine import (
    EngineManifest,
    TokenProfile,
    check_manifest,
    finish_command,
    load_manifest,
    manifest_path,
    onnx_facts,
    parser_model,
    profile_shapes,
    write_manifest,
)
from moe_ir.errors import BackendError
from moe_ir.ir import ElemType, OpCode, WeightLayout, op_def
from moe_ir.spec import Activation, GroupScore, ScoreFn

REPO = Path(__file__).resolve().parent.parent
TRT_MISSING_REASON = "TensorRT is not installed on this machine (pip install tensorrt on a machine with an NVIDIA GPU)"
NEEDS_TRT_GPU = pytest.mark.skipif(bool(environment_problems()),
                                   reason=f"{TRT_MISSING_REASON}; also needs a CUDA GPU")
HONEST_ABSENCE = pytest.mark.skipif(not environment_problems(),
                                    reason="TensorRT and a GPU are present: the full build runs instead")

# (score_fn, top_k, n_group, topk_group, group_score, normalize, scale, activation)
CONFIGS = [
    P.MoEConfig("softmax", 2, 1, 1, "max", False, 1.0, "swiglu"),            # Mixtral / Qwen-MoE style
    P.MoEConfig("softmax", 3, 4, 2, "max", False, 16.0, "swiglu"),           # DeepSeek-V2 group-limited
    P.MoEConfig("sigmoid", 4, 4, 2, "top2_sum", True, 2.5, "swiglu"),        # DeepSeek-V3
    P.MoEConfig("sigmoid", 2, 1, 1, "max", True, 1.0, "geglu"),
    P.MoEConfig("softmax", 1, 2, 1, "max", False, 1.0, "gelu"),              # Switch top-1, non-gated
    P.MoEConfig("softmax", 2, 1, 1, "max", True, 0.5, "relu"),
]
IDS = [f"{c.score_fn}-k{c.top_k}-g{c.n_group}.{c.topk_group}-{c.group_score}-n{int(c.normalize)}-{c.activation}"
       for c in CONFIGS]


# ------------------------------------------------------------------------------------------------
# contract


def test_tables_match_the_onnx_contract():
    assert P.PLUGIN_ID == plugin_op.PLUGIN_NAME and P.PLUGIN_NAMESPACE == plugin_op.DOMAIN
    assert P.PLUGIN_OP == plugin_op.OP_TYPE
    assert P.INPUT_NAMES == plugin_op.INPUT_NAMES and P.OUTPUT_NAMES == plugin_op.OUTPUT_NAMES
    assert {P.SCORE_FNS[c]: c for c in range(len(P.SCORE_FNS))} == {k.value: v for k, v in plugin_op.SCORE_CODES.items()}
    assert {P.GROUP_SCORES[c]: c for c in range(len(P.GROUP_SCORES))} == \
        {k.value: v for k, v in plugin_op.GROUP_SCORE_CODES.items()}
    assert {P.ACTIVATIONS[c]: c for c in range(len(P.ACTIVATIONS))} == \
        {k.value: v for k, v in plugin_op.ACTIVATION_CODES.items()}
    sample = plugin_op.FusedMoEAttrs(ScoreFn.SIGMOID, 8, 8, 4, GroupScore.TOP2_SUM, True, 2.5, Activation.SWIGLU)
    assert set(sample.encode()) == set(P.ATTRIBUTE_NAMES)


def test_pipeline_is_the_onnx_plugin_flavour():
    from moe_ir.backends.onnx import PIPELINES

    assert TensorRTBackend.pipeline == PIPELINES["plugin"]


@pytest.mark.parametrize("text, parsed", [("10.9.0.34", (10, 9, 0, 34)), ("10.10.0", (10, 10, 0)),
                                          ("11.0.0b1", (11, 0, 0)), ("8.6.1.post1", (8, 6, 1))])
def test_parse_version(text, parsed):
    assert P.parse_version(text) == parsed


def test_implementation_by_version_compares_numbers_not_strings():
    # As strings "10.10" < "10.9" and "9.2" > "10.6"; as versions they are not.
    assert P.implementation_for(P.parse_version("10.10.0")) == "aot"
    assert P.implementation_for(P.parse_version("10.9.0")) == "aot"
    assert P.implementation_for(P.parse_version("10.9.0"), prefer_aot=False) == "python"
    assert P.implementation_for(P.parse_version("10.6.0")) == "python"
    assert P.implementation_for(P.parse_version("10.5.0")) == "v3"
    assert P.implementation_for(P.parse_version("10.0.1")) == "v3"
    # IPluginV3 (and its Python bindings) first shipped in TensorRT 10.0 (its release notes); 9.x and 8.6
    # have no trt.IPluginV3, so plugin_v3.py would fail on import there instead of saying the version is too old.
    for old in ("9.3.0", "9.2.0", "8.6.1", "8.5.3"):
        with pytest.raises(P.PluginError, match="too old.*TensorRT >= 10.0"):
            P.implementation_for(P.parse_version(old))
    with pytest.raises(P.PluginError, match="not installed"):
        P.implementation_for(None)
    with pytest.raises(P.PluginError, match="version"):
        P.parse_version("tensorrt")


# ------------------------------------------------------------------------------------------------
# attributes


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_attribute_round_trip(cfg):
    fields = cfg.to_fields()
    assert all(isinstance(v, int) for k, v in fields.items() if k != "scale")
    assert isinstance(fields["scale"], float)
    assert P.MoEConfig.from_fields(fields) == cfg
    # As TensorRT hands them over: one-element arrays (INT32 / FLOAT32 plugin fields).
    as_plugin_fields = {k: np.array([v], dtype=np.float32 if k == "scale" else np.int32) for k, v in fields.items()}
    assert P.MoEConfig.from_fields(as_plugin_fields) == cfg
    # The ONNX exporter's encoding decodes to the same configuration, and back.
    attrs = plugin_op.FusedMoEAttrs.decode(fields)
    assert attrs.encode() == fields
    assert attrs.score_fn.value == cfg.score_fn and attrs.activation.value == cfg.activation


@pytest.mark.parametrize("change, message", [
    ({"score_fn": 2}, "score_fn=2 is not one of"),
    ({"group_score": -1}, "group_score=-1"),
    ({"activation": 7}, "activation=7"),
    ({"normalize": 2}, "normalize=2 must be 0 or 1"),
    ({"top_k": 0}, "top_k=0"),
    ({"topk_group": 5}, "topk_group"),
    ({"top_k": 2.5}, "must be an integer"),
    ({"scale": float("nan")}, "must be finite"),
    ({"scale": np.array([1.0, 2.0])}, "one value"),
])
def test_bad_attributes_are_named(change, message):
    fields = dict(CONFIGS[2].to_fields(), **change)
    with pytest.raises(P.PluginError, match=message):
        P.MoEConfig.from_fields(fields)


def test_missing_attribute_is_named():
    fields = CONFIGS[0].to_fields()
    del fields["top_k"]
    with pytest.raises(P.PluginError, match="missing attribute 'top_k'"):
        P.MoEConfig.from_fields(fields)


# ------------------------------------------------------------------------------------------------
# shape and dtype logic


def test_output_shapes_static_and_symbolic():
    cfg = CONFIGS[2]
    assert P.output_shapes((7, 32), cfg) == ((7, 32), (7, 4), (7, 4))
    assert P.output_shapes(("T", 32), cfg) == (("T", 32), ("T", 4), ("T", 4))

    class Sym:  # stands for a TensorRT ShapeExpr: opaque, passed through
        pass

    t = Sym()
    out, idx, w = P.output_shapes((t, 32), cfg)
    assert out[0] is t and idx[0] is t and w == (t, 4)


def test_check_shapes_accepts_the_contract_and_names_mismatches():
    cfg = CONFIGS[2]  # gated, 4 groups, top-2-sum
    e, h, f = P.check_shapes(("T", 32), (16, 32), (16,), (16, 32, 32), (16, 32, 16), cfg)
    assert (e, h, f) == (16, 32, 16)
    with pytest.raises(P.PluginError, match="hidden size of x"):
        P.check_shapes(("T", 64), (16, 32), (16,), (16, 32, 32), (16, 32, 16), cfg)
    with pytest.raises(P.PluginError, match="rows of w_gate_up"):
        P.check_shapes(("T", 32), (16, 32), (16,), (16, 16, 32), (16, 32, 16), cfg)
    with pytest.raises(P.PluginError, match="rank 3"):
        P.check_shapes(("T", 32), (16, 32), (16,), (16, 32), (16, 32, 16), cfg)
    with pytest.raises(P.PluginError, match="must divide"):
        P.check_shapes(("T", 32), (18, 32), (18,), (18, 32, 32), (18, 32, 16), cfg)
    non_gated = CONFIGS[4]
    assert P.check_shapes((5, 32), (8, 32), (8,), (8, 16, 32), (8, 32, 16), non_gated) == (8, 32, 16)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_output_dtypes(dtype):
    assert P.output_dtypes(dtype, "float32", "float32", dtype, dtype) == (dtype, "int32", "float32")


def test_bad_input_dtypes_are_named():
    with pytest.raises(P.PluginError, match="x must be one of"):
        P.output_dtypes("int32")
    with pytest.raises(P.PluginError, match="w_router must be float32"):
        P.output_dtypes("float16", "float16")
    with pytest.raises(P.PluginError, match="w_down must have x's dtype"):
        P.output_dtypes("bfloat16", "float32", "float32", "bfloat16", "float32")


# ------------------------------------------------------------------------------------------------
# computation vs the reference


def _reference(x, w_router, bias, w_gate_up, w_down, cfg):
    attrs = {"score": ScoreFn(cfg.score_fn), "k": cfg.top_k, "groups": cfg.n_group, "kept": cfg.topk_group,
             "group_score": GroupScore(cfg.group_score), "normalize": cfg.normalize, "scale": cfg.scale,
             "capacity_factor": None, "drop_rule": None, "router_dtype": ElemType.FLOAT32,
             "activation": Activation(cfg.activation),
             "weight_layout": WeightLayout.GATE_UP_FUSED if cfg.gated else WeightLayout.SEPARATE}
    return op_def(OpCode.FUSED_MOE).reference(attrs, x, w_router, bias, w_gate_up, w_down, None, None, None, None)


def _inputs(cfg, tokens=9, hidden=32, experts=16, width=24, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w_router = torch.randn(experts, hidden, generator=g) * 0.3
    bias = torch.randn(experts, generator=g) * 0.05
    rows = 2 * width if cfg.gated else width
    w_gate_up = torch.randn(experts, rows, hidden, generator=g) * 0.2
    w_down = torch.randn(experts, hidden, width, generator=g) * 0.2
    return x.to(dtype), w_router, bias, w_gate_up.to(dtype), w_down.to(dtype)


def _assert_matches(got, ref, atol, rtol):
    out, idx, w = got
    r_out, r_idx, r_w = ref
    assert out.shape == r_out.shape and idx.shape == r_idx.shape and w.shape == r_w.shape
    assert out.dtype == r_out.dtype and idx.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(idx.long(), r_idx), "chosen experts differ"
    torch.testing.assert_close(w, r_w.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.float(), r_out.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_torch_compute_matches_reference(cfg):
    args = _inputs(cfg)
    _assert_matches(P.fused_moe_torch(*args, cfg), _reference(*args, cfg), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=IDS[:3])
def test_impl_entry_point_matches_reference(cfg):
    """compute_fused_moe is what @impl and the IPluginV3 enqueue call (on CPU: the torch path)."""
    args = _inputs(cfg, seed=1)
    _assert_matches(P.compute_fused_moe(*args, cfg), _reference(*args, cfg), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_compute_low_precision(dtype):
    cfg = CONFIGS[2]
    args = _inputs(cfg, dtype=dtype, seed=2)
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    _assert_matches(P.fused_moe_torch(*args, cfg), _reference(*args, cfg), atol=tol, rtol=tol)


def test_empty_token_batch():
    cfg = CONFIGS[0]
    out, idx, w = P.fused_moe_torch(*_inputs(cfg, tokens=0), cfg)
    assert out.shape == (0, 32) and idx.shape == (0, 2) and w.shape == (0, 2)


@pytest.mark.skipif(P.triton is None, reason="triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="the Triton kernel runs on CPU only in Triton's interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[2], CONFIGS[4]], ids=[IDS[1], IDS[2], IDS[4]])
def test_aot_kernel_matches_reference(cfg):
    """The one-kernel implementation @aot_impl compiles, run in Triton's interpreter (or on a GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = _inputs(cfg, tokens=5, seed=3)
    got = P.launch_fused_moe_kernel(*(a.to(device) for a in args), cfg)
    _assert_matches(tuple(t.cpu() for t in got), _reference(*args, cfg), atol=1e-5, rtol=1e-5)


_PTX_SCRIPT = """
import sys
from triton.backends.compiler import GPUTarget
sys.path.insert(0, {repo!r})
from moe_ir.backends.tensorrt import plugin as P
cfg = P.MoEConfig("sigmoid", 4, 4, 2, "top2_sum", True, 2.5, "swiglu")
name, ptx, const, warps, shared = P.compile_fused_moe_kernel(cfg, 16, 64, 32, "bfloat16", target=GPUTarget("cuda", 90, 32))
params = [line for line in ptx.splitlines() if line.strip().startswith(".param")]
print(name, warps, len(params), ".entry " + name in ptx, const["SCALE"])
"""


@pytest.mark.skipif(P.triton is None, reason="triton is not installed")
def test_aot_kernel_compiles_to_ptx_without_a_gpu():
    """What @aot_impl hands TensorRT: PTX for sm_90 plus launch facts. Compiled in a subprocess because
    the test session runs Triton in interpreter mode, which cannot compile. TRITON_INTERPRET=0 is explicit
    because moe_ir otherwise picks the interpreter on a machine without a GPU."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", _PTX_SCRIPT.format(repo=str(REPO))], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    name, warps, params, has_entry, scale = done.stdout.split()
    assert name == "fused_moe_token_kernel" and has_entry == "True"
    assert int(warps) >= 1 and float(scale) == 2.5
    # 5 input pointers, T, 3 output pointers (Triton may append its own scratch pointers after them).
    assert int(params) >= 9


# ------------------------------------------------------------------------------------------------
# the ONNX the parser sees


def _export(tmp_path, spec_name="tiny-v3", precision=None):
    from moe_ir.builder import build_graph
    from moe_ir.frontends.yaml_spec import load_spec
    from moe_ir.params import init_weights
    from moe_ir.passes import run_pipeline

    spec = load_spec(REPO / "specs" / f"{spec_name}.yaml")
    if precision is not None:  # what `moe-ir build --precision` does: the graph is built in that dtype
        spec = with_dtype(spec, PRECISION_DTYPES[precision])
    backend = TensorRTBackend()
    full = build_graph(spec)
    weights = init_weights(full, 0)
    graph = run_pipeline(full, backend.pipeline)
    weights = {k: v for k, v in weights.items() if k in graph.weights}
    from moe_ir.artifacts import OutputFolder

    with OutputFolder(tmp_path) as out:
        result = backend._export_onnx(spec, graph, weights, out)
    return spec, result.files[0]


@pytest.mark.parametrize("precision, onnx_type", [(None, 1), ("fp16", 10), ("bf16", 16)])
def test_parser_sees_one_plugin_node(tmp_path, precision, onnx_type):
    import onnx

    spec, path = _export(tmp_path, precision=precision)
    for aot in (False, True):
        model = parser_model(path, aot=aot)
        nodes = [n for n in model.graph.node if n.op_type == "FusedMoE"]
        assert len(nodes) == 1
        node = nodes[0]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == "moe_ir" and attrs["plugin_namespace"] == b"moe_ir"
        assert attrs.get("aot", 0) == int(aot)
        cfg = P.MoEConfig.from_fields({k: attrs[k] for k in P.ATTRIBUTE_NAMES})
        assert cfg == P.MoEConfig("sigmoid", 4, 4, 2, "top2_sum", True, 2.5, "swiglu")
        assert len(node.input) == 5 and len(node.output) == 3
        init = {i.name: i for i in model.graph.initializer}
        w_router, bias, w_gate_up, w_down = (init[name] for name in node.input[1:])
        assert list(w_router.dims) == [16, 32] and w_router.data_type == 1
        assert list(bias.dims) == [16] and bias.data_type == 1
        assert list(w_gate_up.dims) == [16, 32, 32] and w_gate_up.data_type == onnx_type
        assert list(w_down.dims) == [16, 32, 16] and w_down.data_type == onnx_type
        assert node.input[0] not in init  # x flows in from the graph input
    facts = onnx_facts(model)
    assert facts["input"] == "x" and facts["dims"][-1] == 32 and facts["outputs"] == ["out", "expert_idx", "weights"]
    assert facts["dtype"] == {1: "float32", 10: "float16", 16: "bfloat16"}[onnx_type]
    # The file on disk is left as the ONNX backend wrote it (no TensorRT-only attributes).
    on_disk = onnx.load(str(path), load_external_data=False)
    disk_node = next(n for n in on_disk.graph.node if n.op_type == "FusedMoE")
    assert "plugin_namespace" not in {a.name for a in disk_node.attribute}


@pytest.mark.parametrize("precision", [None, "fp16", "bf16"])
def test_plugin_type_logic_agrees_with_the_exported_onnx(tmp_path, precision):
    """The plugin's dtype function, given the types the parser will hand it, gives the types the rest of
    the exported graph expects from the node (onnx's strict inference, with the FusedMoE schema, checks
    every other op against them)."""
    import onnx
    from onnx import TensorProto

    from moe_ir.backends.onnx.verify import infer_strict

    _, path = _export(tmp_path, precision=precision)
    model = onnx.load(str(path))
    inferred = infer_strict(model)
    names = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
             TensorProto.INT32: "int32"}
    types = {t.name: names.get(t.data_type) for t in model.graph.initializer}
    for v in (*inferred.graph.input, *inferred.graph.value_info):
        types.setdefault(v.name, names.get(v.type.tensor_type.elem_type))
    node = next(n for n in model.graph.node if n.op_type == "FusedMoE")
    expected = P.output_dtypes(*(types[i] for i in node.input))
    assert tuple(types[o] for o in node.output) == expected
    assert expected[0] == {None: "float32", "fp16": "float16", "bf16": "bfloat16"}[precision]


def test_parser_model_refuses_a_model_without_the_plugin(tmp_path):
    spec, path = _export(tmp_path)
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "FusedMoE":
            node.op_type = "SomethingElse"
    other = tmp_path / "other.onnx"
    onnx.save(model, str(other))
    with pytest.raises(BackendError, match="expected one moe_ir::FusedMoE node, found 0"):
        parser_model(other, aot=False)


# ------------------------------------------------------------------------------------------------
# profile and manifest


def test_token_profile():
    assert TokenProfile.parse("1,256,4096") == TokenProfile(1, 256, 4096)
    for bad in ("1,256", "a,b,c", "0,1,2", "8,4,16"):
        with pytest.raises(BackendError):
            TokenProfile.parse(bad)
    p = TokenProfile(1, 64, 512)
    assert profile_shapes(["B", "S", 32], p) == ((1, 1, 32), (1, 64, 32), (1, 512, 32))
    assert profile_shapes(["T", 32], p) == ((1, 32), (64, 32), (512, 32))
    with pytest.raises(BackendError, match="static hidden size"):
        profile_shapes(["B", "S", "H"], p)


def _manifest(**changes):
    data = dict(spec_hash="abc123", tensorrt_version="10.9.0.34",
                profiles=[{"input": "x", "min": 1, "opt": 256, "max": 4096}],
                plugin={"name": "FusedMoE", "namespace": "moe_ir", "implementation": "aot", "module": "plugin.py"},
                dtype="bfloat16", inputs=["x"], outputs=["out", "expert_idx", "weights"], engine="l.engine")
    data.update(changes)
    return EngineManifest(**data)


def test_manifest_round_trip_and_refusals(tmp_path):
    engine = tmp_path / "l.engine"
    engine.write_bytes(b"\0engine")
    written = write_manifest(engine, _manifest())
    assert written == manifest_path(engine) and written.name == "l.engine.json"
    loaded = load_manifest(engine, spec_hash="abc123", tensorrt_version="10.9.0.34")
    assert loaded == _manifest()
    with pytest.raises(BackendError, match="built for spec hash abc123.*hashes to zzz"):
        load_manifest(engine, spec_hash="zzz")
    with pytest.raises(BackendError, match="built with TensorRT 10.9.0.34.*has TensorRT 10.13.0"):
        load_manifest(engine, tensorrt_version="10.13.0")
    check_manifest(_manifest(), spec_hash="abc123", tensorrt_version="10.9.0.34")  # no error


def test_manifest_load_failures_are_clear(tmp_path):
    engine = tmp_path / "m.engine"
    with pytest.raises(BackendError, match="no engine at"):
        load_manifest(engine)
    engine.write_bytes(b"x")
    with pytest.raises(BackendError, match="has no manifest"):
        load_manifest(engine)
    manifest_path(engine).write_text("{not json")
    with pytest.raises(BackendError, match="bad JSON"):
        load_manifest(engine)
    manifest_path(engine).write_text(json.dumps({"spec_hash": "a"}))
    with pytest.raises(BackendError, match="lacks tensorrt_version, profiles"):
        load_manifest(engine)
    manifest_path(engine).write_text(json.dumps({**json.loads(_manifest().to_json()), "format": 99}))
    with pytest.raises(BackendError, match="format 99"):
        load_manifest(engine)


def test_finish_command():
    cmd = finish_command(Path("OUT/l.plugin.onnx"), Path("OUT/l.engine"), TokenProfile(1, 256, 4096),
                         Path("OUT/p.py"), "abc")
    assert cmd == ("python -m moe_ir.backends.tensorrt.engine OUT/l.plugin.onnx --profile 1,256,4096 "
                   "-o OUT/l.engine --plugin-module OUT/p.py --spec-hash abc")


# ------------------------------------------------------------------------------------------------
# honest absence


@HONEST_ABSENCE
def test_build_without_tensorrt_writes_the_bundle_and_says_how_to_finish(tmp_path, capsys):
    from moe_ir.cli import main

    out = tmp_path / "out"
    code = main(["build", str(REPO / "specs" / "tiny-v3.yaml"), "--backend", "tensorrt", "-o", str(out),
                 "--profile", "1,64,1024"])
    err = capsys.readouterr().err
    assert code != 0
    assert "TensorRT is not installed" in err
    command = (f"python -m moe_ir.backends.tensorrt.engine {out}/tiny-v3.plugin.onnx --profile 1,64,1024 "
               f"-o {out}/tiny-v3.engine --plugin-module {out}/{PLUGIN_BUNDLE_NAME}")
    assert command in err
    assert err.count("moe-ir: error:") == 1
    # The bundle: complete files, no engine, no temp leftovers.
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"tiny-v3.plugin.onnx", PLUGIN_BUNDLE_NAME, "tiny-v3.tensorrt.json"])
    bundle = json.loads((out / "tiny-v3.tensorrt.json").read_text())
    assert bundle["engine_status"] == "missing" and bundle["finish_command"].startswith(command)
    assert bundle["dtype"] == "float32" and bundle["profile"] == {"min": 1, "opt": 64, "max": 1024}
    assert "TensorRT is not installed" in bundle["missing"][0]
    assert onnx_facts(parser_model(out / "tiny-v3.plugin.onnx", aot=True))["dtype"] == "float32"
    assert (out / PLUGIN_BUNDLE_NAME).read_text() == plugin_bundle_source()


@HONEST_ABSENCE
def test_bf16_build_without_tensorrt_writes_a_bf16_bundle(tmp_path, capsys):
    """`--precision bf16`: the precision is the ONNX's types (strongly typed networks), so the bundle's
    model is the bf16 plugin export; then the same clear stop as in float32."""
    import onnx

    from moe_ir.cli import main

    out = tmp_path / "out"
    code = main(["build", str(REPO / "specs" / "tiny-v3.yaml"), "--backend", "tensorrt", "--precision", "bf16",
                 "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "TensorRT is not installed" in err and err.count("moe-ir: error:") == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(["tiny-v3.plugin.onnx", PLUGIN_BUNDLE_NAME,
                                                            "tiny-v3.tensorrt.json"])
    bundle = json.loads((out / "tiny-v3.tensorrt.json").read_text())
    assert bundle["dtype"] == "bfloat16" and bundle["engine_status"] == "missing"
    model = onnx.load(str(out / "tiny-v3.plugin.onnx"))
    assert onnx_facts(parser_model(out / "tiny-v3.plugin.onnx", aot=True))["dtype"] == "bfloat16"
    init = {t.name: t.data_type for t in model.graph.initializer}
    assert init["router.weight"] == init["router.bias"] == onnx.TensorProto.FLOAT
    assert init["moe.w_gate_up"] == init["experts.w_down"] == init["shared.0.w_down"] == onnx.TensorProto.BFLOAT16


def test_bundled_plugin_module_is_standalone(tmp_path):
    """The copy in a bundle must import without moe_ir: no relative or moe_ir imports at module level (the
    repository's plugin.py imports the shared torch kernels; the bundle carries their source instead)."""
    text = plugin_bundle_source()
    tree = ast.parse(text)
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("moe_ir"), ast.dump(node)
        if isinstance(node, ast.Import):
            assert all(not a.name.startswith("moe_ir") for a in node.names)
    copy = tmp_path / PLUGIN_BUNDLE_NAME
    copy.write_text(text)
    spec = importlib.util.spec_from_file_location("bundled_plugin_under_test", copy)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    cfg = module.MoEConfig("softmax", 2, 1, 1, "max", False, 1.0, "swiglu")
    args = _inputs(CONFIGS[0], seed=4)
    _assert_matches(module.fused_moe_torch(*args, cfg), _reference(*args, CONFIGS[0]), atol=1e-5, rtol=1e-5)


def test_bundled_plugin_carries_the_shared_kernels_verbatim():
    """One source of truth: every function the bundle defines beyond plugin.py is a torch kernel, textually
    identical to moe_ir/backends/torch_kernels/, and the bundle runs no other routing code."""
    import inspect

    from moe_ir.backends import torch_kernels, torch_source

    kernels = {name: fn for name, fn in torch_source.FUNCTIONS.items()
               if fn.__module__.startswith(torch_kernels.__name__ + ".")}  # the kernels, not torch_ops' functions
    text = plugin_bundle_source()
    plugin_defs = {n.name for n in ast.parse(Path(P.__file__).read_text()).body if isinstance(n, ast.FunctionDef)}
    copied = [n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name not in plugin_defs]
    assert {n.name for n in copied} >= {"route_topk", "scale_weights", "score", "dispatch", "grouped_ffn", "combine",
                                        "split_gate_up"}
    for node in copied:
        assert ast.get_source_segment(text, node) == inspect.getsource(kernels[node.name]).rstrip(), node.name
    assert not plugin_defs & {"_route", "_activate"}  # the plugin's former copies of the routing rules


@HONEST_ABSENCE
def test_engine_command_without_tensorrt_fails_clearly(tmp_path, capsys):
    from moe_ir.backends.tensorrt.engine import main

    _, path = _export(tmp_path)
    assert main([str(path), "-o", str(tmp_path / "x.engine")]) == 1
    assert "TensorRT is not installed on this machine" in capsys.readouterr().err
    assert not (tmp_path / "x.engine").exists() and not (tmp_path / "x.engine.json").exists()


@HONEST_ABSENCE
def test_supports_and_prepare_without_tensorrt():
    from moe_ir.builder import build_graph
    from moe_ir.frontends.yaml_spec import load_spec
    from moe_ir.passes import run_pipeline

    backend = TensorRTBackend()
    graph = run_pipeline(build_graph(load_spec(REPO / "specs" / "tiny-v3.yaml")), backend.pipeline)
    ok, reason = backend.supports(graph)
    assert ok and "TensorRT is not installed" in reason and "bundle" in reason
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        backend.prepare(graph, {})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: only TensorRT can be missing")
def test_missing_gpu_is_reported_even_when_tensorrt_is_missing():
    """Installing TensorRT alone would not let the build finish on a machine without a GPU: say both."""
    problems = environment_problems()
    assert any("no CUDA GPU" in p for p in problems), problems
    if P.tensorrt_version() is None:
        assert problems[0] == TRT_MISSING_REASON and len(problems) == 2


def test_prepare_leaves_no_engine_or_onnx_behind(tmp_path, monkeypatch):
    """validate's tensorrt runner builds the ONNX and the engine in a temporary folder (tens of GB for a
    published layer); once the engine is deserialised that folder must be gone. TensorRT itself is
    replaced by stand-ins that write and read the engine file, so the file handling runs for real."""
    import tempfile

    from moe_ir.backends.tensorrt import engine as engine_module
    from moe_ir.backends.tensorrt import runner as runner_module
    from moe_ir.builder import build_graph
    from moe_ir.frontends.yaml_spec import load_spec
    from moe_ir.params import init_weights
    from moe_ir.passes import run_pipeline

    built = {}

    def fake_build_engine(onnx_path, engine_path, **kwargs):
        assert Path(onnx_path).is_file()
        Path(engine_path).write_bytes(b"engine:" + Path(onnx_path).name.encode())
        built["dir"] = Path(engine_path).parent

    class FakeEngineRunner:
        def __init__(self, engine_path):
            self.payload = Path(engine_path).read_bytes()  # what TensorRT deserialises

        def __call__(self, x):
            return {"out": torch.zeros_like(x)}

    monkeypatch.setattr(sys.modules["moe_ir.backends.tensorrt"], "environment_problems", lambda: [])
    monkeypatch.setattr(engine_module, "build_engine", fake_build_engine)
    monkeypatch.setattr(runner_module, "EngineRunner", FakeEngineRunner)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    backend = TensorRTBackend()
    full = build_graph(load_spec(REPO / "specs" / "tiny-v3.yaml"))
    graph = run_pipeline(full, backend.pipeline)
    weights = {k: v for k, v in init_weights(full, 0).items() if k in graph.weights}
    run = backend.prepare(graph, weights)
    assert built["dir"].parent == tmp_path and not built["dir"].exists()
    assert list(tmp_path.iterdir()) == []
    assert run(torch.ones(1, 3, 32))["out"].shape == (1, 3, 32)


def test_unsupported_graph_has_a_reason():
    from moe_ir.builder import build_graph
    from moe_ir.frontends.yaml_spec import load_spec_text
    from moe_ir.passes import run_pipeline

    spec = load_spec_text("name: biased\nhidden: 16\nexperts: {routed: 4, width: 8, top_k: 2, bias: true}\n")
    backend = TensorRTBackend()
    ok, reason = backend.supports(run_pipeline(build_graph(spec), backend.pipeline))
    assert not ok and "expert biases" in reason


# ------------------------------------------------------------------------------------------------
# with TensorRT and a GPU


@NEEDS_TRT_GPU
@pytest.mark.parametrize("precision", [None, "bf16"])
def test_engine_matches_reference(tmp_path, precision):
    from moe_ir.builder import build_graph
    from moe_ir.frontends.yaml_spec import load_spec
    from moe_ir.interpreter import interpret
    from moe_ir.params import init_weights
    from moe_ir.passes import run_pipeline

    from moe_ir.backends.tensorrt.runner import load_engine

    spec = load_spec(REPO / "specs" / "tiny-v3.yaml")
    backend = TensorRTBackend()
    full = build_graph(spec)
    weights = init_weights(full, 0)
    if precision is not None:  # as `moe-ir build --precision`: the graph in that dtype, the weights cast to it
        spec = with_dtype(spec, PRECISION_DTYPES[precision])
        full = build_graph(spec)
        weights = {k: v.to(full.weights[k].type.dtype.torch) for k, v in weights.items()}
    graph = run_pipeline(full, backend.pipeline)
    result = backend.build(spec, graph, {k: v for k, v in weights.items() if k in graph.weights}, tmp_path,
                           profile="1,16,64", precision=precision)
    engine = next(p for p in result.files if p.suffix == ".engine")
    runner = load_engine(engine)
    x = torch.randn(2, 5, 32)
    got = runner(x)
    ref = interpret(full, {"x": x}, weights, dtype=torch.float64)
    assert torch.equal(got["expert_idx"].cpu(), ref["expert_idx"])
    tol = 1e-4 if precision is None else 3e-2
    torch.testing.assert_close(got["out"].float().cpu(), ref["out"].float(), atol=tol, rtol=tol)


@NEEDS_TRT_GPU
def test_register_plugin_is_idempotent():
    first = P.register_plugin()
    assert P.register_plugin() == first


def test_precision_is_the_graphs_types_never_a_rebuild(tmp_path):
    """The backend lowers the graph it is given: `--precision` different from the graph's types is refused (the CLI
    builds the graph in that dtype), so the backend never rebuilds a graph from the spec."""
    from moe_ir.builder import build_graph
    from moe_ir.errors import BackendError
    from moe_ir.frontends.yaml_spec import load_spec
    from moe_ir.params import init_weights
    from moe_ir.passes import run_pipeline

    spec = load_spec(REPO / "specs" / "tiny-v3.yaml")
    backend = TensorRTBackend()
    graph = run_pipeline(build_graph(spec), backend.pipeline)
    weights = {k: v for k, v in init_weights(build_graph(spec)).items() if k in graph.weights}
    with pytest.raises(BackendError, match="--precision bf16: the graph 'tiny-v3' is f32"):
        backend.build(spec, graph, weights, tmp_path / "out", precision="bf16")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
