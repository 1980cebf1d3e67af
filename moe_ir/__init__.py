"""moe-ir: a compiler for DeepSeekMoE-style Mixture-of-Experts layers.

The public surface is what `__all__` lists; tests/test_public_api.py pins it.
"""
import os as _os

import torch as _torch

# Triton decides once, when triton.language is first imported, whether kernels run compiled or in its
# interpreter; torch.compile or a backend may import it long before the Triton backend runs. Without a
# GPU only the interpreter can run a kernel, so choose it here, before anything imports triton. An
# explicit TRITON_INTERPRET from the user wins.
if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from .analysis import analyse  # noqa: E402
from .builder import build_graph  # noqa: E402
from .errors import BackendError, IRError, MoeIRError, PassError, SpecError, WeightsError  # noqa: E402
from .interpreter import interpret  # noqa: E402
from .params import init_weights, load_weights, save_weights  # noqa: E402
from .passes import PIPELINES, run_pipeline  # noqa: E402
from .spec import LayerSpec, json_schema, spec_from_dict, spec_to_dict  # noqa: E402

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
