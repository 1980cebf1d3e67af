"""Block-quantized weights (moe_ir.quantization's layout). A DEQUANTIZE node of the graph runs as
`packed_weight`: a tuple (qweight, scales, zeros, format, block, int4_packed, int4_scales) that stands for
the float weight without making it; the FFN and linear kernels below take such a tuple where they take
a weight and dequantize one expert at a time, or, for decode, run torch's int4 matmul on the codes
(int4_packed and int4_scales both set) or the fused float32 kernel on the codes regrouped by
`int4_half_split` (int4_packed set, int4_scales None).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .experts import activate, experts_in_place, experts_traced


def unpack_int4(packed):
    """uint8 [..., K/2] -> codes uint8 [..., K]: the low nibble is the even column."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def dequantize_weight(qweight, scales, zeros, fmt, block):
    """The float weight [..., N, K] in the scales' dtype: (code - zero) * scale per block of input columns
    (zero 8 for symmetric int4, 0 for symmetric int8); fp8_e4m3: value * scale per block x block tile. The
    same products as the reference's (code - zero is an exact small integer in float), so the values are
    identical; blocks broadcast against their scale instead of repeating it over the columns."""
    if fmt == "fp8_e4m3":
        n, k = qweight.shape[-2:]
        tiles = scales.repeat_interleave(block, dim=-2)[..., :n, :].repeat_interleave(block, dim=-1)[..., :k]
        return qweight.to(scales.dtype) * tiles
    dtype = scales.dtype
    # One float buffer, filled and then scaled in place: each extra temporary of a weight's size is a pass
    # over fresh memory, which dominated when decode dequantizes an expert per call.
    if fmt == "int4":
        codes = torch.empty(*qweight.shape, 2, dtype=dtype, device=qweight.device)
        codes[..., 0] = qweight & 0xF
        codes[..., 1] = qweight >> 4
    else:
        codes = qweight.to(dtype)
    blocks = codes.view(*scales.shape, block)
    if zeros is not None:
        blocks.sub_(zeros.to(dtype).unsqueeze(-1))
    elif fmt == "int4":
        blocks.sub_(8.0)
    return blocks.mul_(scales.unsqueeze(-1)).view(*qweight.shape[:-1], -1)


