"""The op registry: every op declared once, with its signature, attributes, shape/dtype inference and
reference semantics (torch) side by side.

The reference semantics are the oracle: the interpreter runs them, passes are checked by running them
before and after, and every backend is compared with them. They favour being obviously right over
being fast (a loop over experts, never a tokens x experts x hidden tensor).

Routing representation shared by all ops after routing: an *assignment* is one (token, expert) pair.
`dispatch` lists assignments sorted by expert as `rows` (token index of each row), `row_weights` (gate
weight of each row; 0 for dropped ones) and `group_sizes` (rows per expert). Dropped assignments sit at
the end, outside every group, so kernels skip them and shapes stay static (A = T*k), which keeps the
graph exportable with a dynamic token count.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from ..lazy import LazyModule

# Reference semantics import torch on first use: the declarations alone (inspect, graph) need none.
torch = LazyModule("torch")
F = LazyModule("torch.nn.functional")

from ..errors import IRError
from ..spec import Activation, DropRule, GroupScore, ScoreFn, capacity_per_expert
from .graph import Dim, ElemType, Node, TensorType


class OpCode(enum.StrEnum):
    FLATTEN_TOKENS = "flatten_tokens"
    RESTORE_TOKENS = "restore_tokens"
    LINEAR = "linear"
    ROUTER_NOISE = "router_noise"
    SCORE = "score"
    TOPK_ROUTE = "topk_route"
    SPARSEMIXER_ROUTE = "sparsemixer_route"
    SCALE_WEIGHTS = "scale_weights"
    DISPATCH = "dispatch"
    EXPERT_CHOICE_ROUTE = "expert_choice_route"
    GROUPED_FFN = "grouped_ffn"
    COMBINE = "combine"
    FFN = "ffn"
    SIGMOID_GATE = "sigmoid_gate"
    ADD = "add"
    CONCAT = "concat"
    BALANCE_LOSS = "balance_loss"
    FUSED_MOE = "fused_moe"
    DEQUANTIZE = "dequantize"  # a block-quantized weight's stored parts -> the float weight; quant_ops.py
    # Whole-model ops; declared in model_ops.py.
    EMBEDDING = "embedding"
    RMS_NORM = "rms_norm"
    LAYER_NORM = "layer_norm"
    ATTENTION = "attention"
    MLA_ATTENTION = "mla_attention"
    CACHED_ATTENTION = "cached_attention"          # the decode form of ATTENTION: past K/V in, present out
    CACHED_MLA_ATTENTION = "cached_mla_attention"  # the decode form of MLA_ATTENTION (expanded or latent cache)
    SCALE = "scale"                # x * factor (Granite's embedding, residual and logits multipliers)
    MOA_ATTENTION = "moa_attention"                # mixture of attention heads (JetMoE), prefill form
    CACHED_MOA_ATTENTION = "cached_moa_attention"  # its decode form: past K/V in, present out
    ADD_BIAS = "add_bias"          # y [..., H] + b [H] (JetMoE's MoE block output bias)


class WeightLayout(enum.StrEnum):
    SEPARATE = "separate"          # w_gate [.., F, H] and w_up [.., F, H]
    GATE_UP_FUSED = "gate_up_fused"  # w_up holds [.., 2F, H]: gate rows first, then up rows


class LossKind(enum.StrEnum):
    SWITCH = "switch"
    EXPERT = "expert"
    DEVICE = "device"
    SEQUENCE = "sequence"
    Z = "z_loss"


@dataclass(frozen=True)
class Attr:
    type: Any  # int, float, bool, an Enum class, tuple (of numbers), or a tuple of those (e.g. (float, type(None)))
    default: Any = ...  # ... = required
    doc: str = ""
    quiet: bool = False  # the text form leaves the attribute out while it holds its default

    def accepts(self, value: Any) -> bool:
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        for t in types:
            if t is type(None) and value is None:
                return True
            if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                return True
            if t is int and isinstance(value, int) and not isinstance(value, bool):
                return True
            if t is bool and isinstance(value, bool):
                return True
            if t is tuple and isinstance(value, tuple) and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                return True
            if isinstance(t, type) and issubclass(t, enum.Enum) and isinstance(value, t):
                return True
        return False


@dataclass(frozen=True)
class Port:
    name: str
    optional: bool = False
    variadic: bool = False  # takes all remaining operands (only as the last port)
    quiet: bool = False     # the text form leaves the operand out while it is absent (a port added later)


class OpDef:
    """Base of op declarations. Subclasses set the class attributes and override infer/reference."""

    opcode: ClassVar[OpCode]
    inputs: ClassVar[tuple[Port, ...]]
    output_names: ClassVar[tuple[str, ...]]
    attrs: ClassVar[Mapping[str, Attr]] = {}
    doc: ClassVar[str] = ""

    def input_index(self, name: str) -> int:
        for i, p in enumerate(self.inputs):
            if p.name == name:
                return i
        raise KeyError(f"{self.opcode.value} has no input {name!r}")

    def complete_attrs(self, given: Mapping[str, Any], node_name: str) -> dict[str, Any]:
        out = {}
        for key in given:
            if key not in self.attrs:
                raise IRError(f"{self.opcode.value} has no attribute {key!r}; it takes {sorted(self.attrs)}",
                              node=node_name)
        for key, spec in self.attrs.items():
            if key in given:
                value = given[key]
            elif spec.default is ...:
                raise IRError(f"{self.opcode.value} needs attribute {key!r}", node=node_name)
            else:
                value = spec.default
            if not spec.accepts(value):
                raise IRError(f"attribute {key}={value!r} has the wrong type for {self.opcode.value} "
                              f"(expected {spec.type})", node=node_name)
            out[key] = value
        return out

    def check_arity(self, node: Node) -> None:
        ports = self.inputs
        variadic = bool(ports) and ports[-1].variadic
        fixed = len(ports) - (1 if variadic else 0)
        n = len(node.inputs)
        if (variadic and n < fixed + 1) or (not variadic and n != len(ports)):
            raise IRError(f"{self.opcode.value} takes {'at least ' if variadic else ''}"
                          f"{fixed + (1 if variadic else 0)} operands "
                          f"({', '.join(p.name for p in ports)}), got {n}", node=node.name)
        for i, port in enumerate(ports[:fixed]):
            if node.inputs[i] is None and not port.optional:
                raise IRError(f"operand {port.name!r} of {self.opcode.value} is required", node=node.name)
        if variadic and any(v is None for v in node.inputs[fixed:]):
            raise IRError(f"variadic operands of {self.opcode.value} cannot be absent", node=node.name)

    def infer(self, node: Node) -> list[TensorType]:
        """Check operand types and return output types. Raises IRError naming the node."""
        self.check_arity(node)
        return self.infer_types(node, *[v.type if v is not None else None for v in node.inputs])

    def infer_types(self, node: Node, *types: TensorType | None) -> list[TensorType]:
        raise NotImplementedError

    def reference(self, attrs: Mapping[str, Any], *args: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


_REGISTRY: dict[OpCode, OpDef] = {}


def register(cls: type[OpDef]) -> type[OpDef]:
    _REGISTRY[cls.opcode] = cls()
    return cls


def op_def(op: OpCode | str) -> OpDef:
    try:
        return _REGISTRY[OpCode(op)]
    except (KeyError, ValueError):
        raise IRError(f"unknown op {op!r}; known ops: {', '.join(o.value for o in OpCode)}") from None


def all_ops() -> dict[OpCode, OpDef]:
    return dict(_REGISTRY)


# ------------------------------------------------------------------------------------------------
# type-checking helpers


def expect(cond: bool, node: Node, message: str) -> None:
    if not cond:
        raise IRError(message, node=node.name)


def expect_rank(t: TensorType, rank: int, node: Node, what: str) -> None:
    expect(t.rank == rank, node, f"{what} must have rank {rank}, found {t}")


def expect_float(t: TensorType, node: Node, what: str) -> None:
    expect(t.dtype.is_float, node, f"{what} must be floating point, found {t}")


def _dims_match(a: Dim, b: Dim) -> bool:
    # Symbolic dims are only compared with equal symbols; a static dim never equals a symbol.
    return a == b


def expect_dim(a: Dim, b: Dim, node: Node, what: str) -> None:
    expect(_dims_match(a, b), node, f"{what}: dimension {a} does not match {b}")


def _check_topk_attrs(node: Node, e: Dim) -> None:
    """k, groups and kept of a top-k routing node (topk_route, fused_moe) against its expert count e."""
    a = node.attrs
    expect(1 <= a["k"] <= (e if isinstance(e, int) else a["k"]), node, f"k={a['k']} exceeds {e} experts")
    if a["groups"] > 1:
        expect(isinstance(e, int) and e % a["groups"] == 0, node, f"{a['groups']} groups must divide {e} experts")
        expect(1 <= a["kept"] <= a["groups"], node, f"kept={a['kept']} must be in 1..{a['groups']}")
        expect(a["kept"] * (e // a["groups"]) >= a["k"], node, "kept groups hold fewer than k experts")


# ------------------------------------------------------------------------------------------------
# activation and FFN math shared by the FFN-like ops


def activate(activation: Activation, gate: torch.Tensor | None, up: torch.Tensor,
             clamp: tuple[float, float] | None = None) -> torch.Tensor:
    """The expert nonlinearity; `gate` is None for the non-gated activations; `clamp` is (alpha, limit) of
    clamped_swiglu (gpt-oss)."""
    if activation == Activation.CLAMPED_SWIGLU:
        alpha, limit = clamp
        gate = gate.clamp(max=limit)
        return (up.clamp(-limit, limit) + 1) * gate * torch.sigmoid(alpha * gate)
    if activation == Activation.SWIGLU:
        return F.silu(gate) * up
    if activation == Activation.GEGLU:
        return F.gelu(gate) * up
    if activation == Activation.GELU:
        return F.gelu(up)
    return F.relu(up)


def ffn_math(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, w_gate: torch.Tensor | None,
             b_up: torch.Tensor | None, b_down: torch.Tensor | None, b_gate: torch.Tensor | None,
             activation: Activation, layout: WeightLayout, clamp: tuple[float, float] | None = None) -> torch.Tensor:
    """One FFN on rows x [n, H]; weights are [F, H] / [H, F] (PyTorch Linear layout)."""
    if activation.gated and layout == WeightLayout.GATE_UP_FUSED:
        gate_up = F.linear(x, w_up, b_up)
        gate, up = gate_up.chunk(2, dim=-1)
    else:
        up = F.linear(x, w_up, b_up)
        gate = F.linear(x, w_gate, b_gate) if activation.gated else None
    return F.linear(activate(activation, gate, up, clamp), w_down, b_down)


def clamp_of(attrs: Mapping[str, Any]) -> tuple[float, float] | None:
    """(alpha, limit) of an FFN-like node's clamped_swiglu, None for the other activations."""
    if attrs["activation"] != Activation.CLAMPED_SWIGLU:
        return None
    return attrs["clamp_alpha"], attrs["clamp_limit"]


