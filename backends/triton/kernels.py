"""Triton kernels of the routed part of an MoE layer: route, dispatch, grouped expert FFN, combine.

Only ``@triton.jit`` functions, their shape contracts and the tile table live here; the checked
wrappers, the torch custom ops and the autograd formulas are in ``ops.py``.

Design choices
--------------
* **Routing** works on one block of tokens per program with the whole expert row in registers
  (E <= 256, padded to a power of two). Group limiting and top-k are done with repeated
  arg-max passes (lowest index wins a tie, like ``torch.topk`` on distinct values), so there
  is no sort and no reshape that would need E / n_group to be a power of two (DeepSeek-V2 has
  160 experts in 8 groups).
* **Dispatch** is two launches of one program per expert: count, then place. The second
  launch recomputes every expert's padded offset from the counts itself, so no prefix sum runs
  on the host and nothing waits for the device: the outputs have a worst-case size fixed by
  the shapes (``A_pad = (T*k + E*(block-1)) // block * block``).
* **Padding** every expert's rows to a multiple of the GEMM row tile ``block`` makes each row
  block belong to exactly one expert, so the grouped GEMM looks that expert up once per
  program (``block_expert``) and runs dense ``tl.dot`` tiles, with no per-row weight gather.
  Padding rows hold assignment ``-1``; they read zeros and their output rows are zero.
* **Grouped FFN** is two kernels: ``h = act(x W_gate^T) * (x W_up^T)`` with the rows of x
  gathered by dispatch order inside the kernel (no permuted copy of x), then ``y = h W_down^T``.
  ``h`` is stored in the activation dtype (as a real layer does); accumulation is fp32.
  Triton 3.9's interpreter computes ``tl.dot`` of bfloat16 operands wrongly (values ~1e10), so
  in the interpreter bfloat16 tiles are converted to fp32 before the dot (``UPCAST``); the
  products of bf16 values are exact in fp32, so the result is what a GPU's bf16 MMA gives.
* **Routing weights are applied in combine**, not in the down GEMM epilogue: the FFN output
  then does not depend on the router, and the weight gradient is one dot product per slot.
* **Combine** gathers, per token, its k rows: deterministic, no atomics.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

# Activation codes shared by the kernels and the wrappers (constexpr ints in the kernels).
ACT_SWIGLU = 0
ACT_GEGLU = 1
ACT_GELU = 2
ACT_RELU = 3
ACTIVATION_CODES = {"swiglu": ACT_SWIGLU, "geglu": ACT_GEGLU, "gelu": ACT_GELU, "relu": ACT_RELU}
GATED_ACTIVATIONS = frozenset({"swiglu", "geglu"})

SCORE_CODES = {"softmax": 0, "sigmoid": 1}
GROUP_SCORE_CODES = {"max": 0, "top2_sum": 1}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# --------------------------------------------------------------------------------------------
# Tile table. The interpreter executes every tile op in numpy, so small tiles keep tests fast;
# on a GPU the row tile grows with the average number of rows per expert.
# --------------------------------------------------------------------------------------------
def row_block(num_assignments: int, num_experts: int, *, interpret: bool) -> int:
    """GEMM row tile = dispatch padding multiple, chosen from the average rows per expert."""
    if interpret:
        return 16
    per_expert = num_assignments // max(num_experts, 1)
    if per_expert >= 128:
        return 128
    if per_expert >= 32:
        return 64
    return 16  # tl.dot needs at least 16 rows


def ffn_tiles(interpret: bool) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K): output-column tile and reduction tile of both FFN GEMMs."""
    return (32, 32) if interpret else (64, 64)


