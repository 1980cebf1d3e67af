"""The typed MoE layer spec: one canonical form, checked field by field and as a whole.

A spec can give its experts in the paper's parametrisation (DeepSeekMoE, arXiv 2401.06066: N
conventional experts of width F, segmentation m, conventional top-K, Ks shared) or explicitly
(routed count, shared count, fine-grained width, routed top-k). Both normalise to `ExpertsSpec`,
the explicit form; `ExpertsSpec.paper_view()` gives the paper's numbers back for `moe-ir inspect`.

Parsing is generic over the dataclasses below: each field's type hint, default and metadata (doc,
bounds) drive type checks, unknown-key suggestions and the JSON Schema, so a new field is declared in
one place. Cross-field rules live in each section's `check()`.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import SpecError


class Activation(enum.StrEnum):
    SWIGLU = "swiglu"  # silu(x W_gate) * (x W_up), then W_down
    GEGLU = "geglu"    # gelu(x W_gate) * (x W_up), then W_down
    GELU = "gelu"      # gelu(x W_up), then W_down
    RELU = "relu"      # relu(x W_up), then W_down
    # gpt-oss: (clamp(u, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(x W_gate, limit), u = x W_up;
    # alpha and limit in ExpertsSpec.clamp
    CLAMPED_SWIGLU = "clamped_swiglu"

    @property
    def gated(self) -> bool:
        return self in (Activation.SWIGLU, Activation.GEGLU, Activation.CLAMPED_SWIGLU)


class ScoreFn(enum.StrEnum):
    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


class GroupScore(enum.StrEnum):
    MAX = "max"            # DeepSeek-V2 group_limited_greedy
    TOP2_SUM = "top2_sum"  # DeepSeek-V3 noaux_tc


class Choice(enum.StrEnum):
    TOKEN = "token"    # each token picks its top-k experts
    EXPERT = "expert"  # each expert picks its top-C tokens (Zhou et al. 2022)


class DropRule(enum.StrEnum):
    SCORE = "score"        # over capacity, the assignments with the lowest routing weight are dropped
    POSITION = "position"  # over capacity, later tokens are dropped (GShard/Switch order)


class SharedPlacement(enum.StrEnum):
    REPLICATED = "replicated"            # every rank holds every shared expert
    TENSOR_PARALLEL = "tensor_parallel"  # each rank holds a 1/EP slice of every shared expert's width


class DType(enum.StrEnum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT64 = "float64"

    @property
    def torch(self):
        import torch

        return getattr(torch, self.value)


class QuantFormat(enum.StrEnum):
    INT8 = "int8"          # 8-bit integer codes, one float scale (and optional zero point) per block of a row
    INT4 = "int4"          # 4-bit codes, two per byte (the even input column in the low nibble)
    FP8_E4M3 = "fp8_e4m3"  # float8 e4m3 values with one scale per block x block tile (DeepSeek-V3's checkpoints)


# Upper bounds of the sizes a spec may ask for. Each is far above every published MoE model (DeepSeek-V3:
# hidden 7168, 256 routed experts of width 2048, 61 layers, vocabulary 129,280) and low enough that what
# moe-ir derives from a spec before any memory check (per-layer tables, the IR graph, FLOP counts) stays
# small: a slip such as `layers: 1000000000` is refused at once, naming the limit, instead of hanging.
MAX_HIDDEN = 65_536
MAX_WIDTH = 1_048_576           # FFN widths (experts, shared experts, dense layers)
MAX_EXPERTS = 65_536            # expert counts, top-k, groups, devices
MAX_SHARED_EXPERTS = 256        # each shared expert is a node of its own in the graph
MAX_LAYERS = 1_024
MAX_VOCAB = 4_194_304
MAX_HEADS = 4_096
MAX_HEAD_DIM = 65_536           # per-head dims and MLA ranks
# Layer and model names become file names (`<name>.portable.onnx.data`, `<name>.pt2`): plain names only, no
# folder part, short enough for any suffix to stay within a file system's 255-byte name limit.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


def spec_field(default: Any = dataclasses.MISSING, *, doc: str, minimum: float | None = None,
               exclusive_minimum: float | None = None, maximum: float | None = None, pattern: str | None = None,
               default_factory: Any = dataclasses.MISSING, omit_default: bool = False) -> Any:
    """A dataclass field with the metadata the parser and the JSON Schema read (`pattern`: strings only).
    `omit_default`: the canonical form (spec_to_dict, hence the spec hash) leaves the field out while it holds
    its default, so a field added later keeps the hashes of every spec that does not use it."""
    meta = {"doc": doc, "minimum": minimum, "exclusive_minimum": exclusive_minimum, "maximum": maximum,
            "pattern": pattern, "omit_default": omit_default}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True, kw_only=True)
class PaperExperts:
    """DeepSeekMoE parametrisation: mN experts of width F/m; Ks shared; mK - Ks routed active."""

    num_experts: int = spec_field(doc="N: conventional (unsegmented) experts, shared ones included", minimum=1,
                                  maximum=MAX_EXPERTS)
    expert_width: int = spec_field(doc="F: FFN width of one conventional expert", minimum=1, maximum=MAX_WIDTH)
    segmentation: int = spec_field(1, doc="m: each conventional expert is split into m finer ones", minimum=1,
                                   maximum=MAX_EXPERTS)
    top_k: int = spec_field(doc="K: conventional experts active per token, shared ones included", minimum=1,
                            maximum=MAX_EXPERTS)
    shared: int = spec_field(0, doc="Ks: fine-grained experts every token uses", minimum=0, maximum=MAX_SHARED_EXPERTS)

    def check(self, ctx: "ParseContext", path: str) -> None:
        if self.expert_width % self.segmentation:
            ctx.fail(f"{path}.segmentation", f"m={self.segmentation} must divide expert_width F={self.expert_width}")
        total, active = self.segmentation * self.num_experts, self.segmentation * self.top_k
        if self.shared >= total:
            ctx.fail(f"{path}.shared", f"Ks={self.shared} shared experts leave no routed expert out of mN={total}")
        if self.shared >= active:
            ctx.fail(f"{path}.shared", f"Ks={self.shared} must be below mK={active} so at least one routed expert is active")
        if self.top_k > self.num_experts:
            ctx.fail(f"{path}.top_k", f"K={self.top_k} exceeds N={self.num_experts}")


@dataclass(frozen=True, kw_only=True)
class ClampedSwiglu:
    """The parameters of the clamped_swiglu activation (gpt-oss: swiglu_alpha 1.702, swiglu_limit 7.0)."""

    alpha: float = spec_field(1.702, doc="slope inside the sigmoid: g * sigmoid(alpha * g)", exclusive_minimum=0.0)
    limit: float = spec_field(7.0, doc="the gate is clamped to at most limit, the up projection to [-limit, limit]",
                              exclusive_minimum=0.0)


@dataclass(frozen=True, kw_only=True)
class ExpertsSpec:
    """Canonical (explicit) expert configuration."""

    routed: int = spec_field(doc="routed experts (mN - Ks in the paper's form)", minimum=1, maximum=MAX_EXPERTS)
    width: int = spec_field(doc="FFN width of one fine-grained expert (F/m)", minimum=1, maximum=MAX_WIDTH)
    top_k: int = spec_field(doc="routed experts active per token (mK - Ks)", minimum=1, maximum=MAX_EXPERTS)
    shared: int = spec_field(0, doc="shared experts every token uses (Ks)", minimum=0, maximum=MAX_SHARED_EXPERTS)
    shared_width: int | None = spec_field(None, doc="FFN width of one shared expert; default: width", minimum=1,
                                           maximum=MAX_WIDTH)
    shared_gate: bool = spec_field(False, doc="multiply the shared output by sigmoid(x w) (Qwen2-MoE)")
    activation: Activation = spec_field(Activation.SWIGLU, doc="expert activation")
    bias: bool = spec_field(False, doc="expert projections carry biases")
    identity: int = spec_field(0, doc="zero-computation experts (LongCat-Flash): router choices after the routed "
                                      "ones whose output is the token itself, weighted", minimum=0,
                               maximum=MAX_EXPERTS, omit_default=True)
    output_bias: bool = spec_field(False, doc="a bias [hidden] added once to the layer's output, after the weighted "
                                              "sum of the experts (JetMoE's MoE block bias)", omit_default=True)
    clamp: ClampedSwiglu | None = spec_field(None, doc="alpha and limit of activation clamped_swiglu (required with "
                                                       "it, refused with any other activation)")
    paper: PaperExperts | None = spec_field(None, doc="the paper's parametrisation; routed/width/top_k/shared follow from it")

    @property
    def choices(self) -> int:
        """Experts the router scores and a token may pick: the routed FFN experts, then the identity ones."""
        return self.routed + self.identity

    @property
    def shared_ffn_width(self) -> int:
        return self.shared_width if self.shared_width is not None else self.width

    def paper_view(self) -> dict[str, int]:
        """N, F, m, K, Ks: the given paper form, or the m=1 reading of the explicit form."""
        if self.paper is not None:
            p = self.paper
            return {"N": p.num_experts, "F": p.expert_width, "m": p.segmentation, "K": p.top_k, "Ks": p.shared}
        return {"N": self.routed + self.shared, "F": self.width, "m": 1, "K": self.top_k + self.shared,
                "Ks": self.shared}

    def check(self, ctx: "ParseContext", path: str) -> None:
        if self.top_k > self.choices:
            ctx.fail(f"{path}.top_k", f"top_k={self.top_k} exceeds the {self.choices} routed experts"
                                      + (f" ({self.routed} + {self.identity} identity)" if self.identity else ""))
        if self.shared_gate and self.shared == 0:
            ctx.fail(f"{path}.shared_gate", "a shared-expert gate needs at least one shared expert")
        if self.shared_width is not None and self.shared == 0:
            ctx.fail(f"{path}.shared_width", "shared_width is set but there are no shared experts")
        if self.activation == Activation.CLAMPED_SWIGLU and self.clamp is None:
            ctx.fail(f"{path}.clamp", "activation clamped_swiglu needs its parameters: clamp: {alpha: ..., limit: ...} "
                                      "(gpt-oss: alpha 1.702, limit 7.0)")
        if self.clamp is not None and self.activation != Activation.CLAMPED_SWIGLU:
            ctx.fail(f"{path}.clamp", f"clamp parametrises activation clamped_swiglu; this activation is "
                                      f"{self.activation.value}")


@dataclass(frozen=True, kw_only=True)
class GroupLimit:
    """Group-limited routing (DeepSeek-V2/V3): keep `kept` of `groups` expert groups, then top-k inside."""

    groups: int = spec_field(doc="expert groups (n_group); routed experts are split into contiguous groups", minimum=2,
                             maximum=MAX_EXPERTS)
    kept: int = spec_field(doc="groups each token may use (topk_group)", minimum=1, maximum=MAX_EXPERTS)
    score: GroupScore = spec_field(GroupScore.MAX, doc="group score: max expert score, or sum of the top-2")


@dataclass(frozen=True, kw_only=True)
class Noise:
    """Noisy top-k gating (Shazeer et al. 2017): logits + std * N(0,1) * softplus(x W_noise), training only."""

    std: float = spec_field(1.0, doc="scale of the standard normal noise", exclusive_minimum=0.0)


@dataclass(frozen=True, kw_only=True)
class SparseMixer:
    """SparseMixer routing (PhiMoE; Liu et al. 2024, arXiv 2409.12136) as it runs at inference: the first
    expert is the top logit, its weight the softmax over the experts whose logit is within the threshold of it
    ((top - logit) / max(|logit|, top) <= 2 * jitter_eps); the second is the top of the others, weighted by the
    softmax over the others within the threshold of it. Training samples the experts instead (Gumbel) and
    corrects the gradient (Heun's method); those are training-time behaviours moe-ir does not model."""

    jitter_eps: float = spec_field(0.01, doc="threshold of the relative logit gap: experts with (top - logit) / "
                                             "max(|logit|, top) > 2 * jitter_eps leave the softmax", minimum=0.0)


@dataclass(frozen=True, kw_only=True)
class RouterSpec:
    score: ScoreFn = spec_field(ScoreFn.SOFTMAX, doc="router score function")
    choice: Choice = spec_field(Choice.TOKEN, doc="token-choice top-k or expert-choice")
    group_limit: GroupLimit | None = spec_field(None, doc="group-limited top-k; absent: greedy top-k")
    noise: Noise | None = spec_field(None, doc="noisy top-k gating; absent: none")
    logit_bias: bool = spec_field(False, doc="the router projection carries a bias added to the logits before "
                                             "scoring and selection (gpt-oss)", omit_default=True)
    scale_input: bool = spec_field(False, doc="the routing weight multiplies each chosen expert's input instead of "
                                              "its output (Llama 4)", omit_default=True)
    sparse_mixer: SparseMixer | None = spec_field(None, doc="SparseMixer routing (PhiMoE, top_k 2) on the router "
                                                           "logits instead of top-k on the scores; absent: top-k")
    normalize: bool = spec_field(False, doc="renormalise the top-k weights to sum 1")
    scaling: float = spec_field(1.0, doc="routed scaling factor applied to the gate weights", exclusive_minimum=0.0)
    dtype: DType = spec_field(DType.FLOAT32, doc="dtype of the router projection and scores")


@dataclass(frozen=True, kw_only=True)
class DeviceLoss:
    alpha: float = spec_field(doc="α2, device-level balance loss weight", minimum=0.0)
    devices: int = spec_field(doc="D: routed experts are split into D contiguous device groups", minimum=1,
                              maximum=MAX_EXPERTS)


@dataclass(frozen=True, kw_only=True)
class AuxFree:
    gamma: float = spec_field(1e-3, doc="bias update rate u: b_i += u * sign(mean load - load_i)", exclusive_minimum=0.0)


@dataclass(frozen=True, kw_only=True)
class BalanceSpec:
    """Balance policy; every part optional and combinable. Losses are returned, never stored globally."""

    switch: float | None = spec_field(None, doc="α of the Switch loss α·N·Σ f_i·P_i", minimum=0.0)
    expert: float | None = spec_field(None, doc="α1 of the DeepSeekMoE expert-level loss", minimum=0.0)
    device: DeviceLoss | None = spec_field(None, doc="device-level loss over D expert groups")
    sequence: float | None = spec_field(None, doc="α of the DeepSeek-V3 sequence-wise loss", minimum=0.0)
    z_loss: float | None = spec_field(None, doc="weight of the router z-loss (ST-MoE)", minimum=0.0)
    aux_free: AuxFree | None = spec_field(None, doc="aux-loss-free bias balancing (arXiv 2408.15664)")

    @property
    def losses(self) -> dict[str, float]:
        """Enabled losses by name with their weight."""
        out = {name: getattr(self, name) for name in ("switch", "expert", "sequence", "z_loss")
               if getattr(self, name) is not None}
        if self.device is not None:
            out["device"] = self.device.alpha
        return out


@dataclass(frozen=True, kw_only=True)
class CapacitySpec:
    factor: float | None = spec_field(
        None, doc="capacity per expert = ceil(factor * tokens * top_k / routed); absent: dropless",
        exclusive_minimum=0.0)
    drop: DropRule = spec_field(DropRule.SCORE, doc="which assignments are dropped over capacity")


@dataclass(frozen=True, kw_only=True)
class ParallelSpec:
    """Expert parallelism: routed experts split into contiguous blocks of routed/EP per rank.

    `device_limit` is DeepSeek-V2's device-limited routing: a token first keeps the M devices holding its
    highest-affinity experts (device score = max expert score on the device), then picks top-k among the
    experts on them. It is group-limited routing with groups = EP degree, kept = M, group score = max.
    """

    expert_parallel: int = spec_field(doc="EP degree: ranks the routed experts are split over (contiguous blocks)",
                                      minimum=1, maximum=MAX_EXPERTS)
    device_limit: int | None = spec_field(None, doc="M: devices a token may be sent to (DeepSeek-V2); absent: no limit",
                                          minimum=1, maximum=MAX_EXPERTS)
    shared: SharedPlacement = spec_field(SharedPlacement.REPLICATED, doc="shared experts replicated on every rank "
                                         "or split tensor-parallel across the EP ranks")
    communication: float | None = spec_field(None, doc="α3 of DeepSeek-V2's communication balance loss", minimum=0.0)

    @property
    def group_limit(self) -> GroupLimit | None:
        """The device limit as the group limit it is (None without a device limit or with one device)."""
        if self.device_limit is None or self.expert_parallel < 2:
            return None
        return GroupLimit(groups=self.expert_parallel, kept=self.device_limit, score=GroupScore.MAX)


@dataclass(frozen=True, kw_only=True)
class QuantizedWeights:
    """Which weights a quantization applies to (the router always stays in its own float dtype)."""

    routed_experts: bool = spec_field(True, doc="the routed experts' gate/up/down projections")
    shared_experts: bool = spec_field(True, doc="the shared experts' projections")
    dense_ffn: bool = spec_field(False, doc="the FFN projections of a model's dense layers")
    attention: bool = spec_field(False, doc="the attention projections of a model")
    embeddings: bool = spec_field(False, doc="a model's token embedding table")
    head: bool = spec_field(False, doc="a model's output projection (lm_head)")


@dataclass(frozen=True, kw_only=True)
class QuantizationSpec:
    """Block-wise weight quantization: round-to-nearest codes with one scale per `block` input columns."""

    format: QuantFormat = spec_field(doc="int8, int4, or fp8_e4m3 (square block x block tiles, as DeepSeek-V3 stores)")
    block: int = spec_field(32, doc="input columns sharing one scale (a power of two, 16..1024)", minimum=16,
                            maximum=1024)
    symmetric: bool = spec_field(True, doc="codes centred on 0 (no zero points); false: a zero point per block")
    weights: QuantizedWeights = spec_field(default_factory=QuantizedWeights, doc="which weights are quantized")

    def check(self, ctx: "ParseContext", path: str) -> None:
        if self.block & (self.block - 1):
            ctx.fail(join_key_path(path, "block"), f"block {self.block} must be a power of two (16, 32, 64, 128, ...)")
        if self.format == QuantFormat.FP8_E4M3 and not self.symmetric:
            ctx.fail(join_key_path(path, "symmetric"), "fp8_e4m3 blocks have scales only (no zero points)")


@dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """One MoE layer: y = x + shared(x) + Σ_routed g_i FFN_i(x) (the residual add is the caller's)."""

    hidden: int = spec_field(doc="model hidden size", minimum=1, maximum=MAX_HIDDEN)
    experts: ExpertsSpec = spec_field(doc="expert configuration (paper or explicit form)")
    name: str = spec_field("moe", doc="a name for the layer, used in artifact names (letters, digits, '.', '_', "
                                      "'-'; starts with a letter or digit; at most 128)", pattern=NAME_PATTERN)
    source: str = spec_field("", doc="where the settings come from (paper, config)")
    router: RouterSpec = spec_field(default_factory=RouterSpec, doc="router")
    balance: BalanceSpec = spec_field(default_factory=BalanceSpec, doc="balance policy")
    capacity: CapacitySpec = spec_field(default_factory=CapacitySpec, doc="capacity and token dropping")
    dtype: DType = spec_field(DType.FLOAT32, doc="dtype of activations and expert weights")
    # Default None keeps the canonical form (and spec hashes) of specs without placement unchanged.
    parallel: ParallelSpec | None = spec_field(None, doc="expert-parallel placement; absent: one device")
    quantization: QuantizationSpec | None = spec_field(None, doc="block-wise weight quantization; absent: float "
                                                                "weights in `dtype`")

    @property
    def routing_group_limit(self) -> GroupLimit | None:
        """The group limit routing applies: router.group_limit, or parallel.device_limit read as one."""
        if self.router.group_limit is not None:
            return self.router.group_limit
        return self.parallel.group_limit if self.parallel is not None else None

    def check(self, ctx: "ParseContext", path: str) -> None:
        e, r, b = self.experts, self.router, self.balance
        if self.parallel is not None:
            self._check_parallel(ctx)
        if r.group_limit is not None:
            g = r.group_limit
            gp = "router.group_limit"
            if e.routed % g.groups:
                ctx.fail(f"{gp}.groups", f"{g.groups} groups must divide the {e.routed} routed experts")
            elif g.kept > g.groups:
                ctx.fail(f"{gp}.kept", f"kept={g.kept} exceeds groups={g.groups}")
            elif g.kept * (e.routed // g.groups) < e.top_k:
                ctx.fail(f"{gp}.kept", f"{g.kept} kept groups of {e.routed // g.groups} experts hold fewer than "
                                       f"top_k={e.top_k} experts")
            elif g.score == GroupScore.TOP2_SUM and e.routed // g.groups < 2:
                ctx.fail(f"{gp}.score", "top2_sum needs at least 2 experts per group")
            if r.choice == Choice.EXPERT:
                ctx.fail(f"{gp}", "group limits apply to token-choice routing, not expert-choice")
        if r.choice == Choice.EXPERT:
            if b.aux_free is not None:
                ctx.fail("balance.aux_free", "expert-choice routing is balanced by construction; aux_free needs token-choice")
            if r.scaling != 1.0:
                ctx.fail("router.scaling", "expert-choice gate weights are the raw scores; scaling needs token-choice")
            if r.normalize:
                ctx.fail("router.normalize", "expert-choice gives a token a variable number of experts; normalize needs token-choice")
            # These losses score each token's top-k choice, which expert-choice routing does not make; only
            # the z-loss (on the router logits) applies. Refused here rather than silently left out.
            for name in ("switch", "expert", "device", "sequence"):
                if getattr(b, name) is not None:
                    ctx.fail(f"balance.{name}", f"the {name} balance loss needs token-choice routing; expert-choice "
                                                "is balanced by construction (only z_loss applies)")
        if r.sparse_mixer is not None:
            self._check_sparse_mixer(ctx)
        if e.identity:
            self._check_identity(ctx)
        if r.scale_input and r.choice == Choice.EXPERT:
            ctx.fail("router.scale_input", "scale_input is modelled for token-choice routing (Llama 4), not "
                                           "expert-choice")
        if b.device is not None and e.routed % b.device.devices:
            ctx.fail("balance.device.devices", f"{b.device.devices} devices must divide the {e.routed} routed experts")

    def _check_identity(self, ctx: "ParseContext") -> None:
        # Identity experts are modelled as LongCat-Flash uses them: token-choice top-k over routed + identity
        # experts, dropless, on one device; the other combinations are refused rather than guessed.
        r, path = self.router, "experts.identity"
        for what, present in (("expert-choice routing", r.choice == Choice.EXPERT),
                              ("a group or device limit", self.routing_group_limit is not None),
                              ("expert parallelism", self.parallel is not None),
                              ("a capacity factor", self.capacity.factor is not None),
                              ("router.sparse_mixer", r.sparse_mixer is not None),
                              ("router.scale_input", r.scale_input),
                              ("balance.device", self.balance.device is not None)):
            if present:
                ctx.fail(path, f"identity experts are modelled for dropless token-choice routing on one device; "
                               f"they cannot combine with {what}")

    def _check_sparse_mixer(self, ctx: "ParseContext") -> None:
        # SparseMixer is a selection rule of its own (sequential argmax on the logits, a softmax per pick over
        # a thresholded set); what other routing options would mean combined with it is defined nowhere.
        e, r = self.experts, self.router
        path = "router.sparse_mixer"
        if r.choice == Choice.EXPERT:
            ctx.fail(path, "sparse_mixer is a token-choice rule; it cannot combine with choice: expert")
        if e.top_k != 2:
            ctx.fail("experts.top_k", f"sparse_mixer picks exactly 2 experts per token (as PhiMoE defines it), "
                                      f"found top_k={e.top_k}")
        if self.routing_group_limit is not None:
            ctx.fail(path, "sparse_mixer selects on the raw logits; group or device limits cannot combine with it")
        if r.noise is not None:
            ctx.fail(path, "sparse_mixer cannot combine with router.noise (its training-time sampling is its own)")
        if r.score != ScoreFn.SOFTMAX:
            ctx.fail("router.score", "sparse_mixer weighs experts by a softmax; router.score must be softmax "
                                     "(the balance losses read those scores)")
        if self.balance.aux_free is not None:
            ctx.fail("balance.aux_free", "sparse_mixer selects on the raw logits; an aux-free selection bias "
                                         "cannot combine with it")

    def _check_parallel(self, ctx: "ParseContext") -> None:
        e, r, b, p = self.experts, self.router, self.balance, self.parallel
        ep = p.expert_parallel
        if e.routed % ep:
            ctx.fail("parallel.expert_parallel", f"EP degree {ep} must divide the {e.routed} routed experts "
                                                 "(each rank holds a contiguous block of routed/EP)")
        if p.device_limit is not None:
            m, local = p.device_limit, e.routed // ep
            if m > ep:
                ctx.fail("parallel.device_limit", f"device_limit={m} exceeds the EP degree {ep}")
            if m * local < e.top_k:
                ctx.fail("parallel.device_limit", f"{m} devices of {local} experts hold fewer than top_k={e.top_k} "
                                                  "experts")
            if r.choice == Choice.EXPERT:
                ctx.fail("parallel.device_limit", "device-limited routing applies to token-choice routing, "
                                                  "not expert-choice")
            if r.group_limit is not None and r.group_limit != p.group_limit:
                ctx.fail("parallel.device_limit", "router.group_limit is also set; a token can follow one limit: "
                                                  "drop one of them (device_limit M over EP ranks is group_limit "
                                                  f"groups={ep}, kept={m}, score=max)")
        if b.device is not None and b.device.devices != ep:
            ctx.fail("balance.device.devices", f"the device-level loss counts {b.device.devices} devices but the "
                                               f"experts are placed on expert_parallel={ep}; make them equal")
        if p.shared == SharedPlacement.TENSOR_PARALLEL:
            if e.shared == 0:
                ctx.fail("parallel.shared", "tensor_parallel shared experts need at least one shared expert")
            if e.shared_ffn_width % ep:
                ctx.fail("parallel.shared", f"EP degree {ep} must divide the shared width {e.shared_ffn_width} "
                                            "to split it tensor-parallel")

    @property
    def capacity_factor(self) -> float | None:
        """Capacity factor in force: expert-choice always has one (1.0 unless given)."""
        if self.router.choice == Choice.EXPERT and self.capacity.factor is None:
            return 1.0
        return self.capacity.factor

    def expert_capacity(self, tokens: int) -> int | None:
        """Assignments one expert may take for `tokens` tokens; None when dropless."""
        cf = self.capacity_factor
        if cf is None:
            return None
        return capacity_per_expert(tokens, cf, self.experts.top_k, self.experts.routed)

    @property
    def dropless(self) -> bool:
        return self.capacity_factor is None


def miniature(spec: LayerSpec, hidden: int) -> LayerSpec:
    """The same layer at hidden size `hidden`: every expert count, top-k, router, balance, capacity and
    placement setting is kept, and expert widths shrink with the hidden size (never below 2). Used to
    check a published layer's routing semantics on machines that cannot hold its weights."""
    e = spec.experts
    ratio = hidden / spec.hidden

    def shrink(width: int) -> int:
        return max(2, round(width * ratio / 2) * 2)

    experts = dataclasses.replace(e, width=shrink(e.width), paper=None,
                                  shared_width=None if e.shared_width is None else shrink(e.shared_width))
    if spec.parallel is not None and spec.parallel.shared.value == "tensor_parallel":
        ep = spec.parallel.expert_parallel
        experts = dataclasses.replace(experts, width=-(-experts.width // ep) * ep,
                                      shared_width=None if experts.shared_width is None
                                      else -(-experts.shared_width // ep) * ep)
    return dataclasses.replace(spec, hidden=hidden, experts=experts, name=f"{spec.name}-h{hidden}")


# ----------------------------------------------------------------------------------------------
# Generic parsing


class ParseContext:
    """Key path -> YAML line table and the error constructor that uses it."""

    def __init__(self, lines: Mapping[str, int] | None, file: str | None):
        self.lines = dict(lines or {})
        self.file = file

    def line_of(self, path: str) -> int | None:
        # Walk up to the nearest key the YAML reader recorded (a missing key has no line of its own).
        while True:
            if path in self.lines:
                return self.lines[path]
            if "." not in path and "[" not in path:
                return self.lines.get("", None)
            path = path.rsplit(".", 1)[0] if "." in path else ""

    def fail(self, path: str, message: str) -> typing.NoReturn:
        raise SpecError(message, path=path, line=self.line_of(path), file=self.file)


def describe_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        shown = show_number(value)
        return shown if shown.startswith("an integer of") else f"number {shown}"
    if isinstance(value, str):
        return f"string {quote_text(value)}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_value(tp: Any, value: Any, path: str, ctx: ParseContext, meta: Mapping[str, Any]) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        ctx.fail(path, f"expected {_type_name(tp)}, found null")
    if dataclasses.is_dataclass(tp):
        return parse_section(tp, value, path, ctx)
    if typing.get_origin(tp) is tuple:  # tuple[X, ...]: a YAML list of X, each item checked like a field
        if not isinstance(value, list):
            ctx.fail(path, f"expected a list, found {describe_value(value)}")
        if len(value) > _MAX_LIST:
            ctx.fail(path, f"expected at most {_MAX_LIST:,} items, found {len(value):,}")
        item = typing.get_args(tp)[0]
        return tuple(_parse_value(item, v, f"{path}[{i}]", ctx, meta) for i, v in enumerate(value))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        choices = [m.value for m in tp]
        if not isinstance(value, str) or value not in choices:
            hint = suggest_key(str(value), choices) if isinstance(value, str) else ""
            ctx.fail(path, f"expected one of {', '.join(choices)}, found {describe_value(value)}{hint}")
        return tp(value)
    if tp is bool:
        if not isinstance(value, bool):
            ctx.fail(path, f"expected true or false, found {describe_value(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            ctx.fail(path, f"expected an integer, found {describe_value(value)}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > 1e300 \
                or not math.isfinite(value):  # (an int above 1e308 cannot even be asked whether it is finite)
            ctx.fail(path, f"expected a finite number, found {describe_value(value)}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            ctx.fail(path, f"expected a string, found {describe_value(value)}")
        # A pattern guards strings that end up in file names and generated source (the layer name).
        if meta.get("pattern") is not None and not re.fullmatch(meta["pattern"], value):
            ctx.fail(path, f"{quote_text(value)} does not match {meta['pattern']} ({meta.get('doc', '')})")
        return value
    else:  # pragma: no cover - a spec declaration error, not a user error
        raise TypeError(f"unsupported spec field type {tp!r} at {path}")
    _check_bounds(value, path, ctx, meta)
    return value


def _check_bounds(value: float, path: str, ctx: ParseContext, meta: Mapping[str, Any]) -> None:
    if meta.get("minimum") is not None and value < meta["minimum"]:
        ctx.fail(path, f"expected a value >= {meta['minimum']}, found {show_number(value)}")
    if meta.get("exclusive_minimum") is not None and value <= meta["exclusive_minimum"]:
        ctx.fail(path, f"expected a value > {meta['exclusive_minimum']}, found {show_number(value)}")
    if meta.get("maximum") is not None and value > meta["maximum"]:
        ctx.fail(path, f"expected a value <= {meta['maximum']:,} (moe-ir's upper bound for this size), "
                       f"found {show_number(value)}")
    if isinstance(value, int) and abs(value) > _MAX_ANY_INT:  # a field declared without a maximum
        ctx.fail(path, f"expected a value of at most 18 digits, found {show_number(value)}")


# No spec integer needs more; Python ints are unbounded, so the parser states a bound of its own.
_MAX_ANY_INT = 10**18 - 1
# No spec list needs more items (a list holds at most one entry per layer).
_MAX_LIST = 1 << 16


def quote_text(text: str, limit: int = 80) -> str:
    """A string as an error message quotes it, cut after `limit` characters."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text):,} characters)"


def show_number(value: Any) -> str:
    """A number as an error message quotes it: an integer of many digits by its size (printing it whole
    would flood the line, and Python refuses to print one of more than 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1:,} digits"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000 else repr(value)


def _type_name(tp: Any) -> str:
    tp, _ = _unwrap_optional(tp)
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(m.value for m in tp)
    if typing.get_origin(tp) is tuple:
        return "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def suggest_key(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def join_key_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def parse_section(cls: type, data: Any, path: str, ctx: ParseContext) -> Any:
    if not isinstance(data, dict):
        ctx.fail(path, f"expected a mapping, found {describe_value(data)}")
    if cls is ExpertsSpec:
        data = _experts_to_canonical(data, path, ctx)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if not isinstance(key, str):
            ctx.fail(join_key_path(path, str(key)), f"keys must be strings, found {describe_value(key)}")
        if key not in fields:
            ctx.fail(join_key_path(path, key), f"unknown key '{key}'{suggest_key(key, list(fields))}; "
                                       f"allowed: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        sub = join_key_path(path, name)
        if name in data:
            kwargs[name] = _parse_value(hints[name], data[name], sub, ctx, f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            ctx.fail(sub, f"missing required key '{name}' ({f.metadata.get('doc', '')})")
    obj = cls(**kwargs)
    if hasattr(obj, "check"):
        obj.check(ctx, path)
    return obj


_EXPLICIT_KEYS = ("routed", "width", "top_k", "shared")


def _experts_to_canonical(data: dict, path: str, ctx: ParseContext) -> dict:
    """Fill the explicit keys from `paper:` when given, checking any explicit key that disagrees."""
    if data.get("paper") is None:
        return data
    paper = parse_section(PaperExperts, data["paper"], join_key_path(path, "paper"), ctx)
    derived = {
        "routed": paper.segmentation * paper.num_experts - paper.shared,
        "width": paper.expert_width // paper.segmentation,
        "top_k": paper.segmentation * paper.top_k - paper.shared,
        "shared": paper.shared,
    }
    out = dict(data)
    fields = {f.name: f for f in dataclasses.fields(ExpertsSpec)}
    for key, value in derived.items():
        if key in data:
            # Type and bounds first: `routed: "63"` is a wrong type, not a disagreement with 63.
            given = _parse_value(int, data[key], join_key_path(path, key), ctx, fields[key].metadata)
            if given != value:
                ctx.fail(join_key_path(path, key), f"{key}={given!r} disagrees with the paper form, which gives {value}")
        out[key] = value
    return out


def spec_from_dict(data: Any, *, lines: Mapping[str, int] | None = None, file: str | None = None) -> LayerSpec:
    """Parse and check a spec given as plain data. `lines` maps key paths to YAML lines for errors."""
    ctx = ParseContext(lines, file)
    if not isinstance(data, dict):
        ctx.fail("", f"a spec must be a mapping at the top level, found {describe_value(data)}")
    return parse_section(LayerSpec, data, "", ctx)


def spec_to_dict(spec: Any) -> dict:
    """Canonical plain-data form (explicit experts; enums as strings; no None-valued optional keys)."""
    out = {}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if value is None or (f.metadata.get("omit_default") and value == f.default):
            continue
        if dataclasses.is_dataclass(value):
            value = spec_to_dict(value)
        elif isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def capacity_per_expert(tokens: int, factor: float, top_k: int, experts: int) -> int:
    """ceil(factor * tokens * top_k / experts), at least 1: the assignments one expert may take (GShard,
    Switch; expert choice with top_k = the average experts per token). The core's one statement of the rule;
    the torch kernels (backends/torch_kernels/) carry their own copy, since generated sources copy them."""
    return max(1, math.ceil(factor * tokens * top_k / experts))


# Fields that describe a spec rather than define what it computes: renaming a layer or editing its source
# note keeps its weights and engines valid, so the spec hash leaves them out.
DESCRIPTIVE_FIELDS = frozenset({"name", "source"})


def canonical_spec_hash(data: Mapping[str, Any]) -> str:
    """The spec hash of canonical plain data (spec_to_dict / model_spec_to_dict): sha256 of its JSON with
    sorted keys, after leaving out the descriptive fields at every level and the paper form of the experts
    (the explicit form it normalises to is already there). So the paper and explicit parametrisations of
    one layer hash the same, and so do specs that differ only in name or source; every field that changes
    the computation (shapes, routing, balance, capacity, dtype, a model's attention and schedule) counts."""

    def semantic(value: Any, key: str = "") -> Any:
        if isinstance(value, Mapping):
            return {k: semantic(v, k) for k, v in value.items()
                    if k not in DESCRIPTIVE_FIELDS and not (key == "experts" and k == "paper")}
        if isinstance(value, (list, tuple)):
            return [semantic(v) for v in value]
        return value

    text = json.dumps(semantic(data), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def json_schema() -> dict:
    """JSON Schema (draft 2020-12) generated from the dataclasses, for editors."""
    return schema_of_section(LayerSpec, title="moe-ir MoE layer spec", schema_id="https://moe-ir/spec.schema.json")


def schema_of_section(root: type, *, title: str, schema_id: str) -> dict:
    """JSON Schema of any spec section class (the model spec reuses it), nested sections under `$defs`."""
    defs: dict[str, dict] = {}

    def schema_of(tp: Any, meta: Mapping[str, Any]) -> dict:
        tp, optional = _unwrap_optional(tp)
        if dataclasses.is_dataclass(tp):
            ref_name = tp.__name__
            if ref_name not in defs:
                defs[ref_name] = {}  # placeholder against recursion
                defs[ref_name] = section(tp)
            s: dict = {"$ref": f"#/$defs/{ref_name}"}
        elif isinstance(tp, type) and issubclass(tp, enum.Enum):
            s = {"type": "string", "enum": [m.value for m in tp]}
        elif typing.get_origin(tp) is tuple:
            s = {"type": "array", "items": schema_of(typing.get_args(tp)[0], {**meta, "doc": ""})}
        else:
            s = {"type": {int: "integer", float: "number", bool: "boolean", str: "string"}[tp]}
            for key, js in (("minimum", "minimum"), ("exclusive_minimum", "exclusiveMinimum"), ("maximum", "maximum"),
                            ("pattern", "pattern")):
                if meta.get(key) is not None:
                    s[js] = meta[key]
        if optional:
            s = {"anyOf": [s, {"type": "null"}]}
        if meta.get("doc"):
            s["description"] = meta["doc"]
        return s

    def section(cls: type) -> dict:
        hints = typing.get_type_hints(cls)
        props, required = {}, []
        for f in dataclasses.fields(cls):
            props[f.name] = schema_of(hints[f.name], f.metadata)
            if f.default is not dataclasses.MISSING and not isinstance(f.default, (type(None),)):
                d = f.default
                props[f.name]["default"] = d.value if isinstance(d, enum.Enum) else d
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if not has_default and not (cls is ExpertsSpec and f.name in _EXPLICIT_KEYS):
                required.append(f.name)
        out = {"type": "object", "properties": props, "additionalProperties": False,
               "description": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""}
        if required:
            out["required"] = required
        if cls is ExpertsSpec:
            out["anyOf"] = [{"required": ["paper"]}, {"required": ["routed", "width", "top_k"]}]
        return out

    root_schema = section(root)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": schema_id,
            "title": title, **root_schema, "$defs": defs}
