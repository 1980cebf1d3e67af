"""Checked wrappers and torch custom ops (namespace ``moe_ir``) around the Triton MoE kernels.

Public functions (``route``, ``dispatch``, ``expert_ffn``, ``combine``, ``moe_forward``) check
shapes, dtypes and devices and raise ``ValueError`` naming the offending shapes before anything
is launched, then call the custom ops ``torch.ops.moe_ir.{route,dispatch,expert_ffn,combine}``.

What runs where
---------------
* CUDA tensors: the Triton kernels.
* CPU tensors with ``TRITON_INTERPRET=1``: the same Triton kernels, in Triton's interpreter
  (slow, exact; this is how the kernels are tested on machines without a GPU), in eager mode.
  While tracing (fake tensors, ``torch.compile``), the torch implementation below is traced
  instead: torch cannot capture interpreted kernels into a graph (see ``_use_triton``).
* CPU tensors without the interpreter: the torch implementations of ``reference.py`` with the
  same output layouts (``expert_ffn_blocked`` for the grouped FFN). Compiled Triton cannot run
  on a CPU, and an op that only works on one device would make the CPU build of a model useless.
The choice is made per call from the device and the environment, in one place (``_use_triton``);
the ``"cpu"`` kernel registered with ``register_kernel`` is that same function.

Each op is a ``torch.library.triton_op``: its Python body only allocates outputs and launches
kernels through ``wrap_triton``, so the same body is the fake (meta) implementation and
``torch.compile(fullgraph=True, dynamic=True)`` traces through it without a graph break. All
output sizes follow from input shapes (dispatch uses the worst-case padded size), so there is
no data-dependent shape and no host sync.

Gradients (``register_autograd``)
---------------------------------
* ``route``: gradient w.r.t. ``logits`` through the weights, recomputed in torch from the saved
  logits and chosen indices (softmax or sigmoid Jacobian, then normalisation). Indices and the
  selection bias get no gradient (the bias is updated by the balance rule, not by gradient).
* ``dispatch``: none (integer outputs).
* ``expert_ffn``: dX, dW_gate, dW_up, dW_down in torch ops over the same padded layout
  (batched matmuls over row blocks, ``reference.expert_ffn_backward``).
* ``combine``: dY (rows scaled by their weight) and d(weights) (dot of dOut[t] with the row).
The routing weights are applied in combine, so the FFN gradient does not involve the router.
"""
from typing import Optional

import torch
import triton
from torch.library import triton_op, wrap_triton

from . import kernels as K
from .reference import (
    dispatch_reference,
    expert_ffn_backward,
    expert_ffn_blocked,
    padded_size,
    route_reference,
    route_scores,
)

Tensor = torch.Tensor
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_EXPERTS = 1024  # the routing kernel keeps a whole padded expert row per token in registers


def _use_triton(t: Tensor) -> bool:
    """Triton kernels on CUDA, or on real CPU tensors under the interpreter; torch otherwise.

    Under ``TRITON_INTERPRET=1`` torch's ``wrap_triton`` hands back the interpreted function
    itself, which cannot be traced: launched on fake or functional tensors it would touch their
    (absent) data. So while tracing on CPU (fake impl, ``torch.compile``, ``opcheck``'s AOT
    checks) the torch implementation, whose outputs have the same layout, is what is traced.
    """
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and K.interpreting() and type(t) in (torch.Tensor, torch.nn.Parameter)


