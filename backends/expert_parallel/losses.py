"""Balance losses that depend on where experts are placed (DeepSeek-V2, arXiv 2405.04434 §2.2.3).

Both are computed from one rank's tokens (T of them) and the placement's D device groups (contiguous
blocks of routed/D experts), and returned; nothing is accumulated anywhere. P_j is the mean router score
of expert j over the T tokens; P'_d = P''_d = Σ_{j on device d} P_j.

  device-level      α2 Σ_d f'_d P'_d,   f'_d = mean over device d's experts of f_j,  f_j = E/(K·T)·count_j
  communication     α3 Σ_d f''_d P''_d, f''_d = D/(M·T) · (tokens sent to device d)

"Tokens sent to device d" counts a token once however many of its experts d holds (the dispatch sends it
once), and includes the token's own device, as the paper's formula does. M is the device limit, or
min(top_k, D) without one (the most devices a token can reach), so f'' averages 1 under balance.
"""
from __future__ import annotations

import torch

__all__ = ["communication_balance_loss", "device_balance_loss", "z_loss"]


def device_balance_loss(alpha: float, scores: torch.Tensor, tokens_per_expert: torch.Tensor, top_k: int,
                        devices: int) -> torch.Tensor:
    """α2 Σ_d f'_d P'_d from scores [T, E] and the dispatched count per expert [E]."""
    t, e = scores.shape
    f = tokens_per_expert.to(scores.dtype) * e / (top_k * t)
    p = scores.mean(dim=0)
    return alpha * torch.sum(f.view(devices, -1).mean(dim=-1) * p.view(devices, -1).sum(dim=-1))


def communication_balance_loss(alpha: float, scores: torch.Tensor, tokens_sent: torch.Tensor, device_limit: int,
                               devices: int) -> torch.Tensor:
    """α3 Σ_d f''_d P''_d from scores [T, E] and the tokens dispatched to each device [D]."""
    t = scores.shape[0]
    f = tokens_sent.to(scores.dtype) * devices / (device_limit * t)
    p = scores.mean(dim=0).view(devices, -1).sum(dim=-1)
    return alpha * torch.sum(f * p)


def z_loss(alpha: float, logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss α·mean(logsumexp(logits)²), in at least float32 (float64 logits stay float64,
    where the reference op rounds them to float32)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return alpha * torch.logsumexp(logits, dim=-1).pow(2).mean()
