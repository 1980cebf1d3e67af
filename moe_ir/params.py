"""Weights: deterministic seeded initialisation and safetensors I/O with strict name/shape checks.

No pickle anywhere: weights are safetensors files whose tensor names are the graph's canonical
weight names. Writes go through moe_ir.artifacts (staged, then renamed into place; nothing half-written).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping

import torch

from .artifacts import atomic_write
from .builder import ROUTER_BIAS
from .errors import WeightsError
from .interpreter import check_weights
from .ir import Graph

__all__ = ["init_weights", "save_weights", "load_weights", "check_weights", "check_weight_values", "atomic_write",
           "weights_nbytes", "activation_nbytes", "ensure_memory_for"]


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


def activation_nbytes(graph: Graph, *, batch: int, tokens: int, itemsize: int = 8) -> int:
    """Bytes of every value a run of `batch` x `tokens` computes, each held at once at `itemsize` bytes an
    element (the reference interpreter keeps all of them, in float64), plus the attention score matrices
    (B x heads x S x S, scores and probabilities), which live inside an attention op. From shapes alone.

    Symbolic dims: B = batch, S = tokens, T = B*S, A (expert assignments) = T x the largest top-k of the
    graph, any other (expert-choice capacity) at most T."""
    t = batch * tokens
    top_k = max([int(n.attrs["k"]) for n in graph.nodes if "k" in n.attrs] or [1])
    sizes = {"B": batch, "S": tokens, "T": t, "A": t * top_k}
    total = 0
    for node in graph.nodes:
        for v in node.outputs:
            if v is not None:
                total += math.prod(sizes.get(d, t) if isinstance(d, str) else int(d) for d in v.type.shape)
        if "heads" in node.attrs:
            total += 2 * batch * int(node.attrs["heads"]) * tokens * tokens
    for v in graph.inputs:
        total += math.prod(sizes.get(d, t) if isinstance(d, str) else int(d) for d in v.type.shape)
    return total * itemsize


def ensure_memory_for(graph: Graph, what: str, *, factor: float = 1.0, batch: int | None = None,
                      tokens: int | None = None) -> None:
    """Refuse up front, with sizes, when `factor` x the weights (and, given `batch` and `tokens`, the inputs
    and activations of a run, `activation_nbytes`) cannot fit in available memory: a clear message beats
    an allocator failure or the kernel's OOM killer half-way through a run or an artifact."""
    weights = weights_nbytes(graph) * factor
    acts = activation_nbytes(graph, batch=batch, tokens=tokens) if batch is not None and tokens is not None else 0
    need = weights + acts
    have = _available_memory()
    if have is not None and need > 0.9 * have:
        params = sum(math.prod(int(d) for d in v.type.shape) for v in graph.weights.values())
        sizes = f"{need / 2**30:.1f} GiB for the weights of '{graph.name}' ({params:,} parameters)"
        if acts:
            sizes = (f"{need / 2**30:.1f} GiB: {weights / 2**30:.1f} GiB for the weights of '{graph.name}' "
                     f"({params:,} parameters) and {acts / 2**30:.1f} GiB for the inputs and activations of "
                     f"{batch} x {tokens} tokens,")
        raise WeightsError(f"{what} needs about {sizes} but only {have / 2**30:.1f} GiB is available; use a machine "
                           f"with more memory, a lower-precision `dtype:` in the spec, "
                           + ("fewer tokens (--tokens, --batch), " if acts else "") + "or a smaller spec")


# A norm's scale: `norm.weight`, `layers.3.attn_norm.weight`, or a sublayer's `layers.3.attn_norm.1.weight`.
_NORM_WEIGHT = re.compile(r"norm(\.\d+)?\.weight$")


