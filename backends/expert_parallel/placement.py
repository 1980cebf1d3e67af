"""Where every weight of a layer graph lives under expert parallelism, read from the graph itself.

A weight's place follows from the port it feeds, not from its name:

  operands of the routed path's grouped_ffn    split on axis 0 (the expert axis): rank r holds a contiguous
  (w_up, w_down, w_gate and their biases)       block of experts, local expert j being global expert start_r + j
  operands of ffn nodes (shared experts),       replicated; tensor-parallel: split on the width, i.e. rows
  tensor-parallel placement only                of w_up / w_gate / b_up / b_gate (axis 0) and columns of
                                                w_down (axis 1); b_down replicated (added once, after the
                                                partial outputs are summed)
  everything else (router, bias, shared gate)   replicated

Operands may be built from stored weights by the fusion passes (concat of gate and up rows, of several
shared experts' widths; add of down biases): the split passes through them, since slicing each part on
the split axis and concatenating the slices along another axis (or along the same width axis of an FFN,
which is a sum over its hidden units) gives the rank's slice of the result. A concat along the expert
axis would not, and is refused.

A split axis of size n is cut into contiguous blocks as torch.tensor_split cuts it: the first n % ranks
ranks hold one entry more than the others (with E divisible by the ranks every block has E/ranks experts).

A rank's state dict uses the stored (canonical) names with each tensor replaced by the rank's slice, so
`unshard_weights([shard_weights(w, p, r) for r in ranks], p) == w`. Gradients follow the same map,
except that a replicated parameter's gradient on one rank covers only that rank's tokens: the global
gradient is their sum (`unshard_weights(..., replicated="sum")`, or `sync_replicated_grads()` in a
running group).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from moe_ir.errors import BackendError, WeightsError
from moe_ir.ir import Graph, Node, OpCode, Value
from moe_ir.spec import SharedPlacement

__all__ = ["Placement", "routed_experts_node", "shard_weights", "unshard_weights"]

# Port -> the axis a tensor-parallel FFN splits (its width); None: replicated (b_down is added after the sum).
_FFN_WIDTH_AXIS = {"w_up": 0, "w_gate": 0, "b_up": 0, "b_gate": 0, "w_down": 1, "b_down": None}
_FFN_PORTS = ("w_up", "w_down", "w_gate", "b_up", "b_down", "b_gate")


def routed_experts_node(graph: Graph) -> Node:
    """The grouped_ffn node of the routed path (the one the expert axis of the placement refers to)."""
    nodes = graph.find(OpCode.GROUPED_FFN)
    if len(nodes) != 1:
        raise BackendError(f"graph '{graph.name}' has {len(nodes)} grouped_ffn nodes; expert parallelism places "
                           "the experts of exactly one routed path")
    return nodes[0]


@dataclass(frozen=True)
class Placement:
    """Expert-parallel layout of one layer graph on `world` ranks: which axis of each weight is split."""

    world: int
    experts: int                                  # routed experts (the expert axis of the grouped FFN)
    shared_tp: bool                               # shared experts split tensor-parallel on their width
    shapes: Mapping[str, tuple[int, ...]] = field(repr=False)   # global shape of every graph weight
    axes: Mapping[str, int] = field(repr=False)                 # weight -> split axis; absent: replicated

    @classmethod
    def of(cls, graph: Graph, world: int,
           shared: SharedPlacement = SharedPlacement.REPLICATED) -> "Placement":
        """The placement of `graph` on `world` ranks, or a BackendError saying why there is none."""
        if world < 1:
            raise BackendError(f"expert parallelism needs at least 1 rank, got {world}")
        shared = SharedPlacement(shared)
        experts_node = routed_experts_node(graph)
        experts = experts_node.input("w_up").type.shape[0]
        if not isinstance(experts, int):
            raise BackendError(f"node '{experts_node.name}': the expert count must be static, found {experts}")
        if experts < world:
            raise BackendError(f"{world} ranks for {experts} routed experts: every rank needs at least one expert")
        axes: dict[str, int] = {}
        for port in _FFN_PORTS:
            _assign(axes, experts_node.input(port), 0, experts_node, port)
        shared_tp = shared == SharedPlacement.TENSOR_PARALLEL
        if shared_tp:
            ffns = graph.find(OpCode.FFN)
            if not ffns:
                raise BackendError("tensor-parallel shared experts need a shared expert; the graph has no ffn node")
            for node in ffns:
                for port in _FFN_PORTS:
                    axis = _FFN_WIDTH_AXIS[port]
                    if axis is not None:
                        _assign(axes, node.input(port), axis, node, port)
        shapes = {name: tuple(int(d) for d in value.type.shape) for name, value in graph.weights.items()}
        for name, axis in axes.items():
            if shapes[name][axis] < world:  # the expert axis has >= world entries: this is a shared expert's width
                raise BackendError(f"tensor-parallel shared experts: weight {name} has width {shapes[name][axis]} "
                                   f"(axis {axis}), fewer than the {world} ranks")
        return cls(world=world, experts=experts, shared_tp=shared_tp, shapes=shapes, axes=axes)

    def block(self, size: int, rank: int) -> tuple[int, int]:
        """(start, length) of rank `rank`'s contiguous block of an axis of `size` entries."""
        base, extra = divmod(size, self.world)
        return rank * base + min(rank, extra), base + (1 if rank < extra else 0)

    @property
    def max_local_experts(self) -> int:
        """The most experts one rank holds (every rank's, when the ranks divide the experts)."""
        return -(-self.experts // self.world)

    def expert_range(self, rank: int) -> range:
        """Global ids of the routed experts on `rank`."""
        start, length = self.block(self.experts, rank)
        return range(start, start + length)

    def expert_slots(self, device: torch.device | None = None) -> torch.Tensor:
        """[ranks * max_local_experts] int64: the global expert in slot j of rank r's block at r * max + j,
        or `experts` (one past the last) in the padding slots of a rank holding fewer. Indexing a [T, E+1]
        tensor (a zero column appended) with it gives the equal-width per-rank layout the all-to-all needs."""
        slots = torch.full((self.world, self.max_local_experts), self.experts, dtype=torch.int64, device=device)
        for rank in range(self.world):
            ids = self.expert_range(rank)
            slots[rank, :len(ids)] = torch.arange(ids.start, ids.stop, device=device)
        return slots.view(-1)

    def shard_dim(self, name: str) -> int | None:
        """Axis `name` is split on across ranks, or None when every rank holds all of it."""
        return self.axes.get(name)

    def local_shape(self, name: str, rank: int) -> tuple[int, ...]:
        shape = list(self.shapes[name])
        axis = self.shard_dim(name)
        if axis is not None:
            shape[axis] = self.block(shape[axis], rank)[1]
        return tuple(shape)

    def shard(self, name: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank `rank`'s slice of the global `tensor` (a view; the whole tensor when replicated)."""
        axis = self.shard_dim(name)
        if axis is None:
            return tensor
        start, length = self.block(tensor.shape[axis], rank)
        return tensor.narrow(axis, start, length)


def _assign(axes: dict[str, int], value: Value | None, axis: int, user: Node, port: str) -> None:
    """Record that the stored weights `value` is made of are split on `axis`, through the fusion passes'
    concat (along another axis, or along the same axis of an FFN width) and add nodes."""
    if value is None:
        return
    if value.is_weight:
        known = axes.setdefault(value.name, axis)
        if known != axis:
            raise BackendError(f"weight {value.name} would be split on axis {known} and on axis {axis} (it feeds "
                               f"'{user.name}' as {port} too); expert parallelism cannot place it")
        return
    producer = value.producer
    if producer is None:
        raise BackendError(f"'{user.name}' reads the layer input {value.name} as its {port}; expert parallelism "
                           "places weights only")
    if producer.op == OpCode.CONCAT:
        if producer.attrs["axis"] == axis and user.op == OpCode.GROUPED_FFN:
            raise BackendError(f"node '{producer.name}' concatenates expert weights along the expert axis; expert "
                               "parallelism needs each rank's experts in one contiguous block")
    elif producer.op != OpCode.ADD:
        raise BackendError(f"the {port} of '{user.name}' is computed by {producer.op.value} node '{producer.name}'; "
                           "expert parallelism can split stored weights and their concat/add only")
    for part in producer.inputs:
        _assign(axes, part, axis, user, port)


def shard_weights(weights: Mapping[str, torch.Tensor], placement: Placement, rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s state dict from the global weights of the graph (names and shapes checked)."""
    missing = sorted(set(placement.shapes) - set(weights))
    unknown = sorted(set(weights) - set(placement.shapes))
    wrong = [f"{name}: expected {list(shape)}, found {list(weights[name].shape)}"
             for name, shape in placement.shapes.items() if name in weights and tuple(weights[name].shape) != shape]
    if missing or unknown or wrong:
        raise WeightsError(f"global weights do not match the graph: missing {missing}, unknown {unknown}"
                           + (f", wrong shape: {'; '.join(wrong)}" if wrong else ""))
    if not 0 <= rank < placement.world:
        raise BackendError(f"rank {rank} is outside the {placement.world} ranks of the placement")
    return {name: placement.shard(name, weights[name], rank).clone() for name in placement.shapes}


def unshard_weights(shards: Sequence[Mapping[str, torch.Tensor]], placement: Placement, *,
                    replicated: str = "first") -> dict[str, torch.Tensor]:
    """Global weights from every rank's state dict, in rank order.

    replicated="first" takes rank 0's copy of replicated tensors (weights); "sum" adds them (gradients,
    where each rank's copy covers its own tokens)."""
    if replicated not in ("first", "sum"):
        raise ValueError(f"replicated must be 'first' or 'sum', got {replicated!r}")
    if len(shards) != placement.world:
        raise WeightsError(f"{len(shards)} shards for a placement on {placement.world} ranks")
    out = {}
    for name in shards[0]:
        parts = [s[name] for s in shards]
        axis = placement.shard_dim(name)
        if axis is not None:
            out[name] = torch.cat(parts, dim=axis)
        elif replicated == "sum":
            out[name] = torch.stack(parts).sum(dim=0)
        else:
            out[name] = parts[0]
    return out
