"""Hugging Face interop: transformers configs -> LayerSpec, MoE block weights <-> canonical weights.

Config import needs neither torch nor transformers (the family defaults are tabled in config.py and
checked against the installed transformers by the tests), so `moe-ir --help` and `import-hf` without
weights stay light; the weight functions load torch and safetensors on first use.
"""
from .cli import add_import_hf_command, run_import_hf
from .config import (FAMILY_DEFAULTS, SUPPORTED_MODEL_TYPES, HFLayerInfo, describe_hf_config, describe_hf_config_file,
                     import_hf_config_file, info_comment, moe_layer_indices, spec_from_hf_config, spec_yaml_text)

# The hook moe_ir.cli looks for in each command module.
add_command = add_import_hf_command

_WEIGHTS_API = ("HFLayout", "detect_layout", "hf_layer_prefix", "read_hf_tensors", "weights_from_hf", "weights_to_hf")

__all__ = ["FAMILY_DEFAULTS", "SUPPORTED_MODEL_TYPES", "HFLayerInfo", "HFLayout", "add_command",
           "add_import_hf_command",
           "describe_hf_config", "describe_hf_config_file", "detect_layout", "hf_layer_prefix", "import_hf_config_file",
           "info_comment", "moe_layer_indices", "read_hf_tensors", "run_import_hf", "spec_from_hf_config",
           "spec_yaml_text", "weights_from_hf", "weights_to_hf"]


def __getattr__(name: str):
    # Lazy: the weights module imports torch (through the graph builder).
    if name in _WEIGHTS_API:
        from . import weights

        return getattr(weights, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