def route_token_block(num_experts_padded: int, interpret: bool) -> int:
    """Tokens per routing program; keeps a [BLOCK_T, BLOCK_E] fp32 tile in registers."""
    if interpret:
        return 16
    return max(1, min(64, 8192 // num_experts_padded))


# --------------------------------------------------------------------------------------------
# route
#   logits  [T, E]  any float dtype (read as fp32), row stride stride_l
#   bias    [E]     fp32 (read only if HAS_BIAS)
#   weights [T, K]  fp32 out, contiguous
#   idx     [T, K]  int64 out, contiguous
#   grid: (cdiv(T, BLOCK_T),);  BLOCK_E >= E, BLOCK_G >= N_GROUP, BLOCK_K >= K, powers of two
# --------------------------------------------------------------------------------------------
@triton.jit
def route_kernel(
    logits_ptr, bias_ptr, weights_ptr, idx_ptr,
    T, E, stride_l, scale,
    K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
    SCORE: tl.constexpr, GROUP_SCORE: tl.constexpr, NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    ok = row_ok[:, None] & col_ok[None, :]
    logits = tl.load(logits_ptr + rows[:, None] * stride_l + cols[None, :], mask=ok,
                     other=float("-inf")).to(tl.float32)
    if SCORE == 0:
        row_max = tl.max(logits, axis=1)
        row_max = tl.where(row_ok, row_max, 0.0)  # keeps fully masked rows finite
        num = tl.exp(logits - row_max[:, None])
        num = tl.where(ok, num, 0.0)
        den = tl.sum(num, axis=1)
        den = tl.where(row_ok, den, 1.0)
        scores = num / den[:, None]
    else:
        scores = 1.0 / (1.0 + tl.exp(-logits))
        scores = tl.where(ok, scores, 0.0)
    sel = scores
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        sel = sel + bias[None, :]
    neg_inf = float("-inf")
    sel = tl.where(col_ok[None, :], sel, neg_inf)

    if N_GROUP > 1:
        group_size = E // N_GROUP
        group_of_col = cols // group_size
        gcols = tl.arange(0, BLOCK_G)
        group_scores = tl.full((BLOCK_T, BLOCK_G), neg_inf, tl.float32)
        for g in tl.static_range(N_GROUP):
            in_g = (group_of_col == g) & col_ok
            vals = tl.where(in_g[None, :], sel, neg_inf)
            best = tl.max(vals, axis=1)
            if GROUP_SCORE == 1:
                best_col = tl.min(tl.where(vals == best[:, None], cols[None, :], BLOCK_E), axis=1)
                vals = tl.where(cols[None, :] == best_col[:, None], neg_inf, vals)
                best = best + tl.max(vals, axis=1)
            group_scores = tl.where(gcols[None, :] == g, best[:, None], group_scores)
        group_scores = tl.where(gcols[None, :] < N_GROUP, group_scores, neg_inf)
        kept = tl.zeros((BLOCK_T, BLOCK_G), tl.int32)
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(group_scores, axis=1)
            best_g = tl.min(tl.where(group_scores == best[:, None], gcols[None, :], BLOCK_G), axis=1)
            chosen = gcols[None, :] == best_g[:, None]
            kept = tl.where(chosen, 1, kept)
            group_scores = tl.where(chosen, neg_inf, group_scores)
        keep_col = tl.zeros((BLOCK_T, BLOCK_E), tl.int32)
        for g in tl.static_range(N_GROUP):
            kept_g = tl.sum(tl.where(gcols[None, :] == g, kept, 0), axis=1)
            keep_col = tl.where((group_of_col[None, :] == g) & (kept_g[:, None] > 0), 1, keep_col)
        sel = tl.where(keep_col > 0, sel, neg_inf)

    kcols = tl.arange(0, BLOCK_K)
    top_w = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    top_i = tl.zeros((BLOCK_T, BLOCK_K), tl.int64)
    for j in tl.static_range(K):
        best = tl.max(sel, axis=1)
        best_col = tl.min(tl.where(sel == best[:, None], cols[None, :], BLOCK_E), axis=1)
        hit = cols[None, :] == best_col[:, None]
        w = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        top_w = tl.where(kcols[None, :] == j, w[:, None], top_w)
        top_i = tl.where(kcols[None, :] == j, best_col[:, None].to(tl.int64), top_i)
        sel = tl.where(hit, neg_inf, sel)
    if NORMALIZE:
        top_w = top_w / (tl.sum(top_w, axis=1)[:, None] + 1e-20)
    top_w = top_w * scale
    out_ok = row_ok[:, None] & (kcols[None, :] < K)
    out_off = rows[:, None] * K + kcols[None, :]
    tl.store(weights_ptr + out_off, top_w, mask=out_ok)
    tl.store(idx_ptr + out_off, top_i, mask=out_ok)


# --------------------------------------------------------------------------------------------
# dispatch, launch 1: count
#   expert_idx [A] int64 (A = T*k, flattened), value E (or anything outside [0, E)) = dropped
#   counts     [E] int32 out
#   grid: (E,)
# --------------------------------------------------------------------------------------------
@triton.jit
def dispatch_count_kernel(idx_ptr, counts_ptr, A, BLOCK_A: tl.constexpr):
    e = tl.program_id(0)
    total = tl.zeros((), tl.int32)
    for start in range(0, A, BLOCK_A):
        offs = start + tl.arange(0, BLOCK_A)
        ids = tl.load(idx_ptr + offs, mask=offs < A, other=-1)
        total += tl.sum((ids == e).to(tl.int32), axis=0)
    tl.store(counts_ptr + e, total)


# --------------------------------------------------------------------------------------------
# dispatch, launch 2: place
#   expert_idx        [A] int64
#   counts            [E] int32 (from launch 1)
#   sorted_assignment [A_pad] int32 out, pre-filled with -1; row r of the padded layout holds
#                     assignment a = t*k + slot, ascending a within an expert
#   assignment_row    [A] int32 out, pre-filled with -1: row of assignment a (-1 = dropped)
#   expert_offsets    [E+1] int32 out: unpadded exclusive prefix of counts
#   padded_offsets    [E+1] int32 out: prefix of counts rounded up to multiples of BLOCK_M
#   block_expert      [A_pad // BLOCK_M] int32 out, pre-filled with -1: expert of each row block
#   grid: (E,); BLOCK_E >= E (power of two)
# --------------------------------------------------------------------------------------------
@triton.jit
def dispatch_place_kernel(
    idx_ptr, counts_ptr, sorted_ptr, row_ptr, offsets_ptr, padded_ptr, block_expert_ptr,
    A, E, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_E: tl.constexpr,
):
    e = tl.program_id(0)
    ecols = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + ecols, mask=ecols < E, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    before = ecols < e
    start = tl.sum(tl.where(before, counts, 0), axis=0)
    padded_start = tl.sum(tl.where(before, padded, 0), axis=0)
    my_count = tl.sum(tl.where(ecols == e, counts, 0), axis=0)
    my_padded = tl.sum(tl.where(ecols == e, padded, 0), axis=0)
    tl.store(offsets_ptr + e + 1, start + my_count)
    tl.store(padded_ptr + e + 1, padded_start + my_padded)
    if e == 0:
        tl.store(offsets_ptr, 0)
        tl.store(padded_ptr, 0)
    for b in range(padded_start // BLOCK_M, (padded_start + my_padded) // BLOCK_M):
        tl.store(block_expert_ptr + b, e)

    placed = tl.zeros((), tl.int32)
    for base in range(0, A, BLOCK_A):
        offs = base + tl.arange(0, BLOCK_A)
        ids = tl.load(idx_ptr + offs, mask=offs < A, other=-1)
        mine = (ids == e).to(tl.int32)
        rank = tl.cumsum(mine, axis=0) - 1
        row = padded_start + placed + rank
        hit = mine > 0
        tl.store(sorted_ptr + row, offs.to(tl.int32), mask=hit)
        tl.store(row_ptr + offs, row, mask=hit)
        placed += tl.sum(mine, axis=0)


@triton.jit
def _silu(g):
    return g / (1.0 + tl.exp(-g))


@triton.jit
def _gelu_erf(g):
    return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))


# --------------------------------------------------------------------------------------------
# grouped FFN, GEMM 1 (gate/up with fused activation)
#   x                 [T, H]      activation dtype, row stride stride_x
#   sorted_assignment [A_pad]     int32, -1 = padding
#   block_expert      [A_pad // BLOCK_M] int32, -1 = unused block (its rows are written as 0)
#   w_gate, w_up      [E, F, H]   contiguous (w_gate read only if GATED)
#   h                 [A_pad, F]  activation dtype out, contiguous
#   grid: (A_pad // BLOCK_M, cdiv(F, BLOCK_N))
#   UPCAST: feed tl.dot fp32 operands; set only for bfloat16 in the interpreter, whose tl.dot
#   returns garbage for bfloat16 inputs (triton 3.9), never on a GPU
#   DOT_PRECISION: "ieee" for float32 (no TF32 rounding, so fp32 matches the reference to ~1e-6),
#   the default "tf32" otherwise (ignored for 16-bit operands)
#   gated:     h = act(x W_gate^T) * (x W_up^T), act = silu (ACT 0) | erf-gelu (ACT 1)
#   non-gated: h = act(x W_up^T),                act = erf-gelu (ACT 2) | relu (ACT 3)
# --------------------------------------------------------------------------------------------
@triton.jit
def ffn_gate_up_kernel(
    x_ptr, sorted_ptr, block_expert_ptr, w_gate_ptr, w_up_ptr, h_ptr,
    H, F, TOPK, stride_x,
    ACT: tl.constexpr, GATED: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    assignment = tl.load(sorted_ptr + rows)
    row_ok = assignment >= 0
    token = tl.where(row_ok, assignment // TOPK, 0).to(tl.int64)
    fcols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    f_ok = fcols < F
    kk = tl.arange(0, BLOCK_K)
    w_base = tl.maximum(expert, 0).to(tl.int64) * F * H
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    # An unused block (expert -1) runs no reduction steps and stores zeros.
    n_steps = tl.where(expert >= 0, tl.cdiv(H, BLOCK_K), 0)
    for step in range(0, n_steps):
        hk = step * BLOCK_K + kk
        k_ok = hk < H
        xt = tl.load(x_ptr + token[:, None] * stride_x + hk[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_off = w_base + fcols[None, :] * H + hk[:, None]  # [BLOCK_K, BLOCK_N] view of W^T
        w_ok = k_ok[:, None] & f_ok[None, :]
        wu = tl.load(w_up_ptr + w_off, mask=w_ok, other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            wu = wu.to(tl.float32)
        acc_up = tl.dot(xt, wu, acc_up, input_precision=DOT_PRECISION)
        if GATED:
            wg = tl.load(w_gate_ptr + w_off, mask=w_ok, other=0.0)
            if UPCAST:
                wg = wg.to(tl.float32)
            acc_gate = tl.dot(xt, wg, acc_gate, input_precision=DOT_PRECISION)
    if ACT == 0:
        h = _silu(acc_gate) * acc_up
    elif ACT == 1:
        h = _gelu_erf(acc_gate) * acc_up
    elif ACT == 2:
        h = _gelu_erf(acc_up)
    else:
        h = tl.maximum(acc_up, 0.0)
    tl.store(h_ptr + rows[:, None].to(tl.int64) * F + fcols[None, :],
             h.to(h_ptr.dtype.element_ty), mask=f_ok[None, :])


# --------------------------------------------------------------------------------------------
# grouped FFN, GEMM 2 (down projection)
#   h            [A_pad, F]  activation dtype, contiguous
#   block_expert [A_pad // BLOCK_M] int32
#   w_down       [E, H, F]   contiguous
#   y            [A_pad, H]  activation dtype out, contiguous (unweighted; combine applies weights)
#   grid: (A_pad // BLOCK_M, cdiv(H, BLOCK_N))
# --------------------------------------------------------------------------------------------
@triton.jit
def ffn_down_kernel(
    h_ptr, block_expert_ptr, w_down_ptr, y_ptr, H, F, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    ncols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ncols < H
    kk = tl.arange(0, BLOCK_K)
    w_base = tl.maximum(expert, 0).to(tl.int64) * H * F
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    n_steps = tl.where(expert >= 0, tl.cdiv(F, BLOCK_K), 0)
    for step in range(0, n_steps):
        fk = step * BLOCK_K + kk
        k_ok = fk < F
        ht = tl.load(h_ptr + rows[:, None] * F + fk[None, :], mask=k_ok[None, :], other=0.0)
        wd = tl.load(w_down_ptr + w_base + ncols[None, :] * F + fk[:, None],
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            ht = ht.to(tl.float32)
            wd = wd.to(tl.float32)
        acc = tl.dot(ht, wd, acc, input_precision=DOT_PRECISION)
    tl.store(y_ptr + rows[:, None] * H + ncols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=n_ok[None, :])


# --------------------------------------------------------------------------------------------
# combine
#   y              [A_pad, H] activation dtype, contiguous
#   assignment_row [T*K]      int32, -1 = dropped (contributes nothing)
#   weights        [T, K]     fp32, contiguous
#   out            [T, H]     activation dtype out: out[t] = sum_s weights[t,s] * y[row(t,s)]
#   grid: (cdiv(T, BLOCK_T), cdiv(H, BLOCK_H))
# --------------------------------------------------------------------------------------------
@triton.jit
def combine_kernel(
    y_ptr, row_ptr, weights_ptr, out_ptr, T, H, TOPK,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = tokens < T
    hcols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = hcols < H
    acc = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
    for slot in range(0, TOPK):
        a = tokens * TOPK + slot
        row = tl.load(row_ptr + a, mask=t_ok, other=-1)
        w = tl.load(weights_ptr + a, mask=t_ok, other=0.0)
        live = row >= 0
        vals = tl.load(y_ptr + tl.maximum(row, 0).to(tl.int64)[:, None] * H + hcols[None, :],
                       mask=live[:, None] & h_ok[None, :], other=0.0)
        acc += vals.to(tl.float32) * w[:, None]
    tl.store(out_ptr + tokens[:, None].to(tl.int64) * H + hcols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & h_ok[None, :])
