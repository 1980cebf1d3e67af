"""Where every canonical weight lives under expert parallelism, and the shard/unshard maps.

A rank's state dict uses the canonical names (`router.weight`, `experts.w_up`, `shared.0.w_down`, ...)
with each tensor replaced by the rank's slice of the global one:

  experts.*                     dim 0 (the expert axis): rows [rank*L, (rank+1)*L), L = routed / EP.
                                Local expert j on rank r is global expert r*L + j.
  shared.{i}.w_up / w_gate      replicated; with parallel.shared = tensor_parallel, rows
  shared.{i}.b_up / b_gate      [rank*Fs/EP, (rank+1)*Fs/EP) of the shared width (dim 0)
  shared.{i}.w_down             replicated; tensor_parallel: the same width slice on dim 1
  shared.{i}.b_down             replicated (added once, after the partial outputs are summed)
  router.*, shared_gate.weight  replicated

So `unshard([shard(w, r) for r in ranks]) == w`. Gradients follow the same map, except that a replicated
parameter's gradient on one rank covers only that rank's tokens: the global gradient is their sum
(`unshard(..., replicated="sum")`, or `ExpertParallelMoE.sync_replicated_grads()` in a running group).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from moe_ir.builder import build_graph
from moe_ir.errors import BackendError, WeightsError
from moe_ir.spec import LayerSpec, SharedPlacement

__all__ = ["Placement", "shard_weights", "unshard_weights"]


@dataclass(frozen=True)
class Placement:
    """Expert-parallel layout of one layer: EP degree, experts per rank, how shared experts are held."""

    world: int
    routed: int
    shared_tp: bool

    @classmethod
    def of(cls, spec: LayerSpec, world: int | None = None) -> "Placement":
        """The spec's placement; `world` (the process group size) must match parallel.expert_parallel."""
        p = spec.parallel
        ep = p.expert_parallel if p is not None else (world or 1)
        if world is not None and world != ep:
            raise BackendError(f"spec '{spec.name}' sets parallel.expert_parallel={ep} but the process group has "
                               f"{world} ranks; launch {ep} processes or change the spec")
        if spec.experts.routed % ep:
            raise BackendError(f"{ep} ranks cannot split the {spec.experts.routed} routed experts evenly")
        shared_tp = p is not None and p.shared == SharedPlacement.TENSOR_PARALLEL
        return cls(world=ep, routed=spec.experts.routed, shared_tp=shared_tp)

    @property
    def local_experts(self) -> int:
        return self.routed // self.world

    def expert_range(self, rank: int) -> range:
        """Global ids of the routed experts on `rank`."""
        return range(rank * self.local_experts, (rank + 1) * self.local_experts)

    def shard_dim(self, name: str) -> int | None:
        """Axis `name` is split on across ranks, or None when every rank holds all of it."""
        prefix, _, leaf = name.rpartition(".")
        if prefix == "experts":
            return 0
        if self.shared_tp and prefix.startswith("shared.") and leaf != "b_down":
            return 1 if leaf == "w_down" else 0
        return None

    def shard(self, name: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
        dim = self.shard_dim(name)
        if dim is None:
            return tensor
        size = tensor.shape[dim]
        if size % self.world:
            raise WeightsError(f"{name} has {size} entries on axis {dim}, not divisible by {self.world} ranks")
        step = size // self.world
        return tensor.narrow(dim, rank * step, step)


def shard_weights(weights: Mapping[str, torch.Tensor], spec: LayerSpec, rank: int,
                  world: int | None = None) -> dict[str, torch.Tensor]:
    """Rank `rank`'s canonical state dict from the global canonical weights (names and shapes checked)."""
    placement = Placement.of(spec, world)
    expected = build_graph(spec).weights
    missing = sorted(set(expected) - set(weights))
    unknown = sorted(set(weights) - set(expected))
    if missing or unknown:
        raise WeightsError(f"global weights do not match spec '{spec.name}': missing {missing}, unknown {unknown}")
    out = {}
    for name, value in expected.items():
        want = tuple(int(d) for d in value.type.shape)
        if tuple(weights[name].shape) != want:
            raise WeightsError(f"weight {name} has shape {list(weights[name].shape)}; the spec needs {list(want)}")
        out[name] = placement.shard(name, weights[name], rank).clone()
    return out


def unshard_weights(shards: Sequence[Mapping[str, torch.Tensor]], spec: LayerSpec, *,
                    replicated: str = "first") -> dict[str, torch.Tensor]:
    """Global canonical weights from every rank's state dict, in rank order.

    replicated="first" takes rank 0's copy of replicated tensors (weights); "sum" adds them (gradients,
    where each rank's copy covers its own tokens).
    """
    if replicated not in ("first", "sum"):
        raise ValueError(f"replicated must be 'first' or 'sum', got {replicated!r}")
    placement = Placement.of(spec, len(shards))
    out = {}
    for name in shards[0]:
        parts = [s[name] for s in shards]
        dim = placement.shard_dim(name)
        if dim is not None:
            out[name] = torch.cat(parts, dim=dim)
        elif replicated == "sum":
            out[name] = torch.stack(parts).sum(dim=0)
        else:
            out[name] = parts[0]
    return out
