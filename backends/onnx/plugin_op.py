"""The contract of the custom MoE op shared by the ONNX `plugin` flavour and the TensorRT plugin.

One node `moe_ir::FusedMoE` (ONNX domain "moe_ir", op_type "FusedMoE"; TensorRT plugin name
"moe_ir::FusedMoE") computes the routed path of a layer: router projection, score, (group-limited) top-k
on score + bias, weight normalisation and scaling, expert FFNs, weighted combine. Shared experts stay
ordinary ops beside it.

Inputs (weights enter as inputs, i.e. ONNX initializers, not plugin fields: TensorRT keeps initializers
as typed, refittable engine weights and can give them fp16/bf16 types, while plugin fields would be
copied into every serialised plugin blob and could not be refitted):
  0 x          [T, H]       activation dtype
  1 w_router   [E, H]       router dtype (float32)
  2 bias       [E]          float32; zeros when the spec has no aux-loss-free bias (one fixed signature
                            keeps the TensorRT shape logic and the AOT kernel free of optional inputs)
  3 w_gate_up  [E, 2F, H]   gated activations: gate rows then up rows; non-gated: w_up [E, F, H]
  4 w_down     [E, H, F]
Outputs:
  0 out        [T, H]       dtype of x
  1 expert_idx [T, k]       int32 (TensorRT's native index type)
  2 weights    [T, k]       float32 (after normalisation and scaling)
Attributes are integers and floats only (what TensorRT AOT plugins and onnxruntime-extensions accept):
  score_fn (0 softmax, 1 sigmoid), top_k, n_group, topk_group, group_score (0 max, 1 top2_sum),
  normalize (0/1), scale (float), activation (0 swiglu, 1 geglu, 2 gelu, 3 relu).
Not expressible (a backend's supports() says so): expert biases, capacity dropping, router noise,
expert-choice routing.

Quantized routed experts: `moe_ir::QFusedMoE` (op_type "QFusedMoE", same domain, outputs and attributes, plus
the quantization attributes) takes the stored parts of the fused gate/up weight and of the down weight, laid
out as moe_ir.quantization stores them (fuse-gate-up-quantized concatenates the gate and up parts along the
rows), instead of float weights. A second op, not optional inputs of the first: TensorRT's Python plugins and
onnxruntime-extensions' ops each have one fixed input signature.
  3 w_gate_up_codes   [E, 2F, H*bits/8]   int8: the stored bytes (int4: two codes a byte, the even column in
                                          the low nibble; uint8 codes reinterpreted as int8, bit for bit)
  4 w_gate_up_scales  [E, 2F, H/block]    float32
  5 w_gate_up_zeros   [E, 2F, H/block]    int8 (uint8 zero points, bit for bit); symmetric: [1] holding the
                                          format's implicit zero point (int4 8, int8 0), one fixed signature
                                          as for `bias`
  6..8 w_down_codes, w_down_scales, w_down_zeros  likewise for w_down [E, H, F]
Codes travel as int8 because TensorRT plugins take no uint8 tensors (PluginTensorDesc: kUINT8 unsupported).
Quantization attributes: quant_format (0 int8, 1 int4), bits (8, 4: the format's, checked), block (a power
of two, 16..256: whole bytes of int4 codes per block), symmetric (0/1). Weight = (code - zero) * scale per
block of `block` input columns, exactly the IR's DEQUANTIZE. fp8_e4m3 tiles are not expressible.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from moe_ir.errors import BackendError
from moe_ir.ir import ElemType, Node, OpCode, Value, WeightLayout
from moe_ir.spec import Activation, GroupScore, QuantFormat, ScoreFn

DOMAIN = "moe_ir"
OP_TYPE = "FusedMoE"
PLUGIN_NAME = f"{DOMAIN}::{OP_TYPE}"
INPUT_NAMES = ("x", "w_router", "bias", "w_gate_up", "w_down")
OUTPUT_NAMES = ("out", "expert_idx", "weights")

QUANT_OP_TYPE = "QFusedMoE"
QUANT_PLUGIN_NAME = f"{DOMAIN}::{QUANT_OP_TYPE}"
QUANT_INPUT_NAMES = ("x", "w_router", "bias", "w_gate_up_codes", "w_gate_up_scales", "w_gate_up_zeros",
                     "w_down_codes", "w_down_scales", "w_down_zeros")

SCORE_CODES = {ScoreFn.SOFTMAX: 0, ScoreFn.SIGMOID: 1}
GROUP_SCORE_CODES = {GroupScore.MAX: 0, GroupScore.TOP2_SUM: 1}
ACTIVATION_CODES = {Activation.SWIGLU: 0, Activation.GEGLU: 1, Activation.GELU: 2, Activation.RELU: 3}
QUANT_FORMAT_CODES = {QuantFormat.INT8: 0, QuantFormat.INT4: 1}
QUANT_BITS = {QuantFormat.INT8: 8, QuantFormat.INT4: 4}
QUANT_BLOCKS = (16, 32, 64, 128, 256)
QUANT_ATTRIBUTE_NAMES = ("quant_format", "bits", "block", "symmetric")


@dataclass(frozen=True)
class FusedMoEAttrs:
    score_fn: ScoreFn
    top_k: int
    n_group: int
    topk_group: int
    group_score: GroupScore
    normalize: bool
    scale: float
    activation: Activation

    def encode(self) -> dict[str, int | float]:
        """The node's attributes as ONNX/TensorRT plugin fields (ints and floats only)."""
        return {"score_fn": SCORE_CODES[self.score_fn], "top_k": self.top_k, "n_group": self.n_group,
                "topk_group": self.topk_group, "group_score": GROUP_SCORE_CODES[self.group_score],
                "normalize": int(self.normalize), "scale": float(self.scale),
                "activation": ACTIVATION_CODES[self.activation]}

    @classmethod
    def decode(cls, fields: Mapping[str, Any]) -> "FusedMoEAttrs":
        """Inverse of encode; an unknown code or a missing field is a BackendError naming it."""
        def code(table: Mapping[Any, int], key: str):
            inverse = {v: k for k, v in table.items()}
            value = int(_field(fields, key))
            if value not in inverse:
                raise BackendError(f"{PLUGIN_NAME}: attribute {key}={value} is not one of {sorted(inverse)}")
            return inverse[value]

        return cls(score_fn=code(SCORE_CODES, "score_fn"), top_k=int(_field(fields, "top_k")),
                   n_group=int(_field(fields, "n_group")), topk_group=int(_field(fields, "topk_group")),
                   group_score=code(GROUP_SCORE_CODES, "group_score"),
                   normalize=bool(int(_field(fields, "normalize"))), scale=float(_field(fields, "scale")),
                   activation=code(ACTIVATION_CODES, "activation"))

    @classmethod
    def from_node(cls, node: Node) -> "FusedMoEAttrs":
        ok, reason = plugin_supports(node)
        if not ok:
            raise BackendError(reason)
        a = node.attrs
        return cls(score_fn=a["score"], top_k=a["k"], n_group=a["groups"], topk_group=a["kept"],
                   group_score=a["group_score"], normalize=a["normalize"], scale=a["scale"],
                   activation=a["activation"])


