"""dce: remove nodes whose outputs reach no graph output, then weights nothing reads."""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import Graph
from .manager import Pass, register_pass


@register_pass
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    name = "dce"
    summary = "remove nodes and weights that no output depends on"

    def __call__(self, graph: Graph) -> tuple[Graph, bool]:
        modified = False
        for node in reversed(graph.nodes):
            if not any(graph.users(v) or graph.is_graph_output(v) for v in node.outputs):
                graph.remove_node(node)
                modified = True
        for value in list(graph.weights.values()):
            if not graph.users(value):
                graph.remove_weight(value)
                modified = True
        return graph, modified


@register_pass
@dataclass(frozen=True)
class StripTrainingOutputs(Pass):
    """Inference targets export `out` and the routing record only."""

    name = "strip-training-outputs"
    summary = "drop router logits, load counts and losses from the outputs (then run dce)"
    keep: tuple[str, ...] = ("out", "expert_idx", "weights", "rows")

    def __call__(self, graph: Graph) -> tuple[Graph, bool]:
        dropped = [k for k in graph.outputs if k not in self.keep]
        for key in dropped:
            del graph.outputs[key]
        return graph, bool(dropped)
