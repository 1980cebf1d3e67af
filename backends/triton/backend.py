"""The `triton` backend: the fused graph as an nn.Module whose routed path runs the Triton kernels.

Lowering (one screen):
  graph --("strip-training-outputs", "dce", "fuse-shared-experts", "fuse-moe", "dce")--> one FUSED_MOE node
  FUSED_MOE      -> router logits x @ w_router.T in the router dtype, then ``moe_forward``
                    (route -> dispatch -> grouped FFN -> combine custom ops, see ops.py)
  anything else  -> the torch op table every torch backend shares (``torch_ops``: FFN, SIGMOID_GATE, ADD,
                    CONCAT, flatten/restore on the torch kernels)
  weight-only nodes (CONCAT/ADD of weights, made by fuse-shared-experts) are folded once at prepare time
  (``torch_ops.fold_weights``) unless ``fold_weights=False`` (then they run in forward, so gradients reach
  the canonical weights).

What runs where (``TritonMoELayer.path``):
  * "triton-cuda": CUDA tensors, the compiled Triton kernels. Chosen whenever CUDA is available.
  * "triton-interpreter": CPU tensors with ``TRITON_INTERPRET=1``: the same kernels in Triton's interpreter,
    for correctness, not speed. Importing this package on a machine without CUDA turns the interpreter on
    (``__init__.py``) unless TRITON_INTERPRET was set explicitly.
  * "torch-traced": ``compile=True`` on a CPU. torch.compile cannot capture interpreted kernels, so what it
    traces (and what then runs) are the ops' torch implementations with the same layouts (ops.py).
  A CPU process with TRITON_INTERPRET=0 could only run those torch implementations: supports() says no,
  since the backend would not be testing any Triton kernel.
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Mapping

import torch
from torch import nn

from moe_ir.errors import BackendError
from moe_ir.interpreter import check_weights
from moe_ir.ir import ElemType, Graph, OpCode, ValueKind
from moe_ir.quantization import quantized_formats
from ..base import Backend
from ..torch_kernels import split_gate_up
from ..torch_ops import INFERENCE_RUNTIME, lower_node, weight_only_nodes
from ..torch_params import register_weight
from ..torch_ops import fold_weights as folded_weights
from . import kernels as K
from . import ops

CPU_NOTE = ("Triton on CPU runs through the interpreter (TRITON_INTERPRET=1): for correctness, not speed")
COMPILE_CPU_NOTE = ("compile=True on CPU: torch.compile traces the ops' torch implementations "
                    "(interpreted Triton kernels cannot be captured into a graph); on CUDA it captures the kernels")

# Ops run through the torch op table: all plain torch, differentiable, free of host syncs.
PLAIN_OPS = frozenset({OpCode.FLATTEN_TOKENS, OpCode.RESTORE_TOKENS, OpCode.LINEAR, OpCode.FFN,
                       OpCode.SIGMOID_GATE, OpCode.ADD, OpCode.CONCAT})
KERNEL_DTYPES = (ElemType.FLOAT32, ElemType.FLOAT16, ElemType.BFLOAT16)
RUNNER_OUTPUTS = ("out", "expert_idx", "weights")

# Why a graph that did not fuse cannot run here, by the op that kept it from fusing.
_UNFUSED_REASONS = {
    OpCode.EXPERT_CHOICE_ROUTE: "expert-choice routing (each expert picks its top-C tokens): the Triton route "
                                "kernel implements token choice (each token picks its top-k experts)",
    OpCode.ROUTER_NOISE: "a noisy router (router_noise): fuse-moe leaves noisy routers unfused and the route "
                         "kernel adds no noise",
    OpCode.SPARSEMIXER_ROUTE: "SparseMixer routing (sparsemixer_route): fuse-moe fuses softmax/sigmoid top-k "
                              "routing only, and the Triton route kernel implements no SparseMixer selection",
    OpCode.BALANCE_LOSS: "a training graph: its balance losses read the router scores, so the routed path cannot "
                         "fuse; lower the inference graph",
}


def _interpreted_kernels() -> bool:
    """True when kernels.py was decorated under the interpreter (InterpretedFunction objects)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(K.route_kernel, InterpretedFunction)