def _check_clamp(node: Node) -> None:
    a = node.attrs
    clamped = a["activation"] == Activation.CLAMPED_SWIGLU
    given = a["clamp_alpha"] is not None and a["clamp_limit"] is not None
    expect(clamped == given and (a["clamp_alpha"] is None) == (a["clamp_limit"] is None), node,
           "clamp_alpha and clamp_limit are set exactly when the activation is clamped_swiglu")


def _ffn_widths(node: Node, w_up: TensorType, w_down: TensorType, w_gate: TensorType | None,
                stacked: bool) -> tuple[Dim, Dim]:
    """(F, H) of an FFN's weights, after checking gate/up/down agree."""
    lead = 1 if stacked else 0
    act = node.attrs["activation"]
    layout = node.attrs["weight_layout"]
    _check_clamp(node)
    expect_rank(w_up, 2 + lead, node, "w_up")
    expect_rank(w_down, 2 + lead, node, "w_down")
    rows_up, hidden = w_up.shape[lead], w_up.shape[lead + 1]
    width = w_down.shape[lead + 1]
    expect_dim(w_down.shape[lead], hidden, node, "w_down rows vs hidden")
    if act.gated and layout == WeightLayout.GATE_UP_FUSED:
        expect(w_gate is None, node, "a gate_up_fused layout has no separate w_gate")
        expect(rows_up == 2 * width, node, f"fused w_up must have 2F={2 * width} rows, found {rows_up}")
    else:
        expect_dim(rows_up, width, node, "w_up rows vs w_down columns")
        if act.gated:
            expect(w_gate is not None, node, f"{act.value} needs w_gate")
            expect(w_gate.shape == w_up.shape, node, f"w_gate {w_gate} must match w_up {w_up}")
        else:
            expect(w_gate is None, node, f"{act.value} is not gated; w_gate must be absent")
    if stacked:
        expect_dim(w_down.shape[0], w_up.shape[0], node, "expert count of w_down vs w_up")
    return width, hidden