def _field(fields: Mapping[str, Any], key: str) -> Any:
    if key not in fields:
        raise BackendError(f"{PLUGIN_NAME}: missing attribute '{key}'")
    return fields[key]


@dataclass(frozen=True)
class QuantAttrs:
    """The quantization attributes of a QFusedMoE node: one format, block and zero-point rule for both weights."""

    format: QuantFormat
    block: int
    symmetric: bool

    @property
    def bits(self) -> int:
        return QUANT_BITS[self.format]

    def encode(self) -> dict[str, int]:
        return {"quant_format": QUANT_FORMAT_CODES[self.format], "bits": self.bits, "block": self.block,
                "symmetric": int(self.symmetric)}

    @classmethod
    def decode(cls, fields: Mapping[str, Any]) -> "QuantAttrs":
        """Inverse of encode; an unknown format, bits that are not the format's, a block outside QUANT_BLOCKS or
        a symmetric flag other than 0/1 is a BackendError naming the attribute."""
        inverse = {v: k for k, v in QUANT_FORMAT_CODES.items()}
        code = int(_field(fields, "quant_format"))
        if code not in inverse:
            raise BackendError(f"{QUANT_PLUGIN_NAME}: attribute quant_format={code} is not one of "
                               f"{', '.join(f'{v} ({k.value})' for k, v in QUANT_FORMAT_CODES.items())}")
        fmt = inverse[code]
        bits, block, symmetric = (int(_field(fields, k)) for k in ("bits", "block", "symmetric"))
        if bits != QUANT_BITS[fmt]:
            raise BackendError(f"{QUANT_PLUGIN_NAME}: attribute bits={bits} does not match quant_format "
                               f"{fmt.value} ({QUANT_BITS[fmt]} bits)")
        if block not in QUANT_BLOCKS:
            raise BackendError(f"{QUANT_PLUGIN_NAME}: attribute block={block} is not one of "
                               f"{', '.join(map(str, QUANT_BLOCKS))}")
        if symmetric not in (0, 1):
            raise BackendError(f"{QUANT_PLUGIN_NAME}: attribute symmetric={symmetric} must be 0 or 1")
        return cls(fmt, block, bool(symmetric))


