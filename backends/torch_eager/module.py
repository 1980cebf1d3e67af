"""Lowering of an IR graph to a trainable torch.nn.Module.

The module walks the graph's nodes in order and runs each through a table keyed by OpCode (`OP_TABLE`)
whose entries call the fast kernels in `kernels.py`. Parameters live in nested sub-modules named after
the canonical weight names, so `state_dict()` keys are exactly the names in the graph and in the
safetensors files (`router.weight`, `experts.w_up`, `shared.0.w_gate`; `router.bias` is a buffer).

Two module classes share that machinery (`GraphModule`):
  MoELayer   a layer graph (moe_ir.builder):  forward(x [B, S, H]) -> MoEOutput(out, routing, losses):
             the routing record (router logits, chosen experts, weights, tokens per expert: whichever the
             graph outputs; build the graph with training=True for all of them) and the losses by kind.
  MoEModel   a model graph (moe_ir.model_builder): forward(input_ids [B, S] int64) ->
             ModelOutput(logits, routing, losses), routing and losses keyed by the graph's output names
             (`layers.3.expert_idx`, `layers.3.loss.expert`, ...); parameters `embed.weight`,
             `layers.3.attn.w_q`, `layers.3.moe.experts.w_up`, ...
Nothing is kept in global state: losses are returned, never collected on the side.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple

import torch
from torch import nn

from moe_ir.builder import ROUTER_BIAS, build_graph
from moe_ir.errors import BackendError, WeightsError
from moe_ir.interpreter import check_weights
from moe_ir.ir import Graph, LossKind, OpCode, ValueKind, WeightLayout
from moe_ir.params import init_weights, load_weights, save_weights
from moe_ir.spec import LayerSpec
from moe_ir.backends import torch_kernels as K

if TYPE_CHECKING:
    from moe_ir.model_spec import ModelSpec


def _sum_losses(losses: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The sum of the balance losses; 0 (on like's device and dtype) when there are none."""
    total = None
    for loss in losses.values():
        total = loss if total is None else total + loss
    return total if total is not None else like.new_zeros(())


class MoEOutput(NamedTuple):
    out: torch.Tensor
    routing: dict[str, torch.Tensor]
    losses: dict[str, torch.Tensor]

    @property
    def aux_loss(self) -> torch.Tensor:
        """Sum of the balance losses (0 when the spec has none)."""
        return _sum_losses(self.losses, self.out)


class ModelOutput(NamedTuple):
    logits: torch.Tensor
    routing: dict[str, torch.Tensor]  # graph output name -> tensor, e.g. "layers.3.expert_idx"
    losses: dict[str, torch.Tensor]   # graph output name -> 0-d loss, e.g. "layers.3.loss.expert"

    @property
    def aux_loss(self) -> torch.Tensor:
        """Sum of every MoE layer's balance losses (0 when the spec has none)."""
        return _sum_losses(self.losses, self.logits)


class _RunContext(NamedTuple):
    training: bool
    generator: torch.Generator | None
    concat_cache: dict
    grouped_ffn: Callable[..., torch.Tensor]  # the expert FFN kernel (kernels.grouped_ffn unless a backend swaps it)


# ---------------------------------------------------------------------------------------------------
# op table: (attrs, context, *operands) -> tuple of outputs, same semantics as ops.py's reference


def _split_gate_up(w_up, w_gate, b_up, b_gate, layout):
    """A gate_up_fused w_up holds the gate rows first, then the up rows: slice views, no copy."""
    if layout != WeightLayout.GATE_UP_FUSED:
        return w_up, w_gate, b_up, b_gate
    half = w_up.shape[-2] // 2
    w_gate, w_up = w_up[..., :half, :], w_up[..., half:, :]
    if b_up is not None:
        b_gate, b_up = b_up[..., :half], b_up[..., half:]
    return w_up, w_gate, b_up, b_gate


