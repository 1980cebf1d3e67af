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

from moe_ir.builder import OUTPUT_BIAS, ROUTER_BIAS, ROUTER_LOGIT_BIAS, ROUTER_WEIGHT, SHARED_GATE_WEIGHT
from moe_ir.errors import WeightsError
from moe_ir.model_spec import AttentionKind, LayerForm, ModelSpec, NormKind, NormPosition, QKNorm
from moe_ir.spec import Activation, LayerSpec

__all__ = ["HFLayout", "Join", "LAYER_SHARED_MLP", "TensorRule", "PER_EXPERT_NAMES", "ROUTER_BIAS_NAMES",
           "ROUTER_WEIGHT_NAMES", "SHARED_MLP_NAMES", "moe_block_rules", "model_rules", "prefixed", "detect_layout",
           "detect_model_layout", "detect_router_names", "router_name", "shared_mlp_names", "DBRX_PREFIX",
           "DBRX_BLOCK", "DBRX_ROUTER_WEIGHT", "dbrx_model_rules", "layer_shared_mlp_rules"]


class HFLayout(enum.StrEnum):
    """How a checkpoint stores one MoE block's experts (see frontends/hf/weights.py)."""

    STACKED = "stacked"
    PER_EXPERT = "per_expert"
    PER_EXPERT_W123 = "per_expert_w123"
    STACKED_LINEAR = "stacked_linear"  # Granite hub checkpoints: input_linear [E, 2F, H] (gate, up), output_linear
    # DBRX: experts.mlp.w1 (gate) / v1 (up) / w2 (down, each expert's [F, H]), each [E*F, H]
    EXPERT_ROWS = "expert_rows"


# Per-expert projection names: (gate, up, down).
PER_EXPERT_NAMES = {HFLayout.PER_EXPERT: ("gate_proj", "up_proj", "down_proj"),
                    HFLayout.PER_EXPERT_W123: ("w1", "w3", "w2")}


