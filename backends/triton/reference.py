"""Pure-torch references of the Triton kernels, written to be obviously correct.

Routing and the activations are the shared torch kernel set's (`moe_ir.backends.torch_kernels`: the rule
every torch backend runs), here in fp32 as the kernels compute.

Each ``*_reference`` takes the same arguments and returns the same layouts as the kernel it
checks, so tests compare them element for element. ``moe_forward_reference`` does not use the
dispatch layout at all (it loops over tokens' chosen experts), so it also checks that
dispatch + grouped FFN + combine agree with the plain definition of the layer.

``expert_ffn_blocked`` is not a reference but a second torch implementation of the grouped FFN
over the padded layout (one batched matmul over row blocks). The custom ops use it on CPU when
Triton is not interpreting, and its gradient formulas (``expert_ffn_backward``) are the
backward of the custom op.
"""
from __future__ import annotations

import math

import torch

from ..torch_kernels import activate, route_topk, scale_weights, score as score_fn
from .kernels import GATED_ACTIVATIONS


# ---------------------------------------------------------------------------------------- route
def route_scores(logits: torch.Tensor, score: str) -> torch.Tensor:
    return score_fn(logits.float(), score)


def route_reference(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    score: str,
    k: int,
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str = "max",
    normalize: bool = False,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] fp32, expert_idx [T, k] int64), see ``ops.route``."""
    scores = route_scores(logits, score)
    expert_idx, weights = route_topk(scores, None if bias is None else bias.float(), k, n_group, topk_group,
                                     group_score)
    return scale_weights(weights, normalize, scale), expert_idx


# ------------------------------------------------------------------------------------- dispatch
def padded_size(num_assignments: int, num_experts: int, block: int) -> int:
    """Worst-case length of the padded layout: every expert may waste up to block-1 rows."""
    return (num_assignments + num_experts * (block - 1)) // block * block


def dispatch_reference(
    expert_idx: torch.Tensor, num_experts: int, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_assignment, assignment_row, expert_offsets, padded_offsets, block_expert), see ``ops.dispatch``."""
    device = expert_idx.device
    flat = expert_idx.reshape(-1)
    num_assignments = flat.numel()
    a_pad = padded_size(num_assignments, num_experts, block)
    live = (flat >= 0) & (flat < num_experts)
    key = torch.where(live, flat, torch.full_like(flat, num_experts))
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts = counts.scatter_add(0, key, torch.ones_like(key))[:num_experts]
    padded = (counts + block - 1) // block * block
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    offsets = torch.cat([zero, counts.cumsum(0)])
    padded_offsets = torch.cat([zero, padded.cumsum(0)])
    order = torch.sort(key, stable=True).indices  # ascending assignment id within an expert
    rank = torch.empty_like(order)
    rank[order] = torch.arange(num_assignments, device=device)
    key_c = key.clamp(max=num_experts - 1)
    row = padded_offsets[key_c] + rank - offsets[key_c]
    row = torch.where(live, row, torch.full_like(row, -1))
    # Dropped assignments scatter into one extra slot that is cut off afterwards.
    target = torch.where(live, row, torch.full_like(row, a_pad))
    sorted_assignment = torch.full((a_pad + 1,), -1, dtype=torch.int64, device=device)
    sorted_assignment = sorted_assignment.scatter(0, target, torch.arange(num_assignments, device=device))
    block_start = torch.arange(a_pad // block, device=device) * block
    block_expert = torch.searchsorted(padded_offsets[1:], block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, torch.full_like(block_expert, -1))
    i32 = torch.int32
    return (sorted_assignment[:a_pad].to(i32), row.to(i32), offsets.to(i32), padded_offsets.to(i32),
            block_expert.to(i32))


# ----------------------------------------------------------------------------------- expert FFN
def expert_mlp(x, w_gate, w_up, w_down, activation: str) -> torch.Tensor:
    """One expert on rows x [N, H] with w_* [F, H] / w_down [H, F], computed in fp32."""
    x = x.float()
    up = x @ w_up.float().T
    gate = x @ w_gate.float().T if activation in GATED_ACTIVATIONS else None
    return activate(activation, gate, up) @ w_down.float().T


def expert_ffn_reference(
    x, sorted_assignment, block_expert, w_gate, w_up, w_down, *, k: int, block: int, activation: str
) -> torch.Tensor:
    """y [A_pad, H] in x.dtype: row r = expert(r)'s FFN of token sorted_assignment[r] // k, padding rows 0."""
    a_pad = sorted_assignment.numel()
    assignment = sorted_assignment.long()
    valid = assignment >= 0
    token = torch.where(valid, assignment // k, torch.zeros_like(assignment))
    row_expert = block_expert.long().repeat_interleave(block)[:a_pad]
    rows_x = x[token]
    y = torch.zeros(a_pad, x.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w_up.shape[0]):
        mine = (valid & (row_expert == e))[:, None]
        gate = None if w_gate is None else w_gate[e]
        y = torch.where(mine, expert_mlp(rows_x, gate, w_up[e], w_down[e], activation), y)
    return y.to(x.dtype)


def _blocked_operands(x, sorted_assignment, block_expert, k: int, block: int):
    """x rows gathered per row block [nb, block, H] (padding rows 0), tokens, block experts."""
    assignment = sorted_assignment.long()
    valid = assignment >= 0
    token = torch.where(valid, assignment // k, torch.zeros_like(assignment))
    x_rows = x[token] * valid[:, None].to(x.dtype)
    num_blocks = block_expert.shape[0]
    expert = block_expert.long().clamp(min=0)
    return x_rows.reshape(num_blocks, block, x.shape[1]), token, valid, expert


def _act_and_grad(name: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "swiglu":
        sig = torch.sigmoid(z)
        return z * sig, sig * (1 + z * (1 - sig))
    if name in ("geglu", "gelu"):
        cdf = 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2))))
        pdf = torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
        return z * cdf, cdf + z * pdf
    return torch.relu(z), (z > 0).to(z.dtype)


