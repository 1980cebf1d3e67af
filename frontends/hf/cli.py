"""`moe-ir import-hf`: a Hugging Face config.json (and optionally its weights) -> spec YAML (+ safetensors).

The lead's CLI calls `add_import_hf_command(subparsers)`; the handler it registers returns an exit
code and lets MoeIRError propagate, so the CLI's own error printing (one line, exit_code) applies.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_ir.errors import MoeIRError
from .config import describe_hf_config_file, info_comment, spec_yaml_text

__all__ = ["add_import_hf_command", "run_import_hf"]


def add_import_hf_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `import-hf` to an argparse subparsers object; the handler is set as `func` (args -> exit code)."""
    p = subparsers.add_parser(
        "import-hf", help="turn a Hugging Face MoE config.json (and weights) into a moe-ir spec",
        description="Read a Hugging Face config.json of a supported MoE family (deepseek, deepseek_v2, "
                    "deepseek_v3, mixtral, qwen2_moe, olmoe) and write the spec of one MoE layer. Keys the spec "
                    "cannot express exactly are errors naming the key. With --weights, also write that layer's "
                    "weights under moe-ir's canonical names.")
    p.add_argument("config", help="config.json, or a model folder holding one")
    p.add_argument("-o", "--output", help="spec YAML to write (default: print to stdout)")
    p.add_argument("--model", action="store_true",
                   help="write the whole-model spec (model: and moe: sections, as specs/models/) instead of one "
                        "MoE layer's")
    p.add_argument("--layer", type=int, default=None, help="decoder layer to import (default: the first MoE layer)")
    p.add_argument("--name", default=None, help="spec name (default: <model_type>_layer<N>)")
    p.add_argument("--weights", nargs="+", default=None, metavar="PATH",
                   help="safetensors checkpoint: file(s), a folder, or a *.safetensors.index.json")
    p.add_argument("--weights-out", default=None, help="safetensors file for the layer's canonical weights")
    p.add_argument("--prefix", default=None,
                   help="the MoE block's tensor prefix in the checkpoint (default: model.layers.<N>.mlp., "
                        "or .block_sparse_moe. for Mixtral hub checkpoints)")
    p.set_defaults(func=run_import_hf)
    return p


def run_import_hf(args: argparse.Namespace) -> int:
    if getattr(args, "model", False):
        return _import_model(args)
    if (args.weights is None) != (args.weights_out is None):
        raise MoeIRError("--weights and --weights-out go together: give both to import weights, or neither")
    spec, info = describe_hf_config_file(args.config, layer=args.layer, name=args.name)
    text = spec_yaml_text(spec, info_comment(info, str(args.config)))
    if args.weights is not None:
        # torch and safetensors only when weights are asked for.
        from moe_ir.params import save_weights
        from .weights import HFLayout, hf_layer_prefix, read_hf_tensors, weights_from_hf

        prefix = args.prefix
        if prefix is None:
            prefix = hf_layer_prefix(info.layer)
            # Mixtral hub checkpoints keep the pre-transformers-5 module name.
            if not read_hf_tensors(args.weights, prefix):
                legacy = hf_layer_prefix(info.layer, HFLayout.PER_EXPERT_W123)
                if read_hf_tensors(args.weights, legacy):
                    prefix = legacy
        weights = weights_from_hf(args.weights, spec, prefix)
        save_weights(weights, args.weights_out, metadata={"source": spec.source, "hf_prefix": prefix})
    if args.output:
        from moe_ir.params import atomic_write

        atomic_write(args.output, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        print(f"wrote {args.output}: {spec.experts.routed} routed experts (top-{spec.experts.top_k}), "
              f"{spec.experts.shared} shared, layer {info.layer} of {info.model_type}"
              + (f"; weights -> {args.weights_out}" if args.weights_out else ""), file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _import_model(args: argparse.Namespace) -> int:
    """`import-hf --model`: the whole decoder's spec (frontends/hf/model.py), written like a layer spec."""
    layer_flags = (("--layer", args.layer), ("--weights", args.weights), ("--weights-out", args.weights_out),
                   ("--prefix", args.prefix))
    given = [flag for flag, value in layer_flags if value is not None]
    if given:
        raise MoeIRError(f"--model writes the whole model's spec: leave out {', '.join(given)}, which pick one "
                         "layer's spec or weights (or drop --model)")
    import yaml

    from moe_ir.model_spec import model_spec_to_dict
    from .model import model_spec_from_hf_config
    from .config import read_config_json, describe_hf_config

    data, file = read_config_json(args.config)
    spec = model_spec_from_hf_config(data, name=args.name, file=file)
    info = describe_hf_config(data, file=file)[1]
    lines = [f"Imported by `moe-ir import-hf --model` from {args.config} (model_type {info.model_type}).",
             f"MoE layers: {len(spec.model.moe_layers)} of {spec.model.layers}. Notes on the moe section:"]
    lines += [f"- {note}" for note in info.notes]
    header = "".join(f"# {ln}".rstrip() + "\n" for ln in lines)
    text = header + yaml.safe_dump(model_spec_to_dict(spec), sort_keys=False, default_flow_style=False,
                                   allow_unicode=True)
    if args.output:
        from moe_ir.params import atomic_write

        atomic_write(args.output, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        print(f"wrote {args.output}: model {spec.name}, {spec.model.layers} layers "
              f"({len(spec.model.moe_layers)} MoE) of {info.model_type}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