class Join(enum.StrEnum):
    COPY = "copy"
    STACK = "stack"
    SPLIT = "split"
    UNSQUEEZE = "unsqueeze"  # theirs[0] is ours[0] with a dim of size 1 inserted at `dim` (ERNIE's [1, E] bias)
    INTERLEAVE = "interleave"
    # theirs[0] [E*A, B] holds the E experts' [A, B] matrices one after another (DBRX's w1 / v1 / w2); with
    # `transposed`, each expert's matrix is ours transposed (w2 stores down as [F, H]); sizes = (E,)
    EXPERT_ROWS = "expert_rows"


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
    # split: the parts' sizes along `dim` where they differ (DBRX's fused Wqkv: q, k, v); expert_rows: (E,)
    sizes: tuple[int, ...] = ()

    def their_shapes(self, our_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Checkpoint shapes that give the canonical shapes `our_shapes` through this rule."""
        shapes = [tuple(our_shapes[name]) for name in self.ours]
        if self.join == Join.EXPERT_ROWS:
            e, a, b = shapes[0]
            return {self.theirs[0]: (e * b, a) if self.transposed else (e * a, b)}
        if self.join == Join.COPY:
            out = {self.theirs[0]: shapes[0]}
        elif self.join == Join.STACK:
            out = {name: shapes[0][1:] for name in self.theirs}
        elif self.join == Join.UNSQUEEZE:
            out = {self.theirs[0]: shapes[0][:self.dim] + (1,) + shapes[0][self.dim:]}
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

        if self.join == Join.EXPERT_ROWS:
            per_expert = tensors[0].reshape(self.sizes[0], -1, tensors[0].shape[-1])
            return [per_expert.transpose(-1, -2) if self.transposed else per_expert]
        if self.transposed:
            tensors = [t.transpose(-1, -2) for t in tensors]
        if self.pad:
            tensors = [t[:t.shape[0] - self.pad] for t in tensors]
        if self.join == Join.COPY:
            return [tensors[0]]
        if self.join == Join.STACK:
            return [torch.stack(list(tensors))]
        if self.join == Join.UNSQUEEZE:
            return [tensors[0].squeeze(self.dim)]
        if self.join == Join.INTERLEAVE:
            n, lead = len(self.ours), (slice(None),) * (self.dim % tensors[0].dim())
            return [tensors[0][lead + (slice(i, None, n),)] for i in range(n)]
        if self.sizes:
            return list(torch.split(tensors[0], list(self.sizes), dim=self.dim))
        return list(torch.chunk(tensors[0], len(self.ours), dim=self.dim))

    def to_theirs(self, tensors: Sequence):
        import torch

        if self.join == Join.EXPERT_ROWS:
            per_expert = tensors[0].transpose(-1, -2) if self.transposed else tensors[0]
            return [per_expert.reshape(-1, per_expert.shape[-1])]
        if self.join == Join.COPY:
            out = [tensors[0]]
        elif self.join == Join.STACK:
            out = list(torch.unbind(tensors[0]))
        elif self.join == Join.UNSQUEEZE:
            out = [tensors[0].unsqueeze(self.dim)]
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


def shared_mlp_names(spec: LayerSpec, ungated: str = "shared_experts") -> tuple[str, str | None]:
    """(module name of the shared MLP, name of its gate weight): Qwen2-MoE's gated one, or the ungated one
    (DeepSeek's `shared_experts`, Hunyuan's `shared_mlp`)."""
    if spec.experts.shared_gate:
        return "shared_expert", "shared_expert_gate.weight"
    if spec.router.scale_input:  # Llama 4: one ungated shared expert
        return "shared_expert", None
    return ungated, None


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


# Where the selection bias sits in a block: under the router (DeepSeek-V3, GLM-4.5, dots1), on the block itself
# (MiniMax-M2), or as a [1, E] parameter of the router's statistics (ERNIE-4.5: under the router in transformers'
# module, beside it in the hub layout save_pretrained writes).
ROUTER_BIAS_NAMES = ("gate.e_score_correction_bias", "e_score_correction_bias",
                     "gate.moe_statics.e_score_correction_bias", "moe_statics.e_score_correction_bias",
                     "router.e_score_correction_bias")  # the last: LongCat-Flash's


# The router projection's name in a block: `gate` in most families, `router` in Granite's module, `router.layer`
# in Granite's hub checkpoints, `gate.wg` in Hunyuan's, `router.classifier` in LongCat-Flash's (found by name also
# when it has no identity experts, which router_name goes by).
ROUTER_WEIGHT_NAMES = ("gate.weight", "router.weight", "router.layer.weight", "gate.wg.weight",
                       "router.classifier.weight")
# The ungated shared MLP's module name in a block: DeepSeek's and most families', or Hunyuan's.
SHARED_MLP_NAMES = ("shared_experts", "shared_mlp")
# The shared MLP GraniteMoeShared keeps in the decoder layer beside its block (layers.i.shared_mlp).
LAYER_SHARED_MLP = "shared_mlp"


def moe_block_rules(spec: LayerSpec, layout: HFLayout | str, router_bias: str = ROUTER_BIAS_NAMES[0],
                    router_weight: str | None = None, shared_mlp: str = SHARED_MLP_NAMES[0]
                    ) -> list[TensorRule]:
    """Rules of one MoE block, names relative to the block (`gate.weight`) and to the layer (`router.weight`)."""
    layout = HFLayout(layout)
    e = spec.experts
    # The checkpoint's own name (detect_router_names) or the family's (router_name); a logit bias sits beside it.
    router_weight = router_weight or f"{router_name(spec, layout)}.weight"
    rules = [TensorRule((ROUTER_WEIGHT,), (router_weight,))]
    if spec.router.logit_bias:
        rules.append(TensorRule((ROUTER_LOGIT_BIAS,), (router_weight.removesuffix(".weight") + ".bias",)))
    if spec.balance.aux_free is not None:
        if e.identity:  # LongCat-Flash keeps it under its router
            rules.append(TensorRule((ROUTER_BIAS,), ("router.e_score_correction_bias",)))
        else:
            join = Join.UNSQUEEZE if "moe_statics." in router_bias else Join.COPY
            rules.append(TensorRule((ROUTER_BIAS,), (router_bias,), join))
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
    elif layout == HFLayout.STACKED_LINEAR:
        rules.append(TensorRule(("experts.w_gate", "experts.w_up"), ("input_linear.weight",), Join.SPLIT, dim=1))
        rules.append(TensorRule(("experts.w_down",), ("output_linear.weight",)))
    elif layout == HFLayout.EXPERT_ROWS:
        for ours, theirs, transposed in (("w_gate", "w1", False), ("w_up", "v1", False), ("w_down", "w2", True)):
            rules.append(TensorRule((f"experts.{ours}",), (f"experts.mlp.{theirs}",), Join.EXPERT_ROWS,
                                    transposed=transposed, sizes=(e.routed,)))
    else:
        for ours, theirs in zip(("w_gate", "w_up", "w_down"), PER_EXPERT_NAMES[layout]):
            rules.append(TensorRule((f"experts.{ours}",),
                                    tuple(f"experts.{i}.{theirs}.weight" for i in range(e.routed)), Join.STACK))
    if e.output_bias:  # JetMoE's block bias (JetMoeMoE.bias)
        rules.append(TensorRule((OUTPUT_BIAS,), ("bias",)))
    if e.shared:
        mlp, gate = shared_mlp_names(spec, shared_mlp)
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
    if a.qk_norm == QKNorm.HEAD_AFTER_ROPE:  # Hunyuan, the one family normalising after RoPE, names them so
        names.update({"q_norm.weight": "query_layernorm.weight", "k_norm.weight": "key_layernorm.weight"})
    return names


def _moa_rules(spec: ModelSpec, ours: str, theirs: str) -> list[TensorRule]:
    """JetMoE's attention (JetMoeAttention under `self_attention.`): the experts' router, query projections
    (input_linear [E, kv*d, H]), output projections (output_linear [E, H, kv*d]) and their bias under `experts.`,
    keys then values in one kv_proj."""
    a = spec.model.attention
    rules = [TensorRule((f"{ours}router.weight",), (f"{theirs}experts.router.layer.weight",)),
             TensorRule((f"{ours}w_q",), (f"{theirs}experts.input_linear.weight",)),
             TensorRule((f"{ours}w_o",), (f"{theirs}experts.output_linear.weight",)),
             TensorRule((f"{ours}w_k", f"{ours}w_v"), (f"{theirs}kv_proj.weight",), Join.SPLIT, dim=0)]
    if a.out_bias:
        rules.append(TensorRule((f"{ours}b_o",), (f"{theirs}experts.bias",)))
    return rules


def model_rules(spec: ModelSpec, graph_weights: Iterable[str], *, moe_block: str = "mlp",
                layout: HFLayout | str = HFLayout.PER_EXPERT, prefix: str = "model.",
                router_bias: str = ROUTER_BIAS_NAMES[0], router_weight: str | None = None,
                shared_mlp: str = SHARED_MLP_NAMES[0], layer_shared_mlp: str | None = None) -> list[TensorRule]:
    """Rules of a whole causal LM (transformers' names under `prefix`), one per graph weight group.

    `moe_block`: the MoE module's name in the checkpoint (`mlp`, or `block_sparse_moe` in Mixtral hub
    checkpoints); `layout`: how its experts are stored; `router_bias`: the selection bias's name in a block;
    `layer_shared_mlp`: the name of a shared MLP kept beside the block in the decoder layer, gate and up fused
    in input_linear (GraniteMoeShared's `shared_mlp`), instead of inside the block."""
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
    # Pre-norm: the norms before attention and FFN; post-norm (OLMo 2 style): the norms on their outputs.
    norms = [("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")]
    if m.norm_position == NormPosition.POST:
        norms = [("attn_norm", "post_attention_layernorm"), ("ffn_norm", "post_feedforward_layernorm")]
    if m.layer_form == LayerForm.DUAL_SHORTCUT_MOE:  # LongCat-Flash's router, with or without identity experts
        router_weight, router_bias = "router.classifier.weight", "router.e_score_correction_bias"
    block = moe_block_rules(spec.moe, layout, router_bias, router_weight, shared_mlp)
    if layer_shared_mlp:
        block = [r for r in block if not r.ours[0].startswith("shared.")]
    dense_block = "feed_forward" if moe_block == "feed_forward" else "mlp"  # Llama 4 names both FFNs so
    for i in range(m.layers):
        ours, theirs = f"layers.{i}.", f"{prefix}layers.{i}."
        if m.layer_form == LayerForm.DUAL_SHORTCUT_MOE:
            rules += _shortcut_moe_layer_rules(ours, theirs, attention, present, norm_parts)
            rules += prefixed(block, f"{ours}moe.", f"{theirs}{moe_block}.")
            continue
        for our_norm, their_norm in norms:
            for part in norm_parts:
                rules.append(TensorRule((f"{ours}{our_norm}.{part}",), (f"{theirs}{their_norm}.{part}",)))
        if m.attention.kind == AttentionKind.MOA:
            rules += _moa_rules(spec, f"{ours}attn.", f"{theirs}self_attention.")
        else:
            rules += [TensorRule((f"{ours}attn.{a}",), (f"{theirs}self_attn.{b}",)) for a, b in attention.items()
                      if f"{ours}attn.{a}" in present]
        if m.is_moe_layer(i):
            rules += prefixed(block, f"{ours}moe.", f"{theirs}{moe_block}.")
            if layer_shared_mlp and spec.moe.experts.shared:
                rules += layer_shared_mlp_rules(spec.moe, f"{ours}moe.", f"{theirs}{layer_shared_mlp}.")
        else:
            rules += [TensorRule((f"{ours}ffn.{a}",), (f"{theirs}{dense_block}.{b}.weight",))
                      for a, b in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))]
    return rules