def expert_ffn_blocked(
    x, sorted_assignment, block_expert, w_gate, w_up, w_down, *, k: int, block: int, activation: str
) -> torch.Tensor:
    """Same result as the Triton grouped FFN, as batched matmuls over row blocks (fp32 inside)."""
    xb, _, _, expert = _blocked_operands(x.float(), sorted_assignment, block_expert, k, block)
    up = torch.bmm(xb, w_up.float()[expert].transpose(1, 2))
    if activation in GATED_ACTIVATIONS:
        gate = torch.bmm(xb, w_gate.float()[expert].transpose(1, 2))
        h = _act_and_grad(activation, gate)[0] * up
    else:
        h = _act_and_grad(activation, up)[0]
    h = h.to(x.dtype).float()  # the kernel stores h in the activation dtype
    y = torch.bmm(h, w_down.float()[expert].transpose(1, 2))
    return y.reshape(-1, x.shape[1]).to(x.dtype)


def expert_ffn_backward(
    grad_y, x, sorted_assignment, block_expert, w_gate, w_up, w_down, *, k: int, block: int, activation: str
):
    """(dx, dw_gate or None, dw_up, dw_down) of ``expert_ffn_blocked``, in torch ops, fp32 inside."""
    xb, token, valid, expert = _blocked_operands(x.float(), sorted_assignment, block_expert, k, block)
    num_blocks, hidden = xb.shape[0], x.shape[1]
    num_experts = w_up.shape[0]
    wu = w_up.float()[expert]
    wd = w_down.float()[expert]
    dy = grad_y.float().reshape(num_blocks, block, hidden)
    up = torch.bmm(xb, wu.transpose(1, 2))
    dh = torch.bmm(dy, wd)
    gated = activation in GATED_ACTIVATIONS
    if gated:
        wg = w_gate.float()[expert]
        gate = torch.bmm(xb, wg.transpose(1, 2))
        act, dact = _act_and_grad(activation, gate)
        h = act * up
        d_up = dh * act
        d_gate = dh * up * dact
        dxb = torch.bmm(d_gate, wg) + torch.bmm(d_up, wu)
    else:
        act, dact = _act_and_grad(activation, up)
        h = act
        d_up = dh * dact
        dxb = torch.bmm(d_up, wu)
    d_wd = torch.bmm(dy.transpose(1, 2), h)
    d_wu = torch.bmm(d_up.transpose(1, 2), xb)

    def per_expert(blocks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(num_experts, *blocks.shape[1:], dtype=blocks.dtype, device=blocks.device)
        return out.index_add(0, expert, blocks).to(like.dtype)

    dx_rows = dxb.reshape(-1, hidden) * valid[:, None].to(dxb.dtype)
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add(0, token, dx_rows)
    d_wg = per_expert(torch.bmm(d_gate.transpose(1, 2), xb), w_gate) if gated else None
    return dx.to(x.dtype), d_wg, per_expert(d_wu, w_up), per_expert(d_wd, w_down)


# -------------------------------------------------------------------------------------- combine
def combine_reference(y: torch.Tensor, assignment_row: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out [T, H] in y.dtype: out[t] = sum_s weights[t, s] * y[assignment_row[t*k + s]] (row -1 skipped)."""
    num_tokens, k = weights.shape
    row = assignment_row.long().reshape(num_tokens, k)
    live = row >= 0
    gathered = y.float()[row.clamp(min=0)]  # [T, k, H]
    w = torch.where(live, weights.float(), torch.zeros_like(weights, dtype=torch.float32))
    return (gathered * w[..., None]).sum(dim=1).to(y.dtype)


# ---------------------------------------------------------------------------------- whole layer
def moe_forward_reference(
    x, logits, bias, w_gate, w_up, w_down, *, activation: str, score: str, k: int, n_group: int = 1,
    topk_group: int = 1, group_score: str = "max", normalize: bool = False, scale: float = 1.0,
):
    """(out [T, H] in x.dtype, weights, expert_idx) straight from the definition, no dispatch layout.

    Differentiable in x, logits and the expert weights (expert choice is not differentiable).
    """
    weights, expert_idx = route_reference(
        logits, bias, score=score, k=k, n_group=n_group, topk_group=topk_group,
        group_score=group_score, normalize=normalize, scale=scale,
    )
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w_up.shape[0]):
        hit = expert_idx == e  # [T, k]
        w_e = (weights * hit).sum(dim=1)  # 0 for tokens that did not pick e
        gate = None if w_gate is None else w_gate[e]
        out = out + w_e[:, None] * expert_mlp(x, gate, w_up[e], w_down[e], activation)
    return out.to(x.dtype), weights, expert_idx
