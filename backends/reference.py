"""The reference interpreter as a backend, so `moe-ir validate` treats the oracle like any target."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from moe_ir.interpreter import interpret
from moe_ir.ir import Graph
from .base import Backend, Runner


class ReferenceBackend(Backend):
    name = "reference"
    summary = "op-by-op reference semantics (the oracle), float32 or float64"
    pipeline = ()

    def prepare(self, graph: Graph, weights: Mapping[str, torch.Tensor], *, dtype: torch.dtype = torch.float64,
                **options: Any) -> Runner:
        name = graph.inputs[0].name  # x [B, S, H] for a layer, input_ids [B, S] for a model

        def run(x: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            # A graph of several inputs (a decode graph: ids, mask, positions, cache) takes them by name.
            return interpret(graph, x if isinstance(x, Mapping) else {name: x}, weights, dtype=dtype)

        return run