def _shortcut_moe_layer_rules(ours: str, theirs: str, attention: Mapping[str, str], present: set[str],
                              norm_parts: tuple[str, ...]) -> list[TensorRule]:
    """LongCat-Flash's two sublayers j of a layer: self_attn.{j}, input_layernorm.{j} (before attention),
    post_attention_layernorm.{j} (before the FFN) and the dense mlps.{j}; the MoE block is the caller's."""
    rules = []
    for j in range(2):
        for our_norm, their_norm in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            rules += [TensorRule((f"{ours}{our_norm}.{j}.{part}",), (f"{theirs}{their_norm}.{j}.{part}",))
                      for part in norm_parts]
        rules += [TensorRule((f"{ours}attn.{j}.{a}",), (f"{theirs}self_attn.{j}.{b}",)) for a, b in attention.items()
                  if f"{ours}attn.{j}.{a}" in present]
        rules += [TensorRule((f"{ours}ffn.{j}.{a}",), (f"{theirs}mlps.{j}.{b}.weight",))
                  for a, b in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))]
    return rules


def layer_shared_mlp_rules(spec: LayerSpec, ours: str, theirs: str) -> list[TensorRule]:
    """GraniteMoeShared's one shared MLP beside the block: input_linear [2S, H] is gate then up (its forward
    chunks the output in two), output_linear [H, S] the down projection."""
    if spec.experts.shared != 1:
        raise WeightsError(f"a shared MLP beside the MoE block is one MLP; the spec has {spec.experts.shared} "
                           "shared experts")
    return [TensorRule((f"{ours}shared.0.w_gate", f"{ours}shared.0.w_up"), (f"{theirs}input_linear.weight",),
                       Join.SPLIT, dim=0),
            TensorRule((f"{ours}shared.0.w_down",), (f"{theirs}output_linear.weight",))]


