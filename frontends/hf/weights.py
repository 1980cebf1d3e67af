"""Hugging Face MoE block weights <-> moe-ir canonical weights, by name and shape, without pickle.

Layouts of one MoE block's tensors (names relative to the block, e.g. under `model.layers.3.mlp.`):

  stacked          transformers >= 5 modules and their saved checkpoints:
                   experts.gate_up_proj [E, 2F, H] (gate rows first, then up rows), experts.down_proj [E, H, F]
  per_expert       DeepSeek, Qwen2-MoE and OLMoE hub checkpoints (and transformers 4):
                   experts.{i}.gate_proj.weight [F, H], experts.{i}.up_proj.weight [F, H],
                   experts.{i}.down_proj.weight [H, F]
  per_expert_w123  Mixtral hub checkpoints (under `block_sparse_moe.`): experts.{i}.w1 (gate) / w3 (up) / w2 (down)
  expert_rows      DBRX (under `transformer.blocks.{n}.ffn.`): experts.mlp.w1 (gate) / v1 (up) [E*F, H], w2 (down,
                   each expert's matrix transposed) [E*F, H]

and in every layout: gate.weight [E, H] (router; router.layer.weight in Granite hub checkpoints and DBRX),
gate.e_score_correction_bias [E] (DeepSeek-V3), shared_experts.{gate,up,down}_proj.weight (DeepSeek: one MLP of
width n_shared x F), shared_expert.{gate,up,down}_proj.weight and shared_expert_gate.weight [1, H] (Qwen2-MoE).
GraniteMoeShared keeps its shared MLP beside the block, in the decoder layer (`model.layers.{n}.shared_mlp.`,
input_linear = gate and up, output_linear = down): read from there when the block holds none.

DeepSeek's fused shared MLP is split into the spec's `shared` experts along the intermediate dimension
(see frontends/hf/config.py for why) and concatenated back on export; both directions are exact.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from moe_ir.builder import build_graph
from moe_ir.errors import WeightsError
from moe_ir.interpreter import check_weights
from moe_ir.spec import Activation, LayerSpec
from .tensor_map import (DBRX_BLOCK, DBRX_PREFIX, LAYER_SHARED_MLP, ROUTER_BIAS_NAMES, ROUTER_WEIGHT_NAMES,
                         SHARED_MLP_NAMES, HFLayout, TensorRule, detect_layout, layer_shared_mlp_rules, moe_block_rules)

__all__ = ["HFLayout", "hf_layer_prefix", "read_hf_tensors", "weights_from_hf", "weights_to_hf", "detect_layout"]


def hf_layer_prefix(layer: int, layout: HFLayout | str = HFLayout.STACKED, *,
                    layers_prefix: str = "model.layers") -> str:
    """Prefix of decoder layer `layer`'s MoE block in a full causal-LM checkpoint (DBRX's for its expert_rows
    layout, whatever `layers_prefix`)."""
    if HFLayout(layout) == HFLayout.EXPERT_ROWS:
        return f"{DBRX_PREFIX}{layer}.{DBRX_BLOCK}."
    block = "block_sparse_moe" if HFLayout(layout) == HFLayout.PER_EXPERT_W123 else "mlp"
    return f"{layers_prefix}.{layer}.{block}."


def _norm_prefix(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith(".") else prefix + "."


# ----------------------------------------------------------------------------------------------
# reading tensors


def read_hf_tensors(source: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors under `prefix` (names with the prefix removed) from a state dict, an nn.Module, or
    safetensors file(s): a file, a list of files, a folder, or a `*.safetensors.index.json`.
    Only the tensors under the prefix are read from disk."""
    from .safetensors_io import Checkpoint

    prefix = _norm_prefix(prefix)
    with Checkpoint(source) as ckpt:
        names = [k for k in ckpt.entries if k.startswith(prefix)]
        return {k[len(prefix):]: t for k, t in zip(names, ckpt.read_many(names))}


