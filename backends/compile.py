"""The `compile` backend: the eager module through torch.compile (inductor, dynamic token count, one graph).

torch.compile traces the eager module's whole forward as one graph (`fullgraph=True`: a break is an
error). Dispatch counts have a fixed length (`count_ids`, not bincount), and the grouped expert FFN is
one opaque custom op, `moe_ir::expert_ffns`, whose output shape [A, H] is known without the data: the
graph is the same for 8 or 256 experts, compiles in seconds, and serves every routing and every token
count of 2 or more without recompiling (1 token is a shape of its own: dynamo specialises sizes 0 and 1).
Inductor fuses the work around it (routing, softmax/top-k, combine, shared experts, losses).

The runner serves inference, so inductor runs with `freezing` (weights are constants of the graph; the
router's and shared experts' GEMM weights are packed for oneDNN) and the expert op runs its GEMMs
through oneDNN (`torch_kernels.onednn_linear`, which eager inference uses too): on a 2-core AMD EPYC
(AVX2) a ~96-row expert GEMM (DeepSeekMoE-16B at 1024 tokens) cost 18.9 ms/GFLOP through F.linear and 15.5
through oneDNN (`python tools/bench_eager.py --compile` gives the layer figure on the machine at hand).
Compilation happens on the first call; `CompiledRunner.compile_seconds` records how long it took.

Model graphs (input_ids -> logits) compile the eager `MoEModel` the same way, as one graph over every
layer; the runner takes input_ids int64 [B, S] and returns logits and each MoE layer's routing record.

Decode graphs (moe_ir.model_builder, form decode) compile `MoEModel.step`: the runner is a
moe_ir.generation.Step (the graph's inputs by name -> its outputs by name), like the eager one. The batch,
the new-token count, the past length and the mask's length are marked dynamic on every call, so one
compiled graph serves every decode step of every prompt length and every batch of 2 or more; dynamo
specialises sizes 0 and 1, so the prefill (past length 0) is a graph of its own, as are batch 1 (its own
prefill and decode graph) and a one-token prompt (its prefill and the first step, past length 1). Measured
on a tiny GQA model: 2 graphs for batches 2 and 3 and prompts of 4 to 7 tokens (left-padded or not) with 4
new tokens each, ~15 s of inductor compilation each on 2 cores; those size classes bound a runner to 12
graphs, above dynamo's default recompile limit, so a decode runner raises that limit for its own calls.
"""
from __future__ import annotations

import time
import types
from typing import Any, Callable, Mapping

import torch

from moe_ir.errors import BackendError
from moe_ir.ir import Graph
from moe_ir.model_builder import decode_contract_problem, is_decode_graph
from .base import Backend, Runner
from . import torch_kernels as K
from .torch_eager.backend import lower, runner_outputs
from .torch_eager.module import GraphModule, MoEModel
from .torch_ops import unsupported_ops


@torch.library.custom_op("moe_ir::expert_ffns", mutates_args=())
def expert_ffns(x: torch.Tensor, rows: torch.Tensor, group_sizes: torch.Tensor, w_up: torch.Tensor,
                w_down: torch.Tensor, w_gate: torch.Tensor | None, b_up: torch.Tensor | None,
                b_down: torch.Tensor | None, b_gate: torch.Tensor | None, activation: str, clamp_alpha: float = 0.0,
                clamp_limit: float = 0.0) -> torch.Tensor:
    """torch_kernels.grouped_ffn as one opaque op of the compiled graph (inference: no autograd).

    Inside the graph every expert's GEMM chain would be nodes of its own with a data-dependent row count:
    compile time grows with experts x layers (measured: 78 s for one 64-expert layer at hidden 32, where
    this op's graph compiles in seconds) and the graph carries a symbol per expert. As one op the graph
    is the same for 8 or 256 experts and its output shape [A, H] is known without the data. The
    GEMMs run through oneDNN (`torch_kernels.onednn_linear`). An op's schema takes a name, not the kernels'
    ("clamped_swiglu", alpha, limit) tuple: clamped SwiGLU's parameters come as two floats (unused otherwise)."""
    activation = _activation_of(activation, clamp_alpha, clamp_limit)
    sizes = group_sizes.tolist()
    y = x.new_zeros(rows.shape[0], x.shape[1])  # rows past every group (dropped assignments) stay 0
    start = 0
    for e, size in enumerate(sizes):
        if size:
            rows_e = x.index_select(0, rows[start:start + size])
            pick = (lambda w: None if w is None else w[e])  # noqa: E731
            up = K.onednn_linear(rows_e, w_up[e], pick(b_up))
            gate = K.onednn_linear(rows_e, w_gate[e], pick(b_gate)) if w_gate is not None else None
            y[start:start + size] = K.onednn_linear(K.activate(activation, gate, up), w_down[e], pick(b_down))
        start += size
    return y


