"""Where each Hugging Face tensor goes in moe-ir's canonical weights, and back: the one table both directions use.

A `TensorRule` ties canonical tensors (`ours`) to checkpoint tensors (`theirs`) by one of three joins:

  copy    one tensor each side, same shape
  stack   ours[0] [E, ...] is theirs[0..E-1] stacked (per-expert tensors of a hub checkpoint)
  split   ours are equal chunks of theirs[0] along `dim` (transformers' fused gate_up_proj; DeepSeek's
          shared experts stored as one MLP of width n_shared x F)
  interleave  ours are the strided parts of theirs[0] along `dim` (gpt-oss: gate = [::2], up = [1::2])

`transposed`: the checkpoint stores the matrix as [..., in, out] (gpt-oss's experts), moe-ir as [..., out, in];
import transposes the last two dims before the join, export after it (`dim` is always ours).

Import applies `to_ours`, export `to_theirs`; the checkpoint shapes a spec expects (`their_shapes`) follow
from the graph's shapes through the same rule, so names, shapes and layout are stated once. Rules carry
full names, so a converter can run them one at a time and hold only that rule's tensors (streaming).
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Iterable, Mapping, Sequence

from moe_ir.builder import ROUTER_BIAS, ROUTER_LOGIT_BIAS, ROUTER_WEIGHT, SHARED_GATE_WEIGHT
from moe_ir.errors import WeightsError
from moe_ir.model_spec import AttentionKind, ModelSpec, NormKind
from moe_ir.spec import Activation, LayerSpec

__all__ = ["HFLayout", "Join", "TensorRule", "PER_EXPERT_NAMES", "moe_block_rules", "model_rules", "prefixed",
           "detect_layout", "detect_model_layout", "router_name", "shared_mlp_names"]


class HFLayout(enum.StrEnum):
    """How a checkpoint stores one MoE block's experts (see frontends/hf/weights.py)."""

    STACKED = "stacked"
    PER_EXPERT = "per_expert"
    PER_EXPERT_W123 = "per_expert_w123"


# Per-expert projection names: (gate, up, down).
PER_EXPERT_NAMES = {HFLayout.PER_EXPERT: ("gate_proj", "up_proj", "down_proj"),
                    HFLayout.PER_EXPERT_W123: ("w1", "w3", "w2")}


class Join(enum.StrEnum):
    COPY = "copy"
    STACK = "stack"
    SPLIT = "split"
    INTERLEAVE = "interleave"