def execution_problem(device: torch.device) -> str:
    """'' when the Triton kernels can run on `device` in this process, else why not."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "device cuda requested but torch sees no CUDA device"
        if K.interpreting():
            return "TRITON_INTERPRET=1 is set on a CUDA machine; unset it to run the compiled kernels"
        return ""
    if device.type != "cpu":
        return f"device {device} is neither cuda nor cpu"
    if not K.interpreting():
        return ("CPU tensors with TRITON_INTERPRET off: only the ops' torch implementations could run, not the "
                "Triton kernels (on a machine without CUDA, unset TRITON_INTERPRET or set it to 1 before importing "
                "moe_ir.backends.triton)")
    if not _interpreted_kernels():
        return ("TRITON_INTERPRET=1 was set after the Triton kernels were imported (they were compiled for a GPU); "
                "set it before importing moe_ir.backends.triton")
    return ""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _fused_node(graph: Graph):
    nodes = graph.find(OpCode.FUSED_MOE)
    return nodes[0] if len(nodes) == 1 else None


def graph_problem(graph: Graph) -> str:
    """'' when the graph lowers onto moe_forward + plain torch, else what is in the way and why."""
    fused = graph.find(OpCode.FUSED_MOE)
    if not fused:
        present = {n.op for n in graph.nodes}
        for op, reason in _UNFUSED_REASONS.items():
            if op in present:
                return reason
        if any(n.attrs["identity_experts"] for n in graph.find(OpCode.GROUPED_FFN)):
            return ("identity experts (experts.identity, LongCat-Flash): fuse-moe leaves them unfused and the grouped "
                    "GEMM kernels run FFN experts only")
        if any(n.input("row_scale") is not None for n in graph.find(OpCode.GROUPED_FFN)):
            return ("routing weights on the expert inputs (router.scale_input, Llama 4): fuse-moe leaves them "
                    "unfused and the grouped GEMM kernels weigh the outputs")
        if any(n.inputs[2] is not None for n in graph.find(OpCode.LINEAR) if n.name.endswith("router_logits")):
            return ("the router projection has a bias (router.logit_bias): fuse-moe leaves such routers unfused and "
                    "the route kernel adds no logit bias")
        return (f"the routed path did not fuse into one fused_moe node (pipeline "
                f"{graph.meta.get('pipeline', '?')}); the Triton backend runs only the fused layer")
    if len(fused) > 1:
        return f"{len(fused)} fused_moe nodes; the backend lowers one MoE layer per graph"
    node = fused[0]
    a = node.attrs
    if a["capacity_factor"] is not None:
        return (f"capacity factor {a['capacity_factor']:g} ({a['drop_rule'].value} drop rule): the Triton dispatch "
                f"is dropless (every assignment gets a row), so it cannot drop tokens over capacity")
    if a["activation"].value not in K.ACTIVATION_CODES:
        return (f"activation {a['activation'].value}: the grouped GEMM kernels implement "
                f"{', '.join(K.ACTIVATION_CODES)}")
    biases = [p for p in ("b_up", "b_down", "b_gate") if node.input(p) is not None]
    if biases:
        return f"expert biases ({', '.join(biases)}): the grouped GEMM kernels have no bias epilogue"
    x_type = node.input("x").type
    if x_type.dtype not in KERNEL_DTYPES:
        return (f"{x_type.dtype.value} activations: the kernels compute in "
                f"{', '.join(d.value for d in KERNEL_DTYPES)}")
    num_experts = node.input("w_up").type.shape[0]
    if not 1 <= num_experts <= ops.MAX_EXPERTS:
        return f"{num_experts} experts: the route kernel holds a whole expert row in registers (at most {ops.MAX_EXPERTS})"
    if a["groups"] > 1 and a["group_score"].value == "top2_sum" and num_experts // a["groups"] < 2:
        return f"top2_sum group score over groups of {num_experts // a['groups']} expert(s); it needs 2 per group"
    others = sorted({n.op.value for n in graph.nodes if n.op not in PLAIN_OPS and n.op != OpCode.FUSED_MOE})
    if others:
        return f"op(s) {', '.join(others)} outside the fused layer have no lowering here"
    if len(graph.inputs) != 1 or graph.inputs[0].type.rank != 3:
        return "the backend takes one input x [B, S, H]"
    return ""


# ---------------------------------------------------------------------------------------------- lowering
def fused_moe_step(attrs: Mapping[str, Any]) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The FUSED_MOE node as a function of its operands: router projection, then the Triton ops."""
    router_dtype = attrs["router_dtype"].torch
    activation = attrs["activation"]
    kwargs = dict(activation=activation.value, score=attrs["score"].value, k=attrs["k"], n_group=attrs["groups"],
                  topk_group=attrs["kept"], group_score=attrs["group_score"].value, normalize=attrs["normalize"],
                  scale=float(attrs["scale"]))
    layout = attrs["weight_layout"].value

    def run(x, w_router, bias, w_up, w_down, w_gate, b_up, b_down, b_gate):
        logits = torch.nn.functional.linear(x.to(router_dtype), w_router.to(router_dtype))
        w_up, w_gate, _, _ = split_gate_up(w_up, w_gate, None, None, activation.value, layout)
        out, weights, expert_idx = ops.moe_forward(x, logits, bias, w_gate, w_up, w_down, **kwargs)
        return out, expert_idx, weights.to(router_dtype)

    return run


