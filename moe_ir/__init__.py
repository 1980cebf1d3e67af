"""moe-ir: a compiler for DeepSeekMoE-style Mixture-of-Experts layers and models.

The public surface is what `__all__` lists; tests/test_public_api.py pins it. Names are loaded on first
use, so `import moe_ir` (and `moe-ir --help`) imports neither torch nor any backend. This module and the
CLI are the two places that join the layers: the core (spec, IR, passes, interpreter, analysis,
validation harness) knows no frontend and no backend (pyproject.toml's import contracts).
"""
from __future__ import annotations

import importlib
from typing import Any

from .errors import BackendError, IRError, MoeIRError, PassError, SpecError, WeightsError

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "analyse": "moe_ir.analysis",
    "build_graph": "moe_ir.builder",
    "interpret": "moe_ir.interpreter",
    "init_weights": "moe_ir.params",
    "load_weights": "moe_ir.params",
    "save_weights": "moe_ir.params",
    "PIPELINES": "moe_ir.passes",
    "run_pipeline": "moe_ir.passes",
    "LayerSpec": "moe_ir.spec",
    "json_schema": "moe_ir.spec",
    "spec_from_dict": "moe_ir.spec",
    "spec_to_dict": "moe_ir.spec",
    "load_spec": "moe_ir.frontends",
    "get_backend": "moe_ir.backends",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BackendError", "IRError", "LayerSpec", "MoeIRError", "PIPELINES", "PassError", "SpecError", "WeightsError",
    "analyse", "build_graph", "get_backend", "init_weights", "interpret", "json_schema", "load_spec",
    "load_weights", "run_pipeline", "save_weights", "spec_from_dict", "spec_to_dict",
]
