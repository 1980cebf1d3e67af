"""moe-ir: a compiler for DeepSeekMoE-style Mixture-of-Experts layers.

The public surface is what `__all__` lists; tests/test_public_api.py pins it.
"""
from .analysis import analyse
from .builder import build_graph
from .errors import BackendError, IRError, MoeIRError, PassError, SpecError, WeightsError
from .interpreter import interpret
from .params import init_weights, load_weights, save_weights
from .passes import PIPELINES, run_pipeline
from .spec import LayerSpec, json_schema, spec_from_dict, spec_to_dict

__version__ = "0.1.0"


def load_spec(path):
    """Read and check a YAML spec (see moe_ir.frontends.load_spec)."""
    from .frontends import load_spec as _load

    return _load(path)


def get_backend(name: str):
    """A backend by name (see `moe-ir backends`)."""
    from .backends import get_backend as _get

    return _get(name)


__all__ = [
    "BackendError", "IRError", "LayerSpec", "MoeIRError", "PIPELINES", "PassError", "SpecError", "WeightsError",
    "analyse", "build_graph", "get_backend", "init_weights", "interpret", "json_schema", "load_spec",
    "load_weights", "run_pipeline", "save_weights", "spec_from_dict", "spec_to_dict",
]