_FFN_ATTRS = {
    "activation": Attr(Activation, Activation.SWIGLU, "expert nonlinearity"),
    "weight_layout": Attr(WeightLayout, WeightLayout.SEPARATE, "gate/up weights separate or fused"),
    # Set only with clamped_swiglu: the printer leaves the None values out, so other FFNs read as before.
    "clamp_alpha": Attr((float, type(None)), None, "clamped_swiglu: alpha in g * sigmoid(alpha * g)", quiet=True),
    "clamp_limit": Attr((float, type(None)), None, "clamped_swiglu: clamp bound of gate (above) and up (both sides)",
                        quiet=True),
}
_FFN_WEIGHT_PORTS = (Port("w_up"), Port("w_down"), Port("w_gate", optional=True), Port("b_up", optional=True),
                     Port("b_down", optional=True), Port("b_gate", optional=True))


# ------------------------------------------------------------------------------------------------
# routing math shared by topk_route and fused_moe


def route_topk(scores: torch.Tensor, bias: torch.Tensor | None, k: int, groups: int, kept: int,
               group_score: GroupScore) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert_idx [T,k], weights [T,k]): selection on scores + bias, weights from the unbiased scores."""
    select = scores if bias is None else scores + bias
    if groups > 1:
        t, e = select.shape
        grouped = select.view(t, groups, e // groups)
        if group_score == GroupScore.MAX:
            gscore = grouped.max(dim=-1).values
        else:
            gscore = grouped.topk(2, dim=-1).values.sum(dim=-1)
        keep_groups = gscore.topk(kept, dim=-1).indices
        mask = torch.zeros(t, groups, dtype=torch.bool, device=select.device)
        mask.scatter_(1, keep_groups, True)
        # -inf, not 0: a biased score can be negative and must still lose to no kept expert.
        select = grouped.masked_fill(~mask.unsqueeze(-1), float("-inf")).view(t, e)
    expert_idx = select.topk(k, dim=-1).indices
    return expert_idx, scores.gather(1, expert_idx)


def sparsemixer_route(logits: torch.Tensor, k: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert_idx [T,k], weights [T,k]) of SparseMixer at inference (PhiMoE): pick j takes the top logit
    among the experts not picked yet; its weight is the softmax, over those experts, restricted to the ones
    whose logit is within the relative threshold of the pick: (top - logit) / max(|logit|, top) <= 2*eps."""
    remaining = logits
    picks, weights = [], []
    for _ in range(k):
        top, idx = remaining.max(dim=-1, keepdim=True)
        outside = (top - logits) / logits.abs().clamp(min=top) > 2 * eps
        gates = torch.softmax(remaining.masked_fill(outside, float("-inf")), dim=-1)
        picks.append(idx)
        weights.append(gates.gather(1, idx))
        remaining = remaining.scatter(1, idx, float("-inf"))
    return torch.cat(picks, dim=1), torch.cat(weights, dim=1)


def scale_weights(weights: torch.Tensor, normalize: bool, scale: float) -> torch.Tensor:
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale


