"""The collectives the expert-parallel layer uses, on torch.distributed (gloo on CPU, NCCL on GPU).

`all_to_all_rows` is `dist.all_to_all_single` with variable splits on the row axis, made differentiable:
the backward pass is the reverse all-to-all (the gradient of the rows rank r received from rank s goes
back to rank s). Every rank of the group must call it in forward and therefore in backward: a rank with
no rows to send or receive still takes part with empty tensors.

Everything that crosses between ranks is a tensor (rows, counts); no Python object is pickled.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["all_to_all_rows", "exchange_counts", "gather_counts", "gather_rows"]


def _all_to_all(rows: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group) -> torch.Tensor:
    out = rows.new_empty((sum(out_splits),) + tuple(rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), list(out_splits), list(in_splits), group=group)
    return out


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, out_splits, in_splits, group):
        ctx.splits = (list(out_splits), list(in_splits))
        ctx.group = group
        return _all_to_all(rows, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all_rows(rows: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int],
                    group=None) -> torch.Tensor:
    """rows [sum(in_splits), ...] -> [sum(out_splits), ...]: in_splits[d] rows go to rank d (in order), and
    out_splits[s] rows arrive from rank s. Differentiable."""
    return _AllToAllRows.apply(rows, list(out_splits), list(in_splits), group)


def exchange_counts(send_counts: torch.Tensor, group=None) -> torch.Tensor:
    """send_counts [D] (rows this rank sends to each rank) -> recv_counts [D] (rows each rank sends here).

    The split sizes must be known before the variable-split all-to-all of the rows, so they go first in
    an all-to-all of one int64 per rank pair."""
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv


def gather_counts(count: int, world: int, device: torch.device, group=None) -> list[int]:
    """Every rank's `count` (token counts may differ per rank)."""
    mine = torch.full((world,), count, dtype=torch.int64, device=device)
    return exchange_counts(mine, group).tolist()


def gather_rows(rows: torch.Tensor, dst: int = 0, group=None) -> torch.Tensor | None:
    """Every rank's rows [n_r, ...] concatenated in rank order on group rank `dst` (None on the others).

    The row counts may differ per rank (they go first, as tensors), so this is an all-to-all in which
    every rank sends all its rows to `dst` and nothing elsewhere."""
    world, me = dist.get_world_size(group), dist.get_rank(group)
    counts = gather_counts(rows.shape[0], world, rows.device, group)
    in_splits = [rows.shape[0] if d == dst else 0 for d in range(world)]
    out_splits = counts if me == dst else [0] * world
    gathered = _all_to_all(rows, out_splits, in_splits, group)
    return gathered if me == dst else None