def _gated_weights(attrs, w_up, w_gate, b_up, b_gate):
    if not attrs["activation"].gated:
        return w_up, None, b_up, None
    return _split_gate_up(w_up, w_gate, b_up, b_gate, attrs["weight_layout"])


def _op_linear(attrs, ctx, x, w, b):
    y = K.router_logits(x, w, attrs["out_dtype"].torch)
    return (y if b is None else y + b.to(y.dtype),)


def _op_router_noise(attrs, ctx, logits, x, w_noise):
    if not ctx.training:
        return (logits,)
    return (K.router_noise(logits, x, w_noise, attrs["std"], ctx.generator),)


def _op_topk_route(attrs, ctx, scores, bias):
    return K.route_topk(scores, None if bias is None else bias.to(scores.dtype), attrs["k"], attrs["groups"],
                        attrs["kept"], attrs["group_score"].value)


def _op_dispatch(attrs, ctx, expert_idx, weights):
    if attrs["capacity_factor"] is None:
        return K.dispatch(expert_idx, weights, attrs["num_experts"])
    return K.dispatch_capacity(expert_idx, weights, attrs["num_experts"], attrs["capacity_factor"],
                               attrs["drop_rule"].value)


def _op_grouped_ffn(attrs, ctx, x, rows, group_sizes, w_up, w_down, w_gate, b_up, b_down, b_gate):
    w_up, w_gate, b_up, b_gate = _gated_weights(attrs, w_up, w_gate, b_up, b_gate)
    return (ctx.grouped_ffn(x, rows, group_sizes, w_up, w_down, w_gate, b_up, b_down, b_gate,
                            attrs["activation"].value),)


def _op_ffn(attrs, ctx, x, w_up, w_down, w_gate, b_up, b_down, b_gate):
    w_up, w_gate, b_up, b_gate = _gated_weights(attrs, w_up, w_gate, b_up, b_gate)
    return (K.ffn(x, w_up, w_down, w_gate, b_up, b_down, b_gate, attrs["activation"].value),)


def _op_concat(attrs, ctx, *parts):
    # Weight-fusing passes concatenate parameters. With autograd off (inference) the result only
    # changes when a part is written, so it is cached on the parts' identity and version counters.
    if torch.is_grad_enabled() and any(p.requires_grad for p in parts):
        return (torch.cat(parts, dim=attrs["axis"]),)
    key = (attrs["axis"],) + tuple((p.data_ptr(), p._version, tuple(p.shape), p.dtype) for p in parts)
    cached = ctx.concat_cache.get(key)
    if cached is None:
        ctx.concat_cache.clear()
        cached = ctx.concat_cache[key] = torch.cat(parts, dim=attrs["axis"])
    return (cached,)


def _op_balance_loss(attrs, ctx, scores, expert_idx, logits, like):
    kind, alpha, top_k = attrs["kind"], attrs["alpha"], attrs["top_k"]
    if kind == LossKind.Z:
        return (K.z_loss(alpha, logits),)
    if kind == LossKind.SWITCH:
        return (K.switch_loss(alpha, scores, expert_idx),)
    if kind == LossKind.EXPERT:
        return (K.expert_loss(alpha, scores, expert_idx, top_k),)
    if kind == LossKind.DEVICE:
        return (K.device_loss(alpha, scores, expert_idx, top_k, attrs["devices"]),)
    return (K.sequence_loss(alpha, scores, expert_idx, top_k, like.shape[1]),)


def _op_fused_moe(attrs, ctx, x, w_router, bias, w_up, w_down, w_gate, b_up, b_down, b_gate):
    logits = K.router_logits(x, w_router, attrs["router_dtype"].torch)
    scores = K.score(logits, attrs["score"].value)
    idx, w = K.route_topk(scores, None if bias is None else bias.to(scores.dtype), attrs["k"], attrs["groups"],
                          attrs["kept"], attrs["group_score"].value)
    w = K.scale_weights(w, attrs["normalize"], attrs["scale"])
    rows, row_w, sizes = _op_dispatch({"num_experts": w_up.shape[0], **attrs}, ctx, idx, w)
    (y,) = _op_grouped_ffn(attrs, ctx, x, rows, sizes, w_up, w_down, w_gate, b_up, b_down, b_gate)
    return K.combine(y, rows, row_w, x.shape[0]), idx, w


