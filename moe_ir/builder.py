"""Spec -> IR graph at the level where backends differ (README: "IR and passes").

The graph takes x [B, S, H] and returns, by name:
  out                 [B, S, H]  routed + shared experts (the residual add is the caller's)
  expert_idx, weights [T, k]     token-choice routing record (also what validation compares)
  rows                [A]        expert-choice routing record (tokens each expert took, expert-major)
  router_logits       [T, E]     training graphs only
  tokens_per_expert   [E]        training graphs only (after capacity dropping)
  aux_loss, loss.<kind>  []      training graphs with balance losses
Parameter names are canonical (`router.weight`, `experts.w_up`, `shared.0.w_gate`, ...): they are the
names in safetensors files, the eager module's state dict and the ONNX initializers.
"""
from __future__ import annotations


from .ir import ElemType, Graph, GraphKind, LossKind, Node, OpCode, TensorType, Value
from .spec import Choice, LayerSpec, canonical_spec_hash, spec_to_dict

# The names every backend and the weight files agree on.
ROUTER_WEIGHT = "router.weight"
ROUTER_BIAS = "router.bias"              # the aux-loss-free selection bias (a buffer)
ROUTER_LOGIT_BIAS = "router.logit_bias"  # the router projection's own bias (router.logit_bias: gpt-oss)
ROUTER_NOISE_WEIGHT = "router.noise_weight"
SHARED_GATE_WEIGHT = "shared_gate.weight"
OUTPUT_BIAS = "output_bias"              # experts.output_bias: added once to the layer's output (JetMoE)
EXPERT_WEIGHTS = ("w_up", "w_down", "w_gate", "b_up", "b_down", "b_gate")


def spec_hash(spec: LayerSpec) -> str:
    """Hash of what the spec computes (artifacts record it to refuse mismatched weights and engines);
    see spec.canonical_spec_hash for what it covers."""
    return canonical_spec_hash(spec_to_dict(spec))


def _ffn_weights(g: Graph, prefix: str, lead: tuple[int, ...], width: int, hidden: int, spec: LayerSpec,
                 dtype: ElemType) -> list[Value | None]:
    """Weights of one FFN (or a stack of them) in the order of the FFN ops' weight ports."""
    e = spec.experts
    w_up = g.add_weight(f"{prefix}.w_up", TensorType(lead + (width, hidden), dtype))
    w_down = g.add_weight(f"{prefix}.w_down", TensorType(lead + (hidden, width), dtype))
    w_gate = g.add_weight(f"{prefix}.w_gate", TensorType(lead + (width, hidden), dtype)) if e.activation.gated else None
    b_up = b_down = b_gate = None
    if e.bias:
        b_up = g.add_weight(f"{prefix}.b_up", TensorType(lead + (width,), dtype))
        b_down = g.add_weight(f"{prefix}.b_down", TensorType(lead + (hidden,), dtype))
        if e.activation.gated:
            b_gate = g.add_weight(f"{prefix}.b_gate", TensorType(lead + (width,), dtype))
    return [w_up, w_down, w_gate, b_up, b_down, b_gate]


def build_graph(spec: LayerSpec, *, training: bool = False) -> Graph:
    """The layer as an IR graph. `training` adds the router logits, load counts and balance losses."""
    g = Graph(spec.name, GraphKind.LAYER)
    g.meta["spec_hash"] = spec_hash(spec)
    x = g.add_input("x", TensorType(("B", "S", spec.hidden), ElemType.from_name(spec.dtype)))
    for name, value in add_moe_layer(g, spec, x, training=training).items():
        g.set_output(name, value)
    if spec.quantization is not None:
        from .quantization import quantize_graph

        quantize_graph(g, spec.quantization)
    return g


def router_logits(g: Graph, tokens: Value, w_router: Value, b_router: Value | None, dtype: ElemType, prefix: str) -> Value:
    """A router's logits [T, E] = tokens @ w_router.T (+ b_router), in the router dtype (node `{prefix}router_logits`)."""
    return g.add_node(OpCode.LINEAR, [tokens, w_router, b_router], {"out_dtype": dtype},
                      name=f"{prefix}router_logits").outputs[0]