def dispatch_assignments(expert_idx: torch.Tensor, weights: torch.Tensor, num_experts: int,
                         capacity_factor: float | None, drop_rule: DropRule) -> tuple[torch.Tensor, ...]:
    """Sort the T*k assignments by expert; over capacity, drop per `drop_rule` (to the tail, weight 0)."""
    t, k = expert_idx.shape
    flat_expert = expert_idx.reshape(-1)
    flat_weight = weights.reshape(-1)
    kept = torch.ones_like(flat_expert, dtype=torch.bool)
    if capacity_factor is not None:
        capacity = capacity_per_expert(t, capacity_factor, k, num_experts)
        if drop_rule == DropRule.POSITION:
            # GShard order: slot-major (all first choices before any second choice), then token order.
            priority = torch.arange(t * k, device=flat_expert.device).view(t, k).t().reshape(-1)
            rank_key = torch.empty_like(priority)
            rank_key[priority] = torch.arange(t * k, device=flat_expert.device)
            order = torch.argsort(flat_expert * (t * k) + rank_key, stable=True)
        else:
            # Highest weight first within each expert; ties by assignment id.
            by_weight = torch.argsort(-flat_weight, stable=True)
            order = by_weight[torch.argsort(flat_expert[by_weight], stable=True)]
        sorted_expert = flat_expert[order]
        start = torch.searchsorted(sorted_expert, sorted_expert, right=False)
        position = torch.arange(t * k, device=flat_expert.device) - start
        kept_sorted = position < capacity
        kept = torch.empty_like(kept_sorted)
        kept[order] = kept_sorted
    # Sort key puts dropped assignments after every expert's group; stable keeps assignment order.
    key = torch.where(kept, flat_expert, torch.full_like(flat_expert, num_experts))
    order = torch.argsort(key, stable=True)
    rows = order // k
    row_weights = torch.where(kept[order], flat_weight[order], torch.zeros_like(flat_weight[order]))
    group_sizes = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    return rows, row_weights, group_sizes


def grouped_ffn_math(x: torch.Tensor, rows: torch.Tensor, group_sizes: torch.Tensor, w_up, w_down, w_gate,
                     b_up, b_down, b_gate, activation: Activation, layout: WeightLayout,
                     clamp: tuple[float, float] | None = None) -> torch.Tensor:
    """y[A, H]: row r is expert e's FFN of x[rows[r]] where r falls in e's group; rows past all groups are 0.
    Groups past the stacked weights' experts are identity experts: y[r] = x[rows[r]]."""
    y = x.new_zeros(rows.shape[0], x.shape[1])
    start = 0
    for e, size in enumerate(group_sizes.tolist()):
        if size and e >= w_up.shape[0]:
            y[start:start + size] = x[rows[start:start + size]]
        elif size:
            sel = rows[start:start + size]
            pick = lambda w: None if w is None else w[e]  # noqa: E731
            y[start:start + size] = ffn_math(x[sel], w_up[e], w_down[e], pick(w_gate), pick(b_up), pick(b_down),
                                             pick(b_gate), activation, layout, clamp)
        start += size
    return y


def combine_rows(y: torch.Tensor, rows: torch.Tensor, row_weights: torch.Tensor, tokens: int) -> torch.Tensor:
    out = y.new_zeros(tokens, y.shape[1])
    out.index_add_(0, rows, y * row_weights.to(y.dtype).unsqueeze(-1))
    return out


def expert_choice(scores: torch.Tensor, capacity: int) -> tuple[torch.Tensor, ...]:
    """Each expert takes its top-`capacity` tokens by score (Zhou et al. 2022)."""
    t, e = scores.shape
    c = min(capacity, t)
    weights, tokens = scores.t().topk(c, dim=-1)  # [E, C]
    group_sizes = torch.full((e,), c, dtype=torch.int64, device=scores.device)
    return tokens.reshape(-1), weights.reshape(-1), group_sizes


def expert_choice_capacity(tokens: int, capacity_factor: float, top_k: int, num_experts: int) -> int:
    return min(tokens, capacity_per_expert(tokens, capacity_factor, top_k, num_experts))


