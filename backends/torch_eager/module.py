"""Lowering of an IR graph to a trainable torch.nn.Module.

The module walks the graph's nodes in order and runs each as the torch backends' op table says
(`moe_ir.backends.torch_ops`: one call of an op function or kernel of `torch_kernels` per node). Parameters live in nested sub-modules named after
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
from moe_ir.generation import KVCache, decode_inputs, greedy_generate
from moe_ir.interpreter import check_weights
from moe_ir.model_builder import cache_entries, is_decode_graph
from moe_ir.ir import MODEL_INPUT, MODEL_OUTPUT, Graph, GraphKind, OpCode
from moe_ir.params import init_weights, load_weights, save_weights
from moe_ir.spec import LayerSpec
from .. import torch_kernels as K
from ..base import check_token_ids
from ..torch_ops import lower_node, unsupported_ops, weight_only_nodes
from ..torch_params import register_graph_weights

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


# ---------------------------------------------------------------------------------------------------


_LOSS_PREFIX = "loss."
PRESENT_PREFIX = "present."  # a decode graph's present cache outputs (moe_ir.model_builder.cache_entries)
_NOT_ROUTING = ("out", "aux_loss")


def is_loss_key(key: str) -> bool:
    """`loss.expert` of a layer; `layers.3.loss.expert` and `layers.3.aux_loss` of a model (the layer's sum,
    which ModelOutput.aux_loss redoes)."""
    layer_key = key.split(".", 2)[-1] if key.startswith("layers.") else key
    return layer_key.startswith(_LOSS_PREFIX) or layer_key == "aux_loss"


def output_groups(graph: Graph) -> tuple[str, list[tuple[str, str]], list[tuple[str, str]]]:
    """How a module returns the graph's outputs: (the main output's key, [(routing key, value name)],
    [(loss key, value name)]). A layer: `out`, its routing record, its losses by kind (`expert`, ...);
    a model: `logits`, routing and losses under the graph's keys (`layers.3.expert_idx`,
    `layers.3.loss.expert`), the per-layer `aux_loss` sums left out."""
    routing, losses = [], []
    if graph.kind == GraphKind.MODEL:
        for key, value in graph.outputs.items():
            if key == MODEL_OUTPUT or key.startswith(PRESENT_PREFIX):  # the present cache: MoEModel's cache
                continue
            if is_loss_key(key):
                if not key.endswith(".aux_loss"):
                    losses.append((key, value.name))
            else:
                routing.append((key, value.name))
        return MODEL_OUTPUT, routing, losses
    for key, value in graph.outputs.items():
        if key.startswith(_LOSS_PREFIX):
            losses.append((key[len(_LOSS_PREFIX):], value.name))
        elif key not in _NOT_ROUTING:
            routing.append((key, value.name))
    return "out", routing, losses


def compute_dtype_weight(graph: Graph) -> str:
    """The weight whose dtype a layer's activations take: the first one outside the router (the experts'),
    so the module follows .double() / .to(dtype)."""
    quantized_parts = {v.name for n in graph.find(OpCode.DEQUANTIZE) for v in n.inputs if v is not None}
    floats = [name for name, value in graph.weights.items()
              if not name.startswith("router.") and value.type.dtype.is_float]
    # every expert weight quantized: their scales (float32) carry the activations' dtype
    for name in [n for n in floats if n not in quantized_parts] + floats:
        return name
    return next(iter(graph.weights))


class GraphModule(nn.Module):
    """What every lowered graph shares: the op-table check, the canonical parameter tree, the plan of
    nodes to run, safetensors I/O. Subclasses say what the input is and how the outputs are grouped."""

    def __init__(self, graph: Graph, weights: Mapping[str, torch.Tensor] | None = None, *, seed: int = 0,
                 generator: torch.Generator | None = None):
        super().__init__()
        missing = unsupported_ops(graph)
        if missing:
            raise BackendError(f"the eager torch backend has no implementation of op(s) {', '.join(missing)} "
                               f"in graph '{graph.name}'; it runs the ops of moe_ir.backends.torch_ops")
        self.graph = graph
        self.generator = generator  # for the router noise; None: the global RNG
        if weights is None:
            weights = init_weights(graph, seed)
        else:
            check_weights(graph, weights)
        self._weight_slots = register_graph_weights(self, graph, weights)
        weight_only = {n.name for n in weight_only_nodes(graph)}
        self._plan = [(lower_node(n), tuple(None if v is None else v.name for v in n.inputs),
                       tuple(v.name for v in n.outputs), n.name in weight_only, released)
                      for n, released in zip(graph.nodes, graph.last_reads())]
        self._main_output, self._routing, self._losses = output_groups(graph)
        self._main_output = graph.outputs[self._main_output].name
        # Results of weight-only nodes (weights concatenated by a fusion pass), kept while the weights are
        # unchanged: see _weight_only_result.
        self._folded: dict = {}
        # The grouped expert FFN's kernel, same signature as torch_kernels.grouped_ffn; the compile backend
        # puts an opaque custom op here so that its graph does not unroll one GEMM chain per expert.
        self.grouped_ffn_kernel: Callable[..., torch.Tensor] = K.grouped_ffn
        # The same for quantized experts (packed weights, torch_kernels.grouped_ffn_packed's signature).
        self.packed_ffn_kernel: Callable[..., torch.Tensor] = K.grouped_ffn_packed
        # None: quantized weights compute exactly; "bf16": int4 decode through torch's int4 matmul on bfloat16
        # activations (torch_kernels.packed_weight), the fast and less precise path.
        self.int4_activations: str | None = None

    def canonical_weights(self) -> dict[str, torch.Tensor]:
        return {name: getattr(owner, leaf) for name, owner, leaf in self._weight_slots}

    def _run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Every value of the graph by name, after running the plan on `inputs` (graph input name -> tensor)."""
        env: dict[str, Any] = dict(inputs)
        for name, owner, leaf in self._weight_slots:
            env[name] = getattr(owner, leaf)
        runtime = {"training": self.training, "generator": self.generator, "expert_kernel": self.grouped_ffn_kernel,
                   "packed_expert_kernel": self.packed_ffn_kernel, "int4_activations": self.int4_activations}
        for call, names, outputs, weight_only, released in self._plan:
            operands = [None if i is None else env[i] for i in names]
            result = self._weight_only_result(call, operands, runtime) if weight_only else call(operands, runtime)
            if len(outputs) == 1:
                env[outputs[0]] = result
            else:
                for name, value in zip(outputs, result):
                    env[name] = value
            del operands, result
            for name in released:  # read for the last time (Graph.last_reads): its memory can go now
                del env[name]
        return env

    def _weight_only_result(self, call, operands, runtime):
        """A node that reads only weights (a fusion pass's CONCAT of them). With autograd off (inference) its
        result only changes when a weight is written, so it is kept, keyed on the operands' identity and
        version counters; with autograd on it runs every time, so gradients reach the canonical weights."""
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and
                                              any(p.requires_grad for p in operands if p is not None)):
            # traced: the compiled graph holds the node (a frozen graph folds it into a constant)
            return call(operands, runtime)
        key = (id(call), runtime.get("int4_activations")) + tuple(
            (p.data_ptr(), p._version, tuple(p.shape), p.dtype) for p in operands if p is not None)
        cached = self._folded.get(id(call))
        if cached is None or cached[0] != key:
            cached = self._folded[id(call)] = (key, call(operands, runtime))
        return cached[1]

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
                if not source.is_floating_point() and source.dtype != target.dtype:
                    raise WeightsError(f"weight {name} has dtype {source.dtype}; expected {target.dtype}")
                target.copy_(source.to(target.dtype))
        self._folded.clear()


