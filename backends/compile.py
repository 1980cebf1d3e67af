"""The `compile` backend: the eager module through torch.compile (inductor, dynamic token count, one graph).

torch.compile traces the eager module's whole forward as one graph (`fullgraph=True`: a break is an
error): the dispatch counts have a fixed length (no bincount), and the grouped FFN's group sizes
(`.tolist()`) become unbacked symbols under `capture_scalar_outputs`, so every expert's GEMM chain is in
the graph with a size that may be 0 and nothing branches on it. One compilation serves every routing and
every token count of 2 or more (1 token is a shape of its own: dynamo specialises sizes 0 and 1).

The runner serves inference, so inductor runs with `freezing`: the weights are constants, each expert's
weight slice is folded and packed once into oneDNN's blocked layout, and the GEMMs run as oneDNN
matmuls on the packed weights. On the 2-core AMD EPYC (AVX2) CI machine that is what makes compile
faster than eager: an expert GEMM of ~96 rows (DeepSeekMoE-16B at 1024 tokens) costs 18.9 ms/GFLOP
through ATen's MKL sgemm and 14.5 ms/GFLOP through oneDNN on packed weights (tools/bench_eager.py
--compile gives the layer figure). Compilation happens on the first call; `CompiledRunner.compile_seconds`
records how long it took.

Model graphs (input_ids -> logits) compile the eager `MoEModel` the same way, as one graph over every
layer; the runner takes input_ids int64 [B, S] and returns logits and each MoE layer's routing record.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Mapping

import torch

from ..errors import BackendError
from ..ir import Graph
from .base import Backend, Runner
from .torch_eager.backend import lower, runner_outputs
from .torch_eager.module import GraphModule, MoEModel, graph_contract_problem, unsupported_ops


def compile_settings():
    """The dynamo/inductor settings every call of a compiled runner runs under (recompiles included).

    - capture_scalar_outputs: the grouped FFN's group sizes (`.tolist()`) become unbacked symbols inside
      the graph instead of a graph break, so one graph covers routing, every expert and combine, for any
      routing (no guard on which experts are empty, hence no recompile per routing).
    - freezing: the runner serves inference, so inductor may treat the weights as constants: it folds
      the per-expert weight slices and packs each expert's GEMM weights once into oneDNN's blocked layout
      (mkldnn._linear_pointwise). The packed copies cost one extra copy of the weights' memory, and
      weights changed after the first call are not seen (the runner is built from fixed weights).
    """
    stack = contextlib.ExitStack()
    stack.enter_context(torch._dynamo.config.patch(capture_scalar_outputs=True))
    stack.enter_context(torch._inductor.config.patch(freezing=True))
    return stack


class CompiledRunner:
    """x (a layer's activations) or input_ids (a model's tokens) -> outputs by name; the first call
    compiles (timed in `compile_seconds`)."""

    def __init__(self, module: GraphModule, *, dynamic: bool = True, mode: str | None = None):
        self.module = module.eval()
        # fullgraph: a graph break would split the layer and leave the expert loop to run op by op (and,
        # frozen, each piece would hold its own packed weights); it is an error, not a slowdown.
        self.compiled = torch.compile(module, backend="inductor", fullgraph=True, dynamic=dynamic, mode=mode)
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


class CompileBackend(Backend):
    name = "compile"
    summary = "the eager module under torch.compile (inductor, dynamic shapes)"
    pipeline = ("dce",)

    def supports(self, graph: Graph) -> tuple[bool, str]:
        missing = unsupported_ops(graph)
        if missing:
            return False, f"no eager implementation of op(s) {', '.join(missing)} to compile"
        problem = graph_contract_problem(graph)
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
        return CompiledRunner(lower(graph, weights, **options), dynamic=dynamic, mode=mode)
