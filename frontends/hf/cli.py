"""`moe-ir import-hf`: a Hugging Face config.json (and optionally its weights) -> spec YAML (+ safetensors).

The lead's CLI calls `add_import_hf_command(subparsers)`; the handler it registers returns an exit
code and lets MoeIRError propagate, so the CLI's own error printing (one line, exit_code) applies.
"""
from __future__ import annotations

import argparse
import sys

from moe_ir.artifacts import OutputFiles
from moe_ir.errors import MoeIRError
from .config import describe_hf_config_file, info_comment, spec_yaml_text

__all__ = ["add_export_hf_command", "add_import_hf_command", "run_export_hf", "run_import_hf"]


def add_import_hf_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `import-hf` to an argparse subparsers object; the handler is set as `func` (args -> exit code)."""
    p = subparsers.add_parser(
        "import-hf", help="turn a Hugging Face MoE config.json (and weights) into a moe-ir spec",
        description="Read a Hugging Face config.json of a supported MoE family (deepseek, deepseek_v2, "
                    "deepseek_v3, mixtral, qwen2_moe, olmoe) and write the spec of one MoE layer (or, with --model, "
                    "of the whole model). Keys the spec cannot express exactly are errors naming the key. With "
                    "--weights, also write that layer's (with --model: the whole model's) weights under moe-ir's "
                    "canonical names, read tensor by tensor from a file, a folder or a sharded checkpoint.")
    p.add_argument("config", help="config.json, or a model folder holding one")
    p.add_argument("-o", "--output", help="spec YAML to write (default: print to stdout)")
    p.add_argument("--model", action="store_true",
                   help="write the whole-model spec (model: and moe: sections, as specs/models/) instead of one "
                        "MoE layer's")
    p.add_argument("--layer", type=int, default=None, help="decoder layer to import (default: the first MoE layer)")
    p.add_argument("--name", default=None, help="spec name (default: <model_type>_layer<N>)")
    p.add_argument("--weights", nargs="+", default=None, metavar="PATH",
                   help="safetensors checkpoint: file(s), a folder, or a *.safetensors.index.json")
    p.add_argument("--weights-out", default=None,
                   help="safetensors file for the canonical weights (of the layer, or with --model of the model)")
    p.add_argument("--prefix", default=None,
                   help="the MoE block's tensor prefix in the checkpoint (default: model.layers.<N>.mlp., "
                        "or .block_sparse_moe. for Mixtral and Granite hub checkpoints, or "
                        "transformer.blocks.<N>.ffn. for DBRX)")
    p.set_defaults(func=run_import_hf)
    return p


def run_import_hf(args: argparse.Namespace) -> int:
    if getattr(args, "model", False):
        return _import_model(args)
    if (args.weights is None) != (args.weights_out is None):
        raise MoeIRError("--weights and --weights-out go together: give both to import weights, or neither")
    spec, info = describe_hf_config_file(args.config, layer=args.layer, name=args.name)
    text = spec_yaml_text(spec, info_comment(info, str(args.config)))
    # The weights and the spec are one output: both replace their files together, or neither does.
    with OutputFiles("import-hf") as out:
        weights_tmp = out.path(args.weights_out, "--weights-out") if args.weights is not None else None
        spec_tmp = out.path(args.output, "-o") if args.output else None
        if weights_tmp is not None:
            # torch and safetensors only when weights are asked for.
            from moe_ir.params import save_weights
            from .weights import weights_from_hf

            prefix = args.prefix if args.prefix is not None else _default_block_prefix(args.weights, info.layer)
            weights = weights_from_hf(args.weights, spec, prefix)
            save_weights(weights, weights_tmp, metadata={"source": spec.source, "hf_prefix": prefix})
        if spec_tmp is not None:
            spec_tmp.write_text(text, encoding="utf-8")
    if args.output:
        print(f"wrote {args.output}: {spec.experts.routed} routed experts (top-{spec.experts.top_k}), "
              f"{spec.experts.shared} shared, layer {info.layer} of {info.model_type}"
              + (f"; weights -> {args.weights_out}" if args.weights_out else ""), file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _default_block_prefix(source: list[str], layer: int) -> str:
    """Decoder layer `layer`'s MoE block in a checkpoint: model.layers.N.mlp. (transformers 5 modules and most hub
    checkpoints), else the first of model.layers.N.block_sparse_moe. (Mixtral's and Granite's hub name) and DBRX's
    transformer.blocks.N.ffn. that holds tensors (read from the headers only)."""
    from .safetensors_io import Checkpoint
    from .weights import HFLayout, hf_layer_prefix

    candidates = [hf_layer_prefix(layer, layout)
                  for layout in (HFLayout.STACKED, HFLayout.PER_EXPERT_W123, HFLayout.EXPERT_ROWS)]
    with Checkpoint(source) as ckpt:
        return next((c for c in candidates if any(name.startswith(c) for name in ckpt.entries)), candidates[0])


def _import_model(args: argparse.Namespace) -> int:
    """`import-hf --model`: the whole decoder's spec (frontends/hf/model.py), written like a layer spec; with
    --weights, the whole model's canonical weights too, streamed (frontends/hf/checkpoint.py)."""
    layer_flags = (("--layer", args.layer), ("--prefix", args.prefix))
    given = [flag for flag, value in layer_flags if value is not None]
    if given:
        raise MoeIRError(f"--model writes the whole model's spec: leave out {', '.join(given)}, which pick one "
                         "layer's spec or weights (or drop --model)")
    if args.weights is not None and (args.weights_out is None or args.output is None):
        raise MoeIRError("--model --weights writes the spec and the weights as one pair: give -o SPEC.yaml and "
                         "--weights-out WEIGHTS.safetensors")
    if args.weights is None and args.weights_out is not None:
        raise MoeIRError("--weights-out needs --weights: the checkpoint to convert")
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
    if args.weights is not None:
        from .checkpoint import import_hf_model

        source = args.weights[0] if len(args.weights) == 1 else args.weights
        written = import_hf_model(args.config, source, args.output, args.weights_out, spec_text=text, spec=spec)
        print(f"wrote {args.output}: model {spec.name}, {spec.model.layers} layers "
              f"({len(spec.model.moe_layers)} MoE) of {info.model_type}; weights -> {args.weights_out} "
              f"({written / 2**20:.1f} MiB)", file=sys.stderr)
    elif args.output:
        with OutputFiles("import-hf") as out:
            out.path(args.output, "-o").write_text(text, encoding="utf-8")
        print(f"wrote {args.output}: model {spec.name}, {spec.model.layers} layers "
              f"({len(spec.model.moe_layers)} MoE) of {info.model_type}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def add_export_hf_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `export-hf` (model spec + weights -> a folder transformers loads); handler set as `func`."""
    from .export import EXPORT_FAMILIES

    p = subparsers.add_parser(
        "export-hf", help="write a model spec and its weights as a Hugging Face folder transformers loads",
        description="Write config.json and model.safetensors (transformers' names, the layout save_pretrained "
                    "writes) for a moe-ir model spec and its canonical weights, so that "
                    "AutoModelForCausalLM.from_pretrained(FOLDER) loads it. The config is read back through "
                    "import-hf and must give the same spec: a spec that no transformers family expresses "
                    "exactly is refused with each family's reason.")
    p.add_argument("spec", help="model spec YAML (model: and moe: sections)")
    p.add_argument("--weights", required=True, metavar="FILE", help="the model's canonical weights (safetensors)")
    p.add_argument("-o", "--output", required=True, metavar="FOLDER",
                   help="folder to create (must not exist, or be empty)")
    p.add_argument("--family", choices=tuple(EXPORT_FAMILIES), default=None,
                   help="transformers model_type to write (default: the one the spec was imported from, else the "
                        "first that expresses the spec exactly)")
    p.set_defaults(func=run_export_hf)
    return p


def run_export_hf(args: argparse.Namespace) -> int:
    from moe_ir.frontends.yaml_spec import load_any
    from moe_ir.model_spec import ModelSpec
    from .export import export_hf_checkpoint

    spec = load_any(args.spec)
    if not isinstance(spec, ModelSpec):
        raise MoeIRError(f"{args.spec}: export-hf writes whole models; this is a layer spec (no model: section)")
    family, notes = export_hf_checkpoint(spec, args.weights, args.output, family=args.family)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.output}: {family} ({spec.model.layers} layers), config.json + model.safetensors",
          file=sys.stderr)
    return 0
