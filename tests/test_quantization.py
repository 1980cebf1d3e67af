"""Block-wise quantization: the storage layout and dequantization against numpy math written here, the
round-to-nearest bounds per format, the quantize pass against the float graph in the reference interpreter,
spec parsing, and bad input (a block that does not divide, NaN scales, wrong dtypes) named clearly."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_ir.builder import build_graph
from moe_ir.errors import IRError, SpecError, WeightsError
from moe_ir.interpreter import interpret
from moe_ir.ir import OpCode, from_json, to_json, verify
from moe_ir.model_builder import build_model_graph
from moe_ir.model_spec import model_spec_from_dict
from moe_ir.params import init_weights, load_weights, save_weights
from moe_ir.passes import run_pipeline
from moe_ir.passes.quantize import Quantize
from moe_ir.quantization import (dequantize, float_weights_of, pack_int4, parse_quantize_option, quantization_errors,
                                 quantize, quantize_weights, unpack_int4)
from moe_ir.spec import QuantFormat, QuantizationSpec, spec_from_dict

LAYER = {"hidden": 64, "experts": {"routed": 5, "shared": 1, "width": 32, "top_k": 2},
         "router": {"score": "softmax", "normalize": True}}
FORMATS = [("int8", True), ("int8", False), ("int4", True), ("int4", False)]


# ------------------------------------------------------------------------------------------------
# numpy oracle: the layout in words, written independently of moe_ir.quantization


def np_unpack_int4(packed: np.ndarray) -> np.ndarray:
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.int64)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def np_dequantize(parts: dict, fmt: str, block: int) -> np.ndarray:
    q = parts["qweight"].numpy()
    scales = parts["scales"].numpy().astype(np.float64)
    codes = np_unpack_int4(q) if fmt == "int4" else q.astype(np.int64)
    if "zeros" in parts:
        zero = parts["zeros"].numpy().astype(np.int64)
    else:
        zero = np.full(scales.shape, 8 if fmt == "int4" else 0, dtype=np.int64)
    k = codes.shape[-1]
    out = np.empty(codes.shape, dtype=np.float64)
    for b in range(k // block):
        cols = slice(b * block, (b + 1) * block)
        out[..., cols] = (codes[..., cols] - zero[..., b:b + 1]) * scales[..., b:b + 1]
    return out


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda c: len(c) % 2 == 0))
def test_int4_pack_unpack_round_trip(codes):
    t = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_int4(t)
    assert packed.shape == (len(codes) // 2,)
    assert packed.tolist() == [codes[i] | (codes[i + 1] << 4) for i in range(0, len(codes), 2)]
    assert unpack_int4(packed).tolist() == codes


@settings(max_examples=30, deadline=None)
@given(fmt=st.sampled_from(FORMATS), block=st.sampled_from([2, 4, 8, 16]), rows=st.integers(1, 4),
       blocks=st.integers(1, 3), lead=st.sampled_from([(), (2,)]), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-3, 1.0, 40.0]))
def test_quantize_dequantize_against_numpy(fmt, block, rows, blocks, lead, seed, scale):
    fmt, symmetric = fmt
    w = (torch.randn(*lead, rows, blocks * block, generator=torch.Generator().manual_seed(seed),
                     dtype=torch.float64) * scale).to(torch.float32)
    w[..., 0, :block] = 0.0  # an all-zero block: scale 0, dequantizes to exactly 0
    parts = quantize(w, fmt, block, symmetric)
    assert ("zeros" in parts) == (not symmetric)
    stored = w.shape[-1] // 2 if fmt == "int4" else w.shape[-1]
    assert parts["qweight"].shape == (*lead, rows, stored)
    assert parts["scales"].shape == (*lead, rows, blocks) and parts["scales"].dtype == torch.float32
    expected = np_dequantize(parts, fmt, block)
    got = dequantize(parts["qweight"], parts["scales"].double(), parts.get("zeros"), fmt, block)
    np.testing.assert_array_equal(got.numpy(), expected)  # float64: exact
    got32 = dequantize(parts["qweight"], parts["scales"], parts.get("zeros"), fmt, block)
    np.testing.assert_array_equal(got32.numpy(), expected.astype(np.float32))  # one rounding of the same product
    assert float(got[..., 0, :block].abs().max()) == 0.0
    # round to nearest: within half a step of the block's grid (a full step where asymmetric clamps the top)
    step = np.repeat(parts["scales"].numpy().astype(np.float64), block, axis=-1)
    bound = (0.5 if symmetric else 1.0) * step * (1 + 1e-6) + 1e-30
    assert np.all(np.abs(expected - w.double().numpy()) <= bound)


def test_codes_reach_the_ends_of_their_range():
    w = torch.tensor([[-3.5, 0.0, 1.0, 7.0] * 8])
    parts = quantize(w, "int4", 32, True)
    codes = unpack_int4(parts["qweight"])[0].tolist()
    assert parts["scales"].item() == pytest.approx(1.0)  # amax 7 / 7
    assert codes[:4] == [8 - 4, 8, 9, 15]  # -3.5 rounds to even (-4): ties go to even, deterministically
    parts8 = quantize(w, "int8", 32, True)
    assert parts8["qweight"].dtype == torch.int8 and int(parts8["qweight"].max()) == 127


def test_fp8_tiles_against_numpy():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(200, 300, generator=g) * 0.02
    parts = quantize(w, "fp8_e4m3", 128, True)
    assert parts["qweight"].dtype == torch.float8_e4m3fn and parts["scales"].shape == (2, 3)
    values = parts["qweight"].to(torch.float64).numpy()
    scales = parts["scales"].numpy().astype(np.float64)
    expected = np.empty_like(values)
    for i in range(200):
        for j in range(300):
            expected[i, j] = values[i, j] * scales[i // 128, j // 128]
    got = dequantize(parts["qweight"], parts["scales"].double(), None, "fp8_e4m3", 128)
    np.testing.assert_array_equal(got.numpy(), expected)
    # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 of each value (normal range)
    assert float(((got - w.double()).abs() / w.double().abs().clamp(min=1e-3)).max()) <= 2 ** -4 + 1e-6


# ------------------------------------------------------------------------------------------------
# the pass and the reference


@pytest.mark.parametrize("fmt,symmetric", FORMATS + [("fp8_e4m3", True)])
def test_quantized_reference_equals_float_graph_on_dequantized_weights(fmt, symmetric):
    quant = {"format": fmt, "block": 16, "symmetric": symmetric}
    q_graph = build_graph(spec_from_dict({**LAYER, "quantization": quant}))
    f_graph = build_graph(spec_from_dict(LAYER))
    verify(q_graph)
    assert len(q_graph.find(OpCode.DEQUANTIZE)) == 6  # gate/up/down of the routed and of the shared expert
    weights = init_weights(q_graph, 5)
    float_weights = init_weights(f_graph, 5)
    assert torch.equal(weights["router.weight"], float_weights["router.weight"])  # the router stays float
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0))
    got = interpret(q_graph, {"x": x}, weights, dtype=torch.float64)
    want = interpret(f_graph, {"x": x}, float_weights_of(q_graph, weights, dtype=torch.float64), dtype=torch.float64)
    torch.testing.assert_close(got["out"], want["out"], rtol=0, atol=1e-12)
    # and the quantized model is near the float one it came from
    ref = interpret(f_graph, {"x": x}, float_weights, dtype=torch.float64)["out"]
    relative = float((got["out"] - ref).norm() / ref.norm())
    assert 0 < relative < (0.25 if fmt in ("int4", "fp8_e4m3") else 0.03)


def test_quantize_pass_matches_the_spec_section_and_round_trips_json():
    spec = spec_from_dict(LAYER)
    graph = run_pipeline(build_graph(spec), [Quantize(QuantizationSpec(format=QuantFormat.INT4, block=32))])
    from_spec = build_graph(spec_from_dict({**LAYER, "quantization": {"format": "int4", "block": 32}}))
    assert sorted(graph.weights) == sorted(from_spec.weights)
    assert graph.meta["pipeline"] == "quantize"
    again = from_json(to_json(graph))
    assert [n.attrs for n in again.find(OpCode.DEQUANTIZE)] == [n.attrs for n in graph.find(OpCode.DEQUANTIZE)]
    _, modified = Quantize()(graph)  # nothing float left to quantize among the experts
    assert not modified


def test_selected_weights_of_a_model():
    text = {"model": {"name": "m", "vocab_size": 64, "hidden": 32, "layers": 2, "first_dense": 1, "dense_width": 32,
                      "attention": {"kind": "gqa", "heads": 4, "kv_heads": 2, "head_dim": 8}},
            "moe": {"experts": {"routed": 4, "shared": 1, "width": 16, "top_k": 2}},
            "quantization": {"format": "int8", "block": 16,
                             "weights": {"attention": True, "dense_ffn": True, "head": True, "shared_experts": False}}}
    spec = model_spec_from_dict(text)
    graph = build_model_graph(spec)
    quantized = {n.inputs[0].name.rsplit(".", 1)[0] for n in graph.find(OpCode.DEQUANTIZE)}
    assert "layers.1.moe.experts.w_up" in quantized and "layers.0.ffn.w_down" in quantized
    assert "layers.0.attn.w_q" in quantized and "lm_head.weight" in quantized
    assert "layers.1.moe.shared.0.w_up" not in quantized and "embed.weight" not in quantized
    assert not any(name.startswith("layers.1.moe.router") for name in quantized)
    weights = init_weights(graph, 1)
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    logits = interpret(graph, {"input_ids": ids}, weights)["logits"]
    float_graph = build_model_graph(model_spec_from_dict({k: v for k, v in text.items() if k != "quantization"}))
    float_logits = interpret(float_graph, {"input_ids": ids}, init_weights(float_graph, 1))["logits"]
    assert float((logits - float_logits).abs().max()) < 0.05 * float(float_logits.abs().max())


def test_safetensors_round_trip_keeps_the_codes(tmp_path):
    graph = build_graph(spec_from_dict({**LAYER, "quantization": {"format": "int4", "symmetric": False, "block": 16}}))
    weights = init_weights(graph, 0)
    path = save_weights(weights, tmp_path / "w.safetensors")
    back = load_weights(path, graph)
    assert set(back) == set(weights) and all(torch.equal(back[k], weights[k]) for k in weights)
    assert back["experts.w_up.zeros"].dtype == torch.uint8


def test_quantize_weights_is_deterministic_and_reports_errors():
    f_graph = build_graph(spec_from_dict(LAYER))
    q_graph = build_graph(spec_from_dict({**LAYER, "quantization": {"format": "int8", "block": 32}}))
    fw = init_weights(f_graph, 0)
    a, b = quantize_weights(q_graph, fw), quantize_weights(q_graph, fw)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = {r.name: r for r in quantization_errors(q_graph, fw, a)}
    w = fw["experts.w_up"].double()
    err = dequantize(a["experts.w_up.qweight"], a["experts.w_up.scales"].double(), None, "int8", 32) - w
    assert rows["experts.w_up"].max_abs == pytest.approx(float(err.abs().max()))
    assert rows["experts.w_up"].relative == pytest.approx(float(err.norm() / w.norm()))
    assert rows["experts.w_up"].stored_bytes == w.numel() + w.numel() // 32 * 4


# ------------------------------------------------------------------------------------------------
# bad input


def test_a_block_that_does_not_divide_names_the_tensor():
    with pytest.raises(IRError, match=r"experts\.w_down .*block size 64 does not divide its input dimension 32"):
        build_graph(spec_from_dict({**LAYER, "quantization": {"format": "int4", "block": 64}}))


def test_spec_errors():
    with pytest.raises(SpecError, match="power of two"):
        spec_from_dict({**LAYER, "quantization": {"format": "int4", "block": 48}})
    with pytest.raises(SpecError, match="expected one of int8, int4, fp8_e4m3"):
        spec_from_dict({**LAYER, "quantization": {"format": "int3"}})
    with pytest.raises(SpecError, match="quantizes at the top level"):
        model_spec_from_dict({"model": {"name": "m", "vocab_size": 8, "hidden": 16, "layers": 1,
                                        "attention": {"kind": "gqa", "heads": 2, "kv_heads": 1, "head_dim": 8}},
                              "moe": {"experts": {"routed": 4, "width": 8, "top_k": 2},
                                      "quantization": {"format": "int8"}}})
    assert parse_quantize_option("int4:64:asym") == QuantizationSpec(format=QuantFormat.INT4, block=64, symmetric=False)
    with pytest.raises(ValueError, match="neither a block size"):
        parse_quantize_option("int4:33")


def test_nan_scales_and_wrong_code_dtypes_are_refused(tmp_path):
    graph = build_graph(spec_from_dict({**LAYER, "quantization": {"format": "int8", "block": 16}}))
    weights = init_weights(graph, 0)
    bad = dict(weights)
    bad["experts.w_down.scales"] = weights["experts.w_down.scales"].clone()
    bad["experts.w_down.scales"][1, 2, 0] = math.nan
    with pytest.raises(WeightsError, match=r"experts\.w_down\.scales holds 1 non-finite value"):
        load_weights(save_weights(bad, tmp_path / "nan.safetensors"), graph)
    bad = dict(weights, **{"experts.w_up.qweight": weights["experts.w_up.qweight"].to(torch.int16)})
    with pytest.raises(WeightsError, match=r"experts\.w_up\.qweight has dtype int16, expected int8"):
        load_weights(save_weights(bad, tmp_path / "dtype.safetensors"), graph)
    with pytest.raises(WeightsError, match=r"weight w holds non-finite values"):
        quantize(torch.tensor([[math.inf] * 16]), "int8", 16, True, name="w")