# ============================================================================================
# route
# ============================================================================================
def _route_impl(
    logits: Tensor, bias: Optional[Tensor], score: str, k: int, n_group: int, topk_group: int,
    group_score: str, normalize: bool, scale: float,
) -> tuple[Tensor, Tensor]:
    if not _use_triton(logits):
        return route_reference(logits, bias, score=score, k=k, n_group=n_group, topk_group=topk_group,
                               group_score=group_score, normalize=normalize, scale=scale)
    num_tokens, num_experts = logits.shape
    weights = torch.empty((num_tokens, k), dtype=torch.float32, device=logits.device)
    expert_idx = torch.empty((num_tokens, k), dtype=torch.int64, device=logits.device)
    if num_tokens == 0:
        return weights, expert_idx
    block_e = triton.next_power_of_2(num_experts)
    block_t = K.route_token_block(block_e, K.interpreting())
    wrap_triton(K.route_kernel)[(triton.cdiv(num_tokens, block_t),)](
        logits, logits if bias is None else bias, weights, expert_idx,
        num_tokens, num_experts, logits.stride(0), scale,
        K=k, N_GROUP=n_group, TOPK_GROUP=topk_group, SCORE=K.SCORE_CODES[score],
        GROUP_SCORE=K.GROUP_SCORE_CODES[group_score], NORMALIZE=normalize, HAS_BIAS=bias is not None,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_G=triton.next_power_of_2(max(n_group, 1)),
        BLOCK_K=triton.next_power_of_2(k),
    )
    return weights, expert_idx


_route_op = triton_op("moe_ir::route", _route_impl, mutates_args=())
_route_op.register_kernel("cpu")(_route_impl)


def _route_setup_context(ctx, inputs, output):
    logits, _bias, score, _k, _n_group, _topk_group, _group_score, normalize, scale = inputs
    _weights, expert_idx = output
    ctx.save_for_backward(logits, expert_idx)
    ctx.score, ctx.normalize, ctx.scale = score, normalize, scale


def _route_backward(ctx, grad_weights, _grad_idx):
    logits, expert_idx = ctx.saved_tensors
    scores = route_scores(logits, ctx.score)
    grad_weights = grad_weights.float() * ctx.scale
    if ctx.normalize:
        raw = scores.gather(1, expert_idx)
        total = raw.sum(dim=1, keepdim=True) + 1e-20
        grad_raw = grad_weights / total - (grad_weights * raw).sum(dim=1, keepdim=True) / (total * total)
    else:
        grad_raw = grad_weights
    grad_scores = torch.zeros_like(scores).scatter_add(1, expert_idx, grad_raw)
    if ctx.score == "softmax":
        grad_logits = scores * (grad_scores - (grad_scores * scores).sum(dim=1, keepdim=True))
    else:
        grad_logits = grad_scores * scores * (1 - scores)
    return grad_logits.to(logits.dtype), None, None, None, None, None, None, None, None


_route_op.register_autograd(_route_backward, setup_context=_route_setup_context)


