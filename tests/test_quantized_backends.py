"""Quantized weights on the torch backends: eager, the generated model.py and torch.compile equal the
quantized reference (tight: the dequantized values are identical, only the GEMMs' summation order differs);
eager never holds a float copy of every expert; decode takes torch's int4 matmul; backends that cannot take
quantized weights say so in `supports`."""
import pytest
import torch

from conftest import import_file
from moe_ir.backends import get_backend
from moe_ir.builder import build_graph
from moe_ir.interpreter import interpret
from moe_ir.model_builder import build_model_graph
from moe_ir.model_spec import model_spec_from_dict
from moe_ir.params import init_weights
from moe_ir.passes import run_pipeline
from moe_ir.spec import spec_from_dict

# odd sizes: 5 routed experts of width 16, hidden 48, top-3, a shared expert, sigmoid scores
LAYER = {"name": "qodd", "hidden": 48, "experts": {"routed": 5, "shared": 1, "width": 16, "top_k": 3},
         "router": {"score": "sigmoid", "normalize": True, "scaling": 1.5}}
CASES = [("int4", True, 16), ("int4", False, 16), ("int8", True, 16), ("int8", False, 16), ("fp8_e4m3", True, 16)]
TOL = dict(rtol=1e-5, atol=1e-5)


def quantized_layer(fmt: str, symmetric: bool, block: int):
    graph = build_graph(spec_from_dict({**LAYER, "quantization": {"format": fmt, "block": block,
                                                                   "symmetric": symmetric}}))
    return graph, init_weights(graph, 3)


def inputs(tokens: int) -> torch.Tensor:
    return torch.randn(2, tokens, 48, generator=torch.Generator().manual_seed(tokens))


@pytest.mark.parametrize("fmt,symmetric,block", CASES)
def test_eager_equals_the_quantized_reference(fmt, symmetric, block):
    graph, weights = quantized_layer(fmt, symmetric, block)
    backend = get_backend("torch")
    run = backend.prepare(run_pipeline(graph, backend.pipeline), weights)
    for tokens in (1, 7):  # 1 token: the decode path (int4 matmul where it applies); 7: dequantize + GEMM
        x = inputs(tokens)
        ref = interpret(graph, {"x": x}, weights, dtype=torch.float64)
        got = run(x)
        assert torch.equal(got["expert_idx"], ref["expert_idx"])
        torch.testing.assert_close(got["out"].double(), ref["out"], **TOL)


def test_int4_bf16_decode_runs_torch_int4_matmul_and_exact_mode_holds_no_float_experts():
    # torch's int4 matmul takes groups of 32..256 columns
    graph = build_graph(spec_from_dict({**LAYER, "hidden": 64, "experts": {**LAYER["experts"], "width": 32},
                                        "quantization": {"format": "int4", "block": 32}}))
    weights = init_weights(graph, 3)
    backend = get_backend("torch")
    fast = backend.prepare(run_pipeline(graph, backend.pipeline), weights, int4_activations="bf16")
    x = torch.randn(1, 1, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = fast(x)["out"]
    assert "aten::_weight_int4pack_mm_for_cpu" in {e.key for e in prof.key_averages()}
    ref = interpret(graph, {"x": x}, weights, dtype=torch.float64)["out"]
    torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))  # bf16 activations
    run = backend.prepare(run_pipeline(graph, backend.pipeline), weights)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(x)
    assert "aten::_weight_int4pack_mm_for_cpu" not in {e.key for e in prof.key_averages()}  # exact by default
    # prefill: each expert is dequantized on its own; no allocation the size of a float expert stack
    # ([5, 32, 64] float32) is ever made, only one expert's matrix at a time
    float_stack = 5 * 32 * 64 * 4
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run(torch.randn(2, 7, 64))
    largest = max(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
    assert 32 * 64 * 4 <= largest < float_stack


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_fused_matmul_makes_the_reference_products(symmetric):
    # the kernel's math, uncompiled: the half-split layout holds each block's codes, and the products are the
    # dequantized weight's (odd sizes: 3 rows, 5 outputs, 3 blocks of 16)
    from moe_ir.backends import torch_kernels as K
    from moe_ir.quantization import quantize

    w = torch.randn(5, 48, generator=torch.Generator().manual_seed(1))
    parts = quantize(w, "int4", 16, symmetric)
    zeros = parts.get("zeros")
    codes = K.int4_half_split(parts["qweight"], 16)
    assert codes.shape == (5, 3, 8) and codes.dtype == torch.uint8
    nibbles = K.unpack_int4(parts["qweight"]).view(5, 3, 2, 8)
    assert torch.equal(codes & 15, nibbles[:, :, 0]) and torch.equal(codes >> 4, nibbles[:, :, 1])
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(2))
    dequantized = K.dequantize_weight(parts["qweight"], parts["scales"], zeros, "int4", 16)
    torch.testing.assert_close(K.int4_fused_matmul(x, codes, parts["scales"], zeros), x @ dequantized.T,
                               rtol=1e-6, atol=1e-6)


