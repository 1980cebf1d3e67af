"""The `compile` backend: the eager module through torch.compile (inductor, dynamic token count).

torch.compile traces the eager module's forward; the per-expert loop in the grouped FFN reads the group
sizes on the host, so dynamo splits the forward into a routing graph and an expert graph there
(a graph break, not a failure), and inductor fuses the elementwise work around the GEMMs
(activation, weighting, losses). Compilation happens on the first call; `CompiledRunner.compile_seconds`
records how long it took.

Model graphs (input_ids -> logits) compile the eager `MoEModel` the same way. Measured with torch 2.13:
dynamo does not resume a loop after a graph break, so the module's walk over the graph's nodes runs
eagerly and each op's call is compiled as a frame of its own (attention, RMSNorm, routing: fused within
the op); layers of the same shapes reuse those frames. A 2-layer toy model compiles in ~60 s on 2 CPU
cores with a cold inductor cache, and a second (B, S) shape reuses it apart from a few small recompiles
of the expert loop. The runner takes input_ids int64 [B, S] and returns logits and each MoE layer's
routing record.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import torch

from ..errors import BackendError
from ..ir import Graph
from .base import Backend, Runner
from .torch_eager.backend import lower, runner_outputs
from .torch_eager.module import GraphModule, MoEModel, graph_contract_problem, unsupported_ops


class CompiledRunner:
    """x (a layer's activations) or input_ids (a model's tokens) -> outputs by name; the first call
    compiles (timed in `compile_seconds`)."""

    def __init__(self, module: GraphModule, *, dynamic: bool = True, mode: str | None = None):
        self.module = module.eval()
        self.compiled = torch.compile(module, backend="inductor", dynamic=dynamic, mode=mode)
        self.compile_seconds: float | None = None
        # The token range check reads the ids, so it runs here, outside the compiled graph.
        self._check = module.check_input_ids if isinstance(module, MoEModel) else None

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._check is not None:
            self._check(x)
        start = time.perf_counter()
        with torch.no_grad():
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
