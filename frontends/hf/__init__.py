"""Hugging Face interop: transformers configs -> LayerSpec / ModelSpec, weights <-> canonical weights.

`load_hf_checkpoint(folder) -> (ModelSpec, weights)` reads a whole checkpoint folder (config.json with
model.safetensors or shards through model.safetensors.index.json), streamed; `export-hf` writes the reverse.

Config import needs neither torch nor transformers (the family defaults are tabled in config.py and
checked against the installed transformers by the tests), so `moe-ir --help` and `import-hf` without
weights stay light; the weight functions load torch and safetensors on first use.
"""
from .cli import add_export_hf_command, add_import_hf_command, run_export_hf, run_import_hf
from .config import (FAMILY_DEFAULTS, SUPPORTED_MODEL_TYPES, HFLayerInfo, describe_hf_config, describe_hf_config_file,
                     import_hf_config_file, info_comment, moe_layer_indices, spec_from_hf_config, spec_yaml_text)


def add_command(subparsers) -> None:
    """The hook moe_ir.cli looks for in each command module: `import-hf` and `export-hf`."""
    add_import_hf_command(subparsers)
    add_export_hf_command(subparsers)


_WEIGHTS_API = ("HFLayout", "detect_layout", "hf_layer_prefix", "read_hf_tensors", "weights_from_hf", "weights_to_hf")

__all__ = ["FAMILY_DEFAULTS", "SUPPORTED_MODEL_TYPES", "HFLayerInfo", "HFLayout", "add_command",
           "add_export_hf_command", "add_import_hf_command",
           "describe_hf_config", "describe_hf_config_file", "detect_layout", "hf_layer_prefix", "import_hf_config_file",
           "info_comment", "load_hf_checkpoint", "moe_layer_indices", "read_hf_tensors", "run_export_hf",
           "run_import_hf", "spec_from_hf_config", "spec_yaml_text", "weights_from_hf", "weights_to_hf"]


def __getattr__(name: str):
    # Lazy: the weights module imports torch (through the graph builder).
    if name == "load_hf_checkpoint":
        from .checkpoint import load_hf_checkpoint

        return load_hf_checkpoint
    if name in _WEIGHTS_API:
        from . import weights

        return getattr(weights, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
