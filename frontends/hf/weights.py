"""Hugging Face MoE block weights <-> moe-ir canonical weights, by name and shape, without pickle.

Layouts of one MoE block's tensors (names relative to the block, e.g. under `model.layers.3.mlp.`):

  stacked          transformers >= 5 modules and their saved checkpoints:
                   experts.gate_up_proj [E, 2F, H] (gate rows first, then up rows), experts.down_proj [E, H, F]
  per_expert       DeepSeek, Qwen2-MoE and OLMoE hub checkpoints (and transformers 4):
                   experts.{i}.gate_proj.weight [F, H], experts.{i}.up_proj.weight [F, H],
                   experts.{i}.down_proj.weight [H, F]
  per_expert_w123  Mixtral hub checkpoints (under `block_sparse_moe.`): experts.{i}.w1 (gate) / w3 (up) / w2 (down)

and in every layout: gate.weight [E, H] (router), gate.e_score_correction_bias [E] (DeepSeek-V3),
shared_experts.{gate,up,down}_proj.weight (DeepSeek: one MLP of width n_shared x F),
shared_expert.{gate,up,down}_proj.weight and shared_expert_gate.weight [1, H] (Qwen2-MoE).

DeepSeek's fused shared MLP is split into the spec's `shared` experts along the intermediate dimension
(see frontends/hf/config.py for why) and concatenated back on export; both directions are exact.
"""
from __future__ import annotations

import enum
import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from moe_ir.builder import ROUTER_BIAS, ROUTER_WEIGHT, SHARED_GATE_WEIGHT, build_graph
from moe_ir.errors import WeightsError
from moe_ir.interpreter import check_weights
from moe_ir.spec import LayerSpec

__all__ = ["HFLayout", "hf_layer_prefix", "read_hf_tensors", "weights_from_hf", "weights_to_hf", "detect_layout"]


class HFLayout(enum.StrEnum):
    STACKED = "stacked"
    PER_EXPERT = "per_expert"
    PER_EXPERT_W123 = "per_expert_w123"


# Per-expert projection names: (gate, up, down).
_PER_EXPERT_NAMES = {HFLayout.PER_EXPERT: ("gate_proj", "up_proj", "down_proj"),
                     HFLayout.PER_EXPERT_W123: ("w1", "w3", "w2")}


def hf_layer_prefix(layer: int, layout: HFLayout | str = HFLayout.STACKED, *,
                    layers_prefix: str = "model.layers") -> str:
    """Prefix of decoder layer `layer`'s MoE block in a full causal-LM checkpoint."""
    block = "block_sparse_moe" if HFLayout(layout) == HFLayout.PER_EXPERT_W123 else "mlp"
    return f"{layers_prefix}.{layer}.{block}."