# ----------------------------------------------------------------------------------------------
# expected names and shapes


def _check_spec(spec: LayerSpec) -> None:
    e = spec.experts
    problems = []
    if not e.activation.gated:
        problems.append(f"activation {e.activation.value} is not gated; Hugging Face MoE blocks hold gated experts")
    clamped = e.activation == Activation.CLAMPED_SWIGLU
    if e.bias and not clamped:
        problems.append("experts.bias is set; of the Hugging Face MoE blocks only gpt-oss's (clamped_swiglu) have "
                        "expert biases")
    if clamped and not e.bias:
        problems.append("clamped_swiglu without experts.bias; gpt-oss's experts (the Hugging Face block with this "
                        "activation) carry biases")
    if spec.router.noise is not None:
        problems.append("router.noise needs router.noise_weight, which no Hugging Face MoE block has")
    if problems:
        raise WeightsError(f"spec '{spec.name}' has no Hugging Face weight layout: " + "; ".join(problems))


def _block_names(names: Iterable[str]) -> dict[str, str]:
    """The router's, its bias's and the shared MLP's names this block uses (Granite's router.layer, Hunyuan's
    gate.wg and shared_mlp, MiniMax's block-level and ERNIE's moe_statics bias): moe_block_rules' keywords."""
    names = set(names)
    found = {"router_weight": next((n for n in ROUTER_WEIGHT_NAMES if n in names), None)}
    bias = next((n for n in ROUTER_BIAS_NAMES if n in names), None)
    shared = next((n for n in SHARED_MLP_NAMES if any(k.startswith(f"{n}.") for k in names)), None)
    return {**found, **({"router_bias": bias} if bias else {}), **({"shared_mlp": shared} if shared else {})}