def selection_fraction(expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Count of selections per expert [E] (float) from top-k indices [T,k]."""
    counts = torch.zeros(num_experts, dtype=torch.float64 if expert_idx.device.type == "cpu" else torch.float32,
                         device=expert_idx.device)
    counts.index_add_(0, expert_idx.reshape(-1), torch.ones(expert_idx.numel(), dtype=counts.dtype,
                                                             device=expert_idx.device))
    return counts


def balance_loss_math(kind: LossKind, alpha: float, devices: int, top_k: int, scores: torch.Tensor,
                      expert_idx: torch.Tensor, logits: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The balance losses (Switch arXiv 2101.03961; DeepSeekMoE expert/device level arXiv 2401.06066; DeepSeek-V3
    sequence-wise; ST-MoE z-loss), each weighted by its alpha."""
    t, e = scores.shape
    if kind == LossKind.Z:
        return alpha * torch.logsumexp(logits, dim=-1).pow(2).mean()
    counts = selection_fraction(expert_idx, e).to(scores.dtype)
    if kind == LossKind.SWITCH:
        # Switch: f_i = fraction of tokens whose top-1 is i, P_i = mean router prob.
        top1 = torch.zeros(e, dtype=scores.dtype, device=scores.device)
        top1.index_add_(0, expert_idx[:, 0], torch.ones(t, dtype=scores.dtype, device=scores.device))
        return alpha * e * torch.sum(top1 / t * scores.mean(dim=0))
    if kind == LossKind.SEQUENCE:
        # DeepSeek-V3: the expert-level form per sequence, with scores normalised per token.
        s = scores / scores.sum(dim=-1, keepdim=True)
        b = t // seq_len
        s = s.view(b, seq_len, e)
        onehot = torch.zeros(b, seq_len, e, dtype=scores.dtype, device=scores.device)
        onehot.scatter_add_(2, expert_idx.view(b, seq_len, -1), torch.ones(b, seq_len, top_k, dtype=scores.dtype,
                                                                           device=scores.device))
        f = onehot.sum(dim=1) * e / (top_k * seq_len)
        p = s.mean(dim=1)
        return alpha * (f * p).sum(dim=-1).mean()
    f = counts * e / (top_k * t)  # DeepSeekMoE f_i = N'/(K'T) Σ_t 1(t selects i)
    p = scores.mean(dim=0)
    if kind == LossKind.EXPERT:
        return alpha * torch.sum(f * p)
    # Device level: f'_d = mean of f over the device's experts, P'_d = sum of P over them.
    f_dev = f.view(devices, e // devices).mean(dim=-1)
    p_dev = p.view(devices, e // devices).sum(dim=-1)
    return alpha * torch.sum(f_dev * p_dev)


# ------------------------------------------------------------------------------------------------
# op declarations


@register
class FlattenTokens(OpDef):
    opcode = OpCode.FLATTEN_TOKENS
    doc = "[B, S, H] -> [T, H], T = B*S"
    inputs = (Port("x"),)
    output_names = ("tokens",)

    def infer_types(self, node, x):
        expect_rank(x, 3, node, "x")
        b, s, h = x.shape
        t = "T" if (b, s) == ("B", "S") else (b * s if isinstance(b, int) and isinstance(s, int) else f"{b}*{s}")
        return [TensorType((t, h), x.dtype)]

    def reference(self, attrs, x):
        return (x.reshape(-1, x.shape[-1]),)


@register
class RestoreTokens(OpDef):
    opcode = OpCode.RESTORE_TOKENS
    doc = "[T, H] -> the [B, S, H] shape of `like`"
    inputs = (Port("y"), Port("like"))
    output_names = ("out",)

    def infer_types(self, node, y, like):
        expect_rank(y, 2, node, "y")
        expect_rank(like, 3, node, "like")
        return [TensorType(like.shape[:2] + (y.shape[1],), y.dtype)]

    def reference(self, attrs, y, like):
        return (y.reshape(like.shape[0], like.shape[1], y.shape[-1]),)


@register
class Linear(OpDef):
    opcode = OpCode.LINEAR
    doc = "x @ w.T (+ b), computed and returned in out_dtype (the router runs in its own dtype)"
    inputs = (Port("x"), Port("w"), Port("b", optional=True))
    output_names = ("y",)
    attrs = {"out_dtype": Attr(ElemType, ElemType.FLOAT32)}

    def infer_types(self, node, x, w, b):
        expect_rank(x, 2, node, "x")
        expect_rank(w, 2, node, "w")
        expect_dim(w.shape[1], x.shape[1], node, "w columns vs x features")
        if b is not None:
            expect(b.shape == (w.shape[0],), node, f"bias must be [{w.shape[0]}], found {b}")
        return [TensorType((x.shape[0], w.shape[0]), node.attrs["out_dtype"])]

    def reference(self, attrs, x, w, b):
        dt = attrs["out_dtype"].torch if x.dtype != torch.float64 else torch.float64
        return (F.linear(x.to(dt), w.to(dt), None if b is None else b.to(dt)),)


@register
class RouterNoise(OpDef):
    opcode = OpCode.ROUTER_NOISE
    doc = ("noisy top-k gating: logits + std * N(0,1) * softplus(x @ w_noise.T) in training; the "
           "identity at inference, which is what the reference (an inference oracle) computes")
    inputs = (Port("logits"), Port("x"), Port("w_noise"))
    output_names = ("logits",)
    attrs = {"std": Attr(float, 1.0)}

    def infer_types(self, node, logits, x, w_noise):
        expect(w_noise.shape == (logits.shape[1], x.shape[1]), node,
                f"w_noise must be [{logits.shape[1]}, {x.shape[1]}], found {w_noise}")
        return [logits]

    def reference(self, attrs, logits, x, w_noise):
        return (logits,)

    @staticmethod
    def training(attrs, logits, x, w_noise, generator=None):
        noise = torch.randn(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
        return logits + attrs["std"] * noise * F.softplus(F.linear(x.to(logits.dtype), w_noise.to(logits.dtype)))


@register
class Score(OpDef):
    opcode = OpCode.SCORE
    inputs = (Port("logits"),)
    output_names = ("scores",)
    attrs = {"fn": Attr(ScoreFn, ScoreFn.SOFTMAX)}

    def infer_types(self, node, logits):
        expect_rank(logits, 2, node, "logits")
        expect_float(logits, node, "logits")
        return [logits]

    def reference(self, attrs, logits):
        if attrs["fn"] == ScoreFn.SOFTMAX:
            return (torch.softmax(logits, dim=-1),)
        return (torch.sigmoid(logits),)


@register
class TopkRoute(OpDef):
    opcode = OpCode.TOPK_ROUTE
    doc = ("(group-limited) top-k selection on scores + bias; weights are the unbiased scores of the "
           "chosen experts, in descending order of selection score")
    inputs = (Port("scores"), Port("bias", optional=True))
    output_names = ("expert_idx", "weights")
    attrs = {"k": Attr(int), "groups": Attr(int, 1), "kept": Attr(int, 1),
             "group_score": Attr(GroupScore, GroupScore.MAX)}

    def infer_types(self, node, scores, bias):
        expect_rank(scores, 2, node, "scores")
        t, e = scores.shape
        a = node.attrs
        if bias is not None:
            expect(bias.shape == (e,), node, f"bias must be [{e}], found {bias}")
        _check_topk_attrs(node, e)
        return [TensorType((t, a["k"]), ElemType.INT64), TensorType((t, a["k"]), scores.dtype)]

    def reference(self, attrs, scores, bias):
        return route_topk(scores, bias, attrs["k"], attrs["groups"], attrs["kept"], attrs["group_score"])


@register
class SparsemixerRoute(OpDef):
    opcode = OpCode.SPARSEMIXER_ROUTE
    doc = ("SparseMixer selection on the router logits (PhiMoE, inference): k sequential argmax picks, each "
           "weighted by a softmax over the not-yet-picked experts within a relative threshold 2*eps of it")
    inputs = (Port("logits"),)
    output_names = ("expert_idx", "weights")
    attrs = {"k": Attr(int), "eps": Attr(float)}

    def infer_types(self, node, logits):
        expect_rank(logits, 2, node, "logits")
        expect_float(logits, node, "logits")
        t, e = logits.shape
        k = node.attrs["k"]
        expect(1 <= k <= (e if isinstance(e, int) else k), node, f"k={k} exceeds {e} experts")
        expect(node.attrs["eps"] >= 0, node, f"eps={node.attrs['eps']} must be >= 0")
        return [TensorType((t, k), ElemType.INT64), TensorType((t, k), logits.dtype)]

    def reference(self, attrs, logits):
        return sparsemixer_route(logits, attrs["k"], attrs["eps"])


@register
class ScaleWeights(OpDef):
    opcode = OpCode.SCALE_WEIGHTS
    doc = "optionally renormalise the top-k weights to sum 1, then multiply by the routed scaling factor"
    inputs = (Port("weights"),)
    output_names = ("weights",)
    attrs = {"normalize": Attr(bool, False), "scale": Attr(float, 1.0)}

    def infer_types(self, node, weights):
        expect_rank(weights, 2, node, "weights")
        return [weights]

    def reference(self, attrs, weights):
        return (scale_weights(weights, attrs["normalize"], attrs["scale"]),)


@register
class Dispatch(OpDef):
    opcode = OpCode.DISPATCH
    doc = ("sort the T*k (token, expert) assignments by expert; with a capacity factor, assignments over "
           "ceil(factor*T*k/E) per expert are dropped to the tail with weight 0")
    inputs = (Port("expert_idx"), Port("weights"))
    output_names = ("rows", "row_weights", "group_sizes")
    attrs = {"num_experts": Attr(int), "capacity_factor": Attr((float, type(None)), None),
             "drop_rule": Attr(DropRule, DropRule.SCORE)}

    def infer_types(self, node, expert_idx, weights):
        expect(expert_idx.dtype == ElemType.INT64, node, f"expert_idx must be i64, found {expert_idx}")
        expect(expert_idx.shape == weights.shape, node, f"expert_idx {expert_idx} and weights {weights} differ")
        t, k = expert_idx.shape
        a: Dim = f"{t}*{k}" if not isinstance(t, int) else t * k
        a = "A" if t == "T" else a
        e = node.attrs["num_experts"]
        return [TensorType((a,), ElemType.INT64), TensorType((a,), weights.dtype), TensorType((e,), ElemType.INT64)]

    def reference(self, attrs, expert_idx, weights):
        return dispatch_assignments(expert_idx, weights, attrs["num_experts"], attrs["capacity_factor"],
                                    attrs["drop_rule"])


@register
class ExpertChoiceRoute(OpDef):
    opcode = OpCode.EXPERT_CHOICE_ROUTE
    doc = "each expert takes its top-C tokens by score, C = min(T, ceil(factor*T*top_k/E)); gives dispatch's outputs"
    inputs = (Port("scores"),)
    output_names = ("rows", "row_weights", "group_sizes")
    attrs = {"capacity_factor": Attr(float, 1.0), "top_k": Attr(int)}

    def infer_types(self, node, scores):
        expect_rank(scores, 2, node, "scores")
        e = scores.shape[1]
        return [TensorType(("A",), ElemType.INT64), TensorType(("A",), scores.dtype),
                TensorType((e,), ElemType.INT64)]

    def reference(self, attrs, scores):
        t, e = scores.shape
        return expert_choice(scores, expert_choice_capacity(t, attrs["capacity_factor"], attrs["top_k"], e))


@register
class GroupedFFN(OpDef):
    opcode = OpCode.GROUPED_FFN
    doc = ("expert FFNs over the dispatched rows: y[r] = FFN_e(x[rows[r]]) for r in expert e's group; with "
           "row_scale, y[r] = FFN_e(row_scale[r] * x[rows[r]]) (Llama 4: the routing weight scales the input)")
    inputs = (Port("x"), Port("rows"), Port("group_sizes")) + _FFN_WEIGHT_PORTS + (Port("row_scale", optional=True,
                                                                                        quiet=True),)
    output_names = ("y",)
    attrs = {**_FFN_ATTRS, "identity_experts": Attr(int, 0, "groups after the stacked experts whose rows pass "
                                                           "through unchanged (LongCat-Flash)", quiet=True)}

    def infer_types(self, node, x, rows, group_sizes, w_up, w_down, w_gate, b_up, b_down, b_gate, row_scale):
        expect_rank(x, 2, node, "x")
        expect(rows.dtype == ElemType.INT64 and rows.rank == 1, node, f"rows must be i64[A], found {rows}")
        if row_scale is not None:
            expect(row_scale.rank == 1, node, f"row_scale must be [A], found {row_scale}")
            expect_dim(row_scale.shape[0], rows.shape[0], node, "row_scale vs rows")
        width, hidden = _ffn_widths(node, w_up, w_down, w_gate, stacked=True)
        expect_dim(hidden, x.shape[1], node, "expert hidden size vs x")
        z = node.attrs["identity_experts"]
        expect(z >= 0 and (z == 0 or row_scale is None), node, "identity experts take no row_scale")
        expect(group_sizes.shape == (w_up.shape[0] + z,), node,
                f"group_sizes {group_sizes} must have one entry per expert ({w_up.shape[0]} + {z} identity)")
        return [TensorType((rows.shape[0], x.shape[1]), x.dtype)]

    def reference(self, attrs, x, rows, group_sizes, w_up, w_down, w_gate, b_up, b_down, b_gate, row_scale):
        if row_scale is not None:
            # Each row its own scaled copy of its token, read in order: rows become 0..A-1.
            x = x[rows] * row_scale.to(x.dtype).unsqueeze(-1)
            rows = torch.arange(x.shape[0], device=x.device)
        return (grouped_ffn_math(x, rows, group_sizes, w_up, w_down, w_gate, b_up, b_down, b_gate,
                                 attrs["activation"], attrs["weight_layout"], clamp_of(attrs)),)


@register
class Combine(OpDef):
    opcode = OpCode.COMBINE
    doc = ("weighted un-permute: out[t] = Σ_{r: rows[r]=t} row_weights[r] * y[r]; `like` gives T. weighted=false: "
           "the plain sum (the weights were applied to the expert inputs, grouped_ffn's row_scale)")
    inputs = (Port("y"), Port("rows"), Port("row_weights"), Port("like"))
    output_names = ("out",)
    attrs = {"weighted": Attr(bool, True, "multiply each row by its routing weight", quiet=True)}

    def infer_types(self, node, y, rows, row_weights, like):
        expect_dim(y.shape[0], rows.shape[0], node, "y rows vs rows")
        expect_dim(row_weights.shape[0], rows.shape[0], node, "row_weights vs rows")
        return [TensorType((like.shape[0], y.shape[1]), y.dtype)]

    def reference(self, attrs, y, rows, row_weights, like):
        if not attrs["weighted"]:
            row_weights = torch.ones_like(row_weights)
        return (combine_rows(y, rows, row_weights, like.shape[0]),)


@register
class FFN(OpDef):
    opcode = OpCode.FFN
    doc = "one dense FFN (a shared expert, or several fused)"
    inputs = (Port("x"),) + _FFN_WEIGHT_PORTS
    output_names = ("y",)
    attrs = dict(_FFN_ATTRS)

    def infer_types(self, node, x, w_up, w_down, w_gate, b_up, b_down, b_gate):
        expect_rank(x, 2, node, "x")
        _, hidden = _ffn_widths(node, w_up, w_down, w_gate, stacked=False)
        expect_dim(hidden, x.shape[1], node, "FFN hidden size vs x")
        return [x]

    def reference(self, attrs, x, w_up, w_down, w_gate, b_up, b_down, b_gate):
        return (ffn_math(x, w_up, w_down, w_gate, b_up, b_down, b_gate, attrs["activation"], attrs["weight_layout"],
                         clamp_of(attrs)),)


@register
class SigmoidGate(OpDef):
    opcode = OpCode.SIGMOID_GATE
    doc = "y * sigmoid(x @ w.T): Qwen2-MoE's gate on the shared expert, w is [1, H]"
    inputs = (Port("y"), Port("x"), Port("w"))
    output_names = ("y",)

    def infer_types(self, node, y, x, w):
        expect(w.shape == (1, x.shape[1]), node, f"gate weight must be [1, {x.shape[1]}], found {w}")
        return [y]

    def reference(self, attrs, y, x, w):
        return (y * torch.sigmoid(F.linear(x, w)),)


@register
class Add(OpDef):
    opcode = OpCode.ADD
    inputs = (Port("a"), Port("b"))
    output_names = ("sum",)

    def infer_types(self, node, a, b):
        expect(a.shape == b.shape, node, f"add of {a} and {b}: shapes differ")
        return [a]

    def reference(self, attrs, a, b):
        return (a + b,)


@register
class AddBias(OpDef):
    opcode = OpCode.ADD_BIAS
    doc = "y [..., H] + bias [H], broadcast over the leading dims"
    inputs = (Port("y"), Port("bias"))
    output_names = ("out",)

    def infer_types(self, node, y, bias):
        expect(bias.rank == 1 and _dims_match(bias.shape[0], y.shape[-1]), node,
               f"bias must be [{y.shape[-1]}], found {bias}")
        return [y]

    def reference(self, attrs, y, bias):
        return (y + bias.to(y.dtype),)


@register
class Concat(OpDef):
    opcode = OpCode.CONCAT
    doc = "concatenate along `axis` (used by weight-fusing passes on parameters)"
    inputs = (Port("parts", variadic=True),)
    output_names = ("out",)
    attrs = {"axis": Attr(int, 0)}

    def infer_types(self, node, *parts):
        axis = node.attrs["axis"]
        first = parts[0]
        expect(0 <= axis < first.rank, node, f"axis {axis} out of range for {first}")
        total: Dim = 0
        for p in parts:
            expect(p.rank == first.rank and p.dtype == first.dtype, node, f"concat parts differ: {first} vs {p}")
            expect(all(a == b for i, (a, b) in enumerate(zip(p.shape, first.shape)) if i != axis), node,
                    f"concat parts {first} and {p} differ off axis {axis}")
            expect(isinstance(p.shape[axis], int), node, "concat axis must be static")
            total += p.shape[axis]
        shape = list(first.shape)
        shape[axis] = total
        return [TensorType(shape, first.dtype)]

    def reference(self, attrs, *parts):
        return (torch.cat(parts, dim=attrs["axis"]),)


@register
class BalanceLoss(OpDef):
    opcode = OpCode.BALANCE_LOSS
    doc = "a weighted balance loss (switch, expert, device, sequence or z-loss); `like` ([B,S,H]) gives S"
    inputs = (Port("scores"), Port("expert_idx"), Port("logits"), Port("like"))
    output_names = ("loss",)
    attrs = {"kind": Attr(LossKind), "alpha": Attr(float), "devices": Attr(int, 1), "top_k": Attr(int)}

    def infer_types(self, node, scores, expert_idx, logits, like):
        e = scores.shape[1]
        if node.attrs["kind"] == LossKind.DEVICE:
            expect(isinstance(e, int) and e % node.attrs["devices"] == 0, node,
                    f"{node.attrs['devices']} devices must divide {e} experts")
        return [TensorType((), scores.dtype)]

    def reference(self, attrs, scores, expert_idx, logits, like):
        return (balance_loss_math(attrs["kind"], attrs["alpha"], attrs["devices"], attrs["top_k"], scores,
                                  expert_idx, logits, like.shape[1]),)


@register
class FusedMoE(OpDef):
    opcode = OpCode.FUSED_MOE
    doc = ("the whole routed path (router projection, score, (group-limited) top-k, scale, dispatch, expert "
           "FFNs, combine) as one op, for targets with one kernel or plugin for the layer")
    inputs = (Port("x"), Port("w_router"), Port("bias", optional=True)) + _FFN_WEIGHT_PORTS
    output_names = ("out", "expert_idx", "weights")
    attrs = {"score": Attr(ScoreFn, ScoreFn.SOFTMAX), "k": Attr(int), "groups": Attr(int, 1), "kept": Attr(int, 1),
             "group_score": Attr(GroupScore, GroupScore.MAX), "normalize": Attr(bool, False),
             "scale": Attr(float, 1.0), "capacity_factor": Attr((float, type(None)), None),
             "drop_rule": Attr(DropRule, DropRule.SCORE), "router_dtype": Attr(ElemType, ElemType.FLOAT32),
             **_FFN_ATTRS}

    def infer_types(self, node, x, w_router, bias, w_up, w_down, w_gate, b_up, b_down, b_gate):
        expect_rank(x, 2, node, "x")
        expect(w_router.rank == 2 and w_router.shape[1] == x.shape[1], node, f"w_router {w_router} vs x {x}")
        if bias is not None:
            expect(bias.shape == (w_router.shape[0],), node, f"bias must be [{w_router.shape[0]}], found {bias}")
        _, hidden = _ffn_widths(node, w_up, w_down, w_gate, stacked=True)
        expect_dim(hidden, x.shape[1], node, "expert hidden size vs x")
        expect_dim(w_up.shape[0], w_router.shape[0], node, "expert count vs router rows")
        _check_topk_attrs(node, w_router.shape[0])
        k = node.attrs["k"]
        t = x.shape[0]
        return [x, TensorType((t, k), ElemType.INT64), TensorType((t, k), node.attrs["router_dtype"])]

    def reference(self, attrs, x, w_router, bias, w_up, w_down, w_gate, b_up, b_down, b_gate):
        rdt = attrs["router_dtype"].torch if x.dtype != torch.float64 else torch.float64
        logits = F.linear(x.to(rdt), w_router.to(rdt))
        (scores,) = op_def(OpCode.SCORE).reference({"fn": attrs["score"]}, logits)
        idx, w = route_topk(scores, bias, attrs["k"], attrs["groups"], attrs["kept"], attrs["group_score"])
        w = scale_weights(w, attrs["normalize"], attrs["scale"])
        rows, row_w, sizes = dispatch_assignments(idx, w, w_up.shape[0], attrs["capacity_factor"], attrs["drop_rule"])
        y = grouped_ffn_math(x, rows, sizes, w_up, w_down, w_gate, b_up, b_down, b_gate, attrs["activation"],
                             attrs["weight_layout"], clamp_of(attrs))
        return combine_rows(y, rows, row_w, x.shape[0]), idx, w