@dataclasses.dataclass(frozen=True)
class TensorRule:
    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    join: Join = Join.COPY
    dim: int = 0
    transposed: bool = False
    # theirs[0] holds `pad` more entries along dim 0 after ours, which the model never reads (LongCat-Flash's
    # gate_up_proj has rows for its identity experts): dropped on import, zeros on export.
    pad: int = 0

    def their_shapes(self, our_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Checkpoint shapes that give the canonical shapes `our_shapes` through this rule."""
        shapes = [tuple(our_shapes[name]) for name in self.ours]
        if self.join == Join.COPY:
            out = {self.theirs[0]: shapes[0]}
        elif self.join == Join.STACK:
            out = {name: shapes[0][1:] for name in self.theirs}
        else:
            whole = list(shapes[0])
            whole[self.dim] = sum(s[self.dim] for s in shapes)
            out = {self.theirs[0]: tuple(whole)}
        if self.transposed:
            out = {name: shape[:-2] + (shape[-1], shape[-2]) for name, shape in out.items()}
        if self.pad:
            out = {name: (shape[0] + self.pad,) + shape[1:] for name, shape in out.items()}
        return out

    def to_ours(self, tensors: Sequence):
        import torch

        if self.transposed:
            tensors = [t.transpose(-1, -2) for t in tensors]
        if self.pad:
            tensors = [t[:t.shape[0] - self.pad] for t in tensors]
        if self.join == Join.COPY:
            return [tensors[0]]
        if self.join == Join.STACK:
            return [torch.stack(list(tensors))]
        if self.join == Join.INTERLEAVE:
            n, lead = len(self.ours), (slice(None),) * (self.dim % tensors[0].dim())
            return [tensors[0][lead + (slice(i, None, n),)] for i in range(n)]
        return list(torch.chunk(tensors[0], len(self.ours), dim=self.dim))

    def to_theirs(self, tensors: Sequence):
        import torch

        if self.join == Join.COPY:
            out = [tensors[0]]
        elif self.join == Join.STACK:
            out = list(torch.unbind(tensors[0]))
        elif self.join == Join.INTERLEAVE:
            dim = self.dim % tensors[0].dim()
            out = [torch.stack(list(tensors), dim=dim + 1).flatten(dim, dim + 1)]
        else:
            out = [torch.cat(list(tensors), dim=self.dim)]
        if self.transposed:
            out = [t.transpose(-1, -2) for t in out]
        if self.pad:
            out = [torch.cat([t, t.new_zeros((self.pad,) + tuple(t.shape[1:]))]) for t in out]
        return out


def prefixed(rules: Iterable[TensorRule], ours: str, theirs: str) -> list[TensorRule]:
    return [dataclasses.replace(r, ours=tuple(ours + n for n in r.ours), theirs=tuple(theirs + n for n in r.theirs))
            for r in rules]


def shared_mlp_names(spec: LayerSpec) -> tuple[str, str | None]:
    """(module name of the shared MLP, name of its gate weight): Qwen2-MoE's gated one or DeepSeek's."""
    if spec.experts.shared_gate:
        return "shared_expert", "shared_expert_gate.weight"
    if spec.router.scale_input:  # Llama 4: one ungated shared expert
        return "shared_expert", None
    return "shared_experts", None


def router_name(spec: LayerSpec, layout: HFLayout | str) -> str:
    """The block's router module: `gate`, except `router` in gpt-oss (the one family whose router has a logit
    bias), in Llama 4 (the one family whose weights scale the expert inputs) and in transformers' own PhiMoE
    module (the one family with SparseMixer routing; PhiMoE hub
    checkpoints keep `gate`)."""
    r = spec.router
    if spec.experts.identity:  # LongCat-Flash: router.classifier
        return "router.classifier"
    if r.logit_bias or r.scale_input or (r.sparse_mixer is not None and HFLayout(layout) == HFLayout.STACKED):
        return "router"
    return "gate"


def _llama4_experts() -> list[TensorRule]:
    """transformers' Llama4TextExperts (the one family whose routing weights scale the expert inputs): matrices
    stored [E, in, out], gate then up along the output of gate_up_proj."""
    return [TensorRule(("experts.w_gate", "experts.w_up"), ("experts.gate_up_proj",), Join.SPLIT, dim=1,
                       transposed=True),
            TensorRule(("experts.w_down",), ("experts.down_proj",), transposed=True)]


def _gpt_oss_experts() -> list[TensorRule]:
    """transformers' GptOssExperts (the one family with clamped SwiGLU): matrices stored [E, in, out], gate and
    up interleaved along the output (gate = [::2], up = [1::2]), their biases likewise, down's bias beside."""
    return [TensorRule(("experts.w_gate", "experts.w_up"), ("experts.gate_up_proj",), Join.INTERLEAVE, dim=1,
                       transposed=True),
            TensorRule(("experts.b_gate", "experts.b_up"), ("experts.gate_up_proj_bias",), Join.INTERLEAVE, dim=1),
            TensorRule(("experts.w_down",), ("experts.down_proj",), transposed=True),
            TensorRule(("experts.b_down",), ("experts.down_proj_bias",))]


def moe_block_rules(spec: LayerSpec, layout: HFLayout | str) -> list[TensorRule]:
    """Rules of one MoE block, names relative to the block (`gate.weight`) and to the layer (`router.weight`)."""
    layout = HFLayout(layout)
    e = spec.experts
    router = router_name(spec, layout)
    rules = [TensorRule((ROUTER_WEIGHT,), (f"{router}.weight",))]
    if spec.router.logit_bias:
        rules.append(TensorRule((ROUTER_LOGIT_BIAS,), (f"{router}.bias",)))
    if spec.balance.aux_free is not None:
        holder = "router" if e.identity else "gate"
        rules.append(TensorRule((ROUTER_BIAS,), (f"{holder}.e_score_correction_bias",)))
    if e.activation == Activation.CLAMPED_SWIGLU:
        if layout != HFLayout.STACKED:
            raise WeightsError(f"gpt-oss experts (clamped_swiglu, biases) have one Hugging Face layout, stacked "
                               f"(experts.gate_up_proj [E, H, 2F]); not {layout.value}")
        rules += _gpt_oss_experts()
    elif spec.router.scale_input:
        if layout != HFLayout.STACKED:
            raise WeightsError(f"Llama 4 experts have one Hugging Face layout, stacked (experts.gate_up_proj "
                               f"[E, H, 2F]); not {layout.value}")
        rules += _llama4_experts()
    elif layout == HFLayout.STACKED:
        # LongCat-Flash's gate_up_proj also holds (unused) rows for its identity experts.
        rules.append(TensorRule(("experts.w_gate", "experts.w_up"), ("experts.gate_up_proj",), Join.SPLIT, dim=1,
                                pad=e.identity))
        rules.append(TensorRule(("experts.w_down",), ("experts.down_proj",)))
    else:
        for ours, theirs in zip(("w_gate", "w_up", "w_down"), PER_EXPERT_NAMES[layout]):
            rules.append(TensorRule((f"experts.{ours}",),
                                    tuple(f"experts.{i}.{theirs}.weight" for i in range(e.routed)), Join.STACK))
    if e.shared:
        mlp, gate = shared_mlp_names(spec)
        for ours, theirs, dim in (("w_gate", "gate_proj", 0), ("w_up", "up_proj", 0), ("w_down", "down_proj", 1)):
            rules.append(TensorRule(tuple(f"shared.{i}.{ours}" for i in range(e.shared)), (f"{mlp}.{theirs}.weight",),
                                    Join.SPLIT, dim=dim))
        if gate:
            rules.append(TensorRule((SHARED_GATE_WEIGHT,), (gate,)))
    return rules