def _expected_hf_shapes(spec: LayerSpec, rules: Iterable[TensorRule]) -> dict[str, tuple[int, ...]]:
    our_shapes = {name: tuple(v.type.shape) for name, v in build_graph(spec).weights.items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for rule in rules:
        shapes.update(rule.their_shapes(our_shapes))
    return shapes


def _shared_mlp_beside(source: Any, spec: LayerSpec, prefix: str, found: Mapping[str, torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
    """GraniteMoeShared's shared MLP in the decoder layer beside the block at `prefix` (`model.layers.3.` +
    `shared_mlp.`), named relative to the block as `shared_mlp.*`; empty when the spec has no shared expert, the
    block holds one itself, or the prefix names no block inside a layer."""
    inside = any(k.startswith(f"{n}.") for n in SHARED_MLP_NAMES + ("shared_expert",) for k in found)
    if not spec.experts.shared or inside or prefix.count(".") < 2:
        return {}
    layer = prefix[:-1].rsplit(".", 1)[0] + "."
    beside = read_hf_tensors(source, f"{layer}{LAYER_SHARED_MLP}.")
    return {f"{LAYER_SHARED_MLP}.{k}": t for k, t in beside.items()}


def _sorted_experts_first(names: Iterable[str]) -> list[str]:
    def key(name: str) -> tuple:
        return tuple(int(p) if p.isdigit() else p for p in name.split("."))
    return sorted(names, key=key)


def _mismatch_error(what: str, expected: Mapping[str, tuple[int, ...]], found: Mapping[str, torch.Tensor],
                    hint: str = "") -> WeightsError | None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k}: expected {list(s)}, found {list(found[k].shape)}" for k, s in expected.items()
             if k in found and tuple(found[k].shape) != s]
    if not (missing or unexpected or wrong):
        return None

    def listing(names: list[str]) -> str:
        names = _sorted_experts_first(names)
        return ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    parts = []
    if missing:
        parts.append("missing: " + listing(missing))
    if unexpected:
        parts.append("unexpected: " + listing(unexpected))
    if wrong:
        more = f"; ... ({len(wrong)} in all)" if len(wrong) > 12 else ""
        parts.append("wrong shape: " + "; ".join(wrong[:12]) + more)
    if any(k.endswith(("_scale_inv", "_scale", ".qweight", ".scales")) for k in unexpected):
        hint += " The checkpoint holds quantized tensors: dequantize it before importing."
    return WeightsError(f"{what}: " + " | ".join(parts) + (f".{hint}" if hint else ""))


# ----------------------------------------------------------------------------------------------
# import / export


def weights_from_hf(source: Any, spec: LayerSpec, layer_prefix: str = "", *, layout: HFLayout | str | None = None,
                    cast: bool = True) -> dict[str, torch.Tensor]:
    """Canonical moe-ir weights of one MoE layer from a Hugging Face MoE block.

    `source`: a state dict, an nn.Module (a block or a whole model), or safetensors path(s) (file, list,
    folder, or index json). `layer_prefix`: where the block sits, e.g. "model.layers.3.mlp." ("" for a
    block's own state dict; see `hf_layer_prefix`). `layout`: detected from the names when None.
    With `cast`, every tensor takes the dtype the spec's graph declares for it (the router in its
    router dtype, the bias in float32, experts in the spec dtype). Every name and shape under the
    prefix must match the spec: WeightsError lists missing, unexpected and mis-shaped tensors."""
    _check_spec(spec)
    prefix = _norm_prefix(layer_prefix)
    found = read_hf_tensors(source, prefix)
    if not found:
        raise WeightsError(f"no tensors under prefix '{prefix}' in the source; pass the MoE block's prefix, "
                           "e.g. 'model.layers.3.mlp.'")
    layout = detect_layout(found) if layout is None else HFLayout(layout)
    names = _block_names(found)
    rules = moe_block_rules(spec, layout, **names)
    beside = _shared_mlp_beside(source, spec, prefix, found)
    if beside:  # its names (shared_mlp.*) cannot clash with the block's: the block holds no shared MLP
        rules = [r for r in rules if not r.ours[0].startswith("shared.")] + \
            layer_shared_mlp_rules(spec, "", f"{LAYER_SHARED_MLP}.")
        found = {**found, **beside}
    expected = _expected_hf_shapes(spec, rules)
    where = f"'{prefix}'" + (f" and the shared MLP beside it ('{LAYER_SHARED_MLP}.*')" if beside else "")
    err = _mismatch_error(f"Hugging Face weights under {where} ({layout.value} layout) do not match spec "
                          f"'{spec.name}'", expected, found)
    if err is not None:
        raise err

    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        out.update(zip(rule.ours, rule.to_ours([found[name] for name in rule.theirs])))

    graph = build_graph(spec)
    check_weights(graph, out)
    # Own, contiguous storage: slices of one HF tensor must not share memory (safetensors refuses that).
    return {name: (t.to(graph.weights[name].type.dtype.torch) if cast else t).contiguous().clone()
            for name, t in out.items()}


def weights_to_hf(weights: Mapping[str, torch.Tensor], spec: LayerSpec, layout: HFLayout | str = HFLayout.STACKED,
                  *, prefix: str = "") -> dict[str, torch.Tensor]:
    """Hugging Face tensors of one MoE block from canonical weights (the inverse of `weights_from_hf`).

    The result loads into the transformers block with `load_state_dict(..., strict=True)` (stacked
    layout, empty prefix) or saves as a checkpoint shard (`prefix` such as 'model.layers.3.mlp.')."""
    _check_spec(spec)
    layout = HFLayout(layout)
    check_weights(build_graph(spec), weights)
    out: dict[str, torch.Tensor] = {}
    for rule in moe_block_rules(spec, layout):
        out.update(zip(rule.theirs, rule.to_theirs([weights[name] for name in rule.ours])))
    p = _norm_prefix(prefix)
    return {p + name: t.contiguous().clone() for name, t in out.items()}
