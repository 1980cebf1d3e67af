"""Block-wise weight quantization: the storage layout, the round-to-nearest quantizer, the exact dequantizer
(the reference every backend is checked against), which weights a spec quantizes, and the error report.

A quantized weight W [..., N, K] (PyTorch Linear layout: N outputs, K inputs; stacked experts lead with E)
is stored as up to three tensors named after it, each a weight of the graph and one safetensors tensor:

  `<name>.qweight`  int8: int8 codes [..., N, K] (symmetric) or uint8 codes (with zero points);
                    int4: uint8 [..., N, K/2], two codes a byte, column 2j in the low nibble, 2j+1 in the high;
                    fp8_e4m3: float8_e4m3fn values [..., N, K]
  `<name>.scales`   float32 [..., N, K/block]; fp8_e4m3: [..., ceil(N/block), ceil(K/block)] (square tiles)
  `<name>.zeros`    uint8 [..., N, K/block], only without `symmetric`

and W = (code - zero) * scale per block, where symmetric int8 has zero 0 and symmetric int4 stores code + 8
with zero 8 (so every int4 code is a nibble 0..15, as ONNX Runtime's MatMulNBits and QMoE read them).
(code - zero) is a small integer, so the product is one rounding of the exact value in float32 and exact in
float64: the reference interpreter dequantizes exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from .errors import IRError, WeightsError
from .ir import ElemType, Graph, Node, OpCode, TensorType, ValueKind
from .ir.quant_ops import dequantize, implicit_zero, unpack_int4
from .lazy import LazyModule
from .spec import QuantFormat, QuantizationSpec, QuantizedWeights

torch = LazyModule("torch")

QWEIGHT, SCALES, ZEROS = "qweight", "scales", "zeros"
FP8_MAX = 448.0  # the largest finite float8 e4m3fn value


def part_name(weight: str, part: str) -> str:
    return f"{weight}.{part}"


def code_range(fmt: QuantFormat, symmetric: bool) -> tuple[int, int]:
    """(lowest, highest) code before the zero point is added: what round-to-nearest clamps to."""
    if fmt == QuantFormat.INT8:
        return (-127, 127) if symmetric else (0, 255)
    return (-8, 7) if symmetric else (0, 15)


def qweight_type(fmt: QuantFormat, symmetric: bool, shape: tuple[int, ...]) -> TensorType:
    *lead, n, k = shape
    if fmt == QuantFormat.INT4:
        return TensorType((*lead, n, k // 2), ElemType.UINT8)
    if fmt == QuantFormat.FP8_E4M3:
        return TensorType(shape, ElemType.FLOAT8_E4M3)
    return TensorType(shape, ElemType.INT8 if symmetric else ElemType.UINT8)


def scales_shape(fmt: QuantFormat, block: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    *lead, n, k = shape
    if fmt == QuantFormat.FP8_E4M3:
        return (*lead, -(-n // block), -(-k // block))
    return (*lead, n, k // block)


def layout_problem(name: str, fmt: QuantFormat, block: int, shape: tuple) -> str:
    """Why weight `name` of `shape` cannot be stored in this format, or ""."""
    if len(shape) < 2 or not all(isinstance(d, int) for d in shape):
        return f"weight {name} {list(shape)} is not a static matrix (or stack of matrices)"
    if fmt != QuantFormat.FP8_E4M3 and shape[-1] % block:
        return (f"weight {name} {list(shape)}: the block size {block} does not divide its input dimension "
                f"{shape[-1]}; choose a block that divides {shape[-1]} or leave this weight unquantized")
    return ""


# ------------------------------------------------------------------------------------------------
# the math (torch)


def pack_int4(codes: "torch.Tensor") -> "torch.Tensor":
    """codes 0..15 [..., K] (K even) -> uint8 [..., K/2]: column 2j in the low nibble, 2j+1 in the high."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def quantize(weight: "torch.Tensor", fmt: QuantFormat, block: int, symmetric: bool,
             name: str = "weight") -> dict[str, "torch.Tensor"]:
    """Round-to-nearest block quantization of a float weight [..., N, K]: {qweight, scales[, zeros]}.
    Deterministic (ties to even); the codes are rounded against the float32 scales that are stored, so
    dequantize() of the result is the nearest representable value of each block's grid."""
    fmt = QuantFormat(fmt)
    problem = layout_problem(name, fmt, block, tuple(weight.shape))
    if problem:
        raise WeightsError(problem)
    if not bool(torch.isfinite(weight).all()):
        raise WeightsError(f"weight {name} holds non-finite values; it cannot be quantized")
    w = weight.detach().to(torch.float64)
    if fmt == QuantFormat.FP8_E4M3:
        *lead, n, k = w.shape
        pn, pk = -(-n // block) * block, -(-k // block) * block
        padded = torch.nn.functional.pad(w, (0, pk - k, 0, pn - n))
        tiles = padded.reshape(*lead, pn // block, block, pk // block, block)
        amax = tiles.abs().amax(dim=(-3, -1))
        scales = (amax / FP8_MAX).to(torch.float32)
        safe = torch.where(scales == 0, torch.ones_like(scales), scales).to(torch.float64)
        full = safe.repeat_interleave(block, dim=-2)[..., :n, :].repeat_interleave(block, dim=-1)[..., :k]
        return {QWEIGHT: (w / full).to(torch.float8_e4m3fn), SCALES: scales}
    *lead, n, k = w.shape
    blocks = w.reshape(*lead, n, k // block, block)
    low, high = code_range(fmt, symmetric)
    if symmetric:
        scales = (blocks.abs().amax(dim=-1) / high).to(torch.float32)
        zeros = None
        zero64 = torch.zeros_like(scales, dtype=torch.float64)
    else:
        lo = blocks.amin(dim=-1).clamp(max=0.0)  # the range holds 0, so a zero weight stays exactly 0
        hi = blocks.amax(dim=-1).clamp(min=0.0)
        scales = ((hi - lo) / (high - low)).to(torch.float32)
        safe = torch.where(scales == 0, torch.ones_like(scales), scales).to(torch.float64)
        zeros = torch.round(-lo / safe).clamp(low, high)
        zero64 = zeros
    safe = torch.where(scales == 0, torch.ones_like(scales), scales).to(torch.float64)
    codes = (torch.round(blocks / safe.unsqueeze(-1)) + zero64.unsqueeze(-1)).clamp(low, high).reshape(*lead, n, k)
    out: dict[str, torch.Tensor] = {SCALES: scales}
    if fmt == QuantFormat.INT4:
        stored = codes + (implicit_zero(fmt) if symmetric else 0)
        out[QWEIGHT] = pack_int4(stored.to(torch.uint8))
    else:
        out[QWEIGHT] = codes.to(torch.int8 if symmetric else torch.uint8)
    if zeros is not None:
        out[ZEROS] = zeros.to(torch.uint8)
    return out


# ------------------------------------------------------------------------------------------------
# which weights: roles by consumer


_ATTENTION_OPS = (OpCode.ATTENTION, OpCode.MLA_ATTENTION, OpCode.CACHED_ATTENTION, OpCode.CACHED_MLA_ATTENTION)
_FFN_PORTS = ("w_up", "w_down", "w_gate")


def _roles_of_use(node: Node, port: str) -> set[str]:
    if node.op in (OpCode.GROUPED_FFN, OpCode.FUSED_MOE) and port in _FFN_PORTS:
        return {"routed_experts"}
    if node.op == OpCode.FFN and port in _FFN_PORTS:
        # a layer's shared experts are `shared.<i>` (`layers.3.moe.shared.0`), a model's dense FFNs `layers.0.ffn`
        return {"shared_experts" if ".shared" in f".{node.name}" else "dense_ffn"}
    if node.op in _ATTENTION_OPS and port.startswith("w_"):
        return {"attention"}
    if node.op == OpCode.EMBEDDING and port == "weight":
        return {"embeddings"}
    if node.op == OpCode.LINEAR and port == "w" and node.name == "lm_head":
        return {"head"}
    return set()


def weight_roles(graph: Graph) -> dict[str, set[str]]:
    """Weight name -> the roles (QuantizedWeights field names) of its uses; weights with no role are absent.
    A weight read through CONCAT (a fusion pass) takes the roles of the concatenation's uses."""
    from .ir import op_def

    roles: dict[str, set[str]] = {}
    for node in graph.nodes:
        ports = [p.name for p in op_def(node.op).inputs]
        for i, value in enumerate(node.inputs):
            if value is None or value.kind not in (ValueKind.PARAM, ValueKind.BUFFER):
                continue
            port = ports[min(i, len(ports) - 1)]
            found = _roles_of_use(node, port)
            if node.op == OpCode.CONCAT:
                for user in graph.users(node.outputs[0]):
                    uport = [p.name for p in op_def(user.op).inputs]
                    for j, v in enumerate(user.inputs):
                        if v is node.outputs[0]:
                            found |= _roles_of_use(user, uport[min(j, len(uport) - 1)])
            if found:
                roles.setdefault(value.name, set()).update(found)
    return roles


def selected_weights(graph: Graph, which: QuantizedWeights) -> list[str]:
    wanted = {f.name for f in dataclasses.fields(which) if getattr(which, f.name)}
    return [name for name, roles in weight_roles(graph).items()
            if roles & wanted and graph.weights[name].type.rank >= 2 and graph.weights[name].type.dtype.is_float]


# ------------------------------------------------------------------------------------------------
# the graph rewrite and its weights


def quantize_graph(graph: Graph, config: QuantizationSpec) -> list[str]:
    """Replace each selected float weight W by its stored parts and a DEQUANTIZE node that every former use
    of W reads; returns the names of the weights replaced. Every selected weight's layout is checked first,
    so a block that does not divide some weight changes nothing (one error naming the tensor)."""
    names = selected_weights(graph, config.weights)
    block = config.block
    for name in names:
        problem = layout_problem(name, config.format, block, graph.weights[name].type.shape)
        if problem:
            raise IRError(problem)
    for name in names:
        old = graph.weights[name]
        shape = tuple(int(d) for d in old.type.shape)
        q = graph.add_weight(part_name(name, QWEIGHT), qweight_type(config.format, config.symmetric, shape),
                             trainable=False)
        s = graph.add_weight(part_name(name, SCALES),
                             TensorType(scales_shape(config.format, block, shape), ElemType.FLOAT32), trainable=False)
        z = None
        if not config.symmetric and config.format != QuantFormat.FP8_E4M3:
            z = graph.add_weight(part_name(name, ZEROS), TensorType(scales_shape(config.format, block, shape),
                                                                    ElemType.UINT8), trainable=False)
        node = graph.add_node(OpCode.DEQUANTIZE, [q, s, z],
                              {"format": QuantFormat(config.format), "block": block, "dtype": old.type.dtype},
                              name=part_name(name, "dequantize"), output_names=[part_name(name, "dequantized")])
        graph.replace_uses(old, node.outputs[0])
        graph.remove_weight(old)
    if names:
        graph.meta["quantization"] = f"{config.format.value}:{block}{'' if config.symmetric else ':asym'}"
    return names


def dequantize_nodes(graph: Graph) -> list[Node]:
    return graph.find(OpCode.DEQUANTIZE)


def source_weight(node: Node) -> str:
    """The float weight a DEQUANTIZE node stands for (its qweight's name without the part)."""
    return node.inputs[0].name.rsplit(".", 1)[0]


def dequantized_type(node: Node) -> TensorType:
    return node.outputs[0].type


def is_quantized(graph: Graph) -> bool:
    return bool(dequantize_nodes(graph))


def quantized_formats(graph: Graph) -> set[QuantFormat]:
    return {n.attrs["format"] for n in dequantize_nodes(graph)}


def quantize_weights(graph: Graph, float_weights: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """The weights of a quantized graph from the float weights of the graph it was made from: every
    DEQUANTIZE node's source weight quantized with the node's format and block, the rest as given."""
    out = {name: t for name, t in float_weights.items() if name in graph.weights}
    for node in dequantize_nodes(graph):
        src = source_weight(node)
        if src not in float_weights:
            raise WeightsError(f"no float weight {src} to quantize for {node.name}")
        symmetric = node.inputs[2] is None
        parts = quantize(float_weights[src], node.attrs["format"], node.attrs["block"], symmetric, name=src)
        for part, tensor in parts.items():
            out[part_name(src, part)] = tensor
    return out


def float_weights_of(graph: Graph, weights: Mapping[str, "torch.Tensor"], *,
                     dtype: "torch.dtype | None" = None) -> dict[str, "torch.Tensor"]:
    """The inverse direction: the float weights a quantized graph computes with (each DEQUANTIZE node's source
    weight dequantized, in its declared dtype or `dtype`), the other weights as given; for comparisons with
    float models."""
    out = {name: t for name, t in weights.items() if not _is_part(graph, name)}
    for node in dequantize_nodes(graph):
        args = [None if v is None else weights[v.name] for v in node.inputs]
        scales = args[1].to(dtype or torch.float32)
        out[source_weight(node)] = dequantize(args[0], scales, args[2], node.attrs["format"],
                                              node.attrs["block"]).to(dtype or node.attrs["dtype"].torch)
    return out


def _is_part(graph: Graph, name: str) -> bool:
    return any(v is not None and v.name == name for n in dequantize_nodes(graph) for v in n.inputs)


def check_quantized_values(graph: Graph, weights: Mapping[str, "torch.Tensor"], where: str = "") -> None:
    """Scales must be finite (a NaN scale would poison every weight of its block) and codes in range
    (a zero point above 15 in an int4 layout); one WeightsError naming the tensor."""
    at = f"{where}: " if where else ""
    for node in dequantize_nodes(graph):
        q, s, z = node.inputs
        scales = weights[s.name]
        if not bool(torch.isfinite(scales).all()):
            raise WeightsError(f"{at}tensor {s.name} holds non-finite scales; scales must be finite")
        if z is not None and node.attrs["format"] == QuantFormat.INT4 and int(weights[z.name].max()) > 15:
            raise WeightsError(f"{at}tensor {z.name} holds zero points above 15; int4 zero points are 0..15")
        if weights[q.name].dtype != q.type.dtype.torch:
            raise WeightsError(f"{at}tensor {q.name} has dtype {str(weights[q.name].dtype).removeprefix('torch.')}, "
                               f"expected {str(q.type.dtype.torch).removeprefix('torch.')}")


# ------------------------------------------------------------------------------------------------
# the error report of a quantization (build prints it)


@dataclasses.dataclass(frozen=True)
class TensorError:
    name: str
    shape: tuple[int, ...]
    max_abs: float      # max |W - dequantize(quantize(W))|
    rms: float          # root mean square of the error
    relative: float     # ||error|| / ||W|| (Frobenius)
    float_bytes: int
    stored_bytes: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def quantization_errors(graph: Graph, float_weights: Mapping[str, "torch.Tensor"],
                        quantized: Mapping[str, "torch.Tensor"]) -> list[TensorError]:
    """Per quantized tensor: how far its dequantized value is from the float one, and the bytes saved."""
    rows = []
    for node in dequantize_nodes(graph):
        src = source_weight(node)
        w = float_weights[src].detach().to(torch.float64)
        args = [None if v is None else quantized[v.name] for v in node.inputs]
        err = dequantize(args[0], args[1].to(torch.float64), args[2], node.attrs["format"], node.attrs["block"]) - w
        norm = float(w.norm())
        stored = sum(a.numel() * a.element_size() for a in args if a is not None)
        rows.append(TensorError(src, tuple(w.shape), float(err.abs().max()) if err.numel() else 0.0,
                                float(err.pow(2).mean().sqrt()) if err.numel() else 0.0,
                                float(err.norm()) / norm if norm else 0.0,
                                float_weights[src].numel() * float_weights[src].element_size(), stored))
    return rows


def error_table(rows: list[TensorError]) -> str:
    if not rows:
        return "no tensor is quantized"
    width = max(len(r.name) for r in rows)
    lines = [f"{'tensor':{width}}  {'max abs':>10}  {'rms':>10}  {'relative':>9}  {'bytes':>17}"]
    for r in rows:
        lines.append(f"{r.name:{width}}  {r.max_abs:10.3e}  {r.rms:10.3e}  {r.relative:9.2e}  "
                     f"{r.float_bytes:>8,}->{r.stored_bytes:<8,}")
    total_f = sum(r.float_bytes for r in rows)
    total_s = sum(r.stored_bytes for r in rows)
    lines.append(f"{'total':{width}}  {'':10}  {'':10}  {'':9}  {total_f:>8,}->{total_s:<8,} "
                 f"({total_f / max(total_s, 1):.2f}x smaller)")
    return "\n".join(lines)


def with_quantization(spec, config: QuantizationSpec | None):
    """A layer or model spec with its `quantization:` section replaced (None: the float spec)."""
    return dataclasses.replace(spec, quantization=config)


def load_quantized_weights(path, graph: Graph, float_graph: Graph, *, notes: list[str] | None = None):
    """(weights of the quantized `graph`, float weights or None) from a safetensors file holding either: the
    quantized parts (`*.qweight`, as build writes them), taken as they are, or the float weights of
    `float_graph` (the same spec unquantized), which are quantized here (and returned too, for reports)."""
    from safetensors import safe_open

    from .params import load_weights

    try:
        with safe_open(str(path), framework="pt") as f:
            quantized = any(k.endswith("." + QWEIGHT) for k in f.keys())
    except Exception:  # unreadable: load_weights says why, in its words
        quantized = True
    if quantized:
        return load_weights(path, graph, notes=notes), None
    float_weights = load_weights(path, float_graph, notes=notes)
    return quantize_weights(graph, float_weights), float_weights


# ------------------------------------------------------------------------------------------------
# what quantization costs: the quantized model against the float one it came from


@dataclasses.dataclass(frozen=True)
class QuantizationAccuracy:
    """The quantized model's outputs against the float model's on the same input (both in the float64
    reference). `output` is `out` (a layer) or `logits` (a model); top-1 agreement and KL(float || quantized)
    of the next-token distribution are for models; routing changes count (token, MoE layer) pairs whose
    chosen expert set differs."""

    output: str
    max_abs: float
    mean_abs: float
    relative: float
    routing_changed: int
    routing_units: int
    top1_agree: float | None = None
    kl_mean: float | None = None
    kl_max: float | None = None
    scheme: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_table(self) -> str:
        parts = [f"quantized ({self.scheme}) vs float: {self.output} max abs {self.max_abs:.3e}, mean abs "
                 f"{self.mean_abs:.3e}, relative {self.relative:.3e}"]
        if self.top1_agree is not None:
            parts.append(f"top-1 agreement {self.top1_agree * 100:.1f}%, KL(float||quantized) mean {self.kl_mean:.3e} "
                         f"max {self.kl_max:.3e} nats")
        parts.append(f"routing changed for {self.routing_changed}/{self.routing_units} (token, layer) pairs")
        return "; ".join(parts)


def compare_outputs(output: str, float_out: "torch.Tensor", quant_out: "torch.Tensor",
                    float_routes: list["torch.Tensor"], quant_routes: list["torch.Tensor"], *,
                    scheme: str = "") -> QuantizationAccuracy:
    """The numbers of QuantizationAccuracy from the two runs' outputs: `float_out`/`quant_out` (logits
    [..., V] when output is `logits`), and the chosen experts [T, k] of each MoE layer in both runs."""
    f, q = float_out.double(), quant_out.double()
    diff = (q - f).abs()
    norm = float(f.norm())
    changed = units = 0
    for a, b in zip(float_routes, quant_routes):
        same = (a.sort(dim=-1).values == b.sort(dim=-1).values).all(dim=-1)
        changed += int((~same).sum())
        units += same.numel()
    top1 = kl_mean = kl_max = None
    if output == "logits":
        f2, q2 = f.reshape(-1, f.shape[-1]), q.reshape(-1, q.shape[-1])
        top1 = float((f2.argmax(-1) == q2.argmax(-1)).double().mean())
        logp, logq = torch.log_softmax(f2, -1), torch.log_softmax(q2, -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        kl_mean, kl_max = float(kl.mean()), float(kl.max())
    return QuantizationAccuracy(output, float(diff.max()) if diff.numel() else 0.0,
                                float(diff.mean()) if diff.numel() else 0.0,
                                float((q - f).norm()) / norm if norm else 0.0,
                                changed, units, top1, kl_mean, kl_max, scheme)


def accuracy_report(float_graph: Graph, float_weights: Mapping[str, "torch.Tensor"], graph: Graph,
                    weights: Mapping[str, "torch.Tensor"],
                    inputs: Mapping[str, "torch.Tensor"]) -> QuantizationAccuracy:
    """Both graphs in the float64 reference on `inputs`, compared (`compare_outputs`). Each graph must output
    its routing (`expert_idx` of a layer, `layers.<i>.expert_idx` of a model built with routing=True)."""
    from .interpreter import interpret

    ref = interpret(float_graph, inputs, float_weights, dtype=torch.float64)
    got = interpret(graph, inputs, weights, dtype=torch.float64)
    output = "logits" if "logits" in ref else "out"
    keys = sorted(k for k in ref if k.endswith("expert_idx"))
    return compare_outputs(output, ref[output], got[output], [ref[k] for k in keys], [got[k] for k in keys],
                           scheme=graph.meta.get("quantization", ""))


def parse_quantize_option(text: str, *, symmetric: bool = True) -> QuantizationSpec:
    """`--quantize FORMAT[:BLOCK][:asym]` (int8, int4:32, int4:128:asym) -> the spec section it stands for
    (routed and shared experts, the section's default weights)."""
    parts = text.strip().split(":")
    try:
        fmt = QuantFormat(parts[0])
    except ValueError:
        raise ValueError(f"--quantize {text}: unknown format '{parts[0]}'; choose one of "
                         f"{', '.join(f.value for f in QuantFormat)} (e.g. int4:32)") from None
    block = 128 if fmt == QuantFormat.FP8_E4M3 else 32
    for extra in parts[1:]:
        if extra == "asym":
            symmetric = False
        elif extra.isdigit() and int(extra) >= 16 and int(extra) <= 1024 and not int(extra) & (int(extra) - 1):
            block = int(extra)
        else:
            raise ValueError(f"--quantize {text}: '{extra}' is neither a block size (a power of two, 16..1024) "
                             f"nor 'asym'")
    if fmt == QuantFormat.FP8_E4M3 and not symmetric:
        raise ValueError(f"--quantize {text}: fp8_e4m3 has no zero points")
    return QuantizationSpec(format=fmt, block=block, symmetric=symmetric)


__all__ = ["QWEIGHT", "SCALES", "ZEROS", "QuantizationAccuracy", "TensorError", "accuracy_report", "compare_outputs",
           "load_quantized_weights", "with_quantization", "check_quantized_values", "code_range", "dequantize",
           "dequantize_nodes", "error_table", "float_weights_of", "is_quantized", "layout_problem", "pack_int4",
           "parse_quantize_option", "part_name", "quantization_errors", "quantize", "quantize_graph",
           "quantize_weights", "quantized_formats", "selected_weights", "source_weight", "unpack_int4",
           "weight_roles"]