@expert_ffns.register_fake
def _expert_ffns_shape(x, rows, group_sizes, w_up, w_down, w_gate, b_up, b_down, b_gate, activation, clamp_alpha=0.0,
                       clamp_limit=0.0):
    return x.new_empty(rows.shape[0], x.shape[1])


def _activation_of(name: str, clamp_alpha: float, clamp_limit: float):
    """The kernels' activation from an op's schema: a name, or ("clamped_swiglu", alpha, limit)."""
    return (name, clamp_alpha, clamp_limit) if name == "clamped_swiglu" else name


def _activation_parts(activation) -> tuple[str, float, float]:
    """The kernels' activation as an op's schema takes it: (name, clamp alpha, clamp limit)."""
    name, alpha, limit = activation if isinstance(activation, tuple) else (activation, 0.0, 0.0)
    return name, float(alpha), float(limit)


@torch.library.custom_op("moe_ir::packed_expert_ffns", mutates_args=())
def packed_expert_ffns(x: torch.Tensor, rows: torch.Tensor, group_sizes: torch.Tensor, up: list[torch.Tensor],
                       down: list[torch.Tensor], gate: list[torch.Tensor], b_up: torch.Tensor | None,
                       b_down: torch.Tensor | None, b_gate: torch.Tensor | None, fmt: str, block: int,
                       activation: str, clamp_alpha: float = 0.0, clamp_limit: float = 0.0) -> torch.Tensor:
    """torch_kernels.grouped_ffn_packed as one opaque op, for the reason `expert_ffns` is one. A packed weight
    travels as its tensors [qweight, scales, zeros?, int4 codes?, int4 scales?] with `has_*` told by length:
    custom ops take lists of tensors, not the kernels' tuples (nor the activation's tuple: see expert_ffns)."""
    return K.grouped_ffn_packed(x, rows, group_sizes, _packed(up, fmt, block), _packed(down, fmt, block),
                                _packed(gate, fmt, block), b_up, b_down, b_gate,
                                _activation_of(activation, clamp_alpha, clamp_limit))


@packed_expert_ffns.register_fake
def _packed_expert_ffns_shape(x, rows, group_sizes, up, down, gate, b_up, b_down, b_gate, fmt, block, activation,
                              clamp_alpha=0.0, clamp_limit=0.0):
    return x.new_empty(rows.shape[0], x.shape[1])


def _flat(w) -> list[torch.Tensor]:
    """A packed weight (torch_kernels.packed_weight) as the list packed_expert_ffns takes: qweight, scales,
    then zeros (an empty tensor when absent) and, when present, the int4 matmul's codes and scales."""
    if w is None:
        return []
    qweight, scales, zeros, _, _, codes, layout = w
    return [qweight, scales, zeros if zeros is not None else qweight.new_empty(0)] + \
        ([codes, layout] if codes is not None else [])


def _packed(parts: list[torch.Tensor], fmt: str, block: int):
    if not parts:
        return None
    zeros = parts[2] if parts[2].numel() else None
    codes, layout = (parts[3], parts[4]) if len(parts) == 5 else (None, None)
    return (parts[0], parts[1], zeros, fmt, block, codes, layout)


def packed_expert_op(x, rows, group_sizes, w_up, w_down, w_gate, b_up, b_down, b_gate, activation):
    """grouped_ffn_packed's signature over the opaque op (what the compiled module's packed kernel is)."""
    return torch.ops.moe_ir.packed_expert_ffns(x, rows, group_sizes, _flat(w_up), _flat(w_down), _flat(w_gate),
                                               b_up, b_down, b_gate, w_up[3], w_up[4], *_activation_parts(activation))