def _op_attention(attrs, ctx, x, *weights):
    return (K.attention(x, *weights, attrs["heads"], attrs["kv_heads"], attrs["head_dim"], attrs["qk_norm"].value,
                        attrs["rope_theta"], attrs["rope_layout"].value, attrs["norm_eps"]),)


def _op_mla_attention(attrs, ctx, x, *weights):
    return (K.mla_attention(x, *weights, attrs["heads"], attrs["kv_lora_rank"], attrs["qk_nope_head_dim"],
                            attrs["qk_rope_head_dim"], attrs["v_head_dim"], attrs["rope_theta"],
                            attrs["rope_layout"].value, attrs["norm_eps"]),)


OP_TABLE: dict[OpCode, Callable[..., tuple]] = {
    OpCode.FLATTEN_TOKENS: lambda attrs, ctx, x: (x.reshape(-1, x.shape[-1]),),
    OpCode.RESTORE_TOKENS: lambda attrs, ctx, y, like: (y.view(like.shape[0], like.shape[1], y.shape[-1]),),
    OpCode.LINEAR: _op_linear,
    OpCode.ROUTER_NOISE: _op_router_noise,
    OpCode.SCORE: lambda attrs, ctx, logits: (K.score(logits, attrs["fn"].value),),
    OpCode.TOPK_ROUTE: _op_topk_route,
    OpCode.SCALE_WEIGHTS: lambda attrs, ctx, w: (K.scale_weights(w, attrs["normalize"], attrs["scale"]),),
    OpCode.DISPATCH: _op_dispatch,
    OpCode.EXPERT_CHOICE_ROUTE: lambda attrs, ctx, s: K.expert_choice(s, attrs["capacity_factor"], attrs["top_k"]),
    OpCode.GROUPED_FFN: _op_grouped_ffn,
    OpCode.COMBINE: lambda attrs, ctx, y, rows, rw, like: (K.combine(y, rows, rw, like.shape[0]),),
    OpCode.FFN: _op_ffn,
    OpCode.SIGMOID_GATE: lambda attrs, ctx, y, x, w: (K.sigmoid_gate(y, x, w),),
    OpCode.ADD: lambda attrs, ctx, a, b: (a + b,),
    OpCode.CONCAT: _op_concat,
    OpCode.BALANCE_LOSS: _op_balance_loss,
    OpCode.FUSED_MOE: _op_fused_moe,
    OpCode.EMBEDDING: lambda attrs, ctx, ids, w: (K.embedding(ids, w),),
    OpCode.RMS_NORM: lambda attrs, ctx, x, w: (K.rms_norm(x, w, attrs["eps"]),),
    OpCode.ATTENTION: _op_attention,
    OpCode.MLA_ATTENTION: _op_mla_attention,
}


def unsupported_ops(graph: Graph) -> list[str]:
    return sorted({n.op.value for n in graph.nodes if n.op not in OP_TABLE})


# ---------------------------------------------------------------------------------------------------


class _Params(nn.Module):
    """A namespace in the parameter tree (`router`, `experts`, `shared`, `shared.0`, `layers.3.attn`, ...)."""


_LOSS_PREFIX = "loss."
_NOT_ROUTING = ("out", "aux_loss")
MODEL_INPUT = "input_ids"
MODEL_OUTPUT = "logits"


def is_model_graph(graph: Graph) -> bool:
    """A whole-model graph (input_ids in, logits out) rather than one MoE layer (x in, out out)."""
    return [v.name for v in graph.inputs] == [MODEL_INPUT] and MODEL_OUTPUT in graph.outputs


