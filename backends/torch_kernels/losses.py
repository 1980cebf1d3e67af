"""Balance losses (Switch arXiv 2101.03961, DeepSeekMoE arXiv 2401.06066, DeepSeek-V3 sequence-wise, ST-MoE z-loss);
each returns alpha * loss as a 0-d tensor, differentiable in scores; and the aux-loss-free bias update.
"""
from __future__ import annotations

import torch

from .routing import count_ids


def selection_counts(expert_idx, num_experts, dtype):
    return count_ids(expert_idx.reshape(-1), num_experts).to(dtype)


def switch_loss(alpha, scores, expert_idx):
    """Switch Transformer: α·N·Σ f_i·P_i, f_i = share of tokens whose top-1 is i, P_i = mean score."""
    t, e = scores.shape
    f = selection_counts(expert_idx[:, 0], e, scores.dtype) / t
    return alpha * e * torch.sum(f * scores.mean(dim=0))


def expert_loss(alpha, scores, expert_idx, top_k):
    """DeepSeekMoE expert level: α1·Σ f_i·P_i, f_i = N'/(K'T)·#selections of i."""
    t, e = scores.shape
    f = selection_counts(expert_idx, e, scores.dtype) * (e / (top_k * t))
    return alpha * torch.sum(f * scores.mean(dim=0))


def device_loss(alpha, scores, expert_idx, top_k, devices):
    """DeepSeekMoE device level: α2·Σ_d f'_d·P'_d over D contiguous expert groups."""
    t, e = scores.shape
    f = selection_counts(expert_idx, e, scores.dtype) * (e / (top_k * t))
    p = scores.mean(dim=0)
    return alpha * torch.sum(f.view(devices, -1).mean(dim=-1) * p.view(devices, -1).sum(dim=-1))


def sequence_loss(alpha, scores, expert_idx, top_k, seq_len):
    """DeepSeek-V3 sequence-wise: the expert-level loss per sequence on per-token normalised scores."""
    t, e = scores.shape
    b = t // seq_len
    s = (scores / scores.sum(dim=-1, keepdim=True)).view(b, seq_len, e)
    counts = torch.zeros(b, seq_len, e, dtype=scores.dtype, device=scores.device)
    counts.scatter_add_(2, expert_idx.view(b, seq_len, -1),
                        torch.ones(b, seq_len, top_k, dtype=scores.dtype, device=scores.device))
    f = counts.sum(dim=1) * (e / (top_k * seq_len))
    return alpha * (f * s.mean(dim=1)).sum(dim=-1).mean()


def z_loss(alpha, logits):
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (at least float32)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return alpha * torch.logsumexp(logits, dim=-1).pow(2).mean()


def update_bias(bias, tokens_per_expert, gamma):
    """Aux-loss-free balancing (arXiv 2408.15664): b_i += γ·sign(mean load − load_i), outside autograd."""
    with torch.no_grad():
        load = tokens_per_expert.to(bias.device, torch.float64)
        bias.add_(torch.sign(load.mean() - load).to(bias.dtype), alpha=gamma)
    return bias
