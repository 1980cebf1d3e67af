"""The reference interpreter: runs any graph op by op with the registry's reference semantics.

It is the oracle for passes and backends. Floating inputs and weights are cast to the compute dtype
(float32 or float64) so a comparison measures the backend, not the storage dtype.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from .errors import IRError, WeightsError
from .ir import Graph, op_def

COMPUTE_DTYPES = (torch.float32, torch.float64)


def check_weights(graph: Graph, weights: Mapping[str, torch.Tensor]) -> None:
    """Names and shapes of `weights` against the graph's weights; one error listing every mismatch."""
    missing = sorted(set(graph.weights) - set(weights))
    unexpected = sorted(set(weights) - set(graph.weights))
    wrong = [f"{name}: expected {list(v.type.shape)}, found {list(weights[name].shape)}"
             for name, v in graph.weights.items() if name in weights and tuple(weights[name].shape) != v.type.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append("missing: " + ", ".join(missing))
        if unexpected:
            parts.append("unexpected: " + ", ".join(unexpected))
        if wrong:
            parts.append("wrong shape: " + "; ".join(wrong))
        raise WeightsError(f"weights do not match graph '{graph.name}': " + " | ".join(parts))


def _symbol_terms(dim: str) -> list[list[str]] | None:
    """'P+S' -> [['P'], ['S']], 'B*S' -> [['B', 'S']]; None for a plain symbol."""
    if "+" not in dim and "*" not in dim:
        return None
    return [term.split("*") for term in dim.split("+")]


def check_symbolic_dims(graph: Graph, inputs: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Binds each symbolic dim of the graph's inputs ('B', 'S', 'P') to its size and checks that every
    input agrees, sums and products ('P+S') included; returns the bindings. One IRError names the input
    and the dim that disagree (a cache of the wrong length, a mask that does not cover past and new tokens)."""
    bound: dict[str, tuple[int, str]] = {}
    derived = []
    for v in graph.inputs:
        for axis, (dim, size) in enumerate(zip(v.type.shape, inputs[v.name].shape)):
            if isinstance(dim, int):
                continue
            if _symbol_terms(dim) is not None:
                derived.append((v.name, axis, dim, int(size)))
            elif dim in bound and bound[dim][0] != size:
                first_size, first_input = bound[dim]
                raise IRError(f"input {v.name!r} has {size} along dim {axis} ({dim}), but {first_input!r} has "
                              f"{dim} = {first_size}; inputs must agree on every symbolic size")
            else:
                bound.setdefault(dim, (int(size), v.name))
    sizes = {dim: size for dim, (size, _) in bound.items()}
    for name, axis, dim, size in derived:
        terms = _symbol_terms(dim)
        if all(s in sizes for term in terms for s in term):
            expected = sum(math.prod(sizes[s] for s in term) for term in terms)
            if size != expected:
                values = ", ".join(f"{s} = {sizes[s]}" for s in dict.fromkeys(s for term in terms for s in term))
                raise IRError(f"input {name!r} has {size} along dim {axis}, expected {dim} = {expected} ({values})")
    return sizes


def interpret(graph: Graph, inputs: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor], *,
              dtype: torch.dtype = torch.float32, keep_all: bool = False) -> dict[str, torch.Tensor]:
    """Outputs by name (every value by name when keep_all)."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"the reference interpreter computes in float32 or float64, not {dtype}")
    check_weights(graph, weights)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    env: dict[str, torch.Tensor] = {}
    for v in graph.inputs:
        if v.name not in inputs:
            raise IRError(f"graph input {v.name!r} was not given (inputs: {sorted(inputs)})")
        t = inputs[v.name]
        if t.dim() != v.type.rank or any(isinstance(d, int) and d != s for d, s in zip(v.type.shape, t.shape)):
            raise IRError(f"input {v.name!r} has shape {list(t.shape)}, the graph expects {v.type}")
        env[v.name] = cast(t)
    check_symbolic_dims(graph, inputs)
    for name in graph.weights:
        env[name] = cast(weights[name])
    with torch.no_grad():
        for node in graph.nodes:
            args = [None if v is None else env[v.name] for v in node.inputs]
            results = op_def(node.op).reference(node.attrs, *args)
            for out, value in zip(node.outputs, results):
                env[out.name] = value
    if keep_all:
        return env
    return {key: env[v.name] for key, v in graph.outputs.items()}