def quantized_parts(node: Node) -> dict[str, tuple[Value, Value, Value | None]] | None:
    """{"w_gate_up": (codes, scales, zeros or None), "w_down": ...}: the stored parts the QFusedMoE node reads
    (the inputs of the DEQUANTIZE nodes behind the FUSED_MOE's expert weights); None for float experts."""
    up, down = node.input("w_up"), node.input("w_down")
    if not _dequantized(up) and not _dequantized(down):
        return None
    return {"w_gate_up": tuple(up.producer.inputs) if _dequantized(up) else None,
            "w_down": tuple(down.producer.inputs) if _dequantized(down) else None}


def quantized_inputs(node: Node) -> list[tuple[str, Value | None]]:
    """QUANT_INPUT_NAMES[3:] paired with the IR values that feed them (zero points None when symmetric): the
    order in which an emitter passes a quantized FUSED_MOE node's stored parts."""
    parts = quantized_parts(node)
    values = [*parts["w_gate_up"], *parts["w_down"]]
    return list(zip(QUANT_INPUT_NAMES[3:], values))


def quant_attrs_of(node: Node) -> QuantAttrs:
    """The QuantAttrs of a quantized FUSED_MOE node (plugin_supports must hold)."""
    a = node.input("w_down").producer.attrs
    return QuantAttrs(a["format"], a["block"], node.input("w_down").producer.inputs[2] is None)


def _dequantized(value: Value | None) -> bool:
    return value is not None and value.producer is not None and value.producer.op == OpCode.DEQUANTIZE


def quantized_refusal(node: Node) -> str:
    """Why the expert weights of a FUSED_MOE node are not what QFusedMoE takes ('' when they are, or are float)."""
    up, down = node.input("w_up"), node.input("w_down")
    if not _dequantized(up) and not _dequantized(down):
        return ""
    if not (_dequantized(up) and _dequantized(down)):
        return (f"{QUANT_PLUGIN_NAME} takes both expert weights quantized (w_up/w_gate and w_down); "
                f"quantize all of the routed experts or none")
    if node.input("w_gate") is not None:
        return f"{QUANT_PLUGIN_NAME} takes quantized gate/up fused; run fuse-gate-up-quantized before lowering"
    gu, dn = up.producer, down.producer
    for dq in (gu, dn):
        fmt = dq.attrs["format"]
        if fmt not in QUANT_FORMAT_CODES:
            return (f"{dq.name}: {fmt.value} storage does not fit {QUANT_PLUGIN_NAME} (it takes "
                    f"{', '.join(f.value for f in QUANT_FORMAT_CODES)} blocks); import the checkpoint dequantized "
                    f"or quantize it to int8/int4")
        if dq.attrs["block"] not in QUANT_BLOCKS:
            return (f"{dq.name}: block {dq.attrs['block']} does not fit {QUANT_PLUGIN_NAME} (blocks "
                    f"{', '.join(map(str, QUANT_BLOCKS))})")
        if dq.attrs["dtype"] != node.inputs[0].type.dtype:
            return (f"{dq.name}: dequantizes to {dq.attrs['dtype'].value}, the layer computes in "
                    f"{node.inputs[0].type.dtype.value}")
        if dq.inputs[1].type.dtype != ElemType.FLOAT32:
            return f"{QUANT_PLUGIN_NAME} takes float32 scales ({dq.inputs[1].name} is {dq.inputs[1].type.dtype.value})"
    if (gu.attrs["format"], gu.attrs["block"], gu.inputs[2] is None) != \
            (dn.attrs["format"], dn.attrs["block"], dn.inputs[2] is None):
        return (f"{QUANT_PLUGIN_NAME} takes one format, block and zero-point rule for both expert weights "
                f"({gu.name} and {dn.name} differ)")
    return ""


