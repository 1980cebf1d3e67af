"""The balance loss that exists only where experts are placed on devices: DeepSeek-V2's communication
balance loss (arXiv 2405.04434 §2.2.3). The graph's own losses (switch, expert, device, sequence, z) run
on the shared torch kernels like on every other backend.

  communication     α3 Σ_d f''_d P''_d,  f''_d = D/(M·T) · (tokens sent to device d),  P''_d = Σ_{j on d} P_j

computed from one rank's T tokens, the placement's D devices (contiguous blocks of experts) and P_j,
the mean router score of expert j over the T tokens. "Tokens sent to device d" counts a token once however
many of its experts d holds (the dispatch sends it once) and includes the token's own device, as the
paper's formula does. M is the device limit (the kept groups of a top-k whose groups are the D devices),
or min(top_k, D) without one (the most devices a token can reach), so f'' averages 1 under balance.
"""
from __future__ import annotations

import torch

__all__ = ["communication_balance_loss"]


def communication_balance_loss(alpha: float, scores: torch.Tensor, tokens_sent: torch.Tensor, device_limit: int,
                               expert_slots: torch.Tensor) -> torch.Tensor:
    """α3 Σ_d f''_d P''_d from scores [T, E] and the tokens dispatched to each device [D]; `expert_slots`
    [D * L] lists each device's experts (Placement.expert_slots: E marks an empty slot)."""
    t, e = scores.shape
    devices = tokens_sent.shape[0]
    if t == 0:
        return scores.new_zeros(())  # no tokens on this rank: nothing to balance
    f = tokens_sent.to(scores.dtype) * devices / (device_limit * t)
    p = torch.cat([scores.mean(dim=0), scores.new_zeros(1)])[expert_slots.to(scores.device)]
    return alpha * torch.sum(f * p.view(devices, -1).sum(dim=-1))