def test_int4_fused_decode_runs_the_compiled_kernel_and_equals_the_reference(monkeypatch):
    from moe_ir.backends.torch_kernels import quantized as Q  # where packed_linear looks the kernel up

    calls = []
    compiled = Q.compiled_int4_matmul
    monkeypatch.setattr(Q, "compiled_int4_matmul", lambda *a: calls.append(a[0].shape[0]) or compiled(*a))
    graph, weights = quantized_layer("int4", False, 16)
    backend = get_backend("torch")
    run = backend.prepare(run_pipeline(graph, backend.pipeline), weights, int4_activations="fused")
    x = inputs(1)  # 2 sequences of 1 token: each expert hit by 1-2 rows
    ref = interpret(graph, {"x": x}, weights, dtype=torch.float64)
    got = run(x)
    assert torch.equal(got["expert_idx"], ref["expert_idx"])
    torch.testing.assert_close(got["out"].double(), ref["out"], **TOL)
    assert calls and set(calls) <= {1, 2, 3}  # every routed and shared matmul of the step
    with pytest.raises(Exception, match="torch backend's compiled int4 kernel"):
        get_backend("compile").prepare(run_pipeline(graph, get_backend("compile").pipeline), weights,
                                       int4_activations="fused")


@pytest.mark.parametrize("fmt,symmetric,block", [("int4", False, 16), ("int8", True, 16)])
def test_generated_model_py_equals_the_reference(tmp_path, fmt, symmetric, block):
    graph, weights = quantized_layer(fmt, symmetric, block)
    spec = spec_from_dict({**LAYER, "quantization": {"format": fmt, "block": block, "symmetric": symmetric}})
    backend = get_backend("torch")
    backend.build(spec, run_pipeline(graph, backend.pipeline), weights, tmp_path / "out")
    module = import_file(tmp_path / "out" / "model.py", f"quantized_model_{fmt}_{symmetric}")
    layer = module.MoELayer()
    from safetensors.torch import load_file
    layer.load_state_dict(load_file(str(tmp_path / "out" / "weights.safetensors")))
    x = inputs(5)
    ref = interpret(graph, {"x": x}, weights, dtype=torch.float64)["out"]
    out = layer(x)[0]
    torch.testing.assert_close(out.double(), ref, **TOL)


# gpt-oss's experts: clamped SwiGLU with biases (the compiled op carries the clamp's alpha and limit as floats)
CLAMPED = {"bias": True, "activation": "clamped_swiglu", "clamp": {"alpha": 1.702, "limit": 0.5}}


@pytest.mark.parametrize("experts", [{}, CLAMPED], ids=["swiglu", "clamped-swiglu"])
def test_compile_equals_the_quantized_reference(experts):
    spec = {**LAYER, "experts": {**LAYER["experts"], **experts},
            "quantization": {"format": "int4", "block": 16, "symmetric": False}}
    graph = build_graph(spec_from_dict(spec))
    weights = init_weights(graph, 3)
    backend = get_backend("compile")
    run = backend.prepare(run_pipeline(graph, backend.pipeline), weights)
    for tokens in (1, 6):
        x = inputs(tokens)
        ref = interpret(graph, {"x": x}, weights, dtype=torch.float64)["out"]
        torch.testing.assert_close(run(x)["out"].double(), ref, **TOL)


