"""The `compile` backend: the eager module through torch.compile (inductor, dynamic token count).

torch.compile traces the eager module's forward; the per-expert loop in the grouped FFN reads the group
sizes on the host, so dynamo splits the forward into a routing graph and an expert graph there
(a graph break, not a failure), and inductor fuses the elementwise work around the GEMMs
(activation, weighting, losses). Compilation happens on the first call; `CompiledRunner.compile_seconds`
records how long it took.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import torch

from ..errors import BackendError
from ..ir import Graph
from .base import Backend, Runner
from .torch_eager.backend import RUNNER_OUTPUTS
from .torch_eager.module import MoELayer, unsupported_ops


class CompiledRunner:
    """x -> outputs by name; the first call compiles (timed in `compile_seconds`)."""

    def __init__(self, module: MoELayer, *, dynamic: bool = True, mode: str | None = None):
        self.module = module.eval()
        self.compiled = torch.compile(module, backend="inductor", dynamic=dynamic, mode=mode)
        self.compile_seconds: float | None = None

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        with torch.no_grad():
            res = self.compiled(x)
        if self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - start
        found = {"out": res.out, **res.routing}
        return {key: found[key] for key in RUNNER_OUTPUTS if key in found}


class CompileBackend(Backend):
    name = "compile"
    summary = "the eager module under torch.compile (inductor, dynamic shapes)"
    pipeline = ("dce",)

    def supports(self, graph: Graph) -> tuple[bool, str]:
        missing = unsupported_ops(graph)
        if missing:
            return False, f"no eager implementation of op(s) {', '.join(missing)} to compile"
        if not hasattr(torch, "compile"):
            return False, f"torch {torch.__version__} has no torch.compile"
        return True, ""

    def prepare(self, graph: Graph, weights: Mapping[str, torch.Tensor], *, dynamic: bool = True,
                mode: str | None = None, **options: Any) -> Runner:
        ok, reason = self.supports(graph)
        if not ok:
            raise BackendError(f"backend 'compile' cannot run graph '{graph.name}': {reason}")
        return CompiledRunner(MoELayer(graph, weights, **options), dynamic=dynamic, mode=mode)