def int4_matmul_takes(qweight, fmt, block):
    """Whether torch's CPU int4 matmul (_weight_int4pack_mm_for_cpu) serves this weight: int4 codes, a block
    of 32..256 (its group sizes), on CPU, and torch has the op."""
    return (fmt == "int4" and block in (32, 64, 128, 256) and qweight.device.type == "cpu"
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"))


def int4_matmul_layout(qweight, scales, zeros, block):
    """(packed codes, scales_and_zeros) of each matrix in the layout of torch's CPU int4 matmul, stacked like
    qweight: the op computes (code - 8) * scale + zero per group, so a symmetric block (code stored + 8)
    has zero 0 and one with zero point z has zero (8 - z) * scale; scales_and_zeros is bfloat16
    [K/block, N, 2] (the op's fast path takes bfloat16 activations and scales)."""
    k = qweight.shape[-1] * 2
    codes = unpack_int4(qweight).to(torch.int32).reshape(-1, qweight.shape[-2], k)
    packed = torch.stack([torch.ops.aten._convert_weight_to_int4pack_for_cpu(c.contiguous(), 1) for c in codes])
    s = scales.to(torch.float32).reshape(-1, *scales.shape[-2:])
    z = torch.zeros_like(s) if zeros is None else (8 - zeros.to(torch.float32).reshape(s.shape)) * s
    layout = torch.stack((s, z), dim=-1).transpose(1, 2).contiguous().to(torch.bfloat16)
    return (packed.reshape(*qweight.shape[:-2], *packed.shape[-2:]),
            layout.reshape(*scales.shape[:-2], *layout.shape[-3:]))


def int4_half_split(qweight, block):
    """Stored int4 codes [..., N, K/2] (columns 2j, 2j+1 in one byte) -> [..., N, K/block, block/2]: each block's
    first block/2 columns in the low nibbles, its last block/2 in the high ones, so the fused kernel reads
    both halves of a block with contiguous loads. The same bytes' worth: no float copy."""
    codes = unpack_int4(qweight)
    halves = codes.view(*codes.shape[:-1], codes.shape[-1] // block, 2, block // 2)
    return halves[..., 0, :] | (halves[..., 1, :] << 4)


def int4_fused_matmul(x, codes, scales, zeros):
    """x [M, K] @ W.T for an int4 W held as `int4_half_split` codes [N, K/block, block/2]: each weight is
    dequantized where it is used, (code - zero) * scale in float32 (the reference's value), and multiplied by
    x, so every product is the reference's; only the order of the sum differs. Written for torch.compile,
    which makes it one loop over the codes (half a byte a weight instead of float32's four)."""
    n, blocks, half = codes.shape
    s = scales.unsqueeze(-1)
    zero = 8.0 if zeros is None else zeros.to(s.dtype).unsqueeze(-1)
    low = ((codes & 15).to(s.dtype) - zero) * s
    high = ((codes >> 4).to(s.dtype) - zero) * s
    xv = x.view(x.shape[0], 1, blocks, 2, half)
    return (xv[:, :, :, 0] * low + xv[:, :, :, 1] * high).sum((-1, -2))


def compiled_int4_matmul(x, codes, scales, zeros):
    """int4_fused_matmul compiled once a process by torch.compile (Inductor's C++ kernel), kept on this
    function (a copy of the kernels carries no module state)."""
    compiled = getattr(compiled_int4_matmul, "compiled", None)
    if compiled is None:
        compiled = compiled_int4_matmul.compiled = torch.compile(int4_fused_matmul, fullgraph=True)
    return compiled(x, codes, scales, zeros)


def packed_weight(qweight, scales, zeros, fmt, block, int4_activations):
    """A quantized weight as the kernels take it (see above). `int4_activations` "bf16": int4 weights also
    get the layout of torch's int4 matmul (made here once per weight; the eager module keeps the result
    while the weights are unchanged), which decode then runs with bfloat16 activations: about a quarter of
    float32's bytes read, at bfloat16 precision (~3e-3 relative). "fused": int4 weights also get the
    `int4_half_split` layout, which decode runs through `compiled_int4_matmul` on float32 activations
    (the reference's products). None: every weight is dequantized before a float32 GEMM."""
    if int4_activations == "bf16" and int4_matmul_takes(qweight, fmt, block):
        packed, layout = int4_matmul_layout(qweight, scales, zeros, block)
        return (qweight, scales, zeros, fmt, block, packed, layout)
    if int4_activations == "fused" and fmt == "int4" and block % 2 == 0:
        return (qweight, scales, zeros, fmt, block, int4_half_split(qweight, block), None)
    return (qweight, scales, zeros, fmt, block, None, None)


def is_packed(w):
    return isinstance(w, tuple)


def unpacked(w):
    """A weight as a float tensor: a packed weight dequantized whole (the ops that read weights whole:
    embeddings, attention projections), any other operand as it is."""
    return dequantize_weight(w[0], w[1], w[2], w[3], w[4]) if isinstance(w, tuple) else w


def packed_expert(w, e):
    """Expert e's matrix of a stacked packed weight (views: nothing is copied)."""
    if w is None:
        return None
    qweight, scales, zeros, fmt, block, packed, layout = w
    return (qweight[e], scales[e], None if zeros is None else zeros[e], fmt, block,
            None if packed is None else packed[e], None if layout is None else layout[e])


def packed_linear(x, w, b):
    """x [n, K] @ W.T (+ b) for a packed matrix W: W dequantized (one matrix at a time) and a float GEMM, the
    same products as the reference; for 1-3 rows of a weight packed with int4_activations "bf16", torch's
    int4 matmul on the codes with bfloat16 activations (decode: bound by reading the weight). torch's int4
    matmul on float32 activations is no faster than the float32 GEMV here, and its output is bfloat16."""
    if w[5] is not None and w[6] is not None and x.shape[0] < 4:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), w[5], w[4],
                                                       w[6]).to(x.dtype)
    elif w[5] is not None and x.shape[0] < 4 and x.dtype == w[1].dtype == torch.float32:
        y = compiled_int4_matmul(x.contiguous(), w[5], w[1], w[2])
    else:
        y = F.linear(x, dequantize_weight(w[0], w[1], w[2], w[3], w[4]).to(x.dtype))
    return y if b is None else y + b.to(y.dtype)


def ffn_packed(x, w_up, w_down, w_gate, b_up, b_down, b_gate, activation):
    """`ffn` on packed weights."""
    up = packed_linear(x, w_up, b_up)
    gate = packed_linear(x, w_gate, b_gate) if w_gate is not None else None
    return packed_linear(activate(activation, gate, up), w_down, b_down)


def grouped_ffn_packed(x, rows, group_sizes, w_up, w_down, w_gate, b_up, b_down, b_gate, activation):
    """`grouped_ffn` on packed expert weights: each expert with rows runs `ffn_packed` on its own matrices,
    so at most one expert's float weights exist at a time (never a float copy of every expert). Under
    torch.compile the groups are unbacked slices as in `grouped_ffn_traced`."""

    def expert_ffn(e, xe):
        return ffn_packed(xe, packed_expert(w_up, e), packed_expert(w_down, e), packed_expert(w_gate, e),
                          *(None if b is None else b[e] for b in (b_up, b_down, b_gate)), activation)

    if torch.compiler.is_compiling():
        return experts_traced(x, rows, group_sizes, expert_ffn)
    # on the caller's thread: the fused int4 kernel is compiled by torch.compile on first use, which must not
    # run on two threads at once
    return experts_in_place(x, rows, group_sizes.tolist(), expert_ffn, side_by_side=False)