def init_weights(graph: Graph, seed: int = 0, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Seeded init: Linear-style U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for matrices, zeros for biases and
    the aux-loss-free bias buffer, ones for RMSNorm weights (`*norm.weight`, model graphs). Each tensor
    draws from its own generator seeded by (seed, name), so a weight's values do not depend on which
    other weights the graph has."""
    from .quantization import dequantize_nodes, quantize_weights, source_weight

    # A quantized graph's weights are those of the float graph it was made from, quantized: the same seed
    # gives the float model and its quantized form, so the two compare directly.
    quantized = dequantize_nodes(graph)
    parts = {v.name for n in quantized for v in n.inputs if v is not None}
    declared = {name: (v.type.shape, v.type.dtype) for name, v in graph.weights.items() if name not in parts}
    declared.update({source_weight(n): (n.outputs[0].type.shape, n.outputs[0].type.dtype) for n in quantized})
    out = {}
    for name, (dims, elem) in sorted(declared.items()):
        shape = tuple(int(d) for d in dims)
        t_dtype = dtype or elem.torch
        if _NORM_WEIGHT.search(name):  # RMSNorm scales of model graphs start at 1, as in transformers
            out[name] = torch.ones(shape, dtype=t_dtype)
            continue
        if name == ROUTER_BIAS or name.rsplit(".", 1)[-1].startswith("b_") or len(shape) < 2:
            out[name] = torch.zeros(shape, dtype=t_dtype)
            continue
        gen = torch.Generator().manual_seed((seed * 1_000_003 + _stable_hash(name)) % (2**63))
        bound = 1.0 / math.sqrt(shape[-1])
        out[name] = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).mul_(bound).to(t_dtype)
    return quantize_weights(graph, out) if quantized else out


def _stable_hash(name: str) -> int:
    h = 1469598103934665603
    for ch in name.encode():
        h = ((h ^ ch) * 1099511628211) % (2**64)
    return h


def save_weights(weights: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=dict(metadata or {})))


# Conversions that keep every value exactly: weights stored in one of these and declared in a wider float
# dtype are converted on load (with a note); any other difference is refused, since it would change values.
_EXACT_WIDENING = {(torch.float16, torch.float32), (torch.float16, torch.float64), (torch.bfloat16, torch.float32),
                   (torch.bfloat16, torch.float64), (torch.float32, torch.float64)}


def check_weight_values(name: str, tensor: torch.Tensor, where: str = "") -> None:
    """A weight is a floating tensor of finite values: an integer or bool tensor would be cast silently by
    the backends, and a NaN or inf would surface later as a backend mismatch far from its cause. The check
    reads the tensor in slices so it needs no second copy of a large weight."""
    at = f"{where}: " if where else ""
    if not tensor.is_floating_point():
        raise WeightsError(f"{at}tensor {name} has dtype {str(tensor.dtype).removeprefix('torch.')}; weights are "
                           f"floating point (an integer or bool tensor is not converted silently)")
    flat = tensor.detach().reshape(-1)
    step = 1 << 22
    for start in range(0, flat.numel(), step):
        part = flat[start:start + step]
        finite = torch.isfinite(part)
        if not bool(finite.all()):
            bad = part[~finite]
            kinds = sorted({"nan" if math.isnan(x) else ("inf" if x > 0 else "-inf") for x in bad[:64].tolist()})
            total = sum(int((~torch.isfinite(flat[i:i + step])).sum()) for i in range(0, flat.numel(), step))
            raise WeightsError(f"{at}tensor {name} holds {total:,} non-finite value(s) ({', '.join(kinds)}), the "
                               f"first at flat index {start + int((~finite).nonzero()[0])}; weights must be finite")


def load_weights(path: str | Path, graph: Graph | None = None, *, notes: list[str] | None = None,
                 allow_narrowing: bool = False) -> dict[str, torch.Tensor]:
    """Read a safetensors file; with a graph, check every name and shape against it, and every tensor's
    dtype and values (`check_weight_values`). A tensor stored in a narrower float dtype than the graph
    declares (float16 under a float32 spec) is converted exactly and a line saying so is appended to
    `notes`; a conversion that would lose precision is refused unless `allow_narrowing` (a run that asks
    for a lower dtype, such as `validate --dtype bfloat16`), and then noted too."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such weights file")
    try:
        if graph is not None:
            # Names and shapes from the header first, so a file holding other or larger tensors is refused
            # before any tensor is read into memory.
            with safe_open(str(path), framework="pt") as f:
                listed = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
            try:
                check_weights(graph, listed)
            except WeightsError as err:
                raise WeightsError(f"{path}: {err}") from None
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({' '.join(str(err).split())[:300]})") from None
    if graph is not None:
        converted: dict[tuple[str, str], list[str]] = {}
        narrowing = []
        for name, tensor in weights.items():
            want = graph.weights[name].type.dtype.torch
            if not graph.weights[name].type.dtype.is_float:  # the stored parts of a quantized weight
                if tensor.dtype != want:
                    raise WeightsError(f"{path}: tensor {name} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                                       f"expected {str(want).removeprefix('torch.')} (a quantized weight's codes)")
                continue
            check_weight_values(name, tensor, str(path))
            if tensor.dtype == want:
                continue
            if (tensor.dtype, want) not in _EXACT_WIDENING:
                narrowing.append(f"{name} ({str(tensor.dtype).removeprefix('torch.')})")
                if not allow_narrowing:
                    continue
            weights[name] = tensor.to(want)
            key = (str(tensor.dtype).removeprefix("torch."), str(want).removeprefix("torch."))
            converted.setdefault(key, []).append(name)
        if narrowing and not allow_narrowing:
            want = {str(v.type.dtype.torch).removeprefix("torch.") for v in graph.weights.values()}
            raise WeightsError(f"{path}: {len(narrowing)} tensor(s) would lose precision when converted to the "
                               f"spec's dtype ({', '.join(sorted(want))}): {', '.join(narrowing[:6])}"
                               + (" ..." if len(narrowing) > 6 else "") + "; set the spec's `dtype:` to the file's "
                               "or convert the file")
        from .quantization import check_quantized_values

        check_quantized_values(graph, weights, str(path))
        for (src, dst), names in converted.items():
            if notes is not None:
                notes.append(f"{path}: {len(names)} tensor(s) stored as {src} converted to the graph's {dst} "
                             f"({'exactly' if (getattr(torch, src), getattr(torch, dst)) in _EXACT_WIDENING else 'rounded'})")
    return weights