def _table_step(node) -> Callable[..., tuple[torch.Tensor, ...]]:
    """A node outside the fused layer, as the torch op table runs it (results as a tuple)."""
    call, single = lower_node(node), len(node.outputs) == 1

    def run(*operands):
        result = call(list(operands), INFERENCE_RUNTIME)
        return (result,) if single else tuple(result)

    return run


class TritonMoELayer(nn.Module):
    """An MoE layer lowered from a fused graph: forward(x [B, S, H]) -> {"out", "expert_idx", "weights"}.

    Parameters carry the graph's canonical names (``canonical_weights()``). ``path`` says what runs the
    routed experts (module docstring).
    """

    def __init__(self, graph: Graph, weights: Mapping[str, torch.Tensor], *, device: torch.device | str | None = None,
                 fold_weights: bool = True):
        super().__init__()
        problem = graph_problem(graph)
        if problem:
            raise BackendError(f"backend 'triton' cannot lower graph '{graph.name}': {problem}")
        check_weights(graph, weights)
        self.device = torch.device(device) if device is not None else default_device()
        problem = execution_problem(self.device)
        if problem:
            raise BackendError(f"backend 'triton' cannot run on {self.device}: {problem}")
        self.path = "triton-cuda" if self.device.type == "cuda" else "triton-interpreter"
        self.graph = graph
        self._input = graph.inputs[0].name
        self._input_dtype = graph.inputs[0].type.dtype.torch
        self._outputs = [(key, v.name, v.type.dtype.torch) for key, v in graph.outputs.items()
                         if key in RUNNER_OUTPUTS]
        self._slots: list[tuple[str, nn.Module, str]] = []
        for name, value in graph.weights.items():
            tensor = weights[name].detach().to(self.device, value.type.dtype.torch).clone()
            self._register(name, tensor, trainable=value.kind != ValueKind.BUFFER)

        folded = {n.name for n in weight_only_nodes(graph)} if fold_weights else set()
        if folded:
            for out_name, result in folded_weights(graph, self.canonical_weights()).items():
                # Derived from the canonical weights: a buffer, so it is not trained separately.
                self._register(out_name, result.contiguous(), trainable=None)
        self._plan: list[tuple[Callable, tuple[str | None, ...], tuple[str, ...]]] = []
        for node in graph.nodes:
            if node.name in folded:
                continue
            inputs = tuple(None if v is None else v.name for v in node.inputs)
            outputs = tuple(v.name for v in node.outputs)
            step = fused_moe_step(node.attrs) if node.op == OpCode.FUSED_MOE else _table_step(node)
            self._plan.append((step, inputs, outputs))

    # -- construction helpers ----------------------------------------------------------------------------
    def _register(self, name: str, tensor: torch.Tensor, *, trainable: bool | None) -> None:
        """Store under the dotted canonical name; `trainable` None = derived (folded) buffer."""
        self._slots.append(register_weight(self, name, tensor, parameter=bool(trainable)))

    def canonical_weights(self) -> dict[str, torch.Tensor]:
        """Every stored tensor by graph name: the canonical weights, plus folded ones."""
        return {name: getattr(owner, leaf) for name, owner, leaf in self._slots}

    # -- run ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        env: dict[str, Any] = self.canonical_weights()
        env[self._input] = x.to(self._input_dtype)
        for step, inputs, outputs in self._plan:
            results = step(*[None if i is None else env[i] for i in inputs])
            for name, value in zip(outputs, results):
                env[name] = value
        return {key: env[name].to(dtype) for key, name, dtype in self._outputs}