def test_quantized_model_with_attention_embeddings_and_head():
    text = {"model": {"name": "qm", "vocab_size": 64, "hidden": 32, "layers": 2, "first_dense": 1, "dense_width": 32,
                      "attention": {"kind": "gqa", "heads": 4, "kv_heads": 2, "head_dim": 8}},
            "moe": {"experts": {"routed": 4, "shared": 1, "width": 16, "top_k": 2}},
            "quantization": {"format": "int4", "block": 16, "symmetric": False,
                             "weights": {"attention": True, "dense_ffn": True, "embeddings": True, "head": True}}}
    graph = build_model_graph(model_spec_from_dict(text), routing=True)
    weights = init_weights(graph, 0)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    ref = interpret(graph, {"input_ids": ids}, weights, dtype=torch.float64)["logits"]
    backend = get_backend("torch")
    got = backend.prepare(run_pipeline(graph, backend.pipeline), weights)(ids)["logits"]
    torch.testing.assert_close(got.double(), ref, **TOL)


@pytest.mark.parametrize("name", ["aoti", "triton", "expert_parallel:2"])
def test_backends_without_quantized_kernels_say_so(name):
    graph, _ = quantized_layer("int4", True, 16)
    try:
        backend = get_backend(name)
    except Exception as err:  # a backend whose package this machine lacks
        pytest.skip(f"{name} unavailable: {err}")
    ok, reason = backend.supports(run_pipeline(graph, backend.pipeline))
    assert not ok and ("quantized" in reason or "dequantize" in reason or "int4" in reason), reason


# ------------------------------------------------------------------------------------------------
# ONNX


@pytest.mark.parametrize("fmt,symmetric,block", CASES[:4])
def test_onnx_portable_dequantize_linear_equals_the_reference(tmp_path, fmt, symmetric, block):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    graph, weights = quantized_layer(fmt, symmetric, block)
    spec = spec_from_dict({**LAYER, "quantization": {"format": fmt, "block": block, "symmetric": symmetric}})
    backend = get_backend("onnx:portable")
    piped = run_pipeline(graph, backend.pipeline)
    assert backend.supports(piped) == (True, "")
    run = backend.prepare(piped, weights)
    for tokens in (1, 6):
        x = inputs(tokens)
        ref = interpret(graph, {"x": x}, weights, dtype=torch.float64)["out"]
        torch.testing.assert_close(run(x)["out"].double(), ref, **TOL)
    result = backend.build(spec, piped, weights, tmp_path / "onnx")
    model = onnx.load(str(next(p for p in result.files if p.suffix == ".onnx")))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 21
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 5 * 3 + 3  # every routed expert's gate/up/down, and the shared expert's
    assert all(next(a.i for a in n.attribute if a.name == "block_size") == block for n in dq)
    big_float = [i.name for i in model.graph.initializer
                 if i.data_type == onnx.TensorProto.FLOAT and np_size(i) >= 16 * 48]
    assert not big_float, big_float  # no float copy of a weight matrix: codes and scales only