# DBRX's checkpoints name everything their own way, under `transformer.` (DbrxForCausalLM): its MoE block is
# `ffn` in each of transformer.blocks, its router projection router.layer.
DBRX_PREFIX = "transformer.blocks."
DBRX_BLOCK = "ffn"
DBRX_ROUTER_WEIGHT = "router.layer.weight"


def dbrx_model_rules(spec: ModelSpec, graph_weights: Iterable[str]) -> list[TensorRule]:
    """Rules of a DBRX causal LM: the fused Wqkv split into q, k and v (unequal parts with GQA), each expert
    projection one [E*F, H] matrix (w1 gate, v1 up, w2 down stored as [F, H] per expert), biasless LayerNorms
    norm_1 / norm_2 / norm_f, the router under ffn.router.layer."""
    m, a = spec.model, spec.model.attention
    d = a.dim(m.hidden)
    q, kv = a.heads * d, a.num_kv_heads * d
    rules = [TensorRule(("embed.weight",), ("transformer.wte.weight",)),
             TensorRule(("norm.weight",), ("transformer.norm_f.weight",))]
    if not m.tied_embeddings:
        rules.append(TensorRule(("lm_head.weight",), ("lm_head.weight",)))
    for i in range(m.layers):
        ours, theirs = f"layers.{i}.", f"{DBRX_PREFIX}{i}."
        attn = f"{theirs}norm_attn_norm."
        rules += [TensorRule((f"{ours}attn_norm.weight",), (f"{attn}norm_1.weight",)),
                  TensorRule((f"{ours}ffn_norm.weight",), (f"{attn}norm_2.weight",)),
                  TensorRule((f"{ours}attn.w_q", f"{ours}attn.w_k", f"{ours}attn.w_v"), (f"{attn}attn.Wqkv.weight",),
                             Join.SPLIT, sizes=(q, kv, kv)),
                  TensorRule((f"{ours}attn.w_o",), (f"{attn}attn.out_proj.weight",))]
        rules += prefixed(moe_block_rules(spec.moe, HFLayout.EXPERT_ROWS, router_weight=DBRX_ROUTER_WEIGHT),
                          f"{ours}moe.", f"{theirs}{DBRX_BLOCK}.")
    present = set(graph_weights)
    covered = [n for r in rules for n in r.ours]
    # either way round: a dense layer's FFN has no MoE weights to give, a bias or shared expert no DBRX name
    unplaced = [n for n in covered if n not in present] + sorted(present - set(covered))
    if unplaced:
        raise WeightsError(f"the DBRX tensor layout has no place for the spec's {unplaced[:4]}: a DBRX model has no "
                           "biases, q/k norms, shared experts or dense layers")
    return rules