def _attention_names(spec: ModelSpec) -> dict[str, str]:
    """Canonical attention weight name (under `layers.i.attn.`) -> transformers name (under `...self_attn.`);
    the graph keeps the ones the spec has (biases, q_lora, qk norms)."""
    a = spec.model.attention
    if a.kind == AttentionKind.MLA:
        names = {"w_kv_a": "kv_a_proj_with_mqa.weight", "kv_a_norm.weight": "kv_a_layernorm.weight",
                 "w_kv_b": "kv_b_proj.weight", "w_o": "o_proj.weight", "b_kv_a": "kv_a_proj_with_mqa.bias",
                 "b_o": "o_proj.bias"}
        if a.q_lora_rank is None:
            names["w_q"] = "q_proj.weight"
        else:
            names.update({"w_q_a": "q_a_proj.weight", "q_a_norm.weight": "q_a_layernorm.weight",
                          "w_q_b": "q_b_proj.weight", "b_q_a": "q_a_proj.bias"})
        return names
    names = {f"w_{k}": f"{k}_proj.weight" for k in "qkvo"}
    names.update({f"b_{k}": f"{k}_proj.bias" for k in "qkvo"})
    names.update({"q_norm.weight": "q_norm.weight", "k_norm.weight": "k_norm.weight", "sinks": "sinks"})
    return names


def model_rules(spec: ModelSpec, graph_weights: Iterable[str], *, moe_block: str = "mlp",
                layout: HFLayout | str = HFLayout.PER_EXPERT, prefix: str = "model.") -> list[TensorRule]:
    """Rules of a whole causal LM (transformers' names under `prefix`), one per graph weight group.

    `moe_block`: the MoE module's name in the checkpoint (`mlp`, or `block_sparse_moe` in Mixtral hub
    checkpoints); `layout`: how its experts are stored."""
    present = set(graph_weights)
    m = spec.model
    # LayerNorm models (PhiMoE) add each norm's bias beside its weight.
    norm_parts = ("weight", "bias") if m.norm == NormKind.LAYER else ("weight",)
    rules = [TensorRule(("embed.weight",), (f"{prefix}embed_tokens.weight",))]
    rules += [TensorRule((f"norm.{part}",), (f"{prefix}norm.{part}",)) for part in norm_parts]
    if not m.tied_embeddings:
        rules.append(TensorRule(("lm_head.weight",), ("lm_head.weight",)))
    if m.lm_head_bias:
        rules.append(TensorRule(("lm_head.bias",), ("lm_head.bias",)))
    attention = _attention_names(spec)
    block = moe_block_rules(spec.moe, layout)
    for i in range(m.layers):
        ours, theirs = f"layers.{i}.", f"{prefix}layers.{i}."
        for part in norm_parts:
            rules.append(TensorRule((f"{ours}attn_norm.{part}",), (f"{theirs}input_layernorm.{part}",)))
            rules.append(TensorRule((f"{ours}ffn_norm.{part}",), (f"{theirs}post_attention_layernorm.{part}",)))
        rules += [TensorRule((f"{ours}attn.{a}",), (f"{theirs}self_attn.{b}",)) for a, b in attention.items()
                  if f"{ours}attn.{a}" in present]
        if m.is_moe_layer(i):
            rules += prefixed(block, f"{ours}moe.", f"{theirs}{moe_block}.")
        else:
            rules += [TensorRule((f"{ours}ffn.{a}",), (f"{theirs}mlp.{b}.weight",))
                      for a, b in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))]
    return rules


def detect_layout(names: Iterable[str]) -> HFLayout:
    """The expert layout a block's tensor names (relative to the block) use; stacked when none identifies one."""
    import re

    names = list(names)
    if any(re.fullmatch(r"experts\.\d+\.w[123]\.weight", k) for k in names):
        return HFLayout.PER_EXPERT_W123
    if any(re.fullmatch(r"experts\.\d+\.(gate|up|down)_proj\.weight", k) for k in names):
        return HFLayout.PER_EXPERT
    return HFLayout.STACKED


def detect_model_layout(spec: ModelSpec, names: Iterable[str], prefix: str = "model.") -> tuple[str, HFLayout]:
    """(MoE module name, expert layout) of a whole-model checkpoint, read from the first MoE layer's names."""
    first = spec.model.moe_layers[0]
    names = list(names)
    for block in ("mlp", "block_sparse_moe"):
        under = f"{prefix}layers.{first}.{block}."
        inside = [n[len(under):] for n in names if n.startswith(under)]
        if any(n.startswith("experts.") for n in inside):
            return block, detect_layout(inside)
    return "mlp", HFLayout.STACKED
