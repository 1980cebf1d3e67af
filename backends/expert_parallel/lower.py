"""What expert parallelism reads from a lowered layer graph, and why it refuses a graph.

Expert parallelism changes where three nodes run and nothing else: the routed path

    dispatch(expert_idx, weights) -> grouped_ffn(tokens, rows, group_sizes, experts.*) -> combine(...)

becomes an exchange between ranks (module.py): each rank routes its own tokens with the graph's routing
nodes, sends every token once to each rank holding one of its chosen experts, runs its block of experts on
what it receives and sends the results back. With tensor-parallel shared experts, ffn nodes run on every
rank's tokens with a slice of their width. Every other node runs as on the eager backend, through the one
torch op table (backends/torch_ops.py), so a pass that changes the graph changes this backend too.
"""
from __future__ import annotations

from dataclasses import dataclass

from moe_ir.errors import BackendError
from moe_ir.ir import Graph, GraphKind, Node, OpCode
from moe_ir.spec import SharedPlacement
from ..torch_ops import unsupported_ops
from .placement import Placement

__all__ = ["RoutedPath", "check_graph", "routed_path"]


@dataclass(frozen=True)
class RoutedPath:
    """The dispatch -> grouped_ffn -> combine chain of a token-choice layer, and the top-k that feeds it."""

    route: Node      # topk_route: its input 0 is the router scores, its attrs the (group/device) limit
    dispatch: Node
    experts: Node    # grouped_ffn
    combine: Node

    @property
    def device_limit_groups(self) -> tuple[int, int]:
        """(groups, kept) of the top-k selection: with groups == ranks this is DeepSeek-V2's device limit."""
        return self.route.attrs["groups"], self.route.attrs["kept"]


def routed_path(graph: Graph) -> RoutedPath:
    """The routed path of a layer graph, or a BackendError saying why expert parallelism cannot split it."""
    if graph.kind != GraphKind.LAYER:
        raise BackendError(f"graph '{graph.name}' is a {graph.kind.value} graph; expert parallelism runs one MoE "
                           "layer (x -> out)")
    if graph.find(OpCode.FUSED_MOE):
        raise BackendError("the fused_moe op hides the dispatch that expert parallelism splits over ranks; lower "
                           "the unfused graph (no fuse-moe pass)")
    if graph.find(OpCode.EXPERT_CHOICE_ROUTE):
        raise BackendError("expert parallelism supports token-choice routing; expert-choice routing needs every "
                           "token of the batch in one place per expert")
    dispatches = graph.find(OpCode.DISPATCH)
    if len(dispatches) != 1:
        raise BackendError(f"graph '{graph.name}' has {len(dispatches)} dispatch nodes; expert parallelism splits "
                           "exactly one routed path")
    dispatch = dispatches[0]
    if dispatch.attrs["capacity_factor"] is not None:
        raise BackendError(f"expert parallelism is dropless; the dispatch has capacity factor "
                           f"{dispatch.attrs['capacity_factor']:g} (remove capacity.factor from the spec)")
    route = dispatch.input("expert_idx").producer
    if route is not None and route.op == OpCode.SPARSEMIXER_ROUTE:
        raise BackendError("SparseMixer routing (sparsemixer_route) is not lowered by expert parallelism: its "
                           "rank-local routing reads topk_route's attributes (k, group/device limit)")
    if route is None or route.op != OpCode.TOPK_ROUTE:
        raise BackendError(f"the expert ids of '{dispatch.name}' do not come from a topk_route node")
    rows, row_weights, group_sizes = dispatch.outputs
    if any(n.op == OpCode.GROUPED_FFN and n.attrs["identity_experts"] for n in graph.users(rows)):
        raise BackendError("identity experts (experts.identity, LongCat-Flash) are not placed by expert "
                           "parallelism: its ranks hold FFN experts only")
    scaled = [n for n in graph.users(rows) if n.op == OpCode.GROUPED_FFN and n.input("row_scale") is not None]
    if scaled:
        raise BackendError("routing weights on the expert inputs (router.scale_input, Llama 4) are not lowered by "
                           "expert parallelism: its exchange weighs the returned expert outputs")
    users = graph.users(rows)
    experts = next((n for n in users if n.op == OpCode.GROUPED_FFN), None)
    combine = next((n for n in users if n.op == OpCode.COMBINE), None)
    if experts is None or combine is None or len(users) != 2 or graph.users(row_weights) != [combine] \
            or graph.users(experts.outputs[0]) != [combine] or combine.input("y") is not experts.outputs[0] \
            or experts.input("group_sizes") is not group_sizes or combine.input("row_weights") is not row_weights:
        raise BackendError(f"the rows of '{dispatch.name}' must flow through one grouped_ffn into one combine and "
                           "nowhere else: expert parallelism replaces that chain by an exchange between ranks")
    if any(graph.is_graph_output(v) for v in (rows, row_weights, experts.outputs[0])) \
            or any(u is not experts for u in graph.users(group_sizes)):
        raise BackendError(f"the dispatched rows of '{dispatch.name}' are read outside the routed path; with expert "
                           "parallelism they exist only spread over the ranks")
    return RoutedPath(route, dispatch, experts, combine)


def check_graph(graph: Graph, world: int, shared: SharedPlacement = SharedPlacement.REPLICATED) -> Placement:
    """The placement of `graph` on `world` ranks, or the BackendError saying why expert parallelism cannot
    run it. Needs no process group: launchers and `supports` ask it before starting any process."""
    routed_path(graph)
    missing = unsupported_ops(graph)
    if missing:
        raise BackendError(f"no torch implementation of op(s) {', '.join(missing)}")
    return Placement.of(graph, world, shared)
