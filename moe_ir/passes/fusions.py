"""Fusion passes. Each rewrite is exact: the reference interpreter gives the same numbers before and after
(weight fusions only concatenate or add weights, which the graph does with ordinary CONCAT/ADD nodes on
the weights so the canonical parameters stay the ones stored and trained).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import Graph, Node, OpCode, Value, WeightLayout
from .manager import Pass, register_pass


def _dequantized(value: Value | None) -> bool:
    """Whether `value` is a quantized weight (the output of a DEQUANTIZE node)."""
    return value is not None and value.producer is not None and value.producer.op == OpCode.DEQUANTIZE


def _only_used_by(graph: Graph, value: Value, node: Node) -> bool:
    return not graph.is_graph_output(value) and all(u is node for u in graph.users(value))


def _concat(graph: Graph, parts: list[Value], axis: int, name: str) -> Value:
    """CONCAT of `parts`, flattening parts that are themselves single-use concats on the same axis."""
    flat: list[Value] = []
    for p in parts:
        prod = p.producer
        if prod is not None and prod.op == OpCode.CONCAT and prod.attrs["axis"] == axis and len(graph.users(p)) <= 1 \
                and not graph.is_graph_output(p):
            flat.extend(prod.inputs)
        else:
            flat.append(p)
    return graph.add_node(OpCode.CONCAT, flat, {"axis": axis}, name=name).outputs[0]


def _remove_dead(graph: Graph, nodes: list[Node]) -> None:
    """Remove nodes (and single-use producers of their weights) that lost all their users."""
    pending = list(nodes)
    while pending:
        node = pending.pop()
        if node.name not in {n.name for n in graph.nodes}:
            continue
        if any(graph.users(v) or graph.is_graph_output(v) for v in node.outputs):
            continue
        inputs = [v for v in node.inputs if v is not None]
        graph.remove_node(node)
        pending.extend(v.producer for v in inputs if v.producer is not None and v.producer.op == OpCode.CONCAT)


_W = {"w_up": 1, "w_down": 2, "w_gate": 3, "b_up": 4, "b_down": 5, "b_gate": 6}  # FFN operand positions


@register_pass
@dataclass(frozen=True)
class FuseSharedExperts(Pass):
    """Ks shared experts of width w (summed) become one FFN of width Ks*w: exact, since the FFN is a sum
    over its hidden units. Gate/up/bias rows concatenate, down columns concatenate, down biases add.
    Runs on separate gate/up layouts (before fuse-gate-up)."""

    name = "fuse-shared-experts"
    summary = "sum of shared-expert FFNs -> one wider FFN"

    def __call__(self, graph: Graph) -> tuple[Graph, bool]:
        modified = False
        while (match := self._find(graph)) is not None:
            add, a, b = match
            graph = self._fuse(graph, add, a, b)
            modified = True
        return graph, modified

    @staticmethod
    def _find(graph: Graph):
        for add in graph.find(OpCode.ADD):
            a, b = (v.producer for v in add.inputs)
            if a is None or b is None or a.op != OpCode.FFN or b.op != OpCode.FFN:
                continue
            if a.inputs[0] is not b.inputs[0] or a.attrs != b.attrs:
                continue
            if a.attrs["weight_layout"] != WeightLayout.SEPARATE:
                continue
            if [v is None for v in a.inputs] != [v is None for v in b.inputs]:
                continue
            if any(_dequantized(v) for v in a.inputs[1:] + b.inputs[1:]):
                continue  # quantized weights stay as stored: a concat would make them float
            if _only_used_by(graph, a.outputs[0], add) and _only_used_by(graph, b.outputs[0], add):
                return add, a, b
        return None

    @staticmethod
    def _fuse(graph: Graph, add: Node, a: Node, b: Node) -> Graph:
        base = f"{a.name}+{b.name}"

        def operand(key: str, axis: int) -> Value | None:
            va, vb = a.inputs[_W[key]], b.inputs[_W[key]]
            if va is None:
                return None
            return _concat(graph, [va, vb], axis, name=f"{base}.{key}")

        b_down = a.inputs[_W["b_down"]]
        if b_down is not None:
            b_down = graph.add_node(OpCode.ADD, [b_down, b.inputs[_W["b_down"]]], name=f"{base}.b_down").outputs[0]
        fused = graph.add_node(OpCode.FFN, [a.inputs[0], operand("w_up", 0), operand("w_down", 1),
                                            operand("w_gate", 0), operand("b_up", 0), b_down, operand("b_gate", 0)],
                               a.attrs, name=base)
        graph.replace_uses(add.outputs[0], fused.outputs[0])
        _remove_dead(graph, [add, a, b])
        return graph


@register_pass
@dataclass(frozen=True)
class FuseGateUp(Pass):
    """Gate and up projections in one matmul: w_up becomes concat(w_gate, w_up) along the width axis
    (gate rows first), layout gate_up_fused. Applies to FFN, GROUPED_FFN and FUSED_MOE nodes."""

    name = "fuse-gate-up"
    summary = "gate and up projections -> one [.., 2F, H] weight"
    quantized: bool = False  # FuseGateUpQuantized: quantized gate/up parts too

    def __call__(self, graph: Graph) -> tuple[Graph, bool]:
        modified = False
        offset = {OpCode.FFN: 0, OpCode.GROUPED_FFN: 2, OpCode.FUSED_MOE: 2}
        for node in graph.nodes:
            if node.op not in offset or not node.attrs["activation"].gated:
                continue
            if node.attrs["weight_layout"] != WeightLayout.SEPARATE:
                continue
            o = offset[node.op]
            w_up, w_gate = node.inputs[o + _W["w_up"]], node.inputs[o + _W["w_gate"]]
            if _dequantized(w_up) or _dequantized(w_gate):
                if not self.quantized or not _fusable_quantized(graph, node, w_gate, w_up):
                    continue  # quantized weights stay as stored: a concat of the floats would make them float
                gate_up = _concat_quantized(graph, w_gate, w_up, name=f"{node.name}.w_gate_up")
            else:
                gate_up = _concat(graph, [w_gate, w_up], w_up.type.rank - 2, name=f"{node.name}.w_gate_up")
            b_up, b_gate = node.inputs[o + _W["b_up"]], node.inputs[o + _W["b_gate"]]
            inputs = list(node.inputs)
            inputs[o + _W["w_up"]] = gate_up
            inputs[o + _W["w_gate"]] = None
            if b_up is not None:
                inputs[o + _W["b_up"]] = _concat(graph, [b_gate, b_up], b_up.type.rank - 1,
                                                 name=f"{node.name}.b_gate_up")
                inputs[o + _W["b_gate"]] = None
            attrs = dict(node.attrs, weight_layout=WeightLayout.GATE_UP_FUSED)
            fused = graph.add_node(node.op, inputs, attrs, name=f"{node.name}.fused")
            for old, new in zip(node.outputs, fused.outputs):
                graph.replace_uses(old, new)
            graph.remove_node(node)
            for w in (w_gate, w_up):  # the separate DEQUANTIZE nodes a quantized fusion replaced
                if _dequantized(w) and not graph.users(w) and not graph.is_graph_output(w):
                    graph.remove_node(w.producer)
            modified = True
        return graph, modified


@register_pass
@dataclass(frozen=True)
class FuseGateUpQuantized(FuseGateUp):
    """fuse-gate-up that also fuses block-quantized gate/up weights: their codes, scales and zero points
    concatenate along the output rows under one DEQUANTIZE (exact: blocks run along the input columns, so
    every row keeps its own blocks). For targets that take the stored parts of the fused weight as they are
    (the moe_ir::QFusedMoE plugin); backends that dequantize per projection keep them apart (fuse-gate-up)."""

    name = "fuse-gate-up-quantized"
    summary = "fuse-gate-up, quantized gate/up weights included (codes/scales/zeros concatenated)"
    quantized: bool = True


def _fusable_quantized(graph: Graph, node: Node, w_gate: Value, w_up: Value) -> bool:
    """Both projections quantized alike (format, block, dtype, zero points or none), each read by `node` only."""
    if not (_dequantized(w_gate) and _dequantized(w_up)):
        return False
    g, u = w_gate.producer, w_up.producer
    if g.attrs != u.attrs or (g.inputs[2] is None) != (u.inputs[2] is None):
        return False
    return _only_used_by(graph, w_gate, node) and _only_used_by(graph, w_up, node)


def _concat_quantized(graph: Graph, w_gate: Value, w_up: Value, name: str) -> Value:
    """DEQUANTIZE(concat of the gate and up codes, scales, zero points along the rows): the fused weight."""
    g, u = w_gate.producer, w_up.producer
    rows = w_up.type.rank - 2  # the output-row axis of codes, scales and zero points alike
    parts = [None if a is None else _concat(graph, [a, b], rows, name=f"{name}.{a.name.rsplit('.', 1)[-1]}")
             for a, b in zip(g.inputs, u.inputs)]
    return graph.add_node(OpCode.DEQUANTIZE, parts, dict(g.attrs), name=f"{name}.dequantize",
                          output_names=[f"{name}.dequantized"]).outputs[0]


def unfused_moe_reason(graph: Graph) -> str:
    """Why fuse-moe left this graph's routed path unfused: what a target that needs one fused_moe node (the
    plugin flavour, TensorRT) reports."""
    routed = (graph.find(OpCode.EXPERT_CHOICE_ROUTE) or graph.find(OpCode.ROUTER_NOISE)
              or graph.find(OpCode.SPARSEMIXER_ROUTE))
    if routed:
        return f"{routed[0].op.value} is not fusable"
    if any(n.inputs[2] is not None for n in graph.find(OpCode.LINEAR) if n.name.endswith("router_logits")):
        return "a router projection with a bias (router.logit_bias) is not fusable"
    if any(n.input("row_scale") is not None for n in graph.find(OpCode.GROUPED_FFN)):
        return "routing weights on the expert inputs (router.scale_input) are not fusable"
    if any(n.attrs["identity_experts"] for n in graph.find(OpCode.GROUPED_FFN)):
        return "identity experts (experts.identity) are not fusable"
    return "fuse-moe did not apply"


@register_pass
@dataclass(frozen=True)
class FuseMoE(Pass):
    """router projection -> score -> top-k -> scale -> dispatch -> grouped FFN -> combine becomes one
    FUSED_MOE node, when none of the intermediate values is needed elsewhere (training graphs, whose
    losses read the scores, stay unfused). Noisy routers and expert-choice routing are left alone."""

    name = "fuse-moe"
    summary = "the routed path -> one fused_moe op (for single-kernel or plugin targets)"

    def __call__(self, graph: Graph) -> tuple[Graph, bool]:
        modified = False
        for combine in graph.find(OpCode.COMBINE):
            chain = self._match(graph, combine)
            if chain is not None:
                self._fuse(graph, chain)
                modified = True
        return graph, modified

    @staticmethod
    def _match(graph: Graph, combine: Node) -> dict[str, Node] | None:
        ffn = combine.inputs[0].producer
        disp = combine.inputs[1].producer
        if ffn is None or ffn.op != OpCode.GROUPED_FFN or disp is None or disp.op != OpCode.DISPATCH:
            return None
        if ffn.input("row_scale") is not None or not combine.attrs["weighted"]:
            return None  # weights on the expert inputs (Llama 4): fused_moe weighs the outputs
        if ffn.attrs["identity_experts"]:
            return None  # fused_moe has FFN experts only
        scale = disp.inputs[1].producer
        route = disp.inputs[0].producer
        if scale is None or scale.op != OpCode.SCALE_WEIGHTS or route is None or route.op != OpCode.TOPK_ROUTE:
            return None
        if scale.inputs[0].producer is not route:
            return None
        score = route.inputs[0].producer
        linear = score.inputs[0].producer if score is not None and score.op == OpCode.SCORE else None
        if linear is None or linear.op != OpCode.LINEAR or linear.inputs[2] is not None:
            return None
        if ffn.inputs[0] is not linear.inputs[0] or combine.inputs[3] is not linear.inputs[0]:
            return None
        chain = {"linear": linear, "score": score, "route": route, "scale": scale, "dispatch": disp, "ffn": ffn,
                 "combine": combine}
        # Intermediates must have no consumer outside the chain; expert_idx and weights may be outputs.
        inside = set(id(n) for n in chain.values())
        internal = [linear.outputs[0], score.outputs[0], route.outputs[1], *disp.outputs, ffn.outputs[0]]
        for v in internal:
            if graph.is_graph_output(v) or any(id(u) not in inside for u in graph.users(v)):
                return None
        for v in (route.outputs[0], scale.outputs[0]):
            if any(id(u) not in inside for u in graph.users(v)):
                return None
        return chain

    @staticmethod
    def _fuse(graph: Graph, c: dict[str, Node]) -> None:
        route, ffn = c["route"], c["ffn"]
        attrs = {"score": c["score"].attrs["fn"], "k": route.attrs["k"], "groups": route.attrs["groups"],
                 "kept": route.attrs["kept"], "group_score": route.attrs["group_score"],
                 "normalize": c["scale"].attrs["normalize"], "scale": c["scale"].attrs["scale"],
                 "capacity_factor": c["dispatch"].attrs["capacity_factor"],
                 "drop_rule": c["dispatch"].attrs["drop_rule"], "router_dtype": c["linear"].attrs["out_dtype"],
                 "activation": ffn.attrs["activation"], "weight_layout": ffn.attrs["weight_layout"],
                 "clamp_alpha": ffn.attrs["clamp_alpha"], "clamp_limit": ffn.attrs["clamp_limit"]}
        fused = graph.add_node(OpCode.FUSED_MOE, [c["linear"].inputs[0], c["linear"].inputs[1], route.inputs[1],
                                                  *ffn.inputs[3:9]], attrs, name="moe",
                               output_names=["moe.out", "moe.expert_idx", "moe.weights"])
        graph.replace_uses(c["combine"].outputs[0], fused.outputs[0])
        graph.replace_uses(route.outputs[0], fused.outputs[1])
        graph.replace_uses(c["scale"].outputs[0], fused.outputs[2])
        for key in ("combine", "ffn", "dispatch", "scale", "route", "score", "linear"):
            graph.remove_node(c[key])