def plugin_supports(node: Node) -> tuple[bool, str]:
    """Whether a FUSED_MOE node fits the plugin contract (float experts: FusedMoE; int8/int4 experts:
    QFusedMoE), with the reason when it does not."""
    if node.op != OpCode.FUSED_MOE:
        return False, f"node {node.name} is {node.op.value}, not fused_moe"
    a = node.attrs
    reason = quantized_refusal(node)
    if reason:
        return False, reason
    if any(node.input(b) is not None for b in ("b_up", "b_down", "b_gate")):
        return False, f"{PLUGIN_NAME} has no expert biases (spec experts.bias: true)"
    if a["activation"] not in ACTIVATION_CODES:
        return False, (f"{PLUGIN_NAME} implements {', '.join(act.value for act in ACTIVATION_CODES)}, not "
                       f"{a['activation'].value}")
    if a["capacity_factor"] is not None:
        return False, f"{PLUGIN_NAME} is dropless; capacity factor {a['capacity_factor']} is not supported"
    if a["activation"].gated and a["weight_layout"] != WeightLayout.GATE_UP_FUSED:
        return False, f"{PLUGIN_NAME} takes gate/up fused weights; run fuse-gate-up before lowering"
    return True, ""


def output_shapes(x_shape: tuple, w_router_shape: tuple, top_k: int) -> tuple[tuple, tuple, tuple]:
    """Shape logic of the op (what the TensorRT plugin's shape function must give): out [T,H],
    expert_idx [T,k], weights [T,k]. Dims may be ints or symbolic expressions."""
    if len(x_shape) != 2 or len(w_router_shape) != 2:
        raise BackendError(f"{PLUGIN_NAME}: x must be [T,H] and w_router [E,H], got {x_shape} and {w_router_shape}")
    t = x_shape[0]
    return (t, x_shape[1]), (t, top_k), (t, top_k)


def stored_shapes(experts: int, rows: int, cols: int, quant: QuantAttrs) -> dict[str, tuple[int, ...]]:
    """The shapes of a [E, rows, cols] weight's stored parts in the contract (codes, scales, zero points)."""
    blocks = (experts, rows, cols // quant.block)
    return {"codes": (experts, rows, cols * quant.bits // 8), "scales": blocks,
            "zeros": (1,) if quant.symmetric else blocks}


def check_quantized_shapes(shapes: Mapping[str, tuple], quant: QuantAttrs, gated: bool) -> tuple[int, int, int]:
    """Check the QFusedMoE inputs' shapes (by QUANT_INPUT_NAMES) against each other and the attributes; return
    (E, H, F). A mismatch is a BackendError naming the input, its shape and the expected one."""
    for name, rank in (("x", 2), ("w_router", 2), ("bias", 1)):
        if len(shapes[name]) != rank:
            raise BackendError(f"{QUANT_PLUGIN_NAME}: input {name} must have rank {rank}, got {tuple(shapes[name])}")
    experts, hidden = (int(d) for d in shapes["w_router"])
    codes = tuple(int(d) for d in shapes["w_down_codes"])
    if len(codes) != 3:
        raise BackendError(f"{QUANT_PLUGIN_NAME}: input w_down_codes must be [E, H, F*bits/8], got {codes}")
    width = codes[2] * 8 // quant.bits
    undivided = [f"{what} {dim}" for what, dim in (("the hidden size", hidden), ("the expert width", width))
                 if dim % quant.block]
    if undivided:
        raise BackendError(f"{QUANT_PLUGIN_NAME}: attribute block={quant.block} does not divide "
                           f"{' nor '.join(undivided)}")
    want = {"x": (shapes["x"][0], hidden), "bias": (experts,)}
    for prefix, rows, cols in (("w_gate_up", (2 if gated else 1) * width, hidden), ("w_down", hidden, width)):
        want.update({f"{prefix}_{part}": shape for part, shape in stored_shapes(experts, rows, cols, quant).items()})
    for name, shape in want.items():
        given = tuple(shapes[name])
        if len(given) != len(shape) or any(isinstance(g, int) and isinstance(w, int) and g != w
                                           for g, w in zip(given, shape)):  # symbolic dims (tokens) pass
            raise BackendError(f"{QUANT_PLUGIN_NAME}: input {name} has shape {tuple(shapes[name])}, expected "
                               f"{tuple(shape)} (E={experts}, H={hidden}, F={width}, {quant.format.value} "
                               f"block {quant.block}{'' if quant.symmetric else ' with zero points'})")
    return experts, hidden, width