def _norm_prefix(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith(".") else prefix + "."


# ----------------------------------------------------------------------------------------------
# reading tensors


def _safetensors_files(path: Path, prefix: str) -> list[Path]:
    """The safetensors files to read for `prefix`: a file, an index json's files, or a folder's."""
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if indexes:
            path = indexes[0]
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise WeightsError(f"{path}: no *.safetensors files in this folder")
            return files
    if not path.exists():
        raise WeightsError(f"{path}: no such weights file")
    if path.suffix == ".json":
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise WeightsError(f"{path}: not a safetensors index (a JSON object with 'weight_map'): {err}") from None
        names = sorted({f for k, f in weight_map.items() if k.startswith(prefix)})
        return [path.parent / f for f in names]
    return [path]


def read_hf_tensors(source: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors under `prefix` (names with the prefix removed) from a state dict, an nn.Module, or
    safetensors file(s): a file, a list of files, a folder, or a `*.safetensors.index.json`.
    Only the tensors under the prefix are read from disk."""
    prefix = _norm_prefix(prefix)
    if isinstance(source, torch.nn.Module):
        source = source.state_dict()
    if isinstance(source, Mapping):
        return {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
    paths: Sequence[Any] = [source] if isinstance(source, (str, Path)) else list(source)
    from safetensors import SafetensorError, safe_open

    out: dict[str, torch.Tensor] = {}
    for p in paths:
        for file in _safetensors_files(Path(p), prefix):
            if not file.exists():
                raise WeightsError(f"{file}: no such weights file (named by the safetensors index)")
            try:
                with safe_open(str(file), framework="pt") as fh:
                    for key in fh.keys():
                        if key.startswith(prefix):
                            name = key[len(prefix):]
                            if name in out:
                                raise WeightsError(f"{file}: tensor {key} appears in more than one file")
                            out[name] = fh.get_tensor(key)
            except (SafetensorError, OSError) as err:
                raise WeightsError(f"{file}: not a readable safetensors file ({err})") from None
    return out


# ----------------------------------------------------------------------------------------------
# expected names and shapes


def _check_spec(spec: LayerSpec) -> None:
    e = spec.experts
    problems = []
    if not e.activation.gated:
        problems.append(f"activation {e.activation.value} is not gated; Hugging Face MoE blocks hold gated experts")
    if e.bias:
        problems.append("experts.bias is set; the Hugging Face MoE blocks have no expert biases")
    if spec.router.noise is not None:
        problems.append("router.noise needs router.noise_weight, which no Hugging Face MoE block has")
    if problems:
        raise WeightsError(f"spec '{spec.name}' has no Hugging Face weight layout: " + "; ".join(problems))


def _shared_names(spec: LayerSpec) -> tuple[str, str | None]:
    """(module name of the shared MLP, name of its gate weight): Qwen2-MoE's gated one or DeepSeek's."""
    if spec.experts.shared_gate:
        return "shared_expert", "shared_expert_gate.weight"
    return "shared_experts", None


def _expected_hf_shapes(spec: LayerSpec, layout: HFLayout) -> dict[str, tuple[int, ...]]:
    e, h = spec.experts, spec.hidden
    n, f = e.routed, e.width
    shapes: dict[str, tuple[int, ...]] = {"gate.weight": (n, h)}
    if spec.balance.aux_free is not None:
        shapes["gate.e_score_correction_bias"] = (n,)
    if layout == HFLayout.STACKED:
        shapes["experts.gate_up_proj"] = (n, 2 * f, h)
        shapes["experts.down_proj"] = (n, h, f)
    else:
        g, u, d = _PER_EXPERT_NAMES[layout]
        for i in range(n):
            shapes[f"experts.{i}.{g}.weight"] = (f, h)
            shapes[f"experts.{i}.{u}.weight"] = (f, h)
            shapes[f"experts.{i}.{d}.weight"] = (h, f)
    if e.shared:
        mlp, gate = _shared_names(spec)
        fs = e.shared * e.shared_ffn_width
        shapes[f"{mlp}.gate_proj.weight"] = (fs, h)
        shapes[f"{mlp}.up_proj.weight"] = (fs, h)
        shapes[f"{mlp}.down_proj.weight"] = (h, fs)
        if gate:
            shapes[gate] = (1, h)
    return shapes


def detect_layout(names: Iterable[str]) -> HFLayout:
    """The expert layout the tensor names use (stacked when nothing identifies one)."""
    names = list(names)
    if any(re.fullmatch(r"experts\.\d+\.w[123]\.weight", k) for k in names):
        return HFLayout.PER_EXPERT_W123
    if any(re.fullmatch(r"experts\.\d+\.(gate|up|down)_proj\.weight", k) for k in names):
        return HFLayout.PER_EXPERT
    return HFLayout.STACKED


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
    expected = _expected_hf_shapes(spec, layout)
    err = _mismatch_error(f"Hugging Face weights under '{prefix}' ({layout.value} layout) do not match spec "
                          f"'{spec.name}'", expected, found)
    if err is not None:
        raise err

    e = spec.experts
    f = e.width
    out: dict[str, torch.Tensor] = {ROUTER_WEIGHT: found["gate.weight"]}
    if spec.balance.aux_free is not None:
        out[ROUTER_BIAS] = found["gate.e_score_correction_bias"]
    if layout == HFLayout.STACKED:
        gate_up = found["experts.gate_up_proj"]
        out["experts.w_gate"] = gate_up[:, :f]
        out["experts.w_up"] = gate_up[:, f:]
        out["experts.w_down"] = found["experts.down_proj"]
    else:
        g, u, d = _PER_EXPERT_NAMES[layout]
        for ours, theirs in (("w_gate", g), ("w_up", u), ("w_down", d)):
            out[f"experts.{ours}"] = torch.stack([found[f"experts.{i}.{theirs}.weight"] for i in range(e.routed)])
    if e.shared:
        mlp, gate = _shared_names(spec)
        fs = e.shared_ffn_width
        for i in range(e.shared):
            rows = slice(i * fs, (i + 1) * fs)
            out[f"shared.{i}.w_gate"] = found[f"{mlp}.gate_proj.weight"][rows]
            out[f"shared.{i}.w_up"] = found[f"{mlp}.up_proj.weight"][rows]
            out[f"shared.{i}.w_down"] = found[f"{mlp}.down_proj.weight"][:, rows]
        if gate:
            out[SHARED_GATE_WEIGHT] = found[gate]

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
    e = spec.experts
    out: dict[str, torch.Tensor] = {"gate.weight": weights[ROUTER_WEIGHT]}
    if spec.balance.aux_free is not None:
        out["gate.e_score_correction_bias"] = weights[ROUTER_BIAS]
    if layout == HFLayout.STACKED:
        out["experts.gate_up_proj"] = torch.cat([weights["experts.w_gate"], weights["experts.w_up"]], dim=1)
        out["experts.down_proj"] = weights["experts.w_down"]
    else:
        g, u, d = _PER_EXPERT_NAMES[layout]
        for ours, theirs in (("w_gate", g), ("w_up", u), ("w_down", d)):
            for i in range(e.routed):
                out[f"experts.{i}.{theirs}.weight"] = weights[f"experts.{ours}"][i]
    if e.shared:
        mlp, gate = _shared_names(spec)
        for ours, theirs, dim in (("w_gate", "gate_proj", 0), ("w_up", "up_proj", 0), ("w_down", "down_proj", 1)):
            out[f"{mlp}.{theirs}.weight"] = torch.cat([weights[f"shared.{i}.{ours}"] for i in range(e.shared)], dim=dim)
        if gate:
            out[gate] = weights[SHARED_GATE_WEIGHT]
    p = _norm_prefix(prefix)
    return {p + name: t.contiguous().clone() for name, t in out.items()}