def detect_layout(names: Iterable[str]) -> HFLayout:
    """The expert layout a block's tensor names (relative to the block) use; stacked when none identifies one."""
    import re

    names = list(names)
    if any(re.fullmatch(r"experts\.\d+\.w[123]\.weight", k) for k in names):
        return HFLayout.PER_EXPERT_W123
    if any(re.fullmatch(r"experts\.\d+\.(gate|up|down)_proj\.weight", k) for k in names):
        return HFLayout.PER_EXPERT
    if "input_linear.weight" in names:
        return HFLayout.STACKED_LINEAR
    if "experts.mlp.w1" in names:
        return HFLayout.EXPERT_ROWS
    return HFLayout.STACKED


def detect_router_names(spec: ModelSpec, names: Iterable[str], block: str, prefix: str = "model.") -> dict[str, str]:
    """The router's and the shared MLP's names in a block of this checkpoint (ROUTER_WEIGHT_NAMES,
    ROUTER_BIAS_NAMES, SHARED_MLP_NAMES), read at the first MoE layer: keyword arguments of model_rules."""
    under = f"{prefix}layers.{spec.model.moe_layers[0]}.{block}."
    present = set(names)
    beside = f"{prefix}layers.{spec.model.moe_layers[0]}.{LAYER_SHARED_MLP}.input_linear.weight"
    return {"layer_shared_mlp": LAYER_SHARED_MLP if beside in present else None,
            "router_weight": next((n for n in ROUTER_WEIGHT_NAMES if under + n in present), None),
            "router_bias": next((n for n in ROUTER_BIAS_NAMES if under + n in present), ROUTER_BIAS_NAMES[0]),
            "shared_mlp": next((n for n in SHARED_MLP_NAMES if any(p.startswith(f"{under}{n}.") for p in present)),
                               SHARED_MLP_NAMES[0])}


def detect_model_layout(spec: ModelSpec, names: Iterable[str], prefix: str = "model.") -> tuple[str, HFLayout]:
    """(MoE module name, expert layout) of a whole-model checkpoint, read from the first MoE layer's names."""
    first = spec.model.moe_layers[0]
    names = list(names)
    for block in ("mlp", "block_sparse_moe", "feed_forward"):
        under = f"{prefix}layers.{first}.{block}."
        inside = [n[len(under):] for n in names if n.startswith(under)]
        if any(n.startswith("experts.") or n == "input_linear.weight" for n in inside):
            return block, detect_layout(inside)
    return "mlp", HFLayout.STACKED