def expert_ffns_kernel(x, rows, group_sizes, w_up, w_down, w_gate, b_up, b_down, b_gate, activation):
    """`moe_ir::expert_ffns` with grouped_ffn's signature (the op table's `expert_kernel`): the activation as
    the kernels give it, a name or ("clamped_swiglu", alpha, limit), split into what the op's schema takes."""
    return torch.ops.moe_ir.expert_ffns(x, rows, group_sizes, w_up, w_down, w_gate, b_up, b_down, b_gate,
                                        *_activation_parts(activation))


def compile_settings():
    """The inductor settings every call of a compiled runner runs under (recompiles included): `freezing`.

    The runner serves inference, so inductor may treat the weights as constants: it packs the router's
    and shared experts' GEMM weights once into oneDNN's blocked layout (a copy of those weights only; the
    routed experts' weights are read in place by `moe_ir::expert_ffns`). Weights changed after the first
    call are not seen: the runner is built from fixed weights.
    """
    return torch._inductor.config.patch(freezing=True)


def own_forward(module: torch.nn.Module, method: str = "forward") -> Callable:
    """`module.forward` (or another `method`) bound to `module`, as a function with a code object of its own.

    dynamo keeps its compiled graphs, their guards and its recompile count per code object. Every runner
    compiles the same class's `forward`, so they would share one cache: each new spec is a recompilation of
    that one function, and the ninth spec compiled in a process exceeds dynamo's recompile limit (8) and
    fails (FailOnRecompileLimitHit, with fullgraph). With a copy of the code object per runner each runner's
    compilation is its own, whatever was compiled before it, and is freed with the runner."""
    forward = getattr(type(module), method)
    fresh = types.FunctionType(forward.__code__.replace(), forward.__globals__, forward.__name__,
                               forward.__defaults__, forward.__closure__)
    fresh.__kwdefaults__ = forward.__kwdefaults__
    return types.MethodType(fresh, module)


class CompiledRunner:
    """x (a layer's activations) or input_ids (a model's tokens) -> outputs by name; the first call
    compiles (timed in `compile_seconds`). The runner takes `module` over: its grouped expert FFN kernel
    (the op table's `expert_kernel`) becomes the `moe_ir::expert_ffns` op, and the weights are frozen into
    the compiled graph."""

    def __init__(self, module: GraphModule, *, dynamic: bool = True, mode: str | None = None,
                 compiler: str = "inductor"):
        self.module = module.eval()
        module.grouped_ffn_kernel = expert_ffns_kernel
        module.packed_ffn_kernel = packed_expert_op
        # fullgraph: a graph break would split the layer into pieces compiled apart (and, frozen, each
        # holding its own constants); it is an error, not a slowdown. `compiler` is torch.compile's backend
        # ("eager" traces with dynamo alone, for checks that need no generated code).
        self.compiled = torch.compile(own_forward(module), backend=compiler, fullgraph=True, dynamic=dynamic,
                                      mode=mode)
        self.compile_seconds: float | None = None
        # The token range check reads the ids, so it runs here, outside the compiled graph.
        self._check = module.check_input_ids if isinstance(module, MoEModel) else None

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._check is not None:
            self._check(x)
        x = x.contiguous()  # the graph is specialised to contiguous inputs: a sliced view would recompile
        start = time.perf_counter()
        with torch.no_grad(), compile_settings():
            res = self.compiled(x)
        if self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - start
        return runner_outputs(res)


def dense(t: torch.Tensor) -> torch.Tensor:
    """`t` with the strides of a fresh contiguous tensor. dynamo guards on strides, even those of size-1
    dims, which `contiguous()` leaves as they are: position_ids [1, 1] sliced from a batch-1 mask's cumsum
    has a row stride of the mask's length, a new one at every step, and each would be a recompilation."""
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.append(step)
        step *= max(size, 1)
    if t.stride() == tuple(reversed(expected)):
        return t
    return t.clone(memory_format=torch.contiguous_format)


# The graphs a decode runner may need: batch {1, more} x new tokens {1, more} x past length {0, 1, more},
# since dynamo specialises sizes 0 and 1. Each runner compiles its own code object (own_forward), so the
# limit counts that runner's graphs alone.
DECODE_RECOMPILE_LIMIT = 2 * 2 * 3