def route(
    logits: Tensor,
    bias: Optional[Tensor] = None,
    *,
    score: str = "softmax",
    k: int,
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str = "max",
    normalize: bool = False,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Score, (group-limited) top-k, normalise and scale.

    logits [T, E] (any float dtype, computed in fp32); bias [E] or None (selection only).
    Returns weights [T, k] float32 (unbiased scores of the chosen experts, optionally normalised
    to sum 1 over k, times ``scale``) and expert_idx [T, k] int64 in descending selection order.
    """
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"route: logits must be a float [T, E] tensor, got {tuple(logits.shape)} {logits.dtype}")
    num_experts = logits.shape[1]
    if score not in K.SCORE_CODES:
        raise ValueError(f"route: score must be one of {sorted(K.SCORE_CODES)}, got {score!r}")
    if group_score not in K.GROUP_SCORE_CODES:
        raise ValueError(f"route: group_score must be one of {sorted(K.GROUP_SCORE_CODES)}, got {group_score!r}")
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"route: logits {tuple(logits.shape)} has {num_experts} experts; supported 1..{MAX_EXPERTS}")
    if bias is not None:
        if bias.shape != (num_experts,) or not bias.is_floating_point():
            raise ValueError(f"route: bias must be float [E={num_experts}], got {tuple(bias.shape)} {bias.dtype}")
        if bias.device != logits.device:
            raise ValueError(f"route: bias on {bias.device}, logits on {logits.device}")
        bias = bias.float().contiguous()
    if n_group < 1 or num_experts % n_group != 0:
        raise ValueError(f"route: n_group={n_group} must divide E={num_experts} (logits {tuple(logits.shape)})")
    group_size = num_experts // n_group
    if n_group > 1:
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"route: topk_group={topk_group} must be in 1..n_group={n_group}")
        if group_score == "top2_sum" and group_size < 2:
            raise ValueError(f"route: top2_sum group score needs >= 2 experts per group, got E={num_experts}, "
                             f"n_group={n_group}")
        selectable = topk_group * group_size
    else:
        selectable = num_experts
    if not 1 <= k <= selectable:
        raise ValueError(f"route: k={k} must be in 1..{selectable} (experts selectable after group limiting, "
                         f"logits {tuple(logits.shape)})")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return torch.ops.moe_ir.route(logits, bias, score, k, n_group, topk_group if n_group > 1 else 1,
                                  group_score, normalize, float(scale))


# ============================================================================================
# dispatch
# ============================================================================================
def _dispatch_impl(expert_idx: Tensor, num_experts: int, block: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if not _use_triton(expert_idx):
        return dispatch_reference(expert_idx, num_experts, block)
    device = expert_idx.device
    flat = expert_idx.reshape(-1)
    num_assignments = flat.numel()
    a_pad = padded_size(num_assignments, num_experts, block)
    i32 = torch.int32
    sorted_assignment = torch.full((a_pad,), -1, dtype=i32, device=device)
    assignment_row = torch.full((num_assignments,), -1, dtype=i32, device=device)
    expert_offsets = torch.empty((num_experts + 1,), dtype=i32, device=device)
    padded_offsets = torch.empty((num_experts + 1,), dtype=i32, device=device)
    block_expert = torch.full((a_pad // block,), -1, dtype=i32, device=device)
    counts = torch.empty((num_experts,), dtype=i32, device=device)
    block_a = 1024
    wrap_triton(K.dispatch_count_kernel)[(num_experts,)](flat, counts, num_assignments, BLOCK_A=block_a)
    wrap_triton(K.dispatch_place_kernel)[(num_experts,)](
        flat, counts, sorted_assignment, assignment_row, expert_offsets, padded_offsets, block_expert,
        num_assignments, num_experts, BLOCK_M=block, BLOCK_A=block_a,
        BLOCK_E=triton.next_power_of_2(num_experts),
    )
    return sorted_assignment, assignment_row, expert_offsets, padded_offsets, block_expert


_dispatch_op = triton_op("moe_ir::dispatch", _dispatch_impl, mutates_args=())
_dispatch_op.register_kernel("cpu")(_dispatch_impl)


def dispatch(expert_idx: Tensor, num_experts: int, block: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sort assignments by expert into a layout padded per expert to multiples of ``block``.

    expert_idx [T, k] int64; a value outside [0, num_experts) (by convention ``num_experts``)
    marks a dropped assignment, which is in no expert's group. With A = T*k and
    A_pad = (A + E*(block-1)) // block * block (worst case, fixed by shapes), returns int32:

    * sorted_assignment [A_pad]: row r holds assignment a = t*k + slot, experts in order, each
      expert's rows ascending in a and starting at padded_offsets[e]; padding rows hold -1.
    * assignment_row [A]: the row of assignment a, -1 if dropped (inverse of the above).
    * expert_offsets [E+1]: exclusive prefix sum of the tokens per expert (unpadded).
    * padded_offsets [E+1]: the same with each count rounded up to a multiple of ``block``.
    * block_expert [A_pad // block]: expert of each row block, -1 for unused trailing blocks.
    """
    if expert_idx.dim() != 2 or expert_idx.dtype != torch.int64:
        raise ValueError(f"dispatch: expert_idx must be int64 [T, k], got {tuple(expert_idx.shape)} {expert_idx.dtype}")
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"dispatch: num_experts={num_experts} must be in 1..{MAX_EXPERTS}")
    if block < 1:
        raise ValueError(f"dispatch: block={block} must be >= 1")
    return torch.ops.moe_ir.dispatch(expert_idx.contiguous(), num_experts, block)


