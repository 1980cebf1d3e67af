"""DEQUANTIZE: a block-quantized weight's stored parts (codes, scales, optional zero points) -> the float
weight the rest of the graph reads. The layout is described in moe_ir.quantization; the math is here, beside
the op, because it is the op's reference semantics (exact: one rounding in float32, none in float64)."""
from __future__ import annotations

from ..lazy import LazyModule
from ..spec import QuantFormat
from .graph import ElemType, TensorType
from .ops import Attr, OpCode, OpDef, Port, expect, register

torch = LazyModule("torch")


def implicit_zero(fmt: QuantFormat) -> int:
    """The zero point of a symmetric format: int4 stores code + 8 (a nibble), int8 stores the signed code."""
    return 8 if fmt == QuantFormat.INT4 else 0


def unpack_int4(packed):
    """uint8 [..., K/2] -> codes uint8 [..., K]: the low nibble is the even column."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def dequantize(qweight, scales, zeros, fmt: QuantFormat, block: int):
    """The float weight [..., N, K] in the scales' dtype: (code - zero) * scale per block of `block` input
    columns; fp8_e4m3: value * scale per block x block tile."""
    fmt = QuantFormat(fmt)
    if fmt == QuantFormat.FP8_E4M3:
        n, k = qweight.shape[-2:]
        tiles = scales.repeat_interleave(block, dim=-2)[..., :n, :].repeat_interleave(block, dim=-1)[..., :k]
        return qweight.to(scales.dtype) * tiles
    codes = unpack_int4(qweight) if fmt == QuantFormat.INT4 else qweight
    zero = zeros.repeat_interleave(block, dim=-1).to(torch.int16) if zeros is not None else implicit_zero(fmt)
    return (codes.to(torch.int16) - zero).to(scales.dtype) * scales.repeat_interleave(block, dim=-1)


@register
class Dequantize(OpDef):
    opcode = OpCode.DEQUANTIZE
    doc = ("a quantized weight -> float [..., N, K]: (code - zero) * scale per block of `block` input columns "
           "(int8/int4), value * scale per block x block tile (fp8_e4m3)")
    inputs = (Port("qweight"), Port("scales"), Port("zeros", optional=True))
    output_names = ("weight",)
    attrs = {"format": Attr(QuantFormat), "block": Attr(int), "dtype": Attr(ElemType, ElemType.FLOAT32,
                                                                            "dtype of the float weight")}

    def infer_types(self, node, qweight, scales, zeros):
        fmt, block = node.attrs["format"], node.attrs["block"]
        expect(block >= 1, node, f"block must be positive, found {block}")
        expect(qweight.rank >= 2 and all(isinstance(d, int) for d in qweight.shape), node,
               f"qweight must be a static [..., N, K'] tensor, found {qweight}")
        expect(scales.dtype.is_float, node, f"scales must be floating point, found {scales}")
        expect(node.attrs["dtype"].is_float, node, f"dtype must be a float dtype, found {node.attrs['dtype']}")
        *lead, n, stored = qweight.shape
        if fmt == QuantFormat.FP8_E4M3:
            expect(qweight.dtype == ElemType.FLOAT8_E4M3, node, f"fp8_e4m3 qweight must be f8e4m3, found {qweight}")
            k = stored
            want = (*lead, -(-n // block), -(-k // block))
        else:
            expected = (ElemType.UINT8,) if fmt == QuantFormat.INT4 or zeros is not None else (ElemType.INT8,)
            zp = "with" if zeros is not None else "without"
            expect(qweight.dtype in expected, node,
                   f"{fmt.value} qweight must be {expected[0].value} {zp} zero points, found {qweight}")
            k = stored * 2 if fmt == QuantFormat.INT4 else stored
            expect(k % block == 0, node, f"block {block} does not divide the input dimension {k}")
            want = (*lead, n, k // block)
            if zeros is not None:
                expect(zeros.dtype == ElemType.UINT8 and zeros.shape == want, node,
                       f"zeros must be u8{list(want)}, found {zeros}")
        expect(scales.shape == want, node, f"scales must be {list(want)}, found {scales}")
        if fmt == QuantFormat.FP8_E4M3:
            expect(zeros is None, node, "fp8_e4m3 has no zero points")
        return [TensorType((*lead, n, k), node.attrs["dtype"])]

    def reference(self, attrs, qweight, scales, zeros):
        return (dequantize(qweight, scales, zeros, attrs["format"], attrs["block"]),)
