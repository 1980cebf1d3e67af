"""Quantized weights in ONNX (moe_ir.quantization's layout): each DEQUANTIZE node becomes a standard blocked
DequantizeLinear (opset 21: `block_size` along the input axis) on the stored codes, scales and zero points,
feeding the Gemm/MatMul that reads the weight, so the file holds the quantized weights, not float copies.

int8 codes are initializers as stored (int8, or uint8 with zero points); int4 codes are 4-bit initializers,
two a byte as stored (ONNX packs the flattened tensor, low nibble first, which is the stored layout since
every row holds whole bytes): symmetric ones as INT4 (the stored nibble code + 8 with its top bit flipped is
the signed code, so no zero point), the others as UINT4 with UINT4 zero points (IR version 10). Routed
experts are sliced per expert (`<part>[e]` initializers, one DequantizeLinear each) as the float lowering
slices them. fp8_e4m3 tiles are not lowered (the portable lowering says so).
"""
from __future__ import annotations

import torch
from onnx import TensorProto

from moe_ir.ir import ElemType, Graph, Node, OpCode, Value
from moe_ir.quantization import dequantize_nodes
from moe_ir.spec import QuantFormat
from .emit import MS_DOMAIN
from .weights import FourBit

# The opset whose DequantizeLinear takes `block_size` (blocked quantization).
BLOCKED_DQ_OPSET = 21
QUANTIZED_STORAGE = (ElemType.INT8, ElemType.UINT8)


def is_quantized(value: Value | None) -> bool:
    return value is not None and value.producer is not None and value.producer.op == OpCode.DEQUANTIZE


def dequantize_refusal(graph: Graph) -> str:
    """Why the portable lowering cannot export this graph's quantized weights ('' when it can)."""
    for node in dequantize_nodes(graph):
        if node.attrs["format"] == QuantFormat.FP8_E4M3:
            return (f"{node.name}: fp8_e4m3 tiles have no ONNX lowering here; import the checkpoint dequantized "
                    f"(--dequantize) or quantize it to int8/int4")
    return ""


def qmoe_refusal(graph: Graph) -> str:
    """Why com.microsoft.QMoE cannot take this graph's quantized routed experts ('' when it can): int4 and int8
    blocks (symmetric or with zero points) match the reference on onnxruntime 1.32's CPU kernel; fp8 tiles
    have no QMoE layout."""
    for node in graph.find(OpCode.GROUPED_FFN):
        for value in node.inputs[3:6]:
            if is_quantized(value) and value.producer.attrs["format"] not in (QuantFormat.INT4, QuantFormat.INT8):
                return (f"{value.producer.name}: {value.producer.attrs['format'].value} experts do not lower to "
                        "com.microsoft.QMoE here (int4 and int8 only); import the checkpoint dequantized")
            if is_quantized(value) and value.producer.attrs["block"] < 16:
                return f"{value.producer.name}: com.microsoft.QMoE takes blocks of 16 or more"
    return ""


# onnxruntime 1.32's CPU QMoE runs 8-bit experts through its QNBit GEMM on activations quantized to int8 (about
# 1e-2 relative error against the quantized reference, measured on a tiny layer), whatever the node's
# accuracy_level says; this variable, read when a session is created, keeps float32 activations (each hit
# expert dequantized exactly, then a float GEMM). moe-ir's runner sets it while it creates a session, unless
# the user set it or the file asks for int8 activations (INT8_ACTIVATIONS_META); other hosts of an exported file
# (onnxruntime-genai, a user's session) must set it themselves.
QMOE_FLOAT_ACTIVATIONS_ENV = ("ORT_QMOE_CPU_QNBIT_GEMM", "fp32")
# The metadata key of a file exported with int8 activations (value "int8"): runners leave the variable unset
# for it, so the nodes' accuracy_level decides.
INT8_ACTIVATIONS_META = "moe_ir.quantized_activations"


def asks_int8_activations(meta: dict[str, str]) -> bool:
    """Whether a file's metadata (key -> value) says it was exported with int8 activations (see metadata())."""
    return meta.get(INT8_ACTIVATIONS_META) == "int8"