def graph_contract_problem(graph: Graph) -> str:
    """Why the graph is neither a layer graph (x -> out) nor a model graph (input_ids -> logits), or ""."""
    inputs = [v.name for v in graph.inputs]
    if inputs == [MODEL_INPUT]:
        if MODEL_OUTPUT not in graph.outputs:
            return (f"model graph '{graph.name}' has no '{MODEL_OUTPUT}' output (outputs: {list(graph.outputs)}); "
                    "build it with moe_ir.model_builder.build_model_graph and keep the logits through the passes")
        return ""
    if len(inputs) != 1 or "out" not in graph.outputs:
        return (f"graph '{graph.name}' has inputs {inputs} and outputs {list(graph.outputs)}; expected a layer graph "
                f"(x -> out) or a model graph ({MODEL_INPUT} -> {MODEL_OUTPUT})")
    return ""


class GraphModule(nn.Module):
    """What every lowered graph shares: the op-table check, the canonical parameter tree, the plan of
    nodes to run, safetensors I/O. Subclasses say what the input is and how the outputs are grouped."""

    def __init__(self, graph: Graph, weights: Mapping[str, torch.Tensor] | None = None, *, seed: int = 0,
                 generator: torch.Generator | None = None):
        super().__init__()
        missing = unsupported_ops(graph)
        if missing:
            raise BackendError(f"the eager torch backend has no implementation of op(s) {', '.join(missing)} "
                               f"in graph '{graph.name}'")
        self.graph = graph
        self.generator = generator  # for the router noise; None: the global RNG
        if weights is None:
            weights = init_weights(graph, seed)
        else:
            check_weights(graph, weights)
        self._weight_slots: list[tuple[str, nn.Module, str]] = []
        for name, value in graph.weights.items():
            *path, leaf = name.split(".")
            owner: nn.Module = self
            for part in path:
                if part not in owner._modules:
                    owner.add_module(part, _Params())
                owner = owner._modules[part]
            tensor = weights[name].detach().clone()
            if value.kind == ValueKind.BUFFER:
                owner.register_buffer(leaf, tensor)
            else:
                owner.register_parameter(leaf, nn.Parameter(tensor))
            self._weight_slots.append((name, owner, leaf))
        self._plan = [(OP_TABLE[n.op], n.attrs, tuple(None if v is None else v.name for v in n.inputs),
                       tuple(v.name for v in n.outputs)) for n in graph.nodes]
        self._outputs = [(key, v.name) for key, v in graph.outputs.items()]
        self._concat_cache: dict = {}
        # The grouped expert FFN's kernel, same signature as kernels.grouped_ffn; the compile backend puts
        # an opaque custom op here so that its graph does not unroll one GEMM chain per expert.
        self.grouped_ffn_kernel: Callable[..., torch.Tensor] = K.grouped_ffn

    def canonical_weights(self) -> dict[str, torch.Tensor]:
        return {name: getattr(owner, leaf) for name, owner, leaf in self._weight_slots}

    def _run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Every value of the graph by name, after running the plan on `inputs` (graph input name -> tensor)."""
        env: dict[str, Any] = dict(inputs)
        for name, owner, leaf in self._weight_slots:
            env[name] = getattr(owner, leaf)
        ctx = _RunContext(self.training, self.generator, self._concat_cache, self.grouped_ffn_kernel)
        for fn, attrs, names, outputs in self._plan:
            results = fn(attrs, ctx, *[None if i is None else env[i] for i in names])
            for name, value in zip(outputs, results):
                env[name] = value
        return env

    # -- safetensors ------------------------------------------------------------------------------

    def save_safetensors(self, path: str | Path) -> Path:
        return save_weights(self.canonical_weights(), path, {"spec_hash": str(self.graph.meta.get("spec_hash", ""))})

    def load_safetensors(self, path: str | Path) -> None:
        """Load weights written for this graph; names and shapes are checked strictly (WeightsError)."""
        self.load_canonical(load_weights(path, self.graph))

    def load_canonical(self, weights: Mapping[str, torch.Tensor]) -> None:
        check_weights(self.graph, weights)
        with torch.no_grad():
            for name, owner, leaf in self._weight_slots:
                target = getattr(owner, leaf)
                source = weights[name]
                if not source.is_floating_point():
                    raise WeightsError(f"weight {name} has dtype {source.dtype}; expected a floating dtype")
                target.copy_(source.to(target.dtype))
        self._concat_cache.clear()


class MoELayer(GraphModule):
    """An MoE layer lowered from an IR graph; parameters carry the graph's canonical names."""

    def __init__(self, graph: Graph, weights: Mapping[str, torch.Tensor] | None = None, *, seed: int = 0,
                 gamma: float | None = None, generator: torch.Generator | None = None):
        if len(graph.inputs) != 1:
            raise BackendError(f"graph '{graph.name}' has inputs {[v.name for v in graph.inputs]}; the eager "
                               f"module takes one input x [B, S, H]")
        if is_model_graph(graph):
            raise BackendError(f"graph '{graph.name}' is a model graph ({MODEL_INPUT} -> {MODEL_OUTPUT}); MoELayer "
                               "takes a layer graph x -> out: use MoEModel")
        super().__init__(graph, weights, seed=seed, generator=generator)
        # γ of aux-loss-free balancing (b_i += γ·sign(mean load − load_i)); set from the spec when known.
        self.gamma = gamma
        self._input = graph.inputs[0].name
        self._out_name = graph.outputs["out"].name

    # -- construction helpers ---------------------------------------------------------------------

    @classmethod
    def from_spec(cls, spec: LayerSpec, *, training: bool = True, seed: int = 0,
                  weights: Mapping[str, torch.Tensor] | None = None, **kwargs: Any) -> "MoELayer":
        gamma = spec.balance.aux_free.gamma if spec.balance.aux_free is not None else None
        return cls(build_graph(spec, training=training), weights, seed=seed, gamma=gamma, **kwargs)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The activations' dtype: that of the expert weights (follows .double() / .to(dtype))."""
        for name, owner, leaf in self._weight_slots:
            if not name.startswith("router."):
                return getattr(owner, leaf).dtype
        return getattr(self._weight_slots[0][1], self._weight_slots[0][2]).dtype

    # -- run --------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> MoEOutput:
        if x.dim() != 3 or x.shape[-1] != self.graph.inputs[0].type.shape[-1]:
            raise ValueError(f"expected x [B, S, {self.graph.inputs[0].type.shape[-1]}], got {list(x.shape)}")
        env = self._run({self._input: x.to(self.compute_dtype)})
        routing, losses = {}, {}
        for key, name in self._outputs:
            if key.startswith(_LOSS_PREFIX):
                losses[key[len(_LOSS_PREFIX):]] = env[name]
            elif key not in _NOT_ROUTING:
                routing[key] = env[name]
        return MoEOutput(env[self._out_name], routing, losses)

    # -- aux-loss-free balancing ------------------------------------------------------------------

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor, gamma: float | None = None) -> torch.Tensor:
        """b_i += γ·sign(mean load − load_i) after a step (arXiv 2408.15664); returns the new bias."""
        if ROUTER_BIAS not in self.graph.weights:
            raise BackendError("update_bias needs a router bias: the spec has no balance.aux_free")
        gamma = gamma if gamma is not None else self.gamma
        if gamma is None:
            raise BackendError("update_bias needs γ: build the module with from_spec(...) or pass gamma=")
        return K.update_bias(self.router.bias, tokens_per_expert, gamma)


