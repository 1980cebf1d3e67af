"""The canonical parameter tree of a lowered graph, shared by the torch modules (the eager module and the
expert-parallel one): each graph weight becomes a parameter (or, for buffers such as the router's selection
bias, a buffer) in nested sub-modules named after its dotted name, so `state_dict()` keys are exactly the
graph's and the safetensors files' names (`router.weight`, `experts.w_up`, `layers.3.attn.w_q`).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from moe_ir.ir import Graph, ValueKind

__all__ = ["ParamNamespace", "register_graph_weights", "register_weight"]


class ParamNamespace(nn.Module):
    """A namespace in the parameter tree (`router`, `experts`, `shared.0`, `layers.3.attn`, ...)."""


def register_weight(module: nn.Module, name: str, tensor: torch.Tensor, *,
                    parameter: bool) -> tuple[str, nn.Module, str]:
    """`tensor` stored on `module` under the dotted `name` (a parameter, or a buffer when `parameter` is false),
    namespaces made as needed; returns (name, owning module, leaf attribute)."""
    *path, leaf = name.split(".")
    owner: nn.Module = module
    for part in path:
        if part not in owner._modules:
            owner.add_module(part, ParamNamespace())
        owner = owner._modules[part]
    if parameter:
        owner.register_parameter(leaf, nn.Parameter(tensor))
    else:
        owner.register_buffer(leaf, tensor)
    return name, owner, leaf


def register_graph_weights(module: nn.Module, graph: Graph,
                           weights: Mapping[str, torch.Tensor]) -> list[tuple[str, nn.Module, str]]:
    """Every weight of `graph` registered on `module` (a detached copy of weights[name]; buffers stay buffers);
    returns (name, owning module, leaf attribute) per weight, in the graph's order."""
    return [register_weight(module, name, weights[name].detach().clone(), parameter=value.kind != ValueKind.BUFFER)
            for name, value in graph.weights.items()]