def qmoe_int8_note(graph: Graph) -> str:
    """The build's note for a graph whose routed experts lower to 8-bit QMoE ('' otherwise)."""
    int8 = any(is_quantized(v) and v.producer.attrs["format"] == QuantFormat.INT8
               for node in graph.find(OpCode.GROUPED_FFN) for v in node.inputs[3:6])
    if not int8:
        return ""
    name, value = QMOE_FLOAT_ACTIVATIONS_ENV
    return (f"ort: int8 com.microsoft.QMoE: onnxruntime's CPU kernel quantizes its activations to int8 (~1e-2 "
            f"relative error) unless {name}={value} is set when the session is created; moe-ir's runner sets "
            f"it, onnxruntime-genai and other hosts need it in their environment")


def _pack_nibbles(t: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [..., n] -> two a byte [..., ceil(n/2)], the even index low (odd n: padded with 0)."""
    if t.shape[-1] % 2:
        t = torch.nn.functional.pad(t, (0, 1))
    return (t[..., 0::2] | (t[..., 1::2] << 4)).to(torch.uint8)


def _unsigned_codes(t: torch.Tensor) -> torch.Tensor:
    """Stored codes as QMoE reads them, uint8: signed int8 codes (symmetric) shifted by its implicit zero
    point 128; uint8 codes (int4 nibble pairs, or int8 with zero points) as they are."""
    if t.dtype == torch.int8:
        return (t.to(torch.int16) + 128).to(torch.uint8)
    return t.to(torch.uint8)


def _interleave_rows(pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(gate [E, F, ...], up [E, F, ...]) -> rows g0, u0, g1, u1, ... (QMoE/MoE swiglu_fusion=1)."""
    gate, up = pair
    return torch.stack([gate, up], dim=2).flatten(1, 2).contiguous()


def _flat(t: torch.Tensor) -> torch.Tensor:
    """Stored int4 codes (two a byte along each row, rows of whole bytes) in ONNX's 4-bit layout: the same
    bytes, flattened."""
    return t.reshape(-1)


def _signed_nibbles(t: torch.Tensor) -> torch.Tensor:
    """Stored symmetric int4 nibbles (code + 8) -> the codes as ONNX INT4 (two's complement nibbles)."""
    return (t ^ 0x88).reshape(-1)


def _pack_flat_nibbles(t: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 (zero points, one a byte) -> ONNX's 4-bit layout: flattened, two a byte."""
    return _pack_nibbles(t.reshape(-1))


# ONNX Runtime's accuracy_level 4: the QNBit GEMM of QMoE and MatMulNBits quantizes its activations to int8
# (per block, on the fly) and multiplies int8 x int4/int8: faster on CPUs with integer dot products, not exact.
INT8_ACTIVATIONS_LEVEL = 4


class QuantOps:
    """Mixin of the lowering classes: DEQUANTIZE as DequantizeLinear, never folded into a float initializer;
    with `matmul_nbits` (the ort flavour) an int8/int4 weight read only by FFN projections becomes the
    weight of com.microsoft.MatMulNBits instead. With `int8_activations` (the ort flavour's option) QMoE and
    MatMulNBits nodes carry accuracy_level 4 (int8 activations)."""

    matmul_nbits = False
    int8_activations = False

    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), **({INT8_ACTIVATIONS_META: "int8"} if self.int8_activations else {})}

    def activations_attrs(self) -> dict[str, int]:
        """The accuracy level attribute of QMoE / MatMulNBits nodes: none (ONNX Runtime's default, float32
        activations for 4-bit weights) unless int8 activations were asked for."""
        return {"accuracy_level": INT8_ACTIVATIONS_LEVEL} if self.int8_activations else {}

    def __init__(self, graph: Graph, weights) -> None:
        super().__init__(graph, weights)
        # The dequantized values stay computed in the file (DequantizeLinear), so the initializers are the
        # quantized parts.
        self.inits.folded -= {v.name for n in dequantize_nodes(graph) for v in n.outputs}
        self.nbits: dict[str, Node] = {}
        if self.matmul_nbits:
            for node in dequantize_nodes(graph):
                users = graph.users(node.outputs[0])
                if (node.attrs["format"] in (QuantFormat.INT4, QuantFormat.INT8) and node.attrs["block"] >= 16
                        and node.attrs["dtype"] == ElemType.FLOAT32 and users
                        and all(u.op == OpCode.FFN for u in users)):
                    self.nbits[node.outputs[0].name] = node

    def matmul_transposed(self, x: str, weight: str, bias: str | None, out: str | None = None) -> str:
        node = self.nbits.get(weight)
        if node is None:
            return super().matmul_transposed(x, weight, bias, out)
        # MatMulNBits: B [N, K/block, block*bits/8] (the stored bytes, regrouped by block), scales [N*K/block],
        # zero points uint8 [N*K/block] (int8) or two a byte per row (int4); absent: 2^(bits-1), which is
        # the stored int4 nibble's 8 and, for signed int8 codes stored + 128, 128.
        qweight, scales, zeros = node.inputs
        fmt, block = node.attrs["format"], node.attrs["block"]
        n, k = (int(d) for d in node.outputs[0].type.shape)
        bits = 4 if fmt == QuantFormat.INT4 else 8
        blob = block * bits // 8

        def codes(t: torch.Tensor) -> torch.Tensor:
            return _unsigned_codes(t).reshape(n, k // block, blob)

        ins = [x, self.inits.add(qweight, codes, name=f"{qweight.name}.nbits", dtype=torch.uint8),
               self.inits.add(scales, lambda t: t.reshape(-1), name=f"{scales.name}.nbits")]
        if zeros is not None:
            pack = (lambda t: _pack_nibbles(t).reshape(-1)) if bits == 4 else (lambda t: t.reshape(-1))
            ins.append(self.inits.add(zeros, pack, name=f"{zeros.name}.nbits"))
        y = self.em.op("MatMulNBits", ins, domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=block,
                       **self.activations_attrs(), **({"out": out} if out and not bias else {}))
        if bias:
            y = self.em.op("Add", [y, bias], **({"out": out} if out else {}))
        return y

    @classmethod
    def stored_dtype_ok(cls, value: Value) -> bool:
        return value.type.dtype in QUANTIZED_STORAGE

    def opset(self) -> int:
        return BLOCKED_DQ_OPSET if any(n.op_type == "DequantizeLinear" for n in self.em.nodes) else 0

    def _part(self, value: Value, e: int | None, four_bit: int | None = None, transform=None,
              dims: tuple[int, ...] | None = None) -> str:
        """Initializer of a stored part (whole, or expert e's slice); `four_bit` (TensorProto.INT4/UINT4):
        written as 4-bit elements of `dims` (default: the part's shape), `transform` packing them two a byte."""
        shape = value.type.shape[1:] if e is not None else value.type.shape
        packed = FourBit(four_bit, dims or tuple(int(d) for d in shape)) if four_bit is not None else None
        suffix = ".onnx" if transform is not None else ""
        if transform is not None and value.producer is not None:
            # a fold (gate/up codes concatenated by fuse-gate-up-quantized) is evaluated in float32, exact for
            # 8-bit codes; the bit-level transforms take them back in their stored type
            stored, bits = value.type.dtype.torch, transform
            transform = lambda t: bits(t.to(stored))  # noqa: E731
        if e is None:
            return self.inits.add(value, transform, name=f"{value.name}{suffix}", four_bit=packed)
        return self.inits.add(value, transform, name=f"{value.name}[{e}]{suffix}", four_bit=packed,
                              evaluate=lambda v: self.inits.evaluate_slice(v, e))

    def _dequantize_linear(self, node: Node, e: int | None, out: str | None = None) -> str:
        em = self.em
        qweight, scales, zeros = node.inputs
        fmt, block = node.attrs["format"], node.attrs["block"]
        shape = node.outputs[0].type.shape[1:] if e is not None else node.outputs[0].type.shape
        dims = tuple(int(d) for d in shape)  # the codes' logical shape: one 4-bit element per weight
        if fmt == QuantFormat.INT4 and zeros is None:
            # symmetric: the stored nibble is code + 8; flipping its top bit gives the code as a signed
            # 4-bit value, so an INT4 tensor dequantizes with no zero point
            ins = [self._part(qweight, e, TensorProto.INT4, _signed_nibbles, dims), self._part(scales, e)]
        elif fmt == QuantFormat.INT4:
            ins = [self._part(qweight, e, TensorProto.UINT4, _flat, dims), self._part(scales, e),
                   self._part(zeros, e, TensorProto.UINT4, _pack_flat_nibbles)]
        else:
            ins = [self._part(v, e) for v in node.inputs if v is not None]
        y = em.op("DequantizeLinear", ins, axis=-1, block_size=block, **({"out": out} if out else {}))
        dtype = node.attrs["dtype"]
        return em.cast(y, ElemType.FLOAT32, dtype)

    def expert_weight(self, value: Value, e: int) -> str:
        if is_quantized(value):
            return self._dequantize_linear(value.producer, e)
        return super().expert_weight(value, e)

    def qmoe_inputs(self, ffn: Node, tokens: str, probs: str) -> tuple[list[str], dict]:
        """Inputs and attributes of com.microsoft.QMoE for a grouped FFN on int4 or int8 experts: fc1 = gate and
        up rows interleaved (swiglu_fusion=1) or up alone, fc2 = down; codes uint8 [E, rows, K*bits/8] (int4 as
        stored: two a byte, low nibble first; symmetric int8 + 128, the op's implicit zero point), scales
        [E, rows, K/block], zero points one a block (int8) or packed two a byte along the blocks (int4)."""
        w = {k: ffn.input(k) for k in ("w_up", "w_down", "w_gate", "b_up", "b_down", "b_gate")}
        act = ffn.attrs["activation"]
        parts = {key: dict(zip(("qweight", "scales", "zeros"), w[key].producer.inputs))
                 for key in ("w_up", "w_down", "w_gate") if w[key] is not None}
        asym = parts["w_up"]["zeros"] is not None

        def fc1(part: str, transform=None, name: str = "", dtype=None) -> str:
            up = parts["w_up"][part]
            if not act.gated:
                return self.inits.add(up, transform, name=f"{ffn.name}.fc1_{name}" if transform else None,
                                      dtype=dtype)
            gate = parts["w_gate"][part]
            return self.inits.add(up, (lambda t: transform(_interleave_rows(t))) if transform else _interleave_rows,
                                  name=f"{ffn.name}.fc1_{name}", dtype=dtype,
                                  evaluate=lambda v, gate=gate, up=up: (self.inits.given(gate), self.inits.given(up)))

        bits = 4 if w["w_up"].producer.attrs["format"] == QuantFormat.INT4 else 8
        ins = [tokens, probs, fc1("qweight", _unsigned_codes, name="codes", dtype=torch.uint8), fc1("scales", name="scales"),
               self._qmoe_bias(ffn, w, act),
               self.inits.add(parts["w_down"]["qweight"], _unsigned_codes, name=f"{ffn.name}.fc2_codes",
                              dtype=torch.uint8),
               self.operand(parts["w_down"]["scales"]), self.operand(w["b_down"])]
        if asym:
            pack = _pack_nibbles if bits == 4 else None
            ins += ["", "", "", fc1("zeros", pack, name="zeros"),
                    self.inits.add(parts["w_down"]["zeros"], pack, name=f"{ffn.name}.fc2_zeros")]
        while ins[-1] == "":
            ins.pop()
        attrs = {"expert_weight_bits": bits, "block_size": w["w_up"].producer.attrs["block"],
                 **self.activations_attrs()}
        if act.gated:
            attrs.update(activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
        else:
            attrs.update(activation_type=act.value)
        return ins, attrs

    def _qmoe_bias(self, ffn: Node, w: dict, act) -> str:
        if w["b_up"] is None:
            return ""
        if not act.gated:
            return self.operand(w["b_up"])
        return self.inits.add(w["b_up"], _interleave_rows, name=f"{ffn.name}.fc1_bias",
                              evaluate=lambda v: (self.inits.evaluate(w["b_gate"]), self.inits.evaluate(w["b_up"])))

    def _lower_dequantize(self, node: Node) -> None:
        users = self.graph.users(node.outputs[0])
        if users and all(u.op == OpCode.GROUPED_FFN for u in users):
            return  # dequantized one expert at a time where the experts are lowered (expert_weight)
        if users and all(u.op == OpCode.FUSED_MOE for u in users):
            return  # the plugin's node reads the stored parts (flavours.PluginLowering)
        if node.outputs[0].name in self.nbits:
            return  # the weight of MatMulNBits where it is read
        out = node.outputs[0].name
        if node.attrs["dtype"] == ElemType.FLOAT32:
            self._dequantize_linear(node, None, out=out)
        else:
            self.em.op("Identity", [self._dequantize_linear(node, None)], out=out, name=node.name)