# ============================================================================================
# grouped expert FFN
# ============================================================================================
def _expert_ffn_impl(
    x: Tensor, sorted_assignment: Tensor, block_expert: Tensor, w_gate: Optional[Tensor], w_up: Tensor,
    w_down: Tensor, k: int, block: int, activation: str,
) -> Tensor:
    if not _use_triton(x):
        return expert_ffn_blocked(x, sorted_assignment, block_expert, w_gate, w_up, w_down,
                                  k=k, block=block, activation=activation)
    a_pad = sorted_assignment.shape[0]
    hidden = x.shape[1]
    ffn = w_up.shape[1]
    h = torch.empty((a_pad, ffn), dtype=x.dtype, device=x.device)
    y = torch.empty((a_pad, hidden), dtype=x.dtype, device=x.device)
    if a_pad == 0:
        return y
    block_n, block_k = K.ffn_tiles(K.interpreting())
    num_blocks = a_pad // block
    gated = activation in K.GATED_ACTIVATIONS
    upcast = K.interpreting() and x.dtype == torch.bfloat16
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    wrap_triton(K.ffn_gate_up_kernel)[(num_blocks, triton.cdiv(ffn, block_n))](
        x, sorted_assignment, block_expert, w_gate if gated else w_up, w_up, h,
        hidden, ffn, k, x.stride(0),
        ACT=K.ACTIVATION_CODES[activation], GATED=gated, UPCAST=upcast, DOT_PRECISION=precision,
        BLOCK_M=block, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    wrap_triton(K.ffn_down_kernel)[(num_blocks, triton.cdiv(hidden, block_n))](
        h, block_expert, w_down, y, hidden, ffn, UPCAST=upcast, DOT_PRECISION=precision,
        BLOCK_M=block, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y


_expert_ffn_op = triton_op("moe_ir::expert_ffn", _expert_ffn_impl, mutates_args=())
_expert_ffn_op.register_kernel("cpu")(_expert_ffn_impl)


def _expert_ffn_setup_context(ctx, inputs, output):
    x, sorted_assignment, block_expert, w_gate, w_up, w_down, k, block, activation = inputs
    ctx.save_for_backward(x, sorted_assignment, block_expert, w_gate, w_up, w_down)
    ctx.k, ctx.block, ctx.activation = k, block, activation


def _expert_ffn_backward(ctx, grad_y):
    x, sorted_assignment, block_expert, w_gate, w_up, w_down = ctx.saved_tensors
    dx, d_gate, d_up, d_down = expert_ffn_backward(
        grad_y, x, sorted_assignment, block_expert, w_gate, w_up, w_down,
        k=ctx.k, block=ctx.block, activation=ctx.activation,
    )
    return dx, None, None, d_gate, d_up, d_down, None, None, None


_expert_ffn_op.register_autograd(_expert_ffn_backward, setup_context=_expert_ffn_setup_context)


def _check_expert_weights(x: Tensor, w_gate: Optional[Tensor], w_up: Tensor, w_down: Tensor, activation: str,
                          where: str) -> None:
    if activation not in K.ACTIVATION_CODES:
        raise ValueError(f"{where}: activation must be one of {sorted(K.ACTIVATION_CODES)}, got {activation!r}")
    if x.dim() != 2:
        raise ValueError(f"{where}: x must be [T, H], got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{where}: x dtype {x.dtype} not supported; use one of {FLOAT_DTYPES}")
    hidden = x.shape[1]
    if w_up.dim() != 3 or w_up.shape[2] != hidden:
        raise ValueError(f"{where}: w_up must be [E, F, H={hidden}], got {tuple(w_up.shape)} (x {tuple(x.shape)})")
    num_experts, ffn, _ = w_up.shape
    if w_down.shape != (num_experts, hidden, ffn):
        raise ValueError(f"{where}: w_down must be [E, H, F] = {(num_experts, hidden, ffn)}, got "
                         f"{tuple(w_down.shape)} (w_up {tuple(w_up.shape)})")
    gated = activation in K.GATED_ACTIVATIONS
    if gated and (w_gate is None or w_gate.shape != w_up.shape):
        got = None if w_gate is None else tuple(w_gate.shape)
        raise ValueError(f"{where}: {activation} needs w_gate of shape {tuple(w_up.shape)}, got {got}")
    if not gated and w_gate is not None:
        raise ValueError(f"{where}: {activation} is not gated; pass w_gate=None (got {tuple(w_gate.shape)})")
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w is None:
            continue
        if w.dtype != x.dtype:
            raise ValueError(f"{where}: {name} dtype {w.dtype} differs from x dtype {x.dtype}")
        if w.device != x.device:
            raise ValueError(f"{where}: {name} on {w.device}, x on {x.device}")


def expert_ffn(
    x: Tensor,
    sorted_assignment: Tensor,
    block_expert: Tensor,
    w_gate: Optional[Tensor],
    w_up: Tensor,
    w_down: Tensor,
    *,
    k: int,
    block: int,
    activation: str = "swiglu",
) -> Tensor:
    """Grouped expert FFN over the padded dispatch layout, without routing weights.

    x [T, H]; sorted_assignment [A_pad] int32 and block_expert [A_pad // block] int32 from
    ``dispatch(.., block)``; w_gate, w_up [E, F, H] (w_gate None for "gelu"/"relu"); w_down [E, H, F];
    all weights in x.dtype (float32, float16 or bfloat16; accumulation in fp32).
    Returns y [A_pad, H] in x.dtype: row r = FFN of expert block_expert[r // block] applied to
    x[sorted_assignment[r] // k]; padding rows are 0.
    """
    _check_expert_weights(x, w_gate, w_up, w_down, activation, "expert_ffn")
    if block < 16 or block & (block - 1):
        raise ValueError(f"expert_ffn: block={block} must be a power of two >= 16 (GEMM row tile)")
    if sorted_assignment.dim() != 1 or sorted_assignment.shape[0] % block:
        raise ValueError(f"expert_ffn: sorted_assignment must be [A_pad] with A_pad a multiple of block={block}, "
                         f"got {tuple(sorted_assignment.shape)}")
    if block_expert.shape != (sorted_assignment.shape[0] // block,):
        expected = (sorted_assignment.shape[0] // block,)
        raise ValueError(f"expert_ffn: block_expert must be [A_pad // block] = {expected}, "
                         f"got {tuple(block_expert.shape)}")
    if sorted_assignment.dtype != torch.int32 or block_expert.dtype != torch.int32:
        raise ValueError(f"expert_ffn: dispatch tensors must be int32, got {sorted_assignment.dtype}, "
                         f"{block_expert.dtype}")
    w_gate = None if activation not in K.GATED_ACTIVATIONS else w_gate.contiguous()
    return torch.ops.moe_ir.expert_ffn(x.contiguous(), sorted_assignment, block_expert, w_gate,
                                       w_up.contiguous(), w_down.contiguous(), k, block, activation)


# ============================================================================================
# combine
# ============================================================================================
def _combine_impl(y: Tensor, assignment_row: Tensor, weights: Tensor) -> Tensor:
    if not _use_triton(y):
        from .reference import combine_reference
        return combine_reference(y, assignment_row, weights)
    num_tokens, k = weights.shape
    hidden = y.shape[1]
    out = torch.empty((num_tokens, hidden), dtype=y.dtype, device=y.device)
    if num_tokens == 0:
        return out
    block_t, block_h = (16, 32) if K.interpreting() else (16, 128)
    wrap_triton(K.combine_kernel)[(triton.cdiv(num_tokens, block_t), triton.cdiv(hidden, block_h))](
        y, assignment_row, weights, out, num_tokens, hidden, k, BLOCK_T=block_t, BLOCK_H=block_h,
    )
    return out


_combine_op = triton_op("moe_ir::combine", _combine_impl, mutates_args=())
_combine_op.register_kernel("cpu")(_combine_impl)


def _combine_setup_context(ctx, inputs, output):
    y, assignment_row, weights = inputs
    ctx.save_for_backward(y, assignment_row, weights)


def _combine_backward(ctx, grad_out):
    y, assignment_row, weights = ctx.saved_tensors
    num_tokens, k = weights.shape
    a_pad = y.shape[0]
    row = assignment_row.long().reshape(num_tokens, k)
    live = row >= 0
    grad = grad_out.float()
    # Every live assignment owns one row; dropped ones land in a sink row that is cut off.
    sink = torch.where(live, row, torch.full_like(row, a_pad)).reshape(-1)
    contrib = (weights.float()[..., None] * grad[:, None, :]).reshape(num_tokens * k, -1)
    grad_y = torch.zeros((a_pad + 1, y.shape[1]), dtype=torch.float32, device=y.device)
    grad_y = grad_y.index_add(0, sink, contrib)[:a_pad]
    rows = y.float()[row.clamp(min=0)]  # [T, k, H]
    grad_w = (rows * grad[:, None, :]).sum(dim=-1) * live
    return grad_y.to(y.dtype), None, grad_w.to(weights.dtype)


_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup_context)


def combine(y: Tensor, assignment_row: Tensor, weights: Tensor) -> Tensor:
    """Weighted un-permute: out[t] = sum_s weights[t, s] * y[assignment_row[t*k + s]].

    y [A_pad, H] (from ``expert_ffn``), assignment_row [T*k] int32 (from ``dispatch``, -1 =
    dropped: contributes nothing), weights [T, k] float32. Returns out [T, H] in y.dtype.
    """
    if y.dim() != 2 or y.dtype not in FLOAT_DTYPES:
        raise ValueError(f"combine: y must be float [A_pad, H], got {tuple(y.shape)} {y.dtype}")
    if weights.dim() != 2 or weights.dtype != torch.float32:
        raise ValueError(f"combine: weights must be float32 [T, k], got {tuple(weights.shape)} {weights.dtype}")
    if assignment_row.shape != (weights.shape[0] * weights.shape[1],) or assignment_row.dtype != torch.int32:
        raise ValueError(f"combine: assignment_row must be int32 [T*k] = {(weights.shape[0] * weights.shape[1],)} "
                         f"for weights {tuple(weights.shape)}, "
                         f"got {tuple(assignment_row.shape)} {assignment_row.dtype}")
    if not (y.device == assignment_row.device == weights.device):
        raise ValueError(f"combine: y on {y.device}, assignment_row on {assignment_row.device}, "
                         f"weights on {weights.device}")
    return torch.ops.moe_ir.combine(y.contiguous(), assignment_row, weights.contiguous())


# ============================================================================================
# whole routed layer
# ============================================================================================
def moe_forward(
    x: Tensor,
    logits: Tensor,
    bias: Optional[Tensor],
    w_gate: Optional[Tensor],
    w_up: Tensor,
    w_down: Tensor,
    *,
    activation: str = "swiglu",
    score: str = "softmax",
    k: int,
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str = "max",
    normalize: bool = False,
    scale: float = 1.0,
    block: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Routed experts of one MoE layer: route -> dispatch -> grouped FFN -> combine.

    x [T, H]; logits [T, E] = router projection of x (computed by the caller); bias [E] or None;
    expert weights as in ``expert_ffn``. ``block`` (GEMM row tile = dispatch padding) defaults
    to the tile table. Returns (out [T, H] in x.dtype, weights [T, k] fp32, expert_idx [T, k]
    int64). Shared experts are not included.
    """
    _check_expert_weights(x, w_gate, w_up, w_down, activation, "moe_forward")
    num_experts = w_up.shape[0]
    if logits.dim() != 2 or logits.shape[0] != x.shape[0] or logits.shape[1] != num_experts:
        raise ValueError(f"moe_forward: logits must be [T, E] = {(x.shape[0], num_experts)}, got {tuple(logits.shape)}")
    if block is None:
        block = K.row_block(x.shape[0] * k, num_experts, interpret=not x.is_cuda)
    weights, expert_idx = route(logits, bias, score=score, k=k, n_group=n_group, topk_group=topk_group,
                                group_score=group_score, normalize=normalize, scale=scale)
    sorted_assignment, assignment_row, _, _, block_expert = dispatch(expert_idx, num_experts, block)
    y = expert_ffn(x, sorted_assignment, block_expert, w_gate, w_up, w_down, k=k, block=block,
                   activation=activation)
    return combine(y, assignment_row, weights), weights, expert_idx