class MoELayer(GraphModule):
    """An MoE layer lowered from an IR graph; parameters carry the graph's canonical names."""

    def __init__(self, graph: Graph, weights: Mapping[str, torch.Tensor] | None = None, *, seed: int = 0,
                 gamma: float | None = None, generator: torch.Generator | None = None):
        if len(graph.inputs) != 1:
            raise BackendError(f"graph '{graph.name}' has inputs {[v.name for v in graph.inputs]}; the eager "
                               f"module takes one input x [B, S, H]")
        if graph.kind == GraphKind.MODEL:
            raise BackendError(f"graph '{graph.name}' is a model graph ({MODEL_INPUT} -> {MODEL_OUTPUT}); MoELayer "
                               "takes a layer graph x -> out: use MoEModel")
        super().__init__(graph, weights, seed=seed, generator=generator)
        # γ of aux-loss-free balancing (b_i += γ·sign(mean load − load_i)); set from the spec when known.
        self.gamma = gamma
        self._input = graph.inputs[0].name
        dtype_weight = compute_dtype_weight(graph)
        self._dtype_slot = next((owner, leaf) for name, owner, leaf in self._weight_slots if name == dtype_weight)

    # -- construction helpers ---------------------------------------------------------------------

    @classmethod
    def from_spec(cls, spec: LayerSpec, *, training: bool = True, seed: int = 0,
                  weights: Mapping[str, torch.Tensor] | None = None, **kwargs: Any) -> "MoELayer":
        gamma = spec.balance.aux_free.gamma if spec.balance.aux_free is not None else None
        return cls(build_graph(spec, training=training), weights, seed=seed, gamma=gamma, **kwargs)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The activations' dtype: that of the expert weights (follows .double() / .to(dtype))."""
        owner, leaf = self._dtype_slot
        return getattr(owner, leaf).dtype

    # -- run --------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> MoEOutput:
        if x.dim() != 3 or x.shape[-1] != self.graph.inputs[0].type.shape[-1]:
            raise ValueError(f"expected x [B, S, {self.graph.inputs[0].type.shape[-1]}], got {list(x.shape)}")
        env = self._run({self._input: x.to(self.compute_dtype)})
        return MoEOutput(env[self._main_output], {key: env[name] for key, name in self._routing},
                         {key: env[name] for key, name in self._losses})

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