class TritonRunner:
    """x [B, S, H] on any device -> outputs on x's device. `notes` says what ran; the first call of a compiled
    module compiles (timed in `compile_seconds`)."""

    def __init__(self, module: TritonMoELayer, *, compile: bool = False, notes: list[str] | None = None):
        self.module = module.eval()
        self.notes = list(notes or [])
        self.path = module.path
        self.compile_seconds: float | None = None
        self._call: Callable = module
        if compile:
            self._call = torch.compile(module, fullgraph=True, dynamic=True)
            if module.device.type == "cpu":
                self.path = "torch-traced"

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() != 3:
            raise BackendError(f"backend 'triton': x must be [B, S, H], got {list(x.shape)}")
        start = time.perf_counter()
        with torch.no_grad():
            try:
                res = self._call(x.to(self.module.device))
            except ValueError as err:  # the kernel wrappers' shape/dtype checks
                raise BackendError(f"backend 'triton': {err}") from None
        if self.compile_seconds is None and self._call is not self.module:
            self.compile_seconds = time.perf_counter() - start
        return {key: value.to(x.device) for key, value in res.items()}


class TritonBackend(Backend):
    name = "triton"
    summary = ("routed experts through the Triton kernels (route, dispatch, grouped FFN, combine) as torch custom "
               "ops; CUDA natively, CPU through the Triton interpreter (correctness only)")
    pipeline = ("strip-training-outputs", "dce", "fuse-shared-experts", "fuse-moe", "dce")

    def supports(self, graph: Graph) -> tuple[bool, str]:
        formats = quantized_formats(graph)
        if formats:
            return False, (f"quantized weights ({', '.join(sorted(f.value for f in formats))}) have no Triton kernel "
                           "here; the torch and compile backends run them")
        problem = graph_problem(graph) or execution_problem(default_device())
        return (not problem), problem

    def prepare(self, graph: Graph, weights: Mapping[str, torch.Tensor], *, compile: bool = False,
                device: torch.device | str | None = None, fold_weights: bool = True, **options: Any) -> TritonRunner:
        """Options: compile (torch.compile fullgraph, dynamic token count), device (default: cuda if available,
        else cpu), fold_weights (fold weight-only subgraphs once; False keeps gradients on canonical weights)."""
        if options:
            raise BackendError(f"backend 'triton' takes options compile, device, fold_weights; got {sorted(options)}")
        module = TritonMoELayer(graph, weights, device=device, fold_weights=fold_weights)
        notes = []
        if module.device.type == "cpu":
            notes.append(CPU_NOTE)
            if compile:
                notes.append(COMPILE_CPU_NOTE)
            # The warnings machinery shows this once per call site.
            warnings.warn(CPU_NOTE, RuntimeWarning, stacklevel=2)
        return TritonRunner(module, compile=compile, notes=notes)