class CompiledDecodeRunner:
    """A decode graph's step: the graph's inputs by name (input_ids, attention_mask, position_ids,
    past_key_values.*) -> every graph output by name (logits, present.*, routing), a
    moe_ir.generation.Step. The first call of each phase compiles (timed in `compile_seconds`, by phase:
    "prefill" for a call with an empty past, "decode" otherwise)."""

    def __init__(self, module: MoEModel, *, dynamic: bool = True, mode: str | None = None,
                 compiler: str = "inductor"):
        self.module = module.eval()
        module.grouped_ffn_kernel = expert_ffns_kernel
        module.packed_ffn_kernel = packed_expert_op
        self.entries = module.cache_entries
        self.input_names = [v.name for v in module.graph.inputs]
        self.compiled = torch.compile(own_forward(module, "step"), backend=compiler, fullgraph=True,
                                      dynamic=dynamic, mode=mode)
        self.dynamic = dynamic
        self.compile_seconds: dict[str, float] = {}

    def _mark_dynamic(self, inputs: dict[str, torch.Tensor]) -> None:
        """Mark the dims that vary between calls dynamic before dynamo sees them. Without the marks dynamo
        compiles the first call static and the second one again (automatic dynamic); dims of size 0 or 1
        stay specialised whatever is marked (maybe_mark_dynamic leaves them be rather than fail)."""
        mark = torch._dynamo.maybe_mark_dynamic
        for name, t in inputs.items():
            mark(t, 0)  # batch
            mark(t, 2 if name.startswith("past_key_values.") else 1)  # the past length, or new/all tokens

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [name for name in self.input_names if not isinstance(inputs.get(name), torch.Tensor)]
        if missing:
            raise BackendError(f"compiled decode step of '{self.module.graph.name}': input(s) {', '.join(missing[:4])} "
                               f"missing or not tensors (it takes {', '.join(self.input_names[:4])}, ...)")
        self.module.check_input_ids(inputs["input_ids"])
        inputs = {name: dense(inputs[name]) for name in self.input_names}
        if self.dynamic:
            self._mark_dynamic(inputs)
        past = inputs.get(self.entries[0].past) if self.entries else None
        phase = "prefill" if past is None or past.shape[2] == 0 else "decode"
        start = time.perf_counter()
        limit = max(torch._dynamo.config.recompile_limit, DECODE_RECOMPILE_LIMIT)
        with torch.no_grad(), compile_settings(), torch._dynamo.config.patch(recompile_limit=limit):
            outputs = self.compiled(inputs)
        self.compile_seconds.setdefault(phase, time.perf_counter() - start)
        return dict(outputs)


class CompileBackend(Backend):
    name = "compile"
    summary = "the eager module under torch.compile (inductor, dynamic shapes)"
    pipeline = ("dce",)

    def supports(self, graph: Graph) -> tuple[bool, str]:
        missing = unsupported_ops(graph)
        if missing:
            return False, f"no eager implementation of op(s) {', '.join(missing)} to compile"
        problem = decode_contract_problem(graph) if is_decode_graph(graph) else graph.contract_problem()
        if problem:
            return False, problem
        if not hasattr(torch, "compile"):
            return False, f"torch {torch.__version__} has no torch.compile"
        return True, ""

    def prepare(self, graph: Graph, weights: Mapping[str, torch.Tensor], *, dynamic: bool = True,
                mode: str | None = None, **options: Any) -> Runner:
        ok, reason = self.supports(graph)
        if not ok:
            raise BackendError(f"backend 'compile' cannot run graph '{graph.name}': {reason}")
        if options.get("int4_activations") == "fused":
            raise BackendError("int4_activations='fused' is the torch backend's compiled int4 kernel; the compile "
                               "backend compiles the whole module (drop the option, or use the torch backend)")
        module = lower(graph, weights, **options)
        if isinstance(module, MoEModel) and module.cache_entries:
            return CompiledDecodeRunner(module, dynamic=dynamic, mode=mode)
        return CompiledRunner(module, dynamic=dynamic, mode=mode)