class MoEModel(GraphModule):
    """A whole decoder lowered from a model graph (moe_ir.model_builder.build_model_graph).

    forward(input_ids [B, S] int64) -> ModelOutput(logits [B, S, V], routing, losses). Build the graph with
    routing=True for each MoE layer's expert_idx/weights, training=True for its losses, router logits and
    loads too; `losses` holds each layer's `layers.{i}.loss.<kind>`, `aux_loss` their sum.

    Lowered from a decode graph (build_model_graph(spec, form="decode")), the model generates:
    forward(input_ids [B, S], attention_mask [B, P+S] = ones, cache = empty) runs the S new tokens after the
    P cached ones and grows `cache` (a moe_ir.generation.KVCache from `new_cache(B)`) by them;
    `generate(input_ids, attention_mask, max_new_tokens=N)` is the greedy loop; `step(inputs)` maps the
    graph's inputs by name to its outputs by name (what a runner and moe_ir.generation take). The weights
    are the prefill graph's, so a model trained through the prefill graph generates with
    MoEModel(decode_graph, trained.canonical_weights())."""

    def __init__(self, graph: Graph, weights: Mapping[str, torch.Tensor] | None = None, *, seed: int = 0,
                 gamma: float | None = None, generator: torch.Generator | None = None):
        if graph.kind != GraphKind.MODEL:
            raise BackendError(f"graph '{graph.name}' has inputs {[v.name for v in graph.inputs]} and outputs "
                               f"{list(graph.outputs)}; MoEModel takes a model graph (input_ids in, logits out): "
                               "use MoELayer for a layer graph")
        super().__init__(graph, weights, seed=seed, generator=generator)
        self.gamma = gamma  # γ of aux-loss-free balancing, shared by every MoE layer (one moe spec)
        # the embedding operand's rows (a quantized table reaches it through a dequantize node)
        self.vocab_size = int(graph.find(OpCode.EMBEDDING)[0].input("weight").type.shape[0])
        # MoE layers with an aux-loss-free selection bias: (layer prefix, bias owner module).
        self._biased_layers = [(name[: -len(ROUTER_BIAS)], owner) for name, owner, leaf in self._weight_slots
                               if name.endswith("." + ROUTER_BIAS)]
        # A decode graph's cache tensors (past input -> present output); empty for a prefill graph.
        self.cache_entries = cache_entries(graph) if is_decode_graph(graph) else []
        self._present = [(e.present, graph.outputs[e.present].name) for e in self.cache_entries]

    @classmethod
    def from_spec(cls, spec: "ModelSpec", *, training: bool = True, seed: int = 0,
                  weights: Mapping[str, torch.Tensor] | None = None, form: str = "prefill",
                  mla_cache: str = "expanded", **kwargs: Any) -> "MoEModel":
        """The model of a spec: prefill (trainable), or with form="decode" the generating one (no training
        outputs; `mla_cache` chooses an MLA model's cache layout)."""
        from moe_ir.model_builder import GraphForm, build_model_graph

        aux_free = spec.moe.balance.aux_free
        decode = GraphForm(form) == GraphForm.DECODE
        graph = build_model_graph(spec, routing=True, training=training and not decode, form=form, mla_cache=mla_cache)
        return cls(graph, weights, seed=seed, gamma=aux_free.gamma if aux_free is not None else None, **kwargs)

    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        """Shape, dtype and the token range; runners call it (the range check reads the data, which a
        training loop on an accelerator should not pay for on every step, hence not in forward)."""
        check_token_ids(input_ids, self.vocab_size, f"model '{self.graph.name}'")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> ModelOutput:
        if input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            raise BackendError(f"model '{self.graph.name}': input_ids must be int64 [B, S], got "
                               f"{input_ids.dtype} {list(input_ids.shape)}")
        if not self.cache_entries:
            if attention_mask is not None or cache is not None:
                raise BackendError(self._not_decode("takes no attention_mask or cache"))
            env = self._run({MODEL_INPUT: input_ids})
        else:
            if cache is None:
                cache = self.new_cache(input_ids.shape[0])
            if attention_mask is None:
                attention_mask = torch.ones(input_ids.shape[0], cache.length + input_ids.shape[1], dtype=torch.int64,
                                            device=input_ids.device)
            env = self._run(decode_inputs(input_ids, attention_mask, cache))
            cache.update({key: env[name] for key, name in self._present}, input_ids.shape[1])
        return ModelOutput(env[self._main_output], {key: env[name] for key, name in self._routing},
                           {key: env[name] for key, name in self._losses})

    # -- generation (decode graphs) ---------------------------------------------------------------

    def _not_decode(self, what: str) -> str:
        return (f"model '{self.graph.name}' was lowered from a prefill graph and {what}; lower the decode graph "
                "(build_model_graph(spec, form='decode'), or MoEModel.from_spec(spec, form='decode')) to generate")

    def _embedding_like(self) -> torch.Tensor:
        """The embedding table, whose dtype and device the cache takes (a quantized table: its scales)."""
        weight = self.embed.weight
        return weight if isinstance(weight, torch.Tensor) else weight.scales

    def new_cache(self, batch: int) -> KVCache:
        """An empty cache for `batch` sequences, in the weights' dtype and device."""
        if not self.cache_entries:
            raise BackendError(self._not_decode("has no cache"))
        like = self._embedding_like()
        return KVCache.empty(self.cache_entries, batch, dtype=like.dtype, device=like.device)

    def step(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One call of the graph: its inputs by name -> every graph output by name (logits, present.*, routing)."""
        env = self._run(inputs)
        return {key: env[value.name] for key, value in self.graph.outputs.items()}

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, max_new_tokens: int,
                 eos_token_id: int | None = None, choose: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """The new tokens [B, max_new_tokens] after the prompts input_ids [B, S0] (left-padded where
        attention_mask is 0): greedy unless `choose(logits [B, V]) -> tokens [B]` is given; `on_token(tokens)`
        hears each step's tokens as they come (moe_ir.generation.greedy_generate)."""
        if not self.cache_entries:
            raise BackendError(self._not_decode("cannot generate"))
        self.check_input_ids(input_ids)
        like = self._embedding_like()
        return greedy_generate(self.step, self.cache_entries, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                               eos_token_id=eos_token_id, cache_dtype=like.dtype, choose=choose,
                               on_token=on_token).tokens

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