def topk_routing(g: Graph, scores: Value, bias: Value | None, k: int, group_attrs: dict, normalize: bool,
                 scale: float, prefix: str) -> tuple[Value, Value]:
    """Token-choice top-k on router scores, then the chosen weights renormalised and scaled: (expert_idx [T, k],
    weights [T, k]), the routing record an MoE layer (or JetMoE's attention experts) dispatches by."""
    route = g.add_node(OpCode.TOPK_ROUTE, [scores, bias], {"k": k, **group_attrs}, name=f"{prefix}route",
                       output_names=[f"{prefix}expert_idx", f"{prefix}route.weights"])
    return routing_record(g, route, normalize, scale, prefix)


def routing_record(g: Graph, route: Node, normalize: bool, scale: float, prefix: str) -> tuple[Value, Value]:
    """(expert_idx, weights) of a route node (top-k or SparseMixer): its chosen weights renormalised and scaled."""
    weights = g.add_node(OpCode.SCALE_WEIGHTS, [route.outputs[1]], {"normalize": normalize, "scale": scale},
                         name=f"{prefix}weights").outputs[0]
    return route.outputs[0], weights


def add_moe_layer(g: Graph, spec: LayerSpec, x: Value, *, prefix: str = "", training: bool = False) -> dict[str, Value]:
    """Add one MoE layer reading x [B, S, H] to `g`; returns its outputs by the names `build_graph` gives them.

    Every node, value and weight name is prefixed with `prefix` (e.g. "layers.3.moe."), so a model holds
    many layers in one graph; with no prefix the names are the layer's canonical ones."""
    e, r, b = spec.experts, spec.router, spec.balance
    dtype = ElemType.from_name(spec.dtype)
    router_dtype = ElemType.from_name(r.dtype)
    # n: what the router scores and dispatch groups by (routed FFN experts, then identity ones, LongCat-Flash)
    h, n = spec.hidden, e.choices
    p = prefix
    outputs: dict[str, Value] = {}

    tokens = g.add_node(OpCode.FLATTEN_TOKENS, [x], name=f"{p}tokens").outputs[0]

    w_router = g.add_weight(p + ROUTER_WEIGHT, TensorType((n, h), router_dtype))
    b_router = g.add_weight(p + ROUTER_LOGIT_BIAS, TensorType((n,), router_dtype)) if r.logit_bias else None
    logits = router_logits(g, tokens, w_router, b_router, router_dtype, p)
    if r.noise is not None:
        w_noise = g.add_weight(p + ROUTER_NOISE_WEIGHT, TensorType((n, h), router_dtype))
        logits = g.add_node(OpCode.ROUTER_NOISE, [logits, tokens, w_noise], {"std": r.noise.std},
                            name=f"{p}router_noise").outputs[0]
    scores = g.add_node(OpCode.SCORE, [logits], {"fn": r.score}, name=f"{p}scores").outputs[0]

    expert_idx = weights = None
    if r.choice == Choice.TOKEN:
        bias = g.add_weight(p + ROUTER_BIAS, TensorType((n,), ElemType.FLOAT32), trainable=False) \
            if b.aux_free is not None else None
        gl = spec.routing_group_limit
        group_attrs = {"groups": gl.groups, "kept": gl.kept, "group_score": gl.score} if gl else {}
        if r.sparse_mixer is not None:
            # SparseMixer selects on the logits; the softmax scores above feed only the balance losses.
            route = g.add_node(OpCode.SPARSEMIXER_ROUTE, [logits], {"k": e.top_k, "eps": r.sparse_mixer.jitter_eps},
                               name=f"{p}route", output_names=[f"{p}expert_idx", f"{p}route.weights"])
            expert_idx, weights = routing_record(g, route, r.normalize, r.scaling, p)
        else:
            expert_idx, weights = topk_routing(g, scores, bias, e.top_k, group_attrs, r.normalize, r.scaling, p)
        disp = g.add_node(OpCode.DISPATCH, [expert_idx, weights],
                          {"num_experts": n, "capacity_factor": spec.capacity_factor, "drop_rule": spec.capacity.drop},
                          name=f"{p}dispatch", output_names=[f"{p}rows", f"{p}row_weights", f"{p}group_sizes"])
    else:
        disp = g.add_node(OpCode.EXPERT_CHOICE_ROUTE, [scores],
                          {"capacity_factor": spec.capacity_factor, "top_k": e.top_k}, name=f"{p}expert_choice",
                          output_names=[f"{p}rows", f"{p}row_weights", f"{p}group_sizes"])
    rows, row_weights, group_sizes = disp.outputs

    expert_w = _ffn_weights(g, f"{p}experts", (e.routed,), e.width, h, spec, dtype)
    ffn_attrs = {"activation": e.activation}
    expert_attrs = {"identity_experts": e.identity} if e.identity else {}
    if e.clamp is not None:
        ffn_attrs.update(clamp_alpha=e.clamp.alpha, clamp_limit=e.clamp.limit)
    # Llama 4 (router.scale_input): the routing weight scales each row's input, and the rows are summed unweighted.
    row_scale = row_weights if r.scale_input else None
    y = g.add_node(OpCode.GROUPED_FFN, [tokens, rows, group_sizes, *expert_w, row_scale], {**ffn_attrs, **expert_attrs},
                   name=f"{p}experts").outputs[0]
    out = g.add_node(OpCode.COMBINE, [y, rows, row_weights, tokens], {"weighted": not r.scale_input},
                     name=f"{p}combine").outputs[0]

    shared_sum = None
    for i in range(e.shared):
        w = _ffn_weights(g, f"{p}shared.{i}", (), e.shared_ffn_width, h, spec, dtype)
        s = g.add_node(OpCode.FFN, [tokens, *w], ffn_attrs, name=f"{p}shared.{i}").outputs[0]
        shared_sum = s if shared_sum is None else g.add_node(OpCode.ADD, [shared_sum, s],
                                                             name=f"{p}shared_sum.{i}").outputs[0]
    if shared_sum is not None:
        if e.shared_gate:
            gate_w = g.add_weight(p + SHARED_GATE_WEIGHT, TensorType((1, h), dtype))
            shared_sum = g.add_node(OpCode.SIGMOID_GATE, [shared_sum, tokens, gate_w],
                                    name=f"{p}shared_gate").outputs[0]
        out = g.add_node(OpCode.ADD, [out, shared_sum], name=f"{p}moe_sum").outputs[0]
    if e.output_bias:
        out = g.add_node(OpCode.ADD_BIAS, [out, g.add_weight(p + OUTPUT_BIAS, TensorType((h,), dtype))],
                         name=f"{p}output_bias").outputs[0]
    outputs["out"] = g.add_node(OpCode.RESTORE_TOKENS, [out, x], name=f"{p}out").outputs[0]

    if expert_idx is not None:
        outputs["expert_idx"] = expert_idx
        outputs["weights"] = weights
    else:
        outputs["rows"] = rows
    if training:
        outputs["router_logits"] = logits
        outputs["tokens_per_expert"] = group_sizes
        outputs.update(_add_losses(g, spec, scores, expert_idx, logits, x, rows, prefix=p))
    return outputs


def _add_losses(g: Graph, spec: LayerSpec, scores: Value, expert_idx: Value | None, logits: Value, x: Value,
                rows: Value, *, prefix: str = "") -> dict[str, Value]:
    b = spec.balance
    total = None
    outputs: dict[str, Value] = {}
    # Expert choice takes only the z-loss (the spec refuses the others: it is balanced by construction),
    # which reads no routing; the op's index port then carries the expert-choice rows.
    for name, alpha in b.losses.items():
        kind = LossKind(name)
        attrs = {"kind": kind, "alpha": alpha, "top_k": spec.experts.top_k,
                 "devices": b.device.devices if kind == LossKind.DEVICE else 1}
        idx = expert_idx if expert_idx is not None else rows
        loss = g.add_node(OpCode.BALANCE_LOSS, [scores, idx, logits, x], attrs, name=f"{prefix}loss.{name}").outputs[0]
        outputs[f"loss.{name}"] = loss
        total = loss if total is None else g.add_node(OpCode.ADD, [total, loss],
                                                      name=f"{prefix}aux_sum.{name}").outputs[0]
    if total is not None:
        outputs["aux_loss"] = total
    return outputs
