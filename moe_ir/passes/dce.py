"""dce: remove nodes whose outputs reach no graph output, then weights nothing reads."""
from __future__ import annotations

import re
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


_LAYER_PREFIX = re.compile(r"^layers\.\d+\.")  # model_builder.layer_prefix


@register_pass
@dataclass(frozen=True)
class StripTrainingOutputs(Pass):
    """Inference targets export `out` (a model: `logits`) and the routing record only.

    A model's per-layer keys are judged without their `layers.{i}.` prefix, so `layers.3.expert_idx` is kept
    like a layer's `expert_idx` and `layers.3.router_logits` dropped like `router_logits` (and the attention
    experts' `layers.3.attn.expert_idx` of a mixture of attention heads kept likewise). A decode graph's
    present cache (`present.{i}.key`, ...) is inference state, not a training output: it is kept."""

    name = "strip-training-outputs"
    summary = "drop router logits, load counts and losses from the outputs (then run dce)"
    keep: tuple[str, ...] = ("out", "logits", "expert_idx", "weights", "rows")

    def __call__(self, graph: Graph) -> tuple[Graph, bool]:
        dropped = [k for k in graph.outputs
                   if _LAYER_PREFIX.sub("", k).removeprefix("attn.") not in self.keep and not k.startswith("present.")]
        for key in dropped:
            del graph.outputs[key]
        return graph, bool(dropped)
