"""fp8 checkpoints (DeepSeek-V3's release): float8 e4m3 weights `<name>` with float32 `<name>_scale_inv`, one
scale per 128 x 128 tile (value = fp8 value x scale of its tile; edge tiles are partial).

Two ways in:
  dequantize  `DequantizedCheckpoint` shows every fp8 weight as the float32 tensor it stands for and hides the
              scales, so the ordinary import (checkpoint.py, tensor_map.py rules) reads a float checkpoint.
  keep        `load_fp8_checkpoint(..., keep=True)`: a spec with `quantization: {format: fp8_e4m3, block: 128}`
              over the weights the checkpoint stores in fp8, and its weights as moe-ir's quantized parts
              (`<canonical>.qweight` the fp8 values, `<canonical>.scales` the tiles), taken through the same
              rules (experts stacked, copies copied), so no value is rounded.
Checks name the tensor: an fp8 weight without its scales, scales of the wrong shape, non-finite scales.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from moe_ir.errors import WeightsError
from .safetensors_io import Checkpoint, TensorEntry

FP8 = "F8_E4M3"
SCALE_SUFFIX = "_scale_inv"
TILE = 128

__all__ = ["DequantizedCheckpoint", "dequantize_fp8", "fp8_weights", "load_fp8_checkpoint"]


def fp8_weights(entries: dict[str, TensorEntry]) -> dict[str, str]:
    """fp8 weight name -> its scales' name; a WeightsError for an fp8 tensor without scales or scales whose
    shape is not one per 128 x 128 tile of the weight."""
    found = {}
    for name, entry in entries.items():
        if entry.dtype != FP8:
            continue
        scales = name + SCALE_SUFFIX
        if scales not in entries:
            raise WeightsError(f"tensor {name} is float8 e4m3 but the checkpoint has no {scales} (its block scales)")
        n, k = entry.shape[-2:] if len(entry.shape) >= 2 else (None, None)
        want = tuple(entry.shape[:-2]) + (math.ceil(n / TILE), math.ceil(k / TILE)) if n is not None else None
        if want is None or tuple(entries[scales].shape) != want:
            raise WeightsError(f"tensor {scales} has shape {list(entries[scales].shape)}; the fp8 weight {name} "
                               f"{list(entry.shape)} needs one scale per {TILE}x{TILE} tile: {list(want or ())}")
        found[name] = scales
    return found


def _tiles(scales, n: int, k: int):
    return scales.repeat_interleave(TILE, dim=-2)[..., :n, :].repeat_interleave(TILE, dim=-1)[..., :k]


def check_scales(name: str, scales) -> None:
    import torch

    if not bool(torch.isfinite(scales).all()):
        raise WeightsError(f"tensor {name} holds non-finite scales; scales must be finite")


def dequantize_fp8(weight, scales):
    """float32 [.., N, K]: each fp8 value times the scale of its 128 x 128 tile."""
    import torch

    n, k = weight.shape[-2:]
    return weight.to(torch.float32) * _tiles(scales.to(torch.float32), n, k)


class DequantizedCheckpoint:
    """A Checkpoint whose fp8 weights read as float32 (dequantized) and whose scale tensors are not listed."""

    def __init__(self, inner: Checkpoint):
        self.inner = inner
        self.scales = fp8_weights(inner.entries)
        hidden = set(self.scales.values())
        self.entries = {name: (dataclasses.replace(e, dtype="F32") if name in self.scales else e)
                        for name, e in inner.entries.items() if name not in hidden}
        self.description = f"{inner.description} (fp8 dequantized)"

    def read(self, name: str):
        return self.read_many([name])[0]

    def read_many(self, names: list[str]) -> list:
        extra = [self.scales[n] for n in names if n in self.scales]
        got = dict(zip(names + extra, self.inner.read_many(names + extra)))
        out = []
        for n in names:
            if n in self.scales:
                check_scales(self.scales[n], got[self.scales[n]])
                out.append(dequantize_fp8(got[n], got[self.scales[n]]))
            else:
                out.append(got[n])
        return out

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> "DequantizedCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_fp8_checkpoint(folder: str | Path, *, keep: bool = True, name: str | None = None):
    """(ModelSpec, canonical weights) of a Hugging Face checkpoint folder whose linear weights are fp8 with
    block scales. keep=False: float weights (dequantized, in the config's dtype). keep=True: the spec gains
    `quantization: fp8_e4m3, block 128` over the roles (experts, shared experts, dense FFN, attention) the
    checkpoint stores in fp8, and the weights are the quantized parts, bit for bit the checkpoint's."""
    import torch

    from moe_ir.model_builder import build_model_graph
    from moe_ir.quantization import QWEIGHT, SCALES, selected_weights, weight_roles, with_quantization
    from moe_ir.spec import QuantFormat, QuantizationSpec, QuantizedWeights
    from .checkpoint import canonical_tensors, plan_import
    from .config import read_config_json
    from .model import model_spec_from_hf_config
    from .tensor_map import Join

    data, file = read_config_json(folder)
    spec = model_spec_from_hf_config(data, name=name, file=file)
    with Checkpoint(Path(folder)) as raw:
        view = DequantizedCheckpoint(raw)
        graph, rules = plan_import(spec, view)
        if not keep or not view.scales:
            weights = dict(canonical_tensors(graph, rules, view))
            return spec, {n: weights[n] for n in graph.weights}
        quantized = {}
        for rule in rules:
            fp8 = [t in view.scales for t in rule.theirs]
            if any(fp8) and not all(fp8):
                raise WeightsError(f"tensors {', '.join(rule.theirs[:4])} mix fp8 and float; import this checkpoint "
                                   "dequantized")
            if all(fp8):
                quantized.update({o: rule for o in rule.ours})
        roles = set().union(*(weight_roles(graph).get(n, set()) for n in quantized))
        which = QuantizedWeights(**{f.name: f.name in roles for f in dataclasses.fields(QuantizedWeights)})
        chosen = set(selected_weights(graph, which))
        if chosen != set(quantized):
            odd = sorted(chosen ^ set(quantized))
            raise WeightsError(f"the checkpoint's fp8 tensors do not cover whole roles ({', '.join(sorted(roles))}): "
                               f"{', '.join(odd[:6])} differ; import it dequantized")
        spec = with_quantization(spec, QuantizationSpec(format=QuantFormat.FP8_E4M3, block=TILE, weights=which))
        q_graph = build_model_graph(spec)
        weights = {n: t for n, t in canonical_tensors(graph, [r for r in rules if r.ours[0] not in quantized], view)}
        for rule in {id(r): r for r in quantized.values()}.values():
            codes = rule.to_ours([t.to(torch.float32) for t in raw.read_many(list(rule.theirs))])
            scale_src = raw.read_many([view.scales[t] for t in rule.theirs])
            for t, s in zip(rule.theirs, scale_src):
                check_scales(view.scales[t], s)
            if rule.join == Join.SPLIT and len(rule.ours) > 1:  # chunks must fall on tile boundaries
                size = codes[0].shape[rule.dim]
                if size % TILE:
                    raise WeightsError(f"{rule.theirs[0]} splits into parts of {size} along dim {rule.dim}, not a "
                                       f"multiple of the {TILE}-wide scale tiles; import this checkpoint dequantized")
            scales = rule.to_ours(scale_src)
            for our, c, s in zip(rule.ours, codes, scales):
                weights[f"{our}.{QWEIGHT}"] = c.to(torch.float8_e4m3fn).contiguous()
                weights[f"{our}.{SCALES}"] = s.to(torch.float32).contiguous()
    missing = sorted(set(q_graph.weights) - set(weights))
    if missing:
        raise WeightsError(f"fp8 import left {', '.join(missing[:6])} unfilled")
    return spec, {n: weights[n] for n in q_graph.weights}