@pytest.mark.parametrize("symmetric", [True, False])
def test_onnx_portable_writes_int4_packed_two_a_byte(tmp_path, symmetric):
    # odd counts: a 65-row head and embedding with 3 blocks a row hold 195 zero points (the last byte half used)
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    text = {"model": {"name": "q4", "vocab_size": 65, "hidden": 48, "layers": 2, "first_dense": 1, "dense_width": 32,
                      "attention": {"kind": "gqa", "heads": 4, "kv_heads": 2, "head_dim": 8}},
            "moe": {"experts": {"routed": 3, "shared": 1, "width": 16, "top_k": 2}},
            "quantization": {"format": "int4", "block": 16, "symmetric": symmetric,
                             "weights": {"embeddings": True, "head": True}}}
    spec = model_spec_from_dict(text)
    graph = build_model_graph(spec, routing=True)
    weights = init_weights(graph, 0)
    backend = get_backend("onnx:portable")
    piped = run_pipeline(graph, backend.pipeline)
    ids = torch.randint(0, 65, (2, 5), generator=torch.Generator().manual_seed(0))
    ref = interpret(graph, {"input_ids": ids}, weights, dtype=torch.float64)["logits"]
    torch.testing.assert_close(backend.prepare(piped, weights)(ids)["logits"].double(), ref, **TOL)
    result = backend.build(spec, piped, weights, tmp_path / "onnx")
    model = onnx.load(str(next(p for p in result.files if p.suffix == ".onnx")))
    assert model.ir_version >= 10 and result.notes[0].startswith("opset 21,")
    inits = {i.name: i for i in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 3 * 3 + 3 + 2  # routed experts' and the shared expert's gate/up/down, embedding, head
    code_type = onnx.TensorProto.INT4 if symmetric else onnx.TensorProto.UINT4
    for node in dq:
        codes = inits[node.input[0]]
        assert codes.data_type == code_type and len(codes.raw_data) == (np_size(codes) + 1) // 2, node.name
        assert len(node.input) == (2 if symmetric else 3)
        if not symmetric:
            zeros = inits[node.input[2]]
            assert zeros.data_type == onnx.TensorProto.UINT4 and len(zeros.raw_data) == (np_size(zeros) + 1) // 2
    head = inits[next(n.input[0] for n in dq if n.input[0].startswith("lm_head"))]
    assert list(head.dims) == [65, 48] and len(head.raw_data) == 65 * 24  # the bytes as stored, half a code each
    # the decoded codes are the stored ones: onnx's own unpacking against the reference's
    stored = weights["lm_head.weight.qweight"]
    nibbles = torch.stack((stored & 0xF, stored >> 4), dim=-1).flatten(-2).to(torch.int64)
    decoded = torch.from_numpy(onnx.numpy_helper.to_array(head).astype("int64"))
    assert torch.equal(decoded, nibbles - 8 if symmetric else nibbles)


def test_onnx_int4_external_data_streams_packed_bytes(tmp_path):
    # the external-data writer streams each 4-bit tensor's packed bytes (what a model over 1.5 GB takes)
    pytest.importorskip("onnxruntime")
    from moe_ir.backends.onnx.flavours import lower
    from moe_ir.backends.onnx.runtime import load_runner
    from moe_ir.backends.onnx.writer import write_model

    graph, weights = quantized_layer("int4", False, 16)
    piped = run_pipeline(graph, get_backend("onnx:portable").pipeline)
    path = write_model(lower(piped, weights, "portable"), tmp_path / "q.onnx", external_data=True)
    codes = sum(weights[n].numel() for n in weights if n.endswith(".qweight"))
    assert (tmp_path / "q.onnx.data").stat().st_size >= codes  # every code written (and page padding)
    x = inputs(3)
    ref = interpret(graph, {"x": x}, weights, dtype=torch.float64)["out"]
    torch.testing.assert_close(load_runner(path)(x)["out"].double(), ref, **TOL)


def np_size(init) -> int:
    n = 1
    for d in init.dims:
        n *= d
    return n


def test_onnx_portable_quantized_model():
    pytest.importorskip("onnxruntime")
    text = {"model": {"name": "qo", "vocab_size": 64, "hidden": 32, "layers": 2, "first_dense": 1, "dense_width": 32,
                      "attention": {"kind": "gqa", "heads": 4, "kv_heads": 2, "head_dim": 8}},
            "moe": {"experts": {"routed": 4, "shared": 1, "width": 16, "top_k": 2}},
            "quantization": {"format": "int8", "block": 16,
                             "weights": {"attention": True, "dense_ffn": True, "embeddings": True, "head": True}}}
    graph = build_model_graph(model_spec_from_dict(text), routing=True)
    weights = init_weights(graph, 0)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    ref = interpret(graph, {"input_ids": ids}, weights, dtype=torch.float64)["logits"]
    backend = get_backend("onnx:portable")
    got = backend.prepare(run_pipeline(graph, backend.pipeline), weights)(ids)["logits"]
    torch.testing.assert_close(got.double(), ref, **TOL)


@pytest.mark.parametrize("name,fmt,words", [("onnx:ort", "fp8_e4m3", "fp8_e4m3"),
                                            ("onnx:plugin", "fp8_e4m3", "fp8_e4m3"),
                                            ("tensorrt", "int4", "outside the routed experts")])
def test_onnx_flavours_without_quantized_lowering_say_so(name, fmt, words):
    graph, _ = quantized_layer(fmt, True, 16)
    try:
        backend = get_backend(name)
    except Exception as err:
        pytest.skip(f"{name} unavailable: {err}")
    ok, reason = backend.supports(run_pipeline(graph, backend.pipeline))
    assert not ok and words in reason, reason


def test_onnx_refuses_fp8_tiles():
    graph, _ = quantized_layer("fp8_e4m3", True, 16)
    backend = get_backend("onnx:portable")
    ok, reason = backend.supports(run_pipeline(graph, backend.pipeline))
    assert not ok and "fp8_e4m3" in reason


@pytest.mark.parametrize("fmt,symmetric", [("int4", True), ("int4", False), ("int8", True), ("int8", False)])
def test_onnx_ort_qmoe_equals_the_reference(tmp_path, fmt, symmetric):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    graph, weights = quantized_layer(fmt, symmetric, 16)
    spec = spec_from_dict({**LAYER, "quantization": {"format": fmt, "block": 16, "symmetric": symmetric}})
    backend = get_backend("onnx:ort")
    piped = run_pipeline(graph, backend.pipeline)
    assert backend.supports(piped) == (True, "")
    run = backend.prepare(piped, weights)
    for tokens in (1, 6):
        x = inputs(tokens)
        ref = interpret(graph, {"x": x}, weights, dtype=torch.float64)["out"]
        torch.testing.assert_close(run(x)["out"].double(), ref, **TOL)
    result = backend.build(spec, piped, weights, tmp_path / "onnx")
    model = onnx.load(str(next(p for p in result.files if p.suffix == ".onnx")))
    (qmoe,) = [n for n in model.graph.node if n.op_type == "QMoE"]
    attrs = {a.name: a for a in qmoe.attribute}
    bits = 4 if fmt == "int4" else 8
    assert attrs["expert_weight_bits"].i == bits and attrs["block_size"].i == 16
    codes = next(i for i in model.graph.initializer if i.name == qmoe.input[2])
    assert codes.data_type == onnx.TensorProto.UINT8 and list(codes.dims) == [5, 32, 48 * bits // 8]  # [E, 2F, H*b/8]
    assert ("int8 com.microsoft.QMoE" in " ".join(result.notes)) == (fmt == "int8")


def test_onnx_ort_int8_qmoe_is_exact_only_with_float_activations(monkeypatch):
    # onnxruntime 1.32's CPU QMoE quantizes the activations of 8-bit experts to int8 unless the session is
    # created with ORT_QMOE_CPU_QNBIT_GEMM=fp32 (the runner sets it; a value the user set is kept)
    pytest.importorskip("onnxruntime")
    graph, weights = quantized_layer("int8", True, 16)
    backend = get_backend("onnx:ort")
    piped = run_pipeline(graph, backend.pipeline)
    x = inputs(6)
    ref = interpret(graph, {"x": x}, weights, dtype=torch.float64)["out"]
    monkeypatch.setenv("ORT_QMOE_CPU_QNBIT_GEMM", "int8")
    err = float((backend.prepare(piped, weights)(x)["out"].double() - ref).abs().max() / ref.abs().max())
    assert 1e-4 < err < 5e-2, err  # int8 activations: close, not exact
    monkeypatch.delenv("ORT_QMOE_CPU_QNBIT_GEMM")
    torch.testing.assert_close(backend.prepare(piped, weights)(x)["out"].double(), ref, **TOL)
    import os
    assert "ORT_QMOE_CPU_QNBIT_GEMM" not in os.environ  # set only while the session was created


@pytest.mark.parametrize("fmt,symmetric", [("int4", False), ("int8", True), ("int8", False)])
def test_onnx_ort_matmul_nbits_for_dense_and_shared_ffns(tmp_path, fmt, symmetric):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    text = {"model": {"name": "qn", "vocab_size": 64, "hidden": 32, "layers": 2, "first_dense": 1, "dense_width": 32,
                      "attention": {"kind": "gqa", "heads": 4, "kv_heads": 2, "head_dim": 8}},
            "moe": {"experts": {"routed": 4, "shared": 1, "width": 16, "top_k": 2}},
            "quantization": {"format": fmt, "block": 16, "symmetric": symmetric,
                             "weights": {"dense_ffn": True, "routed_experts": fmt == "int4"}}}
    spec = model_spec_from_dict(text)
    graph = build_model_graph(spec, routing=True)
    weights = init_weights(graph, 0)
    backend = get_backend("onnx:ort")
    piped = run_pipeline(graph, backend.pipeline)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    ref = interpret(graph, {"input_ids": ids}, weights, dtype=torch.float64)["logits"]
    torch.testing.assert_close(backend.prepare(piped, weights)(ids)["logits"].double(), ref, **TOL)
    result = backend.build(spec, piped, weights, tmp_path / "onnx")
    model = onnx.load(str(next(p for p in result.files if p.suffix == ".onnx")))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 6  # the dense layer's and the shared expert's gate/up/down
    assert {next(a.i for a in n.attribute if a.name == "bits") for n in nbits} == {4 if fmt == "int4" else 8}


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_onnx_ort_int8_activations_option(tmp_path, fmt):
    """int4_activations="int8" on the ort flavour: QMoE and the shared expert's MatMulNBits carry accuracy_level
    4 and the file says so in its metadata; the prepared runner and the runner of the built file (which leave
    ORT_QMOE_CPU_QNBIT_GEMM unset for it) compute on int8 activations: close to the quantized reference, not
    equal to it, where the default export is exact."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from moe_ir.backends.onnx import load_runner

    graph, weights = quantized_layer(fmt, True, 16)
    spec = spec_from_dict({**LAYER, "quantization": {"format": fmt, "block": 16, "symmetric": True}})
    backend = get_backend("onnx:ort")
    piped = run_pipeline(graph, backend.pipeline)
    x = inputs(6)
    ref = interpret(graph, {"x": x}, weights, dtype=torch.float64)["out"]

    def rel_err(out):
        return float((out.double() - ref).abs().max() / ref.abs().max())

    assert rel_err(backend.prepare(piped, weights)(x)["out"]) < 1e-5  # the default: exact
    assert 1e-4 < rel_err(backend.prepare(piped, weights, int4_activations="int8")(x)["out"]) < 5e-2
    result = backend.build(spec, piped, weights, tmp_path / "onnx", int4_activations="int8")
    path = next(p for p in result.files if p.suffix == ".onnx")
    model = onnx.load(str(path))
    levels = {n.op_type: next(a.i for a in n.attribute if a.name == "accuracy_level")
              for n in model.graph.node if n.op_type in ("QMoE", "MatMulNBits")}
    assert levels == {"QMoE": 4, "MatMulNBits": 4}
    assert {p.key: p.value for p in model.metadata_props}["moe_ir.quantized_activations"] == "int8"
    assert "on int8 activations" in " ".join(result.notes)
    assert 1e-4 < rel_err(load_runner(path)(x)["out"]) < 5e-2


def test_int8_activations_refused_where_they_do_not_apply():
    from moe_ir.errors import BackendError

    graph, weights = quantized_layer("int4", True, 16)
    for name, option, fragment in (("onnx:portable", "int8", "add --flavour ort"),
                                   ("onnx:ort", "bf16", "'bf16' and 'fused' are the torch backend's")):
        backend = get_backend(name)
        with pytest.raises(BackendError, match=fragment):
            backend.prepare(run_pipeline(graph, backend.pipeline), weights, int4_activations=option)
    float_graph = build_graph(spec_from_dict(LAYER))
    backend = get_backend("onnx:ort")
    with pytest.raises(BackendError, match="need int4 or int8 weights"):
        backend.prepare(run_pipeline(float_graph, backend.pipeline), init_weights(float_graph, 0),
                        int4_activations="int8")


def test_sessions_made_on_two_threads_keep_their_own_activation_mode():
    """The float-activation variable is process-wide while a session is made: sessions made at once on two
    threads, one exact and one with int8 activations, each get their own mode (moe-ir makes one at a time)."""
    pytest.importorskip("onnxruntime")
    from concurrent.futures import ThreadPoolExecutor

    graph, weights = quantized_layer("int8", True, 16)
    backend = get_backend("onnx:ort")
    piped = run_pipeline(graph, backend.pipeline)
    x = inputs(6)
    ref = interpret(graph, {"x": x}, weights, dtype=torch.float64)["out"]
    options = [{}, {"int4_activations": "int8"}] * 3
    with ThreadPoolExecutor(2) as pool:
        runners = list(pool.map(lambda o: backend.prepare(piped, weights, **o), options))
    for option, run in zip(options, runners):
        err = float((run(x)["out"].double() - ref).abs().max() / ref.abs().max())
        assert (err < 1e-5) if not option else (1e-4 < err < 5e-2), (option, err)