def _is_loss_key(key: str) -> bool:
    """`layers.3.loss.expert` and `layers.3.aux_loss` (the layer's sum, which ModelOutput.aux_loss redoes)."""
    layer_key = key.split(".", 2)[-1] if key.startswith("layers.") else key
    return layer_key.startswith(_LOSS_PREFIX) or layer_key == "aux_loss"


class MoEModel(GraphModule):
    """A whole decoder lowered from a model graph (moe_ir.model_builder.build_model_graph).

    forward(input_ids [B, S] int64) -> ModelOutput(logits [B, S, V], routing, losses). Build the graph with
    routing=True for each MoE layer's expert_idx/weights, training=True for its losses, router logits and
    loads too; `losses` holds each layer's `layers.{i}.loss.<kind>`, `aux_loss` their sum."""

    def __init__(self, graph: Graph, weights: Mapping[str, torch.Tensor] | None = None, *, seed: int = 0,
                 gamma: float | None = None, generator: torch.Generator | None = None):
        if not is_model_graph(graph):
            raise BackendError(f"graph '{graph.name}' has inputs {[v.name for v in graph.inputs]} and outputs "
                               f"{list(graph.outputs)}; MoEModel takes a model graph (input_ids in, logits out): "
                               "use MoELayer for a layer graph")
        super().__init__(graph, weights, seed=seed, generator=generator)
        self.gamma = gamma  # γ of aux-loss-free balancing, shared by every MoE layer (one moe spec)
        self.vocab_size = int(graph.weights["embed.weight"].type.shape[0])
        self._logits_name = graph.outputs[MODEL_OUTPUT].name
        # MoE layers with an aux-loss-free selection bias: (layer prefix, bias owner module).
        self._biased_layers = [(name[: -len(ROUTER_BIAS)], owner) for name, owner, leaf in self._weight_slots
                               if name.endswith("." + ROUTER_BIAS)]

    @classmethod
    def from_spec(cls, spec: "ModelSpec", *, training: bool = True, seed: int = 0,
                  weights: Mapping[str, torch.Tensor] | None = None, **kwargs: Any) -> "MoEModel":
        from moe_ir.model_builder import build_model_graph

        aux_free = spec.moe.balance.aux_free
        return cls(build_model_graph(spec, routing=True, training=training), weights, seed=seed,
                   gamma=aux_free.gamma if aux_free is not None else None, **kwargs)

    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        """Shape, dtype and the token range; runners call it (the range check reads the data, which a
        training loop on an accelerator should not pay for on every step, hence not in forward)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            what = f"{input_ids.dtype} {list(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else \
                type(input_ids).__name__
            raise BackendError(f"model '{self.graph.name}': input_ids must be int64 [B, S], got {what}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size):
            raise BackendError(f"model '{self.graph.name}': token ids must be in [0, {self.vocab_size}), got "
                               f"{int(input_ids.min())}..{int(input_ids.max())}")

    def forward(self, input_ids: torch.Tensor) -> ModelOutput:
        if input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            raise BackendError(f"model '{self.graph.name}': input_ids must be int64 [B, S], got "
                               f"{input_ids.dtype} {list(input_ids.shape)}")
        env = self._run({MODEL_INPUT: input_ids})
        routing, losses = {}, {}
        for key, name in self._outputs:
            if key == MODEL_OUTPUT:
                continue
            if _is_loss_key(key):
                if not key.endswith(".aux_loss"):
                    losses[key] = env[name]
            else:
                routing[key] = env[name]
        return ModelOutput(env[self._logits_name], routing, losses)

    @torch.no_grad()
    def update_bias(self, routing: Mapping[str, torch.Tensor], gamma: float | None = None) -> None:
        """Aux-loss-free balancing after a step: every biased MoE layer's b_i += γ·sign(mean load − load_i),
        from `routing["layers.{i}.tokens_per_expert"]` of a training graph's forward."""
        if not self._biased_layers:
            raise BackendError("update_bias needs a router bias: the spec has no moe.balance.aux_free")
        gamma = gamma if gamma is not None else self.gamma
        if gamma is None:
            raise BackendError("update_bias needs γ: build the module with from_spec(...) or pass gamma=")
        for moe_prefix, owner in self._biased_layers:
            key = moe_prefix.removesuffix("moe.") + "tokens_per_expert"
            if key not in routing:
                raise BackendError(f"update_bias needs routing['{key}']: build the graph with training=True")
            K.update_bias(owner.bias, routing[key], gamma)
