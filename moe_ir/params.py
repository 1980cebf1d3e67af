"""Weights: deterministic seeded initialisation and safetensors I/O with strict name/shape checks.

No pickle anywhere: weights are safetensors files whose tensor names are the graph's canonical
weight names. Writes are atomic (temp file in the same folder, then rename).
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch

from .builder import ROUTER_BIAS
from .errors import WeightsError
from .interpreter import check_weights
from .ir import Graph

__all__ = ["init_weights", "save_weights", "load_weights", "check_weights", "atomic_write", "weights_nbytes",
           "ensure_memory_for"]


def weights_nbytes(graph: Graph) -> int:
    """Bytes the graph's weights take in their declared dtypes (from shapes alone; nothing is allocated)."""
    total = 0
    for v in graph.weights.values():
        total += math.prod(int(d) for d in v.type.shape) * v.type.dtype.torch.itemsize
    return total


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def ensure_memory_for(graph: Graph, what: str, *, factor: float = 1.0) -> None:
    """Refuse up front, with sizes, when `factor` x the weights cannot fit in available memory: a clear
    message beats the kernel's OOM killer half-way through writing an artifact."""
    need = weights_nbytes(graph) * factor
    have = _available_memory()
    if have is not None and need > 0.9 * have:
        raise WeightsError(f"{what} needs about {need / 2**30:.1f} GiB for the weights of '{graph.name}' "
                           f"({sum(math.prod(int(d) for d in v.type.shape) for v in graph.weights.values()):,} "
                           f"parameters) but only {have / 2**30:.1f} GiB is available; use a machine with more "
                           f"memory, a lower-precision `dtype:` in the spec, or a smaller spec")


def init_weights(graph: Graph, seed: int = 0, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Seeded init: Linear-style U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for matrices, zeros for biases and
    the aux-loss-free bias buffer, ones for RMSNorm weights (`*norm.weight`, model graphs). Each tensor
    draws from its own generator seeded by (seed, name), so a weight's values do not depend on which
    other weights the graph has."""
    out = {}
    for name, v in sorted(graph.weights.items()):
        shape = tuple(int(d) for d in v.type.shape)
        t_dtype = dtype or v.type.dtype.torch
        if name.endswith("norm.weight"):  # RMSNorm scales of model graphs start at 1, as in transformers
            out[name] = torch.ones(shape, dtype=t_dtype)
            continue
        if name == ROUTER_BIAS or name.rsplit(".", 1)[-1].startswith("b_") or len(shape) < 2:
            out[name] = torch.zeros(shape, dtype=t_dtype)
            continue
        gen = torch.Generator().manual_seed((seed * 1_000_003 + _stable_hash(name)) % (2**63))
        bound = 1.0 / math.sqrt(shape[-1])
        out[name] = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).mul_(bound).to(t_dtype)
    return out


def _stable_hash(name: str) -> int:
    h = 1469598103934665603
    for ch in name.encode():
        h = ((h ^ ch) * 1099511628211) % (2**64)
    return h


def atomic_write(path: str | Path, write) -> Path:
    """Call write(tmp_path), then rename onto `path`; on any failure nothing is left at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates the file 0600; give the artifact the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_weights(weights: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=dict(metadata or {})))


def load_weights(path: str | Path, graph: Graph | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file; with a graph, check every name and shape against it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such weights file")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({err})") from None
    if graph is not None:
        try:
            check_weights(graph, weights)
        except WeightsError as err:
            raise WeightsError(f"{path}: {err}") from None
    return weights
