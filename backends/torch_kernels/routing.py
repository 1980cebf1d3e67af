"""Routing kernels: router logits and noise, scores, token-choice top-k (group limits, a selection
bias), SparseMixer, the routing weights' scaling, dispatch to sorted rows (with capacity and dropping) and
expert-choice selection.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def router_logits(x, w, out_dtype):
    """x @ w.T in the router dtype; float64 inputs stay float64 (that is how the oracle is compared)."""
    dtype = torch.float64 if x.dtype == torch.float64 else out_dtype
    return F.linear(x.to(dtype), w.to(dtype))


def router_noise(logits, x, w_noise, std, generator=None):
    """Noisy top-k gating (Shazeer et al. 2017): logits + std * N(0,1) * softplus(x w_noise^T), training only."""
    noise = torch.randn(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    return logits + std * noise * F.softplus(F.linear(x.to(logits.dtype), w_noise.to(logits.dtype)))


def score(logits, fn):
    return torch.softmax(logits, dim=-1) if fn == "softmax" else torch.sigmoid(logits)


def route_topk(scores, bias, k, groups, kept, group_score):
    """(expert_idx [T,k], weights [T,k]): select on scores + bias, weigh by the unbiased scores."""
    select = scores if bias is None else scores + bias
    if groups > 1:
        t, e = select.shape
        grouped = select.view(t, groups, e // groups)
        if group_score == "max":
            gscore = grouped.amax(dim=-1)
        else:
            gscore = grouped.topk(2, dim=-1).values.sum(dim=-1)
        keep = torch.zeros(t, groups, dtype=torch.bool, device=select.device)
        keep.scatter_(1, gscore.topk(kept, dim=-1).indices, True)
        # -inf, not 0: a biased score can be negative and must still lose to every kept expert.
        select = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(t, e)
    expert_idx = select.topk(k, dim=-1).indices
    return expert_idx, scores.gather(1, expert_idx)


def sparsemixer_route(logits, k, eps):
    """(expert_idx [T,k], weights [T,k]) of SparseMixer at inference (PhiMoE): pick j is the top logit of the
    experts not picked yet, weighted by the softmax over those within (top - logit) / max(|logit|, top) <= 2*eps."""
    remaining = logits
    picks, weights = [], []
    for _ in range(k):
        top, idx = remaining.max(dim=-1, keepdim=True)
        outside = (top - logits) / logits.abs().clamp(min=top) > 2 * eps
        gates = torch.softmax(remaining.masked_fill(outside, float("-inf")), dim=-1)
        picks.append(idx)
        weights.append(gates.gather(1, idx))
        remaining = remaining.scatter(1, idx, float("-inf"))
    return torch.cat(picks, dim=1), torch.cat(weights, dim=1)


def scale_weights(weights, normalize, scale):
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale if scale != 1.0 else weights


def count_ids(ids, bins):
    """counts [bins] int64 of ids (each in [0, bins)): torch.bincount with a length known before the run
    (bincount's output length depends on the data, which torch.compile must break its graph for)."""
    return torch.zeros(bins, dtype=torch.int64, device=ids.device).scatter_add(0, ids, torch.ones_like(ids))


def dispatch(expert_idx, weights, num_experts):
    """Dropless dispatch: the T*k assignments sorted by expert (stable, so token order within an expert).

    Returns rows (token of each sorted assignment), row_weights and group_sizes [E]."""
    k = expert_idx.shape[1]
    order = torch.argsort(expert_idx.reshape(-1), stable=True)
    rows = order // k
    row_weights = weights.reshape(-1)[order]
    group_sizes = count_ids(expert_idx.reshape(-1), num_experts)
    return rows, row_weights, group_sizes


def expert_capacity(tokens, top_k, num_experts, capacity_factor):
    """Assignments one expert takes under a capacity factor: ceil(factor * T * k / E), at least 1 (the
    capacity rule of every torch backend; `tokens` may be a symbolic size under torch.export)."""
    return max(1, math.ceil(capacity_factor * tokens * top_k / num_experts))


def dispatch_capacity(expert_idx, weights, num_experts, capacity_factor, drop_rule):
    """Dispatch with capacity ceil(factor*T*k/E) per expert; assignments over it move to the tail with
    weight 0, so the dropped token keeps only its residual (and its other experts).

    drop_rule "score": an expert keeps its highest-weight assignments; "position": slot-major order
    (every token's first choice before any second choice), then token order, as in GShard/Switch."""
    t, k = expert_idx.shape
    a = t * k
    flat_expert = expert_idx.reshape(-1)
    flat_weight = weights.reshape(-1)
    capacity = expert_capacity(t, k, num_experts, capacity_factor)
    arange = torch.arange(a, device=flat_expert.device)
    if drop_rule == "position":
        # rank of assignment (token i, slot j) in slot-major order is j*T + i
        slot_major_rank = arange.view(t, k).t().reshape(-1)
        rank = torch.empty_like(slot_major_rank)
        rank[slot_major_rank] = arange
        order = torch.argsort(flat_expert * a + rank, stable=True)
    else:
        by_weight = torch.argsort(-flat_weight.detach(), stable=True)
        order = by_weight[torch.argsort(flat_expert[by_weight], stable=True)]
    sorted_expert = flat_expert[order]
    position = arange - torch.searchsorted(sorted_expert, sorted_expert, right=False)
    kept = torch.empty_like(position, dtype=torch.bool)
    kept[order] = position < capacity
    key = torch.where(kept, flat_expert, torch.full_like(flat_expert, num_experts))
    final = torch.argsort(key, stable=True)
    rows = final // k
    row_weights = flat_weight[final] * kept[final].to(flat_weight.dtype)
    group_sizes = count_ids(key, num_experts + 1)[:num_experts]
    return rows, row_weights, group_sizes


def expert_choice(scores, capacity_factor, top_k):
    """Each expert takes its top-C tokens by score, C = min(T, ceil(factor*T*top_k/E)) (Zhou et al. 2022)."""
    t, e = scores.shape
    c = min(t, expert_capacity(t, top_k, e, capacity_factor))
    row_weights, rows = scores.t().topk(c, dim=-1)
    group_sizes = torch.full((e,), c, dtype=torch.int64, device=scores.device)
    return rows.reshape(-1), row_weights.reshape(-1), group_sizes
