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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from moe_ir.errors import BackendError
from moe_ir.ir import Node, OpCode, WeightLayout
from moe_ir.spec import Activation, GroupScore, ScoreFn

DOMAIN = "moe_ir"
OP_TYPE = "FusedMoE"
PLUGIN_NAME = f"{DOMAIN}::{OP_TYPE}"
INPUT_NAMES = ("x", "w_router", "bias", "w_gate_up", "w_down")
OUTPUT_NAMES = ("out", "expert_idx", "weights")

SCORE_CODES = {ScoreFn.SOFTMAX: 0, ScoreFn.SIGMOID: 1}
GROUP_SCORE_CODES = {GroupScore.MAX: 0, GroupScore.TOP2_SUM: 1}
ACTIVATION_CODES = {Activation.SWIGLU: 0, Activation.GEGLU: 1, Activation.GELU: 2, Activation.RELU: 3}


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


def plugin_supports(node: Node) -> tuple[bool, str]:
    """Whether a FUSED_MOE node fits the plugin contract, with the reason when it does not."""
    if node.op != OpCode.FUSED_MOE:
        return False, f"node {node.name} is {node.op.value}, not fused_moe"
    a = node.attrs
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
