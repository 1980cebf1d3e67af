"""Whole-model Hugging Face checkpoints -> moe-ir's canonical weights, streamed.

`plan_import` checks a checkpoint against a model spec from the headers alone (every missing, unexpected,
mis-shaped or non-float tensor, with the file that holds it) and returns the rules
(frontends/hf/tensor_map.py) that convert it. `canonical_tensors` then applies the rules one at a time,
reading only that rule's tensors, so the caller holds one rule's worth of source tensors at once:
`convert_checkpoint` writes them straight into a safetensors file (one copy of nothing), and
`load_hf_checkpoint` collects them into the canonical weight dict (one copy of the model).

`import_hf_model` is what `moe-ir import-hf --model --weights` runs: the spec YAML and the weights are one
output of moe_ir.artifacts (staged, then swapped in together), so a failure changes neither.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Mapping

from moe_ir.artifacts import OutputFiles
from moe_ir.errors import WeightsError
from moe_ir.model_spec import LayerForm, ModelSpec, model_spec_to_dict
from moe_ir.spec import canonical_spec_hash
from .fp8 import FP8, DequantizedCheckpoint
from .safetensors_io import FLOAT_DTYPES, Checkpoint, SafetensorsWriter
from .tensor_map import (DBRX_PREFIX, PER_EXPERT_NAMES, TensorRule, dbrx_model_rules, detect_model_layout,
                         detect_router_names, model_rules)

__all__ = ["convert_checkpoint", "canonical_tensors", "import_hf_model", "load_hf_checkpoint", "plan_import",
           "spec_hash"]


def spec_hash(spec: ModelSpec) -> str:
    return canonical_spec_hash(model_spec_to_dict(spec))


def _listing(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _sorted_numerically(names) -> list[str]:
    return sorted(names, key=lambda n: tuple((0, int(p)) if p.isdigit() else (1, p) for p in n.split(".")))


def plan_import(spec: ModelSpec, ckpt: Checkpoint, *, prefix: str = "model."):
    """(graph, rules) converting `ckpt` to the spec's canonical weights; one WeightsError lists every tensor
    the checkpoint lacks, has in excess, or holds with the wrong shape or a non-float dtype."""
    from moe_ir.model_builder import build_model_graph

    graph = build_model_graph(spec)
    our_shapes = {name: tuple(v.type.shape) for name, v in graph.weights.items()}
    block, layout = None, None
    if any(name.startswith(DBRX_PREFIX) for name in ckpt.entries):  # DBRX's own names and fused tensors
        rules = dbrx_model_rules(spec, graph.weights)
    else:
        block, layout = detect_model_layout(spec, ckpt.entries, prefix)
        rules = model_rules(spec, graph.weights, moe_block=block, layout=layout, prefix=prefix,
                            **detect_router_names(spec, ckpt.entries, block, prefix))
    expected: dict[str, tuple[int, ...]] = {}
    for rule in rules:
        expected.update(rule.their_shapes(our_shapes))
    # transformers lists a tied head under both names; its checkpoints may or may not store the copy.
    tolerated = {"lm_head.weight"} if spec.model.tied_embeddings else set()
    entries = ckpt.entries
    if spec.model.layer_form == LayerForm.DUAL_SHORTCUT_MOE:
        # LongCat-Flash's released checkpoints carry a multi-token-prediction head, which transformers skips too
        tolerated |= {n for n in entries if n.startswith(f"{prefix}mtp.")}
    e = spec.moe.experts
    if e.identity and layout is not None and layout in PER_EXPERT_NAMES:
        # save_pretrained splits LongCat-Flash's gate_up_proj per expert, the identity experts' unread rows too
        gate, up, _ = PER_EXPERT_NAMES[layout]
        tolerated |= {f"{prefix}layers.{i}.{block}.experts.{j}.{proj}.weight" for i in spec.model.moe_layers
                      for j in range(e.routed, e.routed + e.identity) for proj in (gate, up)}

    def where(name: str) -> str:
        return f"{name} ({Path(entries[name].file).name})" if len(set(e.file for e in entries.values())) > 1 else name

    missing = _sorted_numerically(n for n in expected if n not in entries)
    unexpected = _sorted_numerically(n for n in entries if n not in expected and n not in tolerated)
    wrong_shape = [f"{where(n)}: expected {list(s)}, found {list(entries[n].shape)}"
                   for n, s in expected.items() if n in entries and entries[n].shape != s]
    wrong_dtype = [f"{where(n)}: {entries[n].dtype}" for n in expected
                   if n in entries and entries[n].dtype not in FLOAT_DTYPES]
    if missing or unexpected or wrong_shape or wrong_dtype:
        parts = []
        if missing:
            parts.append("missing: " + _listing(missing))
        if unexpected:
            parts.append("unexpected: " + _listing([where(n) for n in unexpected]))
        if wrong_shape:
            parts.append("wrong shape: " + "; ".join(wrong_shape[:8]) + (" ..." if len(wrong_shape) > 8 else ""))
        if wrong_dtype:
            parts.append(f"not a float dtype ({'/'.join(FLOAT_DTYPES)}): " + _listing(wrong_dtype))
        hint = ""
        if wrong_dtype or any(n.endswith(("_scale_inv", ".scales", ".qweight", "weight_scale")) for n in unexpected):
            hint = " The checkpoint holds quantized tensors: dequantize it before importing."
        stored = "DBRX layout" if layout is None else f"{block}, {layout.value} experts"
        raise WeightsError(f"Hugging Face checkpoint {ckpt.description} ({stored}) does not "
                           f"match spec '{spec.name}': " + " | ".join(parts) + hint)
    return graph, rules


def canonical_tensors(graph, rules: list[TensorRule], ckpt: Checkpoint) -> Iterator[tuple[str, Any]]:
    """(canonical name, tensor in the graph's dtype, own storage) rule by rule, in the checkpoint's file
    order; each rule's source tensors are dropped before the next rule reads."""
    entries = ckpt.entries
    ordered = sorted(rules, key=lambda r: (entries[r.theirs[0]].file, r.theirs[0]))
    for rule in ordered:
        sources = ckpt.read_many(list(rule.theirs))
        parts = rule.to_ours(sources)
        del sources
        for name, tensor in zip(rule.ours, parts):
            dtype = graph.weights[name].type.dtype.torch
            converted = tensor.to(dtype).contiguous()
            # A chunk of a fused tensor is a view, an unconverted tensor the source's own (a state dict's, or
            # safetensors' lazy mapping of a file that may change later): copy both so each result owns its memory.
            if converted._base is not None or converted is tensor:
                converted = converted.clone()
            yield name, converted
        del parts


def convert_checkpoint(source: Any, spec: ModelSpec, out_path: str | os.PathLike,
                       metadata: Mapping[str, str] | None = None) -> int:
    """Write the canonical weights of `source` (a checkpoint file, folder, index json or state dict) to the
    safetensors file `out_path` tensor by tensor; returns the bytes of tensor data written. The caller
    stages `out_path` (see `import_hf_model`): a failure leaves a partial file there."""
    with Checkpoint(source) as raw:
        # an fp8 checkpoint (DeepSeek-V3's release) imports dequantized here, to the float spec written beside it
        ckpt = DequantizedCheckpoint(raw) if any(e.dtype == FP8 for e in raw.entries.values()) else raw
        graph, rules = plan_import(spec, ckpt)
        entries = [(name, v.type.dtype.torch, v.type.shape) for name, v in graph.weights.items()]
        meta = {"format": "pt", "spec_hash": spec_hash(spec), "hf_checkpoint": ckpt.description,
                **dict(metadata or {})}
        writer = SafetensorsWriter(out_path, entries, meta)
        written = 0
        try:
            for name, tensor in canonical_tensors(graph, rules, ckpt):
                writer.write(name, tensor)
                written += tensor.numel() * tensor.element_size()
                del tensor
        except BaseException:
            writer.abort()
            raise
        writer.finish()
        return written


def load_hf_checkpoint(folder: str | os.PathLike, *, name: str | None = None):
    """(ModelSpec, canonical weights) of a Hugging Face checkpoint folder: config.json plus model.safetensors,
    shards through model.safetensors.index.json, or *.safetensors files. Tensors are read one rule at a
    time (no second copy of the model) and take the dtypes of the spec's graph. An fp8 checkpoint with
    block scales keeps its weights quantized (frontends/hf/fp8.py)."""
    from .config import read_config_json
    from .model import model_spec_from_hf_config

    with Checkpoint(Path(folder)) as ckpt:
        if any(e.dtype == FP8 for e in ckpt.entries.values()):  # fp8 with block scales: kept quantized
            from .fp8 import load_fp8_checkpoint

            return load_fp8_checkpoint(folder, keep=True, name=name)
    data, file = read_config_json(folder)
    spec = model_spec_from_hf_config(data, name=name, file=file)
    with Checkpoint(Path(folder)) as ckpt:
        graph, rules = plan_import(spec, ckpt)
        weights = dict(canonical_tensors(graph, rules, ckpt))
    return spec, {name: weights[name] for name in graph.weights}


def import_hf_model(config_path: str | os.PathLike, weights_source: Any, spec_out: str | os.PathLike,
                    weights_out: str | os.PathLike, *, spec_text: str, spec: ModelSpec) -> int:
    """Write `spec_text` to `spec_out` and the converted weights to `weights_out` as one pair
    (moe_ir.artifacts.OutputFiles): both are staged beside their destinations and replace them together
    only once both are complete; on any failure neither destination changes."""
    with OutputFiles("import-hf") as out:
        weights_tmp = out.path(weights_out, "--weights-out")
        spec_tmp = out.path(spec_out, "-o")
        written = convert_checkpoint(weights_source, spec, weights_tmp, {"config": str(config_path)})
        spec_tmp.write_text(spec_text, encoding="utf-8")
    return written
